"""Aggregation rules: pure functions over adapter states keyed by peft names, one rule per file,
registered here (``RULES``) by their ``federation.aggregator`` name.

Every rule has one interface (:class:`~colora.aggregation.hetero.RankedRule`): ``aggregate`` to the
global adapter (at the largest client rank) and ``for_client`` giving each client its own rank's
state. Equal-rank rules (``fedit``, ``product``) give every client the one global adapter and refuse
mixed ranks; ``hlora`` aggregates as ``svd``, its rank assignment by data size lives in ``colora.ranks``.

``EXACT`` says which rules reproduce the weighted mean of the clients' updates s_k B_k A_k (DESIGN.md;
``product`` and ``svd`` when the mean's rank fits the rank they return), and which only average factors.
"""

from __future__ import annotations

from functools import partial

from ..config import FederationConfig
from .fedit import FEDIT, fedit
from .hafl import HAFL
from .hetero import RankedRule, equal_rank_rule
from .hlora import HLORA
from .lora_fair import lora_fair
from .product import PRODUCT, product
from .rank_partition import rank_partitioned
from .server_opt import server_step
from .stack import STACK
from .svd import SVD
from .zero_pad import ZERO_PAD, hetlora_prune

LORA_FAIR = equal_rank_rule("lora_fair", partial(lora_fair, lam=0.01), exact=False)

# Every federation.aggregator name (the config validates against this registry).
RULES: dict[str, RankedRule] = {rule.name: rule for rule in (FEDIT, PRODUCT, ZERO_PAD, SVD, STACK, HLORA, LORA_FAIR, HAFL)}
EXACT = {name: rule.exact for name, rule in RULES.items()}


def _partitioned(aggregate, states, weights, alpha, rank, previous=None):
    return aggregate(rank_partitioned(states, weights), weights, alpha, rank, previous)


def get_rule(fed: FederationConfig) -> RankedRule:
    """The rule ``fed.aggregator`` names, with its ``federation.hetlora_*`` options bound."""
    rule = RULES[fed.aggregator]
    if fed.rank_partitioned and rule in (SVD, HLORA):  # raFLoRA: re-weight the rank partitions first
        return RankedRule(rule.name, partial(_partitioned, rule.aggregate), rule.for_client, rule.exact)
    if rule is LORA_FAIR:
        return equal_rank_rule(rule.name, partial(lora_fair, lam=fed.lora_fair_lambda), exact=False)
    if rule is ZERO_PAD and fed.hetlora_sparsity_weighting:
        return RankedRule(rule.name, partial(rule.aggregate, sparsity_weighting=True), rule.for_client, rule.exact)
    return rule


__all__ = ["EXACT", "RULES", "RankedRule", "get_rule", "hetlora_prune", "server_step", "fedit", "lora_fair", "product"]
