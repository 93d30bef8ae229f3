"""``colora compare SWEEP.yaml``: run a list/grid of configs with shared seeds, then report.

Sweep format (CONTRACT.md)::

    base: mrpc.yaml                 # a run config; relative to the sweep file
    set: {clients.num: 10}          # dotted overrides for every run
    runs:                           # one run per entry, on top of base + set
      - {algorithm: central}
      - {algorithm: fedavg}
    grid: {train.lr: [1.0e-4, 5.0e-4]}   # optional: every combination, crossed with runs
    seeds: [0, 1, 2]                # optional: every run once per seed; the report adds mean ± std

Every config is built and validated before the first run starts, so a typo in the last entry
costs nothing.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from . import rundir
from .config import ColoraError, Config, build_config, dump_config, quote, read_yaml

SWEEP_KEYS = {"base", "set", "runs", "grid", "seeds"}
# Marks a folder as a sweep's output, which a later compare may write into (report, runs, logs).
SWEEP_MARKER = ".colora-sweep"


def _short_name(over: dict) -> str:
    if not over:
        return "base"
    parts = [str(v) if k == "algorithm" else f"{k.split('.')[-1]}={v}" for k, v in over.items()]
    return "-".join(parts).replace("/", "_").replace(" ", "")[:60]


def load_sweep(path: str | Path) -> list[tuple[str, Config]]:
    """The (short name, validated config) of every run the sweep file describes, in order."""
    path = Path(path)
    sweep = read_yaml(path, "sweep file")
    sweep = {} if sweep is None else sweep
    if not isinstance(sweep, dict):
        raise ColoraError(f"sweep file '{path}' must hold a mapping (base, set, runs, grid)")
    unknown = set(sweep) - SWEEP_KEYS
    if unknown:
        raise ColoraError(f"sweep file '{path}': unknown key {quote(sorted(map(str, unknown))[0])} (expected base, set, runs, grid, seeds)")
    if not isinstance(sweep.get("base"), str):
        raise ColoraError(f"sweep file '{path}' needs a 'base' config (a path to a run config)")
    shapes = {"set": (dict, "a mapping of dotted keys to values"), "grid": (dict, "a mapping of dotted keys to lists"),
              "runs": (list, "a list of mappings of dotted keys to values")}
    for key, (kind, what) in shapes.items():
        if sweep.get(key) is not None and not isinstance(sweep[key], kind):
            raise ColoraError(f"sweep file '{path}': '{key}' must be {what}")
    if not all(isinstance(r, dict) for r in sweep.get("runs") or []) or not all(
            isinstance(v, list) and v for v in (sweep.get("grid") or {}).values()):
        raise ColoraError(f"sweep file '{path}': every entry of 'runs' must be a mapping and every 'grid' value a non-empty list")
    base_path = (path.parent / sweep["base"]).resolve()
    base = read_yaml(base_path, f"sweep file '{path}': base config") or {}
    if not isinstance(base, dict):
        raise ColoraError(f"sweep file '{path}': base config '{sweep['base']}' must hold a mapping of config keys")
    grid = sweep.get("grid") or {}
    seeds = sweep.get("seeds")
    if seeds is not None and (not isinstance(seeds, list) or not seeds or len(set(map(str, seeds))) != len(seeds)
                              or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in seeds)):
        raise ColoraError(f"sweep file '{path}': 'seeds' must be a non-empty list of distinct integers >= 0, e.g. [0, 1, 2]")
    if seeds is not None:  # every run once per seed, the seed last in its name
        grid = {**grid, "seed": seeds}
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


def check_sweep(runs: list[tuple[str, Config]], out: Path) -> None:
    """Everything that can be checked before a sweep runs, for every entry, naming the entry at fault:
    its full setup (data files and columns, model, partition, ranks, split cut, topology, memory:
    the engine's construction, ~1 s an entry) and its run directory (a run of another
    config, a folder that holds no run, or one another colora process is writing)."""
    from .engines import Engine

    if out.is_dir() and any(out.iterdir()) and not (out / SWEEP_MARKER).is_file() and not any(
            rundir.is_run_dir(child) for child in out.iterdir() if child.is_dir()):
        raise ColoraError(f"--out {out}: holds files that are not a colora sweep; give a new or empty folder")
    for i, (name, cfg) in enumerate(runs):
        run_dir = out / f"{i}-{name}"
        saved = run_dir / "config.yaml"
        if saved.is_file() and _comparable(_validated(read_yaml(saved, "run config"))) != _comparable(cfg.model_dump(mode="json")):
            raise ColoraError(f"{run_dir} holds a run of another config (its config.yaml differs from sweep run "
                              f"'{name}'); use a new --out or remove that directory")
        if run_dir.exists() and (not run_dir.is_dir() or (any(run_dir.iterdir()) and not rundir.is_run_dir(run_dir))):
            raise ColoraError(f"{run_dir} exists and holds no colora run; use a new --out or remove that directory")
        if rundir.is_locked(run_dir):
            raise ColoraError(f"{run_dir} is in use by another colora process; wait for it, or use a new --out")
        try:
            Engine(cfg).close()  # workers and actors start on first use: none started here
        except ColoraError as exc:
            raise ColoraError(f"sweep run {i} ({name}): {exc}") from None


def _validated(raw) -> dict:
    """A saved run config with today's defaults filled in (keys added since it was written compare
    equal at their defaults); a config that no longer validates compares as different."""
    try:
        return build_config(raw).model_dump(mode="json") if isinstance(raw, dict) else {}
    except ColoraError:
        return {}


def _comparable(raw) -> dict:
    """A config mapping without what colora adds at run start (the input pins)."""
    return {k: v for k, v in raw.items() if k != "pinned_inputs"} if isinstance(raw, dict) else {}


@dataclass
class SweepResult:
    """Every run's directory (in sweep order), those of the finished runs, one line per failed run."""

    dirs: list[Path]
    finished: list[Path]
    failed: list[str]


