"""``engine.device``: where the model computes. This machine has no GPU: these tests pin the CPU path
and the refusals; the CUDA path runs where a GPU is at hand (see the README's engine section)."""

from __future__ import annotations

import torch
import yaml

from colora.cli import main
from colora.config import build_config
from colora.experiment import run_experiment
from colora.models import resolve_device

from .conftest import read_rows, tiny_config, tiny_raw


def test_auto_is_cuda_when_visible_else_cpu():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_a_cuda_device_that_is_not_there_exits_2_before_anything_loads(tmp_path, capsys):
    raw, _ = tiny_raw()
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    missing = f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 0}"
    assert main(["run", str(cfg), "--out", str(tmp_path / "r"), "--set", f"engine.device={missing}"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"engine.device={missing}: " in err and "use engine.device=cpu or auto" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_explicit_cpu_equals_the_default_in_every_paradigm(tmp_path):
    for algo in ("fedavg", "splitlora", "declora"):
        over = dict(algorithm=algo, rounds=2, split__layer=2)
        auto = read_rows(run_experiment(tiny_config(**over), out=str(tmp_path / f"{algo}-auto")))
        cpu = read_rows(run_experiment(tiny_config(engine__device="cpu", **over), out=str(tmp_path / f"{algo}-cpu")))
        assert [r["eval/loss"] for r in auto] == [r["eval/loss"] for r in cpu]


def test_the_older_engine_form_still_loads_and_resumes(tmp_path):
    assert build_config({"engine": "inprocess"}).engine == build_config({}).engine
    part = run_experiment(tiny_config(rounds=2), out=str(tmp_path / "part"), stop_after=1)
    saved = yaml.safe_load((part / "config.yaml").read_text())
    saved["engine"] = "inprocess"  # as a run directory written before the engine section
    (part / "config.yaml").write_text(yaml.safe_dump(saved))
    assert main(["run", "--resume", str(part)]) == 0
    assert read_rows(part)[-1]["round"] == 2
