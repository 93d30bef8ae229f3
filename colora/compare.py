"""``colora compare SWEEP.yaml``: run a list/grid of configs with shared seeds, then report.

Sweep format (CONTRACT.md)::

    base: mrpc.yaml                 # a run config; relative to the sweep file
    set: {clients.num: 10}          # dotted overrides for every run
    runs:                           # one run per entry, on top of base + set
      - {algorithm: central}
      - {algorithm: fedavg}
    grid: {train.lr: [1.0e-4, 5.0e-4]}   # optional: every combination, crossed with runs

Every config is built and validated before the first run starts, so a typo in the last entry
costs nothing.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from .config import ColoraError, Config, build_config, dump_config

SWEEP_KEYS = {"base", "set", "runs", "grid"}


def _short_name(over: dict) -> str:
    if not over:
        return "base"
    parts = [str(v) if k == "algorithm" else f"{k.split('.')[-1]}={v}" for k, v in over.items()]
    return "-".join(parts).replace("/", "_").replace(" ", "")[:60]


def load_sweep(path: str | Path) -> list[tuple[str, Config]]:
    """The (short name, validated config) of every run the sweep file describes, in order."""
    path = Path(path)
    if not path.is_file():
        raise ColoraError(f"sweep file '{path}' does not exist")
    sweep = yaml.safe_load(path.read_text()) or {}
    unknown = set(sweep) - SWEEP_KEYS
    if unknown:
        raise ColoraError(f"sweep file '{path}': unknown key '{sorted(unknown)[0]}' (expected base, set, runs, grid)")
    if "base" not in sweep:
        raise ColoraError(f"sweep file '{path}' needs a 'base' config")
    base_path = (path.parent / sweep["base"]).resolve()
    if not base_path.is_file():
        raise ColoraError(f"sweep file '{path}': base config '{sweep['base']}' does not exist")
    base = yaml.safe_load(base_path.read_text()) or {}
    grid = sweep.get("grid") or {}
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] if grid else [{}]
    out = []
    for run in sweep.get("runs") or [{}]:
        for combo in combos:
            over = {**(sweep.get("set") or {}), **run, **combo}
            try:
                cfg = build_config(base, over)
            except ColoraError as exc:
                raise ColoraError(f"sweep run {len(out)} ({_short_name({**run, **combo})}): {exc}") from None
            name = _short_name({**run, **combo})
            cfg.name = f"{base.get('name') or base_path.stem}-{name}"
            out.append((name, cfg))
    return out


def format_table(rows: list[dict]) -> str:
    """A plain-text results table: one line per run."""
    cols = list(rows[0])
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    line = lambda vals: "  ".join(str(v).ljust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(cols), line("-" * w for w in widths)] + [line(r[c] for c in cols) for r in rows])


def run_sweep(runs: list[tuple[str, Config]], out: Path, jobs: int = 1) -> list[Path]:
    """Run every config of a sweep into ``out/<index>-<name>/``; returns the run directories.

    A run whose directory already holds summary.json is kept; one with a checkpoint is resumed; one
    that stopped before its first checkpoint starts again; a directory holding a run of a different
    config, or no run at all, is an error (before anything runs).
    ``jobs > 1`` runs that many at once, each a ``colora run`` process with cpu_count // jobs
    threads and its log in ``out/<index>-<name>.log`` (results equal a sequential sweep: every run
    is seeded by its own config). A failed run stops nothing else; the error names its log.
    """
    dirs = [out / f"{i}-{name}" for i, (name, _) in enumerate(runs)]
    for (name, cfg), run_dir in zip(runs, dirs):  # validate every directory before touching any
        saved = run_dir / "config.yaml"
        if saved.is_file() and yaml.safe_load(saved.read_text()) != cfg.model_dump(mode="json"):
            raise ColoraError(f"{run_dir} holds a run of another config (its config.yaml differs from sweep run "
                              f"'{name}'); use a new --out or remove that directory")
        if not saved.is_file() and run_dir.is_dir() and any(run_dir.iterdir()):
            raise ColoraError(f"{run_dir} exists and holds no colora run; use a new --out or remove that directory")
    todo = []
    for i, ((name, cfg), run_dir) in enumerate(zip(runs, dirs)):
        if (run_dir / "summary.json").is_file():
            print(f"[{i + 1}/{len(runs)}] {name}: already complete, kept")
            continue
        if (run_dir / "config.yaml").is_file() and not (run_dir / "checkpoint").is_dir():
            shutil.rmtree(run_dir)  # this run stopped before its first checkpointed round: nothing to keep
        todo.append((i, name, cfg, run_dir))
    if jobs <= 1:
        from .engines import run_experiment

        for i, name, cfg, run_dir in todo:
            print(f"[{i + 1}/{len(runs)}] {name}")
            resume = (run_dir / "checkpoint").is_dir()
            run_experiment(cfg, resume=run_dir if resume else None, out=None if resume else str(run_dir))
        return dirs
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs))}
    pending, running, failed = list(todo), {}, []
    while pending or running:
        while pending and len(running) < jobs:
            i, name, cfg, run_dir = pending.pop(0)
            if (run_dir / "checkpoint").is_dir():
                argv = ["run", "--resume", str(run_dir)]
            else:
                cfg_file = out / f"{i}-{name}.yaml"
                cfg_file.write_text(dump_config(cfg))
                argv = ["run", str(cfg_file), "--out", str(run_dir)]
            log = out / f"{i}-{name}.log"
            print(f"[{i + 1}/{len(runs)}] {name} (log: {log})")
            with open(log, "w") as fh:
                proc = subprocess.Popen([sys.executable, "-m", "colora", *argv], stdout=fh, stderr=subprocess.STDOUT, env=env)
            running[proc] = (i, name, log)
        time.sleep(0.2)
        for proc in [p for p in running if p.poll() is not None]:
            i, name, log = running.pop(proc)
            if proc.returncode != 0:
                failed.append(f"run {i} ({name}) exited with {proc.returncode}; see {log}")
    if failed:
        raise ColoraError(f"{len(failed)} sweep run(s) failed, the others are kept: {failed[0]}")
    return dirs
