"""``krum`` and ``multi_krum`` (Blanchard et al. 2017): score each client by the summed squared
distances of its ΔW (and head) to its K - f - 2 nearest others, f = ``federation.robust_f``; keep the
lowest-scoring client (Krum) or the K - f lowest (multi-Krum), then aggregate those with the run's
aggregator and their usual weights. Distances are exact, from the factors (common.gram_distances)."""

from __future__ import annotations

import torch

from ...config import ColoraError
from ...types import AdapterState
from .common import gram_distances


def scores(states: list[AdapterState], alpha: float, f: int) -> torch.Tensor:
    k = len(states)
    near = k - f - 2
    if near < 1:
        raise ColoraError(f"federation.robust=krum needs more than robust_f + 2 = {f + 2} updates a round, got {k}; "
                          "sample more clients or lower federation.robust_f")
    dist = gram_distances(states, alpha)
    dist.fill_diagonal_(float("inf"))
    return dist.sort(dim=1).values[:, :near].sum(dim=1)


def krum(states, weights, alpha, rank, params, sents=None) -> tuple[list[AdapterState], list[float]]:
    best = int(scores(states, alpha, params.robust_f).argmin())
    return [states[best]], [weights[best]]


def multi_krum(states, weights, alpha, rank, params, sents=None) -> tuple[list[AdapterState], list[float]]:
    order = scores(states, alpha, params.robust_f).argsort().tolist()
    keep = sorted(order[: len(states) - params.robust_f])
    return [states[i] for i in keep], [weights[i] for i in keep]
