"""Fused split steps (``engine.fuse`` with ``split.server: per_client``): K clients' parts and K
server copies each run in one batched pass (colora.fused).

A group travels as ONE conversation whose messages are bundles (colora.messages.bundle) of the K
clients' own messages, so every engine carries it as it carries one job, replay included. Inside a
bundle each client's message is exactly what it sends alone: its activation or gradient at its own
width, its mask, its labels (standard split only); bytes are counted per client message, as
sequentially. Each party draws dropout per client from the stream it would use alone, (seed,
client, step, party); FLOPs are those of the client's own sequential pieces (counted once per
shape). ``split.server: shared`` updates one server adapter after every batch, so it stays
sequential by definition.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..codecs import decode_tensor, encode_tensor, pack, unpack
from ..config import NonFiniteError
from ..fused import FusedStep, common_width, concat_batches, fused_layers, fused_step, lora_scaling, pad_width, rng_snapshot
from ..messages import bundle, decode, encode, load_moments, moments_of, unbundle
from ..train import autocast, batch_indices, clip_and_step, local_optimizer, to_device
from .cut import ModelCut
from .parts import CLIENT, SERVER, PartMeter, party_seed, rank_layers


def _leaves(state, keys: list[str], device) -> dict[str, torch.nn.Parameter]:
    return {k: torch.nn.Parameter(state[k].to(device, copy=True)) for k in keys}


def _own(t: torch.Tensor, rows: int, widths: list[int]) -> list[torch.Tensor]:
    """Each client's block of a fused ``K·b x L x ...`` tensor, cut to its own width."""
    return [block[:, :w] for block, w in zip(t.split(rows), widths)]


def _losses(cut: ModelCut, logits: torch.Tensor, labels: list[torch.Tensor], rows: int, widths: list[int]) -> list[torch.Tensor]:
    """Each client's loss from its own rows (and, per token, its own width)."""
    blocks = _own(logits, rows, widths) if logits.ndim == 3 else list(logits.split(rows))
    return [cut.loss(block, y) for block, y in zip(blocks, labels)]


def _count(meter: PartMeter, pieces: list[tuple[str, Callable]], shape: tuple, device) -> None:
    """FLOPs of the sequential pieces of one client's step, counted once per shape on the live
    adapter (values do not matter), drawing nothing from any stream."""
    if all((name, shape) in meter.flops for name, _ in pieces):
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        carry = None
        for name, piece in pieces:
            with meter.measure(name, shape):
                carry = piece(carry)


@dataclass
class _Client:
    client_id: int
    params: dict
    opt: torch.optim.Optimizer
    labels: torch.Tensor
    mask: torch.Tensor
    shape: tuple
    loss: float | None = None


