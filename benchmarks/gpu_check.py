"""The engines on a GPU, in one short script (prints a table; for a lent GPU machine).

    python benchmarks/gpu_check.py            # tiny models: every paradigm, cpu vs cuda, 3 engines
    python benchmarks/gpu_check.py --bf16     # the same in bf16 autocast
    python benchmarks/gpu_check.py --fused    # engine.fuse on cuda: fused against sequential

Each row runs one tiny-model case (tests/test_engines.py's) with ``engine.device=cuda`` on the
``inprocess``, ``workers`` (2) and ``ray`` (2) engines and compares the final eval loss with the
same case on the CPU: the engines must agree with each other exactly on the GPU, and with the CPU to
floating-point order (GPU kernels round differently). Exit code 1 if any engine disagrees.
``--fused`` runs tests/test_fused.py's run cases on cuda with engine.fuse 1 and 3 (CUDA draws dropout
with its own kernel; fused passes draw each client's mask with it at the client's shape) and fails
on a difference above 1e-5.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from colora.experiment import run_experiment  # noqa: E402
from tests.conftest import read_rows, tiny_config  # noqa: E402
from tests.test_engines import CASES, SMALL  # noqa: E402
from tests.test_fused import RUN, RUN_CASES  # noqa: E402


def final_loss(case: str, tmp: Path, **over) -> tuple[float, float]:
    began = time.perf_counter()
    run = run_experiment(tiny_config(**SMALL, **CASES[case], **over), out=str(tmp / f"{case}-{len(list(tmp.iterdir()))}"))
    return read_rows(run)[-1]["eval/loss"], time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--fused", action="store_true")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device is visible here")
    precision = {"train__precision": "bf16"} if args.bf16 else {}
    if args.fused:
        sys.exit(fused_check(precision))
    bad = 0
    print("| case | cpu loss | cuda inprocess | cuda workers | cuda ray | engines equal | |cuda - cpu| |")
    print("|---|---:|---:|---:|---:|---|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for case in CASES:
            cpu, _ = final_loss(case, tmp, engine__device="cpu", **precision)
            cuda = [final_loss(case, tmp, engine__device="cuda", engine__kind=kind, engine__workers=2, **precision)[0]
                    for kind in ("inprocess", "workers", "ray")]
            equal = max(cuda) - min(cuda) < 1e-6
            bad += not equal
            print(f"| {case} | {cpu:.6f} | {cuda[0]:.6f} | {cuda[1]:.6f} | {cuda[2]:.6f} | {equal} | {abs(cuda[0] - cpu):.2e} |",
                  flush=True)
    sys.exit(1 if bad else 0)


def fused_check(precision: dict) -> int:
    print("| case | cuda fuse 1 | cuda fuse 3 | |diff| |")
    print("|---|---:|---:|---:|")
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        for case, over in RUN_CASES.items():
            losses = []
            for fuse in (1, 3):
                run = run_experiment(tiny_config(**RUN, **over, engine__device="cuda", engine__fuse=fuse, **precision),
                                     out=str(Path(tmp) / f"{case}-{fuse}"))
                losses.append(read_rows(run)[-1]["eval/loss"])
            bad += abs(losses[0] - losses[1]) > 1e-5
            print(f"| {case} | {losses[0]:.6f} | {losses[1]:.6f} | {abs(losses[0] - losses[1]):.2e} |", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    main()
