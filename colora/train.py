"""Tokenized data, the per-client batch stream, the local training loop and evaluation.

Everything here runs on ONE resident model: a client's adapter state is copied into the live LoRA
tensors (``AdapterSlots.load``), trained in place, and copied out again.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers.loss.loss_utils import ForCausalLMLoss, ForSequenceClassificationLoss

from .adapters import AdapterSlots, RankedAdapters
from .config import PrivacyConfig, TrainConfig
from .data import Task, TextDataset
from .fused import FusedStep, common_width, concat_batches, fused_layers, fused_step, lora_scaling, rng_snapshot
from .messages import load_moments, moments_of
from .privacy import per_sample_gradients, private_gradient, sgd_noise_generator
from .states import lora_pairs
from .types import AdapterState, ClientResult, ClientTask

_PAD_MULTIPLE = 8  # pad batches to a multiple of 8 tokens: fewer distinct shapes to FLOP-count


@dataclass
class Encoded:
    """A tokenized split, unpadded; ``collate`` pads a batch to its longest row."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    labels: np.ndarray | None  # seq-cls targets (int64 classes or float32 regression)
    lm_labels: list[list[int]] | None  # causal-lm targets per token, -100 where not scored
    pad_id: int

    def __len__(self) -> int:
        return len(self.input_ids)

    def subset(self, idx) -> "Encoded":
        """The rows ``idx``, in that order (e.g. a client's held-out slice)."""
        pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
        labels = None if self.labels is None else self.labels[np.asarray(idx, dtype=np.int64)]
        return Encoded(pick(self.input_ids), pick(self.token_type_ids), labels, pick(self.lm_labels), self.pad_id)

    def take(self, n: int) -> "Encoded":
        """The first ``n`` rows (e.g. a capped eval set)."""
        cut = lambda xs: None if xs is None else xs[:n]  # noqa: E731
        return Encoded(self.input_ids[:n], cut(self.token_type_ids), cut(self.labels), cut(self.lm_labels), self.pad_id)

    def collate(self, idx) -> dict[str, torch.Tensor]:
        rows = [self.input_ids[i] for i in idx]
        width = -(-max(len(r) for r in rows) // _PAD_MULTIPLE) * _PAD_MULTIPLE
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, : len(r)] = torch.tensor(r)
            mask[j, : len(r)] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if self.token_type_ids is not None:
            tt = torch.zeros_like(ids)
            for j, i in enumerate(idx):
                tt[j, : len(self.token_type_ids[i])] = torch.tensor(self.token_type_ids[i])
            batch["token_type_ids"] = tt
        if self.labels is not None:
            batch["labels"] = torch.as_tensor(self.labels[np.asarray(idx)])
        if self.lm_labels is not None:
            lab = torch.full((len(rows), width), -100, dtype=torch.long)
            for j, i in enumerate(idx):
                lab[j, : len(self.lm_labels[i])] = torch.tensor(self.lm_labels[i])
            batch["labels"] = lab
        return batch


def encode(split: TextDataset, task: Task, tokenizer, max_length: int) -> Encoded:
    """Tokenize a split once; clients later index into it (no per-client copies of the data)."""
    if task.kind == "seq-cls":
        enc = tokenizer(split.text_a, split.text_b, truncation=True, max_length=max_length)
        labels = np.asarray(split.labels, dtype=np.float32 if task.num_labels == 1 else np.int64)
        return Encoded(enc["input_ids"], enc.get("token_type_ids"), labels, None, tokenizer.pad_token_id)
    ids, lm = [], []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for i, a in enumerate(split.text_a):
        if split.text_b is None:  # plain language modelling on the whole text
            prompt, target = [], tokenizer(a)["input_ids"] + eos
        else:  # data-to-text: the loss scores only the target, as in E2E fine-tuning
            prompt = tokenizer(a + " ||")["input_ids"]
            target = tokenizer(" " + split.text_b[i], add_special_tokens=False)["input_ids"] + eos
        row = (prompt + target)[:max_length]
        ids.append(row)
        lm.append(([-100] * len(prompt) + target)[:max_length])
    return Encoded(ids, None, None, lm, tokenizer.pad_token_id)


