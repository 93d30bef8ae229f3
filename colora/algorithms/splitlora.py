"""``splitlora``: split federated LoRA (SplitLoRA, Lin et al. 2024, arXiv 2407.00952).

The model is cut before block ``split.layer``. In every step each sampled client runs embeddings +
blocks [0, k) on its next batch and sends the activation (plus mask and labels) to the main server,
which runs the rest, computes the loss and returns the activation's gradient. The fed server
averages the client-side adapters (``federation.aggregator``, sample-weighted) every
``split.aggregate_every`` local steps and at the end of each round, each client's state exactly
once, after that step's update. A round is ``train.local_steps`` steps.

``split.server``: ``shared`` (SplitFed-V2) keeps one server adapter, updated for each client's batch
in turn; ``per_client`` (SplitFed-V1) keeps one server adapter per client, averaged together with
the client adapters (same weights, same times). Averaging the server copies happens inside the
main server and moves no bytes.

Per-client ranks (``federation.ranks`` / ``rank_rule``, as for ``fedavg``): each client trains its
side at its own rank r_k <= ``model.lora.r`` (the server side and the global client-side adapter
stay at ``model.lora.r``); a mixed-rank rule (``zero_pad``, ``svd``, ``hlora``) aggregates the
client sides and gives each client its own-rank projection, so its adapter payloads scale with
r_k. ``stack`` is refused: it merges updates into the frozen base, which client and server share.

Label privacy: in this standard split the LABELS GO TO THE SERVER with every activation (they are
part of the uplink payload). ``split.u_shaped: true`` keeps head and loss on the client: labels
never leave it, at the price of a second exchange per step (the last hidden state down, its
gradient up).

Wire per round: the global client-side adapter down to each sampled client; per step and client
the activation up and its gradient down (``split.activation_dtype``); per aggregation each client's
client-side adapter up and, unless the round ends there, the average back down.
"""

from __future__ import annotations

import numpy as np

from ..aggregation import get_rule
from ..config import ColoraError, Config
from ..costmodel import adapter_sync_time, split_step_time
from ..schedule import lr_at
from ..split.types import SplitJob, SplitRunner, SplitStepResult
from ..states import payload_nbytes
from ..types import AdapterState, RoundResult
from .base import Algorithm, sample_clients
from .server import AdapterServer

_TOTALS = ("client_flops", "server_flops", "samples", "jobs", "activation_bytes_up", "activation_bytes_down",
           "adapter_bytes_up", "adapter_bytes_down")


def check_split_config(cfg: Config, split: SplitRunner | None) -> SplitRunner:
    """Refuse settings the split algorithms do not implement, naming the key and value."""
    if split is None:
        raise ColoraError(f"algorithm={cfg.algorithm}: engine.kind={cfg.engine.kind} offers no split runner")
    if cfg.train.prox_mu > 0:
        raise ColoraError(f"train.prox_mu={cfg.train.prox_mu:g}: FedProx is not available for algorithm={cfg.algorithm}")
    if cfg.federation.server_optimizer != "none":
        raise ColoraError(f"federation.server_optimizer={cfg.federation.server_optimizer}: not available for algorithm={cfg.algorithm}")
    if cfg.federation.hetlora_prune_gamma is not None:
        raise ColoraError(f"federation.hetlora_prune_gamma: HetLoRA rank pruning is not available for algorithm={cfg.algorithm}")
    return split


