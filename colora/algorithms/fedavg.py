"""``fedavg``: federated LoRA. Sampled clients train locally from the global adapter; the server
aggregates their states (``federation.aggregator``) and applies its optimizer.

Wire per round: the global adapter down to each sampled client, each client's adapter up
(safetensors payloads of O(adapter) bytes; the frozen base never moves).

Clients may hold LoRA adapters of different ranks (``federation.ranks`` / ``rank_rule``, see
``colora.ranks``). An :class:`~colora.algorithms.server.AdapterServer` keeps the global adapter and
gives each client its own-rank projection (equal-rank rules, fedit and product, give everyone the
global and refuse mixed ranks), so each payload, down and up, is the size of that client's rank
(``stack`` sends the merged global down instead, see ``colora/aggregation/stack.py``).
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from ..aggregation import server_step
from ..aggregation.fedit import weighted_mean
from ..config import ColoraError, NonFiniteError
from ..costmodel import fedavg_round_time
from ..privacy import dp_fedavg
from ..privacy import noise_generator as dp_noise
from ..schedule import lr_at
from ..states import lora_rank, payload_nbytes
from ..types import ClientTask, RoundResult, SecureSum
from .base import Algorithm, attackers_over_tolerance, sample_clients, screen_round
from .drift import PersonalB, Scaffold, frozen_keys, home_keys, nbytes, sent_keys
from .server import AdapterServer


class FedAvg(Algorithm):
    name = "fedavg"

    def __init__(self, ctx):
        super().__init__(ctx)
        fed = self.cfg.federation
        ranks = ctx.client_ranks or [self.cfg.model.lora.r] * self.cfg.clients.num
        self.server = AdapterServer(self.cfg, ranks, ctx.initial_state_at)
        if fed.server_optimizer != "none" and fed.aggregator != "fedit":
            # A pseudo-gradient needs the aggregate in the same factor coordinates as the global
            # adapter; re-factoring rules (product) rotate the factors every round.
            raise ColoraError(
                f"federation.server_optimizer={fed.server_optimizer} needs federation.aggregator=fedit "
                f"(got {fed.aggregator}, which re-factors B and A each round)"
            )
        self.server_opt_state: dict = {}
        self.client_steps = [0] * self.cfg.clients.num  # each client's own batch counter
        self.scaffold = Scaffold(self.cfg, self.server.state) if self.cfg.train.correction == "scaffold" else None
        fedsa = self.cfg.federation.lora_mode == "fedsa"
        self.personal = PersonalB(self.server.state, ctx.client_sizes) if fedsa else None
        note = attackers_over_tolerance(self.cfg, self.attackers)
        if note:  # a simulated experiment may mean to exceed it: said, not refused
            tqdm.write(note)

    def run_round(self, rnd: int) -> RoundResult:
        cfg, server = self.cfg, self.server
        sampled = sample_clients(cfg.seed, rnd, cfg.clients.num, cfg.clients.per_round)
        steps, lr = cfg.train.local_steps, lr_at(cfg.train, rnd, cfg.rounds)
        keep = cfg.train.client_optimizer == "keep"
        sent, delta = {k: server.client_state(k, rnd) for k in sampled}, server.base_delta()
        mode, frozen = cfg.federation.lora_mode, frozen_keys(cfg.federation.lora_mode, rnd, server.state)
        last = set(sample_clients(cfg.seed, rnd - 1, cfg.clients.num, cfg.clients.per_round)) if rnd > 1 else set()
        downs = [server.down_nbytes(sent[k]) if mode == "standard" else nbytes(sent[k], sent_keys(mode, rnd, sent[k], k in last))
                 for k in sampled]
        if self.scaffold is not None:  # c travels down with the adapter
            downs = [d + payload_nbytes(self.scaffold.c) for d in downs]
        start = {k: self.personal.task_state(k, sent[k]) if self.personal else sent[k] for k in sampled}
        tasks = [ClientTask(k, start[k], self.client_steps[k], steps, lr, prox_anchor=sent[k] if cfg.train.prox_mu > 0 else None,
                            keep_optimizer=keep, **server.task_options(k), base_delta=delta, moments=self.moments.get(k),
                            flip_labels=self.flip_labels(k), frozen=frozen,
                            correction=self.scaffold.correction(k) if self.scaffold else None) for k in sampled]
        if cfg.federation.secure_aggregation:  # the server learns only the weighted mean
            return self.secure_round(rnd, tasks, downs)
        results = self.ctx.run_tasks(tasks)
        self.attack(rnd, results, start)
        for r in results:
            self.client_steps[r.client_id] += r.steps
        received = results  # every sampled client ran; a dropped update still crossed the wire
        results, rejected = screen_round(rnd, results, start, cfg.federation.max_update_norm)
        self.keep_moments(results)
        if self.personal is not None:  # FedSA: each client keeps its B; the server averages A and the head
            self.personal.keep(results)
        states = [server.receive(r.client_id, r.state if self.personal is None else self.personal.shared(r.state, server.state))
                  for r in results]
        home = set(frozen) | set(home_keys(mode, server.state))
        travels = lambda st: nbytes(st, [k for k in st if k not in home])  # noqa: E731 - frozen and personal keys stay home
        up_of = {r.client_id: 0 if r.failed else travels(r.state) for r in received}
        # what travels: HetLoRA's pruned upload, HAFL's freeze mode the trained components, plus HAFL's scores
        up_of.update({r.client_id: travels({**st, **{"scores/" + k: v for k, v in (r.scores or {}).items()}})
                      for r, st in zip(results, states)})
        if self.scaffold is not None:  # each client's change of its control variate goes up too
            for k, extra in self.scaffold.update(results, sent, lr).items():
                up_of[k] += extra
        ups = [up_of[r.client_id] for r in received]
        weights = [float(r.num_samples) if cfg.federation.weighting == "samples" else 1.0 for r in results]
        previous = server.state
        if cfg.privacy.mode == "client":  # DP-FedAvg: clipped updates, noise, a fixed denominator
            server.state = dp_fedavg(states, previous, cfg.privacy.clip, cfg.privacy.noise_multiplier, cfg.clients.per_round,
                                     dp_noise(cfg.seed, rnd))
        else:
            server.aggregate(states, weights, sents=[sent[r.client_id] for r in results], scores=[r.scores for r in results])
        server.state, self.server_opt_state = server_step(cfg.federation, previous, server.state, self.server_opt_state)
        sim = fedavg_round_time(
            [r.flops for r in received], ups, downs, [self.device(r.client_id) for r in received], cfg.system.server,
            sum(v.numel() for s in states for v in s.values()),
        )
        loss = float(np.average([r.loss for r in results], weights=weights))
        return RoundResult(loss, sum(ups), sum(downs), sim, {"clients": len(results), "global_rank": lora_rank(server.state),
                                                             "rejected_updates": len(rejected),
                                                             **self.privacy_spent(rnd, self.client_steps),
                                                             **self.client_metrics(rnd, self.client_model)})

    def secure_round(self, rnd: int, tasks: list[ClientTask], downs: list[int]) -> RoundResult:
        """A round under ``federation.secure_aggregation``: the weighted mean of the trained states is
        all the server learns (SecAgg+ deployed, ``ctx.run_secure``; simulated, the same mean taken
        on the driver). No update is screened: the server never sees one. Bytes up: each client's
        plain update (deployed, ``wire_bytes_up`` counts the protocol's masked vectors)."""
        cfg, server = self.cfg, self.server
        agg = (self.ctx.run_secure or self._secure_sum)(tasks)
        for t, steps in zip(tasks, agg.steps):
            self.client_steps[t.client_id] += steps
        server.state, self.server_opt_state = server_step(cfg.federation, server.state, agg.state, self.server_opt_state)
        ups = [payload_nbytes(agg.state) if steps else 0 for steps in agg.steps]
        sim = fedavg_round_time(agg.flops, ups, downs, [self.device(t.client_id) for t in tasks], cfg.system.server,
                                agg.answered * sum(v.numel() for v in agg.state.values()))
        return RoundResult(agg.loss, sum(ups), sum(downs), sim, {"clients": agg.answered, "global_rank": lora_rank(server.state),
                                                                 "rejected_updates": 0, **self.privacy_spent(rnd, self.client_steps),
                                                                 **self.client_metrics(rnd, self.client_model)})

    def _secure_sum(self, tasks: list[ClientTask]) -> SecureSum:
        """The simulated secure sum: every client's update, combined exactly as SecAgg+ combines
        them (weighted by rows, or uniformly), the per-client states then forgotten."""
        results = self.ctx.run_tasks(tasks)
        ok = [r for r in results if not r.failed]
        if not ok:
            raise NonFiniteError("every client's local training produced NaN or inf this round; lower train.lr")
        w = [float(r.num_samples) if self.cfg.federation.weighting == "samples" else 1.0 for r in ok]
        return SecureSum(weighted_mean([r.state for r in ok], w), float(np.average([r.loss for r in ok], weights=w)),
                         sum(r.num_samples for r in ok), [r.flops for r in results], [r.steps for r in results], len(ok))

    def client_model(self, client: int):
        """The model ``client`` uses: the global, or under FedSA the global with its own B."""
        return self.personal.model_of(client, self.server.state) if self.personal else self.server.state

    def global_state(self):
        return self.personal.reference(self.server.state) if self.personal else self.server.state

    def state_dict(self) -> dict:
        return {"server": self.server.state_dict(), "server_opt": self.server_opt_state, "client_steps": self.client_steps,
                "moments": self.moments, **({"scaffold": self.scaffold.state_dict()} if self.scaffold else {}),
                **({"personal": self.personal.state_dict()} if self.personal else {})}

    def load_state_dict(self, state: dict) -> None:
        # Checkpoints before the one-rule server kept the equal-rank global under "state".
        server = state.get("server") or state.get("ranked") or {**self.server.state_dict(), "state": state["state"]}
        self.server.load_state_dict(server)
        self.server_opt_state = state["server_opt"]
        self.client_steps = list(state["client_steps"])
        self.moments = dict(state.get("moments", {}))
        if self.scaffold is not None:
            self.scaffold.load_state_dict(state["scaffold"])
        if self.personal is not None:
            self.personal.load_state_dict(state["personal"])
