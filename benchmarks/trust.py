"""Attacks, robust rules and differential privacy on SST-2 (prints tables; not timed tests).

    python benchmarks/trust.py --data ../shared/data/glue/SST-2 --jobs 2             # both sections
    python benchmarks/trust.py --data DIR --section attacks                           # or dp
    python benchmarks/trust.py --data DIR --quick                                     # a smoke size

Base: ``examples/sst2_noniid.yaml`` (MiniLM-L6 + LoRA r=8, 20 Dirichlet(0.5) clients, 10 a round,
30 rounds x 10 local steps, lr 1e-3 with 3 warm-up rounds and linear decay, bf16), seeds 0, 1, 2
(``--seeds``; the noise of local DP depends on them, see dp below). Runs go through ``colora
compare`` into ``--out``, each seed its own sweep folder (``--out``/<section>/seed-<s>) run whole
before the next: an interrupted benchmark resumes where it stopped, and ``--jobs`` runs several
at once. ``--report-only`` prints the tables of the finished runs (``--out benchmarks/results/trust``:
the runs recorded in the repository by ``benchmarks/record.py``). ``--set KEY=VALUE`` overrides every run (more
rounds, another model on a GPU, ...).

- attacks: clean fedavg; 20% sign-flip attackers (``clients.byzantine``) against plain fedavg, their
  updates reversed (``flip_scale`` 1) and reversed and boosted 4x; the 4x flip against each robust
  rule (median, trimmed_mean, krum, multi_krum with robust_f = 2, norm_clip); and each robust rule on
  clean data (its cost when nobody attacks). Targets: the best robust rule within 3
  points of clean fedavg while plain fedavg under attack falls by more than 10.
- dp: final accuracy at epsilon 1, 3, 8 (delta 1e-5) and without DP, for client-level DP-FedAvg
  (``privacy.mode: client``, clip 0.5) and record-level DP-SGD (``privacy.mode: local``, clip 1.0):
  the noise multiplier that spends exactly epsilon over the run is found by bisection on the same
  accountant the run reports (for local DP, a client that trains every round, the smallest client).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sweeps import class_shares, one_class, parse_sets, run_sweep_folder  # noqa: E402

from colora.config import build_config, read_yaml  # noqa: E402
from colora.engines import Engine  # noqa: E402
from colora.privacy import epsilon, local_epsilon  # noqa: E402
from colora.report import main_metric  # noqa: E402

BASE = ROOT / "examples" / "sst2_noniid.yaml"
RULES = ["median", "trimmed_mean", "krum", "multi_krum", "norm_clip"]
ATTACK = {"clients.byzantine.fraction": 0.2, "clients.byzantine.attack": "sign_flip"}
# Reversed only, 2 attackers among a round's 10 shrink the mean update to 0.6x the honest one: a smaller
# lr, not an attack (seed 0: -2.6 points). Boosted 4x, (1 - 0.2) / 0.2, they cancel it in expectation.
STRONG = {**ATTACK, "clients.byzantine.flip_scale": 4.0}
ROBUST = {"krum": {"federation.robust_f": 2}, "multi_krum": {"federation.robust_f": 2}, "trimmed_mean": {"federation.trim_fraction": 0.2}}
EPSILONS = [1.0, 3.0, 8.0]
QUICK = {"model.name": "tiny-bert", "rounds": 2, "train.local_steps": 2, "data.max_train": 2000, "data.max_eval": 64,
         "eval.every": 1, "train.precision": "fp32"}


def attack_runs() -> list[dict]:
    """Clean fedavg; plain fedavg under the plain flip (its updates reversed, not boosted); plain fedavg
    and each rule under the flip boosted 4x; each rule on clean data."""
    runs = [{}, dict(ATTACK), dict(STRONG)]
    runs += [{**STRONG, "federation.robust": r, **ROBUST.get(r, {})} for r in RULES]
    runs += [{"federation.robust": r, **ROBUST.get(r, {})} for r in RULES]
    return runs


def noise_for(cfg_of, target: float, spent) -> float:
    """The smallest noise multiplier whose run spends at most ``target`` (bisection on the accountant)."""
    lo, hi = 0.05, 64.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if spent(cfg_of(mid)) > target else (lo, mid)
    return hi


def dp_runs(base: dict, sets: dict, seeds: list[int]) -> list[dict]:
    sizes = []  # every seed's clients (its own partition): DP-SGD's noise must hold for the smallest
    for seed in seeds:
        with Engine(build_config(base, {**sets, "seed": seed})) as engine:
            sizes.append(engine.algorithm.ctx.client_sizes)
    runs = [{}]
    for mode, clip in (("client", 0.5), ("local", 1.0)):
        for eps in EPSILONS:
            def cfg_of(z, mode=mode, clip=clip):
                return build_config(base, {**sets, "privacy.mode": mode, "privacy.clip": clip, "privacy.noise_multiplier": z})
            if mode == "client":
                spent = lambda c: epsilon(c, c.rounds)  # noqa: E731
            else:
                spent = lambda c: max(local_epsilon(c, n, [c.rounds * c.train.local_steps] * len(n)) for n in sizes)  # noqa: E731
            z = round(noise_for(cfg_of, eps, spent) + 1e-4, 4)  # just above: spends a little under epsilon
            runs.append({"privacy.mode": mode, "privacy.clip": clip, "privacy.noise_multiplier": z, "privacy.target_epsilon": eps})
    return runs


def run_section(name: str, runs: list[dict], sets: dict, seeds: list[int], out: Path, jobs: int, run: bool = True) -> list[list]:
    """Each setting's runs in seed order. Seed by seed, each seed its own sweep folder
    (``out/<section>/seed-<s>``), so a benchmark stopped part way has whole paired seeds and a later
    call with more seeds keeps them; ``run=False`` starts nothing (unfinished runs are None)."""
    by_seed = [run_sweep_folder(BASE, runs, sets, [seed], out / name / f"seed-{seed}", jobs, run) for seed in seeds]
    return [[done[i] for done in by_seed] for i in range(len(runs))]


def summarize(runs: list[dict], groups: list[list], shares: list[float]) -> list[tuple]:
    """(setting, mean, std, per-seed finals with None where unfinished, seeds predicting one class) per
    setting, over its finished seeds."""
    metric = main_metric([r for g in groups for r in g if r is not None])
    rows = []
    for over, group in zip(runs, groups):
        finals = [r.summary["final"][metric] if r is not None else None for r in group]
        have = [v for v in finals if v is not None]
        rows.append((describe(over), statistics.fmean(have) if have else float("nan"),
                     statistics.stdev(have) if len(have) > 1 else 0.0, finals, sum(one_class(v, shares) for v in have)))
    return rows


def describe(over: dict) -> str:
    """A setting's short name from its overrides: attack and robust rule, or DP mode, epsilon and noise."""
    if over.get("privacy.mode", "none") != "none":
        return f"{over['privacy.mode']} DP, epsilon {over['privacy.target_epsilon']:g} (noise {over['privacy.noise_multiplier']:g})"
    attack = "clean"
    if over.get("clients.byzantine.fraction"):
        attack = f"{over['clients.byzantine.fraction']:.0%} {over['clients.byzantine.attack']}"
        if over["clients.byzantine.attack"] == "sign_flip":  # flip_scale means nothing to the other attacks
            attack += f" x{over.get('clients.byzantine.flip_scale', 1):g}"
    return f"{attack}, {over.get('federation.robust', 'plain fedavg')}"


