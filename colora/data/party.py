"""A party's own data folder in deployment (``colora deploy``): a data owner's training rows, or the
server's evaluation rows, and nothing else.

``colora deploy split-data`` writes one folder per data owner (its rows of the run's partition, in
the order the simulation indexes them) and one for the server (the evaluation split), so a deployed
run sees exactly the batches of ``colora run`` on the same config. A folder holds
``colora-data.json`` (the task's name, kind, classes and metrics, the party's role) and
``rows.jsonl``: one ``{"a": text, "b": second text or target, "y": label}`` object per line, labels
as the task's class ids, so an owner holding a single class keeps the task's ids.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import DataError
from .types import Task, TextDataset, read_data_text

MARKER = "colora-data.json"
ROWS = "rows.jsonl"


def is_party_folder(path: str | Path | None) -> bool:
    """Whether ``path`` is a folder written by :func:`write_party`."""
    return path is not None and (Path(path).expanduser() / MARKER).is_file()


def write_party(folder: Path, task: Task, role: str, rows: TextDataset, client: int | None = None) -> None:
    """Write ``rows`` of ``task`` as the folder of a party (``role``: ``owner`` or ``server``)."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"name": task.name, "kind": task.kind, "num_labels": task.num_labels, "label_names": task.label_names,
            "metric_names": task.metric_names, "role": role, "client": client, "rows": len(rows)}
    with open(folder / ROWS, "w", encoding="utf-8") as f:
        for i in range(len(rows)):
            f.write(json.dumps({"a": rows.text_a[i], "b": None if rows.text_b is None else rows.text_b[i],
                                "y": None if rows.labels is None else rows.labels[i]}) + "\n")
    (folder / MARKER).write_text(json.dumps(meta, indent=1) + "\n")


def party_info(path: str | Path) -> dict:
    """The folder's ``colora-data.json``."""
    try:
        return json.loads(read_data_text(Path(path).expanduser() / MARKER))
    except json.JSONDecodeError as exc:
        raise DataError(f"{Path(path) / MARKER}: not valid JSON ({exc.msg}); write the folder again with colora deploy split-data") from None


def load_party(path: str | Path, name: str) -> Task:
    """The task of a party folder: an owner's rows as ``train`` (``eval`` empty), the server's as
    ``eval`` (``train`` empty). ``name`` is the config's ``data.name``, which must be the folder's."""
    folder = Path(path).expanduser()
    meta = party_info(folder)
    if meta.get("name", "").lower() != name.strip().lower():
        raise DataError(f"data folder {folder} holds data.name={meta.get('name')!r} but the config says data.name={name!r}; "
                        "give the folder written for this config")
    a, b, y = [], [], []
    for i, line in enumerate(read_data_text(folder / ROWS).splitlines()):
        try:
            row = json.loads(line)
            a.append(str(row["a"]))
            b.append(row["b"])
            y.append(row["y"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f"{folder / ROWS} line {i + 1}: not a row of a colora data folder") from None
    has_b, has_y = bool(a) and b[0] is not None, bool(a) and y[0] is not None
    if meta["kind"] == "seq-cls" and a and not has_y:
        raise DataError(f"{folder / ROWS}: rows without labels for a seq-cls task")
    if has_y and meta["num_labels"] > 1 and any(not isinstance(v, int) or not 0 <= v < meta["num_labels"] for v in y):
        raise DataError(f"{folder / ROWS}: a label outside the task's {meta['num_labels']} classes; the folder does not match the task")
    rows = TextDataset(a, b if has_b else None, y if has_y else None)
    empty = TextDataset([], [] if has_b else None, [] if has_y else None)
    owner = meta["role"] == "owner"
    return Task(name=meta["name"], kind=meta["kind"], num_labels=meta["num_labels"], label_names=meta["label_names"],
                train=rows if owner else empty, eval=empty if owner else rows, metric_names=meta["metric_names"])
