"""The equal-budget MRPC sweep shared by benchmarks/split.py and benchmarks/time_to_target.py.

``examples/time_to_target.yaml``: MiniLM-L6, 10 IID clients, 2 sampled per round, 40 rounds, the
same 1200 batches of 16 for central, fedavg, sl and splitlora (shared and per_client server).
Both scripts run it into the same ``--out`` folder, so whichever runs second reuses the runs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml

from colora.compare import load_sweep, run_sweep
from colora.config import Config

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "examples" / "time_to_target.yaml"
# The sweep's base (examples/mrpc.yaml) has data.path: null (the hub); the benchmarks pass this
# folder (their --data) explicitly: the project's machine keeps GLUE beside the repo.
DATA = ROOT.parent / "shared" / "data" / "glue" / "MRPC"


def sweep_configs(overrides: dict | None = None, sweep: Path = SWEEP) -> list[tuple[str, Config]]:
    """The sweep's (name, config) list with extra dotted ``overrides`` on every run (e.g. a smoke size)."""
    raw = yaml.safe_load(sweep.read_text())
    raw["base"] = str((sweep.parent / raw["base"]).resolve())
    raw["set"] = {**raw.get("set", {}), **(overrides or {})}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / sweep.name
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return load_sweep(path)


def run_all(runs: list[tuple[str, Config]], out: Path, jobs: int) -> list[Path]:
    """Every run's directory, in order; a failed run stops the benchmark (its tables need every run)."""
    result = run_sweep(runs, out, jobs)
    if result.failed:
        raise SystemExit(f"{len(result.failed)} sweep run(s) failed: {'; '.join(result.failed)}")
    return result.dirs


def run(out: Path, jobs: int, overrides: dict | None = None) -> list[tuple[Config, Path]]:
    """Run (or reuse) every run of the sweep under ``out``; returns (config, run directory) pairs."""
    runs = sweep_configs(overrides)
    return list(zip([cfg for _, cfg in runs], run_all(runs, out, jobs)))


def parse_sets(items: list[str]) -> dict:
    """``--set key=value`` pairs (values parsed as YAML), as colora run takes them."""
    return {k: yaml.safe_load(v) for k, _, v in (item.partition("=") for item in items)}


def add_data_argument(parser) -> None:
    """``--data DIR``: the GLUE MRPC folder every run reads (default ``DATA``)."""
    parser.add_argument("--data", default=str(DATA),
                        help=f"GLUE MRPC folder with train.tsv and dev.tsv (default: {DATA}); 'null' reads the hub")


def overrides(args) -> dict:
    """The runs' overrides: ``data.path`` from ``--data``, then the ``--set`` pairs (which win)."""
    data = None if args.data in ("null", "none", "") else args.data
    return {"data.path": data, **parse_sets(args.sets)}
