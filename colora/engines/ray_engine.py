"""``engine.kind: ray``: client work in Ray actors, on a local Ray instance or an existing cluster.

``engine.workers`` actors (one CPU each, spread over the cluster's nodes) each build the model on the
``meta`` device and take the frozen base weights from Ray's object store: the driver puts them once
(numpy arrays, deduplicated where weights are tied), and each node holds one copy that its actors
read without copying (Ray hands out read-only zero-copy views of shared memory; nothing writes the
frozen base, colora.adapters.RankedAdapters.merge_base included). Frames are the same bytes as
the ``workers`` engine's (colora.engines.dispatch), passed as ``bytes`` arguments and return
values. An actor that dies is replaced and its work rerun.

``engine.address``: null starts a local Ray instance for the run (stopped at the end); ``auto``, a
``host:port`` or ``ray://host:port`` joins a running cluster, whose nodes need colora installed and
the run's data at the same path.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import warnings

import torch

from ..config import ColoraError, Config
from .dispatch import Dispatcher, PoolExecutor, handle
from .workers import build_runtime, worker_init

# How long actors may take to start. When the cluster has fewer CPUs than actors, the rest can start
# only if an autoscaler adds nodes: 300 s, then one line. When the CPUs are there, a start is slow only
# because the machine is busy (each actor imports torch and maps the base, and Ray runs its workers at
# nice 15, so any process at normal priority starves them): wait six times longer.
_START_TIMEOUT_S = 300.0
_SLOW_START_FACTOR = 6


def require_ray():
    """The ``ray`` module, or a one-line ColoraError naming the extra to install."""
    if importlib.util.find_spec("ray") is None:
        raise ColoraError("engine.kind=ray needs Ray: pip install 'colora[ray]' (or use engine.kind=workers)")
    import ray

    return ray


class _Actor:
    """One Ray actor: a client runtime answering frames (see colora.engines.dispatch)."""

    def __init__(self, init: bytes, base: dict):
        with warnings.catch_warnings():  # zero-copy views of the object store are read-only, by design
            warnings.simplefilter("ignore", UserWarning)
            tensors = {name: torch.from_numpy(arr) for name, arr in base["tensors"].items()}
        tensors.update({alias: tensors[name] for alias, name in base["aliases"].items()})
        self.runtime = build_runtime(json.loads(init), tensors)

    def ping(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def handle(self, frame: bytes) -> bytes:
        return handle(self.runtime, frame)


def _numpy_base(tensors: dict[str, torch.Tensor]) -> dict:
    """The base tensors as numpy arrays for ``ray.put``, each storage once (tied names as aliases)."""
    out, aliases, first = {}, {}, {}
    for name, t in tensors.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
            out[name] = t.detach().cpu().numpy()
    return {"tensors": out, "aliases": aliases}


class _Actors:
    """The Ray transport of :class:`~colora.engines.dispatch.Dispatcher`."""

    def __init__(self, ray, size: int, init: bytes, base_ref, device: str):
        self.ray, self.size, self.init, self.base_ref = ray, size, init, base_ref
        # Ray hides GPUs from actors that do not ask for them: with engine.device auto or cuda, the
        # actors share the cluster's GPUs (a fraction each, at most one).
        gpus = float(ray.cluster_resources().get("GPU", 0)) if device != "cpu" else 0.0
        self.remote = ray.remote(num_cpus=1, num_gpus=min(1.0, gpus / size), max_restarts=0,
                                 scheduling_strategy="SPREAD")(_Actor)
        self.actors = [self.remote.remote(init, base_ref) for _ in range(size)]
        self.refs: dict[int, object] = {}
        self.node_ids: list[str] = [""] * size  # the node each actor runs on
        try:
            self._ready(list(range(size)))
        except ColoraError:  # the actors that did start would hold their CPUs for as long as the driver lives
            self.close()
            raise

    def _ready(self, workers: list[int]) -> None:
        cpus = float(self.ray.cluster_resources().get("CPU", 0))
        timeout = _START_TIMEOUT_S * (1 if cpus < self.size else _SLOW_START_FACTOR)
        pings = [self.actors[w].ping.remote() for w in workers]
        done, pending = self.ray.wait(pings, num_returns=len(pings), timeout=timeout)
        if pending:
            raise ColoraError(f"engine.kind=ray: {len(pending)} of {len(pings)} actors did not start within "
                              f"{timeout:.0f} s (each needs 1 CPU; the cluster has {cpus:g} for {self.size}); "
                              "use fewer engine.workers or a larger cluster")
        try:
            for w, node in zip(workers, self.ray.get(pings)):
                self.node_ids[w] = node
        except self.ray.exceptions.RayActorError as exc:
            raise ColoraError(f"engine.kind=ray: an actor failed while starting: {str(exc).splitlines()[0][:300]}") from None

    def send(self, w: int, frame: bytes) -> None:
        self.refs[w] = self.actors[w].handle.remote(frame)

    def wait(self, workers: list[int]) -> list[tuple[int, bytes | None]]:
        refs = {self.refs[w]: w for w in workers}
        ready, _ = self.ray.wait(list(refs), num_returns=1)
        more, _ = self.ray.wait([r for r in refs if r not in ready], num_returns=len(refs) - len(ready), timeout=0)
        out = []
        for ref in [*ready, *more]:
            w = refs[ref]
            self.refs.pop(w)
            try:
                out.append((w, self.ray.get(ref)))
            except self.ray.exceptions.RayActorError:
                out.append((w, None))
        return out

    def restart(self, w: int) -> str:
        self.ray.kill(self.actors[w], no_restart=True)
        self.actors[w] = self.remote.remote(self.init, self.base_ref)
        self._ready([w])
        return "(a Ray actor) died"

    def kill(self, w: int) -> None:
        """Kill one actor's process as a crash would (for tests of the restart path)."""
        self.ray.kill(self.actors[w], no_restart=True)

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor, no_restart=True)
        self.actors = []


