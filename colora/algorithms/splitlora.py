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

from ..adapters import payload_nbytes
from ..aggregation import get_aggregator
from ..config import ColoraError, Config
from ..costmodel import adapter_sync_time, split_step_time
from ..schedule import lr_at
from ..split.types import SplitJob, SplitRunner, SplitStepResult
from ..types import AdapterState, RoundResult
from .base import Algorithm, sample_clients

_TOTALS = ("client_flops", "server_flops", "samples", "jobs", "activation_bytes_up", "activation_bytes_down",
           "adapter_bytes_up", "adapter_bytes_down")


def check_split_config(cfg: Config, split: SplitRunner | None) -> SplitRunner:
    """Refuse settings the split algorithms do not implement, naming the key and value."""
    if split is None:
        raise ColoraError(f"algorithm={cfg.algorithm}: engine={cfg.engine} offers no split runner")
    if cfg.train.prox_mu > 0:
        raise ColoraError(f"train.prox_mu={cfg.train.prox_mu:g}: FedProx is not available for algorithm={cfg.algorithm}")
    if cfg.federation.server_optimizer != "none":
        raise ColoraError(f"federation.server_optimizer={cfg.federation.server_optimizer}: not available for algorithm={cfg.algorithm}")
    if cfg.federation.ranks is not None:
        raise ColoraError(f"federation.ranks={cfg.federation.ranks}: per-client ranks are not available for algorithm={cfg.algorithm}")
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

    def global_state(self) -> AdapterState:
        # The client and server parts are disjoint key sets of one peft adapter: the union is the
        # adapter over the whole model.
        return {**self.client_state, **self.server_state}

    def state_dict(self) -> dict:
        return {"client": self.client_state, "server": self.server_state, "client_steps": self.client_steps,
                "totals": self.stats.totals}

    def load_state_dict(self, state: dict) -> None:
        self.client_state, self.server_state = state["client"], state["server"]
        self.client_steps = list(state["client_steps"])
        self.stats.totals = dict(state["totals"])


class SplitLoRA(SplitAlgorithm):
    name = "splitlora"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.aggregate = get_aggregator(self.cfg.federation.aggregator)
        self.per_client = self.cfg.split.server == "per_client"

    def run_round(self, rnd: int) -> RoundResult:
        cfg, split = self.cfg, self.split
        sampled = sample_clients(cfg.seed, rnd, cfg.clients.num, cfg.clients.per_round)
        steps, lr, every = cfg.train.local_steps, lr_at(cfg.train, rnd, cfg.rounds), cfg.split.aggregate_every
        weights = [float(self.ctx.client_sizes[k]) if cfg.federation.weighting == "samples" else 1.0 for k in sampled]
        devices = [self.device(k) for k in sampled]
        split.begin(sampled, [self.client_steps[k] for k in sampled], fresh_optimizers=cfg.train.client_optimizer == "reset")
        clients = [self.client_state] * len(sampled)
        servers = [self.server_state] * (len(sampled) if self.per_client else 1)
        down0 = payload_nbytes(self.client_state)  # the round's global client-side adapter, to each client
        up, down, sim = 0, down0 * len(sampled), adapter_sync_time([], [down0] * len(sampled), devices, cfg.system.server, 0)
        losses = np.zeros(len(sampled))
        for j in range(steps):
            jobs = [SplitJob(k, clients[i], self.client_steps[k]) for i, k in enumerate(sampled)]
            res = split.step(jobs, servers, lr)
            clients, servers = res.client_states, res.server_states
            for k in sampled:
                self.client_steps[k] += 1
            losses += np.asarray(res.losses) / steps
            self.stats.add_step(res)
            up, down = up + sum(res.bytes_up), down + sum(res.bytes_down)
            sim += split_step_time(res.client_flops, res.bytes_up, res.bytes_down, res.server_flops, devices,
                                   cfg.system.server, res.messages)
            if (j + 1) % every == 0 or j + 1 == steps:
                clients, servers, nbytes = self._average(clients, servers, weights, last=j + 1 == steps)
                up, down = up + nbytes[0], down + nbytes[1]
                sim += adapter_sync_time(nbytes[2], nbytes[3], devices, cfg.system.server, nbytes[4])
        self.client_state, self.server_state = clients[0], servers[0]
        self.stats.totals["adapter_bytes_down"] += down0 * len(sampled)
        return RoundResult(float(np.average(losses, weights=weights)), up, down, sim, {"clients": len(sampled)})

    def _average(self, clients: list[AdapterState], servers: list[AdapterState], weights: list[float], last: bool):
        """FedAvg of the client-side adapters (and of per-client server copies): each client once."""
        ups = [payload_nbytes(s) for s in clients]
        avg = self.aggregate(clients, weights)
        downs = [0 if last else payload_nbytes(avg)] * len(clients)  # at a round's end the next round's broadcast sends it
        params = sum(t.numel() for t in avg.values()) * len(clients)
        if self.per_client:
            server_avg = self.aggregate(servers, weights)
            servers = [server_avg] * len(servers)
            params += sum(t.numel() for t in server_avg.values()) * len(servers)
        self.stats.totals["adapter_bytes_up"] += sum(ups)
        self.stats.totals["adapter_bytes_down"] += sum(downs)
        return [avg] * len(clients), servers, (sum(ups), sum(downs), ups, downs, params)

    def summary(self) -> dict:
        return self.stats.summary(self.split.accounting, {"server": self.cfg.split.server,
                                                          "activation_dtype": self.cfg.split.activation_dtype,
                                                          "aggregate_every": self.cfg.split.aggregate_every})
