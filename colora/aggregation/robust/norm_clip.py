"""``norm_clip``: each client's update, in parameter space (u = state - sent, over A, B and the head:
what the server averages), scaled to L2 norm at most ``federation.robust_clip`` (``auto``: the round's
median norm), then aggregated with the run's aggregator. Bounds any one client's pull."""

from __future__ import annotations

import numpy as np

from ...types import AdapterState
from ...validation import update_norm


def norm_clip(states, weights, alpha, rank, params, sents: list[AdapterState]) -> tuple[list[AdapterState], list[float]]:
    norms = [update_norm(s, sent) for s, sent in zip(states, sents)]
    bound = float(np.median(norms)) if params.robust_clip == "auto" else float(params.robust_clip)
    out = []
    for s, sent, n in zip(states, sents, norms):
        c = 1.0 if n <= bound or n == 0.0 else bound / n
        out.append(s if c == 1.0 else {k: sent[k] + c * (s[k] - sent[k]) for k in s})
    return out, list(weights)
