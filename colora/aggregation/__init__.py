"""Aggregation rules: pure functions over adapter states keyed by peft names, one rule per file,
registered here by their ``federation.aggregator`` name.

- Equal ranks (``AGGREGATORS``): ``(list of adapter states, weights) -> adapter state``, the one
  global adapter every client receives.
- Mixed ranks (``RANKED``): a :class:`~colora.aggregation.hetero.RankedRule`, i.e. ``aggregate`` to a
  global adapter at the largest rank plus ``for_client`` giving each client its own rank's state.
  ``hlora`` aggregates as ``svd``; its rank assignment by data size lives in ``colora.ranks``.

``EXACT`` says which rules reproduce the weighted mean of the clients' updates s_k B_k A_k (DESIGN.md;
``product`` and ``svd`` when the mean's rank fits the rank they return), and which only average factors.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from ..config import ColoraError, FederationConfig
from ..types import AdapterState
from .fedit import fedit
from .hetero import RankedRule
from .hlora import HLORA
from .product import product
from .server_opt import server_step
from .stack import STACK
from .svd import SVD
from .zero_pad import ZERO_PAD, hetlora_prune

Aggregator = Callable[[list[AdapterState], list[float]], AdapterState]

AGGREGATORS: dict[str, Aggregator] = {"fedit": fedit, "product": product}
RANKED: dict[str, RankedRule] = {"zero_pad": ZERO_PAD, "svd": SVD, "stack": STACK, "hlora": HLORA}
# Every federation.aggregator name (the config validates against this registry).
RULES: dict[str, Aggregator | RankedRule] = {**AGGREGATORS, **RANKED}
EXACT = {"fedit": False, "product": True, **{name: rule.exact for name, rule in RANKED.items()}}


def get_aggregator(name: str) -> Aggregator:
    """The equal-rank rule registered under ``name``; a clear error for names not available in this build."""
    try:
        return AGGREGATORS[name]
    except KeyError:
        raise ColoraError(
            f"federation.aggregator={name!r} is not available yet (available: {', '.join(AGGREGATORS)})"
        ) from None


def get_ranked_rule(fed: FederationConfig) -> RankedRule:
    """The mixed-rank rule ``fed.aggregator`` names, with its ``federation.hetlora_*`` options bound."""
    rule = RANKED[fed.aggregator]
    if rule is ZERO_PAD and fed.hetlora_sparsity_weighting:
        return RankedRule(rule.name, partial(rule.aggregate, sparsity_weighting=True), rule.for_client, rule.exact)
    return rule


__all__ = ["AGGREGATORS", "EXACT", "RANKED", "RULES", "RankedRule", "get_aggregator", "get_ranked_rule", "hetlora_prune",
           "server_step", "fedit", "product"]
