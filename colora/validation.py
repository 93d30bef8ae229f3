"""Checks on every client update before the server aggregates it (or a node mixes it).

An update is compared with what its client was sent: the same keys, shapes (hence the same LoRA
rank) and dtypes, finite values, and, with ``federation.max_update_norm``, an L2 norm of
(update - sent) over every entry (A, B and the head) below a bound: a number, or ``auto``, which is
:data:`AUTO_MULTIPLE` times the median norm of the round's well-formed updates (robust to a minority
of outliers; an honest client's norm is within a few times the median). A client whose local loss
went NaN or inf sends no update at all (:attr:`ClientResult.failed`). What fails is dropped for the
round and reported; the run goes on. Pure functions over adapter states: no model code.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .types import AdapterState, ClientResult

AUTO_MULTIPLE = 10.0


def malformed(update: AdapterState, sent: AdapterState) -> str | None:
    """Why ``update`` cannot stand for an update of ``sent`` (keys, shapes, dtypes, finite values), or None."""
    missing, unexpected = sent.keys() - update.keys(), update.keys() - sent.keys()
    if missing or unexpected:
        return f"its keys differ from the adapter sent (missing {sorted(missing)[:2]}, unexpected {sorted(unexpected)[:2]})"
    for key, ref in sent.items():
        got = update[key]
        if not torch.is_tensor(got) or got.shape != ref.shape:
            return f"{key} has shape {tuple(getattr(got, 'shape', ()))}, the adapter sent {tuple(ref.shape)} (a wrong LoRA rank?)"
        if got.dtype != ref.dtype:
            return f"{key} has dtype {got.dtype}, the adapter sent {ref.dtype}"
        if not torch.isfinite(got).all():
            return f"{key} holds NaN or inf"
    return None


def update_norm(update: AdapterState, sent: AdapterState) -> float:
    """||update - sent||_2 over every entry of the adapter (float64)."""
    return math.sqrt(sum(float(((update[k].double() - sent[k].double()) ** 2).sum()) for k in sent))


def screen(results: list[ClientResult], sent: dict[int, AdapterState], max_norm: float | str | None
           ) -> tuple[list[ClientResult], list[tuple[int, str]]]:
    """(accepted results in their order, [(client, reason)] of the rejected ones)."""
    rejected: list[tuple[int, str]] = []
    well_formed = []
    for r in results:
        reason = r.failed or malformed(r.state, sent[r.client_id])
        if reason:
            rejected.append((r.client_id, reason))
        else:
            well_formed.append(r)
    if max_norm is None or not well_formed:
        return well_formed, rejected
    norms = [update_norm(r.state, sent[r.client_id]) for r in well_formed]
    bound = AUTO_MULTIPLE * float(np.median(norms)) if max_norm == "auto" else float(max_norm)
    accepted = []
    for r, norm in zip(well_formed, norms):
        if norm > bound:
            rejected.append((r.client_id, f"update norm {norm:.4g} exceeds federation.max_update_norm={max_norm}"
                             + (f" ({bound:.4g}: {AUTO_MULTIPLE:g}x the round's median)" if max_norm == "auto" else "")))
        else:
            accepted.append(r)
    return accepted, sorted(rejected)
