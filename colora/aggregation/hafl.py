"""``hafl`` (HAFL, Su, Yan, Deng 2024, arXiv 2411.06581): heterogeneous ranks by importance, aggregated
one rank-1 component at a time.

A LoRA module's update is a sum of rank-1 components, s · B[:, i] A[i, :]. Each client scores the
components it holds by smoothed sensitivity (AdaLoRA's score, measured during local training, see
:class:`colora.train.Components`): per parameter I = |θ · ∂L/∂θ|, smoothed over the local steps
as Ī (EMA) times its uncertainty Ū (EMA of |I - Ī|); a component's score is the mean over its A row
plus the mean over its B column. The scores travel up with the adapter (r floats a module).

The server keeps one score per global component (:func:`merge_scores`: the weighted mean over the
clients that scored it this round, the previous score where nobody did) and, after every round,
re-orders the global's components by descending score (:func:`sort_by_importance`). Re-ordering the
rows of A and the columns of B together leaves every module's ΔW unchanged, so the global model is
the same; what changes is which components come first:
- ``hafl_mode: truncate``: a client of rank r receives the r most important components (the first
  r, as ``zero_pad`` hands them out, B rescaled to the client's scale alpha/r);
- ``hafl_mode: freeze``: every client holds the global at its full rank R and trains only its r most
  important components, the rest frozen; it sends back only those r (and scores all R).

Aggregation (:func:`hafl`) is at the rank-1 level: component i is the weighted mean over the clients
that hold it (rank > i), weights renormalized among them, where ``zero_pad`` divides by every client
and dilutes the components only large-rank clients have. A component no client holds keeps the
previous global's. Scales are folded into B first, as in ``zero_pad``. With equal ranks every
component is held by every client and the rule is ``zero_pad`` (= ``fedit``), bit for bit.
Not exact for the update (factors are averaged, like ``zero_pad``). Cost: r scores a module up,
O(K · R · (d_in + d_out)) on the server.
"""

from __future__ import annotations

import torch

from ..states import lora_pairs, lora_rank
from ..types import AdapterState
from .fedit import weighted_mean
from .hetero import RankedRule, lora_scale, non_lora_keys, pad_rank
from .zero_pad import zero_pad_for_client


def hafl(states: list[AdapterState], weights: list[float], alpha: float, rank: int,
         previous: AdapterState | None = None) -> AdapterState:
    """The global at ``rank``: each rank-1 component averaged over the clients that hold it."""
    g_scale = lora_scale(alpha, rank)
    ranks = [lora_rank(s) for s in states]
    out = weighted_mean(states, weights, keys=non_lora_keys(states[0]))
    # Who holds which component depends on the ranks only: the same K x R weights for every module.
    held = torch.tensor([[i < r for i in range(rank)] for r in ranks], dtype=torch.float64)
    share = torch.tensor(weights, dtype=torch.float64)[:, None] * held
    total = share.sum(0)  # per component: the weight of the clients holding it
    p = torch.where(total > 0, share / total.clamp_min(1e-300), torch.zeros_like(share))
    orphan = total == 0  # held by nobody this round: the previous global's component stays
    everyone = all(r == rank for r in ranks)  # every client holds every component: zero_pad's own sum
    for a_key, b_key in lora_pairs(states[0]).values():
        a_rows, b_cols = [], []
        for s, r in zip(states, ranks):
            factor = lora_scale(alpha, r) / g_scale
            a_rows.append(pad_rank(s[a_key], rank, 0))
            b_cols.append(pad_rank(s[b_key] * factor if factor != 1.0 else s[b_key], rank, 1))
        if everyone:
            mean = weighted_mean([{a_key: a, b_key: b} for a, b in zip(a_rows, b_cols)], weights)
            a_new, b_new = mean[a_key], mean[b_key]
        else:
            a_new = sum(pk[:, None].to(a.dtype) * a for pk, a in zip(p, a_rows))
            b_new = sum(pk[None, :].to(b.dtype) * b for pk, b in zip(p, b_cols))
        if bool(orphan.any()) and previous is not None:
            a_new[orphan] = previous[a_key][orphan].to(a_new.dtype)
            b_new[:, orphan] = previous[b_key][:, orphan].to(b_new.dtype)
        out[a_key], out[b_key] = a_new, b_new
    return {k: out[k] for k in states[0]}


def merge_scores(previous: dict[str, torch.Tensor], scores: list[dict[str, torch.Tensor]],
                 weights: list[float]) -> dict[str, torch.Tensor]:
    """The server's score per global component: the weighted mean of the clients' scores for it
    (a client's vector covers the components it holds, the first ones), else the previous score."""
    out = {}
    for key, old in previous.items():
        num = torch.zeros_like(old, dtype=torch.float64)
        den = torch.zeros_like(old, dtype=torch.float64)
        for s, w in zip(scores, weights):
            v = s[key].to(torch.float64)
            num[: len(v)] += w * v
            den[: len(v)] += w
        out[key] = torch.where(den > 0, num / den.clamp_min(1e-300), old.to(torch.float64)).to(old.dtype)
    return out


def sort_by_importance(state: AdapterState, scores: dict[str, torch.Tensor]) -> tuple[AdapterState, dict[str, torch.Tensor]]:
    """``state`` and ``scores`` with every module's components in descending score order (stable:
    equal scores keep their order). ΔW of every module is unchanged."""
    out, new_scores = dict(state), {}
    for a_key, b_key in lora_pairs(state).values():
        order = torch.sort(scores[a_key], descending=True, stable=True).indices
        out[a_key] = state[a_key][order].contiguous()
        out[b_key] = state[b_key][:, order].contiguous()
        new_scores[a_key] = scores[a_key][order]
    return out, new_scores


def initial_scores(state: AdapterState) -> dict[str, torch.Tensor]:
    """Zero scores, one per component of every module (keyed by its A key): nothing measured yet."""
    return {a: torch.zeros(lora_rank(state), dtype=torch.float32) for a, _ in lora_pairs(state).values()}


HAFL = RankedRule("hafl", hafl, zero_pad_for_client, exact=False)

__all__ = ["HAFL", "hafl", "initial_scores", "merge_scores", "sort_by_importance"]
