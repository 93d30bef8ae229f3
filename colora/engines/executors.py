"""Executors run the clients' work; the experiment never knows which one it has.

Every executor takes client tasks and split conversations as bytes (colora.messages) and returns
results in task order, so aggregation never depends on which worker finished first.
``inprocess`` is the reference: the same bytes, run one after another on the driver's model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from ..config import Config
from ..messages import decode_result, encode_task
from ..types import ClientResult, ClientTask

if TYPE_CHECKING:
    from .engine import Engine
    from .runtime import ClientRuntime


class Executor(Protocol):
    restarts: int  # workers restarted so far (their work rerun)

    def run_tasks(self, tasks: list[ClientTask]) -> list[ClientResult]:
        """Run independent client tasks; results in task order."""

    def converse(self, jobs: list[bytes], serve: Callable[[int, bytes], tuple[bool, bytes]]) -> list[bytes]:
        """Run split clients' conversations with the server part (colora.split.trainer.SplitClients)."""

    def start(self) -> None:
        """Start any workers now, in the background (else they start on first use)."""

    def close(self) -> None:
        """Stop whatever processes the executor started."""


class LocalExecutor:
    """``engine.kind: inprocess``: every message handled in this process, in order."""

    restarts = 0  # nothing to restart

    def __init__(self, runtime: "ClientRuntime", fuse: int = 1):
        self.runtime, self.fuse = runtime, fuse

    def run_tasks(self, tasks: list[ClientTask]) -> list[ClientResult]:
        if self.fuse == 1:
            return [decode_result(self.runtime.run_task(encode_task(t))) for t in tasks]
        out = []
        for i in range(0, len(tasks), self.fuse):  # groups of engine.fuse clients, in task order
            out += [decode_result(b) for b in self.runtime.run_fused([encode_task(t) for t in tasks[i:i + self.fuse]])]
        return out

    def converse(self, jobs: list[bytes], serve: Callable[[int, bytes], tuple[bool, bytes]]) -> list[bytes]:
        out = []
        client = self.runtime.split
        for i, job in enumerate(jobs):
            message, done = client.start(job), False
            try:
                while not done:
                    done, message = client.reply(serve(i, message)[1])
            except BaseException:
                client.abort()
                raise
            out.append(message)
        return out

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass


def make_executor(cfg: Config, engine: "Engine", split: bool) -> Executor:
    """The executor of ``cfg.engine.kind`` for ``engine`` (workers and actors start on first use)."""
    if cfg.engine.kind == "workers":
        from .workers import WorkerPool

        return WorkerPool(cfg, engine, split)
    if cfg.engine.kind == "ray":
        from .ray_engine import RayPool

        return RayPool(cfg, engine, split)
    return LocalExecutor(engine.runtime, cfg.engine.fuse)
