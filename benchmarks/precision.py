"""Seconds per local training step by numeric precision and base-weight quantization (prints a table).

MiniLM-L6 + LoRA r=8 on query/value, MRPC batches of 16 (``examples/mrpc.yaml``), one client's
steps through colora's own ``LocalTrainer``. Variants: fp32; ``train.precision=bf16`` (autocast);
``model.quantize=int8`` and ``4bit`` (frozen base quantized, compute in fp32). Every variant runs the
same batches in every pass: a first pass warms up (and fills the per-shape FLOP-count cache, which
would otherwise slow the first step of each new sequence length), then ``--repeats`` timed passes,
interleaved across variants so that changes in machine load hit all of them; the fastest pass
counts, and "spread" is how much slower the slowest was. Ratios are to fp32 in the same run.

    python benchmarks/precision.py [--steps 20] [--repeats 3] [--threads 1] [--data GLUE_MRPC_DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from colora.config import load_config
from colora.engines import InProcessEngine
from colora.types import ClientTask

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "glue" / "MRPC"  # examples/mrpc.yaml has data.path: null (the hub)
VARIANTS = {"fp32": {}, "bf16 autocast": {"train.precision": "bf16"},
            "int8 base": {"model.quantize": "int8"}, "4-bit NF4 base": {"model.quantize": "4bit"}}


def trainer_pass(overrides: dict, steps: int, data: str = str(DATA)):
    """A function that runs one client's ``steps`` local steps (the same batches on every call)."""
    sets = {"algorithm": "central", "data.max_train": 16 * steps, "log.progress": False, **overrides}
    sets["data.path"] = data
    engine = InProcessEngine(load_config(ROOT / "examples" / "mrpc.yaml", [f"{k}={v}" for k, v in sets.items()]))
    task = ClientTask(0, engine.slots.get(), 0, steps, engine.cfg.train.lr)
    return lambda: engine.trainer([task])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3, help="timed passes per variant, interleaved; the fastest counts")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data", default=str(DATA), help=f"GLUE MRPC folder with train.tsv and dev.tsv (default: {DATA})")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    passes = {name: trainer_pass(sets, args.steps, args.data) for name, sets in VARIANTS.items()}
    for run in passes.values():
        run()  # warm-up pass: allocator, kernels, FLOP counts per batch shape
    times: dict[str, list[float]] = {name: [] for name in passes}
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits every variant alike
        for name, run in passes.items():
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) / args.steps)
    best = {name: min(t) for name, t in times.items()}
    print(f"\nMiniLM-L6 + LoRA r=8, MRPC batch 16, {args.steps} steps x {args.repeats} interleaved passes "
          f"(fastest), {args.threads} thread(s)")
    print(f"{'variant':<16}{'s / step':>10}{'vs fp32':>10}{'spread':>10}")
    for name, sec in best.items():
        print(f"{name:<16}{sec:>10.3f}{sec / best['fp32']:>9.2f}x{max(times[name]) / sec - 1:>9.0%}")


if __name__ == "__main__":
    main()
