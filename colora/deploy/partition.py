"""``colora deploy split-data``: one data folder per data owner, and one for the server, cut from
a config's data set exactly as ``colora run`` partitions it (clients.partition, the seed), so that a
deployed run on a local federation can be compared with the simulation batch for batch. Real data
owners bring their own folders instead (colora.data.party's format).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config import ColoraError, Config
from ..data import load_task
from ..data.party import write_party
from ..engines.engine import partition_rows


def split_data(cfg: Config, out: Path) -> list[Path]:
    """Write ``out/server`` (the evaluation split) and ``out/client_K`` (client K's training rows, in
    the order the simulation indexes them); returns the owners' folders."""
    if out.exists() and any(out.iterdir()):
        raise ColoraError(f"{out}: not empty; give a new folder for the data owners' folders")
    d = cfg.data
    task = load_task(d.name, d.path, task_kind=cfg.model.task, seed=cfg.seed, text_column=d.text_column,
                     text_pair_column=d.text_pair_column, label_column=d.label_column,
                     synthetic_train=d.synthetic_train, synthetic_eval=d.synthetic_eval, max_train=d.max_train)
    parts = partition_rows(cfg, task.train.labels, len(task.train), task.num_labels)
    write_party(out / "server", task, "server", task.eval)
    folders = []
    for k, part in enumerate(parts):
        folders.append(out / f"client_{k}")
        write_party(folders[-1], task, "owner", task.train.select(np.sort(part)), client=k)
    return folders
