"""Heterogeneous LoRA ranks: rank rules, the mixed-rank aggregators (exact where the math allows),
scale folding, the factored SVD, and fedavg end to end with ranks [2, 4, 8] on tiny-bert."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import PeftModel

from colora.aggregation import RULES, fedit
from colora.aggregation.stack import stack, stack_for_client
from colora.aggregation.svd import svd, svd_for_client
from colora.aggregation.zero_pad import hetlora_prune, zero_pad, zero_pad_for_client
from colora.cli import main
from colora.config import ColoraError, DeviceProfile, build_config
from colora.engines import InProcessEngine
from colora.experiment import run_experiment
from colora.lowrank import factored_svd, stack_factors
from colora.models import load_base_model, load_tokenizer
from colora.ranks import data_size_ranks, resource_ranks
from colora.states import lora_rank, payload_nbytes
from colora.train import evaluate

from .conftest import cli_error, read_rows, tiny_config, tiny_raw

P1, P2 = "base_model.model.enc.q", "base_model.model.enc.v"
H = "base_model.model.classifier.weight"
ALPHA = 16.0


def _client(g, rank, d_out=6, d_in=5, dtype=torch.float64):
    state = {H: torch.randn(3, generator=g, dtype=dtype)}
    for p in (P1, P2):
        state[f"{p}.lora_A.weight"] = torch.randn(rank, d_in, generator=g, dtype=dtype)
        state[f"{p}.lora_B.weight"] = torch.randn(d_out, rank, generator=g, dtype=dtype)
    return state


def _dw(state, prefix=P1, alpha=ALPHA):
    """The update a state stands for: (alpha / r) B A."""
    r = lora_rank(state)
    return alpha / r * state[f"{prefix}.lora_B.weight"].double() @ state[f"{prefix}.lora_A.weight"].double()


def _mean_dw(states, weights, prefix=P1):
    total = sum(weights)
    return sum(w / total * _dw(s, prefix) for w, s in zip(weights, states))


# --- svd (FlexLoRA / HLoRA) -------------------------------------------------------------------


def test_svd_reproduces_the_mean_update_when_every_rank_covers_it():
    g = torch.Generator().manual_seed(0)
    d_out, d_in = 6, 3  # the mean update has rank <= 3, every client rank is >= 4
    states = [_client(g, r, d_out, d_in, torch.float32) for r in (4, 6, 8)]
    w = [3.0, 1.0, 2.0]
    glob = svd(states, w, ALPHA, rank=8)
    for prefix in (P1, P2):
        mean = _mean_dw(states, w, prefix)
        assert torch.allclose(_dw(glob, prefix), mean, atol=1e-5)
        for r in (4, 6, 8):  # each client's own factors, through its own scale alpha/r
            mine = svd_for_client(glob, r, ALPHA)
            assert lora_rank(mine) == r and torch.allclose(_dw(mine, prefix), mean, atol=1e-5)
    assert torch.allclose(glob[H], sum(wi / 6 * s[H] for wi, s in zip(w, states)))


def test_svd_gives_each_client_the_best_truncation_at_its_rank_with_even_split():
    g = torch.Generator().manual_seed(1)
    states = [_client(g, r, 9, 8) for r in (2, 4, 8)]  # the mean has rank 8
    w = [1.0, 1.0, 2.0]
    glob = svd(states, w, ALPHA, rank=8)
    mean = _mean_dw(states, w)
    u, s, vh = torch.linalg.svd(mean)
    for r in (2, 4, 8):
        mine = svd_for_client(glob, r, ALPHA)
        best = u[:, :r] @ torch.diag(s[:r]) @ vh[:r]
        assert torch.allclose(_dw(mine), best, atol=1e-10)
        b, a = mine[f"{P1}.lora_B.weight"], mine[f"{P1}.lora_A.weight"]
        # singular values split evenly: column norms of B equal row norms of A
        assert torch.allclose(b.norm(dim=0), a.norm(dim=1), atol=1e-10)


def test_scale_is_folded_in_before_aggregating_mixed_ranks():
    """At a fixed alpha a rank-2 client's B·A counts 4x a rank-8 client's (alpha/2 vs alpha/8)."""
    g = torch.Generator().manual_seed(2)
    lo, hi = _client(g, 2), _client(g, 8)  # d = 6 x 5: the mean has rank <= 5 <= 8, so svd is exact
    truth = 0.5 * (ALPHA / 2 * lo[f"{P1}.lora_B.weight"] @ lo[f"{P1}.lora_A.weight"]) \
        + 0.5 * (ALPHA / 8 * hi[f"{P1}.lora_B.weight"] @ hi[f"{P1}.lora_A.weight"])
    glob = svd([lo, hi], [1.0, 1.0], ALPHA, rank=8)
    assert torch.allclose(_dw(glob), truth, atol=1e-10)
    # averaging B_k A_k without the scale and applying the global scale is wrong by a factor
    # r_max / r_min on the rank-2 client
    unscaled = ALPHA / 8 * 0.5 * (lo[f"{P1}.lora_B.weight"] @ lo[f"{P1}.lora_A.weight"] + hi[f"{P1}.lora_B.weight"] @ hi[f"{P1}.lora_A.weight"])
    assert (unscaled - truth).norm() > 0.1 * truth.norm()
    # zero_pad and stack fold the same scale: one rank-2 client alone comes back unchanged
    zp = zero_pad([lo], [1.0], ALPHA, rank=8)
    assert torch.allclose(_dw(zp), _dw(lo), atol=1e-10)
    back = zero_pad_for_client(zp, 2, ALPHA)
    assert all(torch.allclose(back[k], lo[k], atol=1e-12) for k in lo)
    st_ = stack([lo, hi], [1.0, 1.0], ALPHA, rank=8, previous=_zero_like(hi, 8))
    assert torch.allclose(_dw(st_), truth, atol=1e-10)


# --- zero_pad (HetLoRA) -------------------------------------------------------------------------


def test_zero_pad_is_fedit_bit_for_bit_at_equal_ranks():
    g = torch.Generator().manual_seed(3)
    states = [_client(g, 4, dtype=torch.float32) for _ in range(3)]
    w = [1.0, 2.0, 5.0]
    zp, fi = zero_pad(states, w, ALPHA, rank=4), fedit(states, w)
    assert zp.keys() == fi.keys() and all(torch.equal(zp[k], fi[k]) for k in fi)
    mine = zero_pad_for_client(zp, 4, ALPHA)
    assert all(torch.equal(mine[k], fi[k]) for k in fi)


def test_zero_pad_pads_averages_and_truncates_by_hand():
    a2 = {f"{P1}.lora_A.weight": torch.tensor([[1.0, 1.0]]), f"{P1}.lora_B.weight": torch.tensor([[2.0], [0.0]])}
    a4 = {f"{P1}.lora_A.weight": torch.tensor([[3.0, 1.0], [0.0, 2.0]]), f"{P1}.lora_B.weight": torch.tensor([[0.0, 1.0], [4.0, 0.0]])}
    out = zero_pad([a2, a4], [1.0, 1.0], alpha=4.0, rank=2)
    # rank-1 client's B is folded from scale 4/1 to the global 4/2: times 2, then padded
    assert torch.equal(out[f"{P1}.lora_A.weight"], torch.tensor([[2.0, 1.0], [0.0, 1.0]]))
    assert torch.equal(out[f"{P1}.lora_B.weight"], torch.tensor([[2.0, 0.5], [2.0, 0.0]]))
    one = zero_pad_for_client(out, 1, alpha=4.0)  # first component, B back to scale 4/1: halved
    assert torch.equal(one[f"{P1}.lora_A.weight"], torch.tensor([[2.0, 1.0]]))
    assert torch.equal(one[f"{P1}.lora_B.weight"], torch.tensor([[1.0], [1.0]]))


def test_zero_pad_sparsity_weighting_weighs_modules_by_update_norm():
    g = torch.Generator().manual_seed(4)
    live, idle = _client(g, 4), _client(g, 4)
    idle[f"{P1}.lora_B.weight"] = torch.zeros_like(idle[f"{P1}.lora_B.weight"])  # no update on P1
    out = zero_pad([live, idle], [1.0, 1.0], ALPHA, rank=4, sparsity_weighting=True)
    assert torch.allclose(out[f"{P1}.lora_A.weight"], live[f"{P1}.lora_A.weight"])  # idle has weight 0 on P1
    n_live = torch.linalg.matrix_norm(_dw(live, P2))
    n_idle = torch.linalg.matrix_norm(_dw(idle, P2))
    expect = (n_live * live[f"{P2}.lora_A.weight"] + n_idle * idle[f"{P2}.lora_A.weight"]) / (n_live + n_idle)
    assert torch.allclose(out[f"{P2}.lora_A.weight"], expect, atol=1e-10)
    assert torch.allclose(out[H], (live[H] + idle[H]) / 2)  # the head keeps sample weights


def test_hetlora_rank_self_pruning():
    g = torch.Generator().manual_seed(5)
    state = _client(g, 8)
    kept, tail = hetlora_prune(state, ALPHA, gamma=0.75, previous_tail=None)  # first time: only measure
    assert kept is state and tail > 0
    kept, again = hetlora_prune(state, ALPHA, gamma=0.75, previous_tail=tail * 2)  # tail shrank: prune to 6
    assert again is None and lora_rank(kept) == 6
    b, a = state[f"{P1}.lora_B.weight"][:, :6], state[f"{P1}.lora_A.weight"][:6]
    assert torch.allclose(_dw(kept), ALPHA / 8 * b @ a, atol=1e-10)  # kept components' update unchanged
    assert payload_nbytes(kept) < payload_nbytes(state)
    same, _ = hetlora_prune(state, ALPHA, gamma=0.75, previous_tail=tail / 2)  # tail grew: keep the rank
    assert same is state


def test_components_the_global_cannot_fill_restart_from_the_template():
    g = torch.Generator().manual_seed(6)
    lo = _client(g, 2)
    template = _client(g, 8)
    template.update({k: torch.zeros_like(v) for k, v in template.items() if k.endswith("lora_B.weight")})
    glob = zero_pad([lo], [1.0], ALPHA, rank=8)  # components 2..7 are all zero
    mine = zero_pad_for_client(glob, 8, ALPHA, template)
    assert torch.equal(mine[f"{P1}.lora_A.weight"][2:], template[f"{P1}.lora_A.weight"][2:])
    assert torch.allclose(_dw(mine), _dw(lo), atol=1e-10)  # the update is unchanged
    svd_mine = svd_for_client(svd([lo], [1.0], ALPHA, rank=8), 8, ALPHA, template)
    assert torch.equal(svd_mine[f"{P1}.lora_A.weight"][2:], template[f"{P1}.lora_A.weight"][2:])


# --- stack (FLoRA) ------------------------------------------------------------------------------


def _zero_like(state, rank):
    out = dict(state)
    for p in (P1, P2):
        out[f"{p}.lora_A.weight"] = torch.ones(rank, state[f"{p}.lora_A.weight"].shape[1], dtype=state[H].dtype)
        out[f"{p}.lora_B.weight"] = torch.zeros(state[f"{p}.lora_B.weight"].shape[0], rank, dtype=state[H].dtype)
    return out


def test_stack_is_exact_and_accumulates_across_rounds():
    g = torch.Generator().manual_seed(7)
    d_out, d_in = 30, 24
    prev = _client(g, 3, d_out, d_in, torch.float32)
    states = [_client(g, r, d_out, d_in, torch.float32) for r in (2, 4, 8)]
    w = [1.0, 2.0, 1.0]
    out = stack(states, w, ALPHA, rank=8, previous=prev)
    assert lora_rank(out) == 3 + 2 + 4 + 8
    for prefix in (P1, P2):
        assert torch.allclose(_dw(out, prefix), _dw(prev, prefix) + _mean_dw(states, w, prefix), atol=1e-5)
    # the rank stops growing at min(d_out, d_in) and stays exact
    more = [_client(g, r, d_out, d_in, torch.float32) for r in (2, 4, 8)]
    again = stack(more, w, ALPHA, rank=8, previous=out)
    assert lora_rank(again) == 24
    assert torch.allclose(_dw(again), _dw(out) + _mean_dw(more, w), atol=1e-4)


def test_stack_hands_out_fresh_adapters_with_the_global_head():
    g = torch.Generator().manual_seed(8)
    glob = _client(g, 5, 6, 25)
    fresh = stack_for_client(glob, 4, ALPHA, None, seed=11)
    assert torch.equal(fresh[f"{P1}.lora_B.weight"], torch.zeros(6, 4, dtype=torch.float64))
    a = fresh[f"{P1}.lora_A.weight"]
    assert a.shape == (4, 25) and a.abs().max() <= 25**-0.5 and a.std() > 0.05
    assert torch.equal(fresh[H], glob[H])
    assert torch.equal(stack_for_client(glob, 4, ALPHA, None, seed=11)[f"{P1}.lora_A.weight"], a)
    assert not torch.equal(stack_for_client(glob, 4, ALPHA, None, seed=12)[f"{P1}.lora_A.weight"], a)


# --- properties over random shapes, ranks and weights -----------------------------------------


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=4), st.integers(2, 9), st.integers(2, 9), st.integers(0, 2**16))
def test_properties_of_the_mixed_rank_rules(ranks, d_out, d_in, seed):
    g = torch.Generator().manual_seed(seed)
    states = [_client(g, r, d_out, d_in) for r in ranks]
    w = (torch.rand(len(ranks), generator=g, dtype=torch.float64) + 0.1).tolist()
    mean = _mean_dw(states, w)
    big = max(ranks)
    # stack: exact, whatever the ranks
    assert torch.allclose(_dw(stack(states, w, ALPHA, big, previous=_zero_like(states[0], 1))), mean, atol=1e-9)
    # svd: every client gets the Eckart-Young truncation of the mean at its rank
    s_true = torch.linalg.svdvals(mean)
    glob = svd(states, w, ALPHA, big)
    for r in set(ranks):
        mine = svd_for_client(glob, r, ALPHA)
        err = (mean - _dw(mine)).norm() ** 2
        assert torch.allclose(err, (s_true[r:] ** 2).sum(), atol=1e-8 * (1 + float(s_true[0]) ** 2))
    # zero_pad: a client alone gets its own factors back; at equal ranks it is fedit
    back = zero_pad_for_client(zero_pad(states[:1], w[:1], ALPHA, big + 1), ranks[0], ALPHA)
    assert all(torch.allclose(back[k], states[0][k], atol=1e-12) for k in states[0])
    same = [_client(g, ranks[0], d_out, d_in) for _ in ranks]
    zp, fi = zero_pad(same, w, ALPHA, ranks[0]), fedit(same, w)
    assert all(torch.equal(zp[k], fi[k]) for k in fi)


def test_factored_svd_equals_the_naive_svd_up_to_sign():
    g = torch.Generator().manual_seed(9)
    d_out, d_in = 96, 80
    ranks = [2, 4, 8, 2, 4]
    bs = [torch.randn(d_out, r, generator=g) for r in ranks]
    as_ = [torch.randn(r, d_in, generator=g) for r in ranks]
    w = [ALPHA / r / len(ranks) for r in ranks]
    u, s, vh = factored_svd(*stack_factors(bs, as_, w))
    dense = sum(wi * b.double() @ a.double() for wi, b, a in zip(w, bs, as_))
    u_n, s_n, vh_n = torch.linalg.svd(dense, full_matrices=False)
    k = sum(ranks)
    scale = float(s_n[0])
    assert torch.allclose(s[:k] / scale, s_n[:k] / scale, atol=1e-5)
    signs = torch.sign((u[:, :k] * u_n[:, :k]).sum(0))  # singular vectors are unique up to sign
    assert torch.allclose(u[:, :k] * signs, u_n[:, :k], atol=1e-5)
    assert torch.allclose(vh[:k] * signs[:, None], vh_n[:k], atol=1e-5)


# --- rank rules --------------------------------------------------------------------------------


def test_data_size_ranks_give_more_data_higher_ranks():
    assert data_size_ranks([10, 50, 30], [8, 2, 4]) == [2, 8, 4]
    assert data_size_ranks([7, 7, 7, 7], [2, 4, 8]) == [4, 4, 4, 4]  # equal sizes share a rank
    sizes = list(range(100, 120))
    ranks = data_size_ranks(sizes, [2, 4, 8])
    assert ranks == sorted(ranks) and [ranks.count(r) for r in (2, 4, 8)] == [7, 7, 6]


def test_resource_ranks_take_the_compute_tier_capped_by_memory():
    prof = lambda gb, flops=1e12: DeviceProfile(flops=flops, up_mbps=1, down_mbps=1, latency_s=0, memory_gb=gb)  # noqa: E731
    need_at = lambda r: 4e8 + 16_000 * r  # noqa: E731  (bytes at rank r)
    assert resource_ranks([prof(8), prof(8)], [2, 4, 8], need_at) == [8, 8]
    assert resource_ranks([prof(need_at(4) / 1e9), prof(need_at(8) / 1e9)], [2, 4, 8], need_at) == [4, 8]
    # FLOP/s tiers with ample memory: slowest third rank 2, fastest third rank 8, ties share a tier
    fast = [prof(8, f) for f in (4e12, 1e12, 2e12, 1e12)]
    assert resource_ranks(fast[:3], [2, 4, 8], need_at) == [8, 2, 4]
    assert resource_ranks(fast, [2, 4, 8], need_at) == [8, 2, 4, 2]
    # the fastest client with too little memory for rank 8 gets the largest rank that fits
    assert resource_ranks([prof(need_at(4) / 1e9, 4e12), prof(8, 1e12), prof(8, 2e12)], [2, 4, 8], need_at) == [4, 2, 4]
    with pytest.raises(ColoraError, match="memory_gb"):
        resource_ranks([prof(0.1)], [2, 4, 8], need_at)


# --- end to end: fedavg with ranks [2, 4, 8] on tiny-bert --------------------------------------

RANKS = [2, 4, 8]


def _hetero(**over):
    return tiny_config(rounds=2, federation__ranks=RANKS, **over)


def _payload_at(engine, rank):
    return payload_nbytes(engine.adapters.initial_state(rank))


def _zero_adapter(engine, rank):
    """A state at any rank R with the shapes (hence payload size) of a rank-R adapter."""
    init = engine.adapters.initial_state(engine.adapters.default_rank)
    return {k: v.new_zeros(rank, v.shape[1]) if k.endswith("lora_A.weight") else
            v.new_zeros(v.shape[0], rank) if k.endswith("lora_B.weight") else v for k, v in init.items()}


@pytest.mark.parametrize("agg", ["zero_pad", "svd"])
def test_fedavg_mixed_ranks_bytes_follow_each_clients_rank(tmp_path, agg):
    run = run_experiment(_hetero(federation__aggregator=agg), out=str(tmp_path / agg))
    rows = read_rows(run)
    engine = InProcessEngine(_hetero(federation__aggregator=agg))
    sizes = [_payload_at(engine, r) for r in RANKS]
    assert sizes[0] < sizes[1] < sizes[2]
    per_round = sum(sizes)  # every client sends and receives a payload of its own rank
    assert [r["bytes_up"] for r in rows] == [0, per_round, 2 * per_round]
    assert [r["bytes_down"] for r in rows] == [0, per_round, 2 * per_round]
    assert rows[-1]["global_rank"] == 8 and rows[-1]["eval/loss"] != rows[0]["eval/loss"]
    # what each client receives is a state at its own rank
    algo = engine.algorithm
    assert [lora_rank(algo.server.client_state(k, 1)) for k in range(3)] == RANKS


def test_fedavg_stack_merges_and_exports_a_peft_adapter_that_reproduces_the_metrics(tmp_path):
    cfg = _hetero(federation__aggregator="stack")
    run = run_experiment(cfg, out=str(tmp_path / "stack"))
    rows = read_rows(run)
    engine = InProcessEngine(cfg)
    up = sum(_payload_at(engine, r) for r in RANKS)
    assert [r["bytes_up"] for r in rows] == [0, up, 2 * up]
    # down: the merged global (rank 8 at the start, 2 + 4 + 8 = 14 after round 1) to each client
    assert rows[1]["global_rank"] == 14 and rows[2]["global_rank"] == 28
    d1, d2 = 3 * payload_nbytes(_zero_adapter(engine, 8)), 3 * payload_nbytes(_zero_adapter(engine, 14))
    assert [r["bytes_down"] for r in rows] == [0, d1, d1 + d2]
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == 28
    _assert_export_reproduces(engine, run, rows[-1])


def _assert_export_reproduces(engine, run, final):
    cfg = engine.cfg
    base = load_base_model(cfg.model, engine.task.num_labels, load_tokenizer(cfg.model), seed=123)
    loaded = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
    again = evaluate(loaded, engine.eval_data, engine.task, 32)
    assert abs(again["eval/loss"] - final["eval/loss"]) < 1e-5 and again["eval/accuracy"] == final["eval/accuracy"]


def test_hlora_assigns_ranks_by_data_size_and_exports_the_rank_8_global(tmp_path, capsys):
    cfg = tiny_config(rounds=1, federation__aggregator="hlora", clients__partition="dirichlet", clients__num=4, clients__per_round=4)
    run = run_experiment(cfg, out=str(tmp_path / "hlora"))
    part = json.loads((run / "partition.json").read_text())
    assert part["rank_rule"] == "data_size" and part["ranks"] == data_size_ranks(part["sizes"], [2, 4, 8])
    assert len(set(part["ranks"])) > 1
    assert "LoRA ranks (data_size): " in capsys.readouterr().out
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == max(part["ranks"])
    _assert_export_reproduces(InProcessEngine(cfg), run, read_rows(run)[-1])


def test_resume_of_a_mixed_rank_run_equals_the_uninterrupted_run(tmp_path):
    over = dict(rounds=2, clients__num=4, clients__per_round=2, federation__ranks=[2, 4, 8, 4], clients__partition="dirichlet",
                federation__aggregator="stack", train__client_optimizer="keep")
    whole = run_experiment(tiny_config(**over), out=str(tmp_path / "whole"))
    part = run_experiment(tiny_config(**over), out=str(tmp_path / "part"), stop_after=1)
    assert main(["run", "--resume", str(part)]) == 0
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_time_s"} for r in rows]  # noqa: E731
    assert strip(read_rows(part)) == strip(read_rows(whole))


def test_zero_pad_with_hetlora_options_runs_and_resumes(tmp_path):
    over = dict(rounds=2, federation__ranks=RANKS, federation__aggregator="zero_pad", federation__hetlora_sparsity_weighting=True,
                federation__hetlora_prune_gamma=0.5)
    whole = run_experiment(tiny_config(**over), out=str(tmp_path / "whole"))
    part = run_experiment(tiny_config(**over), out=str(tmp_path / "part"), stop_after=1)
    run_experiment(build_config(yaml.safe_load((part / "config.yaml").read_text())), resume=part)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_time_s"} for r in rows]  # noqa: E731
    assert strip(read_rows(part)) == strip(read_rows(whole))
    ckpt = torch.load(whole / "checkpoint" / "state.pt", weights_only=True)["algorithm"]["server"]
    assert all(now <= first for now, first in zip(ckpt["ranks"], RANKS))


@pytest.mark.parametrize(
    "sets, needle",
    [
        (["federation.ranks=[2, 0, 8]"], "every LoRA rank must be > 0"),
        (["federation.ranks=[2, 4, 8]"],
         "federation.aggregator=fedit needs equal LoRA ranks, but the clients' ranks are [2, 4, 8]; use zero_pad, svd or stack"),
        (["federation.ranks=[2, 4, 8]", "federation.aggregator=product"], "federation.aggregator=product needs equal LoRA ranks"),
        (["federation.ranks=[2, 4]"], "federation.ranks has 2 entries but clients.num=3"),
        (["federation.aggregator=hlora", "federation.ranks=[2, 4, 8]"], "hlora assigns ranks by data size"),
        (["federation.hetlora_prune_gamma=0.5"], "federation.hetlora_prune_gamma=0.5 applies to federation.aggregator=zero_pad only"),
        (["federation.aggregator=stack", "model.quantize=int8"], "model.quantize=int8 keeps quantized; use svd"),
    ],
)
def test_bad_rank_settings_exit_2_with_one_line(tmp_path, capsys, sets, needle):
    assert needle in cli_error(tmp_path, capsys, tiny_raw()[0], sets)


def test_every_rule_is_registered_with_its_exactness():
    from colora.aggregation import EXACT

    assert {n for n, rule in RULES.items() if not rule.equal_ranks} == {"zero_pad", "svd", "stack", "hlora", "hafl"}
    assert EXACT == {"fedit": False, "product": True, "zero_pad": False, "svd": True, "stack": True, "hlora": True, "hafl": False,
                     "lora_fair": False}


def test_kept_optimizer_moments_restart_when_a_clients_rank_changes():
    """HetLoRA pruning lowers a client's rank; with train.client_optimizer=keep its old moments must not
    keep stepping the old rank's adapter (in the run or after a resume)."""
    engine = InProcessEngine(_hetero(federation__aggregator="zero_pad", train__client_optimizer="keep"))
    init = {r: engine.adapters.initial_state(r) for r in (8, 4)}
    from colora.types import ClientTask

    run = engine.executor.run_tasks  # through the message boundary, as every engine runs tasks
    (first,) = run([ClientTask(0, init[8], 0, 1, 1e-2, keep_optimizer=True, rank=8)])
    assert first.moments  # AdamW's moments came back with the result, shaped for rank 8
    (res,) = run([ClientTask(0, init[4], 1, 1, 1e-2, keep_optimizer=True, rank=4, moments=first.moments)])
    b_key = next(k for k in res.state if k.endswith("lora_B.weight"))
    assert not torch.equal(res.state[b_key], init[4][b_key])  # the rank-4 adapter trained (B leaves 0)
    (again,) = run([ClientTask(0, init[4], 1, 1, 1e-2, keep_optimizer=True, rank=4)])
    assert all(torch.equal(again.state[k], res.state[k]) for k in res.state)  # fresh moments, as in the run
