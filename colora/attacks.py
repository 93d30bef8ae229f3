"""Attacking clients for robustness experiments (``clients.byzantine``), deterministic by seed.

Who attacks is drawn once from the run's seed (:func:`attackers`) and listed in partition.json. An
attacker trains like any client and then tampers with what it sends (:func:`tamper`), in parameter
space, relative to the adapter it was sent (``u = trained - sent``):

- ``sign_flip``: sends ``sent - flip_scale * u`` (the update reversed, and boosted when ``flip_scale > 1``);
- ``scaled``: sends ``sent + scale * u`` (a boosted update, as in model replacement);
- ``gaussian``: sends ``sent + n``, ``n ~ N(0, noise_std^2)`` per entry from a generator of
  (seed, round, client), so a rerun draws the same noise;
- ``label_flip``: no tampering; the client trains on labels c -> C - 1 - c (data poisoning; the
  engine flips them in its batches, ``ClientTask.flip_labels``).

Pure functions over adapter states: no model code.
"""

from __future__ import annotations

import numpy as np
import torch

from .config import ByzantineConfig
from .types import AdapterState


def attackers(seed: int, num_clients: int, fraction: float) -> list[int]:
    """The attacking clients: round(fraction x num_clients) of them, a pure function of the seed."""
    count = int(round(fraction * num_clients))
    if count == 0:
        return []
    return sorted(int(k) for k in np.random.default_rng([seed, 0xB42]).choice(num_clients, size=count, replace=False))


def noise_generator(seed: int, rnd: int, client: int) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(int(np.random.default_rng([seed, 0x6A55, rnd, client]).integers(2**62)))
    return gen


def tamper(cfg: ByzantineConfig, trained: AdapterState, sent: AdapterState, gen: torch.Generator) -> AdapterState:
    """What an attacker sends instead of ``trained`` (see the module docstring)."""
    if cfg.attack == "sign_flip":
        return {k: sent[k] - cfg.flip_scale * (trained[k] - sent[k]) for k in trained}
    if cfg.attack == "scaled":
        return {k: sent[k] + cfg.scale * (trained[k] - sent[k]) for k in trained}
    if cfg.attack == "gaussian":
        return {k: sent[k] + cfg.noise_std * torch.randn(sent[k].shape, generator=gen, dtype=sent[k].dtype) for k in trained}
    return trained  # label_flip poisons the training data instead
