"""Peer methods on skewed clients, on paired seeds (prints tables; not timed tests).

    python benchmarks/peers.py --glue ../shared/data/glue --jobs 2                 # every section
    python benchmarks/peers.py --glue DIR --sections sst2 --seeds 0,1 --set rounds=10
    python benchmarks/peers.py --glue DIR --quick                                   # a smoke size
    python benchmarks/peers.py --glue ../shared/data/glue --out benchmarks/results/peers --report-only
                                                      # the recorded runs' tables (benchmarks/record.py)

Base: ``examples/sst2_noniid.yaml`` (MiniLM-L6 + LoRA r=8, 20 Dirichlet(0.5) clients, 10 a round,
30 rounds x 10 local steps, lr 1e-3 with 3 warm-up rounds and linear decay, bf16), every run
holding out the same 10% of each client's data (``eval.client_holdout``, so FedSA-LoRA's personal
models are scored like the rest). Seeds are paired: a seed fixes the partition, the sampled
clients, the batches and the initial adapter for every method (common random numbers), so the
per-seed difference against the baseline is the informative number. Runs go through ``colora compare`` into ``--out``: an interrupted benchmark
resumes where it stopped, ``--jobs`` runs several at once, ``--set KEY=VALUE`` changes every run
(more rounds, another model on a GPU: the same command).

- sst2 (seeds 0-4): fedit (the baseline), fedit with LoRA on the pooler, LoRA-FAIR, SCAFFOLD,
  FFA-LoRA (at the shared lr and at 5x), RoLoRA, FedSA-LoRA, and central LoRA at equal samples (10 x 10 steps a round on the
  pooled data). Reports mean ± std, the paired difference against fedit, the seeds that end
  predicting one class, and the share of fedit's gap to central each method closes. Targets: the best method ends no seed at one class and closes at
  least half the gap.
- ranks (same seeds): mixed ranks 2/4/8 over the clients: zero_pad (the baseline), svd, raFLoRA
  (svd + rank_partitioned), HAFL truncate and HAFL freeze.
- mrpc (seeds 0-2): the same split on MRPC for fedit and the two best methods of the sst2 section.

Each seed of a section is its own sweep folder (``--out``/<section>/seed-<s>), run whole before the
next seed starts, so a benchmark stopped part way has complete paired seeds to report
(``--seeds 0,1`` reports those; the full command later keeps them).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sweeps import class_shares, one_class, parse_sets, run_sweep_folder  # noqa: E402

from colora.config import read_yaml  # noqa: E402
from colora.report import main_metric  # noqa: E402

BASE = ROOT / "examples" / "sst2_noniid.yaml"
METHODS = {
    "fedit": {},
    # not a peer method: fedit with LoRA on MiniLM's untrained pooler (README "Learning at every
    # seed": the frozen pooler held STS-B and CoLA on the plateau); 6,144 more floats each way
    "fedit_pooler": {"model.lora.target_modules": ["query", "value", "pooler.dense"]},
    "lora_fair": {"federation.aggregator": "lora_fair"},
    "scaffold": {"train.correction": "scaffold"},
    "ffa": {"federation.lora_mode": "ffa"},
    "rolora": {"federation.lora_mode": "rolora"},
    "fedsa": {"federation.lora_mode": "fedsa"},
    # FFA-LoRA at its own lr: B alone, against an A frozen at its init (entries within +-1/sqrt(d_in),
    # 0.05 here), moves the product less per step than LoRA, whose A grows as it trains; at the
    # shared 1e-3 FFA never left the majority class at seed 1, at 5e-3 it did (README)
    "ffa_lr5x": {"federation.lora_mode": "ffa", "train.lr": 5e-3},
}
RANKED = {
    "zero_pad": {"federation.aggregator": "zero_pad"},
    "svd": {"federation.aggregator": "svd"},
    "raflora": {"federation.aggregator": "svd", "federation.rank_partitioned": True},
    "hafl_truncate": {"federation.aggregator": "hafl"},
    "hafl_freeze": {"federation.aggregator": "hafl", "federation.hafl_mode": "freeze"},
}
COMMON = {"eval.client_holdout": 0.1, "log.progress": False}
QUICK = {"model.name": "tiny-bert", "rounds": 2, "train.local_steps": 2, "data.max_train": 2000, "data.max_eval": 64,
         "eval.every": 1, "train.precision": "fp32", "clients.num": 6, "clients.per_round": 3}


def central_at_equal_samples(base: dict, sets: dict) -> dict:
    """Central LoRA taking, each round, the steps of all the round's clients together."""
    train, clients = {**base["train"], **{k[6:]: v for k, v in sets.items() if k.startswith("train.")}}, base["clients"]
    per_round = sets.get("clients.per_round", clients["per_round"])
    return {"algorithm": "central", "train.local_steps": per_round * train["local_steps"], "eval.client_holdout": 0.0}


