"""``declora``: decentralized LoRA (Dec-LoRA, Ghiasvand, Alizadeh, Pedarsani 2025, arXiv 2501.15361).

No server. Every client starts from the same initial adapter (same A, B = 0, same head). Each
round every client takes ``train.local_steps`` steps on its own data from its *own* state, then
gossips with its graph neighbours (``gossip.topology``) through a symmetric doubly stochastic
matrix W (``gossip.mixing``, built in :mod:`colora.topology`): theta_i <- sum_j W_ij theta_j over
the whole adapter state (A, B and the task head). W's column sums of 1 keep the network average
exactly where local training put it; its spectral gap sets how fast the clients agree.

Compressed gossip (``gossip.quantize_bits`` / ``gossip.topk``) follows CHOCO-SGD (Koloskova et
al. 2019, arXiv 1902.00340): quantizing the parameters themselves before mixing leaves a
permanent error floor, so each node i instead keeps a public copy theta_hat_i that all its
neighbours hold too, sends q_i = Q(theta_i - theta_hat_i), everyone applies theta_hat_i += q_i,
and then theta_i <- theta_i + gamma sum_j W_ij (theta_hat_j - theta_hat_i). The compression error
stays in theta_i - theta_hat_i and is sent again later (error feedback), so the messages shrink
as the clients agree and the network average is still preserved.

Bytes: a serverless system has no up/down direction, only messages along edges. Every message
is counted twice, once in ``bytes_up`` by its sender and once in ``bytes_down`` by its receiver,
so both totals equal the per-edge traffic (sum over directed edges of the message sizes).
Per round a node sends one message to each neighbour: its adapter payload (O(adapter)) or, when
compressed, the packed difference payload of :mod:`colora.codecs`.

Node role: each node's local steps run on the engine (a client task, in any worker); its gossip
message is real bytes (its adapter, or its packed compressed difference q_i), and a node mixes only
its own state with what it decodes from its neighbours' bytes (a :class:`MixJob` and
:func:`mix_node`). The driver relays the messages along the topology's edges and never averages
nodes itself; the network average is computed for evaluation only. Deployed (colora.deploy), the
mix jobs go to the nodes, which mix themselves (``Context.run_mixes``); simulated, the driver runs
:func:`mix_node` on each node's behalf.

Memory: n adapter states (plus n public copies when compressed) live in the algorithm, O(adapter)
per client; the frozen base stays the engine's one resident copy.

The evaluated and exported adapter is the network average (1/n) sum_i theta_i. Every node trains
and gossips every round: ``clients.per_round`` (server-side sampling) does not apply.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..aggregation.fedit import weighted_mean
from ..aggregation.robust import ROBUST
from ..codecs import Compressor, from_gossip, pack, unpack
from ..config import ColoraError
from ..costmodel import declora_round_time
from ..schedule import lr_at
from ..states import lora_rank, payload_nbytes
from ..topology import Topology, TopologySchedule
from ..types import AdapterState, ClientTask, RoundResult
from .base import Algorithm, screen_round, summarize_clients


def network_average(states: list[AdapterState]) -> AdapterState:
    """(1/n) sum_i theta_i, key by key."""
    n = len(states)
    return {k: sum(s[k] for s in states) / n for k in states[0]}


def consensus_distance(states: list[AdapterState]) -> float:
    """mean_i ||theta_i - theta_bar||^2 over every entry of the adapter states (float64)."""
    avg = network_average(states)
    return float(np.mean([sum(float(((s[k] - avg[k]).double() ** 2).sum()) for k in avg) for s in states]))


def rounding_generator(seed: int, rnd: int, node: int) -> torch.Generator:
    """The stochastic-rounding noise of ``node`` in round ``rnd``: a pure function of the run seed."""
    gen = torch.Generator()
    gen.manual_seed(int(np.random.default_rng([seed, 0xC40C, rnd, node]).integers(2**62)))
    return gen


@dataclass
class MixJob:
    """Node ``node``'s gossip step, as the node runs it: its own state and what it decoded from its
    neighbours (``states``, keyed by node), the weights W_ij of plain gossip, or, for robust gossip,
    the neighbourhood's states before the round (``previous``) and the rule to apply."""

    node: int
    states: dict[int, AdapterState]
    weights: dict[int, float] = field(default_factory=dict)
    previous: dict[int, AdapterState] | None = None
    rule: str = "none"
    order: list[int] = field(default_factory=list)  # robust: itself, then its neighbours in the topology's order


