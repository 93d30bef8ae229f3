"""Fused multi-adapter training against one client after another (prints a table; not a timed test).

    python benchmarks/fused.py --data DIR                 # CPU (or the GPU when one is visible)
    python benchmarks/fused.py --data DIR --device cuda   # a GPU machine
    python benchmarks/fused.py --data DIR --quick         # K = 1, 10 only, batch 4 fp32 (a smoke run)
    python benchmarks/fused.py --gemm                     # the bound: 10 base GEMMs against one fused GEMM

DIR is a GLUE MRPC folder (train.tsv, dev.tsv), e.g. ../shared/data/glue/MRPC.

One "round" = K clients (IID MRPC shards of 10), each taking ``--steps`` local AdamW steps from the
seeded adapter with MiniLM-L6 + LoRA r=8 on query/value, either one after another (``run`` per task:
engine.fuse=1) or all K in one fused pass per step (``run_fused``: engine.fuse=K), on the same
resident model, side by side in one process. Settings: batch 16 at max_length 128 and batch 4 at
max_length 64, fp32 and bf16 autocast. Each timing is the best of ``--repeat`` rounds after one
warm-up round (which also fills the FLOP-count cache, so neither mode pays it in the timing).
Peak memory: the resident memory the round adds over the idle process (freed heap returned first
with malloc_trim), sampled every 5 ms from /proc (CPU), or torch.cuda.max_memory_allocated over the
round (GPU). Both modes' trained
states are compared (max abs difference).

``--gemm`` times MiniLM's projection shapes (384 -> 384, 384 -> 1536, 1536 -> 384) for 10 clients' rows
one after another against one GEMM over all of them: how much fusing the frozen base can save at
most on this machine, whatever else a step does.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from colora.config import build_config  # noqa: E402
from colora.engines import Engine  # noqa: E402
from colora.types import ClientTask  # noqa: E402

SETTINGS = [(16, 128), (4, 64)]
_LIBC = ctypes.CDLL("libc.so.6")


class PeakRSS:
    """Peak resident bytes of this process over a ``with`` block, above its level on entry."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> "PeakRSS":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        _LIBC.malloc_trim(0)  # hand freed heap back first, so the floor is what is really in use
        self._base = self._rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss() - self._base)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss() - self._base)


def config(data: str, batch: int, length: int, precision: str, device: str):
    raw = yaml.safe_load((ROOT / "examples" / "mrpc.yaml").read_text())
    return build_config(raw, {"data.path": data, "algorithm": "fedavg", "clients.num": 10, "clients.per_round": 10,
                              "train.batch_size": batch, "data.max_length": length, "train.precision": precision,
                              "engine.device": device, "log.progress": False})


def tasks(engine: Engine, k: int, steps: int) -> list[ClientTask]:
    init = engine.adapters.initial_state(engine.adapters.default_rank)
    return [ClientTask(c, init, start_step=0, steps=steps, lr=5e-4) for c in range(k)]


def timed(fn, repeat: int, device: torch.device) -> tuple[float, int, list]:
    fn()  # warm-up: allocator, kernels, the FLOP counts of these batch shapes
    best, peak, out = float("inf"), 0, None
    for _ in range(repeat):
        with PeakRSS(device) as mem:
            began = time.perf_counter()
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - began)
        peak = max(peak, mem.peak)
    return best, peak, out


def gemm_bound(device: torch.device) -> None:
    print(f"{'rows/client':>11} {'d_in->d_out':>12} | {'10 GEMMs ms':>11} {'1 fused ms':>10} {'ratio':>6}")
    for rows in (256, 2048):  # batch 4 x 64 and batch 16 x 128 tokens
        for d_in, d_out in ((384, 384), (384, 1536), (1536, 384)):  # attention, FFN up, FFN down
            w = torch.randn(d_out, d_in, device=device)
            xs = [torch.randn(rows, d_in, device=device) for _ in range(10)]
            fused = torch.cat(xs)
            times = []
            for fn in (lambda: [x @ w.T for x in xs], lambda: fused @ w.T):
                for _ in range(3):
                    fn()
                best = float("inf")
                for _ in range(5):  # best of 5 x 20 calls: the machine's own speed, not its noise
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    began = time.perf_counter()
                    for _ in range(20):
                        fn()
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    best = min(best, (time.perf_counter() - began) / 20 * 1e3)
                times.append(best)
            print(f"{rows:>11} {f'{d_in}->{d_out}':>12} | {times[0]:>11.2f} {times[1]:>10.2f} {times[0] / times[1]:>5.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="a GLUE MRPC folder (train.tsv, dev.tsv)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--ks", default="1,2,5,10")
    parser.add_argument("--steps", type=int, default=2, help="local steps per client per round")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--quick", action="store_true", help="K = 1, 10; batch 4 fp32 only")
    parser.add_argument("--gemm", action="store_true", help="only the GEMM bound (no data needed)")
    args = parser.parse_args()
    if args.gemm:
        auto = "cuda" if torch.cuda.is_available() else "cpu"
        return gemm_bound(torch.device(auto if args.device == "auto" else args.device))
    if args.data is None:
        parser.error("--data DIR is required (a GLUE MRPC folder), unless --gemm")
    ks = [1, 10] if args.quick else [int(k) for k in args.ks.split(",")]
    settings = [(4, 64)] if args.quick else SETTINGS
    precisions = ["fp32"] if args.quick else args.precisions.split(",")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    header = (f"{'batch x len':>11} {'prec':>5} {'K':>3} | {'seq s/round':>11} {'fused s/round':>13} {'speed-up':>8} | "
              f"{'seq peak MB':>11} {'fused peak MB':>13} | {'max |diff|':>10}")
    print(header)
    print("-" * len(header))
    for batch, length in settings:
        for precision in precisions:
            with Engine(config(args.data, batch, length, precision, args.device)) as engine:
                trainer, device = engine.runtime.trainer, engine.device
                for k in ks:
                    group = tasks(engine, k, args.steps)
                    t_seq, m_seq, seq = timed(lambda: [trainer.run(t) for t in group], args.repeat, device)
                    t_fused, m_fused, fused = timed(lambda: trainer.run_fused(group), args.repeat, device)
                    diff = max((a.state[key] - b.state[key]).abs().max().item() for a, b in zip(seq, fused) for key in a.state)
                    print(f"{batch:>5} x {length:<3} {precision:>5} {k:>3} | {t_seq:>11.2f} {t_fused:>13.2f} "
                          f"{t_seq / t_fused:>7.2f}x | {m_seq / 2**20:>11.0f} {m_fused / 2**20:>13.0f} | {diff:>10.2e}",
                          flush=True)


if __name__ == "__main__":
    main()
