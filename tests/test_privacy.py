"""Client-level DP-FedAvg (privacy.mode: client): clipping, the noise's scale, the accountant's epsilon
in metrics.jsonl, the budget check before training, and where no guarantee holds."""

from __future__ import annotations

import math

import dp_accounting
import pytest
import torch
from dp_accounting.rdp import rdp_privacy_accountant

from colora.config import ConfigError
from colora.experiment import run_experiment
from colora.privacy import _ORDERS, clipped, dp_fedavg, epsilon, noise_generator
from colora.validation import update_norm

from .conftest import cli_error, read_rows, tiny_config, tiny_raw

SMALL = dict(data__synthetic_train=72, data__synthetic_eval=32, data__max_length=32, rounds=3, clients__num=6,
             clients__per_round=3, train__local_steps=1)
DP = dict(privacy__mode="client", privacy__clip=0.5, privacy__noise_multiplier=1.1)


def test_updates_are_clipped_to_the_bound_and_small_ones_kept():
    sent = {"a": torch.zeros(10), "b": torch.ones(3, 3)}
    big = {"a": torch.full((10,), 3.0), "b": torch.ones(3, 3)}
    u = clipped(big, sent, 0.5)
    assert math.sqrt(sum(float((v ** 2).sum()) for v in u.values())) == pytest.approx(0.5)
    small = {"a": torch.full((10,), 0.01), "b": torch.ones(3, 3)}
    assert torch.allclose(clipped(small, sent, 0.5)["a"], torch.full((10,), 0.01, dtype=torch.float64))


def test_noise_has_std_multiplier_times_clip_over_the_denominator():
    n = 200_000
    glob = {"w": torch.zeros(n)}
    states = [{"w": torch.full((n,), 1e-4)} for _ in range(4)]  # norms 0.0447 < clip: kept as they are
    out = dp_fedavg(states, glob, clip=2.0, noise_multiplier=1.5, denominator=8, gen=noise_generator(0, 1))
    resid = (out["w"].double() - 4 * 1e-4 / 8) * 8  # the noise, times the denominator
    assert float(resid.mean()) == pytest.approx(0.0, abs=0.03)
    assert float(resid.std()) == pytest.approx(1.5 * 2.0, rel=0.01)
    again = dp_fedavg(states, glob, clip=2.0, noise_multiplier=1.5, denominator=8, gen=noise_generator(0, 1))
    assert torch.equal(out["w"], again["w"])  # the noise is a function of (seed, round)


def test_epsilon_is_the_rdp_accountants():
    cfg = tiny_config(**SMALL, **DP)
    ref = rdp_privacy_accountant.RdpAccountant(_ORDERS)
    ref.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(1.1)), 3))
    assert epsilon(cfg, 3) == pytest.approx(ref.get_epsilon(1e-5))
    assert epsilon(cfg, 1) < epsilon(cfg, 2) < epsilon(cfg, 3)
    louder = tiny_config(**SMALL, **{**DP, "privacy__noise_multiplier": 3.0})
    assert epsilon(louder, 3) < epsilon(cfg, 3)


def test_a_private_run_reports_epsilon_every_round_and_is_reproducible(tmp_path):
    runs = [read_rows(run_experiment(tiny_config(**SMALL, **DP), out=str(tmp_path / str(i)))) for i in range(2)]
    cfg = tiny_config(**SMALL, **DP)
    assert [r["epsilon"] for r in runs[0][1:]] == pytest.approx([epsilon(cfg, k) for k in (1, 2, 3)])
    assert [r["eval/loss"] for r in runs[0]] == [r["eval/loss"] for r in runs[1]]
    plain = read_rows(run_experiment(tiny_config(**SMALL), out=str(tmp_path / "plain")))
    assert "epsilon" not in plain[-1] and plain[-1]["eval/loss"] != runs[0][-1]["eval/loss"]


def test_without_noise_or_clipping_it_is_plain_fedavg(tmp_path):
    """noise_multiplier 0 and a clip no update reaches: the mean of the updates, i.e. fedavg with
    uniform weights (to float rounding: the update is summed in another order)."""
    plain = read_rows(run_experiment(tiny_config(**SMALL, federation__weighting="uniform"), out=str(tmp_path / "plain")))
    dp = read_rows(run_experiment(tiny_config(**SMALL, federation__weighting="uniform", privacy__mode="client",
                                              privacy__clip=1e9, privacy__noise_multiplier=0.0), out=str(tmp_path / "dp")))
    assert max(abs(a["eval/loss"] - b["eval/loss"]) for a, b in zip(plain, dp)) < 1e-6
    assert [r["epsilon"] for r in dp[1:]] == [None] * 3  # no noise, no guarantee


def test_the_global_moves_by_at_most_the_clip_plus_noise_per_round():
    """Without noise, DP-FedAvg's global moves by at most clip * sampled / denominator = clip."""
    from colora.engines import Engine

    with Engine(tiny_config(**SMALL, **{**DP, "privacy__noise_multiplier": 1e-12, "train__lr": 5.0})) as eng:
        before = eng.algorithm.global_state()
        eng.algorithm.run_round(1)
        assert update_norm(eng.algorithm.global_state(), before) <= 0.5 + 1e-6


def test_a_budget_the_rounds_would_exceed_is_refused_before_training(tmp_path, capsys):
    raw, _ = tiny_raw()
    raw.update(rounds=50, clients={"num": 6, "per_round": 6}, privacy={"mode": "client", "noise_multiplier": 0.8,
                                                                       "target_epsilon": 1.0})
    err = cli_error(tmp_path, capsys, raw, [])
    assert "privacy.target_epsilon=1" in err and "raise privacy.noise_multiplier" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("over,message", [
    (dict(algorithm="splitlora"), "split learning sends activations"),
    (dict(algorithm="declora"), "gossip mixes un-noised node states"),
    (dict(algorithm="central"), "one pooled data set"),
    (dict(federation__aggregator="svd", federation__ranks=[4, 8, 8, 8, 8, 8]), "needs federation.aggregator=fedit"),
    (dict(privacy__noise_multiplier=0.0, privacy__target_epsilon=8.0), "cannot hold with privacy.noise_multiplier=0"),
    (dict(privacy__mode="local"), "not available yet"),
])
def test_configs_without_a_guarantee_are_refused(over, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(**SMALL, **{**DP, **over})
