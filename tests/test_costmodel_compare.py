"""Cost formulas on hand-computed toy cases, and `colora compare` on a tiny sweep."""

from __future__ import annotations

import csv

import pytest
import yaml

from colora.cli import main
from colora.compare import load_sweep
from colora.config import ColoraError, DeviceProfile
from colora.costmodel import central_round_time, download_time, fedavg_round_time, upload_time

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
