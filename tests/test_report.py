"""Tests for colora.report: run loading, metric helpers, and the written report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from colora.report import (
    HISTOGRAM_FILE,
    PLOT_FILES,
    ReportError,
    Run,
    higher_is_better,
    load_run,
    main_metric,
    parse_target,
    time_to_target,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ESCAPED_LABEL = "Split &lt;LoRA&gt; &amp; co"


def make_run(root: Path, dirname: str, rows: list[dict], *, summary: dict | None = None,
             config: dict | None = None, partition: dict | None = None) -> Path:
    """Write a fake run directory the way `colora run` lays it out."""
    run_dir = root / dirname
    run_dir.mkdir(parents=True)
    cfg = {"algorithm": "fedavg", "seed": 0, "model": {"name": "tiny-bert"},
           "data": {"name": "glue/mrpc"}, "clients": {"num": 3, "partition": "dirichlet"},
           "federation": {"aggregator": "fedit"}}
    cfg.update(config or {})
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary))
    if partition is not None:
        (run_dir / "partition.json").write_text(json.dumps(partition))
    return run_dir


def row(rnd, acc=None, loss=None, train=None, up=0, down=0, sim=0.0, wall=0.0, **extra):
    out = {"round": rnd, "sim_time_s": sim, "bytes_up": up, "bytes_down": down,
           "train_loss": train, "wall_time_s": wall}
    if loss is not None:
        out["eval/loss"] = loss
    if acc is not None:
        out["eval/accuracy"] = acc
    out.update(extra)
    return out


# Run A: summary carries main_metric, final and best; has a partition.
ROWS_A = [
    row(0, acc=0.50, loss=0.90, up=0, down=0, sim=0.0, wall=0.1, **{"eval/f1": 0.40}),
    row(1, acc=0.62, loss=0.70, train=0.80, up=400_000, down=600_000, sim=10.0, wall=1.0,
        **{"eval/f1": 0.55}),
    row(2, acc=0.71, loss=0.55, train=0.60, up=800_000, down=1_200_000, sim=20.0, wall=2.0,
        **{"eval/f1": 0.66}),
    row(3, acc=0.69, loss=0.60, train=0.50, up=1_200_000, down=1_800_000, sim=30.0, wall=3.0,
        **{"eval/f1": 0.65}),
]
SUMMARY_A = {"algorithm": "fedavg", "rounds": 3, "main_metric": "eval/accuracy",
             "final": {"eval/accuracy": 0.69, "eval/loss": 0.60},
             "best": {"eval/accuracy": 0.71, "eval/loss": 0.55},
             "bytes_up": 1_200_000, "bytes_down": 1_800_000, "sim_time_s": 30.0,
             "wall_time_s": 3.0, "peak_rss_mb": 512.5}
PARTITION_A = {"label_names": ["neg", "pos"], "sizes": [30, 20, 10],
               "histogram": [[20, 10], [5, 15], [10, 0]]}

# Run B: no final/best in the summary (computed from metrics), a name needing HTML escaping,
# and a much larger byte volume so the bytes axis range is wide.
ROWS_B = [
    row(0, acc=0.50, loss=0.95, up=0, down=0, sim=0.0, wall=0.2),
    row(1, acc=0.78, loss=0.50, train=0.70, up=2e8, down=3e8, sim=400.0, wall=5.0),
    row(2, acc=0.75, loss=0.52, train=0.40, up=4e8, down=6e8, sim=800.0, wall=9.0),
]
SUMMARY_B = {"algorithm": "splitlora", "rounds": 2, "bytes_up": 4e8, "bytes_down": 6e8,
             "sim_time_s": 800.0, "wall_time_s": 9.0}

# Run C: a single metrics row and no summary, partition or f1.
ROWS_C = [row(0, acc=0.50, loss=0.69)]


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    make_run(root, "fedavg-run", ROWS_A, summary=SUMMARY_A, partition=PARTITION_A)
    make_run(root, "split-run", ROWS_B, summary=SUMMARY_B,
             config={"name": "Split <LoRA> & co", "algorithm": "splitlora"})
    make_run(root, "single", ROWS_C)
    return root


@pytest.fixture(scope="module")
def report(runs_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    dirs = [runs_root / "fedavg-run", runs_root / "split-run", runs_root / "single"]
    html_path = write_report(dirs, out / "nested" / "rep", target=("eval/accuracy", 0.7))
    return html_path


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_report_writes_valid_pngs(report):
    assert report.name == "index.html" and report.is_file()
    for name in (*PLOT_FILES, HISTOGRAM_FILE):
        data = (report.parent / name).read_bytes()
        assert len(data) > 1000, name
        assert data.startswith(PNG_MAGIC), name


def test_index_html_references_pngs_and_labels(report):
    page = report.read_text(encoding="utf-8")
    for name in (*PLOT_FILES, HISTOGRAM_FILE):
        assert f'src="{name}"' in page
    assert "fedavg-run" in page and "single" in page
    assert ESCAPED_LABEL in page
    assert "<LoRA>" not in page
    assert "Time to target" in page and "not reached" in page
    # Self-contained: no scripts and nothing fetched from the network.
    assert "<script" not in page and "http://" not in page and "https://" not in page


def test_summary_csv_rows(report):
    rows = read_csv(report.parent / "summary.csv")
    assert [r["label"] for r in rows] == ["fedavg-run", "Split <LoRA> & co", "single"]
    a, b, c = rows
    assert a["main_metric"] == b["main_metric"] == "eval/accuracy"
    assert float(a["final"]) == pytest.approx(0.69) and float(a["best"]) == pytest.approx(0.71)
    assert float(b["final"]) == pytest.approx(0.75) and float(b["best"]) == pytest.approx(0.78)
    assert float(c["final"]) == pytest.approx(0.50) and float(c["best"]) == pytest.approx(0.50)
    assert a["algorithm"] == "fedavg" and b["algorithm"] == "splitlora"
    assert int(a["rounds"]) == 3 and int(c["rounds"]) == 0
    assert float(a["bytes_up"]) == 1_200_000 and float(a["peak_rss_mb"]) == 512.5
    assert b["peak_rss_mb"] == ""
    assert a["target"] == "eval/accuracy >= 0.7"
    assert int(a["target_round"]) == 2 and float(a["target_bytes"]) == 2_000_000
    assert int(b["target_round"]) == 1 and float(b["target_sim_time_s"]) == 400.0
    assert c["target_round"] == "" and c["target_bytes"] == ""


def test_report_without_partition_or_target(runs_root, tmp_path):
    out = tmp_path / "rep"
    out.mkdir()
    # A stale histogram from an earlier report into this folder must not survive.
    (out / HISTOGRAM_FILE).write_bytes(PNG_MAGIC)
    html_path = write_report([runs_root / "single"], out)
    page = html_path.read_text(encoding="utf-8")
    assert not (out / HISTOGRAM_FILE).exists() and HISTOGRAM_FILE not in page
    assert "Time to target" not in page
    for name in PLOT_FILES:
        assert (out / name).read_bytes().startswith(PNG_MAGIC)
        assert f'src="{name}"' in page
    rows = read_csv(out / "summary.csv")
    assert len(rows) == 1 and "target_round" not in rows[0]


def test_time_to_target_first_crossing(runs_root):
    run = load_run(runs_root / "fedavg-run")
    assert time_to_target(run, "eval/accuracy", 0.7) == {
        "round": 2, "sim_time_s": 20.0, "bytes": 2_000_000, "wall_time_s": 2.0}
    # Reached exactly counts as reached.
    assert time_to_target(run, "eval/accuracy", 0.62)["round"] == 1
    assert time_to_target(run, "eval/accuracy", 0.99) == {
        "round": None, "sim_time_s": None, "bytes": None, "wall_time_s": None}
    # Loss is lower-is-better: round 0 (0.90) is above 0.6, round 2 (0.55) is the first <= 0.6.
    assert time_to_target(run, "eval/loss", 0.6)["round"] == 2
    assert time_to_target(run, "eval/loss", 0.1)["round"] is None
    # train_loss is null at round 0 and must be skipped, not compared.
    assert time_to_target(run, "train_loss", 0.85)["round"] == 1
    assert time_to_target(run, "eval/missing", 0.0)["round"] is None


def test_load_run_errors(tmp_path):
    missing = tmp_path / "does-not-exist"
    with pytest.raises(ReportError, match="does-not-exist") as info:
        load_run(missing)
    assert isinstance(info.value, ValueError) and str(missing) in str(info.value)
    assert "\n" not in str(info.value)

    no_metrics = tmp_path / "no-metrics"
    no_metrics.mkdir()
    with pytest.raises(ReportError, match="metrics.jsonl"):
        load_run(no_metrics)

    (no_metrics / "metrics.jsonl").write_text("\n")
    with pytest.raises(ReportError, match="no evaluation rows"):
        load_run(no_metrics)

    (no_metrics / "metrics.jsonl").write_text('{"round": 0}\nnot json\n{"round": 2}\n')
    with pytest.raises(ReportError, match=r"metrics.jsonl:2"):
        load_run(no_metrics)

    with pytest.raises(ReportError, match="no run directories"):
        write_report([], tmp_path / "out")


def test_load_run_fields(runs_root, tmp_path):
    run = load_run(runs_root / "fedavg-run")
    assert isinstance(run, Run)
    assert run.label == "fedavg-run" and run.dir == runs_root / "fedavg-run"
    assert run.config["algorithm"] == "fedavg" and len(run.metrics) == 4
    assert run.summary["rounds"] == 3 and run.partition == PARTITION_A
    named = load_run(str(runs_root / "split-run"))
    assert named.label == "Split <LoRA> & co" and named.partition is None
    bare = load_run(runs_root / "single")
    assert bare.summary == {} and bare.label == "single"

    # An interrupted write leaves a truncated last line; the complete rows still load.
    partial = make_run(tmp_path, "partial", ROWS_A[:2])
    with (partial / "metrics.jsonl").open("a") as fh:
        fh.write('{"round": 2, "eval/acc')
    assert [r["round"] for r in load_run(partial).metrics] == [0, 1]


def test_main_metric(runs_root, tmp_path):
    a, b, c = (load_run(runs_root / d) for d in ("fedavg-run", "split-run", "single"))
    assert main_metric([a, b]) == "eval/accuracy"
    assert main_metric([c, a]) == "eval/accuracy"
    assert main_metric(c) == "eval/accuracy"

    ppl = load_run(make_run(tmp_path, "lm", [
        {"round": 0, "eval/loss": 3.0, "eval/perplexity": 20.1},
        {"round": 1, "train_loss": 2.5, "eval/loss": 2.0, "eval/perplexity": 7.39}]))
    assert main_metric([ppl]) == "eval/perplexity"
    assert not higher_is_better("eval/perplexity") and not higher_is_better("eval/loss")
    assert higher_is_better("eval/accuracy") and higher_is_better("eval/mcc")
    assert time_to_target(ppl, "eval/perplexity", 10.0)["round"] == 1

    loss_only = load_run(make_run(tmp_path, "loss-only", [{"round": 0, "eval/loss": 1.0}]))
    assert main_metric([loss_only]) == "eval/loss"


def test_duplicate_labels_are_disambiguated(tmp_path):
    first = make_run(tmp_path / "a", "run", ROWS_C)
    second = make_run(tmp_path / "b", "run", ROWS_C)
    html_path = write_report([first, second], tmp_path / "out")
    rows = read_csv(html_path.parent / "summary.csv")
    assert [r["label"] for r in rows] == ["run", "run (2)"]


def test_parse_target():
    assert parse_target("eval/accuracy=0.8") == ("eval/accuracy", 0.8)
    assert parse_target("accuracy=0.8") == ("eval/accuracy", 0.8)
    assert parse_target("train_loss=0.5") == ("train_loss", 0.5)
    for bad in ("eval/accuracy", "=0.5", "eval/accuracy=high"):
        with pytest.raises(ReportError, match="METRIC=VALUE"):
            parse_target(bad)
