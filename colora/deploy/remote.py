"""The server's side of a deployed run: the data owners as an executor of client tasks.

The experiment runs unchanged on a deployed server: its engine gets :class:`RemoteClients` instead
of a local executor, and every client task goes to the data owner that holds that client's data, as
the same bytes the simulation moves (colora.messages). A client that does not answer within
``federation.round_timeout_s`` (killed, disconnected, too slow) or answers with something that is
not a result for its task is a dropout: it sends no update that round (a failed
:class:`~colora.types.ClientResult`, which validation drops and counts), and the round goes on with
the others unless fewer than ``federation.min_clients`` answered.

The transport is anything with ``exchange(list of (client, bytes), timeout) -> {client: bytes}``
(colora.deploy.flower_app's Flower grid in deployment); nothing here imports model code or Flower.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Protocol

import torch
from tqdm import tqdm

from ..algorithms.declora import ChocoJob, MixJob
from ..config import ColoraError, Config
from ..messages import MessageError, decode, decode_result, encode, encode_task, header
from ..types import ClientResult, ClientTask, SecureSum
from ..validation import malformed
from .pki import verify_join
from .wire import LOSS_SCALE

# Settings that may differ between parties: where each party's data lies, how its own machine
# computes and logs, and what only the server uses (how long it runs and waits, what it evaluates).
# Everything else must be equal on the server and every owner (config_fingerprint).
LOCAL_KEYS = {"data": ("path",), "engine": None, "log": None, "eval": None, "rounds": None, "pinned_inputs": None,
              "federation": ("min_clients", "round_timeout_s")}


class Transport(Protocol):
    def broadcast(self, nodes: list[int], blob: bytes, timeout: float) -> dict[int, bytes]:
        """``blob`` to every node (before client ids are known); the answers by node."""

    def bind(self, client: int, node: int) -> None:
        """Client ``client``'s owner is ``node`` (from its answer to the join)."""

    def exchange(self, messages: list[tuple[int, bytes]], timeout: float) -> dict[int, bytes]:
        """Send each (client, bytes) to that client's owner; the replies that arrived within
        ``timeout`` seconds, by client (a client missing from the answer did not reply)."""

    def wire_bytes(self) -> tuple[int, int]:
        """Bytes the transport carried so far, (up, down), counted from its serialized messages."""


def config_fingerprint(cfg: Config) -> str:
    """A hash of every setting that must be equal on all parties (all but :data:`LOCAL_KEYS`)."""
    dump = cfg.model_dump(mode="json")
    for section, keys in LOCAL_KEYS.items():
        if keys is None:
            dump.pop(section, None)
        else:
            for k in keys:
                dump.get(section, {}).pop(k, None)
    return hashlib.sha256(json.dumps(dump, sort_keys=True).encode()).hexdigest()[:16]


def join_message(cfg: Config, nonce: str = "") -> bytes:
    """What the server sends every data owner first: the config's fingerprint and a fresh challenge."""
    return encode("join", {"fingerprint": config_fingerprint(cfg), "nonce": nonce}, {})


def joined_message(client: int, samples: int, fingerprint: str, signature: str = "") -> bytes:
    """An owner's answer to :func:`join_message`: its client id, training rows, config fingerprint and
    the challenge signed with its key (colora.deploy.pki.sign_join)."""
    return encode("joined", {"client": client, "samples": samples, "fingerprint": fingerprint, "signature": signature}, {})


def wrap(kind: str, blob: bytes, **scalars) -> bytes:
    """Raw bytes (a split message) inside a colora message of ``kind``."""
    return encode(kind, scalars, {"blob/": {"bytes": torch.frombuffer(bytearray(blob), dtype=torch.uint8)}})


def unwrap_blob(groups: dict) -> bytes:
    return groups["blob/"]["bytes"].numpy().tobytes()


def encode_mix(job: MixJob) -> bytes:
    """A Dec-LoRA node's gossip step as the server relays it: the node's own state and its
    neighbours' (as the node would decode them), with W's weights or the robust rule."""
    tensors = {f"s{j}/": st for j, st in job.states.items()}
    tensors |= {f"p{j}/": st for j, st in (job.previous or {}).items()}
    return encode("mix", {"node": job.node, "weights": {str(j): w for j, w in job.weights.items()}, "rule": job.rule,
                          "neighbourhood": job.order, "has_previous": job.previous is not None}, tensors)


