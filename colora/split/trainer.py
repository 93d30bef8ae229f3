"""The split step, driven from the server's side: client parts and the server part talk in bytes.

Per job (one client's batch), standard split (labels go to the server):

1. client part (colora.split.client): embeddings + blocks [0, k) -> activation ``[B, T, H]``; uplink
   payload = activation (``split.activation_dtype``) + attention mask ``[B, T]`` (bool) + labels;
2. server part (colora.split.server): rebuilds the activation from the bytes (a fresh leaf with
   ``requires_grad``), runs blocks [k, n) + head, loss, backward, optimizer step; downlink payload =
   gradient ``[B, T, H]``;
3. client part: ``torch.autograd.backward(activation, gradient)``, optimizer step, result message.

U-shaped (``split.u_shaped``): the server stops at the last hidden state, which goes down; the client
runs head + loss, sends the hidden state's gradient up, the server back-propagates its blocks and
returns the cut gradient. Labels never leave the client; each party sends two messages per step.

Where the client parts run is the engine's choice (``clients.converse``): one after another on the
driver's own model (in-process), or in worker processes, each job's conversation pinned to one
worker while the next jobs' forwards run on the others. The server serves the jobs strictly in
job order, so a shared server adapter meets the clients' batches in the same order on every engine.

Each party draws its dropout from its own generator, seeded per (seed, client, step, party): one
whole-model forward would draw from one stream, so with dropout on, one split client is not
``central`` step for step (with dropout off it is, exactly).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from ..adapters import RankedAdapters
from ..config import Config
from ..messages import bundle, decode, unbundle
from ..types import AdapterState
from .client import job_message
from .cut import ModelCut, SplitError
from .group import ServerGroup
from .parts import part_keys
from .server import SplitServer
from .types import SplitJob, SplitStepResult


class SplitClients(Protocol):
    """Where split clients' parts run (an engine's executor)."""

    def converse(self, jobs: list[bytes], serve: Callable[[int, bytes], tuple[bool, bytes]]) -> list[bytes]:
        """Run each job's conversation with ``serve(job index, message) -> (server part done, reply)``;
        ``serve`` is called for job i only once job i - 1's server part is done. Returns the result
        messages in job order."""


def _unique_numel(modules) -> int:
    seen: dict[int, int] = {}
    for m in modules:
        for p in m.parameters():
            seen[id(p)] = p.numel()  # tied weights (GPT-2's wte / lm_head) count once
    return sum(seen.values())


class SplitTrainer:
    """A :class:`~colora.split.types.SplitRunner`: the server part on the driver's model, the client
    parts wherever ``clients`` runs them."""

    def __init__(self, model, adapters: RankedAdapters, cfg: Config, clients: SplitClients):
        self.clients, self.shared_server, self.fuse = clients, cfg.split.server == "shared", cfg.engine.fuse
        self.cut = ModelCut(model, cfg.split.layer, cfg.split.u_shaped)
        self.server = SplitServer(model, adapters, self.cut, cfg)
        slots = adapters.slots[adapters.default_rank]
        self.client_keys = part_keys(self.cut, adapters, client=True)
        self.server_keys = self.server.keys
        stray = set(slots.params) - set(self.client_keys) - set(self.server_keys)
        if stray:
            raise SplitError(f"split: adapter parameters outside both parts, e.g. {sorted(stray)[0]!r} (check model.lora.target_modules)")
        self.accounting = {
            "layer": self.cut.layer, "n_layers": self.cut.n_layers, "u_shaped": self.cut.u_shaped,
            "client_params": _unique_numel(self.cut.client_modules),  # base + adapter each client holds
            "client_adapter_params": sum(slots.params[k].numel() for k in self.client_keys),
            "server_adapter_params": sum(slots.params[k].numel() for k in self.server_keys),
        }

    def _server_opt(self, client_id: int) -> str:
        return "server/shared" if self.shared_server else f"server/{client_id}"

    def begin(self, client_ids: list[int], fresh_optimizers: bool) -> None:
        if fresh_optimizers:
            self.server.reset([self._server_opt(k) for k in client_ids])

    def step(self, jobs: list[SplitJob], server_states: list[AdapterState], lr: float) -> SplitStepResult:
        if len(server_states) != (1 if self.shared_server else len(jobs)):
            raise ValueError(f"{len(server_states)} server states for {len(jobs)} jobs")
        out = SplitStepResult(client_states=[], client_moments=[], server_states=[], losses=[], bytes_up=[], bytes_down=[],
                              client_flops=[], server_flops=[], rows=[], messages=2 if self.cut.u_shaped else 1)
        up, down = np.zeros(len(jobs), dtype=np.int64), np.zeros(len(jobs), dtype=np.int64)
        # Units of work: one job each, or engine.fuse jobs as one fused group (per-client servers only:
        # a shared server meets the batches one after another by definition).
        fuse = 1 if self.shared_server else self.fuse
        units = [list(range(i, min(i + fuse, len(jobs)))) for i in range(0, len(jobs), fuse)]
        served: dict[int, tuple] = {}
        threaded = [server_states[0]]  # the shared server's state, threaded through the jobs in order
        opened: set[int] = set()
        groups: dict[int, ServerGroup] = {}  # fused units being served

        def serve(u: int, blob: bytes) -> tuple[bool, bytes]:
            unit = units[u]
            if u not in opened:  # the unit's first message: the server meets it now
                opened.add(u)
                if len(unit) > 1:
                    groups[u] = ServerGroup(self.server, [(jobs[i].client_id, jobs[i].step, jobs[i].rank, server_states[i],
                                                            self._server_opt(jobs[i].client_id)) for i in unit], lr)
                else:
                    job = jobs[unit[0]]
                    state = threaded[0] if self.shared_server else server_states[unit[0]]
                    self.server.open(job.client_id, job.step, job.rank, state, self._server_opt(job.client_id), lr)
            if len(unit) > 1:  # bytes per client message, as if each client talked alone
                for i, part in zip(unit, unbundle(blob)):
                    up[i] += len(part)
                done, reply = groups[u].handle(blob)
                for i, part in zip(unit, unbundle(reply)):
                    down[i] += len(part)
                if done:
                    served.update(zip(unit, groups.pop(u).outcomes()))
                return done, reply
            up[unit[0]] += len(blob)
            done, reply = self.server.handle(blob)
            down[unit[0]] += len(reply)
            if done:
                served[unit[0]] = self.server.outcome()
                threaded[0] = served[unit[0]][0]
            return done, reply

        msgs = [job_message(j.client_id, j.step, j.rank, lr, j.state, j.moments) for j in jobs]
        answers = self.clients.converse([msgs[u[0]] if len(u) == 1 else bundle([msgs[i] for i in u]) for u in units], serve)
        results = [blob for unit, answer in zip(units, answers) for blob in ([answer] if len(unit) == 1 else unbundle(answer))]
        for i, blob in enumerate(results):
            scalars, groups = decode(blob, "split_result")
            server_state, server_loss, server_flops = served[i]
            out.client_states.append(groups["state/"])
            out.client_moments.append(groups["moments/"])
            if not self.shared_server:
                out.server_states.append(server_state)
            out.losses.append(scalars["loss"] if scalars["loss"] is not None else server_loss)
            out.client_flops.append(scalars["flops"])
            out.server_flops.append(server_flops)
            out.rows.append(scalars["rows"])
        if self.shared_server:
            out.server_states.append(threaded[0])
        out.bytes_up, out.bytes_down = [int(v) for v in up], [int(v) for v in down]
        return out

    def state_dict(self) -> dict:
        """Optimizer moments of every server copy (for ``--resume``); clients' travel with the algorithm."""
        return self.server.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.server.load_state_dict(state)