def check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """A TCP connection to a ``host:port`` or ``ray://host:port`` address, or a one-line ColoraError
    (``ray.init`` itself retries an unreachable address for minutes)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ColoraError(f"engine.address={address!r}: expected auto, host:port or ray://host:port")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ColoraError(f"engine.address={address!r}: cannot connect to a Ray cluster ({exc.strerror or exc}); start one "
                          "with `ray start --head` or leave engine.address null for a local instance") from None


class RayPool(PoolExecutor):
    """The ``ray`` executor: connects (or starts Ray) and creates its actors on first use."""

    def __init__(self, cfg: Config, engine, split: bool):
        self.ray = require_ray()  # at construction: a missing extra or a dead address is exit 2 before any round
        if cfg.engine.address not in (None, "auto"):
            check_reachable(cfg.engine.address)
        self.cfg, self.engine, self.split = cfg, engine, split
        self._started_ray = False

    def _connect(self) -> None:
        ray, address = self.ray, self.cfg.engine.address
        if ray.is_initialized():
            return
        try:
            if address is None:
                ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
            else:
                ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise ColoraError(f"engine.address={address!r}: cannot connect to a Ray cluster ({first}); start one with "
                              "`ray start --head` or leave engine.address null for a local instance") from None
        self._started_ray = True

    @property
    def dispatcher(self) -> Dispatcher:
        if self._dispatch is None:
            self._connect()
            base_ref = self.ray.put(_numpy_base(self.engine.base_tensors))
            init = worker_init(self.engine, self.split, "")
            self._dispatch = Dispatcher(_Actors(self.ray, self.cfg.engine.workers, init, base_ref, self.cfg.engine.device), "ray",
                                        self.cfg.engine.fuse)
        return self._dispatch

    def start(self) -> None:
        """Ray actors start on first use (creating them waits for their runtimes)."""

    def close(self) -> None:
        self._close_dispatch()
        if self._started_ray:
            self.ray.shutdown()
            self._started_ray = False
