"""Deployed on loopback against simulated: the same runs, side by side (prints a table; not a test).

    python benchmarks/deploy.py --data ../shared/data/glue/MRPC          # fedavg and splitlora, MiniLM-L6
    python benchmarks/deploy.py --quick                                  # tiny model, synthetic data

Each run is ``examples/deploy/mrpc_fedavg.yaml`` (MiniLM-L6 + LoRA r=8, MRPC, 3 IID owners, batches
of 16) shortened to ``--rounds`` rounds of ``--steps`` local steps, as fedavg and as U-shaped
splitlora (``split.layer: 2``, ``split.server: per_client``). Deployed = ``examples/deploy/local.sh``
(a Flower SuperLink with TLS and owner authentication, 3 owner processes, all on 127.0.0.1);
simulated = ``colora run`` of the same config (in-process engine). Both on this machine, one after
the other. Columns:

- wall s/round: mean measured wall time of rounds 1..R, evaluation included (deployed:
  ``round_wall_s``; simulated: differences of ``wall_time_s``); the ratio is the transport's overhead;
- payload MB/round: ``bytes_up + bytes_down`` per round (what the cost model counts: equal in both);
  wire MB/round: what Flower serialized for those messages (``wire_bytes_*``, HTTP/TLS framing not
  counted); the ratio is Flower's framing of colora's payloads;
- peak MB: the server process (``summary.json``'s ``peak_rss_mb``: the ServerApp process when
  deployed) and one owner process (its last log line); simulated, the one process that holds all;
- same metrics: whether every eval metric of every round is equal to 1e-6 between the two.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
LOCAL = ROOT / "examples" / "deploy" / "local.sh"
BASE = ROOT / "examples" / "deploy" / "mrpc_fedavg.yaml"
PARADIGMS = {"fedavg": {}, "splitlora": {"algorithm": "splitlora", "split": {"layer": 2, "server": "per_client", "u_shaped": True}}}
QUICK = {"model": {"name": "tiny-bert"}, "data": {"name": "synthetic", "path": None, "synthetic_train": 240, "synthetic_eval": 64,
                                                  "max_length": 48}, "train": {"batch_size": 8}}


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def colora() -> str:
    here = Path(sys.executable).parent / "colora"
    return str(here) if here.exists() else "colora"


def measure(name: str, raw: dict, work: Path) -> dict:
    config = work / f"{name}.yaml"
    config.write_text(yaml.safe_dump(raw))
    sim, dep = work / f"{name}-sim", work / f"{name}-deployed"
    subprocess.run([colora(), "run", str(config), "--out", str(sim)], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["bash", str(LOCAL), str(config), str(dep), "--clients", str(raw["clients"]["num"])], check=True,
                   stdout=subprocess.DEVNULL, env={**os.environ, "COLORA": colora()})
    s, d = rows(sim), rows(dep)
    walls = [b["wall_time_s"] - a["wall_time_s"] for a, b in zip(s, s[1:])]
    n = len(d) - 1
    owner = (Path(f"{dep}.local") / "owner0.log").read_text()
    peak = re.search(r"peak memory (\d+) MB", owner)
    evals = [k for k in s[0] if k.startswith("eval/")]
    same = all(abs(a[k] - b[k]) <= 1e-6 for a, b in zip(s, d) for k in evals) and len(s) == len(d)
    return {
        "run": name,
        "wall s/round sim": sum(walls) / len(walls),
        "wall s/round deployed": sum(r["round_wall_s"] for r in d[1:]) / n,
        "payload MB/round": (d[-1]["bytes_up"] + d[-1]["bytes_down"]) / n / 1e6,
        "wire MB/round": sum(r["wire_bytes_up"] + r["wire_bytes_down"] for r in d[1:]) / n / 1e6,
        "peak MB sim": json.loads((sim / "summary.json").read_text())["peak_rss_mb"],
        "peak MB server": json.loads((dep / "summary.json").read_text())["peak_rss_mb"],
        "peak MB owner": float(peak.group(1)) if peak else float("nan"),
        "same metrics": same,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", help="a GLUE MRPC folder (train.tsv, dev.tsv); --quick needs none")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="local steps per round (splitlora: one message pair per step)")
    p.add_argument("--quick", action="store_true", help="tiny model on synthetic data (a smoke run)")
    p.add_argument("--out", help="keep the run directories here (default: a temporary folder)")
    args = p.parse_args()
    if not args.quick and not args.data:
        p.error("--data DIR is needed (or --quick)")
    base = merge(yaml.safe_load(BASE.read_text()), {"rounds": args.rounds, "train": {"local_steps": args.steps}, "eval": {"every": 1}})
    base = merge(base, QUICK) if args.quick else merge(base, {"data": {"path": str(Path(args.data).resolve())}})
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="colora-deploy-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    table = [measure(name, merge(base, over), work) for name, over in PARADIGMS.items()]
    cols = list(table[0])
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    widths = [max(len(c), *(len(fmt(r[c])) for r in table)) for c in cols]
    print(" | ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("-|-".join("-" * w for w in widths))
    for r in table:
        print(" | ".join(fmt(r[c]).ljust(w) for c, w in zip(cols, widths)))
    print(f"\nruns in {work}; {args.rounds} rounds x {args.steps} local steps, 3 owners on 127.0.0.1, {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
