"""``svd`` (FlexLoRA, Bai et al. 2024; HLoRA's aggregation): the weighted mean of the clients' real
updates, re-factored by a truncated SVD for each client's rank.

Per LoRA module: ΔW = sum_k w_k s_k B_k A_k with s_k = alpha / r_k folded in (see ``hetero``), whose
rank is at most sum_k r_k. Its SVD comes from the stacked factors (QR of d x Σr blocks plus the SVD
of a Σr x Σr core, ``colora.lowrank``), never from a dense d_out x d_in matrix: O((d_out + d_in)(Σr)^2)
instead of O(d_out d_in min(d_out, d_in)).

The global adapter is the top-R part of ΔW, R the largest client rank, split evenly at the global
scale s_R: B = U sqrt(S / s_R), A = sqrt(S / s_R) Vh. Because an SVD's top-r part is the first r of
its top-R components, a client of rank r receives the first r components times sqrt(s_R / s_r):
its factors reproduce the rank-r truncation of ΔW through its own scale alpha/r, singular values
still split evenly. Exact (Eckart-Young optimal otherwise) whenever the client's rank is at least
the rank of ΔW. Components of zero singular value are zeros here and restart from the client's
template (``hetero.revive``).
"""

from __future__ import annotations

import math

from ..lowrank import factored_svd, numerical_rank, split_factors, stack_factors
from ..states import lora_pairs, lora_rank
from ..types import AdapterState
from .fedit import weighted_mean
from .hetero import RankedRule, lora_scale, non_lora_keys, normalized, revive, truncate


def svd(states: list[AdapterState], weights: list[float], alpha: float, rank: int,
        previous: AdapterState | None = None) -> AdapterState:
    """The top-``rank`` SVD of the weighted mean ΔW per module, as factors at scale alpha/rank."""
    norm = normalized(weights)
    out = weighted_mean(states, weights, keys=non_lora_keys(states[0]))
    g_scale = lora_scale(alpha, rank)
    for a_key, b_key in lora_pairs(states[0]).values():
        folded = [w * lora_scale(alpha, lora_rank(s)) for w, s in zip(norm, states)]
        bcat, acat = stack_factors([s[b_key] for s in states], [s[a_key] for s in states], folded)
        u, s, vh = factored_svd(bcat, acat)
        s = s[: numerical_rank(s)]  # numerical zeros become exact zeros, hence revivable
        out[b_key], out[a_key] = split_factors(u, s / g_scale, vh, rank, states[0][a_key].dtype)
    return {k: out[k] for k in states[0]}


def svd_for_client(global_state: AdapterState, rank: int, alpha: float,
                   template: AdapterState | None = None, seed: int = 0) -> AdapterState:
    """The first ``rank`` SVD components of the global, re-split for the client's scale alpha/rank."""
    c = math.sqrt(lora_scale(alpha, lora_rank(global_state)) / lora_scale(alpha, rank))
    return revive(truncate(global_state, rank, b_factor=c, a_factor=c), template)


SVD = RankedRule("svd", svd, svd_for_client, exact=True)
