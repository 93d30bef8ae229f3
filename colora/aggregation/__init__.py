"""Aggregation rules: pure functions ``(list of adapter states, weights) -> adapter state``.

One rule per file, registered here by its ``federation.aggregator`` name. ``EXACT`` says which rules
reproduce the weighted mean of the clients' updates B_k A_k (DESIGN.md), and which only average the
factors.
"""

from __future__ import annotations

from collections.abc import Callable

from ..config import ColoraError
from ..types import AdapterState
from .fedit import fedit
from .product import product
from .server_opt import server_step

Aggregator = Callable[[list[AdapterState], list[float]], AdapterState]

AGGREGATORS: dict[str, Aggregator] = {"fedit": fedit, "product": product}
EXACT = {"fedit": False, "product": True}


def get_aggregator(name: str) -> Aggregator:
    """The rule registered under ``name``; a clear error for names not available in this build."""
    try:
        return AGGREGATORS[name]
    except KeyError:
        raise ColoraError(
            f"federation.aggregator={name!r} is not available yet (available: {', '.join(AGGREGATORS)})"
        ) from None


__all__ = ["AGGREGATORS", "EXACT", "get_aggregator", "server_step", "fedit", "product"]
