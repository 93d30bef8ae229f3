"""The run directory (CONTRACT.md): config.yaml, metrics.jsonl, summary.json, adapter/, plus
partition.json (per-client label histograms) and checkpoint/ (for ``colora run --resume``)."""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

import torch
import yaml

from .config import ColoraError, Config, build_config, dump_config

CHECKPOINT = "checkpoint/state.pt"


def new_run_dir(cfg: Config, out: str | None) -> Path:
    """``out`` if given, else ``runs/<config name>-<timestamp>``; refuses to overwrite a finished run."""
    path = Path(out) if out else Path("runs") / f"{cfg.name or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"
    if (path / "metrics.jsonl").exists():
        raise ColoraError(f"--out {path}: already holds a run (use --resume {path} to continue it, or another folder)")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_config(run_dir: Path, cfg: Config) -> None:
    (run_dir / "config.yaml").write_text(dump_config(cfg))


def read_config(run_dir: Path) -> Config:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ColoraError(f"--resume {run_dir}: no config.yaml there; is it a colora run directory?")
    return build_config(yaml.safe_load(path.read_text()))


def append_metrics(run_dir: Path, row: dict) -> None:
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")


class MetricsLog:
    """Appends evaluation rows to metrics.jsonl and, with ``log.tensorboard``, to TensorBoard scalars
    under ``run_dir/tensorboard`` (one tag per numeric key, step = round; tensorboardX writes the
    event files, so TensorBoard itself is only needed to view them)."""

    def __init__(self, run_dir: Path, tensorboard: bool):
        self.run_dir, self.writer = run_dir, None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                raise ColoraError("log.tensorboard: true needs tensorboardX (pip install 'colora[tb]')") from None
            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def append(self, row: dict) -> None:
        append_metrics(self.run_dir, row)
        if self.writer is not None:
            for key, value in row.items():
                if key != "round" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, row["round"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(run_dir: Path, last_round: int) -> list[dict]:
    """Drop rows written after the last checkpoint (a crash between the two), return the rest."""
    rows = [r for r in read_metrics(run_dir) if r["round"] <= last_round]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, payload: dict) -> None:
    """Everything a resumed run needs, written atomically (a crash mid-write keeps the old one)."""
    _atomic_write(run_dir / CHECKPOINT, lambda p: torch.save(payload, p))


def load_checkpoint(run_dir: Path) -> dict:
    path = run_dir / CHECKPOINT
    if not path.is_file():
        raise ColoraError(f"--resume {run_dir}: no checkpoint there (no round finished yet?)")
    return torch.load(path, weights_only=True)


def write_json(run_dir: Path, name: str, obj) -> None:
    _atomic_write(run_dir / name, lambda p: p.write_text(json.dumps(obj, indent=2) + "\n"))


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def summarize(cfg: Config, rows: list[dict], main_metric: str, counters: dict, extra: dict | None = None) -> dict:
    """summary.json: last eval row's metrics, the best row by the main metric, totals, plus
    ``extra`` (algorithm-specific sections; a contract key of the same name wins)."""
    higher = main_metric not in ("eval/loss", "eval/perplexity")
    evals = [r for r in rows if main_metric in r]
    best = (max if higher else min)(evals, key=lambda r: r[main_metric]) if evals else {}
    pick = lambda r: {k: v for k, v in r.items() if k.startswith("eval/") or k in ("round", "train_loss")}  # noqa: E731
    summary = {
        "algorithm": cfg.algorithm,
        "rounds": rows[-1]["round"] if rows else 0,
        "main_metric": main_metric,
        "final": pick(rows[-1]) if rows else {},
        "best": pick(best),
        "bytes_up": counters["bytes_up"],
        "bytes_down": counters["bytes_down"],
        "sim_time_s": counters["sim_time_s"],
        "wall_time_s": counters["wall_time_s"],
        "peak_rss_mb": peak_rss_mb(),
    }
    return {**summary, **{k: v for k, v in (extra or {}).items() if k not in summary}}
