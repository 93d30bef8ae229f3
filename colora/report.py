"""Comparison reports over colora run directories.

`write_report` reads one or more run directories (``config.yaml``, ``metrics.jsonl``,
``summary.json`` and optionally ``partition.json``) and writes, into one output folder:

- ``metric_vs_round.png``, ``metric_vs_bytes.png``, ``metric_vs_time.png``: the main metric
  against communication rounds, total communicated bytes and simulated time;
- ``loss_vs_round.png``: training loss and evaluation loss per round;
- ``label_histograms.png``: per-client label distributions (only if a run has ``partition.json``);
- ``summary.csv``: one row per run with final/best values, costs and time-to-target columns;
- ``seeds.csv``: when a setting ran at several seeds, its final metric as mean ± std over them;
- ``index.html``: a self-contained page with the tables and the plots.

This module needs matplotlib, numpy and PyYAML only, never torch, so reports can be built on a
machine that did not train.
"""

from __future__ import annotations

import csv
import dataclasses
import html
import json
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import yaml

from .config import ColoraError

__all__ = [
    "HISTOGRAM_FILE",
    "PLOT_FILES",
    "ReportError",
    "Run",
    "higher_is_better",
    "load_run",
    "main_metric",
    "parse_target",
    "time_to_target",
    "write_report",
]

PLOT_FILES = (
    "metric_vs_round.png",
    "metric_vs_bytes.png",
    "metric_vs_time.png",
    "loss_vs_round.png",
)
HISTOGRAM_FILE = "label_histograms.png"

# Metric leaf names (the part after the last "/") for which smaller values are better.
_LOWER_IS_BETTER = frozenset(
    {"loss", "perplexity", "ppl", "mse", "rmse", "mae", "error", "err", "wer", "cer"}
)

_TTT_KEYS = ("round", "sim_time_s", "bytes", "wall_time_s")

# A run's key, its header in the HTML table and how its value is formatted there.
_RUN_COLUMNS = (
    ("label", "Run", "text"),
    ("algorithm", "Algorithm", "text"),
    ("model", "Model", "text"),
    ("data", "Data", "text"),
    ("clients", "Clients", "int"),
    ("partition", "Partition", "text"),
    ("aggregator", "Aggregator", "text"),
    ("seed", "Seed", "int"),
    ("rounds", "Rounds", "int"),
    ("main_metric", "Metric", "text"),
    ("final", "Final", "metric"),
    ("best", "Best", "metric"),
    ("bytes_up", "Bytes up", "bytes"),
    ("bytes_down", "Bytes down", "bytes"),
    ("sim_time_s", "Sim. time", "seconds"),
    ("wall_time_s", "Wall time", "seconds"),
    ("peak_rss_mb", "Peak RSS", "mb"),
)
_TARGET_COLUMNS = (
    ("target", "Target", "text"),
    ("target_round", "Round", "int"),
    ("target_sim_time_s", "Sim. time", "seconds"),
    ("target_bytes", "Communication", "bytes"),
    ("target_wall_time_s", "Wall time", "seconds"),
)

_STYLE = {
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linestyle": "-",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "font.size": 10,
    "legend.fontsize": "small",
    "legend.framealpha": 0.85,
    "figure.dpi": 120,
    "savefig.dpi": 120,
}
_FIGSIZE = (7.0, 4.4)
# Up to this many points per line get markers; denser lines would be cluttered by them.
_MARKER_MAX_POINTS = 30


class ReportError(ColoraError, ValueError):
    """Unusable report input (missing or malformed run directory, bad target); one-line message."""


@dataclass
class Run:
    """One loaded run directory.

    ``label`` is the config's top-level ``name`` if set, else the directory name. ``metrics``
    holds the rows of ``metrics.jsonl`` in round order; ``summary`` is ``summary.json`` (empty
    if absent) and ``partition`` is ``partition.json`` or None.
    """

    dir: Path
    label: str
    config: dict
    metrics: list[dict]
    summary: dict
    partition: dict | None = None


