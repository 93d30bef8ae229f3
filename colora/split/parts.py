"""What both parties of a split step share: their keys, their generators and their FLOP meter."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
from torch.utils.flop_counter import FlopCounterMode

from ..adapters import RankedAdapters
from ..train import autocast
from .cut import ModelCut

CLIENT, SERVER = 0, 1  # the two parties' generator streams


def party_seed(seed: int, client: int, step: int, party: int) -> int:
    """The dropout stream of one party (0: client, 1: server) for ``client``'s step ``step``."""
    return int(np.random.SeedSequence([seed, 0x5B1, client, step, party]).generate_state(1, np.uint64)[0] % (2**63))


def part_keys(cut: ModelCut, adapters: RankedAdapters, client: bool) -> list[str]:
    """Adapter keys of the client part (embeddings + blocks [0, k), + head if U-shaped) or of the server part."""
    slots = adapters.slots[adapters.default_rank]
    ids = {id(p) for m in (cut.client_modules if client else cut.server_modules) for p in m.parameters()}
    return sorted(k for k, p in slots.params.items() if id(p) in ids)


@contextlib.contextmanager
def rank_layers(model, adapters: RankedAdapters, keys: list[str], rank: int | None) -> Iterator[None]:
    """Run the LoRA layers that own ``keys`` on the rank-``rank`` adapter (the rest: the default)."""
    name = None if rank is None else adapters.ensure(rank).adapter
    default = adapters.slots[adapters.default_rank].adapter
    if name in (None, default):
        yield
        return
    layers = [model.get_submodule(prefix) for prefix in sorted({k.rsplit(".lora_", 1)[0] for k in keys if ".lora_" in k})]
    for layer in layers:
        layer.set_adapter(name)
    try:
        yield
    finally:
        for layer in layers:
            layer.set_adapter(default)


class PartMeter:
    """FLOPs of each piece of a split step, counted once per (piece, batch shape): FlopCounterMode
    slows the pass it watches, and the count depends only on the shapes."""

    def __init__(self, precision: str, model):
        self.precision, self.model = precision, model
        self.flops: dict[tuple, float] = {}

    @contextlib.contextmanager
    def measure(self, piece: str, shape: tuple) -> Iterator[None]:
        key = (piece, shape)
        counter = FlopCounterMode(display=False) if key not in self.flops else None
        with counter or contextlib.nullcontext(), autocast(self.precision, self.model):
            yield
        if counter is not None:
            self.flops[key] = float(counter.get_total_flops())

    def total(self, pieces: tuple[str, ...], shape: tuple) -> float:
        return sum(self.flops.get((p, shape), 0.0) for p in pieces)
