"""Evaluation metrics by name, returning plain Python floats.

Degenerate inputs (constant predictions or labels) give 0.0 instead of NaN, because an
untrained model often predicts one class at round 0 and a NaN would poison "best" tracking and
plots downstream.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from scipy import stats
from sklearn.metrics import f1_score, matthews_corrcoef

from colora.data.errors import DataError


def _as_class_ids(preds) -> np.ndarray:
    p = np.asarray(preds)
    if p.ndim == 2:
        # Logits [n, C]: the predicted class is the arg max.
        p = p.argmax(axis=1) if p.shape[1] > 1 else p[:, 0]
    return p.reshape(-1)


def _as_scores(preds) -> np.ndarray:
    p = np.asarray(preds, dtype=np.float64)
    if p.ndim == 2 and p.shape[1] == 1:
        p = p[:, 0]
    return p.reshape(-1)


def accuracy(preds, labels) -> float:
    """Fraction of predictions equal to the label."""
    p, y = _as_class_ids(preds), np.asarray(labels).reshape(-1)
    return float(np.mean(p == y)) if y.size else 0.0


def f1(preds, labels) -> float:
    """Binary F1 with class 1 as the positive class (0.0 when nothing is predicted positive)."""
    p, y = _as_class_ids(preds), np.asarray(labels).reshape(-1)
    return float(f1_score(y, p, pos_label=1, average="binary", zero_division=0.0))


def mcc(preds, labels) -> float:
    """Matthews correlation coefficient (0.0 for constant predictions or labels)."""
    p, y = _as_class_ids(preds), np.asarray(labels).reshape(-1)
    if np.unique(p).size < 2 or np.unique(y).size < 2:
        return 0.0
    return float(matthews_corrcoef(y, p))


def _correlation(fn: Callable, preds, labels) -> float:
    p, y = _as_scores(preds), np.asarray(labels, dtype=np.float64).reshape(-1)
    # A constant vector has zero variance; scipy would warn and return NaN.
    if p.size < 2 or np.ptp(p) == 0 or np.ptp(y) == 0:
        return 0.0
    value = float(fn(p, y)[0])
    return 0.0 if np.isnan(value) else value


def pearson(preds, labels) -> float:
    """Pearson correlation of predicted and true scores (0.0 if either is constant)."""
    return _correlation(stats.pearsonr, preds, labels)


def spearman(preds, labels) -> float:
    """Spearman rank correlation of predicted and true scores (0.0 if either is constant)."""
    return _correlation(stats.spearmanr, preds, labels)


METRICS: dict[str, Callable[..., float]] = {
    "accuracy": accuracy,
    "f1": f1,
    "mcc": mcc,
    "pearson": pearson,
    "spearman": spearman,
}


def compute_metrics(metric_names: list[str], preds, labels) -> dict[str, float]:
    """Compute each named metric; returns {name: float} in the order given."""
    p, y = np.asarray(preds), np.asarray(labels)
    if p.shape[0] != y.reshape(-1).shape[0]:
        raise DataError(f"metrics: {p.shape[0]} predictions for {y.reshape(-1).shape[0]} labels")
    out: dict[str, float] = {}
    for name in metric_names:
        if name not in METRICS:
            raise DataError(f"unknown metric {name!r}; known: {', '.join(sorted(METRICS))}")
        out[name] = METRICS[name](p, y)
    return out