# ----------------------------------------------------------------------------- loading


def load_run(run_dir: str | Path) -> Run:
    """Load a run directory written by ``colora run``.

    Raises ReportError (a ValueError) with a one-line message naming the path when the folder
    does not exist, ``metrics.jsonl`` is missing or has no rows, or a file is malformed.
    ``config.yaml``, ``summary.json`` and ``partition.json`` are optional.
    """
    path = Path(run_dir)
    if not path.exists():
        raise ReportError(f"run directory not found: {path}")
    if not path.is_dir():
        raise ReportError(f"not a run directory (not a folder): {path}")
    metrics_path = path / "metrics.jsonl"
    if not metrics_path.is_file():
        raise ReportError(f"missing {metrics_path}: not a colora run directory")
    metrics = _read_metrics(metrics_path)
    if not metrics:
        raise ReportError(f"{metrics_path} has no evaluation rows")

    config = _read_yaml(path / "config.yaml") or {}
    summary = _read_json(path / "summary.json") or {}
    partition = _read_json(path / "partition.json")
    name = config.get("name")
    label = name if isinstance(name, str) and name.strip() else (path.resolve().name or str(path))
    return Run(
        dir=path, label=label, config=config, metrics=metrics, summary=summary, partition=partition
    )


def _read_metrics(path: Path) -> list[dict]:
    lines = [(i, line.strip()) for i, line in enumerate(_read_text(path).splitlines(), 1)]
    lines = [(i, line) for i, line in lines if line]
    rows: list[dict] = []
    for pos, (lineno, line) in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            # A run killed mid-write leaves a truncated last line; the rows before it are
            # still a valid (partial) history worth reporting.
            if pos == len(lines) - 1 and rows:
                break
            raise ReportError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise ReportError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return _dedupe_rounds(rows)


def _dedupe_rounds(rows: list[dict]) -> list[dict]:
    # A resumed run may re-log a round it had evaluated before being interrupted; keep the
    # latest row per round so lines do not double back.
    if not all(_is_int(row.get("round")) for row in rows):
        return rows
    by_round: dict[int, dict] = {}
    for row in rows:
        by_round[row["round"]] = row
    return [by_round[r] for r in sorted(by_round)]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportError(f"cannot read {path}: {_one_line(exc)}") from None


