"""HAFL (``federation.aggregator: hafl``, ``hafl_mode: truncate | freeze``): rank-1 aggregation by hand,
equal ranks = zero_pad, importance ordering leaves ΔW alone, the clients' sensitivity scores and
frozen components, bytes, resume, and equal results on every engine and when fused."""

from __future__ import annotations

import pytest
import torch

from colora.aggregation import RULES
from colora.aggregation.hafl import hafl, merge_scores, sort_by_importance
from colora.cli import main
from colora.config import ConfigError
from colora.experiment import run_experiment
from colora.states import lora_pairs, payload_nbytes
from colora.train import Components

from .conftest import read_rows, spy_rounds, tiny_config

RUN = dict(data__synthetic_train=72, data__synthetic_eval=32, data__max_length=32, rounds=3, clients__num=4,
           clients__per_round=3, train__local_steps=2, train__lr=0.05, federation__aggregator="hafl")
MIXED = dict(federation__ranks=[2, 4, 8, 4])


def _state(rank: int, seed: int, d_out: int = 6, d_in: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"m.lora_A.weight": torch.randn(rank, d_in, generator=g, dtype=torch.float64),
            "m.lora_B.weight": torch.randn(d_out, rank, generator=g, dtype=torch.float64),
            "head.weight": torch.randn(2, 3, generator=g, dtype=torch.float64)}


def _delta(state, alpha):
    a, b = state["m.lora_A.weight"], state["m.lora_B.weight"]
    return alpha / a.shape[0] * b @ a


def test_each_component_is_averaged_over_the_clients_that_hold_it_by_hand():
    """Ranks 1 and 2, weights 1 and 3, alpha 2 (scales 2 and 1): component 0 is the weighted mean of
    both (the rank-1 client's B doubled to the global's scale); component 1 is the rank-2 client's
    own, where zero_pad dilutes it to 3/4. The head is the plain weighted mean."""
    one, two = _state(1, 0), _state(2, 1)
    out = hafl([one, two], [1.0, 3.0], alpha=2.0, rank=2)
    a1, b1, a2, b2 = one["m.lora_A.weight"], one["m.lora_B.weight"], two["m.lora_A.weight"], two["m.lora_B.weight"]
    torch.testing.assert_close(out["m.lora_A.weight"][0], (a1[0] + 3 * a2[0]) / 4, rtol=0, atol=1e-12)
    torch.testing.assert_close(out["m.lora_B.weight"][:, 0], (2 * b1[:, 0] + 3 * b2[:, 0]) / 4, rtol=0, atol=1e-12)
    torch.testing.assert_close(out["m.lora_A.weight"][1], a2[1], rtol=0, atol=1e-12)
    torch.testing.assert_close(out["m.lora_B.weight"][:, 1], b2[:, 1], rtol=0, atol=1e-12)
    torch.testing.assert_close(out["head.weight"], (one["head.weight"] + 3 * two["head.weight"]) / 4, rtol=0, atol=1e-12)
    padded = RULES["zero_pad"].aggregate([one, two], [1.0, 3.0], 2.0, 2, None)
    torch.testing.assert_close(padded["m.lora_A.weight"][1], 0.75 * a2[1], rtol=0, atol=1e-12)
    assert list(out) == list(one)


def test_a_component_nobody_holds_keeps_the_previous_global():
    previous = _state(3, 9)
    out = hafl([_state(2, 0), _state(2, 1)], [1.0, 1.0], alpha=4.0, rank=3, previous=previous)
    assert torch.equal(out["m.lora_A.weight"][2], previous["m.lora_A.weight"][2])
    assert torch.equal(out["m.lora_B.weight"][:, 2], previous["m.lora_B.weight"][:, 2])


def test_with_equal_ranks_hafl_is_zero_pad_bit_for_bit():
    states, weights = [_state(4, s) for s in range(3)], [1.0, 2.0, 5.0]
    plain = RULES["zero_pad"].aggregate(states, weights, 8.0, 4, None)
    out = RULES["hafl"].aggregate(states, weights, 8.0, 4, None)
    assert out.keys() == plain.keys() and all(torch.equal(out[k], plain[k]) for k in out)


