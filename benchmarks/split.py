"""Split learning on MRPC with MiniLM-L6: central, fedavg, sl and splitlora (both server modes).

Every run sees the same samples (equal sample budget): per round each of the ``--clients`` IID
clients takes ``--local-steps`` steps (central: clients x local steps on the pooled data). Prints
accuracy, bytes up/down per round, client-side parameters and client training FLOPs per sample,
and whether each splitlora variant is within 2 accuracy points of fedavg.

    python benchmarks/split.py                      # the full MRPC comparison (hours on 2 cores)
    python benchmarks/split.py --model tiny-bert --max-train 160 --max-eval 64 --rounds 2 \\
        --local-steps 2 --clients 3 --layer 2       # a quick check of the script itself
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "splitlora_mrpc.yaml"


def colora_run(out: Path, overrides: dict) -> dict:
    """Run one experiment in a fresh process; return its summary.json."""
    args = [sys.executable, "-m", "colora", "run", str(CONFIG), "--out", str(out), "--set", "log.progress=false"]
    for key, value in overrides.items():
        args += ["--set", f"{key}={value}"]
    subprocess.run(args, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text())


def whole_model_cost(overrides: dict, steps: int) -> tuple[int, float]:
    """(parameters, training FLOPs per sample) of the whole model on client 0's first batches:
    what a fedavg client holds and computes (central's single trainer computes the same)."""
    from colora.config import build_config
    from colora.engines import InProcessEngine
    from colora.types import ClientTask

    raw = yaml.safe_load(CONFIG.read_text())
    engine = InProcessEngine(build_config(raw, {**overrides, "algorithm": "fedavg"}))
    task = ClientTask(0, engine.slots.get(), 0, steps, 1e-6)
    result = engine.trainer([task])[0]
    params = sum(p.numel() for p in engine.model.parameters())
    return params, result.flops / (steps * engine.cfg.train.batch_size)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "glue" / "MRPC"))
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--local-steps", type=int, default=10, help="steps per client per round")
    p.add_argument("--aggregate-every", type=int, default=None, help="splitlora client-adapter FedAvg interval (default: local steps)")
    p.add_argument("--layer", type=int, default=2, help="split.layer")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-train", type=int, default=None)
    p.add_argument("--max-eval", type=int, default=None)
    args = p.parse_args()
    common = {"data.path": args.data, "model.name": args.model, "rounds": args.rounds, "clients.num": args.clients,
              "clients.per_round": args.clients, "train.lr": args.lr, "split.layer": args.layer,
              "split.aggregate_every": args.aggregate_every or args.local_steps, "eval.every": max(args.rounds // 4, 1)}
    if args.max_train:
        common["data.max_train"] = args.max_train
    if args.max_eval:
        common["data.max_eval"] = args.max_eval
    per_client = {"train.local_steps": args.local_steps}
    runs = {
        "central": {"algorithm": "central", "train.local_steps": args.local_steps * args.clients},
        "fedavg": {"algorithm": "fedavg", **per_client},
        "sl": {"algorithm": "sl", **per_client},
        "splitlora shared": {"algorithm": "splitlora", "split.server": "shared", **per_client},
        "splitlora per_client": {"algorithm": "splitlora", "split.server": "per_client", **per_client},
    }
    tmp = Path(tempfile.mkdtemp(prefix="colora-split-bench-"))
    summaries = {name: colora_run(tmp / name.replace(" ", "-"), {**common, **over}) for name, over in runs.items()}
    params, flops = whole_model_cost({**common, **per_client}, min(args.local_steps, 5))
    samples = args.rounds * args.clients * args.local_steps * yaml.safe_load(CONFIG.read_text())["train"]["batch_size"]
    print(f"\nMRPC, {args.model}, {args.clients} IID clients, split after block {args.layer}, "
          f"{args.rounds} rounds x {args.local_steps} steps per client ({samples} samples per run)")
    head = f"{'run':<22}{'acc':>8}{'f1':>8}{'MB up/rnd':>11}{'MB dn/rnd':>11}{'client params':>15}{'client GFLOP/sample':>21}{'sim s':>9}"
    print(head)
    for name, s in summaries.items():
        split = s.get("split")
        if name == "central":  # no client side: the data owners ship their data
            cparams, cflops = "-", "-"
        else:
            cparams = f"{split['client_params'] if split else params:,}"
            cflops = f"{(split['client_flops_per_sample'] if split else flops) / 1e9:.4f}"
        f = s["final"]
        print(f"{name:<22}{f['eval/accuracy']:>8.4f}{f.get('eval/f1', float('nan')):>8.4f}"
              f"{s['bytes_up'] / 1e6 / args.rounds:>11.3f}{s['bytes_down'] / 1e6 / args.rounds:>11.3f}"
              f"{cparams:>15}{cflops:>21}{s['sim_time_s']:>9.1f}")
    fed = summaries["fedavg"]["final"]["eval/accuracy"]
    for name in ("splitlora shared", "splitlora per_client"):
        gap = 100 * (fed - summaries[name]["final"]["eval/accuracy"])
        print(f"{name}: {gap:+.2f} points below fedavg (target <= 2): {'ok' if gap <= 2 else 'MISSED'}")
    print(f"whole model: {params:,} parameters, {flops / 1e9:.4f} GFLOP per training sample "
          f"(client 0's first {min(args.local_steps, 5)} batches; a fedavg client trains all of it)")


if __name__ == "__main__":
    main()
