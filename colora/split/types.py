"""What an engine offers the split algorithms (``sl``, ``splitlora``): plain data and a protocol.

Kept free of model code so that algorithms can import it without touching the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..types import AdapterState


@dataclass
class SplitJob:
    """One client's part of a split step.

    ``state`` holds the client-side adapter keys only. ``step`` is the client's own step counter:
    its batch is ``batch_indices(parts[k], batch_size, step, seed, k)``, the same batch it would see
    under every other algorithm (common random numbers). ``rank``: the LoRA rank of the client's
    side (None: ``model.lora.r``, the server side's rank).
    """

    client_id: int
    state: AdapterState
    step: int
    rank: int | None = None
    moments: AdapterState | None = None  # the client's optimizer moments (None: a fresh optimizer)


@dataclass
class SplitStepResult:
    """Per job (same order as the jobs): updated adapters, loss, real bytes and measured FLOPs."""

    client_states: list[AdapterState]
    client_moments: list[AdapterState]  # each client's optimizer moments after its step
    server_states: list[AdapterState]  # shared server: one state (after the last job); per_client: one per job
    losses: list[float]
    bytes_up: list[int]  # serialized payloads client -> server (activation, mask, labels / U-shaped gradient)
    bytes_down: list[int]  # serialized payloads server -> client (gradient / U-shaped activation)
    client_flops: list[float]  # forward + backward of the client part (and the head when U-shaped)
    server_flops: list[float]
    rows: list[int]  # batch rows (samples) each job processed
    messages: int  # messages each way per job: 1, or 2 when U-shaped


class SplitRunner(Protocol):
    """Runs split steps on the engine's model; algorithms hold the adapter states."""

    client_keys: list[str]  # adapter keys the clients hold (embeddings + blocks [0, k), + head if U-shaped)
    server_keys: list[str]  # adapter keys the server holds
    accounting: dict  # static sizes: client_params, client_adapter_params, server_adapter_params, ...

    def begin(self, client_ids: list[int], fresh_optimizers: bool) -> None:
        """Start these clients' local work; with ``fresh_optimizers`` drop the moments of the server
        copy they use (their own moments travel in their jobs and are the algorithm's to drop)."""

    def step(self, jobs: list[SplitJob], server_states: list[AdapterState], lr: float) -> SplitStepResult:
        """One optimizer step for each job, in order. ``server_states`` holds one state per job
        (``split.server: per_client``) or one state threaded through the jobs (``shared``)."""
