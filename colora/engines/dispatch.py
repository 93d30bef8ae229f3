"""Client work spread over parallel workers (processes or Ray actors), results in task order.

Both parallel executors send the same framed messages (one kind byte + a colora.messages blob) and
differ only in their transport (:class:`Transport`). A worker that dies (killed, out of memory) is
restarted and its work rerun; since a task carries everything it needs and its generators are
derived from (seed, client, step), the rerun returns the same bytes and the run does not change.
A split conversation cut short is replayed: the new worker's messages are answered from the
transcript of replies the server already sent, so the server part never steps twice.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from typing import Protocol

from tqdm import tqdm

from ..config import ColoraError, NonFiniteError
from ..messages import bundle, decode_result, encode_task, unbundle
from ..types import ClientResult, ClientTask

# Frames: driver -> worker
TASK, FUSED, START, REPLY, ABORT = b"T", b"F", b"S", b"C", b"A"
# worker -> driver
RESULT, RESULTS, MESSAGE, DONE, ERROR = b"R", b"B", b"M", b"D", b"E"


def handle(runtime, frame: bytes) -> bytes:
    """A worker's answer to one frame (run in the worker, by every transport)."""
    kind, body = frame[:1], frame[1:]
    try:
        if kind == TASK:
            return RESULT + runtime.run_task(body)
        if kind == FUSED:  # engine.fuse: a group of tasks trained together (colora.fused)
            return RESULTS + bundle(runtime.run_fused(unbundle(body)))
        if kind == START:
            return MESSAGE + runtime.split.start(body)
        if kind == REPLY:
            done, message = runtime.split.reply(body)
            return (DONE if done else MESSAGE) + message
        if kind == ABORT:
            runtime.split.abort()
            return MESSAGE
        raise ValueError(f"unknown frame {kind!r}")
    except Exception as exc:  # noqa: BLE001 - every failure goes back to the driver as one message
        if runtime.split is not None:
            runtime.split.abort()
        info = {"type": type(exc).__name__, "message": str(exc), "setting": getattr(exc, "setting", None),
                "colora": isinstance(exc, ColoraError)}
        return ERROR + json.dumps(info).encode()


def raise_error(body: bytes) -> None:
    info = json.loads(body)
    if info["setting"] is not None:
        raise NonFiniteError(info["message"], info["setting"])
    if info["colora"]:
        raise ColoraError(info["message"])
    raise RuntimeError(f"a worker failed: {info['type']}: {info['message']}")


class Transport(Protocol):
    size: int

    def send(self, worker: int, frame: bytes) -> None:
        """Hand ``frame`` to ``worker`` (returns at once)."""

    def wait(self, workers: list[int]) -> list[tuple[int, bytes | None]]:
        """Block until some of ``workers`` answered: (worker, answer), or (worker, None) if it died."""

    def restart(self, worker: int) -> str:
        """Replace a dead worker; returns how it died, for the log."""


