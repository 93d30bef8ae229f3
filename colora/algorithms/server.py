"""The server's side of federated LoRA, for clients of equal or different LoRA ranks.

Shared by the algorithms whose clients each hold a LoRA adapter (``fedavg``, and the client side of
split learning): it keeps the global adapter, hands each client its projection
(``RankedRule.for_client``: for equal-rank rules the global itself), applies HetLoRA's rank
self-pruning to what clients send back, and aggregates (``RankedRule.aggregate``). One path for
every rule: algorithms never branch on equal vs mixed ranks. Pure bookkeeping over adapter states;
it never touches the model. Everything it holds checkpoints as tensors, lists and numbers.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..aggregation import get_rule, hetlora_prune
from ..aggregation.hafl import initial_scores, merge_scores, sort_by_importance
from ..aggregation.hetero import lora_scale, truncate
from ..aggregation.robust import ROBUST
from ..aggregation.stack import base_delta
from ..config import ColoraError, Config
from ..states import lora_rank, payload_nbytes
from ..types import AdapterState


class AdapterServer:
    """Global adapter at the largest client rank, per-client ranks, and the rule that links them."""

    def __init__(self, cfg: Config, ranks: list[int], initial_state_at: Callable[[int], AdapterState],
                 global_rank: int | None = None):
        self.rule = get_rule(cfg.federation)
        self.fed = cfg.federation
        self.robust = ROBUST.get(cfg.federation.robust)  # None for robust=none
        if self.rule.equal_ranks and len(set(ranks) | {global_rank or ranks[0]}) > 1:
            raise ColoraError(f"federation.aggregator={self.rule.name} needs equal LoRA ranks, but the clients' ranks are "
                              f"{sorted(set(ranks))}; use zero_pad, svd or stack for mixed ranks")
        self.alpha, self.seed = cfg.model.lora.alpha, cfg.seed
        self.prune_gamma = cfg.federation.hetlora_prune_gamma
        self.initial_state_at = initial_state_at
        self.ranks = list(ranks)  # current ranks; HetLoRA pruning only lowers them
        self.global_rank = global_rank or max(ranks)  # split: the server side's rank, >= every client's
        self.state = initial_state_at(self.global_rank)  # B = 0: every client starts from its own init
        self.tails: list[float | None] = [None] * len(ranks)
        hafl = cfg.federation.aggregator == "hafl"  # HAFL: one importance score per global component
        self.scores = initial_scores(self.state) if hafl else None
        self.freeze = hafl and cfg.federation.hafl_mode == "freeze"

    def task_options(self, client: int) -> dict:
        """``ClientTask`` fields for ``client``'s rank: its LoRA rank, and under HAFL the scores it
        measures and (``hafl_mode: freeze``) how many leading components it trains at the full rank."""
        if self.freeze:
            return {"rank": self.global_rank, "scores": True, "train_components": self.ranks[client]}
        return {"rank": self.ranks[client], "scores": self.scores is not None}

    def client_state(self, client: int, rnd: int) -> AdapterState:
        """What ``client`` receives in round ``rnd``: the global projected to its rank."""
        r = self.global_rank if self.freeze else self.ranks[client]
        seed = int(np.random.SeedSequence([self.seed, rnd, r]).generate_state(1)[0])  # stack's fresh A per round and rank
        return self.rule.for_client(self.state, r, self.alpha, self.initial_state_at(r), seed)

    def base_delta(self) -> AdapterState | None:
        """The update clients train on top of (merged into their base), for rules that merge."""
        return base_delta(self.state) if self.rule.merges_base else None

    def down_nbytes(self, sent: AdapterState) -> int:
        """Bytes to one client: its own-rank state, or for merging rules the global it merges
        (the fresh adapter then comes from a seed, no bytes)."""
        return payload_nbytes(self.state if self.rule.merges_base else sent)

    def receive(self, client: int, state: AdapterState) -> AdapterState:
        """What ``client`` uploads after training: its state, rank-pruned if HetLoRA pruning is on;
        under HAFL's freeze mode only the components it trained (at their own rank's scale)."""
        if self.freeze and self.ranks[client] < self.global_rank:
            r = self.ranks[client]
            return truncate(state, r, b_factor=lora_scale(self.alpha, self.global_rank) / lora_scale(self.alpha, r), a_factor=1.0)
        if self.prune_gamma is None:
            return state
        pruned, self.tails[client] = hetlora_prune(state, self.alpha, self.prune_gamma, self.tails[client])
        if pruned is not state:
            self.ranks[client] = lora_rank(pruned)
        return pruned

    def aggregate(self, states: list[AdapterState], weights: list[float], sents: list[AdapterState] | None = None,
                  scores: list[AdapterState] | None = None) -> None:
        """The new global from the clients' states (``sents``: what each was sent, for robust rules
        that measure updates); ``federation.robust`` first picks, clips or replaces the states.
        HAFL: the clients' component ``scores`` update the server's, and the new global's components
        are put in descending score order (ΔW unchanged)."""
        if self.robust is not None:
            states, weights = self.robust(states, weights, self.alpha, self.global_rank, self.fed, sents=sents)
        self.state = self.rule.aggregate(states, weights, self.alpha, self.global_rank, self.state)
        if self.scores is not None:
            self.scores = merge_scores(self.scores, scores or [], weights)
            self.state, self.scores = sort_by_importance(self.state, self.scores)

    def state_dict(self) -> dict:
        return {"state": self.state, "ranks": self.ranks, "tails": self.tails, "scores": self.scores}

    def load_state_dict(self, state: dict) -> None:
        self.state, self.ranks, self.tails = state["state"], list(state["ranks"]), list(state["tails"])
        self.scores = state.get("scores")
