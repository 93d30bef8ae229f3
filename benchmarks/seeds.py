"""Learning at every seed: central and fedavg LoRA on MRPC, SST-2, CoLA and STS-B, 3 seeds each
(prints a per-seed table; not a timed test).

    python benchmarks/seeds.py --glue ../shared/data/glue --jobs 2           # all four tasks
    python benchmarks/seeds.py --glue DIR --tasks mrpc,cola --seeds 0,1,2,3,4
    python benchmarks/seeds.py --glue DIR --quick                              # tiny-bert smoke size

Each task's base is ``examples/glue/<task>.yaml`` (MiniLM-L6 + LoRA r=8 on query/value, peak lr 1e-3
after a linear warm-up over the first 10% of the steps, linear decay to 0, 600 steps of 16; STS-B and
CoLA also train the pooler, CoLA for 1,600 steps), run as it is (``central``) and as ``fedavg`` at the
same number of samples: 10 IID clients, 2 a round, 25 local steps, as many rounds as make the central
run's steps (600 steps: 12 rounds, warm-up 1 round). Both in bf16 (``--set`` changes any key of every
run). ``--glue`` is a folder holding the GLUE task folders MRPC, SST-2, CoLA, STS-B in the TSV layout.
Runs go through ``colora compare`` into ``--out``: an interrupted benchmark resumes where it stopped,
and ``--jobs`` runs several at once.

A seed "left the plateau" when its final dev metric clears what a model that ignores its input gets:
accuracy at least 3 points above the majority class (MRPC, SST-2), Matthews correlation >= 0.1
(CoLA; a constant prediction scores 0), Pearson >= 0.3 (STS-B; a constant prediction has none).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sweeps import class_shares, parse_sets, run_sweep_folder  # noqa: E402

from colora.config import read_yaml  # noqa: E402

TASKS = {"mrpc": ("MRPC", "eval/accuracy"), "sst2": ("SST-2", "eval/accuracy"), "cola": ("CoLA", "eval/mcc"),
         "stsb": ("STS-B", "eval/pearson")}
FEDAVG = {"algorithm": "fedavg", "clients.num": 10, "clients.per_round": 2, "clients.partition": "iid",
          "train.local_steps": 25}
QUICK = {"model.name": "tiny-bert", "rounds": 2, "train.local_steps": 2, "data.max_train": 400, "data.max_eval": 64,
         "eval.every": 1, "train.warmup_rounds": 1}


def bar(task: str, majority: float | None) -> float:
    """The final metric a seed must reach to count as having left the plateau."""
    return {"cola": 0.1, "stsb": 0.3}.get(task, (majority or 0.0) + 0.03)


def run_task(task: str, sets: dict, seeds: list[int], out: Path, jobs: int, quick: bool):
    base_path = ROOT / "examples" / "glue" / f"{task}.yaml"
    base = read_yaml(base_path, "base config")
    fedavg = {**FEDAVG, **equal_samples(base), **({"rounds": 2, "train.local_steps": 2, "train.warmup_rounds": 1} if quick else {})}
    runs = [{"name": f"{task}-central"}, {"name": f"{task}-fedavg", **fedavg}]
    return run_sweep_folder(base_path, runs, sets, seeds, out / task, jobs), base


def equal_samples(base: dict) -> dict:
    """fedavg rounds that train as many samples as the central run (2 clients x 25 steps a round),
    with the same 10% warm-up (at least one round)."""
    steps = base["rounds"] * base["train"]["local_steps"]
    rounds = steps // (FEDAVG["clients.per_round"] * FEDAVG["train.local_steps"])
    return {"rounds": rounds, "train.warmup_rounds": max(1, rounds // 10)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--glue", required=True, help="a folder holding MRPC, SST-2, CoLA and STS-B (GLUE TSV layout)")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--out", default="runs/seeds")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--quick", action="store_true", help="tiny-bert, 2 rounds: checks the pipeline, not the recipe")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    seeds, out = [int(s) for s in args.seeds.split(",")], Path(args.out)
    rows = []
    for task in args.tasks.split(","):
        folder, metric = TASKS[task]
        sets = {"data.path": str((Path(args.glue) / folder).resolve()), "log.progress": False, "train.precision": "bf16",
                **(QUICK if args.quick else {}), **parse_sets(args.sets)}
        runs, base = run_task(task, sets, seeds, out, args.jobs, args.quick)
        majority = max(class_shares(base, sets)) if metric == "eval/accuracy" else None
        for paradigm in ("central", "fedavg"):
            group = sorted((r for r in runs if r.config["algorithm"] == paradigm), key=lambda r: r.config["seed"])
            finals = [r.summary["final"][metric] for r in group]
            starts = [r.metrics[0][metric] for r in group]
            left = sum(v >= bar(task, majority) for v in finals)
            rows.append((task, paradigm, metric.split("/")[1], starts, finals, left, bar(task, majority)))
    print(f"\n{'task':<6} {'paradigm':<8} {'metric':<9} {'round 0 per seed':>24} {'final per seed':>24} "
          f"{'mean ± std':>16} {'bar':>6} {'left plateau':>13}")
    for task, paradigm, metric, starts, finals, left, need in rows:
        std = statistics.stdev(finals) if len(finals) > 1 else 0.0
        print(f"{task:<6} {paradigm:<8} {metric:<9} {' '.join(f'{v:.3f}' for v in starts):>24} "
              f"{' '.join(f'{v:.3f}' for v in finals):>24} {statistics.fmean(finals):>8.3f} ± {std:.3f} {need:>6.3f} "
              f"{f'{left}/{len(finals)}':>13}")


if __name__ == "__main__":
    main()
