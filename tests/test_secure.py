"""``federation.secure_aggregation`` outside deployment: the simulated secure round is the plain
weighted mean (the reference the SecAgg+ deployment is checked against in tests/test_deploy.py),
and everything that would read one client's update is refused with one line."""

from __future__ import annotations

import pytest

from colora.config import ConfigError
from colora.deploy.partition import split_data
from colora.experiment import run_experiment

from .conftest import read_rows, tiny_config
from .test_deploy_logic import (
    _deploy,
    _owners,
    pki,  # noqa: F401 - the deployment's keys, a fixture
)

RUN = dict(data__synthetic_train=72, data__synthetic_eval=32, data__max_length=32, rounds=2, clients__num=4,
           clients__per_round=3, train__local_steps=2, train__lr=0.05)


@pytest.mark.parametrize("over", [{}, {"federation__weighting": "uniform"},
                                  {"privacy__mode": "local", "privacy__clip": 1.0, "privacy__noise_multiplier": 0.5}])
def test_the_simulated_secure_round_is_the_plain_weighted_mean(tmp_path, over):
    plain = read_rows(run_experiment(tiny_config(**RUN, **over), tmp_path / "plain"))
    secure = read_rows(run_experiment(tiny_config(**RUN, **over, federation__secure_aggregation=True), tmp_path / "secure"))
    keys = ("eval/loss", "train_loss", "bytes_up", "bytes_down", "sim_time_s", "epsilon")
    assert [[r.get(k) for k in keys] for r in secure] == [[r.get(k) for k in keys] for r in plain]


@pytest.mark.parametrize("over,needle", [
    (dict(algorithm="declora"), "algorithm is declora"),
    (dict(federation__aggregator="product"), "federation.aggregator needs each client's own"),
    (dict(federation__robust="median"), "federation.robust needs each client's own"),
    (dict(federation__max_update_norm=1.0), "federation.max_update_norm"),
    (dict(privacy__mode="client", privacy__clip=0.5, privacy__noise_multiplier=0.5), "privacy.mode=client"),
    (dict(clients__byzantine__fraction=0.25), "clients.byzantine"),
    (dict(train__client_optimizer="keep"), "train.client_optimizer=keep"),
    (dict(federation__aggregator="zero_pad", federation__ranks=[2, 4, 8, 4]), "federation.aggregator"),
    (dict(clients__per_round=1), "clients.per_round >= 2"),
])
def test_what_needs_single_updates_is_refused(over, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("(", r"\(")):
        tiny_config(**{**RUN, **over, "federation__secure_aggregation": True})


def test_a_transport_without_secagg_says_so(tmp_path, pki):  # noqa: F811
    cfg = tiny_config(**{**RUN, "clients__num": 3}, federation__secure_aggregation=True)
    split_data(cfg, tmp_path / "data")
    folders = [tmp_path / "data" / f"client_{k}" for k in range(cfg.clients.num)]
    with pytest.raises(Exception, match="runs on Flower's runtime"):
        _deploy(cfg, tmp_path / "data", _owners(cfg, folders, pki=pki), pki, tmp_path / "run")
