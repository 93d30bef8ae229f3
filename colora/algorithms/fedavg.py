"""``fedavg``: federated LoRA. Sampled clients train locally from the global adapter; the server
aggregates their states (``federation.aggregator``) and applies its optimizer.

Wire per round: the global adapter down to each sampled client, each client's adapter up
(safetensors payloads of O(adapter) bytes; the frozen base never moves).

Clients may hold LoRA adapters of different ranks (``federation.ranks`` / ``rank_rule``, see
``colora.ranks``). With an equal-rank rule (fedit, product) every client gets the one global
adapter, and mixed ranks are refused. With a mixed-rank rule (zero_pad, svd, stack, hlora) a
:class:`~colora.algorithms.ranked.RankedServer` keeps the global adapter and gives each client its
own-rank projection, so each payload, down and up, is the size of that client's rank (``stack``
sends the merged global down instead, see ``colora/aggregation/stack.py``).
"""

from __future__ import annotations

import numpy as np

from ..states import lora_rank, payload_nbytes
from ..aggregation import RANKED, get_aggregator, server_step
from ..config import ColoraError
from ..costmodel import fedavg_round_time
from ..schedule import lr_at
from ..types import ClientTask, RoundResult
from .base import Algorithm, sample_clients
from .ranked import RankedServer


class FedAvg(Algorithm):
    name = "fedavg"

    def __init__(self, ctx):
        super().__init__(ctx)
        fed = self.cfg.federation
        ranks = ctx.client_ranks or [self.cfg.model.lora.r] * self.cfg.clients.num
        self.ranked = RankedServer(self.cfg, ranks, ctx.initial_state_at) if fed.aggregator in RANKED else None
        if self.ranked is None:
            self.aggregate = get_aggregator(fed.aggregator)
            if len(set(ranks)) > 1:
                raise ColoraError(f"federation.aggregator={fed.aggregator} needs equal LoRA ranks, but the clients' ranks are "
                                  f"{sorted(set(ranks))}; use zero_pad, svd or stack for mixed ranks")
        if fed.server_optimizer != "none" and fed.aggregator != "fedit":
            # A pseudo-gradient needs the aggregate in the same factor coordinates as the global
            # adapter; re-factoring rules (product) rotate the factors every round.
            raise ColoraError(
                f"federation.server_optimizer={fed.server_optimizer} needs federation.aggregator=fedit "
                f"(got {fed.aggregator}, which re-factors B and A each round)"
            )
        self.rank = ranks[0]  # equal-rank rules: everyone's rank; mixed-rank rules keep their global in self.ranked
        self.state = None if self.ranked else ctx.initial_state if self.rank == self.cfg.model.lora.r else ctx.initial_state_at(self.rank)
        self.server_opt_state: dict = {}
        self.client_steps = [0] * self.cfg.clients.num  # each client's own batch counter

    def run_round(self, rnd: int) -> RoundResult:
        cfg = self.cfg
        sampled = sample_clients(cfg.seed, rnd, cfg.clients.num, cfg.clients.per_round)
        steps, lr = cfg.train.local_steps, lr_at(cfg.train, rnd, cfg.rounds)
        keep = cfg.train.client_optimizer == "keep"
        if self.ranked is None:  # the same global payload goes to every sampled client
            sent, ranks, delta = {k: self.state for k in sampled}, {k: self.rank for k in sampled}, None
            downs = [payload_nbytes(self.state)] * len(sampled)
        else:
            sent = {k: self.ranked.client_state(k, rnd) for k in sampled}
            ranks, delta = {k: self.ranked.ranks[k] for k in sampled}, self.ranked.base_delta()
            downs = [self.ranked.down_nbytes(sent[k]) for k in sampled]
        tasks = [ClientTask(k, sent[k], self.client_steps[k], steps, lr, prox_anchor=sent[k] if cfg.train.prox_mu > 0 else None,
                            keep_optimizer=keep, rank=ranks[k], base_delta=delta) for k in sampled]
        results = self.ctx.run_tasks(tasks)
        for r in results:
            self.client_steps[r.client_id] += r.steps
        states = [r.state if self.ranked is None else self.ranked.receive(r.client_id, r.state) for r in results]
        ups = [payload_nbytes(s) for s in states]
        weights = [float(r.num_samples) if cfg.federation.weighting == "samples" else 1.0 for r in results]
        extra = {"clients": len(results)}
        if self.ranked is None:
            aggregate = self.aggregate(states, weights)
            self.state, self.server_opt_state = server_step(cfg.federation, self.state, aggregate, self.server_opt_state)
        else:
            self.ranked.aggregate(states, weights)
            extra["global_rank"] = lora_rank(self.ranked.state)
        sim = fedavg_round_time(
            [r.flops for r in results], ups, downs, [self.device(r.client_id) for r in results], cfg.system.server,
            sum(v.numel() for s in states for v in s.values()),
        )
        loss = float(np.average([r.loss for r in results], weights=weights))
        return RoundResult(loss, sum(ups), sum(downs), sim, extra)

    def global_state(self):
        return self.state if self.ranked is None else self.ranked.state

    def state_dict(self) -> dict:
        state = {"state": self.state, "server_opt": self.server_opt_state, "client_steps": self.client_steps}
        if self.ranked is not None:
            state["ranked"] = self.ranked.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.state, self.server_opt_state = state["state"], state["server_opt"]
        self.client_steps = list(state["client_steps"])
        if self.ranked is not None:
            self.ranked.load_state_dict(state["ranked"])
