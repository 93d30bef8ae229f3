"""Every compressed or serialized message: one module for split activations and their gradients,
gossip differences, and any adapter-shaped uplink (encode / decode / nbytes).

Framing: a message is a dict of tensors serialized with safetensors (:func:`pack`, :func:`unpack`);
``len(pack(...))`` is what a run counts in ``bytes_up`` / ``bytes_down``, so bytes on the wire are
measured, not estimated. The receiver rebuilds fresh tensors from the bytes: no storage and no
autograd graph is shared with the sender.

One quantizer, :func:`quantize_rows`: symmetric per-row scales s = max|x_row| / L with
L = 2^(bits-1) - 1, codes q in [-L, L], x ~ q s. Deterministic rounding (q = round(x / s)) for
activations; stochastic rounding (q = floor(x / s + u), u ~ U[0, 1) from a seeded generator, so
E[decode(encode(x))] = x) for gossip, whose differences must be unbiased. |error| <= s/2 per entry
(deterministic) or < s (stochastic).

Activation codecs (``split.activation_dtype``), for activations and gradients alike
(:func:`encode_tensor`): ``fp32`` (4 B/value, exact), ``bf16`` / ``fp16`` (2 B/value), ``int8``:
one fp32 scale per token row (``name.q`` int8 ``[B, T, H]`` + ``name.scale`` fp32 ``[B, T, 1]``,
H + 4 bytes per token).

Adapter compressors (:class:`Compressor`: ``gossip.quantize_bits``, ``gossip.topk``; usable for any
adapter-shaped message). :meth:`Compressor.encode` builds the real payload, a few flat tensors
(all keys of the state packed together, in the state's key order):

- ``codes``: uint8, the quantization codes offset by L; two 4-bit codes share a byte
- ``scales``: float32, one per row (see below)
- ``indices``: int32, flat positions of the kept entries within each tensor (top-k only)
- ``values``: float32, the kept entries themselves (top-k without quantization)

The receiver needs the keys and shapes to unpack; both ends hold the same model, so this is fixed
protocol metadata and is not sent per message. A "row" of an adapter tensor is a slice along its
shorter dimension: LoRA's A (r x d) and B (d x r) both get r scales of d entries, so scales cost
4 r bytes per tensor instead of 4 d; a 1-D tensor has one scale.

Top-k (``topk`` = fraction in (0, 1]): each tensor keeps its ceil(frac * numel) largest-|x|
entries (at least one); the rest decode to 0. Biased but contractive; with quantization on, the
kept values are quantized with one scale per tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from .types import AdapterState

_FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pack(tensors: dict[str, torch.Tensor]) -> bytes:
    """Serialize a message (safetensors): the bytes that travel and are counted."""
    return safetensors_save({k: v.contiguous() for k, v in tensors.items()})


def unpack(blob: bytes) -> dict[str, torch.Tensor]:
    """Fresh tensors from received bytes (no storage or graph shared with the sender)."""
    return safetensors_load(blob)


def _levels(bits: int) -> int:
    return 2 ** (bits - 1) - 1  # 127 for 8 bits, 7 for 4 bits: codes 0 .. 2L fit in `bits` bits


def _pack4(codes: torch.Tensor) -> torch.Tensor:
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    return codes[0::2] | (codes[1::2] << 4)


def _unpack4(packed: torch.Tensor, count: int) -> torch.Tensor:
    return torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)[:count]


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """View x as (rows, entries) with one row per index of its shorter dimension."""
    if x.dim() != 2:
        return x.reshape(1, -1)
    return x if x.shape[0] <= x.shape[1] else x.t()


def _from_rows(rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if len(shape) != 2:
        return rows.reshape(shape)
    return rows if shape[0] <= shape[1] else rows.t()


def quantize_rows(rows: torch.Tensor, bits: int, gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of the 2-D ``rows`` to ``bits`` bits: (int16 codes in [-L, L], float32 scales).

    ``gen`` given: stochastic rounding (unbiased); None: round to nearest. An all-zero row has scale 0."""
    L = _levels(bits)
    # Stochastic rounding works in float64 (gossip differences stay unbiased to the last bit);
    # rounding to nearest in float32, against the very float32 scale that travels.
    x = rows.to(torch.float64 if gen is not None else torch.float32)
    scales = x.abs().amax(dim=1) / L
    y = x / torch.where(scales > 0, scales, torch.ones_like(scales))[:, None]
    q = torch.floor(y + torch.rand(x.shape, generator=gen, dtype=torch.float64)) if gen is not None else torch.round(y)
    return q.clamp_(-L, L).to(torch.int16), scales.to(torch.float32)