def paired(finals: list, reference: list) -> float:
    """The mean difference in points against ``reference``, over the seeds both finished (nan: none):
    a setting missing a seed is compared on the seeds it has, not against another seed's run."""
    diffs = [100 * (v - r) for v, r in zip(finals, reference) if v is not None and r is not None]
    return statistics.fmean(diffs) if diffs else float("nan")


def table(title: str, rows, reference: list | None = None) -> None:
    print(f"\n{title}")
    print(f"{'setting':<60} {'accuracy mean ± std':>20} {'per seed':>26} {'vs first':>9} {'one class':>9}")
    for label, mean, std, finals, majority in rows:
        gap = float("nan") if reference is None else paired(finals, reference)
        delta = "" if reference is None else "-" if gap != gap else f"{gap:+.1f}"
        done = sum(v is not None for v in finals)
        print(f"{label:<60} {mean:>12.4f} ± {std:.4f} {' '.join('-' if v is None else f'{v:.3f}' for v in finals):>26} "
              f"{delta:>9} {majority:>6}/{done}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a GLUE SST-2 folder (train.tsv, dev.tsv)")
    p.add_argument("--section", choices=["attacks", "dp", "all"], default="all")
    p.add_argument("--out", default="runs/trust")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--quick", action="store_true", help="tiny-bert, 2 rounds: checks the pipeline, not the method")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--report-only", action="store_true",
                   help="start nothing: print the tables of the runs already finished in --out (e.g. benchmarks/results/trust)")
    args = p.parse_args()
    run = not args.report_only
    sets = {"data.path": str(Path(args.data).resolve()), "log.progress": False, **(QUICK if args.quick else {}), **parse_sets(args.sets)}
    seeds, out = [int(s) for s in args.seeds.split(",")], Path(args.out)
    base = read_yaml(BASE, "base config")
    shares = class_shares(base, sets)
    if args.section in ("attacks", "all"):
        runs = attack_runs()
        rows = summarize(runs, run_section("attacks", runs, sets, seeds, out, args.jobs, run), shares)
        clean = rows[0][3]
        table(f"attacks: final dev accuracy, 20% sign-flip attackers ({len(seeds)} seeds; means over the finished ones, "
              f"'vs first' over the seeds both finished)", rows, clean)
        weak, plain = paired(rows[1][3], clean), paired(rows[2][3], clean)
        best = max((g for g in (paired(r[3], clean) for r in rows[3:3 + len(RULES)]) if g == g), default=float("nan"))
        print(f"\nplain fedavg under the x4 flip: {plain:+.1f} points against clean fedavg (target: below -10; "
              f"under the x1 flip: {weak:+.1f}); the best robust rule under the x4 flip: {best:+.1f} points (target: within -3)")
    if args.section in ("dp", "all"):
        runs = dp_runs(base, sets, seeds)
        rows = summarize(runs, run_section("dp", runs, sets, seeds, out, args.jobs, run), shares)
        table("differential privacy: final dev accuracy at epsilon (delta 1e-5)", rows, rows[0][3])


if __name__ == "__main__":
    main()