def mix_node(job: MixJob, fed=None, alpha: float = 0.0) -> AdapterState:
    """One node's new state from its :class:`MixJob`: sum_j W_ij theta_j over its neighbourhood in
    increasing j (as :func:`colora.topology.mix_row`), or the plain mean of what ``federation.robust``
    keeps of it. Pure: the node (or, simulated, the driver on the node's behalf) computes it."""
    group = sorted(job.states)
    if job.rule == "none":
        return {k: sum(job.weights[j] * job.states[j][k] for j in group) for k in job.states[job.node]}
    order = job.order
    got = [job.states[j] for j in order]
    kept, _ = ROBUST[job.rule](got, [1.0] * len(got), alpha, lora_rank(job.states[job.node]), fed,
                               sents=[job.previous[j] for j in order])
    return weighted_mean(kept, [1.0] * len(kept))


def mix_jobs(states: list[AdapterState], previous: list[AdapterState], top: Topology, rule: str
             ) -> tuple[list[MixJob], list[list[int]]]:
    """Every node's mix job, and per node the sizes of the messages it sent: node i sends the bytes
    of its adapter to each neighbour, which decodes them (fp32 payloads decode exactly)."""
    blobs = [pack(s) for s in states]
    received = [unpack(b) for b in blobs]  # every neighbour of j decodes the same bytes
    jobs = []
    for i in range(top.n):
        group = sorted([i, *top.neighbors[i]])
        got = {j: states[j] if j == i else received[j] for j in group}
        if rule == "none":
            jobs.append(MixJob(i, got, {j: float(top.W[i, j]) for j in group if top.W[i, j] != 0.0}))
        else:
            jobs.append(MixJob(i, got, previous={j: previous[j] for j in group}, rule=rule, order=[i, *top.neighbors[i]]))
    return jobs, [[len(blobs[i])] * len(top.neighbors[i]) for i in range(top.n)]


def plain_gossip(states: list[AdapterState], top: Topology) -> tuple[list[AdapterState], list[list[int]]]:
    """Exact mixing of every node (W's rows); returns the new states and the message sizes sent per node."""
    jobs, sent = mix_jobs(states, states, top, "none")
    return [mix_node(j) for j in jobs], sent


@dataclass
class ChocoJob:
    """Node ``node``'s part of a CHOCO-gossip step, as the node runs it.

    ``encode``: from its trained ``state`` and its public copy ``public[node]``, the message
    q_i = Q(theta_i - theta_hat_i) (its rounding noise drawn from (seed, ``round``, node)).
    ``mix``: with the messages ``blobs`` of itself and its neighbours and the public copies it holds
    (``public``: its own and its neighbours', before this round's q), every copy moves by its q and
    theta_i <- theta_i + gamma sum_j W_ij (theta_hat_j - theta_hat_i) over ``weights`` (neighbour
    order as the topology lists it)."""

    node: int
    phase: str
    state: AdapterState
    public: dict[int, AdapterState]
    round: int = 0
    blobs: dict[int, bytes] = field(default_factory=dict)
    weights: list[tuple[int, float]] = field(default_factory=list)
    gamma: float = 0.0


def choco_node(job: ChocoJob, compressor: Compressor, seed: int) -> bytes | AdapterState:
    """One node's CHOCO phase (:class:`ChocoJob`): its message's bytes, or its new state."""
    if job.phase == "encode":
        own = job.public[job.node]
        diff = {k: job.state[k] - own[k] for k in job.state}
        return pack(compressor.encode(diff, rounding_generator(seed, job.round, job.node)))
    fresh = {j: advance(pub, compressor, job.blobs[j]) for j, pub in job.public.items()}
    me = fresh[job.node]
    return {k: job.state[k] + job.gamma * sum(w * (fresh[j][k] - me[k]) for j, w in job.weights) for k in job.state}


