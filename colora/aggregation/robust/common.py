"""What the robust rules share: client updates as ΔW = (alpha/r) B·A per LoRA module, their exact
pairwise distances from the factors, and a dense ΔW re-factored at a given rank.

LoRA factors are defined only up to an invertible r x r change of basis (B A = (B M)(M^-1 A)), so a
statistic over A and B separately depends on that arbitrary basis. The robust rules therefore work
on the product ΔW = (alpha/r) B A, the function the adapter adds, which is basis-free and comparable
across ranks; the task head (no factorization) is used as it is.
"""

from __future__ import annotations

import torch

from ...lowrank import lapack_single_thread, split_factors
from ...states import lora_pairs, lora_rank
from ...types import AdapterState


def scale(state: AdapterState, alpha: float) -> float:
    return alpha / lora_rank(state)


def gram_distances(states: list[AdapterState], alpha: float) -> torch.Tensor:
    """K x K squared Frobenius distances between the clients' functions: sum over LoRA modules of
    ||ΔW_i - ΔW_j||^2 (from r x r Gram products of the factors, never a d_out x d_in matrix), plus
    the squared distance of every non-LoRA tensor (the head). Float64."""
    k = len(states)
    pairs = lora_pairs(states[0])
    lora_keys = {key for pair in pairs.values() for key in pair}
    s = [scale(st, alpha) for st in states]
    inner = torch.zeros(k, k, dtype=torch.float64)
    for a_key, b_key in pairs.values():
        bs = [st[b_key].double() for st in states]
        as_ = [st[a_key].double() for st in states]
        for i in range(k):
            for j in range(i, k):
                # <s_i B_i A_i, s_j B_j A_j>_F = s_i s_j tr((B_i^T B_j)(A_j A_i^T))
                v = s[i] * s[j] * float(((bs[i].T @ bs[j]) * (as_[i] @ as_[j].T)).sum())
                inner[i, j] += v
                if i != j:
                    inner[j, i] += v
    for key in (key for key in states[0] if key not in lora_keys):
        flat = torch.stack([st[key].double().reshape(-1) for st in states])
        inner += flat @ flat.T
    sq = inner.diagonal()
    return (sq[:, None] + sq[None, :] - 2 * inner).clamp_min(0.0)


def delta_rows(states: list[AdapterState], a_key: str, b_key: str, alpha: float, rows: slice) -> torch.Tensor:
    """The clients' ΔW restricted to output rows ``rows``: K x len(rows) x d_in (float64)."""
    return torch.stack([scale(st, alpha) * (st[b_key][rows].double() @ st[a_key].double()) for st in states])


# Output rows of a module's ΔW handled at once by the coordinate-wise rules: K x ROW_BLOCK x d_in
# entries in memory (K=10, d_in=4096: 80 MB in float64), whatever d_out is.
ROW_BLOCK = 256


def coordinatewise(states: list[AdapterState], alpha: float, rank: int, statistic) -> AdapterState:
    """A rank-``rank`` adapter whose ΔW is ``statistic`` (a function K x ... -> ...) of the clients'
    ΔW entry by entry, and whose head is the same statistic of the clients' heads.

    The statistic's ΔW is built one block of output rows at a time (one dense d_out x d_in matrix
    per module, never K of them) and re-factored by its best rank-``rank`` approximation (SVD)."""
    pairs = lora_pairs(states[0])
    lora_keys = {key for pair in pairs.values() for key in pair}
    out: AdapterState = {}
    for key in states[0]:
        if key not in lora_keys:
            out[key] = statistic(torch.stack([st[key].double() for st in states])).to(states[0][key].dtype)
    ref = max(states, key=lora_rank)
    for a_key, b_key in pairs.values():
        d_out = states[0][b_key].shape[0]
        dense = torch.cat([statistic(delta_rows(states, a_key, b_key, alpha, slice(r, r + ROW_BLOCK)))
                           for r in range(0, d_out, ROW_BLOCK)])
        # (alpha/rank) B A = dense  =>  B A = (rank/alpha) dense; exact SVD of the one dense matrix
        with lapack_single_thread():
            u, s, vh = torch.linalg.svd(dense * (rank / alpha), full_matrices=False)
        out[b_key], out[a_key] = split_factors(u, s, vh, rank, ref[a_key].dtype)
    return {key: out[key] for key in ref}