def _read_yaml(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(_read_text(path))
    except yaml.YAMLError as exc:
        raise ReportError(f"{path}: invalid YAML ({_one_line(exc)})") from None
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a mapping, got {type(data).__name__}")
    return data


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


# ----------------------------------------------------------------------------- metrics


def higher_is_better(metric: str) -> bool:
    """True unless the metric is a loss or error-like quantity (loss, perplexity, mse, ...)."""
    leaf = metric.rsplit("/", 1)[-1].lower()
    return not (leaf in _LOWER_IS_BETTER or leaf.endswith("loss"))


def main_metric(runs: Run | Iterable[Run]) -> str:
    """The metric a comparison is about.

    The first ``summary["main_metric"]`` found among the runs; else the first ``eval/*`` key
    (other than ``eval/loss``) of a run's last metrics row, trying runs in order; else
    ``"eval/loss"``. Use `higher_is_better` for its direction (``eval/perplexity`` and
    ``eval/loss`` are lower-is-better).
    """
    runs = [runs] if isinstance(runs, Run) else list(runs)
    for run in runs:
        name = run.summary.get("main_metric")
        if isinstance(name, str) and name:
            return name
    for run in runs:
        for key, value in run.metrics[-1].items():
            if key.startswith("eval/") and key != "eval/loss" and _is_number(value):
                return key
    return "eval/loss"


def time_to_target(run: Run, metric: str, target: float) -> dict:
    """Cost of reaching ``target`` on ``metric`` for the first time.

    The first metrics row whose value is ``>= target`` (``<= target`` for lower-is-better
    metrics such as losses and perplexity). Returns ``{"round", "sim_time_s", "bytes",
    "wall_time_s"}`` from that row, with ``bytes = bytes_up + bytes_down``; all values are
    None when the target is never reached.
    """
    higher = higher_is_better(metric)
    for row in run.metrics:
        value = _num(row.get(metric))
        if value is None:
            continue
        if (value >= target) if higher else (value <= target):
            return {
                "round": row.get("round"),
                "sim_time_s": _num(row.get("sim_time_s")),
                "bytes": _row_bytes(row),
                "wall_time_s": _num(row.get("wall_time_s")),
            }
    return dict.fromkeys(_TTT_KEYS)


def parse_target(text: str) -> tuple[str, float]:
    """Parse ``METRIC=VALUE`` (as given to ``--target``) into ``(metric, value)``.

    A bare metric name such as ``accuracy`` means ``eval/accuracy``; ``train_loss`` and names
    that already contain ``/`` are kept as given.
    """
    name, sep, value = text.partition("=")
    name = name.strip()
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not sep or not name or not math.isfinite(number):
        raise ReportError(f"target must be METRIC=VALUE (e.g. eval/accuracy=0.8), got {text!r}")
    if "/" not in name and name != "train_loss":
        name = f"eval/{name}"
    return name, number


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _num(value: Any) -> float | None:
    """A finite number as float, else None (missing, null, NaN, inf or not numeric)."""
    if not _is_number(value) or not math.isfinite(value):
        return None
    return float(value)


def _row_bytes(row: dict) -> int | float | None:
    parts = [row.get(k) for k in ("bytes_up", "bytes_down")]
    parts = [p for p in parts if _is_number(p) and math.isfinite(p)]
    return sum(parts) if parts else None


def _final_value(run: Run, metric: str) -> float | None:
    final = run.summary.get("final")
    value = _num(final.get(metric)) if isinstance(final, dict) else None
    if value is not None:
        return value
    for row in reversed(run.metrics):
        value = _num(row.get(metric))
        if value is not None:
            return value
    return None


def _best_value(run: Run, metric: str) -> float | None:
    best = run.summary.get("best")
    value = _num(best.get(metric)) if isinstance(best, dict) else None
    if value is not None:
        return value
    values = [v for v in (_num(row.get(metric)) for row in run.metrics) if v is not None]
    if not values:
        return None
    return max(values) if higher_is_better(metric) else min(values)


def _cost(run: Run, key: str) -> float | None:
    # summary.json holds the run's totals; the last metrics row is the best fallback when a
    # run was interrupted before writing it.
    value = run.summary.get(key)
    if _is_number(value):
        return value
    for row in reversed(run.metrics):
        if _is_number(row.get(key)):
            return row[key]
    return None


def _config_get(config: dict, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


# ----------------------------------------------------------------------------- tables


def _summary_rows(
    runs: Sequence[Run], metric: str, target: tuple[str, float] | None
) -> list[dict]:
    rows = []
    for run in runs:
        rounds = run.summary.get("rounds")
        if not _is_int(rounds):
            rounds = max((r["round"] for r in run.metrics if _is_int(r.get("round"))), default=None)
        row = {
            "label": run.label,
            "algorithm": run.summary.get("algorithm") or run.config.get("algorithm"),
            "model": _config_get(run.config, "model.name"),
            "data": _config_get(run.config, "data.name"),
            "clients": _config_get(run.config, "clients.num"),
            "partition": _config_get(run.config, "clients.partition"),
            "aggregator": _config_get(run.config, "federation.aggregator"),
            "seed": run.config.get("seed"),
            "rounds": rounds,
            "main_metric": metric,
            "final": _final_value(run, metric),
            "best": _best_value(run, metric),
            "bytes_up": _cost(run, "bytes_up"),
            "bytes_down": _cost(run, "bytes_down"),
            "sim_time_s": _cost(run, "sim_time_s"),
            "wall_time_s": _cost(run, "wall_time_s"),
            "peak_rss_mb": _num(run.summary.get("peak_rss_mb")),
        }
        if target is not None:
            reached = time_to_target(run, *target)
            row["target"] = _target_text(target)
            row.update({f"target_{k}": reached[k] for k in _TTT_KEYS})
        rows.append(row)
    return rows


def _target_text(target: tuple[str, float]) -> str:
    metric, value = target
    return f"{metric} {'>=' if higher_is_better(metric) else '<='} {value:g}"


def _write_csv(path: Path, rows: list[dict], columns: Sequence[str]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if row.get(c) is None else row[c] for c in columns])


def _format(value: Any, kind: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if kind == "text" or not _is_number(value):
        return str(value)
    if kind == "int":
        return str(int(value)) if float(value).is_integer() else f"{value:.4g}"
    if kind == "bytes":
        return _format_bytes(value)
    if kind == "seconds":
        return _format_seconds(value)
    if kind == "mb":
        return f"{value:.4g} MB"
    return f"{value:.4g}"


def _format_bytes(value: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.4g} {unit}"
    return f"{value:.4g} B"


def _time_unit(max_seconds: float) -> tuple[str, float]:
    if max_seconds < 120:
        return "s", 1.0
    if max_seconds < 7200:
        return "min", 60.0
    return "h", 3600.0


def _format_seconds(value: float) -> str:
    unit, scale = _time_unit(abs(value))
    return f"{value / scale:.4g} {unit}"


# ----------------------------------------------------------------------------- plots


def _pyplot():
    # Imported lazily so that loading runs (and `colora --help`) does not pay for matplotlib;
    # Agg is selected before pyplot so that reports render on headless machines.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _run_colors(n: int) -> list[str]:
    import matplotlib
    from matplotlib.colors import to_hex

    if n <= 10:
        cmap = matplotlib.colormaps["tab10"]
        return [to_hex(cmap(i)) for i in range(n)]
    if n <= 20:
        # tab20 pairs each hue as dark, light; taking all dark shades first keeps
        # neighbouring runs in different hues.
        cmap = matplotlib.colormaps["tab20"]
        order = list(range(0, 20, 2)) + list(range(1, 20, 2))
        return [to_hex(cmap(i)) for i in order[:n]]
    cmap = matplotlib.colormaps["turbo"]
    return [to_hex(cmap(i / (n - 1))) for i in range(n)]


def _series(run: Run, y_key: str, x_of: Callable[[dict], Any]) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for row in run.metrics:
        x, y = _num(x_of(row)), _num(row.get(y_key))
        if x is not None and y is not None:
            xs.append(x)
            ys.append(y)
    return xs, ys


def _mpl_text(text: str) -> str:
    # Matplotlib renders "$...$" as mathtext and drops legend entries whose label starts
    # with "_"; run labels are user text and must appear verbatim.
    text = text.replace("$", r"\$")
    return " " + text if text.startswith("_") else text


def _round_of(row: dict) -> Any:
    return row.get("round")


def _line_kwargs(color: str, n_points: int) -> dict:
    kwargs = {"color": color, "linewidth": 1.6}
    if n_points <= _MARKER_MAX_POINTS:
        kwargs.update(marker="o", markersize=4)
    return kwargs


def _legend(ax, **kwargs) -> None:
    # Outside the axes so it never hides data; bbox_inches="tight" widens the image to fit.
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, **kwargs)


def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no data for {what}", transform=ax.transAxes, ha="center", va="center",
            color="0.45")