def advance(public: AdapterState, compressor: Compressor, blob: bytes) -> AdapterState:
    """A public copy after its owner's message: theta_hat += q (keys and shapes are protocol metadata)."""
    q = compressor.decode(unpack(blob), public)
    return {k: public[k] + q[k] for k in public}


def choco_sizes(blobs: list[bytes], new_public: list[AdapterState], top: Topology,
                fresh_edges: frozenset[tuple[int, int]]) -> list[list[int]]:
    """Per node, the sizes of the messages it sent: its q to each neighbour, or, over an edge new this
    round (time-varying graphs, whose ends hold stale copies of each other), its full public copy."""
    sizes = []
    for i in range(top.n):
        sizes.append([payload_nbytes(new_public[i]) if (min(i, j), max(i, j)) in fresh_edges else len(blobs[i])
                      for j in top.neighbors[i]])
    return sizes


def choco_gossip(
    states: list[AdapterState],
    public: list[AdapterState],
    top: Topology,
    compressor: Compressor,
    gamma: float,
    seed: int,
    rnd: int,
    fresh_edges: frozenset[tuple[int, int]] = frozenset(),
    run=None,
) -> tuple[list[AdapterState], list[AdapterState], list[list[int]]]:
    """One CHOCO-gossip step; returns (states, public copies, message sizes sent per node).

    ``run`` runs the nodes' :class:`ChocoJob` s (deployed: on the nodes; default: here, on their
    behalf). The relay keeps every public copy (one per node: every neighbour of j applies the same
    q_j, so all copies of theta_hat_j are equal) and hands each node the copies it holds.
    """
    run = run or (lambda jobs: [choco_node(j, compressor, seed) for j in jobs])
    n = top.n
    blobs = run([ChocoJob(i, "encode", states[i], {i: public[i]}, rnd) for i in range(n)])
    new_public = [advance(public[i], compressor, blobs[i]) for i in range(n)]
    new_states = run([ChocoJob(i, "mix", states[i], {j: public[j] for j in [i, *top.neighbors[i]]}, rnd,
                               {j: blobs[j] for j in [i, *top.neighbors[i]]},
                               [(j, float(top.W[i, j])) for j in top.neighbors[i]], gamma) for i in range(n)])
    return new_states, new_public, choco_sizes(blobs, new_public, top, fresh_edges)


def node_step(job, cfg) -> bytes | AdapterState:
    """What a Dec-LoRA node computes for a gossip job of either kind (deployed: on the node)."""
    if isinstance(job, ChocoJob):
        return choco_node(job, from_gossip(cfg.gossip.quantize_bits, cfg.gossip.topk), cfg.seed)
    return mix_node(job, cfg.federation, cfg.model.lora.alpha)


