"""``median``: the coordinate-wise median of the clients' ΔW (and heads), re-factored at the
global rank (Yin et al. 2018). Unweighted; breaks down only when half the clients attack."""

from __future__ import annotations

import torch

from ...types import AdapterState
from .common import coordinatewise


def median(states: list[AdapterState], weights: list[float], alpha: float, rank: int, params, sents=None) -> tuple[list[AdapterState], list[float]]:
    """One state: the entry-wise median ΔW at rank ``rank`` (torch's lower median for even K)."""
    return [coordinatewise(states, alpha, rank, lambda x: torch.quantile(x, 0.5, dim=0))], [1.0]
