"""GLUE tasks from a local folder in the original GLUE TSV layout, or from the Hugging Face hub.

Local layout (as released by the GLUE authors): `train.tsv` and `dev.tsv` per task, except MNLI
whose eval file is `dev_matched.tsv`. `path` may be the task folder itself or the GLUE root that
holds it (`<path>/MRPC/train.tsv`).

File quirks handled here:
- MRPC's header starts with a UTF-8 byte-order mark (read as utf-8-sig).
- CoLA has no header: columns are source, label, original mark, sentence.
- Sentences contain unbalanced quote characters, so CSV quoting is disabled (QUOTE_NONE).
- Some rows in the original files have the wrong number of columns; they are skipped (and
  counted in a log warning) rather than crashing the run.

Label id orders: string labels map to fixed orders, RTE/QNLI [entailment, not_entailment] and
MNLI [contradiction, entailment, neutral] (alphabetical; note this differs from the hub's
[entailment, neutral, contradiction], hub labels are remapped by name so both sources agree).
"""

from __future__ import annotations

import csv
import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from colora.data.errors import DataError
from colora.data.types import Task, TextDataset, read_data_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GlueSpec:
    """Where a GLUE task's fields live locally and on the hub."""

    folder: str  # folder name in the original GLUE release
    header: bool
    columns: int | None  # fixed column count, only for headerless files
    text_a: str | int  # header name, or column index for headerless files
    text_b: str | int | None
    label: str | int
    label_names: tuple[str, ...]  # empty = regression
    metrics: tuple[str, ...]
    eval_file: str = "dev.tsv"
    hub_eval_split: str = "validation"
    hub_text_a: str = "sentence1"
    hub_text_b: str | None = "sentence2"


GLUE_TASKS: dict[str, GlueSpec] = {
    "cola": GlueSpec(
        "CoLA", False, 4, 3, None, 1, ("unacceptable", "acceptable"), ("mcc",),
        hub_text_a="sentence", hub_text_b=None,
    ),
    "sst2": GlueSpec(
        "SST-2", True, None, "sentence", None, "label", ("negative", "positive"), ("accuracy",),
        hub_text_a="sentence", hub_text_b=None,
    ),
    "mrpc": GlueSpec(
        "MRPC", True, None, "#1 String", "#2 String", "Quality",
        ("not_equivalent", "equivalent"), ("accuracy", "f1"),
    ),
    "stsb": GlueSpec(
        "STS-B", True, None, "sentence1", "sentence2", "score", (), ("pearson", "spearman"),
    ),
    "qqp": GlueSpec(
        "QQP", True, None, "question1", "question2", "is_duplicate",
        ("not_duplicate", "duplicate"), ("accuracy", "f1"),
        hub_text_a="question1", hub_text_b="question2",
    ),
    "rte": GlueSpec(
        "RTE", True, None, "sentence1", "sentence2", "label",
        ("entailment", "not_entailment"), ("accuracy",),
    ),
    "qnli": GlueSpec(
        "QNLI", True, None, "question", "sentence", "label",
        ("entailment", "not_entailment"), ("accuracy",),
        hub_text_a="question", hub_text_b="sentence",
    ),
    "mnli": GlueSpec(
        "MNLI", True, None, "sentence1", "sentence2", "gold_label",
        ("contradiction", "entailment", "neutral"), ("accuracy",),
        eval_file="dev_matched.tsv", hub_eval_split="validation_matched",
        hub_text_a="premise", hub_text_b="hypothesis",
    ),
}

# Other spellings in common use (the GLUE folder names, the hub config names).
GLUE_ALIASES = {"sst-2": "sst2", "sts-b": "stsb"}


def glue_task_key(name: str) -> str:
    """Canonical task key ("sst2") for a user spelling ("SST-2", "sst2")."""
    key = name.strip().lower()
    key = GLUE_ALIASES.get(key, key)
    if key not in GLUE_TASKS:
        raise DataError(
            f"data.name=glue/{name}: unknown GLUE task; known: {', '.join(sorted(GLUE_TASKS))}"
        )
    return key


