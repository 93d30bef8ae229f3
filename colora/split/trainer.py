"""The split step on ONE resident model: client forward -> bytes -> server -> bytes -> client backward.

Per job (one client's batch), standard split (labels go to the server):

1. client: embeddings + blocks [0, k) -> activation ``[B, T, H]``; uplink payload = activation
   (``split.activation_dtype``) + attention mask ``[B, T]`` (bool) + labels;
2. server: rebuilds the activation from the bytes (a fresh leaf with ``requires_grad``), runs blocks
   [k, n) + head, loss, backward, optimizer step; downlink payload = gradient ``[B, T, H]``;
3. client: ``torch.autograd.backward(activation, gradient)``, optimizer step.

U-shaped (``split.u_shaped``): the server stops at the last hidden state, which goes down; the client
runs head + loss, sends the hidden state's gradient up, the server back-propagates its blocks and
returns the cut gradient. Labels never leave the client; each party sends two messages per step.

Clients are processed one after another on the resident model. That gives the same numbers as
running their client parts in parallel: a client's forward and backward depend only on its own
adapter and on the server state when the server reaches its batch, which is the job order either
way. The cost model accounts for the parallel schedule.

Dropout noise comes from one stream per client, seeded at ``(seed, client, step)`` when the client
starts its local work (:meth:`SplitTrainer.begin`) and used by its client part and by the server's
pass over its batch, in the order one whole-model forward would use it. That is what makes one
client equal ``central`` and per-client servers equal ``fedavg``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from ..adapters import RankedAdapters
from ..codecs import decode_tensor, encode_tensor, pack, unpack
from ..config import ColoraError, Config, NonFiniteError
from ..train import Encoded, _torch_seed, autocast, batch_indices, to_device
from ..types import AdapterState
from .cut import ModelCut, SplitError
from .types import SplitJob, SplitStepResult


def _unique_numel(modules) -> int:
    seen: dict[int, int] = {}
    for m in modules:
        for p in m.parameters():
            seen[id(p)] = p.numel()  # tied weights (GPT-2's wte / lm_head) count once
    return sum(seen.values())


class SplitTrainer:
    """A :class:`~colora.split.types.SplitRunner` over the engine's one peft model."""

    def __init__(self, model, adapters: RankedAdapters, data: Encoded, parts: list[np.ndarray], cfg: Config):
        self.adapters, self.slots = adapters, adapters.slots[adapters.default_rank]
        self.model, self.data, self.parts, slots = model, data, parts, self.slots
        self.train_cfg, self.seed = cfg.train, cfg.seed
        self.codec, self.shared_server = cfg.split.activation_dtype, cfg.split.server == "shared"
        self.cut = ModelCut(model, cfg.split.layer, cfg.split.u_shaped)
        client_ids = {id(p) for m in self.cut.client_modules for p in m.parameters()}
        server_ids = {id(p) for m in self.cut.server_modules for p in m.parameters()}
        self.client_keys = sorted(k for k, p in slots.params.items() if id(p) in client_ids)
        self.server_keys = sorted(k for k, p in slots.params.items() if id(p) in server_ids)
        stray = set(slots.params) - set(self.client_keys) - set(self.server_keys)
        if stray:
            raise SplitError(f"split: adapter parameters outside both parts, e.g. {sorted(stray)[0]!r} (check model.lora.target_modules)")
        # LoRA layers of the client part: where a client's own-rank adapter is switched in (per module)
        self._client_lora = sorted({k.rsplit(".lora_", 1)[0] for k in self.client_keys if ".lora_" in k})
        self.accounting = {
            "layer": self.cut.layer, "n_layers": self.cut.n_layers, "u_shaped": self.cut.u_shaped,
            "client_params": _unique_numel(self.cut.client_modules),  # base + adapter each client holds
            "client_adapter_params": sum(slots.params[k].numel() for k in self.client_keys),
            "server_adapter_params": sum(slots.params[k].numel() for k in self.server_keys),
        }
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.pending_optimizer_states: dict[str, dict] = {}  # restored on first use after a resume
        self._rng: dict[int, tuple] = {}  # each client's dropout stream: CPU (and CUDA) generator states
        self._flops: dict[tuple, float] = {}

    # -- SplitRunner -------------------------------------------------------------------------

    def begin(self, client_ids: list[int], start_steps: list[int], fresh_optimizers: bool) -> None:
        for k, step in zip(client_ids, start_steps):
            torch.manual_seed(_torch_seed(self.seed, k, step))  # seeds the CUDA generators too
            self._rng[k] = self._rng_state()
            if fresh_optimizers:
                for name in (f"client/{k}", self._server_opt(k)):
                    self.optimizers.pop(name, None)
                    self.pending_optimizer_states.pop(name, None)

    def step(self, jobs: list[SplitJob], server_states: list[AdapterState], lr: float) -> SplitStepResult:
        if len(server_states) != (1 if self.shared_server else len(jobs)):
            raise ValueError(f"{len(server_states)} server states for {len(jobs)} jobs")
        out = SplitStepResult(client_states=[], server_states=[], losses=[], bytes_up=[], bytes_down=[], client_flops=[],
                              server_flops=[], rows=[], messages=2 if self.cut.u_shaped else 1)
        server = server_states[0]
        for i, job in enumerate(jobs):
            if not self.shared_server:
                server = server_states[i]
            client, server, loss, up, down, cf, sf, rows = self._job(job, server, lr)
            out.client_states.append(client)
            if not self.shared_server:
                out.server_states.append(server)
            for field, value in (("losses", loss), ("bytes_up", up), ("bytes_down", down),
                                 ("client_flops", cf), ("server_flops", sf), ("rows", rows)):
                getattr(out, field).append(value)
        if self.shared_server:
            out.server_states.append(server)
        return out

    def state_dict(self) -> dict:
        """Optimizer moments of every client and server copy (for ``--resume``)."""
        return {"optimizers": {**self.pending_optimizer_states, **{k: o.state_dict() for k, o in self.optimizers.items()}}}

    def load_state_dict(self, state: dict) -> None:
        self.pending_optimizer_states = dict(state["optimizers"])

    # -- one client's batch ------------------------------------------------------------------

    def _rng_state(self) -> tuple:
        device = next(self.model.parameters()).device
        return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def _set_rng_state(self, state: tuple) -> None:
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], next(self.model.parameters()).device)

    def _server_opt(self, client_id: int) -> str:
        return "server/shared" if self.shared_server else f"server/{client_id}"

    def _params(self, keys: list[str], rank: int | None = None) -> dict[str, torch.nn.Parameter]:
        """Live tensors of ``keys``: LoRA factors from the rank-``rank`` adapter, the rest (the head)
        always from the default one."""
        own = self.slots.params if rank is None else self.adapters.ensure(rank).params
        return {k: (own if ".lora_" in k else self.slots.params)[k] for k in keys}

    @contextmanager
    def _client_rank(self, rank: int | None) -> Iterator[None]:
        """Run the client part's LoRA layers on the rank-``rank`` adapter (server part: the default)."""
        name = None if rank is None else self.adapters.ensure(rank).adapter
        if name in (None, self.slots.adapter):
            yield
            return
        layers = [self.model.get_submodule(prefix) for prefix in self._client_lora]
        for layer in layers:
            layer.set_adapter(name)
        try:
            yield
        finally:
            for layer in layers:
                layer.set_adapter(self.slots.adapter)

    def _optimizer(self, name: str, live: dict[str, torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
        opt = self.optimizers.get(name)
        params = list(live.values())
        if opt is not None and opt.param_groups[0]["params"][0] is not params[0]:
            opt = None  # built over another rank's tensors
        if opt is None:
            cls = torch.optim.AdamW if self.train_cfg.optimizer == "adamw" else torch.optim.SGD
            opt = self.optimizers[name] = cls(params, lr=lr, weight_decay=self.train_cfg.weight_decay)
            if name in self.pending_optimizer_states:
                opt.load_state_dict(self.pending_optimizer_states.pop(name))
        for group in opt.param_groups:
            group["lr"] = lr
        return opt

    def _load(self, live: dict[str, torch.nn.Parameter], state: AdapterState) -> None:
        if set(state) != set(live):
            raise ColoraError(f"split: adapter state has {len(state)} keys, this part has {len(live)}")
        with torch.no_grad():
            for k, p in live.items():
                if p.shape != state[k].shape:
                    raise ColoraError(f"split: {k} has shape {tuple(state[k].shape)}, the live tensor {tuple(p.shape)}")
                p.copy_(state[k])

    @staticmethod
    def _get(live: dict[str, torch.nn.Parameter]) -> AdapterState:
        return {k: p.detach().to("cpu", copy=True) for k, p in live.items()}  # states travel on the CPU

    @contextmanager
    def _measure(self, chunk: str, shape: tuple) -> Iterator[None]:
        # FLOPs of each piece are counted once per batch shape (FlopCounterMode slows the pass).
        key = (chunk, shape)
        counter = FlopCounterMode(display=False) if key not in self._flops else None
        with counter or nullcontext(), autocast(self.train_cfg.precision, self.model):
            yield
        if counter is not None:
            self._flops[key] = float(counter.get_total_flops())

    def _job(self, job: SplitJob, server_state: AdapterState, lr: float):
        with self._client_rank(job.rank):
            return self._run_job(job, server_state, lr)

    def _run_job(self, job: SplitJob, server_state: AdapterState, lr: float):
        k, cut, codec = job.client_id, self.cut, self.codec
        idx = batch_indices(self.parts[k], self.train_cfg.batch_size, job.step, self.seed, k)
        batch = to_device(self.data.collate(idx), self.model)
        labels = batch.pop("labels")
        mask = batch["attention_mask"]
        device = mask.device  # what crosses the cut is bytes; each side rebuilds it on its device
        shape = (job.rank, *batch["input_ids"].shape)  # client FLOPs depend on its LoRA rank
        client_live, server_live = self._params(self.client_keys, job.rank), self._params(self.server_keys)
        self._load(client_live, job.state)
        self._load(server_live, server_state)
        client_opt = self._optimizer(f"client/{k}", client_live, lr)
        server_opt = self._optimizer(self._server_opt(k), server_live, lr)
        self.model.train()
        if k not in self._rng:
            raise ValueError(f"client {k}: begin() must start its local work before step()")
        self._set_rng_state(self._rng[k])

        with self._measure("client_forward", shape):
            act = cut.client_forward(batch)
        uplink = {**encode_tensor("activation", act, codec), "attention_mask": mask.bool()}
        if not cut.u_shaped:
            uplink["labels"] = labels
        blob = pack(uplink)
        up, down = len(blob), 0
        recv = unpack(blob)  # --- server side from here: only what the bytes carry
        cut_in = decode_tensor("activation", recv).to(device).requires_grad_(True)
        server_mask = recv["attention_mask"].long().to(device)
        if not cut.u_shaped:
            with self._measure("server", shape):
                loss = cut.server_forward(cut_in, server_mask, recv["labels"].to(device))
                loss.backward()
        else:
            with self._measure("server_forward", shape):
                last = cut.server_body(cut_in, server_mask)
            blob = pack(encode_tensor("activation", last, codec))
            down += len(blob)
            head_in = decode_tensor("activation", unpack(blob)).to(device).requires_grad_(True)  # --- client
            with self._measure("client_head", shape):
                loss = cut.head_loss(head_in, mask, labels)
                loss.backward()
            blob = pack(encode_tensor("grad", head_in.grad, codec))
            up += len(blob)
            with self._measure("server_backward", shape):  # --- server
                torch.autograd.backward(last, decode_tensor("grad", unpack(blob)).to(device))
        self._rng[k] = self._rng_state()
        self._finish(server_opt, server_live)
        blob = pack(encode_tensor("grad", cut_in.grad, codec))
        down += len(blob)
        grad = decode_tensor("grad", unpack(blob)).to(device)  # --- client side again
        if act.requires_grad:  # False only when no client parameter trains
            with self._measure("client_backward", shape):
                torch.autograd.backward(act, grad)
        self._finish(client_opt, client_live)

        value = float(loss.detach())
        client, server = self._get(client_live), self._get(server_live)
        if not math.isfinite(value) or any(not torch.isfinite(t).all() for t in (*client.values(), *server.values())):
            raise NonFiniteError(f"client {k}'s split step produced NaN or inf", "train.lr")
        client_chunks = ("client_forward", "client_backward", "client_head")
        server_chunks = ("server", "server_forward", "server_backward")
        cf = sum(self._flops.get((c, shape), 0.0) for c in client_chunks)
        sf = sum(self._flops.get((c, shape), 0.0) for c in server_chunks)
        return client, server, value, up, down, cf, sf, len(idx)

    def _finish(self, opt: torch.optim.Optimizer, live: dict[str, torch.nn.Parameter]) -> None:
        params = list(live.values())
        if self.train_cfg.max_grad_norm is not None:  # each party clips its own gradient
            torch.nn.utils.clip_grad_norm_(params, self.train_cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
