"""Client-level differential privacy for federated LoRA (DP-FedAvg, McMahan et al. 2018), the
guarantee DP-LoRA builds on: ``privacy.mode: client``.

Each round every sampled client's update in parameter space, u_k = theta_k - theta_global (A, B and
the head: what the server averages), is clipped to L2 norm ``privacy.clip``; the server adds Gaussian
noise N(0, (noise_multiplier * clip)^2) to every entry of their sum and divides by the number of
clients sampled a round (a fixed denominator, so no client's presence changes it):

    theta <- theta + (sum_k clip(u_k) + N(0, (z C)^2 I)) / m

One client changes the sum by at most C, so a round is a Gaussian mechanism of noise multiplier z
on the clients' data sets; with m of n clients sampled a round it is subsampled at rate q = m / n,
accounted as Poisson subsampling (the usual DP-FedAvg analysis; colora samples m without
replacement). Privacy spent, epsilon at ``privacy.delta``, comes from Google's dp-accounting RDP
accountant (the ``privacy`` extra), written to metrics.jsonl every round; ``privacy.target_epsilon``
refuses, before training, a config whose rounds would spend more.

What is protected: whether any one client's whole data set took part, against anyone who sees the
global adapters (other clients, the evaluation). Not protected: the server sees each clipped update
before the noise (secure aggregation would hide them; not built). Split learning sends activations
(the data itself, transformed) and gossip mixes un-noised states: both are refused with client DP.
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import torch

from .config import ColoraError, Config
from .types import AdapterState
from .validation import update_norm

_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 128))  # RDP orders searched for the tightest epsilon


def epsilon(cfg: Config, rounds: int) -> float:
    """Privacy spent after ``rounds`` rounds of ``cfg``'s DP-FedAvg (epsilon at privacy.delta; inf
    without noise)."""
    if cfg.privacy.noise_multiplier == 0:
        return math.inf
    if importlib.util.find_spec("dp_accounting") is None:
        raise ColoraError("privacy.mode=client needs the accountant: pip install 'colora[privacy]' (dp-accounting)")
    import logging

    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant

    logging.getLogger("absl").setLevel(logging.ERROR)  # orders that fail to converge are skipped, noisily
    p = cfg.privacy
    q = min(1.0, cfg.clients.per_round / cfg.clients.num)
    gaussian = dp_accounting.GaussianDpEvent(p.noise_multiplier)
    event = gaussian if q >= 1.0 else dp_accounting.PoissonSampledDpEvent(q, gaussian)
    accountant = rdp_privacy_accountant.RdpAccountant(_ORDERS)
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    return float(accountant.get_epsilon(p.delta))


def check_budget(cfg: Config) -> float | None:
    """Epsilon the whole run will spend; a ColoraError, before training, if above privacy.target_epsilon."""
    if cfg.privacy.mode == "none":
        return None
    spent = epsilon(cfg, cfg.rounds)
    target = cfg.privacy.target_epsilon
    if target is not None and spent > target:
        raise ColoraError(f"privacy: {cfg.rounds} rounds at noise_multiplier={cfg.privacy.noise_multiplier:g}, "
                          f"{cfg.clients.per_round} of {cfg.clients.num} clients a round spend epsilon={spent:.3g} > "
                          f"privacy.target_epsilon={target:g} (delta={cfg.privacy.delta:g}); raise privacy.noise_multiplier, "
                          "or lower rounds or clients.per_round")
    return spent


def noise_generator(seed: int, rnd: int) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(int(np.random.default_rng([seed, 0xD9, rnd]).integers(2**62)))
    return gen


def clipped(update: AdapterState, sent: AdapterState, clip: float) -> AdapterState:
    """u = update - sent scaled to L2 norm at most ``clip`` (over every entry)."""
    norm = update_norm(update, sent)
    factor = 1.0 if norm <= clip else clip / norm
    return {k: factor * (update[k].double() - sent[k].double()) for k in sent}


def dp_fedavg(states: list[AdapterState], global_state: AdapterState, clip: float, noise_multiplier: float,
              denominator: int, gen: torch.Generator) -> AdapterState:
    """The new global: global + (sum of clipped updates + Gaussian noise of std z * clip) / denominator."""
    total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in global_state.items()}
    for s in states:
        for k, u in clipped(s, global_state, clip).items():
            total[k] += u
    std = noise_multiplier * clip
    return {k: (global_state[k].double() + (total[k] + std * torch.randn(total[k].shape, generator=gen, dtype=torch.float64))
                / denominator).to(global_state[k].dtype) for k in global_state}

