"""The peer methods users compare federated LoRA against: FFA-LoRA and RoLoRA
(``federation.lora_mode``), SCAFFOLD (``train.correction``) and LoRA-FAIR (``aggregator: lora_fair``):
hand-computed cases, exactness, bytes, resume, and equal results on every engine and when fused."""

from __future__ import annotations

import pytest
import torch

from colora.aggregation import RULES, fedit, get_rule, lora_fair
from colora.algorithms.drift import Scaffold
from colora.cli import main
from colora.config import ConfigError
from colora.engines import Engine
from colora.experiment import run_experiment
from colora.states import lora_pairs, payload_nbytes
from colora.train import clip_and_step
from colora.types import ClientResult

from .conftest import read_rows, spy_rounds, tiny_config

RUN = dict(data__synthetic_train=72, data__synthetic_eval=32, data__max_length=32, rounds=3, clients__num=4,
           clients__per_round=3, train__local_steps=2, train__lr=0.05)


def _round(over: dict, rounds: int = 2):
    """Run ``rounds`` rounds on an engine, keeping every round's tasks, results and global state."""
    cfg = tiny_config(**{**RUN, **over})
    seen, globals_, metrics, _ = spy_rounds(cfg, rounds)
    return cfg, seen, globals_, metrics


def _mean_update(results, weights) -> dict[str, torch.Tensor]:
    total = sum(weights)
    return {prefix: sum(w / total * r.state[b].double() @ r.state[a].double() for w, r in zip(weights, results))
            for prefix, (a, b) in lora_pairs(results[0].state).items()}


@pytest.mark.parametrize("mode", ["ffa", "rolora"])
def test_one_factor_trains_the_average_is_exact_and_the_rest_stays_home(mode):
    cfg, seen, globals_, metrics = _round(dict(federation__lora_mode=mode))
    for rnd, ((tasks, results), before, after) in enumerate(zip(seen, globals_, globals_[1:]), start=1):
        resting = "A" if mode == "ffa" or rnd % 2 else "B"
        for r in results:  # the resting factor came back as it was sent
            for k in (k for k in r.state if f".lora_{resting}." in k):
                assert torch.equal(r.state[k], before[k])
        weights = [float(r.num_samples) for r in results]
        for prefix, (a, b) in lora_pairs(after).items():  # product of the average = average of the products
            torch.testing.assert_close(after[b].double() @ after[a].double(), _mean_update(results, weights)[prefix],
                                       rtol=0, atol=1e-6)
        up = sum(payload_nbytes({k: v for k, v in r.state.items() if f".lora_{resting}." not in k}) for r in results)
        assert metrics[rnd - 1].bytes_up == up  # only the trained factor and the head go up
    init = globals_[0]
    if mode == "ffa":
        assert all(torch.equal(globals_[-1][k], init[k]) for k in init if ".lora_A." in k)


def test_ffa_halves_the_lora_bytes_of_standard(tmp_path):
    run_experiment(tiny_config(**RUN), tmp_path / "standard")
    run_experiment(tiny_config(**RUN, federation__lora_mode="ffa"), tmp_path / "ffa")
    std, ffa = read_rows(tmp_path / "standard")[-1], read_rows(tmp_path / "ffa")[-1]
    with Engine(tiny_config(**RUN)) as engine:
        state = engine.algorithm.global_state()
    lora = payload_nbytes({k: v for k, v in state.items() if ".lora_" in k})
    a_only = payload_nbytes({k: v for k, v in state.items() if ".lora_A." in k})
    assert abs(2 * a_only - lora) < 64  # query/value: square layers, A and B the same size (one header apart)
    without_a = payload_nbytes({k: v for k, v in state.items() if ".lora_A." not in k})
    for key in ("bytes_up", "bytes_down"):  # every message of every round is the state without A
        assert std[key] - ffa[key] == RUN["rounds"] * RUN["clients__per_round"] * (payload_nbytes(state) - without_a)


