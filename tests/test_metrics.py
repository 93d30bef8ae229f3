import math
import warnings

import numpy as np
import pytest

from colora.data import DataError, Task, TextDataset, compute_metrics
from colora.data.metrics import accuracy, f1, mcc, pearson, spearman


def _no_warnings(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args)


def test_accuracy_and_f1_hand_computed():
    # TP=2, FP=1, FN=0, TN=1: precision 2/3, recall 1, F1 = 0.8.
    preds, labels = [1, 0, 1, 1], [1, 0, 0, 1]
    assert accuracy(preds, labels) == pytest.approx(0.75)
    assert f1(preds, labels) == pytest.approx(0.8)


def test_f1_positive_class_is_one():
    # Class 1 is positive: TP=1, FP=0, FN=1 -> P=1, R=0.5, F1=2/3 (class 0 as positive would give 0.8).
    assert f1([0, 0, 1, 0], [0, 1, 1, 0]) == pytest.approx(2 / 3)


def test_mcc_hand_computed():
    # (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (2*1 - 1*0) / sqrt(3*2*2*1)
    assert mcc([1, 0, 1, 1], [1, 0, 0, 1]) == pytest.approx(2 / math.sqrt(12))
    assert mcc([1, 0, 1, 0], [1, 0, 1, 0]) == pytest.approx(1.0)
    assert mcc([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)


def test_pearson_and_spearman_hand_computed():
    # Centered: sum dx*dy = 4, sum dx^2 = sum dy^2 = 5 -> r = 0.8; the values are their own ranks.
    x, y = [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0]
    assert pearson(x, y) == pytest.approx(0.8)
    assert spearman(x, y) == pytest.approx(0.8)
    # Monotone but not linear: Spearman is exactly 1, Pearson is below 1.
    assert spearman([1, 2, 3, 4], [1, 4, 9, 16]) == pytest.approx(1.0)
    assert pearson([1, 2, 3, 4], [1, 4, 9, 16]) < 0.99


def test_constant_predictions_give_zero_without_warnings():
    labels = [1, 0, 0, 1]
    assert _no_warnings(mcc, [1, 1, 1, 1], labels) == 0.0
    assert _no_warnings(f1, [0, 0, 0, 0], labels) == 0.0
    assert _no_warnings(pearson, [2.5, 2.5, 2.5, 2.5], [0.0, 1.0, 2.0, 3.0]) == 0.0
    assert _no_warnings(spearman, [2.5, 2.5, 2.5, 2.5], [0.0, 1.0, 2.0, 3.0]) == 0.0
    assert _no_warnings(pearson, [0.0, 1.0, 2.0], [1.0, 1.0, 1.0]) == 0.0


def test_compute_metrics_returns_plain_floats_in_order():
    out = compute_metrics(["f1", "accuracy"], np.array([1, 0, 1, 1]), np.array([1, 0, 0, 1]))
    assert list(out) == ["f1", "accuracy"]
    assert out == {"f1": pytest.approx(0.8), "accuracy": pytest.approx(0.75)}
    assert all(type(v) is float for v in out.values())


def test_logits_are_reduced():
    logits = np.array([[0.1, 0.9], [2.0, -1.0], [0.0, 1.0], [-3.0, 3.0]])
    assert accuracy(logits, [1, 0, 0, 1]) == pytest.approx(0.75)
    column = np.array([[1.0], [2.0], [3.0], [4.0]])
    assert pearson(column, [1.0, 3.0, 2.0, 4.0]) == pytest.approx(0.8)


def test_task_compute_metrics_uses_its_metric_names():
    ds = TextDataset(["a", "b"], None, [0, 1])
    task = Task("t", "seq-cls", 2, ["n", "p"], ds, ds, ["accuracy", "f1"])
    assert task.compute_metrics(np.array([1, 0, 1, 1]), np.array([1, 0, 0, 1])) == {
        "accuracy": pytest.approx(0.75),
        "f1": pytest.approx(0.8),
    }
    lm = Task("lm", "causal-lm", 0, [], TextDataset(["a"]), TextDataset(["b"]), [])
    assert lm.compute_metrics(np.array([0]), np.array([0])) == {}


def test_errors():
    with pytest.raises(DataError, match="bleu"):
        compute_metrics(["bleu"], [1], [1])
    with pytest.raises(DataError, match="3 predictions for 2 labels"):
        compute_metrics(["accuracy"], [1, 0, 1], [1, 0])