def to_device(batch: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``batch`` on the model's device (the same tensors when that is the CPU)."""
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}


def autocast(precision: str, model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """The compute context of ``train.precision``: bf16 autocast on the model's device, or nothing.

    Only forward/backward run inside it; LoRA parameters and optimizer states stay fp32.
    """
    device = next(model.parameters()).device.type
    return torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16")


@lru_cache(maxsize=4096)
def _permutation(seed: int, stream: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, stream, epoch]).permutation(n)


def batch_indices(indices: np.ndarray, batch_size: int, step: int, seed: int, stream: int) -> np.ndarray:
    """The ``step``-th batch of a client's data: a pure function of (seed, client, step).

    Each epoch is a fresh seeded permutation; a batch that crosses an epoch boundary continues into
    the next one. Being stateless, it makes resume exact and gives common random numbers: client k's
    j-th step sees the same examples under every algorithm.
    """
    n = len(indices)
    out: list[np.ndarray] = []
    pos, need = step * batch_size, batch_size
    while need:
        epoch, off = divmod(pos, n)
        take = min(need, n - off)
        out.append(_permutation(seed, stream, epoch, n)[off : off + take])
        pos, need = pos + take, need - take
    return indices[np.concatenate(out)]


def _torch_seed(seed: int, client: int, step: int) -> int:
    # Dropout noise depends only on (seed, client, step), like the batches.
    return (seed * 1_000_003 + client * 7_919 + step) % (2**63)