class ClientGroup:
    """The client parts of a fused group, on one resident model (colora.split.client.SplitClient)."""

    def __init__(self, owner, blobs: list[bytes]):
        self.owner, model = owner, owner.model
        device = next(model.parameters()).device
        self.device, self.clients, batches, streams, scaling = device, [], [], [], []
        for blob in blobs:
            scalars, groups = decode(blob, "split_job")
            k, step, rank, lr = scalars["client_id"], scalars["step"], scalars["rank"], scalars["lr"]
            params = _leaves(groups["state/"], owner.keys, device)
            opt = local_optimizer(owner.train_cfg, list(params.values()), lr)
            if groups.get("moments/"):
                load_moments(opt, list(params), groups["moments/"])
            idx = batch_indices(owner.parts[k], owner.train_cfg.batch_size, step, owner.seed, k)
            batch = to_device(owner.data.collate(idx), model)
            labels = batch.pop("labels")
            shape = (rank, *batch["input_ids"].shape)
            self._count(batch, labels, rank, shape)
            self.clients.append(_Client(k, params, opt, labels, batch["attention_mask"], shape))
            batches.append(batch)
            torch.manual_seed(party_seed(owner.seed, k, step, CLIENT))
            streams.append(rng_snapshot(device))
            scaling.append(lora_scaling(model, owner.adapters.ensure(rank or owner.adapters.default_rank).adapter))
        self.widths = [b["input_ids"].shape[1] for b in batches]
        self.rows = owner.train_cfg.batch_size
        self.step = FusedStep([c.params for c in self.clients], self.widths, self.rows, common_width(model, self.widths),
                              streams, scaling, device)
        self.inputs = concat_batches(batches, self.step.width, owner.data.pad_id)
        self.head_in: torch.Tensor | None = None

    def _count(self, batch, labels, rank, shape) -> None:
        owner, cut = self.owner, self.owner.cut
        pieces = [("client_forward", lambda _: cut.client_forward(batch))]
        if cut.u_shaped:
            def head(act):
                hidden = torch.zeros_like(act, requires_grad=True)
                cut.head_loss(hidden, batch["attention_mask"], labels).backward()
                return act
            pieces.append(("client_head", head))
        pieces.append(("client_backward", lambda act: torch.autograd.backward(act, torch.ones_like(act))))
        with rank_layers(owner.model, owner.adapters, owner.keys, rank):
            live = owner.adapters.live(owner.keys, rank)
            owner.model.train()
            _count(owner.meter, pieces, shape, self.device)
            for p in live.values():
                p.grad = None

    @contextlib.contextmanager
    def _fused(self):
        with fused_layers(self.owner.model), fused_step(self.step), autocast(self.owner.train_cfg.precision, self.owner.model):
            yield

    def start(self) -> bytes:
        """Every client's uplink, as one bundle."""
        self.owner.model.train()
        with self._fused():
            self.act = self.owner.cut.client_forward(self.inputs)
        ups = []
        for c, act in zip(self.clients, _own(self.act, self.rows, self.widths)):
            up = {**encode_tensor("activation", act, self.owner.codec), "attention_mask": c.mask.bool()}
            if not self.owner.cut.u_shaped:
                up["labels"] = c.labels
            ups.append(pack(up))
        return bundle(ups)

    def reply(self, blob: bytes) -> tuple[bool, bytes]:
        """The server's bundle in; (done, the next bundle): head gradients (U-shaped) or results."""
        owner, recv = self.owner, [unpack(b) for b in unbundle(blob)]
        if "activation" in recv[0] or "activation.q" in recv[0]:  # U-shaped: the last hidden states came down
            hidden = [decode_tensor("activation", r).to(self.device) for r in recv]
            self.head_in = pad_width(hidden, self.step.width).requires_grad_(True)
            with self._fused():
                logits = owner.cut.family.logits(self.head_in, self.inputs["attention_mask"])
                losses = _losses(owner.cut, logits, [c.labels for c in self.clients], self.rows, self.widths)
            torch.stack(losses).sum().backward()
            for c, loss in zip(self.clients, losses):
                c.loss = float(loss.detach())
            grads = _own(self.head_in.grad, self.rows, self.widths)
            return False, bundle([pack(encode_tensor("grad", g, owner.codec)) for g in grads])
        grad = pad_width([decode_tensor("grad", r).to(self.device) for r in recv], self.step.width)
        if self.act.requires_grad:  # False only when no client parameter trains
            torch.autograd.backward(self.act, grad.to(self.act.dtype))
        results = []
        for c in self.clients:
            clip_and_step(owner.train_cfg, c.params, c.opt)
            state = {k: p.detach().to("cpu", copy=True) for k, p in c.params.items()}
            if (c.loss is not None and not math.isfinite(c.loss)) or any(not torch.isfinite(t).all() for t in state.values()):
                raise NonFiniteError(f"client {c.client_id}'s split step produced NaN or inf", "train.lr")
            flops = owner.meter.total(("client_forward", "client_backward", "client_head"), c.shape)
            scalars = {"client_id": c.client_id, "loss": c.loss, "flops": flops, "rows": len(c.labels)}
            results.append(encode("split_result", scalars, {"state/": state, "moments/": moments_of(c.opt, list(c.params))}))
        return True, bundle(results)


@dataclass
class _Job:
    client_id: int
    step: int
    rank: int | None
    params: dict
    opt: torch.optim.Optimizer
    stored: torch.optim.Optimizer  # the server copy's optimizer kept across steps (its moments)
    shape: tuple = ()
    loss: float | None = None
    state: dict | None = None
    flops: float = 0.0


