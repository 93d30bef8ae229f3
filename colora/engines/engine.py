"""The engine: setup, evaluation and export in the driver; the clients' work on an executor.

The driver holds ONE resident copy of the frozen base model (with LoRA attached once per LoRA rank in
use): it evaluates, exports, and runs split learning's server part. Client work goes through
``engine.kind``'s executor as bytes (colora.messages): ``inprocess`` runs it on the driver's own
model, one task after another (the reference every other executor must match); ``workers`` in
parallel processes mapping the driver's base weights (colora.engines.workers); ``ray`` in Ray
actors (colora.engines.ray). Clients are simulated by copying their adapter state into live LoRA
tensors, training, and copying out: memory per simulated client is its index list and step
counter, plus an adapter state (and kept moments) while it is in flight.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from peft.tuners.lora import LoraLayer

from ..adapters import RankedAdapters, attach_lora
from ..algorithms import Context, get_algorithm
from ..config import ColoraError, Config
from ..data import label_histogram, partition
from ..models import load_base_model, load_tokenizer, resolve_device
from ..nlg import generation_metrics
from ..quantize import resident_nbytes
from ..ranks import assign_ranks, rank_rule_name
from ..split.trainer import SplitTrainer
from ..states import adapter_params_at
from ..system import ModelShape, available_memory, client_profiles, fuse_report, memory_report, training_memory
from ..train import encode, evaluate
from .executors import make_executor
from .runtime import ClientRuntime, load_data

if TYPE_CHECKING:
    from ..deploy.remote import RemoteClients
from .shared_base import SharedBase, frozen_tensors


class Engine:
    """Builds task, model, partitions, executor and algorithm for ``cfg``; evaluates adapter states.

    ``close()`` (or ``with``) stops the executor's processes."""

    def __init__(self, cfg: Config, remote: "RemoteClients | None" = None):
        self.cfg = cfg
        self.device = resolve_device(cfg.engine.device)  # before anything loads: a missing GPU is exit 2
        d = cfg.data
        tokenizer = self.tokenizer = load_tokenizer(cfg.model)
        # Deployed (``remote``): the server holds the evaluation split only; the data owners hold the rest.
        self.task, train = load_data(cfg, tokenizer, encode_train=remote is None)
        if cfg.eval.generate and (self.task.kind != "causal-lm" or self.task.eval.text_b is None):
            raise ColoraError(f"eval.generate={cfg.eval.generate}: generation needs a data-to-text causal-lm task (data.name={d.name!r} is not)")
        base = load_base_model(cfg.model, self.task.num_labels, tokenizer, seed=cfg.seed)
        check_max_length(base.config, d.max_length)
        # workers and ray: the frozen base written once and mapped by every process (shared_base)
        self.shared = SharedBase(base) if cfg.engine.kind == "workers" and remote is None else None
        self.base_tensors = frozen_tensors(base) if cfg.engine.kind == "ray" and remote is None else None
        self.remote = remote
        try:
            self.model = attach_lora(base, cfg.model, seed=cfg.seed).to(self.device)
            self.adapters = RankedAdapters(self.model, cfg.seed)  # one peft adapter per LoRA rank in use
            self.slots = self.adapters.slots[self.adapters.default_rank]
            self.eval_data = encode(self.task.eval, self.task, tokenizer, d.max_length)
            if d.max_eval is not None:
                self.eval_data = self.eval_data.take(d.max_eval)
            algo_cls = get_algorithm(cfg.algorithm)
            if remote is None:
                self.parts = self._partition(len(train))
                self.holdout = holdout_slices(self.parts, cfg.eval.client_holdout, cfg.seed)  # eval.client_holdout
                self.train_parts = [np.arange(len(train))] if algo_cls.pooled_data else [
                    np.setdiff1d(p, h, assume_unique=True) for p, h in zip(self.parts, self.holdout)]
                self.sizes = [len(p) for p in self.train_parts]
            else:  # the owners' data sizes, as they reported them when joining
                self.parts = self.holdout = self.train_parts = None
                self.sizes = list(remote.sizes)
            self.devices = client_profiles(cfg)
            self.split = None  # the split runner, once the cut exists (below)
            self.ranks = [cfg.model.lora.r] if algo_cls.pooled_data else self._assign_ranks_early(algo_cls)
            check_ranks(self.model, max([cfg.model.lora.r, *self.ranks]))
            split = algo_cls.runner == "split"
            if remote is None:
                self.runtime = ClientRuntime(cfg, self.model, self.adapters, train, self.train_parts, self.ranks, split)
                self.executor = make_executor(cfg, self, split)
            else:
                self.runtime, self.executor = None, remote.executor
            self.split = SplitTrainer(self.model, self.adapters, cfg, self.executor) if split else None
            if split and not algo_cls.pooled_data:
                self.ranks = self._assign_ranks()  # a split client's memory need is its part's
            self.memory = self._memory_check(algo_cls.pooled_data)
            ctx = Context(cfg, self.executor.run_tasks, self.slots.get(), self.sizes,
                          self.slots.num_params(), self.evaluate, client_ranks=self.ranks,
                          initial_state_at=self.adapters.initial_state, split=self.split, devices=self.devices,
                          num_labels=self.task.num_labels if self.task.kind == "seq-cls" else None,
                          evaluate_client=self.evaluate_client if cfg.eval.client_holdout > 0 else None,
                          run_mixes=remote.run_mixes if remote is not None else None,
                          run_secure=remote.run_secure if remote is not None else None)
            self.algorithm = algo_cls(ctx)
        except BaseException:
            self.close()
            raise

    def start(self) -> None:
        """Start the executor's workers in the background (the experiment calls this before its
        round-0 evaluation; without it they start on first use)."""
        self.executor.start()

    def summary(self) -> dict:
        """summary.json's ``engine`` section: where the clients ran (``deployed``: on the data owners'
        machines), and how many workers were restarted (each restart reran its work; the results do not change)."""
        e = self.cfg.engine
        kind = "deployed" if self.remote is not None else e.kind
        return {"kind": kind, "workers": e.workers if kind in ("workers", "ray") else 1, "device": str(self.device),
                "worker_restarts": self.executor.restarts}

    def round_report(self) -> dict:
        """metrics.jsonl entries of the executor's own (deployed: dropouts and the transport's bytes)."""
        return self.remote.round_report() if self.remote is not None else {}

    def close(self) -> None:
        """Stop the executor's worker processes or actors (nothing to do in-process)."""
        if getattr(self, "executor", None) is not None:
            self.executor.close()
        if getattr(self, "shared", None) is not None:
            self.shared.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _assign_ranks_early(self, algo_cls) -> list[int]:
        # Split clients' ranks depend on their part's size, known once the cut exists (below); the
        # runtime only needs every rank in use attached, and a split client's ranks are <= model.lora.r.
        if algo_cls.runner == "split":
            return [self.cfg.model.lora.r] * self.cfg.clients.num
        return self._assign_ranks()

    def _partition(self, n: int) -> list[np.ndarray]:
        return partition_rows(self.cfg, self.task.train.labels, n, self.task.num_labels)

    def _assign_ranks(self) -> list[int]:
        cfg = self.cfg
        need_at = lambda r: training_memory(self._client_shape(r), cfg.train.batch_size, cfg.data.max_length)  # noqa: E731
        sizes = self.sizes if self.parts is None else [len(p) for p in self.parts]
        return assign_ranks(cfg.federation, cfg.model.lora.r, sizes, self.devices, need_at)

    def _client_shape(self, rank: int) -> ModelShape:
        """What one client holds at LoRA rank ``rank``: the whole model, or a split client's part."""
        init = self.adapters.initial_state(self.adapters.default_rank)
        if self.split is None:
            return self._shape(adapter_params_at(init, rank))
        return self._shape(adapter_params_at({k: init[k] for k in self.split.client_keys}, rank), client_part=True)

    @functools.cached_property
    def _base_bytes(self) -> int:
        # Resident bytes of the frozen base (quantized if so): one walk over the model, not one per client.
        trainable = [p for n, p in self.model.named_parameters() if "lora_" in n or "modules_to_save" in n]
        return resident_nbytes(self.model) - sum(p.numel() * p.element_size() for p in trainable)

    def _shape(self, adapter_params: int, client_part: bool = False) -> ModelShape:
        """The memory estimate's view of the whole model, or of a split client's part of it."""
        mc = self.model.config
        base_bytes, blocks = self._base_bytes, mc.num_hidden_layers
        if client_part:  # a split client holds the embeddings and blocks [0, layer) only
            acc = self.split.accounting
            total = sum(p.numel() for p in self.model.parameters())
            base_bytes *= (acc["client_params"] - acc["client_adapter_params"]) / (total - self.slots.num_params())
            blocks = acc["layer"]
        return ModelShape(base_bytes, adapter_params, blocks, mc.hidden_size, mc.num_attention_heads)

    def _memory_check(self, pooled: bool) -> dict:
        """Estimated training memory of every client's part against its profile (colora.system).

        Pooled training (central) runs on the server, so its one "client" is the server profile."""
        cfg = self.cfg
        per_rank = {r: self._client_shape(r) for r in set(self.ranks)}
        shapes = [per_rank[r] for r in self.ranks]
        need = [training_memory(s, cfg.train.batch_size, cfg.data.max_length) for s in shapes]
        report = memory_report([cfg.system.server] if pooled else self.devices, need)
        if cfg.engine.fuse > 1 and not pooled:
            report["fuse"] = self._fuse_check(max(shapes, key=lambda s: s.adapter_params))
        if report["over"] and cfg.system.enforce_memory:
            k = report["over"][0]
            raise ColoraError(f"system.enforce_memory: {len(report['over'])} of {len(need)} clients cannot hold their part of the "
                              f"model (client {k} needs ~{report['need_gb'][k]:.3g} GB, has memory_gb={report['memory_gb'][k]}); "
                              f"use a larger device profile, a smaller batch or data.max_length, or split.layer")
        return report

    def _fuse_check(self, shape: ModelShape) -> dict:
        """engine.fuse against this machine's free memory (a fused pass holds K clients' activations
        at once): refused before training when it would not fit."""
        e, cfg = self.cfg.engine, self.cfg
        processes = 1 if e.kind == "inprocess" else e.workers  # Ray actors may sit elsewhere: this host's view
        report = fuse_report(shape, cfg.train.batch_size, cfg.data.max_length, e.fuse, processes, available_memory(self.device))
        if not report["fits"]:
            raise ColoraError(f"engine.fuse={e.fuse}: a fused pass needs ~{report['need_gb']:.3g} GB and this machine has "
                              f"{report['available_gb']:.3g} GB free; use engine.fuse<={max(1, report['max_fuse'])} "
                              "or a smaller train.batch_size or data.max_length")
        return report

    def system_report(self) -> dict:
        """Server and per-client device profiles and the memory check (saved as system.json)."""
        return {"preset": self.cfg.system.preset, "server": self.cfg.system.server.model_dump(),
                "clients": [d.model_dump() for d in self.devices], "memory": self.memory}

    def partition_report(self) -> dict:
        """Per-client sizes and label histograms (saved as partition.json, printed at start)."""
        labels = self.task.train.labels
        info = {"scheme": self.cfg.clients.partition, "sizes": self.sizes if self.parts is None else [len(p) for p in self.parts]}
        if self.cfg.eval.client_holdout > 0:
            info["held_out"] = [len(h) for h in self.holdout]
        if len(self.ranks) == len(info["sizes"]):
            info["ranks"], info["rank_rule"] = self.ranks, rank_rule_name(self.cfg.federation)
        if self.algorithm.attackers:
            byz = self.cfg.clients.byzantine
            info["byzantine"] = {"attack": byz.attack, "clients": sorted(self.algorithm.attackers)}
        if labels is not None and self.parts is not None:  # deployed: the owners' label counts stay with them
            info["label_names"] = self.task.label_names
            info["histogram"] = label_histogram(labels, self.parts, self.task.num_labels).tolist()
        return info

    @property
    def main_metric(self) -> str:
        if self.task.metric_names:
            return f"eval/{self.task.metric_names[0]}"
        return "eval/perplexity" if self.task.kind == "causal-lm" else "eval/loss"

    def evaluate_client(self, state, client: int) -> dict[str, float]:
        """``state``'s eval metrics on ``client``'s own held-out slice (eval.client_holdout)."""
        self.adapters.load_for_eval(state)
        data = self.runtime.trainer.data.subset(self.holdout[client])
        return evaluate(self.model, data, self.task, self.cfg.train.eval_batch_size, self.cfg.train.precision)

    def evaluate(self, state) -> dict[str, float]:
        self.adapters.load_for_eval(state)
        metrics = evaluate(self.model, self.eval_data, self.task, self.cfg.train.eval_batch_size,
                           self.cfg.train.precision)
        if self.cfg.eval.generate:  # BLEU, NIST, ROUGE-L, CIDEr of greedy outputs (colora.nlg)
            metrics.update(generation_metrics(self.model, self.tokenizer, self.task.eval, self.cfg.eval.generate,
                                              self.cfg.eval.max_new_tokens))
        return metrics

    def export(self, state, out_dir: Path) -> None:
        self.adapters.export(state, out_dir)

    def state_dict(self) -> dict:
        """The driver's own state: split learning's server-side optimizers (clients' moments travel
        with the algorithm)."""
        return {"split": self.split.state_dict()} if self.split is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if state.get("optimizers"):  # checkpoints before moments travelled in tasks
            self.algorithm.adopt_legacy_optimizers(state["optimizers"])
        if self.split is not None:
            self.split.load_state_dict(state["split"])


