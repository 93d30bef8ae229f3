"""The algorithm interface: a round of work described as independent client tasks.

An algorithm never touches the model: it hands :class:`ClientTask` s to the engine's ``run_tasks``
and combines the returned states. The engine decides how tasks run (sequentially on one resident
model, in worker processes, ...); results must not depend on that choice.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from ..attacks import attackers, noise_generator, tamper
from ..config import ColoraError, Config, DeviceProfile, NonFiniteError
from ..privacy import check_budget, epsilon, local_epsilon
from ..types import AdapterState, ClientResult, RoundResult, SecureSum, TaskRunner
from ..validation import screen

if TYPE_CHECKING:
    from ..split.types import SplitRunner


@dataclass
class Context:
    cfg: Config
    run_tasks: TaskRunner
    initial_state: AdapterState  # same A (seeded), B = 0, fresh head: the round-0 global adapter
    client_sizes: list[int]  # local data set sizes (pooled algorithms see one entry)
    adapter_params: int
    # Evaluate any adapter state on the eval split (e.g. each client's own adapter in declora).
    evaluate: Callable[[AdapterState], dict[str, float]]
    client_ranks: list[int] = field(default_factory=list)  # each client's LoRA rank (colora.ranks)
    # The seeded initial adapter at any rank (A from the run's seed, B = 0, the fresh head).
    initial_state_at: Callable[[int], AdapterState] | None = None
    # Split learning (sl, splitlora): one split step at a time on the engine's cut model; built
    # only for algorithm classes that declare ``runner = "split"``.
    split: SplitRunner | None = None
    # One device profile per client (colora.system.client_profiles): the cost model's rates.
    devices: list[DeviceProfile] = field(default_factory=list)
    num_labels: int | None = None  # the task's classes (1: regression; None: a causal LM)
    # eval.client_holdout: evaluate a state on one client's own held-out slice
    evaluate_client: Callable[[AdapterState, int], dict[str, float]] | None = None
    # declora: run the nodes' gossip steps (colora.algorithms.declora.MixJob -> the node's new state);
    # None: on the driver, on the nodes' behalf (simulation); deployed, on the nodes themselves.
    run_mixes: Callable[[list], list[AdapterState]] | None = None
    # federation.secure_aggregation: run a round's tasks and return only their weighted mean
    # (colora.types.SecureSum); None: on the driver from run_tasks (simulation); deployed, SecAgg+.
    run_secure: Callable[[list], SecureSum] | None = None


class Algorithm(ABC):
    """Base class; subclasses register under ``name`` in ``colora.algorithms.ALGORITHMS``."""

    name = ""
    pooled_data = False  # True: the engine trains on all data as one stream (central)
    runner: str | None = None  # "split": the engine also builds ctx.split

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.cfg = ctx.cfg
        # Each client's optimizer moments between its tasks (train.client_optimizer=keep, central):
        # they travel in its task and come back in its result; 2x its adapter per client kept.
        self.moments: dict[int, AdapterState] = {}
        byz = self.cfg.clients.byzantine
        self.attackers = set(attackers(self.cfg.seed, self.cfg.clients.num, byz.fraction))
        if self.attackers and byz.attack == "label_flip" and (ctx.num_labels or 0) < 2:
            raise ColoraError("clients.byzantine.attack=label_flip needs a classification task (this one has no classes to "
                              "flip); use sign_flip, gaussian or scaled")
        self.budget = check_budget(self.cfg, ctx.client_sizes)  # before training: a run that would overspend is refused

    def eval_due(self, rnd: int) -> bool:
        """Whether the engine evaluates after round ``rnd`` (same rule as the engine's loop)."""
        return rnd % self.cfg.eval.every == 0 or rnd == self.cfg.rounds

    def client_metrics(self, rnd: int, model_of: Callable[[int], AdapterState]) -> dict[str, float]:
        """eval.client_holdout: every client's model (``model_of(k)``) scored on its own held-out slice
        (K extra evaluations of small slices each eval round)."""
        if self.ctx.evaluate_client is None or not self.eval_due(rnd):
            return {}
        return summarize_clients([self.ctx.evaluate_client(model_of(k), k) for k in range(self.cfg.clients.num)])

    def privacy_spent(self, rnd: int, steps: list[int]) -> dict:
        """metrics.jsonl's ``epsilon`` after round ``rnd`` (colora.privacy): DP-FedAvg's over the rounds,
        DP-SGD's worst client's over its ``steps``; null where nothing is guaranteed (no noise)."""
        mode = self.cfg.privacy.mode
        if mode == "none":
            return {}
        spent = epsilon(self.cfg, rnd) if mode == "client" else local_epsilon(self.cfg, self.ctx.client_sizes, steps)
        return {"epsilon": spent if math.isfinite(spent) else None}  # metrics.jsonl is strict JSON

    def flip_labels(self, client: int) -> int:
        """ClientTask.flip_labels for ``client``: the class count if it poisons its labels, else 0."""
        byz = self.cfg.clients.byzantine
        return int(self.ctx.num_labels) if client in self.attackers and byz.attack == "label_flip" else 0

    def attack(self, rnd: int, results: list[ClientResult], sent: dict[int, AdapterState]) -> None:
        """Attackers replace what they send (colora.attacks.tamper), in place, before the server sees it."""
        for r in results:
            if r.client_id in self.attackers and not r.failed:
                gen = noise_generator(self.cfg.seed, rnd, r.client_id)
                r.state = tamper(self.cfg.clients.byzantine, r.state, sent[r.client_id], gen)

    def keep_moments(self, results) -> None:
        """Store the moments each result brought back (a result without any keeps none)."""
        for r in results:
            if r.moments is not None:
                self.moments[r.client_id] = r.moments

    def adopt_legacy_optimizers(self, optimizers: dict) -> None:
        """Checkpoints before moments travelled in tasks kept torch optimizer state dicts in the engine."""
        keys = list(self.ctx.initial_state)
        for k, sd in optimizers.items():
            self.moments[int(k)] = {f"{keys[i]}#{name}": v for i, st in sd["state"].items() for name, v in st.items()}

    def device(self, k: int) -> DeviceProfile:
        """Client ``k``'s device profile (``system.client`` when the context carries none)."""
        return self.ctx.devices[k] if self.ctx.devices else self.cfg.system.client

    @abstractmethod
    def run_round(self, rnd: int) -> RoundResult:
        """Run round ``rnd`` (1-based) and report its loss, bytes and simulated time."""

    @abstractmethod
    def global_state(self) -> AdapterState:
        """The adapter to evaluate and export after the current round."""

    def summary(self) -> dict:
        """Algorithm-specific entries for summary.json (merged in; contract keys win)."""
        return {}

    @abstractmethod
    def state_dict(self) -> dict:
        """Everything needed to resume after the current round."""

    @abstractmethod
    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""


def summarize_clients(evals: list[dict[str, float]]) -> dict[str, float]:
    """Per-client eval metrics as ``eval_clients/mean_*``, ``min_*`` and ``max_*`` over the clients."""
    out = {}
    for key in evals[0]:
        vals = [e[key] for e in evals]
        name = key.removeprefix("eval/")
        out |= {f"eval_clients/mean_{name}": float(np.mean(vals)), f"eval_clients/min_{name}": float(np.min(vals)),
                f"eval_clients/max_{name}": float(np.max(vals))}
    return out


def sample_clients(seed: int, rnd: int, num: int, per_round: int) -> list[int]:
    """The clients sampled in round ``rnd``: a pure function of (seed, round), sorted."""
    if per_round >= num:
        return list(range(num))
    rng = np.random.default_rng([seed, 0x5A3, rnd])
    return sorted(int(k) for k in rng.choice(num, size=per_round, replace=False))


def tolerated_attackers(cfg: Config) -> int | None:
    """How many attackers in one fedavg round ``federation.robust`` is built to withstand: Krum's f,
    the trimmed mean's cut per side, the median's minority; None where no count bounds the rule."""
    fed, k = cfg.federation, cfg.clients.per_round
    return {"krum": fed.robust_f, "multi_krum": fed.robust_f, "trimmed_mean": math.floor(fed.trim_fraction * k),
            "median": (k - 1) // 2}.get(fed.robust)


def attackers_over_tolerance(cfg: Config, attacking: set[int]) -> str | None:
    """One line when the simulated attackers sampled in some round outnumber what the robust rule
    tolerates (tolerated_attackers), else None. Sampling is a pure function of (seed, round), so the
    rounds are known before training; in those rounds the rule's guarantee does not hold."""
    tolerated = tolerated_attackers(cfg)
    if not attacking or tolerated is None:
        return None
    counts = [len(attacking.intersection(sample_clients(cfg.seed, r, cfg.clients.num, cfg.clients.per_round)))
              for r in range(1, cfg.rounds + 1)]
    over = [c for c in counts if c > tolerated]
    if not over:
        return None
    return (f"colora: federation.robust={cfg.federation.robust} withstands {tolerated} attacker(s) a round of "
            f"{cfg.clients.per_round}; the attackers ({', '.join(map(str, sorted(attacking)))}) outnumber that in "
            f"{len(over)} of {cfg.rounds} rounds (up to {max(over)} at once), where their updates can get through")


def screen_round(rnd: int, results: list[ClientResult], sent: dict[int, AdapterState], max_norm
                 ) -> tuple[list[ClientResult], list[tuple[int, str]]]:
    """The round's acceptable updates (colora.validation.screen), each rejection logged with its
    client and reason. Every update rejected stops the run: NaN everywhere points at train.lr."""
    accepted, rejected = screen(results, sent, max_norm)
    for k, reason in rejected:
        tqdm.write(f"colora: round {rnd}: client {k}'s update dropped: {reason}")
    if not accepted:
        k, reason = rejected[0]
        if all(r.failed for r in results):
            raise NonFiniteError(f"every client's local training produced NaN or inf in round {rnd}", "train.lr")
        raise ColoraError(f"round {rnd}: every client's update was rejected (e.g. client {k}: {reason}); "
                          "check federation.max_update_norm and the clients' data")
    return accepted, rejected
