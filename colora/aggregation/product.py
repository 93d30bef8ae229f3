"""``product``: the weighted mean of the clients' updates B_k A_k, re-factored at the global rank.

The mean of K rank-r products has rank up to K*r; it is returned as its best rank-r approximation
(Eckart-Young), which is exact whenever the mean has rank <= r. Computed on the factors (QR + a small
SVD, see ``colora.lowrank``), never on a dense d_out x d_in matrix. Non-LoRA tensors (the task head)
are averaged. Equal ranks and equal alpha, so the LoRA scale alpha/r is common and cancels.
"""

from __future__ import annotations

from ..lowrank import factored_svd, split_factors, stack_factors
from ..states import lora_pairs
from ..types import AdapterState
from .fedit import check_same_shapes, weighted_mean
from .hetero import equal_rank_rule


def product(states: list[AdapterState], weights: list[float]) -> AdapterState:
    """Rank-r factors (B, A) of sum_k w_k B_k A_k for every LoRA module; plain mean elsewhere."""
    check_same_shapes(states, "product")
    total = float(sum(weights))
    norm = [w / total for w in weights]
    pairs = lora_pairs(states[0])
    lora_keys = {k for pair in pairs.values() for k in pair}
    out = weighted_mean(states, weights, keys=[k for k in states[0] if k not in lora_keys])
    for a_key, b_key in pairs.values():
        rank, dtype = states[0][a_key].shape[0], states[0][a_key].dtype
        bcat, acat = stack_factors([s[b_key] for s in states], [s[a_key] for s in states], norm)
        out[b_key], out[a_key] = split_factors(*factored_svd(bcat, acat), rank, dtype)
    return {k: out[k] for k in states[0]}


PRODUCT = equal_rank_rule("product", product, exact=True)
