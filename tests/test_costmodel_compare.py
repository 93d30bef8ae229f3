"""Cost formulas on hand-computed toy cases, and `colora compare` on a tiny sweep."""

from __future__ import annotations

import csv
import json
import shutil
import statistics

import pytest
import yaml

from colora.cli import main
from colora.compare import load_sweep
from colora.config import ColoraError, DeviceProfile
from colora.costmodel import (
    adapter_sync_time,
    central_round_time,
    declora_round_time,
    download_time,
    fedavg_round_time,
    sequential_split_time,
    split_step_time,
    upload_time,
)

from .conftest import tiny_raw


def test_fedavg_round_waits_for_the_slowest_client():
    fast = DeviceProfile(flops=1e9, up_mbps=8, down_mbps=80, latency_s=0.1, memory_gb=1)
    slow = DeviceProfile(flops=1e8, up_mbps=8, down_mbps=80, latency_s=0.1, memory_gb=1)
    server = DeviceProfile(flops=1e10, up_mbps=1000, down_mbps=1000, latency_s=0.0, memory_gb=10)
    # 1 MB up at 8 Mbit/s = 1 s; 1 MB down at 80 Mbit/s = 0.1 s; latency 0.1 s per message
    assert upload_time(1_000_000, fast) == pytest.approx(1.1)
    assert download_time(1_000_000, fast) == pytest.approx(0.2)
    t = fedavg_round_time([2e9, 2e8], [1_000_000] * 2, [1_000_000] * 2, [fast, slow], server, aggregated_params=5e8)
    # fast: 0.2 + 2 + 1.1 = 3.3; slow: 0.2 + 2 + 1.1 = 3.3; aggregation 1e9 / 1e10 = 0.1
    assert t == pytest.approx(3.4)
    t = fedavg_round_time([2e9, 4e8], [1_000_000] * 2, [1_000_000] * 2, [fast, slow], server, aggregated_params=0)
    assert t == pytest.approx(0.2 + 4.0 + 1.1)
    assert central_round_time(3e10, server) == pytest.approx(3.0)


FAST = DeviceProfile(flops=1e9, up_mbps=8, down_mbps=80, latency_s=0.1, memory_gb=1)
SLOW = DeviceProfile(flops=1e8, up_mbps=8, down_mbps=80, latency_s=0.1, memory_gb=1)
SERVER = DeviceProfile(flops=1e10, up_mbps=1000, down_mbps=1000, latency_s=0.0, memory_gb=10)


def test_split_step_runs_clients_in_parallel_and_shares_the_server():
    # client 0: 1e9 / 1e9 = 1 s compute, 1 MB up = 0.1 + 1 s, 1 MB down = 0.1 + 0.1 s -> 2.3 s
    # client 1: 5e8 / 1e9 = 0.5 s, same transfers -> 1.8 s; server: (2e10 + 2e10) / 1e10 = 4 s
    args = ([1e9, 5e8], [1_000_000] * 2, [1_000_000] * 2, [2e10, 2e10], [FAST, FAST], SERVER)
    assert split_step_time(*args) == pytest.approx(2.3 + 4.0)
    # U-shaped: two messages each way, one latency each: up 0.2 + 1, down 0.2 + 0.1 -> 2.5 s
    assert split_step_time(*args, messages=2) == pytest.approx(2.5 + 4.0)
    # sl: the same work one client after the other
    assert sequential_split_time(*args) == pytest.approx(2.3 + 1.8 + 4.0)


def test_adapter_sync_and_declora_rounds():
    # up in parallel (1.1 s each), 2 * 5e8 / 1e10 = 0.1 s averaging, one download of 0.2 s (0 bytes: skipped)
    assert adapter_sync_time([1_000_000] * 2, [1_000_000, 0], [FAST, SLOW], SERVER, 5e8) == pytest.approx(1.4)
    assert adapter_sync_time([], [1_000_000], [FAST], SERVER, 0) == pytest.approx(0.2)
    # node 0: 1 s compute + two 1 MB messages (1.1 s each) = 3.2 s; node 1: 1 s + 1.1 s; no server
    assert declora_round_time([1e9, 1e8], [[1_000_000] * 2, [1_000_000]], [FAST, SLOW]) == pytest.approx(3.2)
    assert declora_round_time([1e9, 1e9], [[1_000_000], [1_000_000]], [FAST, SLOW]) == pytest.approx(10 + 1.1)


def _sweep(tmp_path, runs, extra=None):
    raw, _ = tiny_raw()
    raw["rounds"] = 2
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(raw))
    sweep = {"base": "base.yaml", "set": {"clients.num": 2, "clients.per_round": 2}, "runs": runs, **(extra or {})}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def test_sweep_expands_runs_times_grid_and_validates_all_first(tmp_path):
    path = _sweep(tmp_path, [{"algorithm": "central"}, {"algorithm": "fedavg"}], {"grid": {"train.lr": [0.01, 0.02]}})
    runs = load_sweep(path)
    assert [(c.algorithm, c.train.lr, c.clients.num) for _, c in runs] == [
        ("central", 0.01, 2), ("central", 0.02, 2), ("fedavg", 0.01, 2), ("fedavg", 0.02, 2)]
    assert len({c.seed for _, c in runs}) == 1
    bad = _sweep(tmp_path, [{"algorithm": "central"}, {"train.lrr": 1}])
    with pytest.raises(ColoraError, match="sweep run 1 .*unknown config key 'train.lrr'"):
        load_sweep(bad)


