"""Plain data types shared by algorithms and engines (no behaviour, no heavy imports)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

AdapterState = dict[str, torch.Tensor]


@dataclass
class ClientTask:
    """One client's work in a round: start from ``state``, take ``steps`` local optimizer steps.

    ``start_step`` is the client's own step counter: its k-th step always sees its k-th batch
    (common random numbers across algorithms and engines).
    """

    client_id: int
    state: AdapterState
    start_step: int
    steps: int
    lr: float
    prox_anchor: AdapterState | None = None  # FedProx: pull towards this state with train.prox_mu
    keep_optimizer: bool = False  # central: the optimizer's moments persist across rounds
    rank: int | None = None  # the client's LoRA rank (``state``'s rank); None: the run's model.lora.r
    # FLoRA (aggregator stack): an adapter state whose ΔW the engine merges into the frozen base
    # weights for this task; the client trains ``state`` on top of base + ΔW.
    base_delta: AdapterState | None = None
    # train.client_optimizer=keep (and central): the client's optimizer moments from its last task
    # (colora.messages.moments_of); None: a fresh optimizer.
    moments: AdapterState | None = None
    # clients.byzantine label_flip: the number of classes C; the client trains on labels c -> C-1-c (0: honest)
    flip_labels: int = 0
    # federation.lora_mode ffa / rolora: adapter keys the client keeps fixed (they neither train nor travel)
    frozen: list[str] = field(default_factory=list)
    # train.correction=scaffold: c - c_k per adapter key, added to every local gradient; None: no correction
    correction: AdapterState | None = None
    # federation.aggregator=hafl: measure each LoRA component's importance (ClientResult.scores)
    scores: bool = False
    # hafl_mode=freeze: only the first n components of every LoRA module train, the rest stay as sent
    train_components: int | None = None


@dataclass
class ClientResult:
    client_id: int
    state: AdapterState
    num_samples: int  # size of the client's local data set (aggregation weight)
    loss: float  # mean training loss over the steps taken
    flops: float  # measured training FLOPs of those steps
    steps: int
    moments: AdapterState | None = None  # the optimizer's moments after the task, when it keeps them
    failed: str | None = None  # why the client sends no update (its local loss went NaN or inf); state is then {}
    scores: AdapterState | None = None  # hafl: smoothed sensitivity per LoRA component, keyed by the module's A key


@dataclass
class SecureSum:
    """What a round under secure aggregation reveals: the clients' sample-weighted mean state and
    training loss, their total samples, and (in the clear) each client's compute and steps."""

    state: AdapterState
    loss: float
    num_samples: int
    flops: list[float]  # per task, in task order (0 for a client that dropped out)
    steps: list[int]
    answered: int  # clients whose masked update entered the sum


class TaskRunner(Protocol):
    """What an engine offers algorithms: run independent client tasks, in any order or in parallel."""

    def __call__(self, tasks: list[ClientTask]) -> list[ClientResult]: ...


@dataclass
class RoundResult:
    """What one round of an algorithm adds to the run's counters."""

    train_loss: float
    bytes_up: int
    bytes_down: int
    sim_time_s: float
    extra: dict = field(default_factory=dict)  # algorithm-specific metrics, logged as-is
