"""ONE copy of the frozen base weights per machine, shared by every process that trains on it.

The driver writes the frozen tensors of its base model (before LoRA is attached) once to a file
(``torch.save``), then maps that file back into its own model; worker processes build their model on the ``meta`` device (no weights allocated) and map
the same file. ``torch.load(mmap=True)`` maps it privately: the pages are the page cache's, shared
by every process that maps them, so the base is resident once whatever the number of workers. A
write (FLoRA's ``merge_base`` adds ΔW into the base weights) copies just the written pages into
that process (copy-on-write) and never reaches the file or another process.

Cost: one file of the base's size on local disk for the run's lifetime (``minilm-l6``: 91 MB), one
sequential write at start.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch


def frozen_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every frozen parameter and buffer of ``model`` by its full name (tied names all listed)."""
    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if not p.requires_grad and ".lora_" not in name and ".modules_to_save." not in name:
            out[name] = p.detach()
    for name, b in model.named_buffers(remove_duplicate=False):
        if b is not None:
            out[name] = b
    return out


class SharedBase:
    """The driver's base file in a private temporary folder, removed by :meth:`close`."""

    def __init__(self, model: torch.nn.Module):
        self.dir = Path(tempfile.mkdtemp(prefix="colora-base-"))
        self.path = self.dir / "base.pt"
        torch.save(frozen_tensors(model), self.path)
        attach(model, self.path)  # the driver maps the same pages as its workers

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def attach(model: torch.nn.Module, path: Path) -> None:
    """Replace ``model``'s frozen tensors (real or on ``meta``) by the memory-mapped ones of ``path``."""
    attach_tensors(model, torch.load(path, mmap=True, weights_only=True))


def attach_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Make ``tensors`` (by full name) the model's frozen parameters and buffers, without copying."""
    shared: dict[int, torch.nn.Parameter] = {}  # one Parameter per storage: tied weights stay tied
    for name, t in tensors.items():
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        if attr in module._parameters:
            key = t.untyped_storage().data_ptr() + t.storage_offset()
            module._parameters[attr] = shared.setdefault(key, torch.nn.Parameter(t, requires_grad=False))
        elif attr in module._buffers:
            module._buffers[attr] = t
        else:
            raise ValueError(f"shared base: {name} is neither a parameter nor a buffer of the model")
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"shared base: {len(left)} tensors of the model were not shared, e.g. {left[0]}")
