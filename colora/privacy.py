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

``privacy.mode: local`` is DP-SGD (Abadi et al. 2016) inside every client, the record-level
guarantee of DP-LoRA: each step's per-sample gradients of the adapter (LoRA factors and head,
computed by Opacus's hooks: ``GradSampleHooks``) are clipped to L2 norm ``privacy.clip`` jointly,
summed, and Gaussian noise N(0, (noise_multiplier * clip)^2) is added before dividing by the batch
size; the noise is drawn from a generator seeded by (seed, client, step), so every engine draws it
alike. One record changes a step's sum by at most C, so client k's steps are a subsampled Gaussian
mechanism at rate q_k = batch_size / n_k, accounted as Poisson subsampling (colora draws shuffled
fixed-size batches: the usual DP-SGD analysis). Everything a client sends is post-processing of its
DP-SGD steps, so the guarantee holds against the server, other clients and gossip neighbours alike:
fedavg, declora and central. ``epsilon`` in metrics.jsonl is the worst client's so far.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
from collections.abc import Iterator

import numpy as np
import torch

from .config import ColoraError, Config
from .types import AdapterState
from .validation import update_norm

_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 128))  # RDP orders searched for the tightest epsilon


def subsampled_gaussian_epsilon(q: float, noise_multiplier: float, count: int, delta: float) -> float:
    """Epsilon at ``delta`` of ``count`` Gaussian mechanisms of ``noise_multiplier``, each on a
    Poisson subsample at rate ``q`` (dp-accounting's RDP accountant); inf without noise, 0 if none ran."""
    if count == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    if importlib.util.find_spec("dp_accounting") is None:
        raise ColoraError("privacy needs the accountant: pip install 'colora[privacy]' (dp-accounting)")
    import logging

    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant

    logging.getLogger("absl").setLevel(logging.ERROR)  # orders that fail to converge are skipped, noisily
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    event = gaussian if q >= 1.0 else dp_accounting.PoissonSampledDpEvent(min(q, 1.0), gaussian)
    accountant = rdp_privacy_accountant.RdpAccountant(_ORDERS)
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, count))
    return float(accountant.get_epsilon(delta))


def epsilon(cfg: Config, rounds: int) -> float:
    """Privacy spent after ``rounds`` rounds of ``cfg``'s DP-FedAvg (epsilon at privacy.delta; inf
    without noise)."""
    return subsampled_gaussian_epsilon(cfg.clients.per_round / cfg.clients.num, cfg.privacy.noise_multiplier, rounds,
                                       cfg.privacy.delta)


def local_epsilon(cfg: Config, sizes: list[int], steps: list[int]) -> float:
    """DP-SGD: the worst client's epsilon after it took ``steps[k]`` steps on its ``sizes[k]`` records."""
    b, p = cfg.train.batch_size, cfg.privacy
    return max(subsampled_gaussian_epsilon(b / n, p.noise_multiplier, s, p.delta) for n, s in zip(sizes, steps))


def check_budget(cfg: Config, sizes: list[int] | None = None) -> float | None:
    """Epsilon the whole run will spend (DP-SGD: by a client that trains every round); a ColoraError,
    before training, if above privacy.target_epsilon. ``sizes``: each client's number of records."""
    p = cfg.privacy
    if p.mode == "none":
        return None
    if p.mode == "local":
        spent = local_epsilon(cfg, sizes, [cfg.rounds * cfg.train.local_steps] * len(sizes))
        how = (f"{cfg.rounds} rounds x {cfg.train.local_steps} DP-SGD steps of batch {cfg.train.batch_size} at "
               f"noise_multiplier={p.noise_multiplier:g} on the smallest client's {min(sizes)} records")
        fix = "raise privacy.noise_multiplier, or lower rounds, train.local_steps or train.batch_size"
    else:
        spent = epsilon(cfg, cfg.rounds)
        how = (f"{cfg.rounds} rounds at noise_multiplier={p.noise_multiplier:g}, {cfg.clients.per_round} of "
               f"{cfg.clients.num} clients a round")
        fix = "raise privacy.noise_multiplier, or lower rounds or clients.per_round"
    if p.target_epsilon is not None and spent > p.target_epsilon:
        raise ColoraError(f"privacy: {how} spend epsilon={spent:.3g} > privacy.target_epsilon={p.target_epsilon:g} "
                          f"(delta={p.delta:g}); {fix}")
    return spent


def sgd_noise_generator(seed: int, client: int, step: int) -> torch.Generator:
    """DP-SGD's noise for ``client``'s step ``step``: the same on every engine."""
    gen = torch.Generator()
    gen.manual_seed(int(np.random.default_rng([seed, 0xD95, client, step]).integers(2**62)))
    return gen


@contextlib.contextmanager
def per_sample_gradients(model) -> Iterator[None]:
    """While inside, every backward through ``model`` also leaves each trainable parameter's
    per-sample gradients in ``p.grad_sample`` (Opacus's hooks, batch first, for a mean loss)."""
    if importlib.util.find_spec("opacus") is None:
        raise ColoraError("privacy.mode=local needs Opacus for per-sample gradients: pip install 'colora[privacy]'")
    import warnings

    from opacus.grad_sample import GradSampleHooks

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        hooks = GradSampleHooks(model, batch_first=True, loss_reduction="mean", strict=False)  # strict: no buffers
        hooks.enable_hooks()
        try:
            yield
        finally:
            hooks.remove_hooks()
            for p in model.parameters():
                for name in ("grad_sample", "_current_grad_sample", "_forward_counter"):
                    p.__dict__.pop(name, None)
            for m in model.modules():
                m.__dict__.pop("activations", None)


def private_gradient(params: dict[str, torch.Tensor], clip: float, noise_multiplier: float, gen: torch.Generator,
                     prox: dict[str, torch.Tensor] | None = None) -> None:
    """Replace each parameter's gradient by DP-SGD's: per-sample gradients clipped to ``clip`` jointly
    (over every parameter), summed, plus N(0, (noise_multiplier * clip)^2) per entry, over the batch
    size; ``prox``: a data-independent gradient added after (FedProx's mu (theta - theta_global))."""
    missing = [k for k, p in params.items() if getattr(p, "grad_sample", None) is None]
    if missing:
        raise ColoraError(f"privacy.mode=local: no per-sample gradient for {missing[0]} (Opacus does not support its layer)")
    samples = {k: p.grad_sample for k, p in params.items()}  # b x shape each
    rows = next(iter(samples.values())).shape[0]
    norms = torch.sqrt(sum((g.reshape(rows, -1).double() ** 2).sum(1) for g in samples.values()))
    coef = (clip / (norms + 1e-6)).clamp(max=1.0)  # Opacus's clipping factor
    std = noise_multiplier * clip
    for k, p in params.items():
        total = torch.einsum("i,i...->...", coef.to(samples[k].dtype), samples[k])
        noise = std * torch.randn(p.shape, generator=gen, dtype=torch.float64)
        grad = (total + noise.to(total.device, total.dtype)) / rows
        if prox is not None:
            grad = grad + prox[k]
        p.grad = grad.to(p.dtype)
        p.grad_sample = None  # Opacus accumulates into it unless reset


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

