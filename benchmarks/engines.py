"""Engines against Flower on the anchor workload, and memory at scale (prints tables; not timed tests).

    python benchmarks/engines.py --data DIR                       # both sections
    python benchmarks/engines.py --data DIR --section anchor      # or scale
    python benchmarks/engines.py --data DIR --flower-python PY    # Flower from another interpreter

DIR is a GLUE MRPC folder (train.tsv, dev.tsv), e.g. ../shared/data/glue/MRPC.

- anchor: MiniLM-L6 + LoRA r=8 on query/value + head, MRPC, 10 IID clients all training, 3 rounds x
  10 local steps x batch 16, AdamW lr 5e-4 fresh every round, under colora's ``inprocess``,
  ``workers`` (2) and ``ray`` (2) engines and in Flower's own Ray simulation
  (benchmarks/flower_anchor.py; ``flwr[simulation]``, the ``bench-flower`` extra), one after
  another, each in a fresh process tree. colora evaluates the dev set twice (round 0 and the end),
  Flower once (the end). Wall time; peak RSS and peak PSS summed over every process of the run's
  tree (Ray's GCS, raylet and workers included), sampled every 0.2 s from /proc; dev accuracy.
- scale: one round of fedavg (10 local steps) with 10 clients sampled a round, among 10 and among
  1,000 clients (MRPC split IID: ~3.7 samples each at 1,000), under ``inprocess`` and ``workers``
  with 1 and 2 workers: peak PSS summed, MB per additional simulated client, and the PSS of the
  shared base file's mappings summed over every process (resident once: ~91 MB whatever the
  number of workers).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "mrpc.yaml"
ANCHOR = {"algorithm": "fedavg", "rounds": 3, "clients.num": 10, "clients.per_round": 10, "clients.partition": "iid",
          "train.local_steps": 10, "train.batch_size": 16, "train.lr": 5e-4, "train.optimizer": "adamw",
          "train.client_optimizer": "reset", "eval.every": 3, "log.progress": "false"}


def _tree(root: int) -> list[int]:
    """``root`` and all its descendants, from /proc's parent links."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _rss_pss_mb(pids: list[int]) -> tuple[float, float]:
    rss = pss = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1])
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1])
        except OSError:
            continue
    return rss / 1024, pss / 1024


def _base_pss_mb(pids: list[int]) -> float:
    """PSS of the shared base file's mappings (colora.engines.shared_base), summed over ``pids``."""
    total, inside = 0, False
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps") as f:
                for line in f:
                    if not line[0].isupper():  # a mapping's header line: address range, perms, ..., path
                        inside = "colora-base-" in line
                    elif inside and line.startswith("Pss:"):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def measure(args: list[str], env: dict | None = None, base: bool = False) -> dict:
    """Run ``args``; its wall time and the peaks of summed RSS and PSS over its process tree."""
    peak = {"rss_mb": 0.0, "pss_mb": 0.0, "procs": 0, "base_pss_mb": 0.0}
    began = time.perf_counter()
    proc = subprocess.Popen(args, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            pids = _tree(proc.pid)
            rss, pss = _rss_pss_mb(pids)
            peak["rss_mb"], peak["pss_mb"] = max(peak["rss_mb"], rss), max(peak["pss_mb"], pss)
            peak["procs"] = max(peak["procs"], len(pids))
            if base:
                peak["base_pss_mb"] = max(peak["base_pss_mb"], _base_pss_mb(pids))
            stop.wait(0.2)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args[:6])} ... failed ({proc.returncode}):\n{err.decode()[-2000:]}")
    return {**peak, "wall_s": time.perf_counter() - began}


def colora_run(out: Path, data: str, overrides: dict, base: bool = False) -> dict:
    args = [sys.executable, "-m", "colora", "run", str(CONFIG), "--out", str(out), "--set", f"data.path={data}"]
    for key, value in overrides.items():
        args += ["--set", f"{key}={value}"]
    stats = measure(args, base=base)
    summary = json.loads((out / "summary.json").read_text())
    return {**stats, "accuracy": summary["final"].get("eval/accuracy")}


