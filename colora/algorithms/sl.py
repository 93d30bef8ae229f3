"""``sl``: vanilla sequential split learning (the SplitFed paper's SL baseline).

One server adapter; the sampled clients take turns. A client receives the current client-side
adapter, trains ``train.local_steps`` split steps with the server (activation up, gradient down
each step, exactly as in ``splitlora``), then hands its client-side adapter on (uploaded and
relayed to the next client). Nothing runs in parallel, so the simulated time is the sum of all of
it. Like ``splitlora``, the standard split sends labels to the server; ``split.u_shaped`` keeps
them on the client.
"""

from __future__ import annotations

import numpy as np

from ..config import ColoraError
from ..costmodel import download_time, sequential_split_time, upload_time
from ..schedule import lr_at
from ..split.types import SplitJob
from ..states import payload_nbytes
from ..types import RoundResult
from .base import sample_clients
from .splitlora import SplitAlgorithm


class SL(SplitAlgorithm):
    name = "sl"

    def __init__(self, ctx):
        if ctx.cfg.split.server != "shared":
            raise ColoraError(f"split.server={ctx.cfg.split.server}: algorithm=sl has one server adapter (use shared)")
        if any(r != ctx.cfg.model.lora.r for r in ctx.client_ranks):
            raise ColoraError(f"client ranks {sorted(set(ctx.client_ranks))}: algorithm=sl hands one client-side adapter from "
                              f"client to client, all at model.lora.r={ctx.cfg.model.lora.r} (per-client ranks: use splitlora)")
        super().__init__(ctx)

    def run_round(self, rnd: int) -> RoundResult:
        cfg, split = self.cfg, self.split
        order = sample_clients(cfg.seed, rnd, cfg.clients.num, cfg.clients.per_round)
        lr = lr_at(cfg.train, rnd, cfg.rounds)
        up = down = 0
        sim, losses = 0.0, []
        for k in order:
            device = self.device(k)
            self.begin([k])
            handoff = payload_nbytes(self.client_state)  # the client-side adapter, relayed to this client
            down, sim = down + handoff, sim + download_time(handoff, device)
            self.stats.totals["adapter_bytes_down"] += handoff
            mine = []
            for _ in range(cfg.train.local_steps):
                res = split.step([SplitJob(k, self.client_state, self.client_steps[k], moments=self.moments.get(k))],
                                 [self.server_state], lr)
                self.moments[k] = res.client_moments[0]
                (self.client_state,), (self.server_state,) = res.client_states, res.server_states
                self.client_steps[k] += 1
                self.stats.add_step(res)
                mine.append(res.losses[0])
                up, down = up + res.bytes_up[0], down + res.bytes_down[0]
                sim += sequential_split_time(res.client_flops, res.bytes_up, res.bytes_down, res.server_flops,
                                             [device], cfg.system.server, res.messages)
            handoff = payload_nbytes(self.client_state)  # ...and handed on at the end of its turn
            up, sim = up + handoff, sim + upload_time(handoff, device)
            self.stats.totals["adapter_bytes_up"] += handoff
            losses.append(float(np.mean(mine)))
        weights = [float(self.ctx.client_sizes[k]) if cfg.federation.weighting == "samples" else 1.0 for k in order]
        return RoundResult(float(np.average(losses, weights=weights)), up, down, sim, {"clients": len(order)})

    def summary(self) -> dict:
        return self.stats.summary(self.split.accounting, {"server": "shared", "activation_dtype": self.cfg.split.activation_dtype})