def _save(plt, fig, path: Path) -> None:
    try:
        fig.savefig(path, bbox_inches="tight")
    finally:
        plt.close(fig)


def _metric_label(metric: str) -> str:
    return f"{metric} ({'higher' if higher_is_better(metric) else 'lower'} is better)"


def _plot_metric(
    plt,
    runs: Sequence[Run],
    colors: Sequence[str],
    metric: str,
    x_of: Callable[[dict], Any],
    *,
    xlabel: str,
    x_unit: str | None,
    title: str,
    path: Path,
    target_value: float | None,
    log_x: bool = False,
    integer_x: bool = False,
) -> None:
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    fig, ax = plt.subplots(figsize=_FIGSIZE)
    drawn = False
    log_scale = False
    positive_x: list[float] = []
    for run, color in zip(runs, colors):
        xs, ys = _series(run, metric, x_of)
        if not xs:
            continue
        ax.plot(xs, ys, label=_mpl_text(run.label), **_line_kwargs(color, len(xs)))
        positive_x.extend(x for x in xs if x > 0)
        drawn = True
    if drawn:
        if target_value is not None:
            ax.axhline(target_value, color="0.35", linestyle=":", linewidth=1.2,
                       label=f"target {target_value:g}")
        _legend(ax)
    else:
        _no_data(ax, metric)
    if log_x and len(positive_x) >= 2 and max(positive_x) / min(positive_x) >= 100:
        # symlog rather than log: round 0 sits at x = 0 (nothing sent yet) and must stay
        # visible; the linear region ends at the decade below the smallest non-zero value.
        linthresh = 10.0 ** math.floor(math.log10(min(positive_x)))
        ax.set_xscale("symlog", linthresh=linthresh, linscale=0.5)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        # Autoscale margins would otherwise open a meaningless negative-bytes region.
        ax.set_xlim(0, max(positive_x) * 1.5)
        log_scale = True
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    notes = [n for n in (x_unit, "log scale" if log_scale else None) if n]
    ax.set_xlabel(f"{xlabel} ({', '.join(notes)})" if notes else xlabel)
    ax.set_ylabel(_metric_label(metric))
    ax.set_title(title)
    _save(plt, fig, path)


