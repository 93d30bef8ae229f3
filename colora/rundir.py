"""The run directory (CONTRACT.md): config.yaml, metrics.jsonl, summary.json, adapter/, plus
partition.json (per-client label histograms) and checkpoint/ (for ``colora run --resume``)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
import shutil
import subprocess
import time
from pathlib import Path

import filelock
import torch

from .config import INPUT_KEYS, ColoraError, Config, build_config, dump_config, parse_override, quote, read_yaml

CHECKPOINT = "checkpoint/state.pt"
# Marks a folder as a colora run directory (so --out may reuse it) and holds its lock (one writer).
MARKER = ".colora-run"
LOCK = ".colora-run.lock"
# Keys a checkpoint must hold; anything else is not a colora checkpoint.
CHECKPOINT_KEYS = {"round", "algorithm", "engine", "counters", "losses"}


def is_run_dir(path: Path) -> bool:
    """A folder colora made for a run (its marker, or a config.yaml from before the marker existed)."""
    return (path / MARKER).is_file() or (path / "config.yaml").is_file()


def new_run_dir(cfg: Config, out: str | None) -> Path:
    """The run directory for a new run: ``out`` if given, else ``runs/<config name>-<timestamp>``.

    ``out`` may be a new or empty folder, or a run directory of a run that stopped before its first
    checkpoint (started again from scratch). A file, a folder holding anything else, or a run with a
    checkpoint (``--resume`` continues it) is refused, so nothing of the user's is overwritten.
    """
    path = Path(out) if out else Path("runs") / f"{cfg.name or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"
    if path.exists() and not path.is_dir():
        raise ColoraError(f"--out {path}: is a file, not a folder; give a new or empty folder")
    if path.is_dir() and any(path.iterdir()):
        if not is_run_dir(path):
            raise ColoraError(f"--out {path}: holds files that are not a colora run; give a new or empty folder")
        if (path / CHECKPOINT).exists():
            raise ColoraError(f"--out {path}: already holds a run (use --resume {path} to continue it, or another folder)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        (path / MARKER).touch()
    except OSError as exc:
        raise ColoraError(f"--out {path}: cannot create the run directory there ({exc.strerror}); give a writable folder") from None
    return path


def clear_unfinished(path: Path) -> None:
    """Remove what a run that stopped before its first checkpoint left (call under its lock)."""
    if (path / CHECKPOINT).exists():
        raise ColoraError(f"--out {path}: a run there has checkpointed meanwhile; use --resume {path}")
    for child in path.iterdir():
        if child.name in (MARKER, LOCK):
            continue
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()


class RunLock:
    """One writer per run directory: an OS file lock (released when the process ends, even by kill -9).

    A second ``colora run --out`` or ``--resume`` into a directory in use fails at once (exit 2)."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.lock = filelock.FileLock(str(run_dir / LOCK), timeout=0)

    def __enter__(self) -> "RunLock":
        try:
            self.lock.acquire()
        except filelock.Timeout:
            raise ColoraError(f"{self.run_dir} is in use by another colora process (a run or --resume holds it); "
                              f"wait for it to finish, or use another folder") from None
        except OSError as exc:
            raise ColoraError(f"{self.run_dir}: cannot lock the run directory ({exc.strerror}); give a writable folder") from None
        return self

    def __exit__(self, *exc) -> None:
        self.lock.release()


def is_locked(run_dir: Path) -> bool:
    """Whether a live process holds ``run_dir``'s lock (checked by trying to take it)."""
    if not (run_dir / LOCK).exists():
        return False
    try:
        with filelock.FileLock(str(run_dir / LOCK), timeout=0):
            return False
    except filelock.Timeout:
        return True


