"""Secure aggregation of a fedavg round in deployment (``federation.secure_aggregation``), through
Flower's SecAgg+ (Bell et al. 2020): the server learns the clients' weighted mean, never one
client's update.

Each sampled owner trains its task as usual; its ClientApp (:func:`secure_fit`, no torch) flattens
the trained adapter (keys sorted) plus its training loss / ``LOSS_SCALE`` into one float vector and
answers a Flower ``FitRes`` with it and its weight (rows, or 1 under uniform weighting). Flower's
``secaggplus_mod`` then quantizes the weighted vector (values clipped to ±``CLIP``, 2^22 levels,
stochastic rounding), adds pairwise masks agreed with the other sampled owners and a private
mask, and sends only that. The server (:func:`secure_sum`) runs Flower's ``SecAggPlusWorkflow``
(setup, key sharing, masked vectors, unmasking with Shamir shares of the dropped owners' keys)
and gets the weighted mean vector back, which becomes colora's new global adapter. Compute
figures (FLOPs, steps) travel in the clear beside the masked vector; the number of rows is the
weight the protocol hides inside it.

Cost: the protocol's four message exchanges a round and the masked vector (64-bit integers
where the plain update is 32-bit floats), counted in ``wire_bytes_up/down``. Flower's SecAgg+
runs inside its legacy strategy machinery, hence the small :class:`_CollectSum` strategy.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.common import Code, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from safetensors.numpy import load as load_numpy

from .wire import CLIP, LOSS_SCALE

TASK_KEY, WEIGHT_KEY = "colora-task", "colora-weight"


def flat_result(blob: bytes) -> tuple[np.ndarray, dict]:
    """An owner's result message as (state values in sorted key order, then loss / LOSS_SCALE; the
    scalars), read with numpy only."""
    (size,) = struct.unpack("<Q", blob[:8])
    scalars = json.loads(json.loads(blob[8: 8 + size])["__metadata__"]["colora"])
    if scalars.get("kind") != "result":
        raise ValueError(f"the owner answered a {scalars.get('kind')!r} message, not a result")
    if scalars.get("failed"):
        raise ValueError(f"the owner sends no update this round: {scalars['failed']}")
    tensors = load_numpy(blob)
    state = sorted(k for k in tensors if k.startswith("state/"))
    parts = [tensors[k].astype(np.float64).ravel() for k in state] + [np.array([scalars["loss"] / LOSS_SCALE])]
    return np.concatenate(parts), scalars


def secure_fit(msg: Message, answer) -> Message:
    """The ClientApp's part: the task inside Flower's FitIns to the owner (``answer(blob) -> blob``),
    its trained state back as the flat vector secaggplus_mod masks."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    vector, scalars = flat_result(answer(bytes(fitins.config[TASK_KEY])))
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([vector]), int(fitins.config[WEIGHT_KEY]),
                 {"flops": float(scalars["flops"]), "steps": int(scalars["steps"])})
    return Message(compat.fitres_to_recorddict(res, keep_input=False), reply_to=msg)


class _CollectSum(Strategy):
    """The strategy SecAgg+ asks for: the round's FitIns out, the unmasked mean kept."""

    def __init__(self, fitins: dict[GridClientProxy, FitIns]):
        self.fitins, self.results, self.failures = fitins, None, []

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        return list(self.fitins.items())

    def aggregate_fit(self, server_round, results, failures):
        self.results, self.failures = results, failures
        return None, {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


@dataclass
class Summed:
    """The unmasked weighted mean vector and what the answering nodes reported in the clear."""

    mean: np.ndarray
    answered: dict[int, dict]  # node id -> {"flops", "steps"}


def secure_sum(grid, context: Context, tasks: list[tuple[int, bytes, int]], rnd: int, timeout: float) -> Summed | None:
    """Run one SecAgg+ round over ``tasks`` (node id, task bytes, weight); None when the protocol
    halted (fewer answers than it needs to unmask)."""
    proxies = {node: GridClientProxy(node, grid, context.run_id) for node, _, _ in tasks}
    manager = SimpleClientManager()
    for proxy in proxies.values():
        manager.register(proxy)
    empty = Parameters(tensors=[], tensor_type="numpy.ndarray")
    strategy = _CollectSum({proxies[node]: FitIns(empty, {TASK_KEY: blob, WEIGHT_KEY: weight}) for node, blob, weight in tasks})
    legacy = LegacyContext(context, ServerConfig(num_rounds=1, round_timeout=timeout), strategy, manager)
    legacy.state.config_records["config"] = ConfigRecord({"current_round": rnd})
    legacy.state.array_records["parameters"] = ArrayRecord()
    workflow = SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=0.5, clipping_range=CLIP,
                                  max_weight=float(max(w for _, _, w in tasks)), timeout=timeout)
    workflow(grid, legacy)
    if not strategy.results:
        return None
    mean = parameters_to_ndarrays(strategy.results[0][1].parameters)[0]
    return Summed(mean, {proxy.node_id: dict(res.metrics) for proxy, res in strategy.results})