def partition_rows(cfg: Config, labels, n: int, num_labels: int) -> list[np.ndarray]:
    """Each client's row indices into the ``n`` training rows (clients.partition, seeded by cfg.seed)."""
    c = cfg.clients
    if labels is None:
        if c.partition != "iid":
            raise ColoraError(f"clients.partition={c.partition} needs labels; {cfg.data.name} has none (use iid)")
        labels = [0] * n
    return partition(labels, c.num, c.partition, alpha=c.alpha, shards_per_client=c.shards_per_client,
                     seed=cfg.seed, num_labels=num_labels or 1, proportions=c.proportions)


def holdout_slices(parts: list[np.ndarray], share: float, seed: int) -> list[np.ndarray]:
    """Each client's held-out rows: a seeded ``share`` of its data (at least one row, and at least one
    left to train on); empty slices when ``share`` is 0."""
    out = []
    for k, part in enumerate(parts):
        if share == 0:
            out.append(part[:0])
            continue
        n = max(1, round(share * len(part)))
        if len(part) - n < 1:
            raise ColoraError(f"eval.client_holdout={share:g}: client {k} has {len(part)} examples, too few to hold "
                              "any out and still train; use fewer clients or a smaller share")
        out.append(np.sort(np.random.default_rng([seed, 0x401D, k]).permutation(part)[:n]))
    return out


def check_max_length(model_config, max_length: int) -> None:
    """data.max_length must fit the model's position embeddings (else round 1 fails on an index error)."""
    limit = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
    if limit and "roberta" in model_config.model_type:
        limit -= 2  # RoBERTa's positions start after the padding index: 514 embeddings hold 512 tokens
    if limit and max_length > limit:
        raise ColoraError(f"data.max_length={max_length} exceeds the model's {limit} positions "
                          f"({model_config.model_type}); use data.max_length <= {limit}")


def check_ranks(model, rank: int) -> None:
    """No LoRA rank above min(d_in, d_out) of a target module: B·A cannot have a higher rank, so
    the extra components would only cost memory and bytes."""
    limit, module = min((min(m.in_features, m.out_features), name.rsplit(".", 1)[-1])
                        for name, m in model.named_modules() if isinstance(m, LoraLayer))
    if rank > limit:
        raise ColoraError(f"LoRA rank {rank} (model.lora.r or federation.ranks/rank_set) exceeds min(d_in, d_out)={limit} "
                          f"of target module '{module}'; use ranks <= {limit}")
