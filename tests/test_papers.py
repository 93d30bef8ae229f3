"""``examples/papers/`` (each seed paper's setup) and ``examples/glue/`` (the every-seed recipe): each
config runs one round with its model swapped for a tiny one (and its data for small files in the
same layout), so the configs cannot rot."""

from __future__ import annotations

from pathlib import Path

import pytest

from colora.config import load_config
from colora.experiment import run_experiment

from .conftest import read_rows, write_e2e, write_glue

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CONFIGS = sorted(EXAMPLES.glob("papers/*.yaml")) + sorted(EXAMPLES.glob("glue/*.yaml"))
WORDS = ("the film is", "a plot that", "every scene", "the cast", "its music", "the ending", "this story", "the director")
MOODS = (("a delight", 1), ("dull and slow", 0), ("warm and funny", 1), ("a mess", 0), ("moving", 1), ("tedious", 0))


def _sst2_rows(n: int) -> list[tuple]:
    return [(label, f"{WORDS[i % len(WORDS)]} {mood} {i}") for i in range(n) for mood, label in [MOODS[i % len(MOODS)]]]


def _mrpc_rows(n: int) -> list[tuple]:
    rows = []
    for i in range(n):
        a = f"{WORDS[i % len(WORDS)]} {MOODS[i % len(MOODS)][0]} number {i}"
        b = a.replace("number", "no.") if i % 3 else f"{WORDS[(i + 3) % len(WORDS)]} something else {i}"
        rows.append((int(i % 3 != 0), a, b))
    return rows


def _stsb_rows(n: int) -> list[tuple]:
    return [(f"{(i * 7) % 26 / 5:.1f}", a, b) for i, (_, a, b) in enumerate(_mrpc_rows(n))]


def _data(tmp_path: Path, name: str) -> Path:
    if name == "e2e":
        return write_e2e(tmp_path / "e2e")
    folder, rows = {"glue/mrpc": ("MRPC", _mrpc_rows), "glue/sst2": ("SST-2", _sst2_rows), "glue/cola": ("CoLA", _sst2_rows),
                    "glue/stsb": ("STS-B", _stsb_rows)}[name]
    return write_glue(tmp_path / "glue", folder, train=rows(240), dev=rows(24))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_each_config_runs_a_round_with_a_tiny_model(tmp_path, path):
    cfg = load_config(path, [])
    tiny = "tiny-gpt2" if cfg.model.task == "causal-lm" else "tiny-bert"
    sets = [f"model.name={tiny}", f"data.path={_data(tmp_path, cfg.data.name)}", "rounds=1", "train.local_steps=2",
            "eval.every=1"]
    if cfg.eval.generate:
        sets.append("eval.generate=2")
    run = run_experiment(load_config(path, sets), str(tmp_path / "run"))
    rows = read_rows(run)
    assert [r["round"] for r in rows] == [0, 1]
    assert (rows[-1]["bytes_up"] > 0) == (cfg.algorithm != "central")  # central: nothing travels
    assert all(v == v for v in rows[-1].values() if isinstance(v, float)) and rows[-1]["train_loss"] > 0
