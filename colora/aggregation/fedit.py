"""``fedit``: the weighted mean of every adapter tensor, A and B averaged separately (FedIT).

Not exact for the update: mean(B) mean(A) - mean(B A) = -mean((B - mean B)(A - mean A)). Cheap, and
keeps the factors' coordinates, so server optimizers can act on them. Equal ranks only.
"""

from __future__ import annotations

import torch

from ..config import ColoraError
from ..types import AdapterState
from .hetero import equal_rank_rule


def check_same_shapes(states: list[AdapterState], rule: str) -> None:
    """Raise a clear error if the clients' adapters differ in keys or shapes (e.g. mixed ranks)."""
    ref = states[0]
    for i, s in enumerate(states[1:], start=1):
        if s.keys() != ref.keys():
            raise ColoraError(f"federation.aggregator={rule}: client adapters {0} and {i} have different keys")
        for k, v in s.items():
            if v.shape != ref[k].shape:
                raise ColoraError(
                    f"federation.aggregator={rule} needs equal LoRA ranks, but '{k}' has shapes "
                    f"{tuple(ref[k].shape)} and {tuple(v.shape)}; use zero_pad, svd or stack for mixed ranks"
                )


def weighted_mean(states: list[AdapterState], weights: list[float], keys=None) -> AdapterState:
    """sum_k w_k * state_k[key] for each key, with weights normalized to sum to 1."""
    total = float(sum(weights))
    norm = [w / total for w in weights]
    keys = states[0].keys() if keys is None else keys
    # A tensor every client sent unchanged (FFA-LoRA's A, RoLoRA's resting factor) stays bit for bit:
    # the weighted sum of equal values would round away from it.
    return {k: states[0][k].clone() if all(torch.equal(s[k], states[0][k]) for s in states[1:])
            else sum(w * s[k] for w, s in zip(norm, states)) for k in keys}


def fedit(states: list[AdapterState], weights: list[float]) -> AdapterState:
    """Weighted mean of each tensor of the clients' adapter states."""
    check_same_shapes(states, "fedit")
    return weighted_mean(states, weights)


FEDIT = equal_rank_rule("fedit", fedit, exact=False)