def run_sweep(runs: list[tuple[str, Config]], out: Path, jobs: int = 1) -> SweepResult:
    """Run every config of a sweep into ``out/<index>-<name>/`` (call :func:`check_sweep` first).

    A run whose directory already holds summary.json is kept; one with a checkpoint is resumed; one
    that stopped before its first checkpoint starts again. A run that fails stops nothing else: its
    error (and, for an unexpected one, the traceback) goes to ``out/<index>-<name>.log``.
    ``jobs > 1`` runs that many at once, each a ``colora run`` process with cpu_count // jobs
    threads and its log in ``out/<index>-<name>.log`` (results equal a sequential sweep: every run
    is seeded by its own config). Those processes end with the sweep: on an interrupt, a
    termination, or (Linux) the sweep process's death.
    """
    dirs = [out / f"{i}-{name}" for i, (name, _) in enumerate(runs)]
    out.mkdir(parents=True, exist_ok=True)
    (out / SWEEP_MARKER).touch()
    todo, failed = [], {}
    for i, ((name, cfg), run_dir) in enumerate(zip(runs, dirs)):
        if (run_dir / "summary.json").is_file():
            print(f"[{i + 1}/{len(runs)}] {name}: already complete, kept")
        else:
            todo.append((i, name, cfg, run_dir))
    runner = _run_here if jobs <= 1 else functools.partial(_run_processes, jobs=jobs)
    for i, name, log, why in runner(todo, out, len(runs)):
        failed[i] = f"run {i} ({name}) {why}; see {log}"
        print(f"colora: sweep run {i} ({name}) failed: {why} (log: {log})", file=sys.stderr)
    return SweepResult(dirs, [d for i, d in enumerate(dirs) if i not in failed and (d / "summary.json").is_file()],
                       [failed[i] for i in sorted(failed)])


def _run_here(todo, out: Path, total: int):
    """Runs one after another in this process; yields (index, name, log, why) for each failure."""
    from .experiment import run_experiment

    for i, name, cfg, run_dir in todo:
        print(f"[{i + 1}/{total}] {name}")
        resume = (run_dir / rundir.CHECKPOINT).is_file()
        log = out / f"{i}-{name}.log"
        try:
            run_experiment(cfg, resume=run_dir if resume else None, out=None if resume else str(run_dir))
        except ColoraError as exc:
            log.write_text(f"colora: error: {exc}\n")
            yield i, name, log, f"stopped: {str(exc)[:200]}"
        except Exception as exc:  # noqa: BLE001 - one run's crash must not end the others
            log.write_text(traceback.format_exc())
            yield i, name, log, f"crashed ({type(exc).__name__})"


def _die_with_parent() -> None:
    """In a child before exec: SIGTERM when the sweep process dies, even by kill -9 (Linux prctl)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: an interrupt or termination of the sweep still ends its runs (see below)


def _run_processes(todo, out: Path, total: int, jobs: int):
    """Up to ``jobs`` ``colora run`` processes at once; yields (index, name, log, why) for each failure.

    SIGTERM to the sweep becomes an exception here, so the ``finally`` ends every running child
    (and waits for it) before the sweep exits; children also die with the sweep through prctl."""
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs))}
    pending, running = list(todo), {}
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if threading.current_thread() is threading.main_thread() else None
    try:
        while pending or running:
            while pending and len(running) < jobs:
                i, name, cfg, run_dir = pending.pop(0)
                if (run_dir / rundir.CHECKPOINT).is_file():
                    argv = ["run", "--resume", str(run_dir)]
                else:
                    cfg_file = out / f"{i}-{name}.yaml"
                    cfg_file.write_text(dump_config(cfg))
                    argv = ["run", str(cfg_file), "--out", str(run_dir)]
                log = out / f"{i}-{name}.log"
                print(f"[{i + 1}/{total}] {name} (log: {log})")
                with open(log, "w") as fh:
                    proc = subprocess.Popen([sys.executable, "-m", "colora", *argv], stdout=fh, stderr=subprocess.STDOUT,
                                            env=env, preexec_fn=_die_with_parent)
                running[proc] = (i, name, log)
            time.sleep(0.2)
            for proc in [p for p in running if p.poll() is not None]:
                i, name, log = running.pop(proc)
                if proc.returncode != 0:
                    yield i, name, log, f"exited with {proc.returncode}"
    finally:
        for proc in running:
            proc.terminate()
        for proc in running:
            proc.wait()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