class Dispatcher:
    """Runs tasks and split conversations over a :class:`Transport` (see the module docstring)."""

    def __init__(self, transport: Transport, name: str, fuse: int = 1):
        self.transport, self.name, self.fuse = transport, name, fuse
        self.restarts = 0

    def _died(self, worker: int, what: str) -> None:
        how = self.transport.restart(worker)
        self.restarts += 1
        tqdm.write(f"colora: {self.name} worker {worker} {how} while running {what}; restarted it and reran that work")

    def run_tasks(self, tasks: list[ClientTask]) -> list[ClientResult]:
        # A unit of work: one task, or engine.fuse tasks trained together in one worker.
        units = [list(range(i, min(i + self.fuse, len(tasks)))) for i in range(0, len(tasks), self.fuse)]
        blobs = [encode_task(t) for t in tasks]
        frames = [TASK + blobs[u[0]] if len(u) == 1 else FUSED + bundle([blobs[i] for i in u]) for u in units]
        results: list[ClientResult | None] = [None] * len(tasks)
        todo, busy = deque(range(len(units))), {}
        while todo or busy:
            for w in range(self.transport.size):
                if w not in busy and todo:
                    busy[w] = todo.popleft()
                    self.transport.send(w, frames[busy[w]])
            for w, answer in self.transport.wait(list(busy)):
                u = busy.pop(w)
                if answer is None:
                    self._died(w, f"client {', '.join(str(tasks[i].client_id) for i in units[u])}'s task")
                    todo.appendleft(u)
                elif answer[:1] == ERROR:
                    self._drain(busy)
                    raise_error(answer[1:])
                else:
                    out = [answer[1:]] if answer[:1] == RESULT else unbundle(answer[1:])
                    for i, blob in zip(units[u], out):
                        results[i] = decode_result(blob)
        return results

    def _drain(self, busy: dict) -> None:
        """Wait out the other workers' work before raising (their answers would confuse the next call)."""
        while busy:
            for w, _ in self.transport.wait(list(busy)):
                busy.pop(w)

    def converse(self, jobs: list[bytes], serve: Callable[[int, bytes], tuple[bool, bytes]]) -> list[bytes]:
        """Split conversations: each job pinned to one worker, at most one job per worker; the server
        serves job i's messages only once job i - 1's server part has finished."""
        results: list[bytes | None] = [None] * len(jobs)
        transcript: list[list[bytes]] = [[] for _ in jobs]  # replies the server sent, per job
        heard = [0] * len(jobs)  # messages received in the job's current attempt
        inbox: dict[int, bytes] = {}  # job -> its message waiting for the server
        busy: dict[int, int] = {}  # worker -> job
        owed: set[int] = set()  # workers computing (the rest of busy wait for a reply)
        todo, current = deque(range(len(jobs))), 0  # current: the job the server serves now

        def send(w: int, frame: bytes) -> None:
            owed.add(w)
            self.transport.send(w, frame)

        while todo or busy:
            for w in range(self.transport.size):
                if w not in busy and todo:
                    busy[w] = todo.popleft()
                    heard[busy[w]] = 0
                    send(w, START + jobs[busy[w]])
            while current in inbox:  # serve the current job as far as its messages go
                i = current
                done, reply = serve(i, inbox.pop(i))
                transcript[i].append(reply)
                send(next(w for w, j in busy.items() if j == i), REPLY + reply)
                current += done
            for w, answer in self.transport.wait(sorted(owed)):
                owed.discard(w)
                i = busy[w]
                if answer is None:
                    busy.pop(w)
                    inbox.pop(i, None)
                    self._died(w, f"job {i} of a split step")
                    todo.appendleft(i)
                elif answer[:1] == ERROR:
                    busy.pop(w)
                    self._abort(busy, owed)
                    raise_error(answer[1:])
                elif answer[:1] == DONE:
                    busy.pop(w)
                    results[i] = answer[1:]
                else:
                    heard[i] += 1
                    if heard[i] <= len(transcript[i]):  # a rerun: the server answered this message before
                        send(w, REPLY + transcript[i][heard[i] - 1])
                    else:
                        inbox[i] = answer[1:]
        return results

    def _abort(self, busy: dict[int, int], owed: set[int]) -> None:
        """After a failure: let the other workers answer, then drop their conversations."""
        for w in busy:
            if w in owed:
                self.transport.wait([w])
            self.transport.send(w, ABORT)
            self.transport.wait([w])
        busy.clear()


class PoolExecutor(ABC):
    """What the parallel executors share: a :class:`Dispatcher` made on first use (``dispatcher``,
    supplied by the subclass), restarts counted across it, and the executor calls routed to it."""

    _dispatch: Dispatcher | None = None
    _restarts = 0  # of dispatchers already closed

    @property
    @abstractmethod
    def dispatcher(self) -> Dispatcher:
        """The subclass's dispatcher, started on first use."""

    @property
    def restarts(self) -> int:
        return self._restarts + (self._dispatch.restarts if self._dispatch is not None else 0)

    def run_tasks(self, tasks: list[ClientTask]) -> list[ClientResult]:
        return self.dispatcher.run_tasks(tasks)

    def converse(self, jobs: list[bytes], serve: Callable[[int, bytes], tuple[bool, bytes]]) -> list[bytes]:
        return self.dispatcher.converse(jobs, serve)

    def _close_dispatch(self) -> None:
        if self._dispatch is not None:
            self._dispatch.transport.close()
            self._restarts += self._dispatch.restarts
            self._dispatch = None