class SplitTotals:
    """Running totals for summary.json's ``split`` section (checkpointed with the algorithm)."""

    def __init__(self):
        self.totals = dict.fromkeys(_TOTALS, 0.0)

    def add_step(self, res: SplitStepResult) -> None:
        t = self.totals
        t["client_flops"] += sum(res.client_flops)
        t["server_flops"] += sum(res.server_flops)
        t["samples"] += sum(res.rows)
        t["jobs"] += len(res.rows)
        t["activation_bytes_up"] += sum(res.bytes_up)
        t["activation_bytes_down"] += sum(res.bytes_down)

    def summary(self, accounting: dict, extra: dict) -> dict:
        t, per = self.totals, lambda a, b: a / b if b else 0.0  # noqa: E731
        return {"split": {
            **accounting, **extra,
            "client_flops_per_sample": per(t["client_flops"], t["samples"]),
            "server_flops_per_sample": per(t["server_flops"], t["samples"]),
            "activation_bytes_up_per_step": per(t["activation_bytes_up"], t["jobs"]),  # per client step
            "activation_bytes_down_per_step": per(t["activation_bytes_down"], t["jobs"]),
            **{f"total_{k}": v for k, v in t.items()},
        }}


class SplitAlgorithm(Algorithm):
    """Shared start of ``sl`` and ``splitlora``: the initial adapter cut into its client and server
    halves, per-client step counters and the split accounting totals."""

    runner = "split"  # the engine builds a SplitRunner and passes it as ctx.split

    def __init__(self, ctx):
        super().__init__(ctx)
        self.split = check_split_config(self.cfg, ctx.split)
        self.client_state = {k: ctx.initial_state[k] for k in self.split.client_keys}
        self.server_state = {k: ctx.initial_state[k] for k in self.split.server_keys}
        self.client_steps = [0] * self.cfg.clients.num
        self.stats = SplitTotals()

    def begin(self, clients: list[int]) -> None:
        """These clients start their local work: with train.client_optimizer=reset, fresh moments for
        them and for the server copy they use."""
        fresh = self.cfg.train.client_optimizer == "reset"
        if fresh:
            for k in clients:
                self.moments.pop(k, None)
        self.split.begin(clients, fresh_optimizers=fresh)

    def global_state(self) -> AdapterState:
        # The client and server parts are disjoint key sets of one peft adapter: the union is the
        # adapter over the whole model.
        return {**self.client_state, **self.server_state}

    def state_dict(self) -> dict:
        return {"client": self.client_state, "server": self.server_state, "client_steps": self.client_steps,
                "totals": self.stats.totals, "moments": self.moments}

    def load_state_dict(self, state: dict) -> None:
        self.client_state, self.server_state = state["client"], state["server"]
        self.client_steps = list(state["client_steps"])
        self.stats.totals = dict(state["totals"])
        self.moments = dict(state.get("moments", {}))


