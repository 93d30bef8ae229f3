"""Foundation benchmarks on MRPC with MiniLM-L6 (prints a table; not a timed test).

1. Engine overhead: fedavg with 10 IID clients vs central on the same samples (same number of
   optimizer steps, same evaluations): ratio of wall-clock times measured in this one run.
2. Quality at equal sample budget: dev accuracy / F1 of both runs.
3. Memory per additional simulated client: peak RSS of fedavg with 200 vs 10 clients (one round,
   every client sampled, one local step each), each in a fresh process.

    python benchmarks/overhead.py [--data ../shared/data/glue/MRPC] [--steps 600]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "mrpc.yaml"


def colora_run(out: Path, overrides: dict) -> dict:
    """Run one experiment in a fresh process; return its summary.json."""
    args = [sys.executable, "-m", "colora", "run", str(CONFIG), "--out", str(out), "--set", "log.progress=false"]
    for key, value in overrides.items():
        args += ["--set", f"{key}={json.dumps(value) if isinstance(value, list) else value}"]
    subprocess.run(args, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "glue" / "MRPC"))
    p.add_argument("--steps", type=int, default=600, help="total optimizer steps (central) = client steps (fedavg)")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--central-lr", type=float, default=1e-3)
    p.add_argument("--fedavg-lr", type=float, default=1e-3)
    p.add_argument("--server-optimizer", default="none")
    p.add_argument("--server-lr", type=float, default=1.0)
    p.add_argument("--skip-memory", action="store_true")
    args = p.parse_args()
    clients = 10
    per_client_steps = args.steps // (args.rounds * clients)
    assert per_client_steps * args.rounds * clients == args.steps, "--steps must be a multiple of rounds * 10"
    common = {"data.path": args.data, "rounds": args.rounds, "eval.every": max(args.rounds // 4, 1), "seed": 0}
    tmp = Path(tempfile.mkdtemp(prefix="colora-bench-"))
    central = colora_run(tmp / "central", {**common, "algorithm": "central", "train.lr": args.central_lr,
                                           "train.local_steps": per_client_steps * clients})
    fed = colora_run(tmp / "fedavg", {**common, "algorithm": "fedavg", "clients.num": clients, "clients.per_round": clients,
                                      "clients.partition": "iid", "train.lr": args.fedavg_lr,
                                      "train.local_steps": per_client_steps,
                                      "federation.server_optimizer": args.server_optimizer,
                                      "federation.server_lr": args.server_lr})
    print(f"\nMRPC, minilm-l6, LoRA r=8 (query, value), batch 16, {args.steps} optimizer steps = {args.steps * 16} samples each")
    print(f"{'run':<34}{'acc':>8}{'f1':>8}{'best acc':>10}{'wall s':>9}{'MB up':>9}")
    for name, s in ((f"central ({args.rounds}x{per_client_steps * clients} steps)", central),
                    (f"fedavg 10 IID ({args.rounds}x10x{per_client_steps})", fed)):
        f = s["final"]
        print(f"{name:<34}{f['eval/accuracy']:>8.4f}{f['eval/f1']:>8.4f}{s['best']['eval/accuracy']:>10.4f}"
              f"{s['wall_time_s']:>9.1f}{s['bytes_up'] / 1e6:>9.2f}")
    ratio = fed["wall_time_s"] / central["wall_time_s"]
    gap = 100 * (central["final"]["eval/accuracy"] - fed["final"]["eval/accuracy"])
    print(f"wall-time ratio fedavg/central: {ratio:.3f} (target <= 1.10)")
    print(f"accuracy gap central - fedavg: {gap:+.2f} points (target <= 3); central >= 0.80: {central['final']['eval/accuracy'] >= 0.80}")
    if args.skip_memory:
        return
    rss = {}
    for n in (10, 200):
        s = colora_run(tmp / f"mem{n}", {**common, "algorithm": "fedavg", "rounds": 1, "eval.every": 1,
                                          "clients.num": n, "clients.per_round": n, "train.local_steps": 1})
        rss[n] = s["peak_rss_mb"]
    per_client = (rss[200] - rss[10]) / 190
    print(f"peak RSS: 10 clients {rss[10]:.1f} MB, 200 clients {rss[200]:.1f} MB -> {per_client:.3f} MB per additional client (target <= 2)")


if __name__ == "__main__":
    main()
