"""Robust aggregation (federation.robust) on ΔW = (alpha/r)·B·A: exact factored distances, the
coordinate-wise rules against dense references, and runs that survive boosted attackers."""

from __future__ import annotations

import math

import pytest
import torch

from colora.aggregation.robust import ROBUST
from colora.aggregation.robust.common import gram_distances
from colora.config import ConfigError, FederationConfig
from colora.experiment import run_experiment
from colora.validation import update_norm

from .conftest import read_rows, tiny_config

ALPHA = 16.0
SMALL = dict(data__synthetic_train=72, data__synthetic_eval=32, data__max_length=32, rounds=3, clients__num=5,
             clients__per_round=5, train__local_steps=2, train__lr=0.05, train__optimizer="sgd")


def _client(rank: int, seed: int, d_out: int = 12, d_in: int = 10, shift: float = 0.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"m.lora_A.weight": torch.randn(rank, d_in, generator=g) + shift, "m.lora_B.weight": torch.randn(d_out, rank, generator=g),
            "head.weight": torch.randn(2, d_in, generator=g) + shift}


def _dense(state) -> torch.Tensor:
    r = state["m.lora_A.weight"].shape[0]
    return (ALPHA / r) * state["m.lora_B.weight"].double() @ state["m.lora_A.weight"].double()


def test_factored_distances_equal_dense_ones_across_ranks():
    states = [_client(r, s) for s, r in enumerate((2, 4, 8, 4))]
    got = gram_distances(states, ALPHA)
    for i in range(4):
        for j in range(4):
            want = ((_dense(states[i]) - _dense(states[j])) ** 2).sum() + \
                ((states[i]["head.weight"].double() - states[j]["head.weight"].double()) ** 2).sum()
            assert float(got[i, j]) == pytest.approx(float(want), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("name,stat", [("median", lambda x: torch.quantile(x, 0.5, dim=0)),
                                       ("trimmed_mean", lambda x: x.sort(dim=0).values[1:4].mean(dim=0))])
def test_coordinatewise_rules_equal_their_dense_reference(name, stat):
    states = [_client(r, s) for s, r in enumerate((2, 4, 8, 4, 8))]
    fed = FederationConfig(trim_fraction=0.2)  # 5 clients: floor(1.0) = 1 dropped at each end
    (out,), weights = ROBUST[name](states, [1.0] * 5, ALPHA, 8, fed, sents=None)
    assert weights == [1.0] and out["m.lora_A.weight"].shape == (8, 10) and out["m.lora_B.weight"].shape == (12, 8)
    want = stat(torch.stack([_dense(s) for s in states]))
    u, s, vh = torch.linalg.svd(want, full_matrices=False)
    best = (u[:, :8] * s[:8]) @ vh[:8]  # rank 8 < 10: the best rank-8 approximation (Eckart-Young)
    assert torch.allclose(_dense(out), best, atol=1e-5)
    assert torch.allclose(out["head.weight"].double(), stat(torch.stack([s["head.weight"].double() for s in states])), atol=1e-6)


@pytest.mark.parametrize("name", ["median", "trimmed_mean", "krum", "multi_krum"])
def test_a_change_of_basis_of_the_factors_changes_nothing(name):
    """B A = (B M)(M^-1 A): rotating and rescaling each client's factors leaves every rule's ΔW alone."""
    states = [_client(4, s) for s in range(5)]
    g = torch.Generator().manual_seed(7)
    turned = []
    for st in states:
        m = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))[0] @ torch.diag(
            torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64))
        turned.append({**st, "m.lora_B.weight": (st["m.lora_B.weight"].double() @ m).float(),
                       "m.lora_A.weight": (torch.linalg.inv(m) @ st["m.lora_A.weight"].double()).float()})
    fed = FederationConfig(trim_fraction=0.2, robust_f=1)
    plain, _ = ROBUST[name](states, [1.0] * 5, ALPHA, 4, fed)
    rotated, _ = ROBUST[name](turned, [1.0] * 5, ALPHA, 4, fed)
    assert len(plain) == len(rotated)
    for a, b in zip(plain, rotated):
        assert torch.allclose(_dense(a), _dense(b), atol=1e-4)


def test_krum_and_multi_krum_leave_the_outlier_out():
    states = [_client(4, 0, shift=0.01 * k) for k in range(4)] + [_client(4, 9, shift=50.0)]
    for k in range(4):  # four honest clients close together
        states[k] = {key: states[0][key] + 0.01 * k for key in states[0]}
    fed = FederationConfig(robust_f=1)
    kept, w = ROBUST["krum"](states, [1.0, 2.0, 3.0, 4.0, 5.0], ALPHA, 4, fed)
    assert len(kept) == 1 and kept[0] is not states[4]
    kept, w = ROBUST["multi_krum"](states, [1.0, 2.0, 3.0, 4.0, 5.0], ALPHA, 4, fed)
    assert kept == states[:4] and w == [1.0, 2.0, 3.0, 4.0]


