"""The experiment: a run directory, the round loop, checkpoints, evaluation rows and export, written
once; the engine (``colora.engines``) builds the model and runs the clients' work.

Dependencies point one way: cli -> experiment -> engines -> algorithms -> building blocks.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import rundir
from .config import ColoraError, Config, NonFiniteError
from .engines import Engine


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
                   changed: dict | None = None, remote=None) -> Path:
    """Run (or resume) one experiment; returns its run directory.

    The directory is locked for the whole run (one writer). ``changed``: the ``--set`` settings a
    resume changes (colora.rundir.RESUMABLE_KEYS), recorded in the run directory. ``stop_after``
    ends the process's work after that round, as an interruption would (the run directory then
    resumes with ``colora run --resume``). ``remote``: the data owners of a deployed run
    (colora.deploy.remote.RemoteClients) run the clients' work instead of a local executor.
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
            _run(cfg, run_dir, resume is not None, stop_after, changed or {}, remote)
    except BaseException:
        if fresh and not (run_dir / "metrics.jsonl").exists():
            shutil.rmtree(run_dir, ignore_errors=True)  # failed during setup: remove the folder this call made
        raise
    return run_dir


def _run(cfg: Config, run_dir: Path, resume: bool, stop_after: int | None, changed: dict, remote=None) -> None:
    """Setup, the round loop, checkpoints and export (the caller holds the run directory's lock)."""
    with Engine(cfg, remote) as engine:
        engine.start()
        _rounds(cfg, engine, run_dir, resume, stop_after, changed)


def _rounds(cfg: Config, engine: Engine, run_dir: Path, resume: bool, stop_after: int | None, changed: dict) -> None:
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
            row = {"round": rnd, **counters, "train_loss": float(np.mean(losses)), **res.extra, **engine.round_report()}
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
    rundir.write_json(run_dir, "summary.json", rundir.summarize(cfg, rows, engine.main_metric, counters,
                                                                  extra={**algo.summary(), "engine": engine.summary()}))


def _begin(cfg: Config, run_dir: Path, engine: Engine, counters: dict, log: rundir.MetricsLog) -> dict:
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
