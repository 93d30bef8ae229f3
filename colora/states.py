"""Adapter states as data: the peft-keyed ``dict[str, Tensor]`` that moves between parties, its wire
bytes and its LoRA structure. Pure functions over tensors (torch and safetensors only): a server
that only aggregates imports this, never the model code in ``colora.adapters``.
"""

from __future__ import annotations

from .codecs import pack
from .config import ColoraError
from .types import AdapterState


def serialize(state: AdapterState) -> bytes:
    """The bytes that go on the wire for ``state`` (safetensors, the format peft saves)."""
    return pack(state)


def payload_nbytes(state: AdapterState) -> int:
    """Size of the real serialized payload of ``state``, in bytes."""
    return len(serialize(state))


def lora_pairs(state: AdapterState) -> dict[str, tuple[str, str]]:
    """Map each LoRA module prefix to its (A key, B key) in ``state``."""
    pairs = {}
    for key in state:
        if key.endswith(".lora_A.weight"):
            prefix = key[: -len(".lora_A.weight")]
            pairs[prefix] = (key, prefix + ".lora_B.weight")
    return pairs


def lora_rank(state: AdapterState) -> int:
    """The LoRA rank of ``state`` (rows of its LoRA A matrices; all modules share one rank)."""
    for key, value in state.items():
        if key.endswith(".lora_A.weight"):
            return int(value.shape[0])
    raise ColoraError("adapter state holds no LoRA A matrices")


def adapter_params_at(state: AdapterState, rank: int) -> int:
    """Parameters of ``state``'s adapter if its LoRA rank were ``rank`` (the head does not change)."""
    pairs = lora_pairs(state)
    lora = {k for pair in pairs.values() for k in pair}
    per_rank = sum(state[a].shape[1] + state[b].shape[0] for a, b in pairs.values())  # d_in + d_out per module
    return rank * per_rank + sum(v.numel() for k, v in state.items() if k not in lora)