def _plot_losses(
    plt,
    runs: Sequence[Run],
    colors: Sequence[str],
    path: Path,
    target: tuple[str, float] | None,
) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=_FIGSIZE)
    handles, styles_used = [], set()
    styles = {"eval/loss": "-", "train_loss": "--"}
    for run, color in zip(runs, colors):
        drawn = False
        for key, style in styles.items():
            xs, ys = _series(run, key, _round_of)
            if xs:
                ax.plot(xs, ys, linestyle=style, **_line_kwargs(color, len(xs)))
                styles_used.add(key)
                drawn = True
        if drawn:
            label = _mpl_text(run.label)
            handles.append(Line2D([], [], color=color, linewidth=1.6, label=label))
    if handles:
        # One colour entry per run plus one line-style entry per loss keeps the legend at
        # runs + 2 entries instead of 2 x runs.
        for key, style in styles.items():
            if key in styles_used:
                handles.append(Line2D([], [], color="0.3", linestyle=style, label=key))
        if target is not None and target[0] in styles:
            ax.axhline(target[1], color="0.35", linestyle=":", linewidth=1.2)
            handles.append(
                Line2D([], [], color="0.35", linestyle=":", label=f"target {target[1]:g}")
            )
        _legend(ax, handles=handles)
    else:
        _no_data(ax, "train_loss / eval/loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("loss (lower is better)")
    ax.set_title("training and evaluation loss vs. round")
    _save(plt, fig, path)


def _histogram_matrix(partition: dict) -> tuple[list[list[float]], list[str]] | None:
    """Per-client counts (clients x labels) and label names, or None if unusable."""
    hist = partition.get("histogram")
    if isinstance(hist, list) and hist and all(isinstance(r, list) for r in hist):
        width = max(len(r) for r in hist)
        if width:
            matrix = [[float(_num(v) or 0.0) for v in r] + [0.0] * (width - len(r)) for r in hist]
            names = partition.get("label_names")
            names = [str(n) for n in names] if isinstance(names, list) else []
            names += [str(i) for i in range(len(names), width)]
            return matrix, names[:width]
    # Tasks without class labels (causal LM) only record client sizes.
    sizes = partition.get("sizes")
    if isinstance(sizes, list) and sizes:
        return [[float(_num(s) or 0.0)] for s in sizes], ["samples"]
    return None


def _plot_histograms(plt, runs: Sequence[Run], colors: Sequence[str], path: Path) -> None:
    import matplotlib
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    ncols = min(len(runs), 3)
    nrows = math.ceil(len(runs) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols + 0.6, 3.3 * nrows), squeeze=False)
    for ax, run, color in zip(axes.flat, runs, colors):
        parsed = _histogram_matrix(run.partition or {})
        ax.set_title(_mpl_text(run.label), color=color, fontweight="bold")
        if parsed is None:
            _no_data(ax, "partition")
            continue
        matrix, names = parsed
        counts = np.asarray(matrix, dtype=float)
        n_clients, n_labels = counts.shape
        cmap = matplotlib.colormaps["tab10" if n_labels <= 10 else "tab20"]
        x = np.arange(n_clients)
        bottom = np.zeros(n_clients)
        for j in range(n_labels):
            ax.bar(x, counts[:, j], bottom=bottom, width=0.85 if n_clients <= 50 else 1.0,
                   color=cmap(j % cmap.N), label=names[j], linewidth=0)
            bottom += counts[:, j]
        ax.grid(axis="x", visible=False)
        if n_clients <= 20:
            ax.set_xticks(x)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("client")
        ax.set_ylabel("samples")
        if 1 < n_labels <= 12:
            ax.legend(title="label", fontsize="x-small", title_fontsize="x-small", loc="best")
    for ax in list(axes.flat)[len(runs):]:
        ax.set_visible(False)
    fig.suptitle("label distribution per client")
    fig.tight_layout()
    _save(plt, fig, path)


