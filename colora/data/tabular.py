"""User data as JSON Lines or CSV files.

`path` is a folder holding `train.<ext>` and `dev.<ext>` (or `test.<ext>` when there is no dev
file), `<ext>` being `jsonl` or `csv`. Columns are chosen with `text_column`, `text_pair_column`
(optional second sentence) and `label_column`.

Labels (seq-cls):
- integers (or strings that parse as integers, as every CSV value is a string) are class ids as
  they are; num_labels = largest id + 1 (at least 2);
- real numbers with more than 20 distinct values in train are a regression target
  (num_labels = 1); with at most 20 they are classes in increasing numeric order;
- any other strings are classes with ids in sorted order of the distinct train labels, and
  `label_names` are those strings. An eval label unseen in train is an error.

With task_kind="causal-lm", `text_column` is the prompt/text and `text_pair_column` (optional)
the target; the label column is not read.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from colora.data.errors import DataError
from colora.data.types import Task, TextDataset, read_data_text

# More distinct real values than this means a score to regress, not a set of classes.
MAX_FLOAT_CLASSES = 20


def load_tabular(
    fmt: str,
    path: str | None,
    *,
    task_kind: str,
    text_column: str,
    text_pair_column: str | None,
    label_column: str,
) -> Task:
    """Load a `fmt` ("jsonl" or "csv") task from the folder `path`."""
    if path is None:
        raise DataError(
            f"data.path is required for data.name={fmt} (a folder with train.{fmt} and dev.{fmt})"
        )
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise DataError(f"data.path={str(folder)!r}: no such folder")
    train_file = folder / f"train.{fmt}"
    eval_file = folder / f"dev.{fmt}"
    if not eval_file.is_file():
        eval_file = folder / f"test.{fmt}"
    for f in (train_file, eval_file):
        if not f.is_file():
            raise DataError(
                f"{f}: no such file (a {fmt} folder needs train.{fmt} and dev.{fmt} or test.{fmt})"
            )

    wanted = [text_column] + [c for c in (text_pair_column,) if c]
    if task_kind == "seq-cls":
        wanted.append(label_column)
    train_rows = _read(fmt, train_file, wanted)
    eval_rows = _read(fmt, eval_file, wanted)

    def texts(rows, col):
        return None if col is None else [_text(r[col]) for _, r in rows]

    if task_kind == "causal-lm":
        return Task(
            name=fmt, kind="causal-lm", num_labels=0, label_names=[],
            train=TextDataset(texts(train_rows, text_column), texts(train_rows, text_pair_column)),
            eval=TextDataset(texts(eval_rows, text_column), texts(eval_rows, text_pair_column)),
            metric_names=[],
        )

    train_y, eval_y, num_labels, names = _encode_labels(
        [(n, r[label_column]) for n, r in train_rows],
        [(n, r[label_column]) for n, r in eval_rows],
        label_column, train_file, eval_file,
    )
    if num_labels == 1:
        metrics = ["pearson", "spearman"]
    else:
        metrics = ["accuracy", "f1"] if num_labels == 2 else ["accuracy"]
    return Task(
        name=fmt, kind="seq-cls", num_labels=num_labels, label_names=names,
        train=TextDataset(texts(train_rows, text_column), texts(train_rows, text_pair_column), train_y),
        eval=TextDataset(texts(eval_rows, text_column), texts(eval_rows, text_pair_column), eval_y),
        metric_names=metrics,
    )


def _text(value) -> str:
    return value if isinstance(value, str) else str(value)


def _read(fmt: str, path: Path, columns: list[str]) -> list[tuple[int, dict]]:
    """Rows as (line number, record); every record has every wanted column, non-null."""
    rows: list[tuple[int, dict]] = []
    with io.StringIO(read_data_text(path), newline="") as f:
        if fmt == "csv":
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            for col in columns:
                if col not in header:
                    raise DataError(f"{path}: no column {col!r} (the header has {len(header)} columns; set data.text_column, "
                                    f"data.text_pair_column or data.label_column)")
            rows = [(reader.line_num, r) for r in reader]
        else:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}, line {lineno}: invalid JSON ({e.msg})") from None
                if not isinstance(record, dict):
                    raise DataError(
                        f"{path}, line {lineno}: expected a JSON object, got {type(record).__name__}"
                    )
                rows.append((lineno, record))
    if not rows:
        raise DataError(f"{path}: no rows")
    for lineno, r in rows:
        for col in columns:
            if col not in r:
                raise DataError(f"{path}, line {lineno}: no column {col!r}")
            if r[col] is None:
                raise DataError(f"{path}, line {lineno}: column {col!r} is null")
    return rows


def _number(value) -> int | float | None:
    """The label as a number when it is one (CSV gives strings), else None."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value
    s = str(value).strip()
    for cast in (int, float):
        try:
            return cast(s)
        except ValueError:
            pass
    return None


def _encode_labels(train_raw: list[tuple[int, object]], eval_raw: list[tuple[int, object]], column: str,
                   train_file: Path, eval_file: Path):
    """Returns (train labels, eval labels, num_labels, label_names).

    Empty or non-finite labels, and eval labels the train file never has, are errors naming the
    file and line: they would otherwise become classes (or NaN targets) of their own."""
    train_values, eval_values = [v for _, v in train_raw], [v for _, v in eval_raw]
    train_num = [_number(v) for v in train_values]
    eval_num = [_number(v) for v in eval_values]
    for file, raw, nums in ((train_file, train_raw, train_num), (eval_file, eval_raw, eval_num)):
        for (lineno, value), number in zip(raw, nums):
            if str(value).strip() == "" or (number is not None and not math.isfinite(number)):
                raise DataError(f"{file}, line {lineno}: label column {column!r} is empty, NaN or inf")
    if all(x is not None for x in train_num + eval_num):
        if all(isinstance(x, int) for x in train_num + eval_num):
            ids = train_num + eval_num
            if min(ids) < 0:
                raise DataError(f"label column {column!r}: negative class id {min(ids)}")
            seen = set(train_num)
            for (lineno, _), x in zip(eval_raw, eval_num):
                if x not in seen:
                    raise DataError(f"{eval_file}, line {lineno}: class id {x} does not occur in the train file")
            n = max(2, max(train_num) + 1)
            return train_num, eval_num, n, [str(i) for i in range(n)]
        if len(set(train_num)) > MAX_FLOAT_CLASSES:
            return [float(x) for x in train_num], [float(x) for x in eval_num], 1, [column]
        classes = sorted(set(train_num))
        keys_train, keys_eval = train_num, eval_num
        names = [str(c) for c in classes]
    else:
        keys_train = [str(v).strip() for v in train_values]
        keys_eval = [str(v).strip() for v in eval_values]
        classes = sorted(set(keys_train))
        names = list(classes)
    if len(classes) < 2:
        raise DataError(f"label column {column!r}: the train file has a single class; need at least 2")
    index = {c: i for i, c in enumerate(classes)}
    for (lineno, _), key in zip(eval_raw, keys_eval):
        if key not in index:
            raise DataError(f"{eval_file}, line {lineno}: the label does not occur in the train file")
    return [index[k] for k in keys_train], [index[k] for k in keys_eval], len(classes), names
