"""Seconds per local training step by numeric precision and base-weight quantization (prints a table).

MiniLM-L6 + LoRA r=8 on query/value, MRPC batches of 16 (``examples/mrpc.yaml``), one client's
steps through colora's own ``LocalTrainer``. Variants: fp32; ``train.precision=bf16`` (autocast);
``model.quantize=int8`` and ``4bit`` (frozen base quantized, compute in fp32). Every variant runs the
same batches twice: the first pass warms up (and fills the per-shape FLOP-count cache, which would
otherwise slow the first step of each new sequence length), the second is timed. Ratios are to
fp32 in the same run; all variants run in this one process, one after the other.

    python benchmarks/precision.py [--steps 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from colora.config import load_config
from colora.engines.inprocess import InProcessEngine
from colora.types import ClientTask

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"fp32": {}, "bf16 autocast": {"train.precision": "bf16"},
            "int8 base": {"model.quantize": "int8"}, "4-bit NF4 base": {"model.quantize": "4bit"}}


def seconds_per_step(overrides: dict, steps: int) -> float:
    """Mean wall time of one step over ``steps`` steps (second pass over the same batches)."""
    sets = {"algorithm": "central", "data.max_train": 16 * steps, "log.progress": False, **overrides}
    sets["data.path"] = str(ROOT.parent / "shared" / "data" / "glue" / "MRPC")
    engine = InProcessEngine(load_config(ROOT / "examples" / "mrpc.yaml", [f"{k}={v}" for k, v in sets.items()]))
    state = engine.slots.get()
    task = ClientTask(0, state, 0, steps, engine.cfg.train.lr)
    engine.trainer([task])  # warm-up pass: allocator, kernels, FLOP counts per batch shape
    start = time.perf_counter()
    engine.trainer([task])
    return (time.perf_counter() - start) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    times = {name: seconds_per_step(sets, args.steps) for name, sets in VARIANTS.items()}
    print(f"\nMiniLM-L6 + LoRA r=8, MRPC batch 16, {args.steps} timed steps, {args.threads} thread(s)")
    print(f"{'variant':<16}{'s / step':>10}{'vs fp32':>10}")
    for name, sec in times.items():
        print(f"{name:<16}{sec:>10.3f}{sec / times['fp32']:>9.2f}x")


if __name__ == "__main__":
    main()
