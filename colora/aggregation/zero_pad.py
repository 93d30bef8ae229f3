"""``zero_pad`` (HetLoRA, Cho et al. 2024): pad every client's factors to the largest rank, average
A and B separately, truncate back to each client's rank.

The scale is folded into B first: client k's B_k becomes (s_k / s_R) · B_k with s = alpha/rank and
R the global rank, so every padded pair stands for its client's real ΔW at the global scale. A
client of rank r receives the first r components with B rescaled by s_R / s_r: exactly the
truncation of the global's ΔW. With equal ranks the factors are 1.0 and the rule is ``fedit``, bit
for bit. Not exact for the update (the mean of the products is not the product of the means).

HetLoRA options (``federation.hetlora_*``):
- ``sparsity_weighting``: each module's client weights are multiplied by ||ΔW_k||_F of that module
  (HetLoRA weighs clients by the norm of their update; combined here with the sample weights, so
  ``federation.weighting: uniform`` gives the paper's norm-only weights). The head keeps the
  sample weights.
- :func:`hetlora_prune`: rank self-pruning, applied to a client's trained state before upload.
"""

from __future__ import annotations

import math

from ..lowrank import product_fro_norm
from ..states import lora_pairs, lora_rank
from ..types import AdapterState
from .fedit import weighted_mean
from .hetero import RankedRule, lora_scale, pad_rank, revive, truncate


def zero_pad(states: list[AdapterState], weights: list[float], alpha: float, rank: int,
             previous: AdapterState | None = None, sparsity_weighting: bool = False) -> AdapterState:
    """Weighted mean of the clients' scale-folded factors, zero-padded to ``rank`` (the global rank)."""
    g_scale = lora_scale(alpha, rank)
    padded = []
    for s in states:
        factor = lora_scale(alpha, lora_rank(s)) / g_scale  # 1.0 at the global rank: no rounding
        p = dict(s)
        for a_key, b_key in lora_pairs(s).values():
            p[a_key] = pad_rank(s[a_key], rank, 0)
            p[b_key] = pad_rank(s[b_key] * factor if factor != 1.0 else s[b_key], rank, 1)
        padded.append(p)
    out = weighted_mean(padded, weights)
    if sparsity_weighting:
        for a_key, b_key in lora_pairs(states[0]).values():
            norms = [product_fro_norm(p[b_key], p[a_key]) for p in padded]
            w = [wi * n for wi, n in zip(weights, norms)]
            if sum(w) > 0:  # all-zero updates (B = 0 everywhere) keep the sample weights
                out.update(weighted_mean(padded, w, keys=[a_key, b_key]))
    return out


def zero_pad_for_client(global_state: AdapterState, rank: int, alpha: float,
                        template: AdapterState | None = None, seed: int = 0) -> AdapterState:
    """The first ``rank`` components of the global adapter, B rescaled to the client's scale."""
    factor = lora_scale(alpha, lora_rank(global_state)) / lora_scale(alpha, rank)
    return revive(truncate(global_state, rank, b_factor=factor, a_factor=1.0), template)


def hetlora_prune(state: AdapterState, alpha: float, gamma: float, previous_tail: float | None) -> tuple[AdapterState, float | None]:
    """HetLoRA's rank self-pruning: drop the last components when they carry less than last time.

    A client of rank r measures its tail, the update of its components [keep, r) with
    keep = max(1, floor(gamma * r)): sqrt(sum over modules of ||s_r B[:, keep:] A[keep:]||_F^2).
    If it is smaller than the tail it measured when it last trained, the client prunes to rank keep
    (B rescaled to the new scale so the kept components' ΔW is unchanged) and sends only those:
    later rounds train and send at the lower rank. Returns the (maybe pruned) state and the tail
    to compare against next time (None after a prune or at rank 1: nothing to compare yet). Simplified from the paper: no regularizer on the tail during
    local training.
    """
    r = lora_rank(state)
    keep = max(1, math.floor(gamma * r))
    if keep >= r:
        return state, None
    s_r = lora_scale(alpha, r)
    tail = math.sqrt(sum(product_fro_norm(s_r * state[b][:, keep:], state[a][keep:]) ** 2
                         for a, b in lora_pairs(state).values()))
    if previous_tail is None or tail >= previous_tail:
        return state, tail
    return truncate(state, keep, b_factor=s_r / lora_scale(alpha, keep), a_factor=1.0), None


ZERO_PAD = RankedRule("zero_pad", zero_pad, zero_pad_for_client, exact=False)

__all__ = ["ZERO_PAD", "hetlora_prune", "zero_pad", "zero_pad_for_client"]