class ServerGroup:
    """The per-client server copies of a fused group (colora.split.server.SplitServer)."""

    def __init__(self, owner, jobs: list[tuple[int, int, int | None, dict, str]], lr: float):
        self.owner, self.device = owner, next(owner.model.parameters()).device
        self.jobs = []
        for client_id, step, rank, state, opt_name in jobs:
            params = _leaves(state, owner.keys, self.device)
            stored = owner._optimizer(opt_name, lr)
            opt = local_optimizer(owner.train_cfg, list(params.values()), lr)
            opt.load_state_dict(stored.state_dict())
            self.jobs.append(_Job(client_id, step, rank, params, opt, stored))
        self.scaling = lora_scaling(owner.model, owner.adapter)

    def handle(self, blob: bytes) -> tuple[bool, bytes]:
        """The clients' bundle in; (done, the reply bundle)."""
        owner, cut, recv = self.owner, self.owner.cut, [unpack(b) for b in unbundle(blob)]
        if "grad" in recv[0] or "grad.q" in recv[0]:  # U-shaped: the last hidden states' gradients came up
            torch.autograd.backward(self.last, pad_width([decode_tensor("grad", r).to(self.device) for r in recv],
                                                         self.step.width).to(self.last.dtype))
            return True, self._finish()
        acts = [decode_tensor("activation", r).to(self.device) for r in recv]
        masks = [r["attention_mask"].long().to(self.device) for r in recv]
        labels = [r["labels"].to(self.device) for r in recv] if not cut.u_shaped else []
        self.widths, self.rows = [m.shape[1] for m in masks], masks[0].shape[0]
        streams = []
        for i, (job, act, mask) in enumerate(zip(self.jobs, acts, masks)):
            job.shape = (job.rank, *mask.shape)
            self._count(act, mask, labels[i] if labels else None, job.shape)
            torch.manual_seed(party_seed(owner.seed, job.client_id, job.step, SERVER))
            streams.append(rng_snapshot(self.device))
        self.step = FusedStep([j.params for j in self.jobs], self.widths, self.rows, common_width(owner.model, self.widths),
                              streams, [self.scaling] * len(self.jobs), self.device)
        self.cut_in = pad_width(acts, self.step.width).requires_grad_(True)
        mask = torch.cat([torch.nn.functional.pad(m, (0, self.step.width - m.shape[1])) for m in masks])
        owner.model.train()
        with fused_layers(owner.model), fused_step(self.step), autocast(owner.train_cfg.precision, owner.model):
            hidden = cut.server_body(self.cut_in, mask)
            if not cut.u_shaped:
                losses = _losses(cut, cut.family.logits(hidden, mask), labels, self.rows, self.widths)
        if not cut.u_shaped:
            torch.stack(losses).sum().backward()
            for job, loss in zip(self.jobs, losses):
                job.loss = float(loss.detach())
            return True, self._finish()
        self.last = hidden
        return False, bundle([pack(encode_tensor("activation", h, owner.codec)) for h in _own(hidden, self.rows, self.widths)])

    def _count(self, act, mask, labels, shape) -> None:
        owner, cut = self.owner, self.owner.cut
        x = torch.zeros_like(act, requires_grad=True)
        if not cut.u_shaped:
            pieces = [("server", lambda _: cut.server_forward(x, mask, labels).backward())]
        else:
            pieces = [("server_forward", lambda _: cut.server_body(x, mask)),
                      ("server_backward", lambda last: torch.autograd.backward(last, torch.ones_like(last)))]
        owner.model.train()
        _count(owner.meter, pieces, shape, self.device)
        for p in owner.live.values():
            p.grad = None

    def _finish(self) -> bytes:
        owner = self.owner
        for job in self.jobs:
            clip_and_step(owner.train_cfg, job.params, job.opt)
            job.stored.load_state_dict(job.opt.state_dict())  # the copy's moments, kept for its next step
            job.state = {k: p.detach().to("cpu", copy=True) for k, p in job.params.items()}
            if (job.loss is not None and not math.isfinite(job.loss)) or any(not torch.isfinite(t).all() for t in job.state.values()):
                raise NonFiniteError(f"the server part of client {job.client_id}'s split step produced NaN or inf", "train.lr")
            job.flops = owner.meter.total(("server", "server_forward", "server_backward"), job.shape)
        grads = _own(self.cut_in.grad, self.rows, self.widths)
        return bundle([pack(encode_tensor("grad", g, owner.codec)) for g in grads])

    def outcomes(self) -> list[tuple[dict, float | None, float]]:
        """Each finished job's (server state after its step, loss if the server computed it, FLOPs)."""
        return [(j.state, j.loss, j.flops) for j in self.jobs]