def file_digest(path: Path) -> str:
    """sha256 of a file, or of a folder's files (relative names and contents, in sorted order)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path)).encode() + b"\0" if f != path else b"")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def input_files(cfg: Config) -> dict[str, Path]:
    """The files and folders ``cfg`` reads, by config key (the hub and built-in names are not files)."""
    values = {"data.path": cfg.data.path, "system.presets_file": cfg.system.presets_file,
              "gossip.topology": cfg.gossip.topology if cfg.algorithm == "declora" else None}
    return {k: Path(v) for k in INPUT_KEYS if (v := values[k]) is not None and Path(v).exists()}


def pin_inputs(cfg: Config) -> None:
    """Record the content hash of every input file in ``cfg.pinned_inputs`` (saved in config.yaml)."""
    cfg.pinned_inputs = {k: file_digest(p) for k, p in input_files(cfg).items()}


def check_pins(cfg: Config, run_dir: Path) -> None:
    """Refuse to resume when an input file pinned at the start is missing or changed."""
    for key, digest in cfg.pinned_inputs.items():
        section, field = key.split(".")
        path = Path(getattr(getattr(cfg, section), field))
        if not path.exists():
            raise ColoraError(f"--resume {run_dir}: {key}={quote(str(path))} no longer exists; the run read it at its start")
        if file_digest(path) != digest:
            raise ColoraError(f"--resume {run_dir}: {key}={quote(str(path))} changed since the run started "
                              f"(sha256 differs); restore it, or start a new run")


# Settings ``colora run --resume DIR --set KEY=VALUE`` may change mid-run: they change how the
# remaining rounds run, not what the finished ones mean (data, model, partition and clients stay).
RESUMABLE_KEYS = ("rounds", "train.lr", "train.lr_schedule", "train.warmup_rounds", "train.max_grad_norm",
                  "federation.server_lr", "eval.every", "eval.generate", "log.progress", "log.tensorboard",
                  # where client work runs never changes what it computes (tests/test_engines.py)
                  "engine.kind", "engine.workers", "engine.address", "engine.device", "engine.fuse")


def resume_config(run_dir: Path, overrides: list[str]) -> tuple[Config, dict]:
    """The run's saved config with ``--set`` overrides of RESUMABLE_KEYS applied, and those changes;
    any other key is refused (start a new run to change it)."""
    cfg = read_config(run_dir)
    changed = dict(parse_override(o) for o in overrides)
    for key in changed:
        if key not in RESUMABLE_KEYS:
            raise ColoraError(f"--resume --set {key[:80]}: cannot change in a run under way (it would change what the finished "
                              f"rounds mean); keys that can: {', '.join(RESUMABLE_KEYS)}; start a new run for the rest")
    return (build_config(cfg.model_dump(mode="json"), changed) if changed else cfg), changed


def record_changes(run_dir: Path, cfg: Config, changed: dict, at_round: int) -> None:
    """Save settings changed on resume: config.yaml gets the new values, changes.jsonl one line
    per resume (round it took effect after, the changes, the time)."""
    write_config(run_dir, cfg)
    dumped = cfg.model_dump(mode="json")
    values = {}  # the validated values ("1e300" from --set is the float 1e300 here)
    for key in changed:
        node = dumped
        for part in key.split("."):
            node = node[part]
        values[key] = node
    with open(run_dir / "changes.jsonl", "a") as fh:
        fh.write(json.dumps({"after_round": at_round, "set": values, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")


def write_config(run_dir: Path, cfg: Config) -> None:
    _atomic_write(run_dir / "config.yaml", lambda p: p.write_text(dump_config(cfg)))


def read_config(run_dir: Path) -> Config:
    """The config.yaml of a run directory, validated (exit 2 with one line if it is not one)."""
    if not run_dir.is_dir():
        raise ColoraError(f"--resume {run_dir}: no such folder")
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ColoraError(f"--resume {run_dir}: no config.yaml there; is it a colora run directory?")
    raw = read_yaml(path, "run config")
    if not isinstance(raw, dict):
        raise ColoraError(f"--resume {run_dir}: config.yaml does not hold a colora config")
    return build_config(raw)


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
    """The rows of metrics.jsonl. A half-written last line (the process died mid-write) is dropped;
    any other line that is not a JSON object with a round is an error naming its line number."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise ColoraError(f"{path}: not UTF-8 text; this is not a colora metrics file") from None
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("round"), int):
            if i == len(lines) - 1:
                break  # cut short by a kill: the checkpoint, not this row, is the run's state
            raise ColoraError(f"{path}, line {i + 1}: not a metrics row (a JSON object with a round)")
        rows.append(row)
    return rows


def truncate_metrics(run_dir: Path, last_round: int) -> list[dict]:
    """Drop rows written after the last checkpoint (a crash between the two), return the rest."""
    rows = [r for r in read_metrics(run_dir) if r["round"] <= last_round]
    _atomic_write(run_dir / "metrics.jsonl", lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in rows)))
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
    """The last checkpoint; a missing, truncated, empty or foreign one is a one-line ColoraError
    (``weights_only``: nothing but tensors and plain containers is ever unpickled)."""
    path = run_dir / CHECKPOINT
    if not path.is_file():
        raise ColoraError(f"--resume {run_dir}: no checkpoint there (the run stopped before its first round finished); "
                          f"start it again with colora run CONFIG --out {run_dir}")
    try:
        ckpt = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - truncated zip, empty file, foreign pickle: one answer
        raise ColoraError(f"--resume {run_dir}: {CHECKPOINT} cannot be read ({type(exc).__name__}: truncated, empty or "
                          f"not a colora checkpoint); start a new run") from None
    if not isinstance(ckpt, dict) or not CHECKPOINT_KEYS <= set(ckpt):
        raise ColoraError(f"--resume {run_dir}: {CHECKPOINT} is not a colora checkpoint (missing round, state or counters); start a new run")
    return ckpt


def write_json(run_dir: Path, name: str, obj) -> None:
    _atomic_write(run_dir / name, lambda p: p.write_text(json.dumps(obj, indent=2) + "\n"))


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def software() -> dict:
    """What produced a result (summary.json's ``software``): Python, the libraries that decide the
    numbers, colora's version and, when colora runs from a git checkout, its commit (``+dirty``
    when tracked files differ from it), so a recorded benchmark says which code it measured."""
    import peft
    import transformers

    from . import __version__

    return {"colora": __version__, "commit": _source_commit(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def _source_commit() -> str | None:
    """The commit of the checkout colora's source lies in (None outside one, or without git): only
    when the package's parent folder is the checkout's top, so an installed copy that merely sits
    inside some repository (a venv in a project) is not credited with that project's commit."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != root:
        return None
    head, changed = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    return None if head is None else head + ("+dirty" if changed else "")


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
        "software": software(),
    }
    return {**summary, **{k: v for k, v in (extra or {}).items() if k not in summary}}
