"""Dec-LoRA benchmarks on MRPC with MiniLM-L6 (prints tables; not timed tests).

    python benchmarks/declora.py                          # every section, the issue's sizes
    python benchmarks/declora.py --section compression    # or topology / quantized
    python benchmarks/declora.py --rounds 2 --max-train 200 --max-eval 64 --local-steps 1   # smoke run

Sections (every run is a normal ``colora run`` in a fresh process, one thread each, ``--jobs`` at
a time; run directories land under ``--out``):

- topology: 10 clients, IID and Dirichlet(0.5): fedavg (all clients every round) vs declora on a
  ring, an Erdos-Renyi graph (p = 0.3) and the complete graph, equal local steps per client and
  round. Dev accuracy/F1, final consensus distance, bytes per round (declora: per-edge traffic,
  sent = received; fedavg: up + down), spectral gap. fedavg weighs clients uniformly by default
  (``--fedavg-weighting``), as declora's doubly stochastic W does. Expected: complete = fedavg
  (metropolis weights on a complete graph are the uniform 1/n), ring within 2 points after
  enough rounds.
- compression: declora ring, IID: full-precision gossip vs CHOCO with 8-bit and 4-bit messages.
  Accuracy and bytes relative to full precision (targets: 8-bit within 0.5 point at <= 30% of
  the bytes, 4-bit within 1 point at <= 16%).
- quantized: declora ring and fedavg, IID, on an fp32 / int8 / 4-bit frozen base: accuracy,
  resident bytes of the base (parameters, buffers and quantization statistics) and the run's
  peak RSS. The fp32 rows are the topology section's IID runs; ``--quant-rounds R`` runs the
  quantized ones for R rounds and reads every run at round R. Needs ``pip install 'colora[quant]'`` (bitsandbytes).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "mrpc.yaml"
DATA = ROOT.parent / "shared" / "data" / "glue" / "MRPC"


def _log(out: Path) -> Path:
    return out.parent / f"{out.name}.log"  # not with_suffix: "t-dir0.5-ring" has a dot


def _argv(out: Path, overrides: dict) -> list[str]:
    if (out / "checkpoint").is_dir():  # interrupted in an earlier invocation: continue it
        return [sys.executable, "-m", "colora", "run", "--resume", str(out)]
    argv = [sys.executable, "-m", "colora", "run", str(CONFIG), "--out", str(out), "--set", "log.progress=false"]
    for key, value in overrides.items():
        argv += ["--set", f"{key}={json.dumps(value) if isinstance(value, list) else value}"]
    return argv


def run_all(jobs: dict[str, tuple[Path, dict]], parallel: int) -> dict[str, dict]:
    """Run every job (``parallel`` at a time, one thread each); per job its summary and last metrics row.

    A job whose run directory already holds a summary.json is not run again; one with a checkpoint
    is resumed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pending, running, done = [], {}, {}
    for name, (out, over) in jobs.items():
        if (out / "summary.json").is_file():  # finished in an earlier invocation with the same --out
            done[name] = _result(out)
        else:
            pending.append((name, (out, over)))
    while pending or running:
        while pending and len(running) < parallel:
            name, (out, over) = pending.pop(0)
            log = open(_log(out), "w")
            running[name] = (subprocess.Popen(_argv(out, over), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log)
        for name, (proc, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            out = jobs[name][0]
            if proc.returncode != 0:
                raise SystemExit(f"run {name} failed (exit {proc.returncode}); see {_log(out)}")
            done[name] = _result(out)
        time.sleep(0.5)
    return {name: done[name] for name in jobs}


def _result(out: Path) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {**json.loads((out / "summary.json").read_text()), "last": rows[-1]}


def _table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [[str(c) for c in r] for r in [header] + rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n[{title}]")
    for j, r in enumerate(cells):
        print("  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            print("  " + "  ".join("-" * w for w in widths))


def _metric(s: dict, name: str) -> str:
    v = s["final"].get(f"eval/{name}")
    return "-" if v is None else f"{100 * v:.2f}"


def _per_round(s: dict, rounds: int) -> str:
    return f"{(s['bytes_up'] + s['bytes_down']) / rounds / 1e6:.3f}" if s["algorithm"] == "fedavg" else \
        f"{s['bytes_up'] / rounds / 1e6:.3f}"


def section_topology(args, common: dict, tmp: Path) -> None:
    jobs = {}
    partitions = {"iid": {"clients.partition": "iid"}, "dir0.5": {"clients.partition": "dirichlet", "clients.alpha": 0.5}}
    for part, extra in ((p, partitions[p]) for p in args.partitions):
        base = {**common, **extra}
        jobs[f"{part}/fedavg"] = (tmp / f"t-{part}-fedavg", {**base, "algorithm": "fedavg",
                                                              "federation.weighting": args.fedavg_weighting})
        for topo, more in (("ring", {}), ("erdos_renyi", {"gossip.p": 0.3}), ("complete", {})):
            jobs[f"{part}/declora-{topo}"] = (tmp / f"t-{part}-{topo}",
                                              {**base, "algorithm": "declora", "gossip.topology": topo, **more})
    res = run_all(jobs, args.jobs)
    rows = []
    for name, s in res.items():
        last = s["last"]
        rows.append([name, _metric(s, "accuracy"), _metric(s, "f1"),
                     f"{last['consensus_distance']:.3g}" if "consensus_distance" in last else "-",
                     f"{last['spectral_gap']:.4f}" if "spectral_gap" in last else "-", _per_round(s, args.rounds)])
    _table(f"topology: {args.clients} clients, {args.rounds} rounds x {args.local_steps} local steps",
           ["run", "acc %", "F1 %", "consensus dist", "gap", "MB/round"], rows)


def section_compression(args, common: dict, tmp: Path) -> None:
    base = {**common, "algorithm": "declora", "gossip.topology": "ring", "clients.partition": "iid"}
    # the same run as the topology section's IID ring: one run directory serves both tables
    jobs = {"full precision": (tmp / "t-iid-ring", base),
            "8-bit CHOCO": (tmp / "c-8bit", {**base, "gossip.quantize_bits": 8, "gossip.gamma": args.gamma}),
            "4-bit CHOCO": (tmp / "c-4bit", {**base, "gossip.quantize_bits": 4, "gossip.gamma": args.gamma})}
    res = run_all(jobs, args.jobs)
    full = res["full precision"]
    rows = []
    for name, s in res.items():
        gap = 100 * (s["final"].get("eval/accuracy", 0) - full["final"].get("eval/accuracy", 0))
        rows.append([name, _metric(s, "accuracy"), f"{gap:+.2f}", f"{s['last']['consensus_distance']:.3g}",
                     _per_round(s, args.rounds), f"{100 * s['bytes_up'] / full['bytes_up']:.1f}"])
    _table(f"compression: declora ring, {args.clients} IID clients, gamma {args.gamma}",
           ["run", "acc %", "vs full (pt)", "consensus dist", "MB/round", "bytes % of full"], rows)


def _resident_mb(model: str, mode: str) -> float:
    from colora.config import build_config
    from colora.models import load_base_model, load_tokenizer
    from colora.quantize import resident_nbytes

    cfg = build_config({"model": {"name": model, "quantize": mode}})
    return resident_nbytes(load_base_model(cfg.model, 2, load_tokenizer(cfg.model))) / 1e6


def _row_at(out: Path, round_: int) -> dict:
    """The metrics row of evaluation round ``round_`` (a run's trajectory up to it does not depend on
    how many rounds follow: the learning rate is constant)."""
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["round"] == round_ and "eval/accuracy" in row:
            return row
    raise SystemExit(f"{out}: no evaluation at round {round_} (eval.every must divide --quant-rounds)")


def section_quantized(args, common: dict, tmp: Path) -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        print("\n[quantized] skipped: bitsandbytes is not installed (pip install 'colora[quant]')")
        return
    rounds = args.quant_rounds or args.rounds
    iid = {**common, "clients.partition": "iid"}
    algos = {"declora-ring": {"algorithm": "declora", "gossip.topology": "ring"},
             "fedavg": {"algorithm": "fedavg", "federation.weighting": args.fedavg_weighting}}
    # the fp32 runs are the topology section's IID runs, read at round `rounds`
    jobs = {f"none/{a}": (tmp / f"t-iid-{a.removeprefix('declora-')}", {**iid, **over}) for a, over in algos.items()}
    for mode in ("int8", "4bit"):
        for a, over in algos.items():
            jobs[f"{mode}/{a}"] = (tmp / f"q-{mode}-{a.removeprefix('declora-')}",
                                   {**iid, **over, "model.quantize": mode, "rounds": rounds})
    res = run_all(jobs, args.jobs)
    resident = {mode: _resident_mb(args.model, mode) for mode in ("none", "int8", "4bit")}
    rows = []
    for name, s in res.items():
        row = _row_at(jobs[name][0], rounds)
        rows.append([name, f"{100 * row['eval/accuracy']:.2f}", f"{100 * row['eval/f1']:.2f}",
                     f"{resident[name.split('/')[0]]:.1f}", f"{s['peak_rss_mb']:.0f}"])
    _table(f"quantized frozen base: {args.model}, {args.clients} IID clients, accuracy after {rounds} rounds",
           ["run", "acc %", "F1 %", "base MB", "peak RSS MB"], rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--section", choices=["all", "topology", "compression", "quantized"], default="all")
    p.add_argument("--data", default=str(DATA), help="GLUE MRPC folder (train.tsv, dev.tsv)")
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--local-steps", type=int, default=10, help="optimizer steps per client per round (all paradigms)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--fedavg-weighting", choices=["uniform", "samples"], default="uniform",
                   help="fedavg's aggregation weights; uniform matches declora's doubly stochastic W (every node counts once)")
    p.add_argument("--gamma", type=float, default=1.0, help="CHOCO consensus step size (gossip.gamma)")
    p.add_argument("--quant-rounds", type=int, default=None,
                   help="rounds of the quantized section's int8/4-bit runs (default --rounds); the fp32 runs are "
                        "the topology section's IID runs, read at that round")
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--max-train", type=int, default=None, help="cap the training set (smoke runs)")
    p.add_argument("--max-eval", type=int, default=None, help="cap the dev set (smoke runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each)")
    p.add_argument("--out", default=None, help="folder for the run directories (default: a temporary folder)")
    p.add_argument("--partitions", nargs="+", choices=["iid", "dir0.5"], default=["iid", "dir0.5"],
                   help="client partitions of the topology section")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every run, e.g. train.client_optimizer=keep")
    args = p.parse_args()
    if not Path(args.data).is_dir():
        raise SystemExit(f"--data {args.data}: no such folder")
    common = {"data.path": args.data, "model.name": args.model, "seed": args.seed, "rounds": args.rounds,
              "clients.num": args.clients, "clients.per_round": args.clients, "train.local_steps": args.local_steps,
              "train.lr": args.lr, "eval.every": min(args.eval_every, args.rounds)}
    common.update(k_v for k_v in (tuple(s.split("=", 1)) for s in args.sets))
    if args.max_train:
        common["data.max_train"] = args.max_train
    if args.max_eval:
        common["data.max_eval"] = args.max_eval
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(args.out) if args.out else Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        for name, fn in (("topology", section_topology), ("compression", section_compression),
                         ("quantized", section_quantized)):
            if args.section in ("all", name):
                fn(args, common, tmp)
        print(f"\n(done in {time.perf_counter() - started:.0f} s; run directories in {tmp})")


if __name__ == "__main__":
    main()
