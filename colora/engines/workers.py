"""``engine.kind: workers``: client work in parallel processes on this machine, over ONE copy of the
frozen base weights (colora.engines.shared_base).

Each worker is forked from a clean forkserver process that has imported torch, transformers and
peft (never from the driver: its thread pools do not survive a fork). It builds its model on the
``meta`` device, maps the driver's base file, attaches LoRA from the run's seed, tokenizes the
training data and then answers frames on a pipe (``send_bytes``/``recv_bytes``: raw bytes, nothing
pickled), with cores // workers intra-op threads. Memory per worker: its LoRA adapters, optimizer
state and activations (~500 MB peak for MiniLM-L6 at batch 16 x 128 tokens) and what it allocates
beyond the forkserver's shared imports; the base weights are counted once for the machine.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import multiprocessing.connection as mpc
from pathlib import Path

import numpy as np
import torch

from ..config import ColoraError, Config
from .dispatch import Dispatcher, PoolExecutor, handle

_READY = b"ready"


def worker_init(engine, split: bool, base: str) -> bytes:
    """What every worker needs to build its runtime (JSON: config, partition, ranks)."""
    return json.dumps({"config": engine.cfg.model_dump(mode="json"), "parts": [p.tolist() for p in engine.train_parts],
                       "ranks": sorted(set(engine.ranks)), "num_labels": engine.task.num_labels, "split": split,
                       "base": base, "workers": engine.cfg.engine.workers}).encode()


def build_runtime(init: dict, base_tensors=None):
    """A worker's runtime from :func:`worker_init`'s message (base from the file, or given tensors).

    With ``engine.device`` auto or cuda and several GPUs visible, worker w computes on GPU w mod count."""
    from .runtime import ClientRuntime, set_threads

    set_threads(init["workers"])
    cfg = Config.model_validate(init["config"])
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cfg.engine.device in ("auto", "cuda") and gpus > 1:
        cfg = cfg.model_copy(update={"engine": cfg.engine.model_copy(update={"device": f"cuda:{init.get('index', 0) % gpus}"})})
    parts = [np.asarray(p, dtype=np.int64) for p in init["parts"]]
    return ClientRuntime.from_shared_base(cfg, base_tensors if base_tensors is not None else Path(init["base"]), parts,
                                          init["ranks"], init["num_labels"], init["split"])


def _worker_main(conn: mpc.Connection) -> None:
    runtime = build_runtime(json.loads(conn.recv_bytes()))
    conn.send_bytes(_READY)
    while True:
        try:
            frame = conn.recv_bytes()
        except EOFError:  # the driver went away
            return
        conn.send_bytes(handle(runtime, frame))


class _Processes:
    """The process transport of :class:`~colora.engines.dispatch.Dispatcher`."""

    def __init__(self, size: int, init: bytes):
        self.size, self.init = size, json.loads(init)
        # forkserver: one clean process imports torch, transformers and peft once, and every worker is
        # forked from it, sharing those pages copy-on-write (~400 MB of imports resident once, not per
        # worker); the forkserver itself never runs a thread pool, so forking it is safe.
        self.ctx = mp.get_context("forkserver")
        self.ctx.set_forkserver_preload(["colora.engines.runtime", "colora.engines.workers"])
        self.procs: list = [None] * size
        self.conns: list = [None] * size
        self.started = False
        for w in range(size):
            self._spawn(w)

    def wait_ready(self) -> None:
        """Block until every worker has built its runtime (they start in parallel with the driver)."""
        if not self.started:
            for w in range(self.size):
                self._ready(w)
            self.started = True

    def _spawn(self, w: int) -> None:
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=_worker_main, args=(child,), daemon=True, name=f"colora-worker-{w}")
        proc.start()
        child.close()
        parent.send_bytes(json.dumps({**self.init, "index": w}).encode())
        self.procs[w], self.conns[w] = proc, parent

    def _ready(self, w: int) -> None:
        try:
            answer = self.conns[w].recv_bytes()
        except EOFError:
            self.procs[w].join(5)
            raise ColoraError(f"engine.kind=workers: worker {w} exited while starting (exit code {self.procs[w].exitcode}); "
                              "run with engine.kind=inprocess to see the error") from None
        if answer != _READY:
            raise ColoraError(f"engine.kind=workers: worker {w} answered {answer[:40]!r} while starting")

    def send(self, w: int, frame: bytes) -> None:
        try:
            self.conns[w].send_bytes(frame)
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass  # it died: wait() reports it

    def wait(self, workers: list[int]) -> list[tuple[int, bytes | None]]:
        ready = mpc.wait([self.conns[w] for w in workers])
        out = []
        for w in workers:
            if self.conns[w] in ready:
                try:
                    out.append((w, self.conns[w].recv_bytes()))
                except (EOFError, ConnectionResetError, OSError):
                    out.append((w, None))
        return out

    def restart(self, w: int) -> str:
        self.procs[w].join(5)
        how = f"(pid {self.procs[w].pid}) exited with code {self.procs[w].exitcode}"
        self.conns[w].close()
        self._spawn(w)
        self._ready(w)
        return how

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def close(self) -> None:
        for conn in self.conns:
            if conn is not None:
                conn.close()  # the worker sees EOF and returns
        for proc in self.procs:
            if proc is not None:
                proc.join(10)
                if proc.is_alive():
                    proc.kill()


class WorkerPool(PoolExecutor):
    """The ``workers`` executor: processes start at :meth:`start` (or on first use), stop at :meth:`close`."""

    def __init__(self, cfg: Config, engine, split: bool):
        self.engine, self.split, self.size, self.fuse = engine, split, cfg.engine.workers, cfg.engine.fuse

    def start(self) -> None:
        """Start the workers without waiting for them: they build their runtimes while the driver
        goes on (e.g. with the round-0 evaluation)."""
        if self._dispatch is None:
            init = worker_init(self.engine, self.split, str(self.engine.shared.path))
            self._dispatch = Dispatcher(_Processes(self.size, init), "workers", self.fuse)

    @property
    def dispatcher(self) -> Dispatcher:
        self.start()
        self._dispatch.transport.wait_ready()
        return self._dispatch

    def pids(self) -> list[int]:
        """The worker processes' ids (empty before first use)."""
        return self._dispatch.transport.pids() if self._dispatch is not None else []

    def close(self) -> None:
        self._close_dispatch()