def test_scaffold_with_one_client_is_fedavg(tmp_path):
    """One client: c_k = c after every round, so the correction is always zero."""
    one = dict(RUN, clients__num=1, clients__per_round=1)
    run_experiment(tiny_config(**one), tmp_path / "fedavg")
    run_experiment(tiny_config(**one, train__correction="scaffold"), tmp_path / "scaffold")
    plain, scaffold = read_rows(tmp_path / "fedavg"), read_rows(tmp_path / "scaffold")
    assert [r["eval/loss"] for r in scaffold] == pytest.approx([r["eval/loss"] for r in plain], abs=1e-6)


def test_scaffold_control_variates_by_hand():
    """Option II of SCAFFOLD: c_k+ = c_k - c + (x - y_k) / (K lr), c += sum of changes / N."""
    cfg = tiny_config(**RUN, train__correction="scaffold")
    sc = Scaffold(cfg, {"w": torch.zeros(2)})
    x = {"w": torch.tensor([1.0, 1.0])}
    results = [ClientResult(0, {"w": torch.tensor([0.8, 1.2])}, 10, 0.0, 0.0, 2),
               ClientResult(2, {"w": torch.tensor([1.0, 0.6])}, 10, 0.0, 0.0, 2)]
    sc.update(results, {0: x, 2: x}, lr=0.1)
    torch.testing.assert_close(sc.clients[0]["w"], torch.tensor([1.0, -1.0]))  # (x - y) / (2 * 0.1)
    torch.testing.assert_close(sc.clients[2]["w"], torch.tensor([0.0, 2.0]))
    torch.testing.assert_close(sc.c["w"], torch.tensor([1.0, 1.0]) / cfg.clients.num)
    torch.testing.assert_close(sc.correction(0)["w"], sc.c["w"] - torch.tensor([1.0, -1.0]))
    torch.testing.assert_close(sc.correction(1)["w"], sc.c["w"])  # never sampled: c_k = 0
    results = [ClientResult(0, {"w": torch.tensor([1.0, 1.0])}, 10, 0.0, 0.0, 2)]  # a second round, y = x
    c_before = sc.c["w"].clone()
    sc.update(results, {0: x}, lr=0.1)
    torch.testing.assert_close(sc.clients[0]["w"], torch.tensor([1.0, -1.0]) - c_before)
    torch.testing.assert_close(sc.c["w"], c_before - c_before / cfg.clients.num)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_scaffold_correction_moves_the_step_not_the_optimizers_gradient(optimizer):
    """The step is the optimizer's own on the data gradient, then -lr (c - c_k): AdamW's moments see
    only the gradient (its first moment is (1 - beta1) g), and for SGD this is the paper's
    lr (g + c - c_k) exactly. The units match what option II measures, (x - y) / (K lr)."""
    cfg = tiny_config(train__optimizer=optimizer, train__weight_decay=0.01).train
    g, d, lr = torch.tensor([1e-4, -2e-4, 3e-5]), torch.tensor([0.5, -0.25, 1.0]), 0.1
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0, -1.0]))
    ref = torch.nn.Parameter(w.detach().clone())
    cls = torch.optim.AdamW if optimizer == "adamw" else torch.optim.SGD
    opt, ref_opt = cls([w], lr=lr, weight_decay=0.01), cls([ref], lr=lr, weight_decay=0.01)
    w.grad, ref.grad = g.clone(), g.clone()
    clip_and_step(cfg, {"w": w}, opt, {"w": d})
    ref_opt.step()
    torch.testing.assert_close(w.detach(), ref.detach() - lr * d)
    if optimizer == "adamw":
        torch.testing.assert_close(opt.state[w]["exp_avg"], 0.1 * g)
    else:  # plain SGD: the same as the gradient form
        torch.testing.assert_close(w.detach(), torch.tensor([1.0, 2.0, -1.0]) * (1 - lr * 0.01) - lr * (g + d))


