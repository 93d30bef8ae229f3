"""``central``: plain LoRA on the pooled data, the upper bound every comparison needs.

A round is ``train.local_steps`` optimizer steps on the pooled stream; the optimizer's moments
persist across rounds (a single uninterrupted training run cut into evaluation intervals).
No communication: bytes stay 0, simulated time is compute at the server's speed.
"""

from __future__ import annotations

from ..config import NonFiniteError
from ..costmodel import central_round_time
from ..schedule import lr_at
from ..types import ClientTask, RoundResult
from .base import Algorithm


class Central(Algorithm):
    name = "central"
    pooled_data = True

    def __init__(self, ctx):
        super().__init__(ctx)
        self.state = ctx.initial_state
        self.steps_done = 0

    def run_round(self, rnd: int) -> RoundResult:
        steps = self.cfg.train.local_steps
        task = ClientTask(0, self.state, self.steps_done, steps, lr_at(self.cfg.train, rnd, self.cfg.rounds), keep_optimizer=True,
                          moments=self.moments.get(0))
        (result,) = self.ctx.run_tasks([task])
        if result.failed:
            raise NonFiniteError(f"central's local training produced NaN or inf (round {rnd})", "train.lr")
        self.state, self.steps_done = result.state, self.steps_done + steps
        self.keep_moments([result])
        return RoundResult(result.loss, 0, 0, central_round_time(result.flops, self.cfg.system.server),
                           self.privacy_spent(rnd, [self.steps_done]))

    def global_state(self):
        return self.state

    def state_dict(self) -> dict:
        return {"state": self.state, "steps_done": self.steps_done, "moments": self.moments}

    def load_state_dict(self, state: dict) -> None:
        self.state, self.steps_done = state["state"], state["steps_done"]
        self.moments = dict(state.get("moments", {}))
