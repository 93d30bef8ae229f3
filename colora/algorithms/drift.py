"""fedavg's drift fixes that change what trains and travels: FFA-LoRA, RoLoRA and FedSA-LoRA
(``federation.lora_mode``) and SCAFFOLD (``train.correction``). Bookkeeping over adapter states;
the client side is ClientTask.frozen (keys kept fixed) and ClientTask.correction (added to every
local gradient), run by colora.train.LocalTrainer.
"""

from __future__ import annotations

import torch

from ..config import Config
from ..states import payload_nbytes
from ..types import AdapterState, ClientResult


def factor_keys(state: AdapterState, factor: str) -> list[str]:
    """The keys of every LoRA module's ``factor`` ("A" or "B")."""
    return [k for k in state if f".lora_{factor}." in k]


def trained_factor(mode: str, rnd: int) -> str | None:
    """The LoRA factor that trains in round ``rnd`` (None: both). RoLoRA starts with B: with B = 0
    at initialization, A's gradient is zero."""
    if mode == "ffa":
        return "B"
    if mode == "rolora":
        return "B" if rnd % 2 else "A"
    return None


def home_keys(mode: str, state: AdapterState) -> list[str]:
    """Keys a client trains but never sends: FedSA-LoRA's personal B."""
    return factor_keys(state, "B") if mode == "fedsa" else []


def frozen_keys(mode: str, rnd: int, state: AdapterState) -> list[str]:
    """What clients keep fixed in round ``rnd``: the factor that does not train."""
    factor = trained_factor(mode, rnd)
    return [] if factor is None else factor_keys(state, "A" if factor == "B" else "B")


def sent_keys(mode: str, rnd: int, state: AdapterState, sampled_last_round: bool) -> list[str]:
    """The keys of ``state`` a client must download in round ``rnd``: FFA never sends A (the seeded
    init every client builds itself); RoLoRA sends what changed last round (the factor trained then,
    and the head) and, to a client not sampled last round, the factor that trains now as well."""
    if mode in ("ffa", "fedsa"):  # FFA: A is the seeded init; FedSA: B is the client's own
        return [k for k in state if k not in set(factor_keys(state, "A" if mode == "ffa" else "B"))]
    if mode == "rolora" and rnd > 1 and sampled_last_round:
        resting = set(factor_keys(state, trained_factor(mode, rnd)))  # unchanged since the client last held it
        return [k for k in state if k not in resting]
    return list(state)


def nbytes(state: AdapterState, keys: list[str]) -> int:
    return payload_nbytes({k: state[k] for k in keys})


class Scaffold:
    """SCAFFOLD's control variates over the adapter (Karimireddy et al. 2020, option II): the
    server's c and each client's c_k, zero at the start. Every local step of a client moves it by
    -lr (c - c_k) besides the optimizer's own step (colora.train.clip_and_step; with SGD, the paper's
    c - c_k added to the gradient); after K steps at learning rate lr from x to y_k, c_k+ = c_k - c + (x - y_k) / (K lr),
    and c grows by the sum of the clients' changes over the number of clients. Bytes: c down and
    Δc_k up, one adapter each."""

    def __init__(self, cfg: Config, initial: AdapterState):
        self.num = cfg.clients.num
        self.c = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in initial.items()}
        self.clients: dict[int, AdapterState] = {}

    def correction(self, client: int) -> AdapterState:
        """c - c_k, what client ``client`` adds to its gradients this round."""
        own = self.clients.get(client)
        return {k: v - own[k] if own is not None else v.clone() for k, v in self.c.items()}

    def update(self, results: list[ClientResult], sent: dict[int, AdapterState], lr: float) -> dict[int, int]:
        """The new c_k of each client that sent an update, and the new c; returns each client's bytes of Δc_k."""
        total, up = {k: torch.zeros_like(v) for k, v in self.c.items()}, {}
        for r in results:
            own = self.clients.get(r.client_id) or {k: torch.zeros_like(v) for k, v in self.c.items()}
            x, y = sent[r.client_id], r.state
            new = {k: own[k] - self.c[k] + (x[k].float() - y[k].float()) / (r.steps * lr) for k in self.c}
            change = {k: new[k] - own[k] for k in self.c}
            up[r.client_id] = payload_nbytes(change)
            for k in total:
                total[k] += change[k]
            self.clients[r.client_id] = new
        self.c = {k: v + total[k] / self.num for k, v in self.c.items()}
        return up

    def state_dict(self) -> dict:
        return {"c": self.c, "clients": self.clients}

    def load_state_dict(self, state: dict) -> None:
        self.c, self.clients = state["c"], {int(k): v for k, v in state["clients"].items()}


class PersonalB:
    """FedSA-LoRA (Guo et al. 2025): A and the head are shared and averaged, every client keeps its
    own B (what adapts the shared subspace to its data). Each client's B starts at the global init
    (zero) and is kept here as the client would keep it (checkpointed); it never travels. The
    reference global model (what ``global_state`` evaluates) carries the data-weighted mean of the
    clients' B."""

    def __init__(self, initial: AdapterState, sizes: list[int]):
        self.keys = factor_keys(initial, "B")
        self.sizes = sizes
        self.clients: dict[int, AdapterState] = {}
        self.initial = {k: initial[k] for k in self.keys}

    def own(self, client: int) -> AdapterState:
        return self.clients.get(client, self.initial)

    def task_state(self, client: int, sent: AdapterState) -> AdapterState:
        """What ``client`` trains from: the shared A and head, its own B."""
        return {**sent, **self.own(client)}

    def keep(self, results: list[ClientResult]) -> None:
        for r in results:
            if not r.failed:
                self.clients[r.client_id] = {k: r.state[k] for k in self.keys}

    def shared(self, state: AdapterState, global_state: AdapterState) -> AdapterState:
        """An upload as the server averages it: the client's A and head, B left at the global's."""
        return {**state, **{k: global_state[k] for k in self.keys}}

    def model_of(self, client: int, global_state: AdapterState) -> AdapterState:
        return {**global_state, **self.own(client)}

    def reference(self, global_state: AdapterState) -> AdapterState:
        total = float(sum(self.sizes))
        return {**global_state, **{k: sum(n / total * self.own(c)[k] for c, n in enumerate(self.sizes)) for k in self.keys}}

    def state_dict(self) -> dict:
        return {"clients": self.clients}

    def load_state_dict(self, state: dict) -> None:
        self.clients = {int(k): v for k, v in state["clients"].items()}
