"""Heterogeneous-rank federated LoRA on GLUE: final dev accuracy per aggregation rule, mean ± std over seeds.

MiniLM-L6, 20 clients, Dirichlet(0.5) label skew, ``--per-round`` of them sampled each round (default all). Runs:
- ``fedit-r2`` / ``fedit-r8``: homogeneous LoRA at rank 2 / 8 (the low and high references);
- ``zero_pad`` (HetLoRA), ``svd`` (FlexLoRA), ``stack`` (FLoRA): ranks {2, 4, 8} assigned by client id
  (client k gets (2, 4, 8)[k mod 3]), independent of data size;
- ``hlora``: ``svd`` with HLoRA's data-size rule (data-size tertiles get 2, 4, 8).
Runs go through ``colora.compare.run_sweep`` (``--jobs`` processes at once; finished runs under ``--out``
are kept); results land in OUT/results.json and a table is printed.

    python benchmarks/hetero.py [--tasks mrpc sst2] [--rounds 20] [--steps 10] [--seeds 3] [--max-train N]
    python benchmarks/hetero.py --rounds 1 --seeds 1 --max-train 200 --max-eval 64   # smoke test
    python benchmarks/hetero.py --set train.precision=bf16 --set train.lr_schedule=cosine   # any config key
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from colora.compare import run_sweep
from colora.config import build_config, parse_override

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "glue"
TASKS = {"mrpc": ("glue/mrpc", "MRPC"), "sst2": ("glue/sst2", "SST-2")}
RULES = ["fedit-r2", "zero_pad", "svd", "stack", "hlora", "fedit-r8"]


def run_config(task: str, rule: str, seed: int, args) -> dict:
    name, folder = TASKS[task]
    ranks = [(2, 4, 8)[k % 3] for k in range(args.clients)]
    fed = {"fedit-r2": {"aggregator": "fedit"}, "fedit-r8": {"aggregator": "fedit"},
           "zero_pad": {"aggregator": "zero_pad", "ranks": ranks}, "svd": {"aggregator": "svd", "ranks": ranks},
           "stack": {"aggregator": "stack", "ranks": ranks}, "hlora": {"aggregator": "hlora", "rank_set": [2, 4, 8]}}[rule]
    return {
        "name": f"{task}-{rule}-s{seed}", "seed": seed, "algorithm": "fedavg", "rounds": args.rounds,
        "model": {"name": "minilm-l6", "task": "seq-cls",
                  "lora": {"r": 2 if rule == "fedit-r2" else 8, "alpha": 16, "target_modules": ["query", "value"]}},
        "data": {"name": name, "path": str(Path(args.data) / folder), "max_length": 128,
                 "max_train": args.max_train, "max_eval": args.max_eval},
        "clients": {"num": args.clients, "per_round": args.per_round or args.clients, "partition": "dirichlet", "alpha": 0.5},
        "train": {"local_steps": args.steps, "batch_size": 16, "lr": args.lr, "optimizer": "adamw"},
        "federation": fed,
        "eval": {"every": args.eval_every or args.rounds},
        "log": {"progress": False},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--rules", nargs="+", default=RULES, choices=RULES)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--steps", type=int, default=10, help="local optimizer steps per client per round")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--per-round", type=int, default=None, help="clients sampled per round (default: all)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=None, help="rounds between evaluations (default: the last only)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, one thread each")
    p.add_argument("--max-train", type=int, default=None, help="cap on training examples (default: all)")
    p.add_argument("--max-eval", type=int, default=None, help="cap on dev examples (default: all)")
    p.add_argument("--data", default=str(DATA), help="folder holding the GLUE task folders (MRPC, SST-2)")
    p.add_argument("--out", default=None, help="where runs and results.json go (default: a temp folder)")
    p.add_argument("--report-only", action="store_true", help="print the table of the runs finished under --out")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every run, e.g. train.precision=bf16")
    args = p.parse_args()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="colora-hetero-"))
    # seed-major within a task: an interrupted sweep (rerun with the same --out to finish it) has
    # whole seeds of every rule, not all seeds of the first rules
    keys = [(task, rule, seed) for task in args.tasks for seed in range(args.seeds) for rule in args.rules]
    sets = dict(parse_override(kv) for kv in args.sets)
    runs = [(f"{t}-{r}-s{s}", build_config(run_config(t, r, s, args), sets)) for t, r, s in keys]
    if args.report_only:  # the table of whatever finished under --out
        dirs = [out / f"{i}-{name}" for i, (name, _) in enumerate(runs)]
    else:
        dirs = run_sweep(runs, out, args.jobs).dirs  # finished runs under --out are kept; failed ones print why
    # accuracy alone cannot rank rules that sit near the majority rate; dev loss still can.
    # results[metric][task][rule][seed]: every rule sees the same sampled clients under one seed, so
    # per-seed differences between rules are paired comparisons.
    results: dict[str, dict[str, dict[str, dict[int, float]]]] = {"accuracy": {}, "eval_loss": {}}
    for (task, rule, seed), run_dir in zip(keys, dirs):
        if (run_dir / "summary.json").is_file():
            final = json.loads((run_dir / "summary.json").read_text())["final"]
            results["accuracy"].setdefault(task, {}).setdefault(rule, {})[seed] = final["eval/accuracy"]
            results["eval_loss"].setdefault(task, {}).setdefault(rule, {})[seed] = final["eval/loss"]
    (out / "results.json").write_text(json.dumps({"args": vars(args), **results}, indent=2))
    print(f"\nfinal dev accuracy and dev loss, minilm-l6, {args.clients} clients ({args.per_round or args.clients} per round), "
          f"Dirichlet 0.5, {args.rounds} rounds x {args.steps} local steps, mean ± std over {args.seeds} seed(s); runs in {out}")
    print(f"{'rule':<12}" + "".join(f"{f'{t} {m}':>24}" for t in args.tasks for m in ("acc", "loss")))
    for rule in args.rules:
        cells = []
        for task in args.tasks:
            for metric in ("accuracy", "eval_loss"):
                vals = list(results[metric].get(task, {}).get(rule, {}).values())
                std = statistics.stdev(vals) if len(vals) > 1 else 0.0
                seeds = "" if len(vals) == args.seeds else f" ({len(vals)})"  # runs finished so far
                cells.append(f"{statistics.mean(vals):.4f} ± {std:.4f}{seeds}" if vals else "-")
        print(f"{rule:<12}" + "".join(f"{c:>24}" for c in cells))
    print_paired(results, args.tasks, [r for r in args.rules if r != "zero_pad"])


def print_paired(results: dict, tasks: list[str], rules: list[str]) -> None:
    """Each rule against zero_pad (HetLoRA) seed by seed: mean difference and wins / ties / losses
    (nothing for a task without finished zero_pad runs)."""
    for task in tasks:
        acc, loss = results["accuracy"].get(task, {}), results["eval_loss"].get(task, {})
        for rule in rules:
            seeds = sorted(set(acc.get(rule, {})) & set(acc.get("zero_pad", {})))
            if not seeds:
                continue
            d_acc = [acc[rule][s] - acc["zero_pad"][s] for s in seeds]
            d_loss = [loss[rule][s] - loss["zero_pad"][s] for s in seeds]
            better, equal = sum(d > 0 for d in d_acc), sum(d == 0 for d in d_acc)
            record = f"{better}/{equal}/{len(d_acc) - better - equal}"
            print(f"{task} {rule} - zero_pad over {len(seeds)} paired seed(s): accuracy {statistics.mean(d_acc):+.4f} "
                  f"(better/equal/worse {record}), dev loss {statistics.mean(d_loss):+.4f} "
                  f"(lower in {sum(d < 0 for d in d_loss)})")


if __name__ == "__main__":
    main()
