"""Robust aggregation (``federation.robust``): pure functions over the round's client states, one
per file, registered here once. Each returns the states (and weights) the run's aggregator then
combines: a subset (``krum``, ``multi_krum``), clipped updates (``norm_clip``), or one state holding
the coordinate-wise statistic of the clients' ΔW (``median``, ``trimmed_mean``). See common.py for
why they work on ΔW = (alpha/r) B A and not on the factors."""

from __future__ import annotations

from .krum import krum, multi_krum
from .median import median
from .norm_clip import norm_clip
from .trimmed_mean import trimmed_mean

# Every federation.robust name but none. Signature: rule(states, weights, alpha, rank, params, sents)
# -> (states, weights); params is the FederationConfig, sents what each client was sent.
ROBUST = {"median": median, "trimmed_mean": trimmed_mean, "krum": krum, "multi_krum": multi_krum, "norm_clip": norm_clip}

__all__ = ["ROBUST"]