def ranks_for(num: int) -> list[int]:
    return [(2, 4, 8)[k % 3] for k in range(num)]


def section(name: str, methods: dict, sets: dict, seeds: list[int], out: Path, jobs: int, run: bool = True) -> dict[str, list]:
    """Each method's runs, by method name, in seed order. Seed by seed, each seed in its own sweep
    folder (``out/<section>/seed-<s>``): an interrupted benchmark has whole paired seeds done, and a
    later call with more seeds keeps them. ``run=False`` starts nothing: unfinished runs are None."""
    runs = [{"name": method, **over} for method, over in methods.items()]
    by_seed = [run_sweep_folder(BASE, runs, sets, [seed], out / name / f"seed-{seed}", jobs, run) for seed in seeds]
    return {method: [done[i] for done in by_seed] for i, method in enumerate(methods)}


def upload_per_client_round(run) -> str:
    """Bytes a sampled client sends in a round (the run's total over its client-rounds)."""
    per_round = run.config.get("clients", {}).get("per_round", 0)
    rounds = run.summary.get("rounds", 0)
    return f"{run.summary['bytes_up'] / (rounds * per_round):,.0f}" if run.summary.get("bytes_up") and rounds and per_round else "-"


def client_slices(run, metric: str) -> tuple[float | None, float | None]:
    """Mean and worst client on the clients' own held-out slices (eval.client_holdout) at the last
    evaluation: FedSA-LoRA's personal models are scored here, every other method's global model too."""
    name = metric.split("/", 1)[1]
    last = run.metrics[-1]
    return last.get(f"eval_clients/mean_{name}"), last.get(f"eval_clients/min_{name}")