MISSING_COPY = "missing public copy"  # an owner's refusal when the CHOCO copy a job relies on is not the one it holds


def encode_choco(job: ChocoJob) -> bytes:
    """A Dec-LoRA node's CHOCO phase as the server relays it (its state, the public copies it holds,
    and in the mix phase the messages of itself and its neighbours)."""
    tensors = {"state/": job.state, **{f"pub{j}/": p for j, p in job.public.items()}}
    tensors |= {f"q{j}/": {"bytes": torch.frombuffer(bytearray(b), dtype=torch.uint8)} for j, b in job.blobs.items()}
    return encode("choco", {"node": job.node, "phase": job.phase, "round": job.round, "gamma": job.gamma,
                            "weights": [[j, w] for j, w in job.weights]}, tensors)


def decode_choco(blob: bytes) -> ChocoJob:
    scalars, groups = decode(blob, "choco")
    public = {int(p[3:-1]): st for p, st in groups.items() if p.startswith("pub")}
    blobs = {int(p[1:-1]): unwrap_blob({"blob/": g}) for p, g in groups.items() if p.startswith("q")}
    return ChocoJob(int(scalars["node"]), scalars["phase"], groups["state/"], public, int(scalars["round"]), blobs,
                    [(int(j), float(w)) for j, w in scalars["weights"]], float(scalars["gamma"]))


def decode_mix(blob: bytes) -> MixJob:
    scalars, groups = decode(blob, "mix")
    states = {int(p[1:-1]): st for p, st in groups.items() if p.startswith("s")}
    previous = {int(p[1:-1]): st for p, st in groups.items() if p.startswith("p")} if scalars["has_previous"] else None
    return MixJob(int(scalars["node"]), states, {int(j): float(w) for j, w in scalars["weights"].items()}, previous,
                  scalars["rule"], [int(j) for j in scalars["neighbourhood"]])


def refusal(reason: str) -> bytes:
    """An owner's answer when it cannot do what a message asks (the server logs ``reason``)."""
    return encode("refused", {"reason": reason}, {})


def refusal_reason(blob: bytes) -> str | None:
    """The reason of a :func:`refusal`, or None when ``blob`` is some other message."""
    try:
        scalars, _ = decode(blob, "refused")
    except MessageError:
        return None
    return str(scalars.get("reason"))


