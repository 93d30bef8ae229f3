"""Per-client LoRA ranks: an explicit list, or a rule (``federation.rank_rule``).

- ``federation.ranks``: one rank per client, as given.
- ``uniform``: every client at ``model.lora.r``.
- ``data_size`` (HLoRA; implied by ``federation.aggregator: hlora``): clients with more data get
  higher ranks. Clients are ordered by data size and cut into ``len(rank_set)`` equal quantile
  groups (tertiles for three ranks), the smallest group getting the smallest rank. A client's
  position is its mid-rank, so clients of equal size always share a rank (all equal: the middle
  rank of the set).
- ``resource``: from each client's own device profile (profiles differ across clients through
  ``system.heterogeneity``, e.g. ``fields: [memory_gb, flops]``). Compute tiers: clients are ordered
  by FLOP/s and cut into quantile groups as for ``data_size`` (the slowest group gets the smallest
  rank; all equally fast: the largest rank). Memory cap: no client gets a rank whose training
  memory (``colora.system.training_memory``: base weights, adapter state, activations) exceeds its
  ``memory_gb``. A client gets the smaller of the two.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .config import ColoraError, DeviceProfile, FederationConfig


def data_size_ranks(sizes: list[int], rank_set: list[int]) -> list[int]:
    """HLoRA's rule: the client at size quantile q gets sorted(rank_set)[floor(q * len(rank_set))]."""
    ranks = sorted(set(rank_set))
    sizes_arr = np.asarray(sizes)
    n = len(sizes_arr)
    below = np.array([(sizes_arr < s).sum() for s in sizes_arr])
    equal = np.array([(sizes_arr == s).sum() for s in sizes_arr])
    # mid-rank quantile q = (below + (equal - 1) / 2) / n in [0, 1), group floor(q * m) in integers
    groups = (len(ranks) * (2 * below + equal - 1)) // (2 * n)
    return [ranks[int(g)] for g in groups]


def resource_ranks(profiles: list[DeviceProfile], rank_set: list[int], need_at: Callable[[int], float]) -> list[int]:
    """Each client's FLOP/s tier rank (quantile groups, as ``data_size_ranks``), capped by the largest
    rank of ``rank_set`` whose training memory ``need_at(rank)`` (bytes) fits its ``memory_gb``."""
    flops = [prof.flops for prof in profiles]
    # equally fast clients (no compute heterogeneity) are limited by memory alone
    tiers = data_size_ranks(flops, rank_set) if len(set(flops)) > 1 else [max(rank_set)] * len(profiles)
    out = []
    for k, (prof, tier) in enumerate(zip(profiles, tiers)):
        fits = [r for r in sorted(set(rank_set)) if need_at(r) <= prof.memory_gb * 1e9]
        if not fits:
            need = need_at(min(rank_set)) / 1e9
            raise ColoraError(f"system.client.memory_gb={prof.memory_gb}: client {k} cannot train even rank "
                              f"{min(rank_set)} (needs ~{need:.3g} GB); lower federation.rank_set or use a smaller model")
        out.append(min(fits[-1], tier))
    return out


def rank_rule_name(fed: FederationConfig) -> str:
    """How the ranks are chosen, for the log and partition.json."""
    if fed.ranks is not None:
        return "explicit"
    return "data_size" if fed.aggregator == "hlora" else fed.rank_rule


def assign_ranks(fed: FederationConfig, default_rank: int, sizes: list[int], profiles: list[DeviceProfile],
                 need_at: Callable[[int], float]) -> list[int]:
    """One LoRA rank per client (``sizes``: local data set sizes; ``profiles``: device profiles;
    ``need_at(rank)``: training memory in bytes at that rank, for the resource rule)."""
    rule = rank_rule_name(fed)
    if rule == "explicit":
        return list(fed.ranks)
    if rule == "data_size":
        return data_size_ranks(sizes, fed.rank_set)
    if rule == "resource":
        return resource_ranks(profiles, fed.rank_set, need_at)
    return [default_rank] * len(sizes)
