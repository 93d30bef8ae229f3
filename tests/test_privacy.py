"""Client-level DP-FedAvg (privacy.mode: client) and record-level DP-SGD (privacy.mode: local):
clipping, the noise's scale, the accountant's epsilon in metrics.jsonl, the budget check before
training, and where no guarantee holds."""

from __future__ import annotations

import math

import dp_accounting
import pytest
import torch
from dp_accounting.rdp import rdp_privacy_accountant

from colora.algorithms.base import sample_clients
from colora.config import ConfigError
from colora.engines import Engine
from colora.experiment import run_experiment
from colora.privacy import _ORDERS, clipped, dp_fedavg, epsilon, noise_generator, per_sample_gradients, private_gradient
from colora.train import to_device
from colora.types import ClientTask
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
    (dict(privacy__mode="local", algorithm="splitlora"), "split learning sends activations"),
    (dict(privacy__mode="local", engine__fuse=2), "fused passes do not compute"),
    (dict(privacy__mode="local", privacy__noise_multiplier=0.0, privacy__target_epsilon=8.0),
     "cannot hold with privacy.noise_multiplier=0"),
])
def test_configs_without_a_guarantee_are_refused(over, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(**SMALL, **{**DP, **over})


# ---------------------------------------------------------------------------------------------
# DP-SGD (privacy.mode: local)
# ---------------------------------------------------------------------------------------------

LOCAL = dict(privacy__mode="local", privacy__clip=0.5, privacy__noise_multiplier=1.0)
RUN = dict(data__synthetic_train=72, data__synthetic_eval=32, data__max_length=32, rounds=2, clients__num=4,
           clients__per_round=3, train__local_steps=2, train__lr=0.05, model__dropout=0.0)


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-gpt2"])
def test_per_sample_gradients_are_each_records_own(model):
    """Opacus's per-sample gradients of the adapter equal a backward of each record alone."""
    cfg = tiny_config(**RUN, model__name=model)
    with Engine(cfg) as engine:
        trainer, slots = engine.runtime.trainer, engine.adapters.activate(None)
        gen = torch.Generator().manual_seed(1)
        slots.load({k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in slots.get().items()})
        batch = to_device(trainer._batch(ClientTask(0, {}, 0, 1, 0.1), 0), engine.model)
        engine.model.train()
        with per_sample_gradients(engine.model):
            engine.model(**batch).loss.backward()
            samples = {k: p.grad_sample.clone() for k, p in slots.params.items()}
        for p in slots.params.values():
            p.grad = None
        for i in range(len(batch["labels"])):
            engine.model(**{k: v[i:i + 1] for k, v in batch.items()}).loss.backward()
            for k, p in slots.params.items():
                torch.testing.assert_close(samples[k][i], p.grad, rtol=0, atol=1e-6)
                p.grad = None


def test_each_record_is_clipped_and_one_record_moves_the_sum_by_at_most_2c():
    """The sensitivity DP-SGD's guarantee rests on, for random per-sample gradients of any size."""
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        rows, clip = 8, 0.3
        scale = 10.0 ** (trial % 5 - 2)  # from well inside the bound to far outside it
        grads = {"a": scale * torch.randn(rows, 4, 3, generator=gen), "b": scale * torch.randn(rows, 5, generator=gen)}
        params = {k: torch.nn.Parameter(torch.zeros(g.shape[1:])) for k, g in grads.items()}
        sums = []
        for variant in range(2):  # the batch, then the batch with record 0 replaced
            g = {k: v.clone() for k, v in grads.items()}
            if variant:
                g = {k: torch.cat([scale * 50 * torch.randn(1, *v.shape[1:], generator=gen), v[1:]]) for k, v in g.items()}
            for k, p in params.items():
                p.grad_sample = g[k]
            private_gradient(params, clip, 0.0, torch.Generator())
            sums.append(torch.cat([p.grad.flatten() * rows for p in params.values()]))
            per_record = torch.sqrt(sum((v.reshape(rows, -1) ** 2).sum(1) for v in g.values()))
            expected = sum(min(1.0, clip / (n + 1e-6)) * torch.cat([v[i].flatten() for v in g.values()])
                           for i, n in enumerate(per_record.tolist()))
            torch.testing.assert_close(sums[-1], expected, rtol=1e-5, atol=1e-7)
        assert float((sums[0] - sums[1]).norm()) <= 2 * clip + 1e-5


def test_dp_sgd_without_noise_or_clipping_is_plain_training(tmp_path):
    """noise 0 and a clip no gradient reaches: the per-sample sum over the batch is the batch gradient,
    and FedProx's pull is added after; the run equals the plain one."""
    for i, extra in enumerate(({}, dict(train__prox_mu=0.1))):
        plain = _losses(tmp_path, f"plain{i}", **RUN, **extra)
        dp = _losses(tmp_path, f"dp{i}", **RUN, **extra, privacy__mode="local", privacy__clip=1e6)
        assert dp == pytest.approx(plain, abs=1e-6)


def _losses(tmp_path, name, **over) -> list[float]:
    run_experiment(tiny_config(**over), tmp_path / name)
    return [r["eval/loss"] for r in read_rows(tmp_path / name)]


@pytest.mark.parametrize("algorithm", ["fedavg", "declora", "central"])
def test_dp_sgd_reports_the_worst_clients_epsilon_from_the_accountant(tmp_path, algorithm):
    cfg = tiny_config(**RUN, **LOCAL, algorithm=algorithm)
    run_experiment(cfg, tmp_path / "run")
    rows = read_rows(tmp_path / "run")
    with Engine(cfg) as engine:
        sizes = engine.algorithm.ctx.client_sizes
    steps = [0] * len(sizes)
    for rnd, row in enumerate(rows[1:], start=1):
        for k in (sample_clients(cfg.seed, rnd, cfg.clients.num, cfg.clients.per_round) if algorithm == "fedavg"
                  else range(len(sizes))):
            steps[k] += cfg.train.local_steps
        worst = 0.0
        for n, s in zip(sizes, steps):
            if s:
                event = dp_accounting.PoissonSampledDpEvent(cfg.train.batch_size / n, dp_accounting.GaussianDpEvent(1.0))
                acc = rdp_privacy_accountant.RdpAccountant(_ORDERS)
                acc.compose(dp_accounting.SelfComposedDpEvent(event, s))
                worst = max(worst, acc.get_epsilon(cfg.privacy.delta))
        assert row["epsilon"] == pytest.approx(worst, rel=1e-9)
    assert rows[-1]["epsilon"] > rows[1]["epsilon"] > 0


def test_dp_sgd_noise_is_the_same_on_every_engine(tmp_path):
    """The noise comes from a generator seeded by (seed, client, step): workers draw what the
    in-process engine draws, and a second run repeats the first."""
    inprocess = _losses(tmp_path, "a", **RUN, **LOCAL)
    assert _losses(tmp_path, "b", **RUN, **LOCAL) == inprocess
    workers = _losses(tmp_path, "c", **RUN, **LOCAL, engine__kind="workers", engine__workers=2)
    assert workers == pytest.approx(inprocess, abs=1e-6)
    assert _losses(tmp_path, "d", **RUN) != pytest.approx(inprocess, abs=1e-3)  # the noise is there


def test_a_dp_sgd_budget_the_run_would_exceed_is_refused(tmp_path, capsys):
    raw, _ = tiny_raw()
    raw.update(rounds=40, privacy={"mode": "local", "noise_multiplier": 0.7, "target_epsilon": 2.0})
    err = cli_error(tmp_path, capsys, raw, [])
    assert "privacy.target_epsilon=2" in err and "DP-SGD steps" in err and "raise privacy.noise_multiplier" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