def report(title: str, groups: dict[str, list], baseline: str, shares: list[float], reference: str | None = None) -> list[str]:
    """Print one table over the finished runs (an unfinished one shows as "-" and leaves its seed out
    of every paired number); return the methods (baseline and reference left out) best first by mean."""
    done = [r for g in groups.values() for r in g if r is not None]
    if not done:
        print(f"\n{title}: no finished runs")
        return []
    metric = main_metric(done)
    final = {m: [r.summary["final"][metric] if r is not None else None for r in g] for m, g in groups.items()}
    base, ref = final[baseline], final.get(reference) if reference else None
    mean = lambda xs: statistics.fmean(xs) if xs else None  # noqa: E731
    fmt = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    print(f"\n{title} ({metric}, final; paired differences in points against {baseline}, over the seeds both finished;"
          f" client slices: mean and worst client on their own held-out data)")
    print(f"{'method':<14} {'mean ± std':>16} {'per seed':>36} {'paired diff per seed':>36} {'mean diff':>9} {'one class':>9}"
          f" {'dev loss':>8} {'clients mean':>12} {'worst':>6} {'up B/client-round':>17}" + (f" {'gap closed':>10}" if ref else ""))
    for m, vals in final.items():
        runs = [r for r in groups[m] if r is not None]
        have = [v for v in vals if v is not None]
        diffs = [100 * (v - b) if v is not None and b is not None else None for v, b in zip(vals, base)]
        slices = [client_slices(r, metric) for r in runs]
        std = statistics.stdev(have) if len(have) > 1 else 0.0
        line = (f"{m:<14} {fmt(mean(have), '.4f'):>8} ± {std:.4f} {' '.join(fmt(v, '.3f') for v in vals):>36} "
                f"{' '.join(fmt(d, '+.1f') for d in diffs):>36} {fmt(mean([d for d in diffs if d is not None]), '+.2f'):>9} "
                f"{sum(one_class(v, shares) for v in have):>4}/{len(have)} "
                f"{fmt(mean([r.summary['final']['eval/loss'] for r in runs if 'eval/loss' in r.summary['final']]), '.3f'):>8} "
                f"{fmt(mean([c for c, _ in slices if c is not None]), '.3f'):>12} "
                f"{fmt(min([w for _, w in slices if w is not None], default=None), '.3f'):>6} "
                f"{upload_per_client_round(runs[0]) if runs else '-':>17}")
        if ref:
            # the share of the baseline's gap to the reference a method closes, on the seeds all three finished
            trio = [(v, b, c) for v, b, c in zip(vals, base, ref) if None not in (v, b, c)]
            gap = mean([c for _, _, c in trio]) - mean([b for _, b, _ in trio]) if trio else 0.0
            line += f" {(mean([v for v, _, _ in trio]) - mean([b for _, b, _ in trio])) / gap:>10.2f}" if gap > 0 else f" {'-':>10}"
        print(line)
    ranked = [m for m in final if m not in (baseline, reference) and any(v is not None for v in final[m])]
    return sorted(ranked, key=lambda m: -mean([v for v in final[m] if v is not None]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--glue", required=True, help="a folder holding SST-2 and MRPC (GLUE TSV layout)")
    p.add_argument("--sections", default="sst2,ranks,mrpc")
    p.add_argument("--out", default="runs/peers")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--mrpc-seeds", default="0,1,2")
    p.add_argument("--quick", action="store_true", help="tiny-bert, 2 rounds: checks the pipeline, not the methods")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--report-only", action="store_true",
                   help="start nothing: print the tables of the runs already finished in --out (e.g. benchmarks/results/peers)")
    args = p.parse_args()
    run = not args.report_only
    sections, out, glue = args.sections.split(","), Path(args.out), Path(args.glue).resolve()
    seeds = [int(s) for s in args.seeds.split(",")]
    base = read_yaml(BASE, "base config")
    sets = {**COMMON, "data.path": str(glue / "SST-2"), **(QUICK if args.quick else {}), **parse_sets(args.sets)}
    shares = class_shares(base, sets)
    best = ["lora_fair", "scaffold"]
    if "sst2" in sections:
        methods = {"fedit": METHODS["fedit"], "central": central_at_equal_samples(base, sets), **METHODS}
        ranked = report("SST-2, 20 Dirichlet(0.5) clients, 10 a round", section("sst2", methods, sets, seeds, out, args.jobs, run),
                        "fedit", shares, reference="central")
        best = list(dict.fromkeys(ranked + best))[:2]
    if "ranks" in sections:
        num = sets.get("clients.num", base["clients"]["num"])
        ranked = {**sets, "federation.ranks": ranks_for(num)}
        report("SST-2, mixed ranks 2/4/8", section("ranks", RANKED, ranked, seeds, out, args.jobs, run), "zero_pad", shares)
    if "mrpc" in sections:
        mrpc = {**sets, "data.name": "glue/mrpc", "data.path": str(glue / "MRPC"), "data.max_length": 128}
        methods = {m: METHODS[m] for m in ["fedit", *best]}
        mrpc_seeds = [int(s) for s in args.mrpc_seeds.split(",")]
        report("MRPC, the same split", section("mrpc", methods, mrpc, mrpc_seeds, out, args.jobs, run), "fedit",
               class_shares(base, mrpc))


if __name__ == "__main__":
    main()
