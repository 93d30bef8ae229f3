"""What crosses the cut, as real bytes: safetensors payloads of activations, masks, labels, gradients.

Every exchange is ``pack`` -> ``bytes`` -> ``unpack``; the receiver rebuilds fresh tensors from the
bytes, so no autograd graph (and no storage) is shared across the cut, and ``len(bytes)`` is what
the run counts in ``bytes_up`` / ``bytes_down``.

Payload keys (a test recomputes the sizes from these):
- uplink, standard split: ``activation`` ``[B, T, H]`` (coded, below), ``attention_mask`` ``[B, T]`` bool,
  ``labels`` (``[B]`` int64 / float32 for seq-cls, ``[B, T]`` int64 for causal LM);
- uplink, U-shaped: ``activation`` + ``attention_mask`` (no labels), then later ``grad`` of the
  server's output;
- downlink: ``grad`` ``[B, T, H]`` of the activation; U-shaped also ``activation`` (the last hidden state).

Activation codecs (``split.activation_dtype``), applied to activations and gradients alike:
``fp32`` (4 B/value, exact), ``bf16`` / ``fp16`` (2 B/value), ``int8``: symmetric per-row
quantization, one fp32 scale per token row (``name.q`` int8 ``[B, T, H]`` + ``name.scale`` fp32
``[B, T, 1]``, i.e. H + 4 bytes per token). The int8 codec lives here because no shared
compression module with an int8 codec existed when this was written.
"""

from __future__ import annotations

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

_FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def encode_tensor(name: str, x: torch.Tensor, codec: str) -> dict[str, torch.Tensor]:
    """The wire tensors for float tensor ``x`` under ``codec`` (fp32 | bf16 | fp16 | int8)."""
    x = x.detach()
    if codec in _FLOAT_DTYPES:
        return {name: x.to(_FLOAT_DTYPES[codec]).contiguous()}
    # int8: scale each row (last dim) by its max |x| / 127; an all-zero row keeps scale 1.
    scale = x.abs().amax(dim=-1, keepdim=True).float() / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(x.float() / scale).clamp_(-127, 127).to(torch.int8)
    return {f"{name}.q": q.contiguous(), f"{name}.scale": scale.contiguous()}


def decode_tensor(name: str, payload: dict[str, torch.Tensor]) -> torch.Tensor:
    """Float32 tensor ``name`` rebuilt from a received payload (inverse of :func:`encode_tensor`)."""
    if name in payload:
        return payload[name].to(torch.float32)
    return payload[f"{name}.q"].to(torch.float32) * payload[f"{name}.scale"]


def pack(tensors: dict[str, torch.Tensor]) -> bytes:
    """Serialize a payload (safetensors)."""
    return safetensors_save({k: v.contiguous() for k, v in tensors.items()})


def unpack(blob: bytes) -> dict[str, torch.Tensor]:
    """Fresh tensors from received bytes (no storage or graph shared with the sender)."""
    return safetensors_load(blob)
