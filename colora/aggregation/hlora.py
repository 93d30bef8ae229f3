"""``hlora`` (HLoRA, Liu et al. 2025): the ``svd`` redistribution with HLoRA's rank assignment.

The aggregation is FlexLoRA's (``colora/aggregation/svd.py``): the sample-weighted mean of the
clients' scaled updates, truncated by SVD to each client's rank, singular values split evenly. What
makes it HLoRA is the configuration: ranks come from ``rank_rule: data_size`` (clients with more data
get higher ranks from ``federation.rank_set``, see ``colora.ranks``), which this aggregator implies.
"""

from __future__ import annotations

from .hetero import RankedRule
from .svd import svd, svd_for_client

HLORA = RankedRule("hlora", svd, svd_for_client, exact=True)
