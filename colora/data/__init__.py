"""Data: task loaders (GLUE, E2E, JSONL/CSV, synthetic), metrics and client partitioning."""

from colora.data.errors import DataError
from colora.data.loader import load_task
from colora.data.metrics import compute_metrics
from colora.data.partition import label_histogram, partition
from colora.data.synthetic import LABEL_NAMES as SYNTHETIC_LABEL_NAMES
from colora.data.synthetic import make_synthetic, synthetic_rule_label
from colora.data.types import Task, TextDataset

__all__ = [
    "DataError",
    "SYNTHETIC_LABEL_NAMES",
    "Task",
    "TextDataset",
    "compute_metrics",
    "label_histogram",
    "load_task",
    "make_synthetic",
    "partition",
    "synthetic_rule_label",
]
