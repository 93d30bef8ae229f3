"""Server optimizers on the aggregated adapter (Reddi et al. 2021, "Adaptive Federated Optimization").

The pseudo-gradient is g = x - mean_k(x_k) (global state minus the aggregate). ``none`` takes the
aggregate as is; ``fedavgm`` applies heavy-ball momentum; ``fedadam`` and ``fedyogi`` keep per-entry
second moments. Pure functions: (state, aggregate, optimizer state) -> (new state, new optimizer state),
so the optimizer state checkpoints like any adapter state.
"""

from __future__ import annotations

import torch

from ..config import FederationConfig
from ..types import AdapterState


def server_step(cfg: FederationConfig, current: AdapterState, aggregate: AdapterState, opt_state: dict) -> tuple[AdapterState, dict]:
    """One server-optimizer step; ``opt_state`` is {} before the first round."""
    kind = cfg.server_optimizer
    if kind == "none":
        return aggregate, opt_state
    lr, b1, b2, tau = cfg.server_lr, cfg.server_momentum, cfg.server_beta2, cfg.server_tau
    m_old = opt_state.get("m", {})
    v_old = opt_state.get("v", {})
    new, m_new, v_new = {}, {}, {}
    for k, x in current.items():
        g = x - aggregate[k]
        if kind == "fedavgm":
            m = b1 * m_old.get(k, torch.zeros_like(g)) + g
            new[k] = x - lr * m
        else:
            m = b1 * m_old.get(k, torch.zeros_like(g)) + (1 - b1) * g
            v_prev = v_old.get(k, torch.full_like(g, tau**2))
            g2 = g * g
            if kind == "fedadam":
                v = b2 * v_prev + (1 - b2) * g2
            else:  # fedyogi: additive, sign-controlled second moment
                v = v_prev - (1 - b2) * g2 * torch.sign(v_prev - g2)
            v_new[k] = v
            new[k] = x - lr * m / (v.sqrt() + tau)
        m_new[k] = m
    return new, {"m": m_new, "v": v_new} if v_new else {"m": m_new}