def test_norm_clip_bounds_each_update_and_keeps_small_ones():
    sent = _client(4, 0)
    states = [{k: v + 0.1 * (i + 1) for k, v in sent.items()} for i in range(4)]
    norms = [update_norm(s, sent) for s in states]
    out, _ = ROBUST["norm_clip"](states, [1.0] * 4, ALPHA, 4, FederationConfig(robust_clip=norms[1]), sents=[sent] * 4)
    assert out[0] is states[0] and out[1] is states[1]
    assert [update_norm(s, sent) for s in out[2:]] == pytest.approx([norms[1]] * 2)
    auto, _ = ROBUST["norm_clip"](states, [1.0] * 4, ALPHA, 4, FederationConfig(), sents=[sent] * 4)
    assert max(update_norm(s, sent) for s in auto) == pytest.approx(float(torch.tensor(norms).median()), rel=0.26)


def _exported(run) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _distance(a: dict, b: dict) -> float:
    """Distance between the functions two adapters add (ΔW per module and the head): their factors
    may differ by a change of basis (median re-factors), so factor distances would mean nothing."""
    return math.sqrt(float(gram_distances([a, b], tiny_config().model.lora.alpha)[0, 1]))


@pytest.mark.parametrize("robust", ["median", "trimmed_mean", "krum", "multi_krum", "norm_clip"])
def test_a_boosted_attacker_does_not_take_the_model(tmp_path, robust):
    """One of five clients sends 50x its update. Undefended, the global adapter lands far from the
    clean run's; each robust rule keeps it within a small share of that distance (after 3 rounds)."""
    attack = {"fraction": 0.2, "attack": "scaled", "scale": 50.0}
    adapters, last = {}, {}
    for name, over in (("clean", {}), ("attacked", {"clients__byzantine": attack}),
                       ("defended", {"clients__byzantine": attack, "federation__robust": robust, "federation__trim_fraction": 0.2})):
        run = run_experiment(tiny_config(**SMALL, **over), out=str(tmp_path / name))
        adapters[name], last[name] = _exported(run), read_rows(run)[-1]["eval/loss"]
    assert all(math.isfinite(v) for v in last.values())
    harm = _distance(adapters["attacked"], adapters["clean"])
    assert harm > 0.1
    assert _distance(adapters["defended"], adapters["clean"]) < 0.25 * harm


@pytest.mark.parametrize("robust", ["median", "multi_krum"])
def test_dec_lora_nodes_combine_their_neighbours_robustly(tmp_path, robust):
    """Complete graph of five nodes, one boosting its update 50x: each node's robust combination of
    its neighbourhood keeps the network far closer to the clean run than plain mixing does."""
    common = dict(SMALL, algorithm="declora", gossip__topology="complete")
    attack = {"fraction": 0.2, "attack": "scaled", "scale": 50.0}
    adapters = {}
    for name, over in (("clean", {}), ("attacked", {"clients__byzantine": attack}),
                       ("defended", {"clients__byzantine": attack, "federation__robust": robust})):
        adapters[name] = _exported(run_experiment(tiny_config(**common, **over), out=str(tmp_path / name)))
    harm = _distance(adapters["attacked"], adapters["clean"])
    assert harm > 0.1 and _distance(adapters["defended"], adapters["clean"]) < 0.25 * harm


def test_krum_on_a_ring_is_refused_before_it_mixes():
    from colora.config import ColoraError
    from colora.engines import Engine

    with pytest.raises(ColoraError, match="neighbourhood .* above 4; node 0 has 3"):
        Engine(tiny_config(**SMALL, algorithm="declora", gossip__topology="ring", federation__robust="krum"))


def test_median_with_mixed_ranks_runs(tmp_path):
    run = run_experiment(tiny_config(**SMALL, federation__aggregator="svd", federation__ranks=[2, 4, 8, 4, 8],
                                     federation__robust="median"), out=str(tmp_path / "run"))
    rows = read_rows(run)
    assert rows[-1]["global_rank"] == 8 and math.isfinite(rows[-1]["eval/loss"])


@pytest.mark.parametrize("over,message", [
    (dict(algorithm="splitlora", federation__robust="median"), "robust aggregation runs in fedavg's server"),
    (dict(algorithm="declora", federation__robust="median", gossip__quantize_bits=8), "turn compression off"),
    (dict(federation__robust="median", federation__aggregator="stack", federation__ranks=[4, 8, 8, 8, 8]), "use svd or zero_pad"),
    (dict(federation__robust="trimmed_mean", federation__trim_fraction=0.5), "trim_fraction"),
    (dict(federation__robust="krum", federation__robust_f=2, clients__num=6, clients__per_round=6), r"more than 2 x robust_f \+ 2 = 6"),
])
def test_robust_settings_that_cannot_work_are_refused(over, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(**over)