def _write_plots(
    runs: Sequence[Run],
    colors: Sequence[str],
    metric: str,
    target: tuple[str, float] | None,
    out: Path,
) -> list[tuple[str, str]]:
    plt = _pyplot()
    target_value = target[1] if target is not None and target[0] == metric else None
    max_time = max((_num(r.get("sim_time_s")) or 0.0 for run in runs for r in run.metrics),
                   default=0.0)
    unit, scale = _time_unit(max_time)

    def sim_time(row: dict) -> float | None:
        value = _num(row.get("sim_time_s"))
        return None if value is None else value / scale

    def megabytes(row: dict) -> float | None:
        value = _row_bytes(row)
        return None if value is None else value / 1e6

    figures = [
        ("metric_vs_round.png", f"{metric} vs. communication round"),
        ("metric_vs_bytes.png", f"{metric} vs. total communication (up + down)"),
        ("metric_vs_time.png", f"{metric} vs. simulated time"),
        ("loss_vs_round.png", "training and evaluation loss vs. round"),
    ]
    with plt.rc_context(_STYLE):
        _plot_metric(plt, runs, colors, metric, _round_of, xlabel="round", x_unit=None,
                     title=figures[0][1], path=out / figures[0][0], target_value=target_value,
                     integer_x=True)
        _plot_metric(plt, runs, colors, metric, megabytes, xlabel="communication, up + down",
                     x_unit="MB", title=figures[1][1], path=out / figures[1][0],
                     target_value=target_value, log_x=True)
        _plot_metric(plt, runs, colors, metric, sim_time, xlabel="simulated time", x_unit=unit,
                     title=figures[2][1], path=out / figures[2][0], target_value=target_value)
        _plot_losses(plt, runs, colors, out / figures[3][0], target)

        with_partition = [(run, c) for run, c in zip(runs, colors) if run.partition is not None]
        hist_path = out / HISTOGRAM_FILE
        if with_partition:
            _plot_histograms(plt, [r for r, _ in with_partition], [c for _, c in with_partition],
                             hist_path)
            figures.append((HISTOGRAM_FILE, "label distribution per client"))
        elif hist_path.exists():
            # A previous report into the same folder may have left one; it would describe
            # other runs than this page.
            hist_path.unlink()
    return figures


