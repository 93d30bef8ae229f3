"""The in-process engine: the reference implementation every other engine must match.

ONE resident copy of the frozen base model (with LoRA attached once per LoRA rank in use). Clients
are simulated by copying their adapter state into the live LoRA tensors, training, and copying out:
memory per simulated client is its index list and step counter, plus an adapter state while it is
in flight.
"""

from __future__ import annotations

import functools
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from peft.tuners.lora import LoraLayer
from tqdm import tqdm

from .. import rundir
from ..adapters import RankedAdapters, attach_lora
from ..algorithms import Context, get_algorithm
from ..config import ColoraError, Config, NonFiniteError
from ..data import label_histogram, load_task, partition
from ..models import load_base_model, load_tokenizer, resolve_device
from ..nlg import generation_metrics
from ..quantize import resident_nbytes
from ..ranks import assign_ranks, rank_rule_name
from ..split.trainer import SplitTrainer
from ..states import adapter_params_at
from ..system import ModelShape, client_profiles, memory_report, training_memory
from ..train import LocalTrainer, encode, evaluate


class InProcessEngine:
    """Builds task, model, partitions and algorithm for ``cfg``, and evaluates adapter states."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.device = resolve_device(cfg.engine.device)  # before anything loads: a missing GPU is exit 2
        d = cfg.data
        self.task = load_task(
            d.name, d.path, task_kind=cfg.model.task, seed=cfg.seed, text_column=d.text_column,
            text_pair_column=d.text_pair_column, label_column=d.label_column,
            synthetic_train=d.synthetic_train, synthetic_eval=d.synthetic_eval, max_train=d.max_train,
        )
        if self.task.kind != cfg.model.task:
            raise ColoraError(f"data.name={d.name!r} is a {self.task.kind} task but model.task={cfg.model.task!r}")
        tokenizer = self.tokenizer = load_tokenizer(cfg.model)
        if cfg.eval.generate and (self.task.kind != "causal-lm" or self.task.eval.text_b is None):
            raise ColoraError(f"eval.generate={cfg.eval.generate}: generation needs a data-to-text causal-lm task (data.name={d.name!r} is not)")
        base = load_base_model(cfg.model, self.task.num_labels, tokenizer, seed=cfg.seed)
        check_max_length(base.config, d.max_length)
        self.model = attach_lora(base, cfg.model, seed=cfg.seed).to(self.device)
        self.adapters = RankedAdapters(self.model, cfg.seed)  # one peft adapter per LoRA rank in use
        self.slots = self.adapters.slots[self.adapters.default_rank]
        train = encode(self.task.train, self.task, tokenizer, d.max_length)
        self.eval_data = encode(self.task.eval, self.task, tokenizer, d.max_length)
        if d.max_eval is not None:
            self.eval_data = self.eval_data.take(d.max_eval)
        self.parts = self._partition(len(train))
        algo_cls = get_algorithm(cfg.algorithm)
        train_parts = [np.arange(len(train))] if algo_cls.pooled_data else self.parts
        self.devices = client_profiles(cfg)
        self.split = SplitTrainer(self.model, self.adapters, train, train_parts, cfg) if algo_cls.runner == "split" else None
        self.ranks = [cfg.model.lora.r] if algo_cls.pooled_data else self._assign_ranks()
        check_ranks(self.model, max([cfg.model.lora.r, *self.ranks]))
        for r in sorted(set(self.ranks)):
            self.adapters.ensure(r)
        self.trainer = LocalTrainer(self.model, self.slots, train, train_parts, cfg.train, cfg.seed, self.adapters)
        self.memory = self._memory_check(algo_cls.pooled_data)
        ctx = Context(cfg, self.trainer, self.slots.get(), [len(p) for p in train_parts], self.slots.num_params(), self.evaluate,
                      client_ranks=self.ranks, initial_state_at=self.adapters.initial_state,
                      split=self.split, devices=self.devices)
        self.algorithm = algo_cls(ctx)

    def _partition(self, n: int) -> list[np.ndarray]:
        c = self.cfg.clients
        labels = self.task.train.labels
        if labels is None:
            if c.partition != "iid":
                raise ColoraError(f"clients.partition={c.partition} needs labels; {self.cfg.data.name} has none (use iid)")
            labels = [0] * n
        return partition(labels, c.num, c.partition, alpha=c.alpha, shards_per_client=c.shards_per_client,
                         seed=self.cfg.seed, num_labels=self.task.num_labels or 1, proportions=c.proportions)

    def _assign_ranks(self) -> list[int]:
        cfg = self.cfg
        need_at = lambda r: training_memory(self._client_shape(r), cfg.train.batch_size, cfg.data.max_length)  # noqa: E731
        return assign_ranks(cfg.federation, cfg.model.lora.r, [len(p) for p in self.parts], self.devices, need_at)

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
        if report["over"] and cfg.system.enforce_memory:
            k = report["over"][0]
            raise ColoraError(f"system.enforce_memory: {len(report['over'])} of {len(need)} clients cannot hold their part of the "
                              f"model (client {k} needs ~{report['need_gb'][k]:.3g} GB, has memory_gb={report['memory_gb'][k]}); "
                              f"use a larger device profile, a smaller batch or data.max_length, or split.layer")
        return report

    def system_report(self) -> dict:
        """Server and per-client device profiles and the memory check (saved as system.json)."""
        return {"preset": self.cfg.system.preset, "server": self.cfg.system.server.model_dump(),
                "clients": [d.model_dump() for d in self.devices], "memory": self.memory}

    def partition_report(self) -> dict:
        """Per-client sizes and label histograms (saved as partition.json, printed at start)."""
        labels = self.task.train.labels
        info = {"scheme": self.cfg.clients.partition, "sizes": [len(p) for p in self.parts]}
        if len(self.ranks) == len(self.parts):
            info["ranks"], info["rank_rule"] = self.ranks, rank_rule_name(self.cfg.federation)
        if labels is not None:
            info["label_names"] = self.task.label_names
            info["histogram"] = label_histogram(labels, self.parts, self.task.num_labels).tolist()
        return info

    @property
    def main_metric(self) -> str:
        if self.task.metric_names:
            return f"eval/{self.task.metric_names[0]}"
        return "eval/perplexity" if self.task.kind == "causal-lm" else "eval/loss"

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
        state = {"optimizers": {k: o.state_dict() for k, o in self.trainer.persistent.items()}}
        if self.split is not None:
            state["split"] = self.split.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.trainer.pending_optimizer_states = dict(state["optimizers"])
        if self.split is not None:
            self.split.load_state_dict(state["split"])


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
    dims = {name.rsplit(".", 1)[-1]: min(m.in_features, m.out_features)
            for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    module, limit = min(dims.items(), key=lambda kv: kv[1])
    if rank > limit:
        raise ColoraError(f"LoRA rank {rank} (model.lora.r or federation.ranks/rank_set) exceeds min(d_in, d_out)={limit} "
                          f"of target module '{module}'; use ranks <= {limit}")


def _partition_text(cfg: Config, info: dict, show: int = 10) -> str:
    """Header line plus a per-client label histogram (first ``show`` clients)."""
    lines = [f"colora: {cfg.algorithm} on {cfg.data.name}, {cfg.clients.num} clients ({info['scheme']})"]
    if "histogram" in info:
        names = info["label_names"] if len(info["label_names"]) == len(info["histogram"][0]) else [
            f"bin{i}" for i in range(len(info["histogram"][0]))]
        lines.append("  client " + " ".join(f"{n[:9]:>9}" for n in names) + "      n")
        for k, counts in enumerate(info["histogram"][:show]):
            lines.append(f"  {k:>6} " + " ".join(f"{c:>9}" for c in counts) + f" {info['sizes'][k]:>6}")
        if len(info["histogram"]) > show:
            lines.append(f"  ... {len(info['histogram']) - show} more clients in partition.json")
    else:
        lines.append(f"  sizes {info['sizes'][:show]}")
    if "ranks" in info:
        counts = ", ".join(f"r={r} x{info['ranks'].count(r)}" for r in sorted(set(info["ranks"])))
        lines.append(f"  LoRA ranks ({info['rank_rule']}): {counts}; per client in partition.json")
    return "\n".join(lines)


def _log_line(row: dict, rounds: int) -> str:
    parts = [f"round {row['round']}/{rounds}"]
    if row.get("train_loss") is not None:
        parts.append(f"train_loss {row['train_loss']:.4f}")
    parts += [f"{k} {v:.4f}" for k, v in row.items() if k.startswith("eval/")]
    parts.append(f"up {row['bytes_up'] / 1e6:.2f} MB down {row['bytes_down'] / 1e6:.2f} MB")
    parts.append(f"sim {row['sim_time_s']:.1f} s")
    return " | ".join(parts)


def run_experiment(cfg: Config, out: str | None = None, resume: Path | None = None, stop_after: int | None = None,
                   changed: dict | None = None) -> Path:
    """Run (or resume) one experiment; returns its run directory.

    The directory is locked for the whole run (one writer). ``changed``: the ``--set`` settings a
    resume changes (colora.rundir.RESUMABLE_KEYS), recorded in the run directory. ``stop_after``
    ends the process's work after that round, as an interruption would (the run directory then
    resumes with ``colora run --resume``).
    """
    fresh = resume is None and not (out is not None and Path(out).exists())
    run_dir = resume if resume is not None else rundir.new_run_dir(cfg, out)
    try:
        with rundir.RunLock(run_dir):
            if resume is None:
                rundir.clear_unfinished(run_dir)  # a run that stopped before its first checkpoint starts again
                rundir.pin_inputs(cfg)
            else:
                rundir.check_pins(cfg, run_dir)
            _run(cfg, run_dir, resume is not None, stop_after, changed or {})
    except BaseException:
        if fresh and not (run_dir / "metrics.jsonl").exists():
            shutil.rmtree(run_dir, ignore_errors=True)  # failed during setup: remove the folder this call made
        raise
    return run_dir


def _run(cfg: Config, run_dir: Path, resume: bool, stop_after: int | None, changed: dict) -> None:
    """Setup, the round loop, checkpoints and export (the caller holds the run directory's lock)."""
    engine = InProcessEngine(cfg)
    algo, counters = engine.algorithm, {"bytes_up": 0, "bytes_down": 0, "sim_time_s": 0.0, "wall_time_s": 0.0}
    losses: list[float] = []  # train losses since the last eval row
    log = rundir.MetricsLog(run_dir, cfg.log.tensorboard)
    if resume:
        ckpt = rundir.load_checkpoint(run_dir)
        algo.load_state_dict(ckpt["algorithm"])
        engine.load_state_dict(ckpt["engine"])
        counters, losses, start = ckpt["counters"], ckpt["losses"], ckpt["round"]
        if cfg.rounds < start:
            raise ColoraError(f"--resume {run_dir}: rounds={cfg.rounds} but the run has finished {start} rounds already")
        rows = rundir.truncate_metrics(run_dir, start)
        if changed:
            rundir.record_changes(run_dir, cfg, changed, start)
    else:
        start, rows = 0, [_begin(cfg, run_dir, engine, counters, log)]
    began = time.perf_counter() - counters["wall_time_s"]
    bar = tqdm(range(start + 1, cfg.rounds + 1), initial=start, total=cfg.rounds, desc=cfg.algorithm,
               unit="round", disable=None if cfg.log.progress else True)  # None: off when not a terminal
    try:
        for rnd in bar:
            res = _checked_round(cfg, algo, rnd, run_dir)
            counters["bytes_up"] += res.bytes_up
            counters["bytes_down"] += res.bytes_down
            counters["sim_time_s"] += res.sim_time_s
            counters["wall_time_s"] = time.perf_counter() - began
            losses.append(res.train_loss)
            row = {"round": rnd, **counters, "train_loss": float(np.mean(losses)), **res.extra}
            if rnd % cfg.eval.every == 0 or rnd == cfg.rounds:
                row.update(engine.evaluate(algo.global_state()))
                rows.append(row)
                log.append(row)
                losses = []
                bar.set_postfix({k[5:]: f"{v:.3f}" for k, v in row.items() if k.startswith("eval/")})
            tqdm.write(_log_line(row, cfg.rounds))
            rundir.save_checkpoint(run_dir, {"round": rnd, "algorithm": algo.state_dict(), "engine": engine.state_dict(),
                                             "counters": counters, "losses": losses})
            if stop_after is not None and rnd >= stop_after and rnd < cfg.rounds:
                return
    finally:
        bar.close()
        log.close()
    engine.export(algo.global_state(), run_dir / "adapter")
    rundir.write_json(run_dir, "summary.json", rundir.summarize(cfg, rows, engine.main_metric, counters, extra=algo.summary()))


def _begin(cfg: Config, run_dir: Path, engine: InProcessEngine, counters: dict, log: rundir.MetricsLog) -> dict:
    """A new run's files before round 1 (config, partition, system) and its round-0 evaluation."""
    rundir.write_config(run_dir, cfg)
    info = engine.partition_report()
    rundir.write_json(run_dir, "partition.json", info)
    rundir.write_json(run_dir, "system.json", engine.system_report())
    tqdm.write(_partition_text(cfg, info))
    if engine.memory["over"]:
        over, mem = engine.memory["over"], engine.memory
        tqdm.write(f"colora: warning: {len(over)} of {len(mem['need_gb'])} clients may not hold their part of the model "
                   f"(e.g. client {over[0]}: ~{mem['need_gb'][over[0]]:.3g} GB needed, memory_gb={mem['memory_gb'][over[0]]}); "
                   f"system.enforce_memory: true stops such runs")
    row = {"round": 0, **counters, "train_loss": None, **engine.evaluate(engine.algorithm.global_state())}
    log.append(row)
    tqdm.write(_log_line(row, cfg.rounds))
    return row


def _suspect(cfg: Config) -> tuple[str, str]:
    """(the setting most likely at fault, the step that produced the state) for a non-finite global state."""
    if cfg.algorithm == "fedavg" and cfg.federation.server_optimizer != "none":
        return "federation.server_lr", f"the server optimizer (federation.server_optimizer={cfg.federation.server_optimizer})"
    if cfg.algorithm == "declora":
        return "train.lr", "gossip mixing"
    if cfg.federation.aggregator == "stack" and cfg.algorithm == "fedavg":
        return "train.lr", "stacking the clients' updates"
    return "train.lr", "aggregation" if cfg.algorithm != "central" else "local training"


# A global adapter entry beyond this has diverged, though finite: trained LoRA factors and heads are
# O(1), and checkpointing a 1e27-sized state would leave a "last good checkpoint" that overflows in
# the next forward pass whatever the resumed settings.
DIVERGED = 1.0e6


def _checked_round(cfg: Config, algo, rnd: int, run_dir: Path):
    """``algo.run_round(rnd)``, then stop the run if its global state is not finite (or has diverged
    past DIVERGED): before it is evaluated, checkpointed or exported, so the last good checkpoint
    (round ``rnd`` - 1) stays."""
    setting, stage = _suspect(cfg)
    try:
        res = algo.run_round(rnd)
        bad = [k for k, t in algo.global_state().items() if not torch.isfinite(t).all() or t.abs().max() > DIVERGED]
        if bad:
            raise NonFiniteError(f"the global adapter holds NaN, inf or entries above {DIVERGED:g} after {stage} "
                                 f"({len(bad)} tensors, e.g. {bad[0]})", setting)
    except NonFiniteError as exc:
        # A server optimizer's huge (finite) state makes the clients overflow next round: blame it first.
        setting = setting if setting.startswith("federation.") else exc.setting
        section, key = setting.split(".")
        value = getattr(getattr(cfg, section), key)
        where = (f"the last good checkpoint (round {rnd - 1}) is kept: colora run --resume {run_dir} --set {setting}=<smaller>"
                 if rnd > 1 else f"no round had finished: start again with colora run CONFIG --out {run_dir} --set {setting}=<smaller>")
        raise ColoraError(f"round {rnd}: {exc}; {setting}={value:g} is the likely cause (model.lora.alpha="
                          f"{cfg.model.lora.alpha:g} scales every update too). Nothing of round {rnd} was saved; {where}") from None
    return res