def test_compare_runs_and_reports(tmp_path, capsys):
    path = _sweep(tmp_path, [{"algorithm": "central"}, {"algorithm": "fedavg"}])
    out = tmp_path / "cmp"
    assert main(["compare", str(path), "--out", str(out), "--target", "eval/accuracy=0.0"]) == 0
    printed = capsys.readouterr().out
    assert "0-central" in printed and "1-fedavg" in printed
    with open(out / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["algorithm"] for r in rows] == ["central", "fedavg"]
    assert all(r["target_round"] == "0" for r in rows)  # accuracy >= 0 holds before training
    html = (out / "index.html").read_text()
    assert "metric_vs_time.png" in html and (out / "metric_vs_bytes.png").stat().st_size > 0
    # a second call keeps finished runs instead of redoing them
    assert main(["compare", str(path), "--out", str(out)]) == 0
    assert "already complete" in capsys.readouterr().out
    # a run that died before its first checkpoint starts again
    shutil.rmtree(out / "1-fedavg" / "checkpoint")
    (out / "1-fedavg" / "summary.json").unlink()
    assert main(["compare", str(path), "--out", str(out)]) == 0
    assert (out / "1-fedavg" / "summary.json").is_file()
    # ...but never a finished run of another config under the same name
    changed = _sweep(tmp_path, [{"algorithm": "central"}, {"algorithm": "fedavg"}],
                     {"set": {"clients.num": 2, "clients.per_round": 2, "train.lr": 0.5}})  # same names
    assert main(["compare", str(changed), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "0-central holds a run of another config" in err and len(err.splitlines()) == 1


def test_compare_jobs_runs_in_parallel_processes_with_the_same_results(tmp_path, capsys):
    path = _sweep(tmp_path, [{"algorithm": "central"}, {"algorithm": "fedavg"}])
    assert main(["compare", str(path), "--out", str(tmp_path / "seq")]) == 0
    assert main(["compare", str(path), "--out", str(tmp_path / "par"), "--jobs", "2"]) == 0
    assert "(log: " in capsys.readouterr().out
    for name in ("0-central", "1-fedavg"):
        seq = (tmp_path / "seq" / name / "metrics.jsonl").read_text().splitlines()
        par = (tmp_path / "par" / name / "metrics.jsonl").read_text().splitlines()
        for a, b in zip(map(json.loads, seq), map(json.loads, par), strict=True):
            numbers = [k for k, v in a.items() if isinstance(v, float) and k != "wall_time_s"]
            assert a.keys() == b.keys() and a["round"] == b["round"] and numbers
            assert [b[k] for k in numbers] == pytest.approx([a[k] for k in numbers], rel=1e-5, abs=1e-6)
    bad = _sweep(tmp_path, [{"algorithm": "central"}, {"data.name": "glue/mrpc", "data.path": str(tmp_path)}])  # no train.tsv there
    assert main(["compare", str(bad), "--out", str(tmp_path / "bad"), "--jobs", "2"]) == 2
    err = capsys.readouterr().err  # refused while validating: nothing ran
    assert "sweep run 1 (" in err and "train.tsv: no such file" in err and not (tmp_path / "bad" / "0-central").exists()


def test_a_seeds_list_runs_every_setting_per_seed_and_reports_mean_and_std(tmp_path, capsys):
    path = _sweep(tmp_path, [{"algorithm": "central"}, {"algorithm": "fedavg"}], {"seeds": [0, 1, 2]})
    runs = load_sweep(path)
    assert [(c.algorithm, c.seed) for _, c in runs] == [(a, s) for a in ("central", "fedavg") for s in (0, 1, 2)]
    assert [name for name, _ in runs][:2] == ["central-seed=0", "central-seed=1"]
    out = tmp_path / "cmp"
    assert main(["compare", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "over seeds" in printed and "±" in printed
    with open(out / "summary.csv") as fh:
        finals = {(r["algorithm"], r["seed"]): float(r["final"]) for r in csv.DictReader(fh)}
    with open(out / "seeds.csv") as fh:
        groups = list(csv.DictReader(fh))
    assert [(g["seeds"], g["n"]) for g in groups] == [("0 1 2", "3"), ("0 1 2", "3")]
    for g, algorithm in zip(groups, ("central", "fedavg")):
        values = [finals[(algorithm, str(s))] for s in (0, 1, 2)]
        assert float(g["final_mean"]) == pytest.approx(statistics.fmean(values))
        assert float(g["final_std"]) == pytest.approx(statistics.stdev(values))
        assert g["setting"].endswith(algorithm)
    for bad in ([], [0, 0], [-1], ["a"]):
        with pytest.raises(ColoraError, match="'seeds' must be a non-empty list of distinct integers"):
            load_sweep(_sweep(tmp_path, [{"algorithm": "central"}], {"seeds": bad}))
