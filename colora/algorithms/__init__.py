"""Algorithms, one file each, registered by their ``algorithm`` config name."""

from __future__ import annotations

from ..config import ColoraError
from .base import Algorithm, Context, sample_clients
from .central import Central
from .declora import DecLoRA
from .fedavg import FedAvg
from .sl import SL
from .splitlora import SplitLoRA

ALGORITHMS: dict[str, type[Algorithm]] = {cls.name: cls for cls in (Central, FedAvg, SL, SplitLoRA, DecLoRA)}


def get_algorithm(name: str) -> type[Algorithm]:
    """The algorithm class registered under ``name``."""
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ColoraError(f"algorithm={name!r} is not available yet (available: {', '.join(ALGORITHMS)})") from None


__all__ = ["ALGORITHMS", "Algorithm", "Context", "get_algorithm", "sample_clients"]
