"""Foundation benchmarks on MRPC with MiniLM-L6 (prints tables; not timed tests).

    python benchmarks/overhead.py                      # all three sections
    python benchmarks/overhead.py --section overhead   # or quality / memory

- overhead: fedavg with 10 IID clients vs central on the same samples (same optimizer steps, same
  evaluations), run one after the other in fresh processes: the ratio of their wall-clock times.
- quality: dev accuracy/F1 at an equal sample budget: central vs fedavg with 10 IID clients, all
  10 per round (C = 1) and 2 per round (C = 0.2, McMahan et al.'s regime). The runs go in parallel,
  one thread each (their wall times are not compared).
- memory: peak RSS of fedavg with 200 vs 10 clients (one round, every client sampled, one local
  step each), each in a fresh process: MB per additional simulated client.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "mrpc.yaml"
CLIENTS = 10


def _args(out: Path, overrides: dict) -> list[str]:
    args = [sys.executable, "-m", "colora", "run", str(CONFIG), "--out", str(out), "--set", "log.progress=false"]
    for key, value in overrides.items():
        args += ["--set", f"{key}={value}"]
    return args


def run(out: Path, overrides: dict) -> dict:
    """One experiment in a fresh process; its summary.json."""
    subprocess.run(_args(out, overrides), check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text())


def run_parallel(jobs: dict[str, tuple[Path, dict]]) -> dict[str, dict]:
    """Several experiments at once, one thread each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {name: subprocess.Popen(_args(out, over), cwd=ROOT, env=env, stdout=subprocess.DEVNULL) for name, (out, over) in jobs.items()}
    for name, proc in procs.items():
        if proc.wait() != 0:
            raise SystemExit(f"run {name} failed")
    return {name: json.loads((out / "summary.json").read_text()) for name, (out, _) in jobs.items()}


def fed(common: dict, steps_per_round: int, per_round: int = CLIENTS, **extra) -> dict:
    """fedavg with 10 IID clients, ``per_round`` sampled, the round's steps split among them."""
    return {**common, "algorithm": "fedavg", "clients.num": CLIENTS, "clients.per_round": per_round,
            "clients.partition": "iid", "train.local_steps": steps_per_round // per_round, **extra}


def section_overhead(tmp: Path, data: str, rounds: int, steps: int, repeats: int = 2) -> None:
    """Alternating runs (central, fedavg, central, ...); the fastest of each counts, so a burst of
    other load on the machine does not land on one side only."""
    common = {"data.path": data, "rounds": rounds, "eval.every": rounds, "train.lr": 1e-3}
    per_round = steps // rounds
    walls: dict[str, list[float]] = {"central": [], "fedavg": []}
    for i in range(repeats):
        walls["central"].append(run(tmp / f"o-central-{i}", {**common, "algorithm": "central", "train.local_steps": per_round})["wall_time_s"])
        walls["fedavg"].append(run(tmp / f"o-fedavg-{i}", fed(common, per_round))["wall_time_s"])
    central, fedavg = min(walls["central"]), min(walls["fedavg"])
    print(f"\n[overhead] {steps} optimizer steps of batch 16 each, {rounds} rounds, 2 evaluations, best of {repeats} alternating runs")
    print(f"  central {central:.1f} s {walls['central']}, fedavg (10 clients) {fedavg:.1f} s {walls['fedavg']}: "
          f"ratio {fedavg / central:.3f} (target <= 1.10)")


def section_quality(tmp: Path, data: str, rounds: int, steps: int) -> None:
    per_round = steps // rounds
    common = {"data.path": data, "rounds": rounds, "eval.every": max(rounds // 8, 1), "train.lr": 1e-3,
              "train.lr_schedule": "linear", "train.warmup_rounds": 2}
    jobs = {
        "central": (tmp / "q-central", {**common, "algorithm": "central", "train.local_steps": per_round}),
        "fedavg": (tmp / "q-fedavg", fed(common, per_round)),
        "fedavg C=0.2": (tmp / "q-fedavg-c02", fed(common, per_round, per_round=2)),
    }
    res = run_parallel(jobs)
    print(f"\n[quality] MRPC dev, minilm-l6, LoRA r=8 (query, value), batch 16, {steps} steps = {steps * 16} samples per run")
    print(f"  {'run':<22}{'acc':>8}{'f1':>8}{'best acc':>10}{'MB up/round':>13}")
    for name, s in res.items():
        f = s["final"]
        print(f"  {name:<22}{f['eval/accuracy']:>8.4f}{f['eval/f1']:>8.4f}{s['best']['eval/accuracy']:>10.4f}"
              f"{s['bytes_up'] / 1e6 / rounds:>13.2f}")
    c = res["central"]["final"]["eval/accuracy"]
    for name in ("fedavg", "fedavg C=0.2"):
        print(f"  gap central - {name}: {100 * (c - res[name]['final']['eval/accuracy']):+.2f} points (target <= 3)")
    print(f"  central >= 0.80: {c >= 0.80}")


def section_memory(tmp: Path, data: str) -> None:
    common = {"data.path": data, "rounds": 1, "eval.every": 1, "train.local_steps": 1}
    rss = {}
    for n, keep in ((10, "reset"), (200, "reset"), (200, "keep")):
        s = run(tmp / f"m{n}-{keep}", {**common, "algorithm": "fedavg", "clients.num": n, "clients.per_round": n,
                                       "train.client_optimizer": keep})
        rss[(n, keep)] = s["peak_rss_mb"]
    print("\n[memory] fedavg, one round, every client sampled, one local step each")
    for key in (("reset"), ("keep")):
        per = (rss[(200, key)] - rss[(10, "reset")]) / 190
        print(f"  client_optimizer={key}: 10 clients {rss[(10, 'reset')]:.1f} MB, 200 clients {rss[(200, key)]:.1f} MB "
              f"-> {per:.3f} MB per additional client (target <= 2)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--section", choices=["all", "overhead", "quality", "memory"], default="all")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "glue" / "MRPC"),
                   help="GLUE MRPC folder with train.tsv and dev.tsv (examples/mrpc.yaml itself has data.path: null)")
    p.add_argument("--steps", type=int, default=1200, help="quality: optimizer steps per run (central) = client steps (fedavg)")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--overhead-steps", type=int, default=200)
    args = p.parse_args()
    if args.steps % (args.rounds * CLIENTS):
        raise SystemExit("--steps must be a multiple of rounds * 10")
    tmp = Path(tempfile.mkdtemp(prefix="colora-bench-"))
    if args.section in ("all", "overhead"):
        section_overhead(tmp, args.data, 10, args.overhead_steps)
    if args.section in ("all", "quality"):
        section_quality(tmp, args.data, args.rounds, args.steps)
    if args.section in ("all", "memory"):
        section_memory(tmp, args.data)


if __name__ == "__main__":
    main()
