"""Bad client updates are dropped before aggregation or mixing, counted, logged, and the run goes on."""

from __future__ import annotations

import math

import pytest
import torch

from colora.engines import Engine
from colora.types import ClientResult
from colora.validation import AUTO_MULTIPLE, malformed, screen, update_norm

from .conftest import tiny_config

SMALL = dict(data__synthetic_train=72, data__synthetic_eval=32, data__max_length=32, rounds=2, clients__num=4,
             clients__per_round=4, train__local_steps=1)


def _sent() -> dict[str, torch.Tensor]:
    return {"m.lora_A.weight": torch.ones(4, 8), "m.lora_B.weight": torch.zeros(8, 4), "head.weight": torch.ones(2, 8)}


def _moved(by: float) -> dict[str, torch.Tensor]:
    return {k: v + by for k, v in _sent().items()}


@pytest.mark.parametrize("change,reason", [
    (lambda s: {k: v for k, v in s.items() if k != "head.weight"}, "keys differ"),
    (lambda s: {**s, "extra.weight": torch.ones(1)}, "keys differ"),
    (lambda s: {**s, "m.lora_A.weight": torch.ones(2, 8)}, "(a wrong LoRA rank?)"),
    (lambda s: {**s, "m.lora_B.weight": torch.zeros(8, 4, dtype=torch.float16)}, "dtype torch.float16"),
    (lambda s: {**s, "head.weight": torch.full((2, 8), float("nan"))}, "holds NaN or inf"),
    (lambda s: {**s, "head.weight": torch.full((2, 8), float("inf"))}, "holds NaN or inf"),
])
def test_malformed_updates_are_named(change, reason):
    assert malformed(_sent(), _sent()) is None
    assert reason in malformed(change(_sent()), _sent())


def test_norm_bounds_fixed_and_auto():
    sent = {k: _sent() for k in range(5)}
    results = [ClientResult(k, _moved(0.01 * (k + 1)), 10, 0.5, 1.0, 1) for k in range(4)]
    results.append(ClientResult(4, _moved(5.0), 10, 0.5, 1.0, 1))  # an outlier, 500x the smallest
    norms = [update_norm(r.state, sent[r.client_id]) for r in results]
    assert norms[0] == pytest.approx(0.01 * math.sqrt(32 + 32 + 16))
    kept, dropped = screen(results, sent, "auto")
    assert [r.client_id for r in kept] == [0, 1, 2, 3] and dropped[0][0] == 4
    assert f"{AUTO_MULTIPLE:g}x the round's median" in dropped[0][1]
    kept, dropped = screen(results, sent, norms[1] * 1.0001)  # a fixed bound between clients 1 and 2
    assert [r.client_id for r in kept] == [0, 1] and [k for k, _ in dropped] == [2, 3, 4]
    kept, dropped = screen(results, sent, None)
    assert len(kept) == 5 and not dropped
    failed = ClientResult(2, {}, 10, float("nan"), 1.0, 1, failed="its local training produced NaN or inf")
    kept, dropped = screen([results[0], failed], sent, None)
    assert [r.client_id for r in kept] == [0] and dropped == [(2, "its local training produced NaN or inf")]


def _corrupt_client(engine: Engine, client: int, how):
    """Make ``client``'s update bad as it arrives at the server (what a broken or hostile client sends)."""
    run = engine.algorithm.ctx.run_tasks

    def tampered(tasks):
        out = run(tasks)
        for r in out:
            if r.client_id == client:
                how(r)
        return out
    engine.algorithm.ctx.run_tasks = tampered


def _nan(r):
    r.state = {k: torch.full_like(v, float("nan")) for k, v in r.state.items()}


def _huge(r):
    r.state = {k: v * 1e4 for k, v in r.state.items()}


@pytest.mark.parametrize("algorithm,how,norm", [("fedavg", _nan, None), ("fedavg", _huge, "auto"),
                                                ("declora", _nan, None), ("declora", _huge, "auto")])
def test_a_bad_update_is_dropped_and_the_run_goes_on(capsys, algorithm, how, norm):
    cfg = tiny_config(algorithm=algorithm, federation__max_update_norm=norm, **SMALL)
    with Engine(cfg) as clean, Engine(cfg) as eng:
        _corrupt_client(eng, 2, how)
        res = eng.algorithm.run_round(1)
        clean_res = clean.algorithm.run_round(1)
    assert res.extra["rejected_updates"] == 1 and clean_res.extra["rejected_updates"] == 0
    state = eng.algorithm.global_state()
    assert all(torch.isfinite(t).all() and t.abs().max() < 1e3 for t in state.values())
    assert any(not torch.equal(state[k], v) for k, v in clean.algorithm.global_state().items())  # client 2 left out
    assert "colora: round 1: client 2's update dropped: " in capsys.readouterr().out


def test_fedavg_without_the_dropped_client_is_fedavg_over_the_others():
    """Dropping client 2's update gives exactly the aggregate of the other three."""
    cfg = tiny_config(**SMALL)
    with Engine(cfg) as eng, Engine(tiny_config(**SMALL)) as ref:
        _corrupt_client(eng, 2, _nan)
        eng.algorithm.run_round(1)
        sent = ref.algorithm.server.client_state(0, 1)
        from colora.types import ClientTask

        results = ref.executor.run_tasks([ClientTask(k, sent, 0, 1, cfg.train.lr) for k in (0, 1, 3)])
        ref.algorithm.server.aggregate([r.state for r in results], [float(r.num_samples) for r in results])
        assert all(torch.equal(ref.algorithm.server.state[k], v) for k, v in eng.algorithm.global_state().items())


def test_every_update_rejected_stops_the_round_with_one_line():
    cfg = tiny_config(federation__max_update_norm=1e-12, **SMALL)
    with Engine(cfg) as eng:
        from colora.config import ColoraError

        with pytest.raises(ColoraError, match="every client's update was rejected .*federation.max_update_norm"):
            eng.algorithm.run_round(1)