def test_ordering_by_importance_keeps_every_update_and_pairs_scores_with_components():
    state = _state(4, 3)
    scores = {"m.lora_A.weight": torch.tensor([0.1, 3.0, 0.1, 2.0])}
    out, new = sort_by_importance(state, scores)
    torch.testing.assert_close(_delta(out, 8.0), _delta(state, 8.0), rtol=0, atol=1e-12)
    assert new["m.lora_A.weight"].tolist() == pytest.approx([3.0, 2.0, 0.1, 0.1])
    assert torch.equal(out["m.lora_A.weight"][0], state["m.lora_A.weight"][1])  # the stable order: 1, 3, 0, 2
    assert torch.equal(out["m.lora_B.weight"][:, 3], state["m.lora_B.weight"][:, 2])
    assert torch.equal(out["head.weight"], state["head.weight"])


def test_server_scores_are_the_weighted_mean_of_the_clients_that_scored_a_component():
    previous = {"m.lora_A.weight": torch.tensor([5.0, 5.0, 5.0, 5.0])}
    clients = [{"m.lora_A.weight": torch.tensor([1.0, 2.0])}, {"m.lora_A.weight": torch.tensor([4.0, 8.0, 6.0])}]
    out = merge_scores(previous, clients, [3.0, 1.0])
    assert out["m.lora_A.weight"].tolist() == pytest.approx([(3 + 4) / 4, (6 + 8) / 4, 6.0, 5.0])


def test_client_scores_are_smoothed_sensitivity_and_frozen_components_stay_as_sent():
    """Two steps of hand-set gradients: Ī and Ū follow AdaLoRA's recursions (β = 0.85); a component's
    score is mean(Ī·Ū) over its A row plus over its B column; components from 1 on take no step
    (even with weight decay) and the gradient norm counts component 0 only."""
    a = torch.nn.Parameter(torch.tensor([[1.0, -2.0], [0.5, 1.0]]))
    b = torch.nn.Parameter(torch.tensor([[2.0, 1.0], [-1.0, 3.0], [0.0, 1.0]]))
    params = {"m.lora_A.weight": a, "m.lora_B.weight": b}
    comps = Components(params, train_components=1)
    grads = [(torch.tensor([[0.5, 0.5], [1.0, -1.0]]), torch.tensor([[1.0, 0.0], [0.5, 2.0], [1.0, 1.0]])),
             (torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[0.0, 1.0], [1.0, 1.0], [2.0, 0.0]]))]
    opt = torch.optim.AdamW([a, b], lr=0.1, weight_decay=0.5)
    held_a, held_b = a.detach()[1].clone(), b.detach()[:, 1].clone()
    ibar = {k: torch.zeros_like(p) for k, p in params.items()}
    ubar = {k: torch.zeros_like(p) for k, p in params.items()}
    for ga, gb in grads:
        for (k, p), g in zip(params.items(), (ga, gb)):
            p.grad = g.clone()
            imp = (p.detach() * g).abs()
            ibar[k] = 0.85 * ibar[k] + 0.15 * imp
            ubar[k] = 0.85 * ubar[k] + 0.15 * (imp - ibar[k]).abs()
        comps.before_step()
        assert float(a.grad[1].abs().sum()) == 0 and float(b.grad[:, 1].abs().sum()) == 0
        opt.step()
        opt.zero_grad()
        comps.after_step()
        assert torch.equal(a.detach()[1], held_a) and torch.equal(b.detach()[:, 1], held_b)
    expected = (ibar["m.lora_A.weight"] * ubar["m.lora_A.weight"]).mean(1) + (ibar["m.lora_B.weight"] * ubar["m.lora_B.weight"]).mean(0)
    torch.testing.assert_close(comps.scores()["m.lora_A.weight"], expected)
    assert float(expected.min()) > 0


def _spy_rounds(over: dict, rounds: int = 2):
    cfg = tiny_config(**{**RUN, **over})
    seen, globals_, metrics, algo = spy_rounds(cfg, rounds)
    return cfg, seen, globals_, metrics, algo.server.scores


