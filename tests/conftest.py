"""Shared fixtures: tiny configs that train in seconds on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from colora.config import build_config

# Tiny models: thread start-up costs more than it saves, and CI has 2 cores.
torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def tiny_raw(**over) -> dict:
    """A raw config for tiny-bert on a small synthetic task; ``over`` takes dotted keys."""
    raw = {
        "name": "tiny",
        "seed": 0,
        "algorithm": "fedavg",
        "rounds": 3,
        "model": {"name": "tiny-bert"},
        "data": {"name": "synthetic", "synthetic_train": 240, "synthetic_eval": 64, "max_length": 48},
        "clients": {"num": 3, "per_round": 3},
        "train": {"local_steps": 2, "batch_size": 8, "lr": 5.0e-3, "eval_batch_size": 32},
        "log": {"progress": False},
    }
    return raw, over


def tiny_config(**over):
    raw, over = tiny_raw(**over)
    return build_config(raw, {k.replace("__", "."): v for k, v in over.items()})


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def shared_data() -> Path:
    assert SHARED_DATA.is_dir(), f"the shared data folder {SHARED_DATA} is missing"
    return SHARED_DATA
