"""The interface of every aggregation rule (equal and mixed LoRA ranks), and what rules share.

Convention: an adapter state whose LoRA matrices have rank r stands for the update
ΔW = (alpha / r) · B · A on each module, exactly as peft applies it. Every state below (client
states, the global state, what a client receives) follows it, so each one is a valid peft adapter
at its own rank.

With mixed ranks one global state cannot fit every client, so a rule is a pair of pure functions
(equal-rank rules, :func:`equal_rank_rule`, fit the same pair: their ``for_client`` hands every
client the one global adapter, so algorithms never branch on the kind of rule):
- ``aggregate(states, weights, alpha, rank, previous) -> global``: combines the clients' states
  (each at its own rank) into the global adapter at rank ``rank`` (the largest client rank; the
  global is what is evaluated and exported). ``previous`` is the global before the round (only
  ``stack`` reads it).
- ``for_client(global, rank, alpha, template, seed) -> state``: what a client of rank ``rank``
  receives. ``template`` is that rank's freshly initialized adapter (seeded A, B = 0): LoRA
  components the global cannot fill (B column zero) restart from it instead of staying dead
  (both factors zero means zero gradients forever). ``seed`` seeds rules that re-initialize.

Both fold the scale alpha/r into the factors before combining. Combining the raw B_k·A_k and
applying the result at one scale mis-weights clients by up to r_max/r_min: at a fixed alpha a
rank-2 client's B·A moves W 4x as much as a rank-8 client's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from ..states import lora_pairs
from ..types import AdapterState


def lora_scale(alpha: float, rank: int) -> float:
    """peft's LoRA scale: the update of a rank-``rank`` adapter is (alpha / rank) · B · A."""
    return alpha / rank


@dataclass(frozen=True)
class RankedRule:
    """An aggregation rule: ``aggregate`` to the global adapter, ``for_client`` back out.

    ``merges_base``: the global adapter is merged into the clients' base weights and clients train a
    fresh adapter on top (FLoRA); the engine then adds the global's ΔW to the frozen base for them.
    ``equal_ranks``: the rule combines states of one shape only (every client at the global's rank).
    """

    name: str
    aggregate: Callable[..., AdapterState]
    for_client: Callable[[AdapterState, int, float, AdapterState | None, int], AdapterState]
    exact: bool
    merges_base: bool = False
    equal_ranks: bool = False


def _combine_equal(combine: Callable[[list[AdapterState], list[float]], AdapterState], states: list[AdapterState],
                   weights: list[float], alpha: float, rank: int, previous: AdapterState | None) -> AdapterState:
    return combine(states, weights)  # one rank: no scale to fold, nothing of the previous global to keep


def same_for_every_client(global_state: AdapterState, rank: int, alpha: float, template: AdapterState | None,
                          seed: int) -> AdapterState:
    """``for_client`` of an equal-rank rule: every client receives the one global adapter."""
    return global_state


def equal_rank_rule(name: str, combine: Callable[[list[AdapterState], list[float]], AdapterState], exact: bool) -> RankedRule:
    """The rule interface around an equal-rank ``combine(states, weights) -> global``."""
    return RankedRule(name, partial(_combine_equal, combine), same_for_every_client, exact, equal_ranks=True)


def non_lora_keys(state: AdapterState) -> list[str]:
    """Keys of the tensors that are not LoRA factors (the task head), in the state's order."""
    lora = {k for pair in lora_pairs(state).values() for k in pair}
    return [k for k in state if k not in lora]


def normalized(weights: list[float]) -> list[float]:
    total = float(sum(weights))
    return [w / total for w in weights]


def revive(state: AdapterState, template: AdapterState | None) -> AdapterState:
    """Restart LoRA components that carry nothing (B column exactly zero) from ``template``.

    Such a component adds nothing to ΔW, so the client's update is unchanged; giving it the
    template's A row (B stays zero) makes it trainable again, as at LoRA initialization.
    """
    if template is None:
        return state
    out = dict(state)
    for a_key, b_key in lora_pairs(state).values():
        dead = (state[b_key] == 0).all(dim=0)  # one flag per component
        if bool(dead.any()):
            a = state[a_key].clone()
            a[dead] = template[a_key][dead].to(a.dtype)
            out[a_key] = a
    return out


def truncate(state: AdapterState, rank: int, b_factor: float, a_factor: float) -> AdapterState:
    """The first ``rank`` components of every LoRA module, B times ``b_factor``, A times ``a_factor``.

    Rules use the factors to move a component from the global's scale alpha/R to the client's
    alpha/rank without changing its ΔW.
    """
    out = dict(state)
    for a_key, b_key in lora_pairs(state).values():
        out[a_key] = (state[a_key][:rank] * a_factor).contiguous()
        out[b_key] = (state[b_key][:, :rank] * b_factor).contiguous()
    return out


def pad_rank(t: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    """Zero-pad ``t`` along ``dim`` to size ``rank`` (a no-op, the same tensor, when it already fits)."""
    missing = rank - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t, t.new_zeros(shape)], dim=dim)
