"""Simulated devices: one profile per client, and whether each can hold its part of the training.

``client_profiles`` draws every client's device around ``system.client`` (``system.heterogeneity``,
seeded by the run's seed, so every paradigm of a sweep sees the same fleet). ``training_memory``
estimates what one client needs for its part of the model:

    base weights    resident bytes of the frozen base it holds (quantized if model.quantize is set)
  + adapter         16 bytes per trainable parameter: fp32 weight, gradient, AdamW's two moments
  + activations     per transformer block it runs, 2 * b * s * h * (34 + 5 * a * s / h) bytes:
                    Korthikanti et al. (2022)'s 16-bit estimate of the tensors saved for backward,
                    doubled for fp32 (b batch, s sequence length, h hidden size, a attention heads)

It is an estimate (no allocator overhead, the full ``data.max_length`` as sequence length), meant to
rank devices and flag the ones that clearly cannot train, not to predict an OOM to the byte.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import Config, DeviceProfile


def client_profiles(cfg: Config) -> list[DeviceProfile]:
    """One device profile per client: ``system.client`` times per-client factors (``system.heterogeneity``)."""
    het, base = cfg.system.heterogeneity, cfg.system.client
    n = cfg.clients.num
    if het.distribution == "fixed" or het.spread == 0:
        return [base.model_copy() for _ in range(n)]
    rng = np.random.default_rng([cfg.seed, 0x5E7])
    out = []
    for _ in range(n):
        values = base.model_dump()
        for name in het.fields:  # one independent factor per field: compute and links vary separately
            if het.distribution == "uniform":
                factor = rng.uniform(1 - het.spread, 1 + het.spread)
            else:
                factor = float(np.exp(rng.normal(-het.spread**2 / 2, het.spread)))
            values[name] *= factor
        out.append(DeviceProfile(**values))
    return out


@dataclass(frozen=True)
class ModelShape:
    """What the memory estimate needs to know about the model a client runs (or its part of it)."""

    base_bytes: float  # resident bytes of the frozen weights the client holds
    adapter_params: int  # trainable parameters on the client (LoRA factors, and the head if it holds it)
    blocks: int  # transformer blocks the client runs
    hidden: int
    heads: int


def activation_bytes(batch: int, seq: int, hidden: int, heads: int) -> float:
    """Saved-for-backward activations of one transformer block in fp32 (module docstring)."""
    return 2.0 * batch * seq * hidden * (34 + 5 * heads * seq / hidden)


def training_memory(shape: ModelShape, batch: int, seq: int) -> float:
    """Estimated bytes one client needs to train its part: base weights + adapter state + activations."""
    return shape.base_bytes + 16.0 * shape.adapter_params + shape.blocks * activation_bytes(batch, seq, shape.hidden, shape.heads)


def memory_report(profiles: list[DeviceProfile], need_bytes: list[float]) -> dict:
    """Per-client estimate against each profile's ``memory_gb``; ``over`` lists the clients that do not fit."""
    over = [k for k, (p, need) in enumerate(zip(profiles, need_bytes)) if need > p.memory_gb * 1e9]
    return {"need_gb": [b / 1e9 for b in need_bytes], "memory_gb": [p.memory_gb for p in profiles], "over": over}


def available_memory(device) -> float:
    """Bytes the executing machine can give now: free GPU memory on a CUDA device, else the host's
    MemAvailable (the page cache it can drop counts as free)."""
    import torch

    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def fuse_report(shape: ModelShape, batch: int, seq: int, fuse: int, processes: int, available: float) -> dict:
    """engine.fuse against the machine: ``processes`` executors (workers) each holding one fused pass
    (the base is mapped once, so it counts once); ``max_fuse``: the largest K that fits."""
    per_client = training_memory(shape, batch, seq) - shape.base_bytes
    need = shape.base_bytes + processes * fuse * per_client
    max_fuse = int(max(0.0, available - shape.base_bytes) // max(processes * per_client, 1.0))
    return {"fuse": fuse, "need_gb": need / 1e9, "available_gb": available / 1e9, "max_fuse": max_fuse, "fits": need <= available}