def test_truncate_hands_each_client_the_most_important_components_and_counts_the_scores():
    cfg, seen, globals_, metrics, scores = _spy_rounds(MIXED)
    for v in scores.values():  # the global is kept in descending score order
        assert torch.all(v[:-1] >= v[1:])
    tasks, results = seen[1]
    for t, r in zip(tasks, results):
        rank = cfg.federation.ranks[t.client_id]
        assert t.rank == rank and t.scores and t.train_components is None
        assert {k: v.shape[0] for k, v in r.scores.items()} == {a: rank for a, _ in lora_pairs(r.state).values()}
        # the first `rank` components of the round's global, B at the client's own scale
        for a_key, b_key in lora_pairs(t.state).values():
            assert torch.equal(t.state[a_key], globals_[1][a_key][:rank])
    up = sum(payload_nbytes({**r.state, **{"scores/" + k: v for k, v in r.scores.items()}}) for r in results)
    assert metrics[1].bytes_up == up


def test_freeze_trains_each_clients_top_components_at_the_full_rank_and_sends_only_them():
    cfg, seen, globals_, metrics, _ = _spy_rounds({**MIXED, "federation__hafl_mode": "freeze"})
    tasks, results = seen[1]
    full = max(cfg.federation.ranks)
    for t, r in zip(tasks, results):
        n = cfg.federation.ranks[t.client_id]
        assert t.rank == full and t.train_components == n
        for a_key, b_key in lora_pairs(t.state).values():
            assert torch.equal(r.state[a_key][n:], t.state[a_key][n:])  # frozen: back as sent
            assert torch.equal(r.state[b_key][:, n:], t.state[b_key][:, n:])
            assert r.scores[a_key].shape[0] == full and not torch.equal(r.state[a_key][:n], t.state[a_key][:n])
    assert metrics[1].bytes_down == sum(payload_nbytes(t.state) for t in tasks)  # the whole global down
    assert metrics[1].bytes_up < sum(payload_nbytes(r.state) for r in results)  # only the trained components up


def test_truncate_with_equal_ranks_runs_as_zero_pad(tmp_path):
    """Re-ordering components changes no update, so the eval losses equal zero_pad's (float order only)."""
    run_experiment(tiny_config(**RUN), tmp_path / "hafl")
    run_experiment(tiny_config(**{**RUN, "federation__aggregator": "zero_pad"}), tmp_path / "pad")
    hafl_loss = [r["eval/loss"] for r in read_rows(tmp_path / "hafl")]
    assert hafl_loss == pytest.approx([r["eval/loss"] for r in read_rows(tmp_path / "pad")], abs=1e-5)


@pytest.mark.parametrize("mode", ["truncate", "freeze"])
def test_resume_is_exact(tmp_path, mode):
    over = {**RUN, **MIXED, "federation__hafl_mode": mode}
    run_experiment(tiny_config(**over), tmp_path / "full")
    part = run_experiment(tiny_config(**over), out=str(tmp_path / "part"), stop_after=1)
    assert main(["run", "--resume", str(part)]) == 0
    assert [r["eval/loss"] for r in read_rows(part)] == [r["eval/loss"] for r in read_rows(tmp_path / "full")]


def test_equal_on_workers_and_when_fused(tmp_path):
    """Scores and the frozen-component count travel in the task's and result's bytes."""
    def losses(name, **extra):
        run_experiment(tiny_config(**RUN, **MIXED, federation__hafl_mode="freeze", **extra), tmp_path / name)
        return [r["eval/loss"] for r in read_rows(tmp_path / name)]
    ref = losses("ref")
    assert losses("workers", engine__kind="workers", engine__workers=2) == pytest.approx(ref, abs=1e-6)
    assert losses("fused", engine__fuse=3) == pytest.approx(ref, abs=1e-5)


@pytest.mark.parametrize("over,message", [
    (dict(federation__aggregator="zero_pad", federation__hafl_mode="freeze"), "applies to federation.aggregator=hafl"),
    (dict(algorithm="declora"), "algorithm is declora"),
    (dict(train__client_optimizer="keep"), "client_optimizer=reset"),
    (dict(federation__robust="norm_clip"), "use zero_pad or svd"),
])
def test_bad_settings_are_refused(over, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(**{**RUN, **over})
