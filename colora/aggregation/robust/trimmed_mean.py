"""``trimmed_mean``: the coordinate-wise mean of the clients' ΔW (and heads) after dropping the
``federation.trim_fraction`` largest and smallest values of each entry, re-factored at the global
rank (Yin et al. 2018). Unweighted."""

from __future__ import annotations

import math

import torch

from ...types import AdapterState
from .common import coordinatewise


def trimmed_mean(states: list[AdapterState], weights: list[float], alpha: float, rank: int, params, sents=None
                 ) -> tuple[list[AdapterState], list[float]]:
    k = len(states)
    cut = math.floor(params.trim_fraction * k)

    def stat(x: torch.Tensor) -> torch.Tensor:
        return x.sort(dim=0).values[cut:k - cut].mean(dim=0)
    return [coordinatewise(states, alpha, rank, stat)], [1.0]