def test_scaffold_corrects_every_step_and_counts_its_bytes():
    cfg, seen, globals_, metrics = _round(dict(train__correction="scaffold"))
    assert seen[0][0][0].correction is not None
    assert all(float(v.abs().max()) == 0 for v in seen[0][0][0].correction.values())  # round 1: c = c_k = 0
    assert any(float(v.abs().max()) > 0 for t in seen[1][0] for v in t.correction.values())
    adapter = payload_nbytes(globals_[0])
    assert metrics[0].bytes_up == 2 * len(seen[0][1]) * adapter and metrics[0].bytes_down == 2 * len(seen[0][0]) * adapter


@pytest.mark.parametrize("over", [dict(train__correction="scaffold"), dict(federation__lora_mode="rolora")])
def test_resume_is_exact(tmp_path, over):
    run_experiment(tiny_config(**RUN, **over), tmp_path / "full")
    part = run_experiment(tiny_config(**RUN, **over), out=str(tmp_path / "part"), stop_after=1)
    assert main(["run", "--resume", str(part)]) == 0
    assert [r["eval/loss"] for r in read_rows(part)] == [r["eval/loss"] for r in read_rows(tmp_path / "full")]


def _lora_states(k: int, seed: int = 0, shared_rows: bool = False):
    g = torch.Generator().manual_seed(seed)
    a_bar = torch.randn(4, 10, generator=g, dtype=torch.float64)
    states = []
    for _ in range(k):
        a = torch.randn(4, 4, generator=g, dtype=torch.float64) @ a_bar if shared_rows else torch.randn(4, 10, generator=g, dtype=torch.float64)
        states.append({"m.lora_A.weight": a, "m.lora_B.weight": torch.randn(6, 4, generator=g, dtype=torch.float64),
                       "head.weight": torch.randn(3, 5, generator=g, dtype=torch.float64)})
    return states


def test_lora_fair_matches_the_mean_update_when_it_lies_in_the_averaged_row_space():
    """A_k = M_k Ā: every client's update has rows in Ā's row space, so with λ = 0 the refined B̄ + ΔB
    times Ā is exactly Σ p_k B_k A_k, where fedit's B̄ Ā is off; the head is fedit's mean."""
    states, weights = _lora_states(3, shared_rows=True), [1.0, 2.0, 3.0]
    target = sum(w / 6 * s["m.lora_B.weight"] @ s["m.lora_A.weight"] for w, s in zip(weights, states))
    fair, plain = lora_fair(states, weights, lam=0.0), fedit(states, weights)
    torch.testing.assert_close(fair["m.lora_B.weight"] @ fair["m.lora_A.weight"], target, rtol=0, atol=1e-10)
    assert float((plain["m.lora_B.weight"] @ plain["m.lora_A.weight"] - target).abs().max()) > 0.1
    torch.testing.assert_close(fair["m.lora_A.weight"], plain["m.lora_A.weight"])
    torch.testing.assert_close(fair["head.weight"], plain["head.weight"])


def test_lora_fair_with_a_huge_lambda_is_fedit_and_never_worse_than_fedit_at_zero():
    states, weights = _lora_states(4, seed=1), [1.0, 1.0, 2.0, 5.0]
    plain = fedit(states, weights)
    for k, v in lora_fair(states, weights, lam=1e12).items():
        torch.testing.assert_close(v, plain[k], rtol=0, atol=1e-9)
    target = sum(w / 9 * s["m.lora_B.weight"] @ s["m.lora_A.weight"] for w, s in zip(weights, states))
    fair = lora_fair(states, weights, lam=0.0)
    gap = lambda s: float((s["m.lora_B.weight"] @ s["m.lora_A.weight"] - target).norm())  # noqa: E731
    assert gap(fair) <= gap(plain)


@pytest.mark.parametrize("over,message", [
    (dict(federation__lora_mode="ffa", federation__aggregator="svd"), "needs equal ranks and federation.aggregator=fedit"),
    (dict(federation__lora_mode="rolora", federation__ranks=[2, 4, 8, 4]), "needs equal ranks"),
    (dict(train__correction="scaffold", algorithm="declora"), "is for fedavg"),
    (dict(federation__lora_mode="rolora", federation__server_optimizer="fedadam"), "would keep moving it by momentum"),
    (dict(federation__lora_mode="ffa", algorithm="splitlora"), "is for fedavg"),
])
def test_drift_fixes_are_refused_where_factors_are_not_averaged_in_one_frame(over, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(**RUN, **over)


CASE = dict(train__correction="scaffold", federation__lora_mode="ffa", train__optimizer="adamw", train__client_optimizer="keep")


def test_equal_on_workers_and_when_fused(tmp_path):
    """The frozen keys and the correction travel in the task's bytes: every engine runs the same."""
    def losses(name, **over):
        run_experiment(tiny_config(**RUN, **CASE, **over), tmp_path / name)
        return [r["eval/loss"] for r in read_rows(tmp_path / name)]
    ref = losses("ref")
    assert losses("workers", engine__kind="workers", engine__workers=2) == pytest.approx(ref, abs=1e-6)
    assert losses("fused", engine__fuse=3) == pytest.approx(ref, abs=1e-5)
    run_experiment(tiny_config(**RUN, federation__aggregator="lora_fair"), tmp_path / "fair")
    assert len(read_rows(tmp_path / "fair")) == RUN["rounds"] + 1


HOLD = dict(RUN, data__synthetic_train=120, eval__client_holdout=0.2)


def test_fedsa_keeps_each_clients_b_at_home_and_averages_a_and_the_head():
    cfg, seen, globals_, metrics = _round(dict(HOLD, federation__lora_mode="fedsa"))
    with Engine(cfg) as engine:
        init = engine.algorithm.global_state()
    (tasks1, results1), (tasks2, results2) = seen
    b_keys = [k for k in init if ".lora_B." in k]
    own = {r.client_id: {k: r.state[k] for k in b_keys} for r in results1}
    for t in tasks2:  # a client sampled again starts from its own B, a new one from the init
        for k in b_keys:
            assert torch.equal(t.state[k], own[t.client_id][k] if t.client_id in own else init[k])
    weights = [float(r.num_samples) for r in results2]
    shared = fedit([{k: v for k, v in r.state.items() if k not in b_keys} for r in results2], weights)
    after = globals_[2]
    for k, v in shared.items():  # A and the head: the weighted mean of what the clients sent
        torch.testing.assert_close(after[k], v, rtol=0, atol=1e-6)
    up = sum(payload_nbytes({k: v for k, v in r.state.items() if k not in b_keys}) for r in results2)
    assert metrics[1].bytes_up == up  # B never travels
    assert "eval_clients/mean_accuracy" in metrics[1].extra and "eval_clients/min_accuracy" in metrics[1].extra


def test_client_holdout_rows_never_train_and_score_the_model_each_client_uses(tmp_path):
    cfg = tiny_config(**HOLD)
    run_experiment(cfg, tmp_path / "run")
    rows = read_rows(tmp_path / "run")
    with Engine(cfg) as engine:
        for part, held, train in zip(engine.parts, engine.holdout, engine.train_parts):
            assert len(held) == max(1, round(0.2 * len(part))) and not set(held) & set(train)
            assert sorted([*held, *train]) == sorted(part)
        assert engine.algorithm.ctx.client_sizes == [len(t) for t in engine.train_parts]
        for rnd in range(1, cfg.rounds + 1):
            engine.algorithm.run_round(rnd)
        direct = [engine.evaluate_client(engine.algorithm.global_state(), k)["eval/accuracy"] for k in range(cfg.clients.num)]
    assert rows[-1]["eval_clients/mean_accuracy"] == pytest.approx(sum(direct) / len(direct))
    assert rows[-1]["eval_clients/min_accuracy"] == pytest.approx(min(direct))
    assert "held_out" in (tmp_path / "run" / "partition.json").read_text()


def test_fedsa_resumes_exactly(tmp_path):
    over = dict(HOLD, federation__lora_mode="fedsa")
    run_experiment(tiny_config(**over), tmp_path / "full")
    part = run_experiment(tiny_config(**over), out=str(tmp_path / "part"), stop_after=1)
    assert main(["run", "--resume", str(part)]) == 0
    keys = ("eval/loss", "eval_clients/mean_accuracy", "eval_clients/max_loss")
    assert [[r.get(k) for k in keys] for r in read_rows(part)] == [[r.get(k) for k in keys] for r in read_rows(tmp_path / "full")]


@pytest.mark.parametrize("over,message", [
    (dict(federation__lora_mode="fedsa"), "set eval.client_holdout"),
    (dict(eval__client_holdout=0.2, algorithm="declora"), "scores fedavg's clients"),
])
def test_fedsa_and_holdout_settings_are_checked(over, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(**RUN, **over)


def _component_state(us, vs, sigmas, d_out=6, d_in=5):
    """A rank-len(sigmas) state whose B A is Σ σ_i u_i v_iᵀ (orthonormal u's and v's)."""
    b = torch.stack([s * u for s, u in zip(sigmas, us)], 1)  # d_out x r
    a = torch.stack(list(vs), 0)  # r x d_in
    return {"m.lora_A.weight": a.double(), "m.lora_B.weight": b.double()}


def test_rank_partitioned_weighting_by_hand():
    """Ranks 1 and 2, equal weights: partition 1 (component 0) has both clients (P = 1); partition 2
    (component 1) only the rank-2 client (P = 1/2), so its second component counts twice:
    ΔW = ½·s₁·ΔW₁ + ½·s₂·(c₀ + 2 c₁), s_r = alpha / r."""
    q_out, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    q_in, _ = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64))
    one = _component_state([q_out[:, 0]], [q_in[:, 0]], [1.5])
    two = _component_state([q_out[:, 0], q_out[:, 1]], [q_in[:, 0], q_in[:, 1]], [3.0, 1.0])
    alpha = 4.0
    c0, c1 = 3.0 * torch.outer(q_out[:, 0], q_in[:, 0]), torch.outer(q_out[:, 1], q_in[:, 1])
    expected = 0.5 * alpha * 1.5 * torch.outer(q_out[:, 0], q_in[:, 0]) + 0.5 * (alpha / 2) * (c0 + 2 * c1)
    rule = get_rule(tiny_config(**RUN, federation__aggregator="svd", federation__ranks=[1, 2, 2, 2],
                                federation__rank_partitioned=True).federation)
    out = rule.aggregate([one, two], [1.0, 1.0], alpha, 2, None)
    torch.testing.assert_close((alpha / 2) * out["m.lora_B.weight"] @ out["m.lora_A.weight"], expected, rtol=0, atol=1e-10)
    plain = RULES["svd"].aggregate([one, two], [1.0, 1.0], alpha, 2, None)  # the diluted second component
    torch.testing.assert_close((alpha / 2) * plain["m.lora_B.weight"] @ plain["m.lora_A.weight"],
                               expected - 0.5 * (alpha / 2) * c1, rtol=0, atol=1e-10)


def test_rank_partitioned_with_equal_ranks_is_svd_and_runs_with_mixed_ranks(tmp_path):
    states = [_lora_states(1, seed=s)[0] for s in range(3)]
    plain = RULES["svd"].aggregate(states, [1.0, 2.0, 3.0], 8.0, 4, None)
    part = get_rule(tiny_config(**RUN, federation__aggregator="svd", federation__rank_partitioned=True).federation)
    for k, v in part.aggregate(states, [1.0, 2.0, 3.0], 8.0, 4, None).items():
        torch.testing.assert_close(v, plain[k], rtol=0, atol=1e-9)
    run_experiment(tiny_config(**RUN, federation__aggregator="svd", federation__ranks=[2, 4, 8, 4],
                               federation__rank_partitioned=True), tmp_path / "run")
    assert len(read_rows(tmp_path / "run")) == RUN["rounds"] + 1
    with pytest.raises(ConfigError, match="rank_partitioned"):
        tiny_config(**RUN, federation__rank_partitioned=True)  # fedit has no SVD to partition
