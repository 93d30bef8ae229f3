"""``fedavg``: federated LoRA. Sampled clients train locally from the global adapter; the server
aggregates their states (``federation.aggregator``) and applies its optimizer.

Wire per round: the global adapter down to each sampled client, each client's adapter up
(safetensors payloads of O(adapter) bytes; the frozen base never moves).
"""

from __future__ import annotations

import numpy as np

from ..adapters import payload_nbytes
from ..aggregation import get_aggregator, server_step
from ..config import ColoraError
from ..costmodel import fedavg_round_time
from ..schedule import lr_at
from ..types import ClientTask, RoundResult
from .base import Algorithm, sample_clients


class FedAvg(Algorithm):
    name = "fedavg"

    def __init__(self, ctx):
        super().__init__(ctx)
        fed = self.cfg.federation
        self.aggregate = get_aggregator(fed.aggregator)
        if fed.server_optimizer != "none" and fed.aggregator != "fedit":
            # A pseudo-gradient needs the aggregate in the same factor coordinates as the global
            # adapter; re-factoring rules (product) rotate the factors every round.
            raise ColoraError(
                f"federation.server_optimizer={fed.server_optimizer} needs federation.aggregator=fedit "
                f"(got {fed.aggregator}, which re-factors B and A each round)"
            )
        self.state = ctx.initial_state
        self.server_opt_state: dict = {}
        self.client_steps = [0] * self.cfg.clients.num  # each client's own batch counter

    def run_round(self, rnd: int) -> RoundResult:
        cfg = self.cfg
        sampled = sample_clients(cfg.seed, rnd, cfg.clients.num, cfg.clients.per_round)
        steps, lr = cfg.train.local_steps, lr_at(cfg.train, rnd, cfg.rounds)
        anchor = self.state if cfg.train.prox_mu > 0 else None
        keep = cfg.train.client_optimizer == "keep"
        tasks = [ClientTask(k, self.state, self.client_steps[k], steps, lr, prox_anchor=anchor, keep_optimizer=keep) for k in sampled]
        results = self.ctx.run_tasks(tasks)
        for r in results:
            self.client_steps[r.client_id] += r.steps
        down = payload_nbytes(self.state)  # the same global payload goes to every sampled client
        ups = [payload_nbytes(r.state) for r in results]
        weights = [float(r.num_samples) if cfg.federation.weighting == "samples" else 1.0 for r in results]
        aggregate = self.aggregate([r.state for r in results], weights)
        self.state, self.server_opt_state = server_step(cfg.federation, self.state, aggregate, self.server_opt_state)
        sim = fedavg_round_time(
            [r.flops for r in results], ups, [down] * len(results),
            [cfg.system.client] * len(results), cfg.system.server, self.ctx.adapter_params * len(results),
        )
        loss = float(np.average([r.loss for r in results], weights=weights))
        return RoundResult(loss, sum(ups), down * len(results), sim, {"clients": len(results)})

    def global_state(self):
        return self.state

    def state_dict(self) -> dict:
        return {"state": self.state, "server_opt": self.server_opt_state, "client_steps": self.client_steps}

    def load_state_dict(self, state: dict) -> None:
        self.state, self.server_opt_state = state["state"], state["server_opt"]
        self.client_steps = list(state["client_steps"])
