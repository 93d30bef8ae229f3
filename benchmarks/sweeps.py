"""What the seed-sweep benchmarks share (trust.py, seeds.py, peers.py): one ``colora compare`` sweep
run resumably into a folder, and the dev set's class shares (a run whose final accuracy equals one
of them predicts that class for every example)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml

from colora.compare import check_sweep, load_sweep, run_sweep
from colora.config import build_config
from colora.engines import Engine
from colora.report import Run, load_run


def run_sweep_folder(base: Path, runs: list[dict], sets: dict, seeds: list[int], folder: Path, jobs: int,
                     run: bool = True) -> list[Run | None]:
    """Every entry of ``runs`` on top of ``base`` + ``sets``, once per seed, into ``folder``; runs
    already finished there are kept (an interrupted benchmark resumes), ``jobs`` run at once.
    ``run=False`` starts nothing and gives the finished runs (None for the others), after the same
    check that their configs are this sweep's (a recorded run of an older base is refused)."""
    sweep = {"base": str(base), "set": sets, "runs": runs, "seeds": seeds}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sweep.yaml"
        path.write_text(yaml.safe_dump(sweep, sort_keys=False))
        configs = load_sweep(path)
    check_sweep(configs, folder)
    if not run:
        dirs = [folder / f"{i}-{name}" for i, (name, _) in enumerate(configs)]
        return [load_run(d) if (d / "summary.json").is_file() else None for d in dirs]
    result = run_sweep(configs, folder, jobs)
    if result.failed:
        raise SystemExit(f"{len(result.failed)} run(s) failed: {'; '.join(result.failed)}")
    return [load_run(d) for d in result.dirs]


def class_shares(base: dict, sets: dict) -> list[float]:
    """The eval split's class shares, in class order."""
    with Engine(build_config(base, sets)) as engine:
        labels = list(engine.eval_data.labels)
    return [labels.count(c) / len(labels) for c in sorted(set(labels))]


def one_class(final: float, shares: list[float]) -> bool:
    """Whether a final accuracy is exactly a class share: the run predicts one class everywhere."""
    return any(abs(final - share) < 1e-9 for share in shares)


def parse_sets(items: list[str]) -> dict:
    """``--set KEY=VALUE`` arguments as overrides (values parsed as YAML)."""
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key] = yaml.safe_load(value)
    return out
