"""Split learning on MRPC with MiniLM-L6: central, fedavg, sl and splitlora (both server modes).

Runs the equal-budget sweep of ``examples/time_to_target.yaml`` (benchmarks/ttt_sweep.py: 10 IID
clients, 2 per round, 1200 batches of 16 in every run) and prints accuracy, bytes up/down per
round, client-side parameters and client training FLOPs per sample, and whether each splitlora
variant is within 2 accuracy points of fedavg.

    python benchmarks/split.py --jobs 2                   # the full comparison (~1 h on 2 cores)
    python benchmarks/split.py --out /tmp/s --set model.name=tiny-bert --set data.max_train=160 \\
        --set data.max_eval=64 --set rounds=2 --set train.local_steps=2   # a quick check of the script
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ttt_sweep  # noqa: E402


def whole_model_cost(cfg, steps: int) -> tuple[int, float]:
    """(parameters, training FLOPs per sample) of the whole model on client 0's first batches:
    what a fedavg client holds and computes (central's single trainer computes the same)."""
    from colora.engines import InProcessEngine
    from colora.types import ClientTask

    engine = InProcessEngine(cfg.model_copy(update={"algorithm": "fedavg"}))
    result = engine.trainer([ClientTask(0, engine.slots.get(), 0, steps, 1e-6)])[0]
    params = sum(p.numel() for p in engine.model.parameters())
    return params, result.flops / (steps * cfg.train.batch_size)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/ttt", help="sweep folder (shared with benchmarks/time_to_target.py)")
    p.add_argument("--jobs", type=int, default=2, help="runs at once")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    ttt_sweep.add_data_argument(p)
    args = p.parse_args()
    runs = ttt_sweep.run(Path(args.out), args.jobs, ttt_sweep.overrides(args))
    summaries = {d.name.split("-", 1)[1]: json.loads((d / "summary.json").read_text()) for _, d in runs}
    cfg = runs[1][0]  # fedavg
    params, flops = whole_model_cost(cfg, min(cfg.train.local_steps, 5))
    rounds = cfg.rounds
    print(f"\nMRPC, {cfg.model.name}, {cfg.clients.num} IID clients ({cfg.clients.per_round} per round), split after block "
          f"{cfg.split.layer}, {rounds} rounds, equal sample budget; runs in {args.out}")
    head = f"{'run':<28}{'acc':>8}{'f1':>8}{'MB up/rnd':>11}{'MB dn/rnd':>11}{'client params':>15}{'client GFLOP/sample':>21}"
    print(head)
    for name, s in summaries.items():
        split = s.get("split")
        if name.startswith("central"):  # no client side: the data owners ship their data
            cparams, cflops = "-", "-"
        else:
            cparams = f"{split['client_params'] if split else params:,}"
            cflops = f"{(split['client_flops_per_sample'] if split else flops) / 1e9:.4f}"
        f = s["final"]
        print(f"{name:<28}{f['eval/accuracy']:>8.4f}{f.get('eval/f1', float('nan')):>8.4f}"
              f"{s['bytes_up'] / 1e6 / rounds:>11.3f}{s['bytes_down'] / 1e6 / rounds:>11.3f}{cparams:>15}{cflops:>21}")
    fed = summaries["fedavg"]["final"]["eval/accuracy"]
    for name in [n for n in summaries if n.startswith("splitlora")]:
        gap = 100 * (fed - summaries[name]["final"]["eval/accuracy"])
        print(f"{name}: {gap:+.2f} points below fedavg (target <= 2): {'ok' if gap <= 2 else 'MISSED'}")
    print(f"whole model: {params:,} parameters, {flops / 1e9:.4f} GFLOP per training sample "
          f"(client 0's first batches; a fedavg client trains all of it)")


if __name__ == "__main__":
    main()