def anchor(data: str, flower_python: str | None, tmp: Path) -> list[dict]:
    rows = []
    for name, engine in (("colora inprocess", {"engine.kind": "inprocess"}),
                         ("colora workers (2)", {"engine.kind": "workers", "engine.workers": 2}),
                         ("colora ray (2)", {"engine.kind": "ray", "engine.workers": 2})):
        rows.append({"run": name, **colora_run(tmp / name.replace(" ", "_"), data, {**ANCHOR, **engine})})
        print(_row(rows[-1]), flush=True)
    if flower_python is not None:
        out = tmp / "flower.json"
        stats = measure([flower_python, str(ROOT / "benchmarks" / "flower_anchor.py"), "--data", data, "--out", str(out)])
        rows.append({"run": "Flower 1.41 simulation (Ray)", **stats, "accuracy": json.loads(out.read_text())["accuracy"]})
        print(_row(rows[-1]), flush=True)
    return rows


def scale(data: str, tmp: Path) -> list[dict]:
    rows = []
    base = {**ANCHOR, "rounds": 1, "clients.per_round": 10, "train.local_steps": 10, "eval.every": 1}
    for kind, workers in (("inprocess", 1), ("workers", 1), ("workers", 2)):
        for clients in (10, 1000):
            over = {**base, "clients.num": clients, "engine.kind": kind, "engine.workers": workers}
            stats = colora_run(tmp / f"scale-{kind}-{workers}-{clients}", data, over, base=kind == "workers")
            rows.append({"run": f"{kind} x{workers}", "clients": clients, **stats})
            print(f"  {rows[-1]['run']:<14} {clients:>5} clients  peak PSS {stats['pss_mb']:8.1f} MB  RSS {stats['rss_mb']:8.1f} MB"
                  f"  base file PSS {stats['base_pss_mb']:6.1f} MB", flush=True)
    return rows


def _row(r: dict) -> str:
    acc = "-" if r.get("accuracy") is None else f"{r['accuracy']:.3f}"
    return f"| {r['run']:<30} | {r['wall_s']:7.1f} | {r['rss_mb']:8.0f} | {r['pss_mb']:8.0f} | {r['procs']:5d} | {acc:>8} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="GLUE MRPC folder (train.tsv, dev.tsv)")
    parser.add_argument("--section", choices=["anchor", "scale", "all"], default="all")
    parser.add_argument("--flower-python", default=None,
                        help="interpreter with flwr[simulation] installed (default: this one, if it has flwr)")
    args = parser.parse_args()
    data = str(Path(args.data).resolve())
    flower = args.flower_python
    if flower is None:
        import importlib.util

        flower = sys.executable if importlib.util.find_spec("flwr") else None
    with tempfile.TemporaryDirectory(prefix="colora-bench-") as tmp:
        if args.section in ("anchor", "all"):
            print("| run                            |  wall s | peak RSS MB | peak PSS MB | procs | dev acc |")
            print("|---|---:|---:|---:|---:|---:|")
            rows = anchor(data, flower, Path(tmp))
            flw = next((r for r in rows if r["run"].startswith("Flower")), None)
            if flw is not None:
                for r in rows[:-1]:
                    print(f"{r['run']}: {r['wall_s'] / flw['wall_s']:.2f}x Flower's wall time, "
                          f"{r['pss_mb'] / flw['pss_mb']:.2f}x its summed PSS")
        if args.section in ("scale", "all"):
            rows = scale(data, Path(tmp))
            print("| engine | PSS at 10 clients MB | PSS at 1,000 clients MB | MB per additional client | base weights' PSS MB |")
            print("|---|---:|---:|---:|---:|")
            for small, big in zip(rows[0::2], rows[1::2]):
                per = (big["pss_mb"] - small["pss_mb"]) / 990
                shared = f"{big['base_pss_mb']:.1f}" if big["base_pss_mb"] else "- (in process)"
                print(f"| {small['run']} | {small['pss_mb']:.0f} | {big['pss_mb']:.0f} | {per:.3f} | {shared} |")


if __name__ == "__main__":
    main()
