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
from pathlib import Path

import yaml

from .config import ColoraError, Config, build_config

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
