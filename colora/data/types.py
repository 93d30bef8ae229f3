"""Plain containers shared by every loader: a text dataset, a task, and reading a data file as text."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..config import ConfigError, read_text_file
from .errors import DataError
from .metrics import compute_metrics


def read_data_text(path) -> str:
    """A data file's text as UTF-8 (BOM dropped); not UTF-8 or unreadable is a one-line DataError."""
    try:
        return read_text_file(path, "data file")
    except ConfigError as exc:
        raise DataError(str(exc)) from None


@dataclass
class TextDataset:
    """Parallel lists of examples.

    `text_a` is the (first) input text. `text_b` is the second sentence of a pair task, or the
    target text of a causal-lm task, or None. `labels` are int class ids, float scores for
    regression, or None for causal-lm.
    """

    text_a: list[str]
    text_b: list[str] | None = None
    labels: list[int] | list[float] | None = None

    def __post_init__(self) -> None:
        # A length mismatch here would silently pair the wrong texts and labels later on.
        n = len(self.text_a)
        if self.text_b is not None and len(self.text_b) != n:
            raise DataError(f"text_b has {len(self.text_b)} entries but text_a has {n}")
        if self.labels is not None and len(self.labels) != n:
            raise DataError(f"labels has {len(self.labels)} entries but text_a has {n}")

    def __len__(self) -> int:
        return len(self.text_a)

    def select(self, indices: Sequence[int] | np.ndarray) -> TextDataset:
        """Return a new dataset holding the examples at `indices`, in that order."""
        idx = [int(i) for i in indices]
        return TextDataset(
            text_a=[self.text_a[i] for i in idx],
            text_b=None if self.text_b is None else [self.text_b[i] for i in idx],
            labels=None if self.labels is None else [self.labels[i] for i in idx],
        )


@dataclass
class Task:
    """A loaded task: train/eval data plus what the model head and the evaluator need.

    `kind` is "seq-cls" or "causal-lm". `num_labels` is 1 for regression and 0 for causal-lm.
    The main metric is `metric_names[0]`; causal-lm tasks have no metric names here because
    perplexity is computed by the trainer from the loss.
    """

    name: str
    kind: str
    num_labels: int
    label_names: list[str]
    train: TextDataset
    eval: TextDataset
    metric_names: list[str] = field(default_factory=list)

    @property
    def is_regression(self) -> bool:
        """True when the single output is a real-valued score (e.g. STS-B)."""
        return self.kind == "seq-cls" and self.num_labels == 1

    def compute_metrics(self, preds, labels) -> dict[str, float]:
        """Score predictions against labels with this task's metrics.

        `preds` are class ids (or floats for regression); 2-D logits are accepted too and
        reduced with argmax (or squeezed when there is a single output column).
        """
        return compute_metrics(self.metric_names, preds, labels)