def load_glue(name: str, path: str | None) -> Task:
    """Load GLUE task `name` from the local folder `path`, or from the hub when `path` is None."""
    key = glue_task_key(name)
    spec = GLUE_TASKS[key]
    if path is None:
        train, eval_ = _load_hub(key, spec)
    else:
        folder = _task_folder(Path(path).expanduser(), spec)
        train = _read_split(folder / "train.tsv", spec)
        eval_ = _read_split(folder / spec.eval_file, spec)
    regression = not spec.label_names
    return Task(
        name=f"glue/{key}",
        kind="seq-cls",
        num_labels=1 if regression else len(spec.label_names),
        label_names=["score"] if regression else list(spec.label_names),
        train=train,
        eval=eval_,
        metric_names=list(spec.metrics),
    )


def _task_folder(path: Path, spec: GlueSpec) -> Path:
    if not path.is_dir():
        raise DataError(f"data.path={str(path)!r}: no such folder")
    if not (path / "train.tsv").exists() and (path / spec.folder / "train.tsv").is_file():
        return path / spec.folder
    return path


def _parse_label(value: str, spec: GlueSpec, where: str) -> int | float | None:
    value = value.strip()
    if not spec.label_names:
        try:
            score = float(value)
        except ValueError:
            score = math.nan
        if not math.isfinite(score):
            raise DataError(f"{where}: the score is not a finite number") from None
        return score
    if value in spec.label_names:
        return spec.label_names.index(value)
    # MNLI-style files mark examples without annotator consensus with "-"; they have no label.
    if value == "-":
        return None
    try:
        label = int(value)
    except ValueError:
        label = -1
    if not 0 <= label < len(spec.label_names):
        raise DataError(
            f"{where}: the label is not one of {list(spec.label_names)} "
            f"or an id in 0..{len(spec.label_names) - 1}"
        )
    return label


def _read_split(path: Path, spec: GlueSpec) -> TextDataset:
    if not path.is_file():
        raise DataError(f"{path}: no such file (expected GLUE TSV files train.tsv and {spec.eval_file})")
    text_a: list[str] = []
    text_b: list[str] = []
    labels: list = []
    skipped = 0
    with io.StringIO(read_data_text(path), newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if spec.header:
            header = [h.strip() for h in next(reader, [])]
            wanted = [c for c in (spec.text_a, spec.text_b, spec.label) if c is not None]
            for col in wanted:
                if col not in header:
                    raise DataError(f"{path}: header has no column {col!r} (it has {len(header)} columns; is this GLUE's {spec.folder}?)")
            ia, il = header.index(spec.text_a), header.index(spec.label)
            ib = None if spec.text_b is None else header.index(spec.text_b)
            width = len(header)
        else:
            ia, ib, il = spec.text_a, spec.text_b, spec.label
            width = spec.columns
        for row in reader:
            if len(row) != width:
                if row:  # blank lines are not worth a warning
                    skipped += 1
                continue
            label = _parse_label(row[il], spec, f"{path}, line {reader.line_num}")
            if label is None:
                skipped += 1
                continue
            text_a.append(row[ia].strip())
            if ib is not None:
                text_b.append(row[ib].strip())
            labels.append(label)
    if not text_a:
        raise DataError(f"{path}: no well-formed rows (expected {width} tab-separated columns)")
    if skipped:
        log.warning("%s: skipped %d malformed or unlabeled rows", path, skipped)
    return TextDataset(text_a, text_b if spec.text_b is not None else None, labels)


def _load_hub(key: str, spec: GlueSpec) -> tuple[TextDataset, TextDataset]:
    import datasets

    try:
        ds = datasets.load_dataset("nyu-mll/glue", key)
    except Exception as e:  # noqa: BLE001 - any hub/network failure means the same to the user
        raise DataError(
            f"data.name=glue/{key}: could not load from the Hugging Face hub "
            f"(unreachable or offline: {type(e).__name__}); set data.path to a local GLUE folder"
        ) from None
    return _from_hub(ds["train"], spec), _from_hub(ds[spec.hub_eval_split], spec)


def _from_hub(split, spec: GlueSpec) -> TextDataset:
    labels = list(split["label"])
    if spec.label_names:
        # Hub class ids follow the hub's own name order; remap by name to ours.
        hub_names = split.features["label"].names
        remap = {i: spec.label_names.index(n) for i, n in enumerate(hub_names)}
        labels = [remap[int(v)] for v in labels]
    else:
        labels = [float(v) for v in labels]
    text_b = None if spec.hub_text_b is None else list(split[spec.hub_text_b])
    return TextDataset(list(split[spec.hub_text_a]), text_b, labels)
