"""`load_task`: one entry point from a data.name (+ data.path) to a loaded `Task`."""

from __future__ import annotations

import math

from colora.data.e2e import load_e2e
from colora.data.errors import DataError
from colora.data.glue import load_glue
from colora.data.party import is_party_folder, load_party
from colora.data.synthetic import load_synthetic
from colora.data.tabular import load_tabular
from colora.data.types import Task

TASK_KINDS = ("seq-cls", "causal-lm")
KNOWN_NAMES = "glue/<cola|sst2|mrpc|stsb|qqp|rte|qnli|mnli>, e2e, synthetic, jsonl, csv"


def load_task(
    name: str,
    path: str | None,
    *,
    task_kind: str = "seq-cls",
    seed: int = 0,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
    synthetic_train: int = 2000,
    synthetic_eval: int = 500,
    max_train: int | None = None,
) -> Task:
    """Load a task by name.

    - `glue/<task>`: `path` is a folder in the original GLUE TSV layout (or the GLUE root that
      contains it); None downloads `nyu-mll/glue` from the hub. Always seq-cls.
    - `e2e`: `path` is a folder of `meaning||text` files; None uses the hub's `e2e_nlg`.
      Always causal-lm, whatever `task_kind` says (see colora.data.e2e for which files are used).
    - `jsonl` / `csv`: `path` is a folder with train and dev (or test) files; columns are chosen
      with `text_column`, `text_pair_column` and `label_column` (see colora.data.tabular).
    - `synthetic`: the built-in 4-class task, `synthetic_train` / `synthetic_eval` examples,
      deterministic in `seed`; with `task_kind="causal-lm"` its sentences without labels.

    `max_train` keeps only the first `max_train` training examples (after loading, so it is
    deterministic). Raises DataError with a one-line message on any bad input.
    """
    if task_kind not in TASK_KINDS:
        raise DataError(f"model.task={task_kind!r}: unknown task kind; known: {', '.join(TASK_KINDS)}")
    key = name.strip().lower()
    if is_party_folder(path):  # a party's own rows in deployment (colora.data.party), already cut to size
        task = load_party(path, name)
        if task.kind != task_kind and key != "e2e":
            raise DataError(f"data folder {path} holds a {task.kind} task but model.task={task_kind}")
        return task  # labels checked against the task's classes by load_party; one split is empty by design
    if key.startswith("glue/"):
        if task_kind != "seq-cls":
            raise DataError(f"data.name={name}: GLUE tasks are seq-cls, but model.task={task_kind}")
        task = load_glue(key[len("glue/"):], path)
    elif key == "e2e":
        task = load_e2e(path)
    elif key in ("jsonl", "csv"):
        task = load_tabular(
            key, path, task_kind=task_kind, text_column=text_column,
            text_pair_column=text_pair_column, label_column=label_column,
        )
    elif key == "synthetic":
        task = load_synthetic(task_kind, seed, synthetic_train, synthetic_eval)
    else:
        raise DataError(f"data.name={name!r}: unknown data set; known: {KNOWN_NAMES}")

    if max_train is not None:
        if max_train < 1:
            raise DataError(f"data.max_train={max_train}: must be at least 1")
        task.train = task.train.select(range(min(max_train, len(task.train))))
    _check_labels(task)
    return task


def _check_labels(task: Task) -> None:
    """Labels every loader must satisfy (local files and the hub alike): finite, and no eval class
    that train lacks (the model could never predict it, and it would be a class of its own)."""
    if task.kind != "seq-cls" or task.train.labels is None:
        return
    for split, data in (("train", task.train), ("eval", task.eval)):
        bad = next((i for i, y in enumerate(data.labels) if not math.isfinite(float(y))), None)
        if bad is not None:
            raise DataError(f"data.name={task.name}: {split} example {bad} has a NaN or inf label")
    if task.num_labels > 1:
        unseen = sorted(set(task.eval.labels) - set(task.train.labels))
        if unseen:
            names = [task.label_names[i] if i < len(task.label_names) else str(i) for i in unseen]
            raise DataError(f"data.name={task.name}: eval labels {names} never occur in the train split; "
                            f"train on data that holds every class")
