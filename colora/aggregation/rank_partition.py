"""raFLoRA's rank-partitioned weighting (Wu et al. 2026, arXiv 2602.13486), an option of the SVD rules
(``federation.rank_partitioned`` with ``svd`` or ``hlora``).

With mixed ranks, the mean update Σ_k p_k ΔW_k weighs every client by its share p_k in every
direction, but only clients of rank ≥ r can contribute an r-th component: the higher components
are diluted by the clients that cannot have them, round after round, and the global update's energy
collapses onto the smallest rank ("rank collapse"). raFLoRA partitions each client's update by
component index at the ranks in use, l_1 < l_2 < ... (partition j = components [l_{j-1}, l_j) of the
client's own SVD, strongest first), and averages each partition over the clients that reach it:

    ΔW = Σ_j Σ_{k: r_k ≥ l_j} (p_k / P_j) ΔW_k^(j),   P_j = Σ_{k: r_k ≥ l_j} p_k

Here that is a re-weighting before the SVD rule: each client's factors are re-expressed in its own
SVD components (QR of B and Aᵀ plus an r x r SVD, never a dense d x d matrix) with component i
scaled by 1 / P_{j(i)}; the rule then forms Σ_k p_k (·) and truncates as it always does. With equal
ranks every P_j = 1 and the rule is unchanged.
"""

from __future__ import annotations

import torch

from ..lowrank import lapack_single_thread
from ..states import lora_pairs, lora_rank
from ..types import AdapterState
from .hetero import normalized


def rank_partitioned(states: list[AdapterState], weights: list[float]) -> list[AdapterState]:
    """The clients' states with every LoRA component re-weighted by 1 / P_j of its rank partition."""
    ranks = [lora_rank(s) for s in states]
    levels = sorted(set(ranks))
    if len(levels) == 1:
        return states
    p = normalized(weights)
    share = {level: sum(w for w, r in zip(p, ranks) if r >= level) for level in levels}  # P_j at its upper edge
    out = []
    for state, r in zip(states, ranks):
        # component i belongs to the partition of the first level above it: 1 / P of that level
        factor = torch.tensor([1.0 / share[next(level for level in levels if i < level)] for i in range(r)], dtype=torch.float64)
        new = dict(state)
        for a_key, b_key in lora_pairs(state).values():
            with lapack_single_thread():
                qb, rb = torch.linalg.qr(state[b_key].double(), mode="reduced")  # d_out x r
                qa, ra = torch.linalg.qr(state[a_key].double().T, mode="reduced")  # d_in x r
                u, s, vh = torch.linalg.svd(rb @ ra.T)  # B A = (qb u) diag(s) (qa vhᵀ)ᵀ
            new[b_key] = ((qb @ u) * (s * factor)).to(state[b_key].dtype)
            new[a_key] = (vh @ qa.T).to(state[a_key].dtype)
        out.append(new)
    return out
