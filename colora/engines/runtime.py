"""What a party that runs client work holds: the model with LoRA attached, its ranks' adapters and
the training data it indexes into. The in-process engine holds one in the driver; each worker
process and each Ray actor holds its own, built from the config and the shared base weights.

A runtime answers messages only (colora.messages): a task's bytes in, the result's bytes out. It
keeps nothing from one task to the next (optimizer moments travel in the task), so which process
runs a task never changes its result.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..adapters import RankedAdapters, attach_lora
from ..config import ColoraError, Config
from ..data import Task, load_task
from ..messages import decode_task, encode_result
from ..models import base_model_skeleton, load_tokenizer, resolve_device
from ..split.client import SplitClient
from ..train import Encoded, LocalTrainer, encode
from . import shared_base


def load_data(cfg: Config, tokenizer, encode_train: bool = True) -> tuple[Task, Encoded | None]:
    """The task and its tokenized training split (every party tokenizes the same way); None for
    the split when ``encode_train`` is False (a deployed server holds no training rows)."""
    d = cfg.data
    task = load_task(d.name, d.path, task_kind=cfg.model.task, seed=cfg.seed, text_column=d.text_column,
                     text_pair_column=d.text_pair_column, label_column=d.label_column,
                     synthetic_train=d.synthetic_train, synthetic_eval=d.synthetic_eval, max_train=d.max_train)
    if task.kind != cfg.model.task:
        raise ColoraError(f"data.name={d.name!r} is a {task.kind} task but model.task={cfg.model.task!r}")
    return task, encode(task.train, task, tokenizer, d.max_length) if encode_train else None


class ClientRuntime:
    """Runs client tasks (and split clients' parts) on one model; see the module docstring."""

    def __init__(self, cfg: Config, model, adapters: RankedAdapters, data: Encoded, parts: list[np.ndarray],
                 ranks: list[int], split: bool = False):
        self.cfg, self.model, self.adapters = cfg, model, adapters
        for r in sorted(set(ranks)):
            adapters.ensure(r)
        slots = adapters.slots[adapters.default_rank]
        self.trainer = LocalTrainer(model, slots, data, parts, cfg.train, cfg.seed, adapters, cfg.privacy)
        self.split = SplitClient(model, adapters, data, parts, cfg) if split else None

    def run_task(self, blob: bytes) -> bytes:
        """One client task's bytes in, its result's bytes out."""
        return encode_result(self.trainer.run(decode_task(blob)))

    def run_fused(self, blobs: list[bytes]) -> list[bytes]:
        """Several client tasks' bytes in, trained together in fused passes (colora.fused); their
        results' bytes out, in order."""
        return [encode_result(r) for r in self.trainer.run_fused([decode_task(b) for b in blobs])]

    @classmethod
    def from_shared_base(cls, cfg: Config, base: Path | dict[str, torch.Tensor], parts: list[np.ndarray], ranks: list[int],
                         num_labels: int, split: bool) -> "ClientRuntime":
        """A worker's runtime: the model built on ``meta`` and mapped onto the driver's base file
        (or onto tensors given by name, e.g. from Ray's object store)."""
        tokenizer = load_tokenizer(cfg.model)
        _, data = load_data(cfg, tokenizer)
        tensors = base
        base = base_model_skeleton(cfg.model, num_labels, tokenizer)
        if isinstance(tensors, Path):
            shared_base.attach(base, tensors)
        else:
            shared_base.attach_tensors(base, tensors)
        model = attach_lora(base, cfg.model, seed=cfg.seed).to(resolve_device(cfg.engine.device))
        return cls(cfg, model, RankedAdapters(model, cfg.seed), data, parts, ranks, split)


def set_threads(workers: int) -> int:
    """Intra-op threads for one of ``workers`` processes sharing this machine's cores."""
    n = max(1, (os.cpu_count() or 1) // max(1, workers))
    torch.set_num_threads(n)
    return n