class RemoteClients:
    """The data owners of a deployed run, reached through ``transport``; see the module docstring.

    ``join_nodes()`` asks every owner for its client id's data size (and checks its config) before
    the engine builds the algorithm; :attr:`executor` then runs each round's tasks remotely. With
    ``owner_keys`` (public keys by client id), an owner takes client K only by signing the join's
    fresh challenge with client K's registered key."""

    restarts = 0  # nothing restarts here: an owner that leaves is a dropout

    def __init__(self, cfg: Config, transport: Transport, owner_keys: list | None = None, log: Callable[[str], None] = tqdm.write):
        self.cfg, self.transport, self.log, self.owner_keys = cfg, transport, log, owner_keys
        self.sizes: list[int] = []
        self.dropouts: list[int] = []  # clients that did not answer in the current round
        self.dropouts_total = 0  # over the run so far (rounds without an eval row write no row of their own)
        self.copies_held: dict[int, dict[int, int]] = {}  # CHOCO: node -> {node j: round of the public copy it holds}
        self._since, self._round_began = (0, 0), time.perf_counter()
        self._secure_rounds = 0

    @property
    def executor(self) -> "RemoteClients":
        return self

    def join_nodes(self, nodes: list[int], timeout: float = 600.0) -> list[int]:
        """Ask every connected owner which client's data it holds (and check its config); binds
        client ids to ``nodes`` and returns the training rows by client id. An owner that is
        missing, refuses or runs another config stops the deployment before training (exit 2)."""
        cfg = self.cfg
        n = cfg.clients.num
        nonce = secrets.token_hex(16)
        answers = self.transport.broadcast(nodes, join_message(cfg, nonce), timeout)
        sizes: dict[int, int] = {}
        for node in nodes:
            if node not in answers:
                continue
            reason = refusal_reason(answers[node])
            if reason is not None:
                raise ColoraError(f"a data owner refused to join: {reason}")
            try:
                scalars, _ = decode(answers[node], "joined")
            except MessageError as exc:
                raise ColoraError(f"a data owner answered the join with something else: {exc}") from None
            k = int(scalars["client"])
            if self.owner_keys is not None and (k >= len(self.owner_keys) or not verify_join(
                    self.owner_keys[k], str(scalars.get("signature", "")), nonce, config_fingerprint(cfg), k)):
                # Flower admits any registered SuperNode; a client id is only taken with that client's own key
                self.log(f"colora: a node claiming client {k} did not sign the join with client {k}'s registered key: ignored")
                continue
            if not 0 <= k < n or k in sizes:
                raise ColoraError(f"a data owner claims client {k}: clients.num={n} and each client id belongs to one owner; "
                                  "give each owner its own data folder")
            sizes[k] = int(scalars["samples"])
            self.transport.bind(k, node)
        missing = sorted(set(range(n)) - set(sizes))
        if missing:
            raise ColoraError(f"no data owner answered for clients {missing} within {timeout:g} s; start them "
                              "(colora deploy client) or raise colora deploy server --join-timeout")
        self.sizes = [sizes[k] for k in range(n)]
        self._since, self._round_began = self.transport.wire_bytes(), time.perf_counter()
        return self.sizes

    def bye(self) -> None:
        """Tell every bound owner the run is over (best effort: an owner gone already is fine)."""
        try:
            self.transport.exchange([(k, encode("bye", {}, {})) for k in range(len(self.sizes))], 30.0)
        except Exception as exc:  # noqa: BLE001 - the run's outcome is decided; a failed goodbye changes nothing
            self.log(f"colora: could not tell every data owner the run is over ({exc})")

    def run_tasks(self, tasks: list[ClientTask]) -> list[ClientResult]:
        """Each task on its owner; a client that does not answer in time gets a failed result."""
        cfg = self.cfg
        began = time.perf_counter()
        answers = self.transport.exchange([(t.client_id, encode_task(t)) for t in tasks], cfg.federation.round_timeout_s)
        out, gone = [], []
        for t in tasks:
            result, why = self._result(t, answers.get(t.client_id))
            if why is not None:
                gone.append(t.client_id)
                self.log(f"colora: client {t.client_id} dropped out of this round: {why}")
                result = ClientResult(t.client_id, {}, self.sizes[t.client_id], float("nan"), 0.0, 0, failed=f"dropped out: {why}")
            out.append(result)
        self.dropouts += [k for k in gone if k not in self.dropouts]
        answered = len(tasks) - len(gone)
        need = cfg.federation.min_clients or 1
        if answered < need:
            raise ColoraError(f"only {answered} of {len(tasks)} clients answered within federation.round_timeout_s="
                              f"{cfg.federation.round_timeout_s:g} s (federation.min_clients={need}, {time.perf_counter() - began:.0f} s); "
                              "the last completed round is checkpointed: restart the owners and resume with colora deploy server --resume")
        return out

    def run_secure(self, tasks: list[ClientTask]) -> SecureSum:
        """A round's tasks under SecAgg+ (colora.deploy.secagg): only the weighted mean of the
        trained states comes back; owners that do not answer are dropouts, as in :meth:`run_tasks`."""
        cfg = self.cfg
        secure = getattr(self.transport, "secure", None)
        if secure is None:
            raise ColoraError("federation.secure_aggregation runs on Flower's runtime (colora deploy server); "
                              "this transport has no SecAgg+")
        weight = [self.sizes[t.client_id] if cfg.federation.weighting == "samples" else 1 for t in tasks]
        self._secure_rounds += 1
        summed = secure([(t.client_id, encode_task(t), w) for t, w in zip(tasks, weight)], self._secure_rounds,
                        cfg.federation.round_timeout_s)
        answered = summed.answered if summed is not None else {}
        gone = [t.client_id for t in tasks if t.client_id not in answered]
        for k in gone:
            self.log(f"colora: client {k} dropped out of this round: its masked update did not enter the sum")
        self.dropouts += [k for k in gone if k not in self.dropouts]
        need = max(2, cfg.federation.min_clients or 1)
        if summed is None or len(answered) < need:
            raise ColoraError(f"secure aggregation got {len(answered)} of {len(tasks)} clients' masked updates (it needs at least "
                              f"{need} and half of the sampled clients to unmask); the last completed round is checkpointed: "
                              "restart the owners and resume with colora deploy server --resume")
        mean, state, at = summed.mean, {}, 0
        for key in sorted(tasks[0].state):  # the owners flatten in sorted key order
            ref = tasks[0].state[key]
            state[key] = torch.from_numpy(mean[at: at + ref.numel()].reshape(ref.shape).copy()).to(ref.dtype)
            at += ref.numel()
        if at + 1 != len(mean):
            raise ColoraError(f"secure aggregation returned {len(mean)} values for an adapter of {at}; the owners run "
                              "another adapter: restart them with this run's config")
        return SecureSum(state, float(mean[-1]) * LOSS_SCALE, sum(self.sizes[k] for k in answered),
                         [float(answered.get(t.client_id, {}).get("flops", 0.0)) for t in tasks],
                         [int(answered.get(t.client_id, {}).get("steps", 0)) for t in tasks], len(answered))

    def _result(self, task: ClientTask, blob: bytes | None) -> tuple[ClientResult | None, str | None]:
        if blob is None:
            return None, f"no answer within federation.round_timeout_s={self.cfg.federation.round_timeout_s:g} s"
        reason = refusal_reason(blob)
        if reason is not None:
            return None, f"its owner refused the task: {reason}"
        try:
            result = decode_result(blob)
        except (MessageError, TypeError) as exc:
            return None, f"its answer is not a result ({exc})"
        if result.client_id != task.client_id:
            return None, f"its answer is client {result.client_id}'s result"
        # what weights the aggregate and advances the client's batch counter must be what was agreed
        if result.num_samples != self.sizes[task.client_id]:
            return None, f"its result claims {result.num_samples} rows, {self.sizes[task.client_id]} when it joined"
        if not result.failed and result.steps != task.steps:
            return None, f"its result took {result.steps} steps, the task asked for {task.steps}"
        if not (isinstance(result.flops, float | int) and math.isfinite(result.flops) and result.flops >= 0):
            return None, f"its result reports {result.flops!r} FLOPs"
        return result, None

    def run_mixes(self, jobs: list) -> list:
        """Dec-LoRA's gossip: each node gets its neighbours' states relayed and mixes its own (the
        server never mixes). A node that does not answer keeps its state unmixed this round.
        Compressed gossip (:class:`ChocoJob`) runs in two phases whose messages every neighbour
        needs, so there a node that does not answer stops the round (exit 2, --resume)."""
        cfg = self.cfg
        if jobs and isinstance(jobs[0], ChocoJob):
            return self._run_choco(jobs)
        answers = self.transport.exchange([(j.node, encode_mix(j)) for j in jobs], cfg.federation.round_timeout_s)
        out = []
        for job in jobs:
            blob, why = answers.get(job.node), None
            if blob is None:
                why = f"no answer within federation.round_timeout_s={cfg.federation.round_timeout_s:g} s"
            elif refusal_reason(blob) is not None:
                why = f"its owner refused: {refusal_reason(blob)}"
            if why is None:
                try:
                    scalars, groups = decode(blob, "mixed")
                    state = groups["state/"]
                    if sorted(state) != sorted(job.states[job.node]):
                        raise MessageError("its keys are not the node's adapter keys")
                    if scalars["node"] != job.node:
                        raise MessageError(f"node {scalars['node']}'s state")
                except (MessageError, KeyError) as exc:
                    why = f"its answer is not a mixed state ({exc})"
            if why is not None:
                self.log(f"colora: node {job.node} did not mix this round ({why}); it keeps its trained state")
                if job.node not in self.dropouts:
                    self.dropouts.append(job.node)
                state = job.states[job.node]
            out.append(state)
        return out

    def _run_choco(self, jobs: list[ChocoJob]) -> list:
        """The CHOCO phases on the nodes. A node keeps the public copies of its neighbourhood between
        rounds, so only copies it lacks at the round's version travel (all of them the first time, a
        new neighbour's on a time-varying graph, everything again after a restart): the wire then
        carries what the protocol counts."""
        timeout = self.cfg.federation.round_timeout_s
        lean = [replace(j, public={i: p for i, p in j.public.items() if self.copies_held.get(j.node, {}).get(i) != j.round - 1})
                for j in jobs]
        answers = self.transport.exchange([(j.node, encode_choco(j)) for j in lean], timeout)
        lost = [j for j in jobs if answers.get(j.node) is not None and (refusal_reason(answers[j.node]) or "").startswith(MISSING_COPY)]
        if lost:  # an owner that restarted lost its copies: send them all
            answers |= self.transport.exchange([(j.node, encode_choco(j)) for j in lost], timeout)
        out = []
        for job in jobs:
            blob = answers.get(job.node)
            why = "no answer within federation.round_timeout_s" if blob is None else refusal_reason(blob)
            if why is None:
                try:
                    if job.phase == "encode":
                        out.append(unwrap_blob(decode(blob, "choco_q")[1]))
                        continue
                    state = decode(blob, "mixed")[1]["state/"]
                    if sorted(state) == sorted(job.state):
                        out.append(state)
                        self.copies_held[job.node] = {i: job.round for i in job.blobs}
                        continue
                    why = "its mixed state has other keys than its adapter"
                except (MessageError, KeyError) as exc:
                    why = f"its answer is not a CHOCO {job.phase} result ({exc})"
            self.copies_held.pop(job.node, None)
            raise ColoraError(f"node {job.node} did not answer its compressed-gossip {job.phase} step ({why}); its neighbours "
                              "need its message: restart its owner and resume with colora deploy server --resume")
        return out

    def round_report(self) -> dict:
        """metrics.jsonl entries of the round just run: dropouts, the bytes the transport carried
        (Flower's serialized messages, beside ``bytes_up``/``bytes_down``: the payloads) and its wall time."""
        up, down = self.transport.wire_bytes()
        now = time.perf_counter()
        self.dropouts_total += len(self.dropouts)
        report = {"dropouts": sorted(self.dropouts), "dropouts_total": self.dropouts_total, "wire_bytes_up": up - self._since[0],
                  "wire_bytes_down": down - self._since[1], "round_wall_s": now - self._round_began}
        self.dropouts = []
        self._since, self._round_began = (up, down), now
        return report

    def converse(self, jobs: list[bytes], serve: Callable[[int, bytes], tuple[bool, bytes]]) -> list[bytes]:
        """Split conversations with the owners, one job after another in job order (the order the
        server part meets them in every engine): the job down, each uplink served, each reply down,
        until the owner's client part sends its result. A job's server part is mid-step while its
        owner computes, so an owner that does not answer stops the round (exit 2; the last completed
        round stays checkpointed for --resume) instead of dropping out."""
        out = []
        for i, job in enumerate(jobs):
            client = int(header(job)["client_id"])
            done, message = self._ask(client, job)
            while not done:
                try:
                    reply = serve(i, message)[1]
                except (ValueError, KeyError, RuntimeError) as exc:  # the server part could not use what came up
                    raise ColoraError(f"client {client}'s split message could not be used ({type(exc).__name__}: {exc}); "
                                      "its owner sends what this config's server part cannot read: check that it runs "
                                      "the server's colora version and config") from None
                done, message = self._ask(client, wrap("split_reply", reply))
            out.append(self._checked_result(client, job, message))
        return out

    def _checked_result(self, client: int, job: bytes, blob: bytes) -> bytes:
        """A split step's result as the trainer may use it: its client state checked against the state
        the job sent (colora.validation.malformed); a malformed one is replaced by the sent state
        (the client's part keeps no update from this step) and logged."""
        _, sent = decode(job, "split_job")
        try:
            scalars, groups = decode(blob, "split_result")
            why = malformed(groups.get("state/") or {}, sent["state/"])
        except (MessageError, KeyError) as exc:
            raise ColoraError(f"client {client}'s owner ended a split step with something else than its result ({exc})") from None
        if why is None:
            return blob
        self.log(f"colora: client {client}'s split update dropped: {why}")
        if client not in self.dropouts:
            self.dropouts.append(client)
        return encode("split_result", scalars, {"state/": sent["state/"], "moments/": groups.get("moments/")})

    def _ask(self, client: int, blob: bytes) -> tuple[bool, bytes]:
        answer = self.transport.exchange([(client, blob)], self.cfg.federation.round_timeout_s).get(client)
        reason = "no answer within federation.round_timeout_s" if answer is None else refusal_reason(answer)
        if reason is not None:
            raise ColoraError(f"client {client}'s owner stopped answering mid-step ({reason}); split learning cannot leave "
                              "a client out mid-step: restart the owner and resume with colora deploy server --resume")
        scalars, groups = decode(answer, "split_client")
        return bool(scalars["done"]), unwrap_blob(groups)

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass
