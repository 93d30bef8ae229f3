"""The server part of split learning: blocks [k, n) (and the head and loss unless U-shaped).

It lives in the driver, on the driver's model, and sees only the bytes a client sends: for each
job it rebuilds the activation as a fresh leaf, runs its part, steps its optimizer and answers with
the cut gradient (U-shaped: first the last hidden state, then, on its gradient, the cut gradient).
Its optimizers (one shared, or one per client's server copy) stay here and checkpoint with the
engine. Dropout: a generator of its own per job, seeded at (seed, client, step, server party).
"""

from __future__ import annotations

import math

import torch

from ..adapters import RankedAdapters
from ..codecs import decode_tensor, encode_tensor, pack, unpack
from ..config import ColoraError, Config, NonFiniteError
from ..train import clip_and_step, local_optimizer
from ..types import AdapterState
from .cut import ModelCut
from .parts import SERVER, PartMeter, part_keys, party_seed


class SplitServer:
    """Runs the server part of each job's conversation (see the module docstring)."""

    def __init__(self, model, adapters: RankedAdapters, cut: ModelCut, cfg: Config):
        self.model, self.cut, self.codec = model, cut, cfg.split.activation_dtype
        self.train_cfg, self.seed = cfg.train, cfg.seed
        self.keys = part_keys(cut, adapters, client=False)
        self.live = adapters.live(self.keys)
        self.adapter = adapters.slots[adapters.default_rank].adapter  # the server part runs the run's own rank
        self.meter = PartMeter(cfg.train.precision, model)
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.pending_optimizer_states: dict[str, dict] = {}  # restored on first use after a resume
        self._job = None

    def reset(self, names: list[str]) -> None:
        """Drop these optimizers' moments (a fresh start of the clients that use them)."""
        for name in names:
            self.optimizers.pop(name, None)
            self.pending_optimizer_states.pop(name, None)

    def open(self, client_id: int, step: int, rank: int | None, state: AdapterState, opt_name: str, lr: float) -> None:
        """Start serving one job: load the server state it meets and pick its optimizer."""
        with torch.no_grad():
            for k, p in self.live.items():
                if p.shape != state[k].shape:
                    raise ColoraError(f"split: {k} has shape {tuple(state[k].shape)}, the live tensor {tuple(p.shape)}")
                p.copy_(state[k])
        self._job = {"client": client_id, "step": step, "rank": rank, "opt": self._optimizer(opt_name, lr), "loss": None}

    def handle(self, blob: bytes) -> tuple[bool, bytes]:
        """A client's message in; (job done, reply). Done after the cut gradient is sent."""
        job, cut, device = self._job, self.cut, next(self.model.parameters()).device
        recv = unpack(blob)
        if "grad" in recv or "grad.q" in recv:  # U-shaped: the gradient of the last hidden state came up
            with self.meter.measure("server_backward", job["shape"]):
                torch.autograd.backward(job["last"], decode_tensor("grad", recv).to(device))
            return True, self._finish()
        cut_in = decode_tensor("activation", recv).to(device).requires_grad_(True)
        mask = recv["attention_mask"].long().to(device)
        job["cut_in"], job["shape"] = cut_in, (job["rank"], *mask.shape)
        self.model.train()
        torch.manual_seed(party_seed(self.seed, job["client"], job["step"], SERVER))
        if not cut.u_shaped:
            with self.meter.measure("server", job["shape"]):
                loss = cut.server_forward(cut_in, mask, recv["labels"].to(device))
                loss.backward()
            job["loss"] = float(loss.detach())
            return True, self._finish()
        with self.meter.measure("server_forward", job["shape"]):
            job["last"] = cut.server_body(cut_in, mask)
        return False, pack(encode_tensor("activation", job["last"], self.codec))

    def _finish(self) -> bytes:
        job = self._job
        clip_and_step(self.train_cfg, self.live, job["opt"])
        job["state"] = {k: p.detach().to("cpu", copy=True) for k, p in self.live.items()}
        if (job["loss"] is not None and not math.isfinite(job["loss"])) or any(
                not torch.isfinite(t).all() for t in job["state"].values()):
            raise NonFiniteError(f"the server part of client {job['client']}'s split step produced NaN or inf", "train.lr")
        job["flops"] = self.meter.total(("server", "server_forward", "server_backward"), job["shape"])
        return pack(encode_tensor("grad", job["cut_in"].grad, self.codec))

    def outcome(self) -> tuple[AdapterState, float | None, float]:
        """The finished job's (server state after its step, loss if the server computed it, FLOPs)."""
        job, self._job = self._job, None
        return job["state"], job["loss"], job["flops"]

    def _optimizer(self, name: str, lr: float) -> torch.optim.Optimizer:
        opt = self.optimizers.get(name)
        if opt is None:
            opt = self.optimizers[name] = local_optimizer(self.train_cfg, list(self.live.values()), lr)
            if name in self.pending_optimizer_states:
                opt.load_state_dict(self.pending_optimizer_states.pop(name))
        for group in opt.param_groups:
            group["lr"] = lr
        return opt

    def state_dict(self) -> dict:
        return {"optimizers": {**self.pending_optimizer_states, **{k: o.state_dict() for k, o in self.optimizers.items()}}}

    def load_state_dict(self, state: dict) -> None:
        self.pending_optimizer_states = dict(state["optimizers"])