class DecLoRA(Algorithm):
    """Dec-LoRA: local LoRA steps, then gossip with graph neighbours (see the module docstring)."""

    name = "declora"

    def __init__(self, ctx):
        super().__init__(ctx)
        cfg, n = self.cfg, self.cfg.clients.num
        self.schedule = TopologySchedule(cfg.gossip, n, cfg.seed, cfg.rounds)
        self.compressor = from_gossip(cfg.gossip.quantize_bits, cfg.gossip.topk)
        print(self.schedule.describe() + (
            f"\n  compressed gossip (CHOCO): quantize_bits={cfg.gossip.quantize_bits} topk={cfg.gossip.topk} "
            f"gamma={cfg.gossip.gamma}" if self.compressor.active else ""), flush=True)
        # States are replaced, never modified in place, so all clients may share the initial dict.
        self.states: list[AdapterState] = [ctx.initial_state] * n
        # Public copies start at the shared initial adapter: every node can rebuild it from the
        # seed, so nothing is sent for it.
        self.public: list[AdapterState] = [ctx.initial_state] * n if self.compressor.active else []
        self.client_steps = [0] * n  # each client's own batch counter
        if cfg.federation.robust != "none":
            self._check_neighbourhoods(self.schedule.at(1))  # before training; time-varying graphs again each round
        # where the nodes' gossip steps run: deployed, on the nodes; simulated, here on their behalf
        self.run_mixes = ctx.run_mixes or (lambda jobs: [node_step(j, cfg) for j in jobs])

    def _fresh_edges(self, rnd: int, top: Topology) -> frozenset[tuple[int, int]]:
        if not self.cfg.gossip.time_varying or rnd == 1:
            return frozenset()  # round 1: every copy is the shared initial adapter
        return top.edges() - self.schedule.at(rnd - 1).edges()

    def run_round(self, rnd: int) -> RoundResult:
        cfg, n = self.cfg, self.cfg.clients.num
        top = self.schedule.at(rnd)
        steps, lr = cfg.train.local_steps, lr_at(cfg.train, rnd, cfg.rounds)
        keep = cfg.train.client_optimizer == "keep"
        prox = cfg.train.prox_mu > 0
        tasks = [ClientTask(i, self.states[i], self.client_steps[i], steps, lr,
                            prox_anchor=self.states[i] if prox else None, keep_optimizer=keep, moments=self.moments.get(i),
                            flip_labels=self.flip_labels(i)) for i in range(n)]
        results = self.ctx.run_tasks(tasks)  # in task order, whichever engine ran them
        self.attack(rnd, results, dict(enumerate(self.states)))
        for r in results:
            self.client_steps[r.client_id] += r.steps
        accepted, rejected = screen_round(rnd, results, dict(enumerate(self.states)), cfg.federation.max_update_norm)
        self.keep_moments(accepted)
        # a node whose update is rejected gossips its state from before the round (it sends no update)
        trained = list(self.states)
        for r in accepted:
            trained[r.client_id] = r.state
        if self.compressor.active:
            self.states, self.public, sent = choco_gossip(
                trained, self.public, top, self.compressor, cfg.gossip.gamma, cfg.seed, rnd, self._fresh_edges(rnd, top),
                self.run_mixes)
        else:  # each node mixes its own state with its neighbours' (robust gossip: not doubly stochastic,
            if cfg.federation.robust != "none":  # the network average moves: the price of refusing a pull)
                self._check_neighbourhoods(top)
            jobs, sent = mix_jobs(trained, self.states, top, cfg.federation.robust)
            self.states = self.run_mixes(jobs)
        total = sum(sum(m) for m in sent)  # each message: sent once, received once
        sim = declora_round_time([r.flops for r in results], sent, [self.device(i) for i in range(n)])
        extra = {"consensus_distance": consensus_distance(self.states), "spectral_gap": top.gap,
                 "rejected_updates": len(rejected), **self.privacy_spent(rnd, self.client_steps)}
        if cfg.gossip.eval_clients and self.eval_due(rnd):
            extra.update(self._eval_clients())
        return RoundResult(float(np.mean([r.loss for r in accepted])), total, total, sim, extra)

    def _check_neighbourhoods(self, top: Topology) -> None:
        fed = self.cfg.federation
        if fed.robust in ("krum", "multi_krum"):
            small = min(range(top.n), key=lambda i: len(top.neighbors[i]))
            if len(top.neighbors[small]) + 1 <= 2 * fed.robust_f + 2:
                raise ColoraError(f"federation.robust={fed.robust} with robust_f={fed.robust_f} needs every node's "
                                  f"neighbourhood (itself and its neighbours) above {2 * fed.robust_f + 2}; node {small} has "
                                  f"{len(top.neighbors[small]) + 1} (gossip.topology={self.cfg.gossip.topology}); use a denser "
                                  "topology or a coordinate-wise rule (median, trimmed_mean)")

    def _eval_clients(self) -> dict[str, float]:
        # n extra evaluations of the eval split on each eval round (the costliest option here).
        return summarize_clients([self.ctx.evaluate(s) for s in self.states])

    def global_state(self) -> AdapterState:
        return network_average(self.states)

    def state_dict(self) -> dict:
        # Rounding noise and time-varying graphs are pure functions of (seed, round, node): no RNG state.
        return {"states": self.states, "public": self.public, "client_steps": self.client_steps, "moments": self.moments}

    def load_state_dict(self, state: dict) -> None:
        self.states = list(state["states"])
        self.public = list(state["public"])
        self.client_steps = list(state["client_steps"])
        self.moments = dict(state.get("moments", {}))
