"""Learning-rate schedule over communication rounds (the same for every algorithm, so that a
central run and a federated run at round t train with the same step size)."""

from __future__ import annotations

import math

from .config import TrainConfig


def lr_at(cfg: TrainConfig, rnd: int, rounds: int) -> float:
    """Learning rate for round ``rnd`` (1-based) of ``rounds``: linear warm-up, then the schedule."""
    if cfg.warmup_rounds and rnd <= cfg.warmup_rounds:
        return cfg.lr * rnd / cfg.warmup_rounds
    span = max(rounds - cfg.warmup_rounds, 1)
    progress = (rnd - cfg.warmup_rounds - 1) / span  # 0 at the first post-warm-up round
    if cfg.lr_schedule == "linear":
        return cfg.lr * (1.0 - progress)
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr
