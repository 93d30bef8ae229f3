"""Record a benchmark's finished runs in the repository, so that a benchmark longer than one
sitting accumulates across machines and its README tables can be printed again from the record.

    python benchmarks/record.py runs/peers benchmarks/results/peers     # from the repository root

Copies every finished run (a folder holding summary.json) under SRC to the same place under DEST,
keeping only what the tables and the sweep's resume check read: config.yaml, metrics.jsonl,
summary.json (with the ``software`` that produced it: the commit measured), partition.json,
system.json and the run/sweep markers; ~20 KB a run. Adapters, checkpoints and logs stay behind.
Input paths in config.yaml (data.path, ...) are written relative to the repository root, the way the
benchmarks' commands name them (``--glue ../shared/data/glue``): a benchmark run from the root with
``--out DEST`` then keeps the recorded runs (its configs compare equal) and runs only the rest, and
``benchmarks/peers.py --report-only`` prints the recorded tables. A run already recorded is left as
it is; a file naming this machine's folders outside the repository is refused.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from colora.compare import SWEEP_MARKER  # noqa: E402
from colora.config import INPUT_KEYS  # noqa: E402
from colora.rundir import MARKER  # noqa: E402

KEEP = ("metrics.jsonl", "summary.json", "partition.json", "system.json", MARKER)


def relative_inputs(config: dict) -> dict:
    """config.yaml's input paths relative to the repository root (the benchmarks run from there)."""
    for key in INPUT_KEYS:
        section, field = key.split(".")
        value = (config.get(section) or {}).get(field)
        if isinstance(value, str) and os.path.isabs(value):
            config[section][field] = os.path.relpath(value, ROOT)
    return config


def record(src: Path, dest: Path) -> list[Path]:
    """Copy the finished runs under ``src`` to ``dest``; returns the run folders newly recorded."""
    added = []
    for summary in sorted(src.rglob("summary.json")):
        run, target = summary.parent, dest / summary.parent.relative_to(src)
        if (target / "summary.json").is_file():
            continue
        config = relative_inputs(yaml.safe_load((run / "config.yaml").read_text()))
        files = {"config.yaml": yaml.safe_dump(config, sort_keys=False)}
        files.update({name: (run / name).read_text() for name in KEEP if (run / name).is_file()})
        outside = str(ROOT.parent) + os.sep
        for name, text in files.items():
            if outside in text:
                raise SystemExit(f"record: {run / name} names {outside}; record only runs whose inputs are given relative "
                                 f"to the repository root")
        target.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (target / name).write_text(text)
        for folder in (target.parent, *target.parent.parents):  # the sweep folders: markers for --out reuse
            if folder == dest.parent:
                break
            if (src / folder.relative_to(dest) / SWEEP_MARKER).is_file():
                shutil.copyfile(src / folder.relative_to(dest) / SWEEP_MARKER, folder / SWEEP_MARKER)
        added.append(target)
    return added


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path, help="a benchmark's --out folder")
    p.add_argument("dest", type=Path, help="the record, e.g. benchmarks/results/peers")
    args = p.parse_args()
    for target in record(args.src, args.dest):
        print(f"recorded {target}")


if __name__ == "__main__":
    main()