def local_optimizer(cfg: TrainConfig, params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    """``train.optimizer`` over ``params`` (every party's local optimizer: clients, split parts)."""
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.SGD
    return cls(params, lr=lr, weight_decay=cfg.weight_decay)


def clip_and_step(cfg: TrainConfig, params: dict[str, torch.Tensor], opt: torch.optim.Optimizer,
                  correction: AdapterState | None = None) -> None:
    """One optimizer step from the gradients, clipped to ``train.max_grad_norm``; then SCAFFOLD's
    ``correction`` (c - c_k) moves the parameters by -lr (c - c_k).

    The correction acts on the step, not on the gradient: option II measures the control variates as
    (x - y) / (K lr), the mean step direction, which for AdamW is in the optimizer's normalised units
    (~1 a coordinate) while LoRA gradients here are ~1e-5..1e-1; added to the gradient it swamped
    them and AdamW followed the correction alone. For plain SGD (no momentum) both forms are the
    same step, lr (g + c - c_k)."""
    if cfg.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if correction is not None:
        lr = opt.param_groups[0]["lr"]
        with torch.no_grad():
            for k, p in params.items():
                p.add_(correction[k], alpha=-lr)


class Components:
    """HAFL's per-component bookkeeping over one client's local steps (colora/aggregation/hafl.py).

    Scores: AdaLoRA's smoothed sensitivity. Per parameter I = |θ · ∂L/∂θ| after every backward,
    Ī ← β Ī + (1 - β) I and Ū ← β Ū + (1 - β) |I - Ī| (β = 0.85); a component's score is the mean of
    Ī·Ū over its A row plus the mean over its B column: r floats a module. Freezing
    (``train_components`` n): gradients of components n.. are zeroed before clipping and the step,
    and their values put back after it (AdamW's weight decay would move them): they stay as sent.
    Scores are measured on the full gradient, frozen components included.
    """

    BETA = 0.85

    def __init__(self, params: dict[str, torch.Tensor], train_components: int | None):
        self.params, self.n = params, train_components
        self.pairs = list(lora_pairs(params).values())
        self.ibar: dict[str, torch.Tensor] = {}
        self.ubar: dict[str, torch.Tensor] = {}
        self.held = {} if self.n is None else {  # the frozen slices, as sent: O(adapter) memory
            k: (params[a][self.n:].detach().clone(), params[b][:, self.n:].detach().clone()) for k, (a, b) in enumerate(self.pairs)}

    def before_step(self) -> None:
        """Score the gradients just computed, then zero the frozen components' share."""
        for a, b in self.pairs:
            for key in (a, b):
                p = self.params[key]
                imp = (p.detach() * p.grad).abs()
                ibar = self.ibar.get(key, torch.zeros_like(imp)).mul_(self.BETA).add_(imp, alpha=1 - self.BETA)
                self.ibar[key] = ibar
                self.ubar[key] = self.ubar.get(key, torch.zeros_like(imp)).mul_(self.BETA).add_((imp - ibar).abs(), alpha=1 - self.BETA)
            if self.n is not None:
                self.params[a].grad[self.n:] = 0
                self.params[b].grad[:, self.n:] = 0

    @torch.no_grad()
    def after_step(self) -> None:
        """Put the frozen components back as they were sent."""
        if self.n is None:
            return
        for k, (a, b) in enumerate(self.pairs):
            self.params[a][self.n:] = self.held[k][0]
            self.params[b][:, self.n:] = self.held[k][1]

    def scores(self) -> AdapterState:
        """Score per component of every module (keyed by its A key); zeros before the first step."""
        out = {}
        for a, b in self.pairs:
            if a not in self.ibar:
                out[a] = torch.zeros(self.params[a].shape[0])
                continue
            out[a] = ((self.ibar[a] * self.ubar[a]).mean(1) + (self.ibar[b] * self.ubar[b]).mean(0)).float().cpu()
        return out


class LocalTrainer:
    """Runs :class:`ClientTask` s on one resident model: the local loop of every algorithm.

    With ``adapters``, a task runs on the adapter of its ``rank`` (and on base + ``base_delta``);
    without, every task runs on ``slots``. It keeps nothing between tasks: a client's optimizer
    moments come in its task and go back in its result (``keep_optimizer``), so any process holding
    the same model and data runs a task to the same result.
    """

    def __init__(self, model, slots: AdapterSlots, data: Encoded, parts: list[np.ndarray], cfg: TrainConfig, seed: int,
                 adapters: RankedAdapters | None = None, privacy: PrivacyConfig | None = None):
        self.model, self.slots, self.data, self.parts = model, slots, data, parts
        self.cfg, self.seed, self.adapters = cfg, seed, adapters
        self.dp = privacy if privacy is not None and privacy.mode == "local" else None  # DP-SGD (colora.privacy)
        self._flops_by_shape: dict[tuple, float] = {}

    def _optimizer(self, task: ClientTask, params: dict[str, torch.Tensor]) -> torch.optim.Optimizer:
        opt = local_optimizer(self.cfg, list(params.values()), task.lr)
        if task.keep_optimizer and task.moments:
            load_moments(opt, list(params), task.moments)  # other shapes (the rank changed): fresh
        return opt

    def __call__(self, tasks: list[ClientTask]) -> list[ClientResult]:
        return [self.run(t) for t in tasks]

    def _batch(self, task: ClientTask, step: int) -> dict[str, torch.Tensor]:
        idx = batch_indices(self.parts[task.client_id], self.cfg.batch_size, step, self.seed, task.client_id)
        batch = self.data.collate(idx)
        if task.flip_labels:  # an attacking client poisons its own labels (colora.attacks)
            batch["labels"] = task.flip_labels - 1 - batch["labels"]
        return batch

    def _result(self, task: ClientTask, state: AdapterState, losses: list[float], flops: float,
                opt: torch.optim.Optimizer, keys: list[str], comps: Components | None = None) -> ClientResult:
        n = len(self.parts[task.client_id])
        if not all(math.isfinite(v) for v in losses) or any(not torch.isfinite(t).all() for t in state.values()):
            # a client whose training diverged sends nothing (colora.validation); central stops the run
            return ClientResult(task.client_id, {}, n, float("nan"), flops, task.steps, None,
                                failed="its local training produced NaN or inf")
        moments = moments_of(opt, keys) if task.keep_optimizer else None
        scores = comps.scores() if task.scores else None
        return ClientResult(task.client_id, state, n, float(np.mean(losses)), flops, task.steps, moments, scores=scores)

    def run(self, task: ClientTask) -> ClientResult:
        """Load the task's state, take its local steps, return the trained state."""
        slots = self.slots
        if self.adapters is not None:
            self.adapters.merge_base(task.base_delta)
            slots = self.adapters.activate(task.rank)
        slots.load(task.state)
        params = {k: p for k, p in slots.params.items() if k not in task.frozen}  # what trains
        opt = self._optimizer(task, params)
        anchor = None if task.prox_anchor is None else to_device(task.prox_anchor, self.model)
        correction = None if task.correction is None else to_device(task.correction, self.model)
        comps = components(task, params)
        self.model.train()
        torch.manual_seed(_torch_seed(self.seed, task.client_id, task.start_step))
        losses, flops = [], 0.0
        with frozen(slots.params, task.frozen), per_sample_gradients(self.model) if self.dp else contextlib.nullcontext():
            for step in range(task.start_step, task.start_step + task.steps):
                noise = sgd_noise_generator(self.seed, task.client_id, step) if self.dp else None
                batch = to_device(self._batch(task, step), self.model)
                loss = self._backward(batch, anchor, slots)
                flops += self._flops_by_shape[self._shape(batch, slots)]
                self._update(params, opt, anchor, noise, correction, comps)
                losses.append(loss)
        return self._result(task, slots.get(), losses, flops, opt, list(params), comps)

    def run_fused(self, tasks: list[ClientTask]) -> list[ClientResult]:
        """Run ``tasks`` in one batched pass per step (colora.fused); each result equals :meth:`run`'s
        for that task up to floating-point order. Tasks that merge different base deltas (FLoRA) run
        in separate fused groups."""
        groups: list[list[int]] = []
        for i, t in enumerate(tasks):
            home = next((g for g in groups if _same_state(tasks[g[0]].base_delta, t.base_delta)), None)
            home.append(i) if home is not None else groups.append([i])
        out: dict[int, ClientResult] = {}
        for g in groups:
            results = [self.run(tasks[g[0]])] if len(g) == 1 else fused_run(self, [tasks[i] for i in g])
            out.update(zip(g, results))
        return [out[i] for i in range(len(tasks))]

    @staticmethod
    def _shape(batch, slots: AdapterSlots) -> tuple:
        return (slots.adapter, *batch["input_ids"].shape)  # LoRA FLOPs depend on the rank

    def count_flops(self, batch: dict[str, torch.Tensor], slots: AdapterSlots, rank: int | None = None) -> float:
        """FLOPs of one sequential step of ``batch`` on ``slots``'s adapter (rank ``rank``), counted by
        an extra pass once per shape (the count depends only on the shapes); the fused path's count."""
        shape = self._shape(batch, slots)
        if shape not in self._flops_by_shape:
            if self.adapters is not None:
                self.adapters.activate(rank)  # the count runs the client's own adapter
            device = next(self.model.parameters()).device
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                    FlopCounterMode(display=False) as counter:
                self._loss(batch, None, slots).backward()
            for p in slots.params.values():
                p.grad = None
            self._flops_by_shape[shape] = float(counter.get_total_flops())
        return self._flops_by_shape[shape]

    def _backward(self, batch, anchor, slots: AdapterSlots) -> float:
        """Forward and backward of one batch (FLOPs counted the first time a shape is seen); the loss."""
        shape = self._shape(batch, slots)
        counter = FlopCounterMode(display=False) if shape not in self._flops_by_shape else None
        with counter or contextlib.nullcontext():
            loss = self._loss(batch, anchor, slots)
            loss.backward()
        if counter is not None:
            self._flops_by_shape[shape] = float(counter.get_total_flops())
        return float(loss.detach())

    def _update(self, params: dict[str, torch.Tensor], opt, anchor, noise: torch.Generator | None,
                correction: AdapterState | None, comps: Components | None = None) -> None:
        """One optimizer step on ``params`` from their gradients: DP-SGD's privatized gradient (with
        ``noise``), HAFL's scores and frozen components (``comps``), clipping, SCAFFOLD's
        ``correction`` c - c_k."""
        if noise is not None:  # DP-SGD: the gradient becomes the clipped per-sample sum plus noise
            prox = None if anchor is None or self.cfg.prox_mu <= 0 else {
                k: self.cfg.prox_mu * (p.detach() - anchor[k]) for k, p in params.items()}
            private_gradient(params, self.dp.clip, self.dp.noise_multiplier, noise, prox)
        if comps is not None:
            comps.before_step()
        clip_and_step(self.cfg, params, opt, correction)
        if comps is not None:
            comps.after_step()

    def _loss(self, batch, anchor, slots: AdapterSlots) -> torch.Tensor:
        with autocast(self.cfg.precision, self.model):
            loss = self.model(**batch).loss
        return self.prox(loss, slots.params, anchor)

    def prox(self, loss: torch.Tensor, params: dict[str, torch.Tensor], anchor: AdapterState | None) -> torch.Tensor:
        """FedProx: ``loss`` + mu/2 * ||theta - theta_global||^2 over the adapter (O(adapter) extra work)."""
        if anchor is None or self.cfg.prox_mu <= 0:
            return loss
        return loss + 0.5 * self.cfg.prox_mu * sum(((p - anchor[k]) ** 2).sum() for k, p in params.items())


def fused_run(trainer: LocalTrainer, tasks: list[ClientTask]) -> list[ClientResult]:
    """The local loop of :meth:`LocalTrainer.run` for several clients at once, each step one fused
    pass (colora.fused); clients with fewer steps drop out of the later passes."""
    model, cfg, adapters = trainer.model, trainer.cfg, trainer.adapters
    device = next(model.parameters()).device
    if adapters is not None:
        adapters.merge_base(tasks[0].base_delta)
    slots = [adapters.ensure(t.rank or adapters.default_rank) if adapters is not None else trainer.slots for t in tasks]
    params, trained, opts, anchors, corrections, comps, streams, scaling = [], [], [], [], [], [], [], []
    for t, s in zip(tasks, slots):
        live = {k: torch.nn.Parameter(t.state[k].to(device, copy=True), requires_grad=k not in t.frozen)
                for k in s.params}  # the client's own leaves
        params.append(live)
        trained.append({k: p for k, p in live.items() if p.requires_grad})
        opts.append(trainer._optimizer(t, trained[-1]))
        anchors.append(None if t.prox_anchor is None else to_device(t.prox_anchor, model))
        corrections.append(None if t.correction is None else to_device(t.correction, model))
        comps.append(components(t, trained[-1]))
        torch.manual_seed(_torch_seed(trainer.seed, t.client_id, t.start_step))  # as run() seeds it
        streams.append(rng_snapshot(device))
        scaling.append(lora_scaling(model, s.adapter))
    model.train()
    losses, flops = [[] for _ in tasks], [0.0] * len(tasks)
    with fused_layers(model):
        for i in range(max(t.steps for t in tasks)):
            on = [j for j, t in enumerate(tasks) if i < t.steps]
            batches = [to_device(trainer._batch(tasks[j], tasks[j].start_step + i), model) for j in on]
            for j, b in zip(on, batches):
                flops[j] += trainer.count_flops(b, slots[j], tasks[j].rank)
            widths = [b["input_ids"].shape[1] for b in batches]
            step = FusedStep([params[j] for j in on], widths, cfg.batch_size, common_width(model, widths),
                             [streams[j] for j in on], [scaling[j] for j in on], device)
            inputs = concat_batches([{k: v for k, v in b.items() if k != "labels"} for b in batches], step.width, trainer.data.pad_id)
            with fused_step(step), autocast(cfg.precision, model):
                logits = model(**inputs).logits
                per = []
                for n, (own, b, j) in enumerate(zip(logits.split(step.rows), batches, on)):  # each client's rows
                    own = own[:, : widths[n]] if own.ndim == 3 else own  # per token: its own width
                    per.append(trainer.prox(task_loss(model.config, own, b["labels"]), params[j], anchors[j]))
            torch.stack(per).sum().backward()  # client j's factors reach only its own loss
            for n, j in enumerate(on):
                streams[j] = step.streams[n]
                trainer._update(trained[j], opts[j], anchors[j], None, corrections[j], comps[j])
                losses[j].append(float(per[n].detach()))
    return [trainer._result(t, {k: p.detach().to("cpu", copy=True) for k, p in params[j].items()}, losses[j], flops[j], opts[j],
                            list(trained[j]), comps[j]) for j, t in enumerate(tasks)]


def components(task: ClientTask, params: dict[str, torch.Tensor]) -> Components | None:
    """HAFL's bookkeeping for ``task`` when it asks for scores or frozen components, else None."""
    return Components(params, task.train_components) if task.scores or task.train_components is not None else None


def task_loss(config, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss a Hugging Face model with ``config`` computes from its head's logits (the same
    functions): next-token cross entropy over scored tokens when labels are per token, else the
    sequence-classification loss. Used per client by fused passes and by the split head."""
    if labels.ndim == 2:  # causal LM: b x L x V logits, b x L targets, -100 where not scored
        return ForCausalLMLoss(logits, labels, vocab_size=config.vocab_size)
    return ForSequenceClassificationLoss(labels, logits, config)


@contextlib.contextmanager
def frozen(params: dict[str, torch.Tensor], keys: list[str]):
    """``keys``' parameters take no gradient while inside (FFA-LoRA's A, RoLoRA's resting factor)."""
    held = [params[k] for k in keys if params[k].requires_grad]
    for p in held:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in held:
            p.requires_grad_(True)


def _same_state(a: AdapterState | None, b: AdapterState | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@torch.no_grad()
def evaluate(model, data: Encoded, task: Task, batch_size: int, precision: str = "fp32") -> dict[str, float]:
    """Eval loss and the task's metrics for the adapter currently loaded in ``model``."""
    model.eval()
    order = np.argsort([len(r) for r in data.input_ids], kind="stable")  # length-sorted: less padding
    total_loss, total_count, preds = 0.0, 0, np.empty(len(data), dtype=np.float64)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = to_device(data.collate(idx), model)
        labels = batch.pop("labels")
        with autocast(precision, model):
            logits = model(**batch).logits.float()
        if task.kind == "causal-lm":
            shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
            total_loss += float(torch.nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                ignore_index=-100, reduction="sum"))
            total_count += int((shift_labels != -100).sum())
        elif task.num_labels == 1:
            out = logits.squeeze(-1)
            total_loss += float(torch.nn.functional.mse_loss(out, labels, reduction="sum"))
            total_count += len(idx)
            preds[idx] = out.cpu().numpy()
        else:
            total_loss += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
            total_count += len(idx)
            preds[idx] = logits.argmax(-1).cpu().numpy()
    loss = total_loss / max(total_count, 1)
    metrics = {"eval/loss": loss}
    if task.kind == "causal-lm":
        metrics["eval/perplexity"] = math.exp(min(loss, 50.0))
    else:
        labels_np = data.labels
        pred_np = preds if task.num_labels == 1 else preds.astype(np.int64)
        metrics.update({f"eval/{k}": float(v) for k, v in task.compute_metrics(pred_np, labels_np).items()})
    return metrics
