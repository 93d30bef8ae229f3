"""Time to target accuracy per paradigm on MRPC, and how the ranking moves with the device profile.

1. Runs (or reuses) the equal-budget sweep of ``examples/time_to_target.yaml`` under its preset
   (edge-weak: 10 GFLOP/s clients on 20 Mbit/s links, a 100 TFLOP/s server) and writes the
   comparison report (plots, HTML, summary.csv) to ``--out``.
2. Prints the time-to-target table: the first evaluation at which dev accuracy >= ``--target``,
   with its round, simulated time and bytes.
3. Re-times every run under the other presets. Training does not depend on the profile (same
   seeds, same batches, same payloads), so the round at which a run reaches the target is the same
   under every profile; only the seconds per round change. Each run is probed for
   ``--probe-rounds`` rounds under each preset, and its time to target there is the measured one
   scaled by (probe seconds per round) / (the sweep's seconds per round over the same rounds).
   Per-round time varies a little with batch lengths; the table says how far the plain
   rounds x seconds-per-round estimate is from the measured time under the sweep's own preset.

    python benchmarks/time_to_target.py --jobs 2            # full size (~1 h on 2 cores)
    python benchmarks/time_to_target.py --out /tmp/t --set model.name=tiny-bert --set data.max_train=160 \\
        --set data.max_eval=64 --set rounds=4 --set train.local_steps=2 --target 0.0   # quick check
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ttt_sweep  # noqa: E402

from colora.config import load_presets  # noqa: E402
from colora.report import load_run, time_to_target, write_report  # noqa: E402


def sim_time_at(run, rnd: int) -> float:
    """Cumulative simulated seconds at the evaluation row of round ``rnd``."""
    rows = [r for r in run.metrics if r["round"] == rnd]
    if not rows:
        raise SystemExit(f"{run.dir}: no metrics row at round {rnd}; pick --probe-rounds as a multiple of eval.every")
    return rows[0]["sim_time_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/ttt", help="sweep folder (shared with benchmarks/split.py)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--target", type=float, default=0.75, help="dev accuracy to reach")
    p.add_argument("--probe-rounds", type=int, default=2)
    p.add_argument("--profiles", nargs="+", default=None, help="presets to re-time under (default: all)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    ttt_sweep.add_data_argument(p)
    args = p.parse_args()
    out, sets = Path(args.out), ttt_sweep.overrides(args)
    sweep = ttt_sweep.run(out, args.jobs, sets)
    metric = "eval/accuracy"
    write_report([d for _, d in sweep], out, target=(metric, args.target))
    base_preset = sweep[0][0].system.preset
    runs = [load_run(d) for _, d in sweep]
    names = [d.name.split("-", 1)[1] for _, d in sweep]
    hits = [time_to_target(r, metric, args.target) for r in runs]

    print(f"\ntime to dev accuracy >= {args.target} under {base_preset} (report: {out / 'index.html'})")
    print(f"{'run':<28}{'final acc':>10}{'round':>7}{'sim s':>11}{'MB moved':>10}{'rounds x s/round':>18}")
    for name, run, hit in zip(names, runs, hits):
        final = run.summary["final"][metric]
        if hit["round"] is None:
            print(f"{name:<28}{final:>10.4f}{'not reached':>28}")
            continue
        per_round = run.summary["sim_time_s"] / run.summary["rounds"]
        print(f"{name:<28}{final:>10.4f}{hit['round']:>7}{hit['sim_time_s']:>11.1f}{hit['bytes'] / 1e6:>10.1f}"
              f"{hit['round'] * per_round:>18.1f}")

    profiles = args.profiles or list(load_presets())
    k = args.probe_rounds
    table = {}
    for preset in profiles:
        if preset == base_preset:
            table[preset] = [h["sim_time_s"] for h in hits]
            continue
        probe = ttt_sweep.sweep_configs({**sets, "system.preset": preset, "rounds": k, "eval.every": k})
        dirs = ttt_sweep.run_all(probe, out / f"probe-{preset}", args.jobs)
        table[preset] = [None if h["sim_time_s"] is None else
                         h["sim_time_s"] * sim_time_at(load_run(d), k) / sim_time_at(r, k)
                         for h, d, r in zip(hits, dirs, runs)]
    print(f"\nsimulated seconds to {args.target} by device preset ({base_preset}: measured; others: re-timed "
          f"from {k}-round probes); rank among the non-central runs in brackets")
    print(f"{'run':<28}" + "".join(f"{p:>24}" for p in profiles))
    ranks = {}
    for preset, times in table.items():
        order = sorted((t, i) for i, t in enumerate(times) if t is not None and not names[i].startswith("central"))
        ranks[preset] = {i: pos + 1 for pos, (_, i) in enumerate(order)}
    for i, name in enumerate(names):
        cells = []
        for preset in profiles:
            t = table[preset][i]
            cells.append("not reached" if t is None else f"{t:,.4g}" + (f" [{ranks[preset][i]}]" if i in ranks[preset] else ""))
        print(f"{name:<28}" + "".join(f"{c:>24}" for c in cells))
    for preset in profiles:
        best = min(ranks[preset], key=ranks[preset].get) if ranks[preset] else None
        print(f"fastest under {preset}: {names[best] if best is not None else '-'}")


if __name__ == "__main__":
    main()