class SplitLoRA(SplitAlgorithm):
    name = "splitlora"

    def __init__(self, ctx):
        super().__init__(ctx)
        fed, r = self.cfg.federation, self.cfg.model.lora.r
        self.per_client = self.cfg.split.server == "per_client"
        self.ranks = list(ctx.client_ranks) or [r] * self.cfg.clients.num
        rule = get_rule(fed)
        if rule.merges_base:
            raise ColoraError(f"federation.aggregator={fed.aggregator} is not available for algorithm=splitlora: it merges each "
                              "round's update into the frozen base, which clients and server share (use svd or zero_pad)")
        if rule.equal_ranks and any(k != r for k in self.ranks):
            raise ColoraError(f"federation.aggregator={fed.aggregator} needs every client at model.lora.r={r}, but the "
                              f"clients' ranks are {sorted(set(self.ranks))}; use zero_pad or svd for mixed ranks")
        if max(self.ranks) > r:
            raise ColoraError(f"client ranks up to {max(self.ranks)} exceed model.lora.r={r}, the rank of the server side "
                              "and of the global adapter; raise model.lora.r")
        keys = self.split.client_keys
        self.server = AdapterServer(self.cfg, self.ranks, lambda rank: {k: ctx.initial_state_at(rank)[k] for k in keys},
                                    global_rank=r)
        # per-client server copies (all at rank r) go through the same rule
        alpha = self.cfg.model.lora.alpha
        self.aggregate = lambda states, weights: rule.aggregate(states, weights, alpha, r, states[0])

    def run_round(self, rnd: int) -> RoundResult:
        cfg, split = self.cfg, self.split
        sampled = sample_clients(cfg.seed, rnd, cfg.clients.num, cfg.clients.per_round)
        steps, lr, every = cfg.train.local_steps, lr_at(cfg.train, rnd, cfg.rounds), cfg.split.aggregate_every
        weights = [float(self.ctx.client_sizes[k]) if cfg.federation.weighting == "samples" else 1.0 for k in sampled]
        devices = [self.device(k) for k in sampled]
        self.begin(sampled)
        clients = self._send(sampled, rnd)  # the round's global client-side adapter, at each client's rank
        servers = [self.server_state] * (len(sampled) if self.per_client else 1)
        down0 = [payload_nbytes(s) for s in clients]
        up, down, sim = 0, sum(down0), adapter_sync_time([], down0, devices, cfg.system.server, 0)
        losses = np.zeros(len(sampled))
        for j in range(steps):
            jobs = [SplitJob(k, clients[i], self.client_steps[k], self.server.ranks[k], self.moments.get(k))
                    for i, k in enumerate(sampled)]
            res = split.step(jobs, servers, lr)
            self.moments.update(zip(sampled, res.client_moments))
            clients, servers = res.client_states, res.server_states
            for k in sampled:
                self.client_steps[k] += 1
            losses += np.asarray(res.losses) / steps
            self.stats.add_step(res)
            up, down = up + sum(res.bytes_up), down + sum(res.bytes_down)
            sim += split_step_time(res.client_flops, res.bytes_up, res.bytes_down, res.server_flops, devices,
                                   cfg.system.server, res.messages)
            if (j + 1) % every == 0 or j + 1 == steps:
                clients, servers, nbytes = self._average(clients, servers, weights, sampled, rnd, last=j + 1 == steps)
                up, down = up + nbytes[0], down + nbytes[1]
                sim += adapter_sync_time(nbytes[2], nbytes[3], devices, cfg.system.server, nbytes[4])
        self.client_state = self.server.state
        self.server_state = servers[0]
        self.stats.totals["adapter_bytes_down"] += sum(down0)
        return RoundResult(float(np.average(losses, weights=weights)), up, down, sim, {"clients": len(sampled)})

    def _send(self, sampled: list[int], rnd: int) -> list[AdapterState]:
        """The global client-side adapter as each sampled client receives it (its own rank)."""
        return [self.server.client_state(k, rnd) for k in sampled]

    def _average(self, clients: list[AdapterState], servers: list[AdapterState], weights: list[float],
                 sampled: list[int], rnd: int, last: bool):
        """FedAvg of the client-side adapters (and of per-client server copies): each client once."""
        ups = [payload_nbytes(s) for s in clients]
        self.server.aggregate(clients, weights)
        new = self._send(sampled, rnd)
        downs = [0 if last else payload_nbytes(s) for s in new]  # at a round's end the next round's broadcast sends it
        params = sum(t.numel() for s in new for t in s.values())
        if self.per_client:
            server_avg = self.aggregate(servers, weights)
            servers = [server_avg] * len(servers)
            params += sum(t.numel() for t in server_avg.values()) * len(servers)
        self.stats.totals["adapter_bytes_up"] += sum(ups)
        self.stats.totals["adapter_bytes_down"] += sum(downs)
        return new, servers, (sum(ups), sum(downs), ups, downs, params)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "server_adapter": self.server.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        # Checkpoints before the one-rule server kept only mixed-rank servers (equal ranks: the client state).
        server = state.get("server_adapter") or state.get("ranked") or {**self.server.state_dict(), "state": self.client_state}
        self.server.load_state_dict(server)

    def summary(self) -> dict:
        return self.stats.summary(self.split.accounting, {"server": self.cfg.split.server,
                                                          "activation_dtype": self.cfg.split.activation_dtype,
                                                          "aggregate_every": self.cfg.split.aggregate_every})