# ----------------------------------------------------------------------------- html

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
 margin:2rem auto;max-width:1280px;padding:0 1rem;color:#222;line-height:1.45}
h1{font-size:1.6rem;margin:0 0 .2rem}
h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.25rem}
.meta{color:#666;margin:0}
.table-wrap{overflow-x:auto}
table{border-collapse:collapse;font-size:.88rem;margin:.5rem 0}
th,td{padding:.35rem .65rem;border-bottom:1px solid #e6e6e6;white-space:nowrap}
th{background:#f4f5f7;font-weight:600;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}
td.missing{color:#999}
tbody tr:hover td{background:#fafbfc}
.swatch{display:inline-block;width:.8em;height:.8em;border-radius:2px;margin-right:.45em;
 vertical-align:-.05em}
.figures{display:grid;grid-template-columns:repeat(auto-fit,minmax(520px,1fr));gap:1.5rem}
figure{margin:0}
figure img{max-width:100%;height:auto;border:1px solid #eee;border-radius:4px}
figcaption{color:#555;font-size:.85rem;margin-top:.25rem}
"""


def _html_table(
    rows: Sequence[dict],
    columns: Sequence[tuple[str, str, str]],
    colors: Sequence[str],
    *,
    missing: str = "—",
) -> str:
    head = "".join(f"<th>{html.escape(header)}</th>" for _key, header, _kind in columns)
    body = []
    for row, color in zip(rows, colors):
        cells = []
        for key, _header, kind in columns:
            value = row.get(key)
            if key == "label":
                swatch = f'<span class="swatch" style="background:{color}"></span>'
                cells.append(f"<td>{swatch}{html.escape(str(value))}</td>")
            elif value is None:
                cells.append(f'<td class="missing">{html.escape(missing)}</td>')
            else:
                cls = ' class="num"' if kind != "text" else ""
                cells.append(f"<td{cls}>{html.escape(_format(value, kind))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        '<div class="table-wrap"><table>\n<thead><tr>' + head + "</tr></thead>\n<tbody>\n"
        + "\n".join(body) + "\n</tbody></table></div>"
    )


def _render_html(
    rows: Sequence[dict],
    colors: Sequence[str],
    metric: str,
    target: tuple[str, float] | None,
    figures: Sequence[tuple[str, str]],
) -> str:
    n = len(rows)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>colora report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>colora report</h1>",
        f'<p class="meta">{n} run{"s" if n != 1 else ""} compared on '
        f"<strong>{html.escape(_metric_label(metric))}</strong></p>",
        "<h2>Runs</h2>",
        _html_table(rows, _RUN_COLUMNS, colors),
    ]
    if target is not None:
        ttt_columns = (_RUN_COLUMNS[0],) + _TARGET_COLUMNS[1:]
        parts += [
            f"<h2>Time to target: {html.escape(_target_text(target))}</h2>",
            _html_table(rows, ttt_columns, colors, missing="not reached"),
        ]
    parts.append('<h2>Plots</h2>\n<div class="figures">')
    for filename, caption in figures:
        name, cap = html.escape(filename, quote=True), html.escape(caption)
        parts.append(
            f'<figure><img src="{name}" alt="{html.escape(caption, quote=True)}" loading="lazy">'
            f"<figcaption>{cap}</figcaption></figure>"
        )
    parts += ["</div>", "</body></html>", ""]
    return "\n".join(parts)


# ----------------------------------------------------------------------------- entry point


def _unique_labels(runs: list[Run]) -> list[Run]:
    # Two runs with the same name (e.g. `runs/a/run` and `runs/b/run`) would be
    # indistinguishable in legends and tables.
    seen: dict[str, int] = {}
    out = []
    for run in runs:
        count = seen.get(run.label, 0) + 1
        seen[run.label] = count
        out.append(run if count == 1 else dataclasses.replace(run, label=f"{run.label} ({count})"))
    return out


def seed_groups(runs: Sequence[Run]) -> list[list[Run]]:
    """Runs grouped by their config with the seed (and the name) left out, in first-seen order:
    the same setting at several seeds is one group."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        key = json.dumps({k: v for k, v in run.config.items() if k not in ("seed", "name", "pinned_inputs")},
                         sort_keys=True, default=str)
        groups.setdefault(key, []).append(run)
    return list(groups.values())


def seed_summary(runs: Sequence[Run], metric: str) -> list[dict]:
    """One row per setting run at several seeds: the final and best ``metric`` as mean ± std (sample
    std, n - 1), min and max over the seeds, and the mean costs. Settings run once are left out."""
    rows = []
    for group in seed_groups(runs):
        finals = [v for v in (_final_value(r, metric) for r in group) if v is not None]
        if len(group) < 2 or len(finals) < 2:
            continue
        bests = [v for v in (_best_value(r, metric) for r in group) if v is not None]
        label = re.sub(r"-seed=\d+$", "", group[0].label)
        rows.append({
            "setting": label, "seeds": " ".join(str(r.config.get("seed")) for r in group), "n": len(finals),
            "main_metric": metric, "final_mean": statistics.fmean(finals), "final_std": statistics.stdev(finals),
            "final_min": min(finals), "final_max": max(finals),
            "best_mean": statistics.fmean(bests) if bests else None,
            "bytes_up_mean": _mean_of(group, "bytes_up"), "sim_time_s_mean": _mean_of(group, "sim_time_s"),
        })
    return rows


def _mean_of(runs: Sequence[Run], key: str) -> float | None:
    values = [v for v in (_cost(r, key) for r in runs) if v is not None]
    return statistics.fmean(values) if values else None


SEED_COLUMNS = ["setting", "seeds", "n", "main_metric", "final_mean", "final_std", "final_min", "final_max", "best_mean",
                "bytes_up_mean", "sim_time_s_mean"]


def write_report(
    run_dirs: Iterable[str | Path | Run] | str | Path,
    out_dir: str | Path,
    *,
    target: tuple[str, float] | None = None,
) -> Path:
    """Write plots, ``summary.csv`` and ``index.html`` comparing runs; return the HTML path.

    ``run_dirs`` are run directories (or already loaded `Run` objects), one entry per run, in
    the order they appear in tables and legends. ``out_dir`` is created if needed. ``target``
    is ``(metric, value)``, e.g. ``("eval/accuracy", 0.8)`` (see `parse_target`): it adds
    time-to-target columns to the CSV, a time-to-target table to the page and a target line
    to the plots of that metric. Raises ReportError on unusable input.
    """
    if isinstance(run_dirs, (str, Path, Run)):
        run_dirs = [run_dirs]
    runs = _unique_labels([d if isinstance(d, Run) else load_run(d) for d in run_dirs])
    if not runs:
        raise ReportError("no run directories given")
    if target is not None:
        if (
            not isinstance(target, (tuple, list)) or len(target) != 2
            or not isinstance(target[0], str) or _num(target[1]) is None
        ):
            raise ReportError(f"target must be (metric, finite number), got {target!r}")
        target = (target[0], float(target[1]))

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(f"cannot create report directory {out}: {_one_line(exc)}") from None
    metric = main_metric(runs)
    colors = _run_colors(len(runs))
    figures = _write_plots(runs, colors, metric, target, out)

    rows = _summary_rows(runs, metric, target)
    columns = [key for key, _h, _k in _RUN_COLUMNS]
    if target is not None:
        columns += [key for key, _h, _k in _TARGET_COLUMNS]
    _write_csv(out / "summary.csv", rows, columns)
    seeds = seed_summary(runs, metric)
    if seeds:  # the same setting at several seeds: mean ± std over them
        _write_csv(out / "seeds.csv", seeds, SEED_COLUMNS)

    html_path = out / "index.html"
    html_path.write_text(_render_html(rows, colors, metric, target, figures), encoding="utf-8")
    return html_path
