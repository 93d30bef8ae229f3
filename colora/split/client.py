"""A split client's part: embeddings + blocks [0, k) (and, U-shaped, the head and the loss).

It holds no state between steps: each step is one conversation that starts with a job message
(client-side adapter, optimizer moments, step, rank, lr) and ends with a result message
(updated adapter and moments, FLOPs, and the loss when the client computes it). In between it
exchanges only blobs with the server part (colora.split.server):

- standard: job -> activation (+ mask + labels) up; cut gradient down -> result;
- U-shaped: job -> activation up; last hidden state down -> its gradient up; cut gradient down -> result.

Dropout noise is the client's own: a generator seeded at (seed, client, step, client party),
saved between the messages of a conversation, so the server part running in the same process in
between (the in-process engine) draws from its own stream and never shifts the client's.

One conversation at a time per model: a client's forward graph points at the live LoRA tensors,
which the next client's state overwrites.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..adapters import RankedAdapters
from ..codecs import decode_tensor, encode_tensor, pack, unpack
from ..config import Config, NonFiniteError
from ..fused import rng_restore, rng_snapshot
from ..messages import decode, encode, is_bundle, load_moments, moments_of, unbundle
from ..train import Encoded, batch_indices, clip_and_step, local_optimizer, to_device
from .cut import ModelCut
from .group import ClientGroup
from .parts import CLIENT, PartMeter, part_keys, party_seed, rank_layers


@dataclass
class _Conversation:
    client_id: int
    act: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor
    live: dict
    opt: torch.optim.Optimizer
    shape: tuple
    rng: tuple
    stack: contextlib.ExitStack
    rows: int
    loss: float | None = None
    head_in: torch.Tensor | None = None


class SplitClient:
    """The client part of split learning on a resident peft model (see the module docstring)."""

    def __init__(self, model, adapters: RankedAdapters, data: Encoded, parts: list[np.ndarray], cfg: Config):
        self.model, self.adapters, self.data, self.parts = model, adapters, data, parts
        self.train_cfg, self.seed, self.codec = cfg.train, cfg.seed, cfg.split.activation_dtype
        self.cut = ModelCut(model, cfg.split.layer, cfg.split.u_shaped)
        self.keys = part_keys(self.cut, adapters, client=True)
        self.meter = PartMeter(cfg.train.precision, model)
        self._now: _Conversation | None = None
        self._group: ClientGroup | None = None

    def start(self, blob: bytes) -> bytes:
        """A job message in; the uplink (activation, mask, and labels unless U-shaped) out. A bundle
        of job messages is a fused group (colora.split.group): a bundle of uplinks comes out."""
        if is_bundle(blob):
            self._group = ClientGroup(self, unbundle(blob))
            return self._group.start()
        scalars, groups = decode(blob, "split_job")
        k, step, rank, lr = scalars["client_id"], scalars["step"], scalars["rank"], scalars["lr"]
        stack = contextlib.ExitStack()
        stack.enter_context(rank_layers(self.model, self.adapters, self.keys, rank))
        live = self.adapters.live(self.keys, rank)
        with torch.no_grad():
            for key, p in live.items():
                p.copy_(groups["state/"][key])
        opt = local_optimizer(self.train_cfg, list(live.values()), lr)
        if groups.get("moments/"):
            load_moments(opt, list(live), groups["moments/"])
        idx = batch_indices(self.parts[k], self.train_cfg.batch_size, step, self.seed, k)
        batch = to_device(self.data.collate(idx), self.model)
        labels, mask = batch.pop("labels"), batch["attention_mask"]
        shape = (rank, *batch["input_ids"].shape)  # client FLOPs depend on its LoRA rank
        self.model.train()
        torch.manual_seed(party_seed(self.seed, k, step, CLIENT))
        with self.meter.measure("client_forward", shape):
            act = self.cut.client_forward(batch)
        self._now = _Conversation(k, act, mask, labels, live, opt, shape, rng_snapshot(mask.device), stack, len(idx))
        uplink = {**encode_tensor("activation", act, self.codec), "attention_mask": mask.bool()}
        if not self.cut.u_shaped:
            uplink["labels"] = labels  # standard split: the labels go to the server
        return pack(uplink)

    def reply(self, blob: bytes) -> tuple[bool, bytes]:
        """The server's message in; (done, next message): the head's gradient up (U-shaped, on the
        last hidden state), or, on the cut gradient, the result message."""
        if self._group is not None:
            done, message = self._group.reply(blob)
            self._group = None if done else self._group
            return done, message
        now = self._now
        if now is None:
            raise ValueError("split client: reply() without a conversation started")
        recv = unpack(blob)
        if "activation" in recv or "activation.q" in recv:  # U-shaped: the last hidden state came down
            rng_restore(now.rng, now.mask.device)
            now.head_in = decode_tensor("activation", recv).to(now.mask.device).requires_grad_(True)
            with self.meter.measure("client_head", now.shape):
                loss = self.cut.head_loss(now.head_in, now.mask, now.labels)
                loss.backward()
            now.loss = float(loss.detach())
            return False, pack(encode_tensor("grad", now.head_in.grad, self.codec))
        grad = decode_tensor("grad", recv).to(now.mask.device)
        if now.act.requires_grad:  # False only when no client parameter trains
            with self.meter.measure("client_backward", now.shape):
                torch.autograd.backward(now.act, grad)
        clip_and_step(self.train_cfg, now.live, now.opt)  # each party clips its own gradient
        state = {k: p.detach().to("cpu", copy=True) for k, p in now.live.items()}
        moments = moments_of(now.opt, list(now.live))
        now.stack.close()
        self._now = None
        if (now.loss is not None and not math.isfinite(now.loss)) or any(not torch.isfinite(t).all() for t in state.values()):
            raise NonFiniteError(f"client {now.client_id}'s split step produced NaN or inf", "train.lr")
        flops = self.meter.total(("client_forward", "client_backward", "client_head"), now.shape)
        scalars = {"client_id": now.client_id, "loss": now.loss, "flops": flops, "rows": now.rows}
        return True, encode("split_result", scalars, {"state/": state, "moments/": moments})

    def abort(self) -> None:
        """Drop a conversation cut short (its peer failed); the model is free again."""
        self._group = None
        if self._now is not None:
            self._now.stack.close()
            self._now = None


def job_message(client_id: int, step: int, rank: int | None, lr: float, state, moments) -> bytes:
    """What a split client receives to start a step."""
    return encode("split_job", {"client_id": client_id, "step": step, "rank": rank, "lr": lr},
                  {"state/": state, "moments/": moments})