def dequantize_rows(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Float32 rows from :func:`quantize_rows`' codes (any integer dtype, shape ``[rows, n]``) and scales."""
    return codes.to(torch.float32) * scales[:, None]


def encode_tensor(name: str, x: torch.Tensor, codec: str) -> dict[str, torch.Tensor]:
    """The wire tensors for float tensor ``x`` (an activation or its gradient) under ``codec``
    (fp32 | bf16 | fp16 | int8; int8: one scale per row of the last dimension)."""
    x = x.detach()
    if codec in _FLOAT_DTYPES:
        return {name: x.to(_FLOAT_DTYPES[codec]).contiguous()}
    q, scales = quantize_rows(x.reshape(-1, x.shape[-1]), 8)
    return {f"{name}.q": q.to(torch.int8).reshape(x.shape), f"{name}.scale": scales.reshape(*x.shape[:-1], 1)}


def decode_tensor(name: str, payload: dict[str, torch.Tensor]) -> torch.Tensor:
    """Float32 tensor ``name`` rebuilt from a received payload (inverse of :func:`encode_tensor`)."""
    if name in payload:
        return payload[name].to(torch.float32)
    return payload[f"{name}.q"].to(torch.float32) * payload[f"{name}.scale"]


@dataclass(frozen=True)
class Compressor:
    """Quantization to ``bits`` (0 = off) and/or top-k sparsification to ``topk`` (0 = off)."""

    bits: int = 0
    topk: float = 0.0

    def __post_init__(self):
        if self.bits not in (0, 4, 8):
            raise ValueError(f"bits={self.bits}: supported are 0 (off), 4 and 8")
        if not 0.0 <= self.topk <= 1.0:
            raise ValueError(f"topk={self.topk}: must lie in [0, 1]")

    @property
    def active(self) -> bool:
        return self.bits > 0 or self.topk > 0

    def _k(self, numel: int) -> int:
        return numel if self.topk <= 0 else max(1, min(numel, math.ceil(self.topk * numel)))

    def encode(self, state: AdapterState, gen: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The packed payload of ``state`` (see the module docstring); ``gen`` drives stochastic rounding."""
        if self.bits and gen is None:
            raise ValueError("stochastic rounding needs a seeded torch.Generator")
        codes, scales, indices, values = [], [], [], []
        for t in state.values():
            x = t.detach().reshape(-1) if self.topk > 0 else t.detach()
            if self.topk > 0:
                k = self._k(x.numel())
                idx = torch.topk(x.abs(), k, sorted=False).indices.sort().values
                indices.append(idx.to(torch.int32))
                x = x[idx]
            if self.bits:
                c, s = quantize_rows(x.reshape(1, -1) if self.topk > 0 else _as_rows(x), self.bits, gen)
                codes.append((c + _levels(self.bits)).to(torch.uint8).reshape(-1))
                scales.append(s)
            else:
                values.append(x.to(torch.float32).reshape(-1))
        payload = {}
        if codes:
            flat = torch.cat(codes)
            payload["codes"] = _pack4(flat) if self.bits == 4 else flat
            payload["scales"] = torch.cat(scales)
        if indices:
            payload["indices"] = torch.cat(indices)
        if values:
            payload["values"] = torch.cat(values)
        return payload

    def decode(self, payload: dict[str, torch.Tensor], like: AdapterState) -> AdapterState:
        """Unpack ``payload`` into tensors with the keys, shapes and dtypes of ``like``."""
        out: AdapterState = {}
        counts = [self._k(t.numel()) for t in like.values()]
        if self.bits:
            codes = payload["codes"]
            if self.bits == 4:
                codes = _unpack4(codes, sum(counts))
        c_off = s_off = i_off = 0
        for (key, ref), count in zip(like.items(), counts):
            if self.bits:
                rows = 1 if self.topk > 0 else _as_rows(ref).shape[0]
                code = codes[c_off : c_off + count].to(torch.int16).reshape(rows, -1) - _levels(self.bits)
                vals = dequantize_rows(code, payload["scales"][s_off : s_off + rows])
                c_off, s_off = c_off + count, s_off + rows
            else:
                vals = payload["values"][c_off : c_off + count]
                c_off += count
            if self.topk > 0:
                dense = torch.zeros(ref.numel(), dtype=torch.float32)
                dense[payload["indices"][i_off : i_off + count].long()] = vals.reshape(-1)
                i_off += count
                out[key] = dense.reshape(ref.shape).to(ref.dtype)
            else:
                out[key] = _from_rows(vals, ref.shape).reshape(ref.shape).to(ref.dtype)
        return out

    def nbytes(self, payload: dict[str, torch.Tensor]) -> int:
        """Exact size of the serialized payload, in bytes."""
        return len(pack(payload))


def from_gossip(bits: int, topk: float) -> Compressor:
    """The compressor for ``gossip.quantize_bits`` and ``gossip.topk``."""
    return Compressor(bits=int(bits), topk=float(topk))
