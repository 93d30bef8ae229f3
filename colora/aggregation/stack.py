"""``stack`` (FLoRA, Wang et al. 2024): stack the clients' factors into one exact update, merge it into
the model, and start every round from fresh local adapters.

The global adapter is the accumulated update of all rounds so far, ΔW_t = ΔW_{t-1} + sum_k w_k s_k B_k A_k
(s_k = alpha / r_k), held as factors: stacking [B_prev, w_k s_k B_k ...] and [A_prev; A_k ...] gives it
exactly; the QR + small-SVD re-factorization (``colora.lowrank``) drops numerically zero directions
and caps the rank at min(d_out, d_in), so it stops growing once it is full. Its rank R is the largest
over modules (the others are zero-padded), stored at peft's scale alpha/R: the global is a valid rank-R
peft adapter (what ``adapter/`` holds), and exact.

Clients train on base + ΔW_t (the engine merges the global into the frozen base weights, as FLoRA's
clients do) with a fresh adapter at their own rank: A drawn like peft's default init (uniform in
±1/sqrt(d_in)) from a per-round seed, B = 0, plus the averaged task head. On the wire the server
sends the global (rank R, growing with the number of distinct directions learned) to each client;
clients send their own rank-r_k adapter back.
"""

from __future__ import annotations

import torch

from ..lowrank import factored_svd, numerical_rank, split_factors
from ..states import lora_pairs, lora_rank
from ..types import AdapterState
from .fedit import weighted_mean
from .hetero import RankedRule, lora_scale, non_lora_keys, normalized


def stack(states: list[AdapterState], weights: list[float], alpha: float, rank: int,
          previous: AdapterState) -> AdapterState:
    """``previous`` plus the weighted sum of the clients' updates, re-factored exactly (``rank`` unused)."""
    norm = normalized(weights)
    out = weighted_mean(states, weights, keys=non_lora_keys(states[0]))
    p_scale = lora_scale(alpha, lora_rank(previous))
    svds = {}
    for prefix, (a_key, b_key) in lora_pairs(previous).items():
        bcat = torch.cat([p_scale * previous[b_key].double()] + [w * lora_scale(alpha, lora_rank(s)) * s[b_key].double()
                                                                for w, s in zip(norm, states)], dim=1)
        acat = torch.cat([previous[a_key].double()] + [s[a_key].double() for s in states], dim=0)
        u, s, vh = factored_svd(bcat, acat)
        svds[prefix] = (u, s[: numerical_rank(s)], vh)
    new_rank = max(1, max(len(s) for _, s, _ in svds.values()))
    g_scale = lora_scale(alpha, new_rank)
    dtype = previous[next(iter(lora_pairs(previous).values()))[0]].dtype
    for prefix, (a_key, b_key) in lora_pairs(previous).items():
        u, s, vh = svds[prefix]
        out[b_key], out[a_key] = split_factors(u, s / g_scale, vh, new_rank, dtype)
    return {k: out[k] for k in previous}


def stack_for_client(global_state: AdapterState, rank: int, alpha: float,
                     template: AdapterState | None = None, seed: int = 0) -> AdapterState:
    """A fresh rank-``rank`` adapter (A from ``seed``, B = 0) with the global's head."""
    g = torch.Generator().manual_seed(seed)
    out = dict(global_state)
    for a_key, b_key in lora_pairs(global_state).values():
        a_g, b_g = global_state[a_key], global_state[b_key]
        bound = a_g.shape[1] ** -0.5  # kaiming_uniform(a=sqrt(5)) as peft initializes lora_A
        out[a_key] = (torch.rand(rank, a_g.shape[1], generator=g, dtype=torch.float64) * 2 - 1).mul_(bound).to(a_g.dtype)
        out[b_key] = b_g.new_zeros(b_g.shape[0], rank)
    return out


def base_delta(global_state: AdapterState) -> AdapterState:
    """The LoRA part of the global: what the engine merges into the frozen base for the clients."""
    return {k: global_state[k] for pair in lora_pairs(global_state).values() for k in pair}


STACK = RankedRule("stack", stack, stack_for_client, exact=True, merges_base=True)

__all__ = ["STACK", "base_delta", "stack", "stack_for_client"]
