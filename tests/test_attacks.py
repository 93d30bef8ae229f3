"""Attacking clients (clients.byzantine): chosen by seed, listed in partition.json, doing exactly what
their attack says; the update screen drops a boosted update."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from colora.algorithms.base import attackers_over_tolerance, sample_clients
from colora.attacks import attackers, noise_generator, tamper
from colora.config import ByzantineConfig, ColoraError, ConfigError
from colora.engines import Engine
from colora.experiment import run_experiment
from colora.types import ClientTask

from .conftest import read_rows, tiny_config

SMALL = dict(data__synthetic_train=72, data__synthetic_eval=32, data__max_length=32, rounds=2, clients__num=5,
             clients__per_round=5, train__local_steps=1)


def test_attackers_are_a_pure_function_of_the_seed():
    assert attackers(0, 10, 0.3) == attackers(0, 10, 0.3) and len(attackers(0, 10, 0.3)) == 3
    assert attackers(0, 10, 0.0) == [] and len(attackers(1, 10, 0.25)) == 2  # round(2.5) = 2
    assert len({tuple(attackers(s, 50, 0.2)) for s in range(5)}) > 1  # other seeds, other attackers


def test_each_attack_sends_what_it_says():
    sent = {"a": torch.ones(3, 4), "b": torch.zeros(4)}
    trained = {"a": torch.full((3, 4), 1.5), "b": torch.full((4,), -0.25)}
    flip = tamper(ByzantineConfig(attack="sign_flip"), trained, sent, noise_generator(0, 1, 2))
    assert torch.equal(flip["a"], torch.full((3, 4), 0.5)) and torch.equal(flip["b"], torch.full((4,), 0.25))
    flip4 = tamper(ByzantineConfig(attack="sign_flip", flip_scale=4.0), trained, sent, noise_generator(0, 1, 2))
    assert torch.equal(flip4["a"], torch.full((3, 4), -1.0)) and torch.equal(flip4["b"], torch.full((4,), 1.0))
    boost = tamper(ByzantineConfig(attack="scaled", scale=4.0), trained, sent, noise_generator(0, 1, 2))
    assert torch.equal(boost["a"], torch.full((3, 4), 3.0)) and torch.equal(boost["b"], torch.full((4,), -1.0))
    noise = [tamper(ByzantineConfig(attack="gaussian", noise_std=2.0), trained, sent, noise_generator(0, 1, 2)) for _ in range(2)]
    assert torch.equal(noise[0]["a"], noise[1]["a"])  # the same draw on a rerun
    assert not torch.equal(noise[0]["a"], tamper(ByzantineConfig(attack="gaussian"), trained, sent, noise_generator(0, 2, 2))["a"])
    assert tamper(ByzantineConfig(attack="label_flip"), trained, sent, noise_generator(0, 1, 2)) is trained


def test_label_flip_trains_on_flipped_labels():
    """An attacker's task equals an honest task on data whose labels are c -> C-1-c."""
    with Engine(tiny_config(**SMALL)) as eng:
        state, classes = eng.algorithm.global_state(), eng.task.num_labels
        (poisoned,) = eng.executor.run_tasks([ClientTask(1, state, 0, 2, 0.05, flip_labels=classes)])
        (honest,) = eng.executor.run_tasks([ClientTask(1, state, 0, 2, 0.05)])
        data = eng.runtime.trainer.data
        data.labels = (classes - 1 - data.labels).astype(np.int64)
        (flipped,) = eng.executor.run_tasks([ClientTask(1, state, 0, 2, 0.05)])
    assert all(torch.equal(poisoned.state[k], flipped.state[k]) for k in state)
    assert any(not torch.equal(poisoned.state[k], honest.state[k]) for k in state)


@pytest.mark.parametrize("algorithm", ["fedavg", "declora"])
def test_a_boosted_update_is_listed_and_dropped(tmp_path, algorithm):
    over = dict(algorithm=algorithm, clients__byzantine={"fraction": 0.2, "attack": "scaled", "scale": 1000.0},
                federation__max_update_norm="auto", **SMALL)
    run = run_experiment(tiny_config(**over), out=str(tmp_path / "run"))
    info = json.loads((run / "partition.json").read_text())
    assert info["byzantine"] == {"attack": "scaled", "clients": attackers(0, 5, 0.2)}
    assert [r["rejected_updates"] for r in read_rows(run)[1:]] == [1, 1]
    clean = run_experiment(tiny_config(**{**over, "clients__byzantine": {"fraction": 0.0}}), out=str(tmp_path / "clean"))
    assert all(r["rejected_updates"] == 0 for r in read_rows(clean)[1:])


def test_an_undefended_sign_flip_moves_the_global_elsewhere(tmp_path):
    rows = {}
    for frac in (0.0, 0.4):
        run = run_experiment(tiny_config(clients__byzantine={"fraction": frac}, **SMALL), out=str(tmp_path / str(frac)))
        rows[frac] = read_rows(run)
    assert rows[0.4][0]["eval/loss"] == rows[0.0][0]["eval/loss"]  # same start
    assert abs(rows[0.4][-1]["eval/loss"] - rows[0.0][-1]["eval/loss"]) > 1e-6
    assert all(r["rejected_updates"] == 0 for r in rows[0.4][1:])  # no bound set: nothing is refused


def test_attacks_outside_fedavg_and_declora_and_label_flip_without_classes_are_refused():
    with pytest.raises(ConfigError, match="attacking clients are simulated for fedavg and declora"):
        tiny_config(algorithm="splitlora", clients__byzantine={"fraction": 0.2})
    with pytest.raises(ColoraError, match="label_flip needs a classification task"):
        Engine(tiny_config(model__name="tiny-gpt2", model__task="causal-lm", clients__byzantine={"fraction": 0.2, "attack": "label_flip"},
                           **SMALL))


def test_rounds_with_more_attackers_than_the_rule_withstands_are_named_before_training(capsys):
    """Sampling is a pure function of (seed, round): the rounds whose sampled attackers outnumber
    Krum's f (or the trimmed mean's cut, or the median's minority) are counted, and said at start."""
    over = dict(rounds=12, clients__num=10, clients__per_round=5, clients__byzantine={"fraction": 0.4})
    bad = attackers(0, 10, 0.4)
    counts = [len(set(bad) & set(sample_clients(0, r, 10, 5))) for r in range(1, 13)]
    for robust, extra, tolerated in [("multi_krum", {"federation__robust_f": 0}, 0), ("krum", {"federation__robust_f": 0}, 0),
                                     ("trimmed_mean", {"federation__trim_fraction": 0.2}, 1), ("median", {}, 2)]:
        cfg = tiny_config(federation__robust=robust, **extra, **over)
        over_rounds = [c for c in counts if c > tolerated]
        note = attackers_over_tolerance(cfg, set(bad))
        if over_rounds:
            assert note == (f"colora: federation.robust={robust} withstands {tolerated} attacker(s) a round of 5; the attackers "
                            f"({', '.join(map(str, bad))}) outnumber that in {len(over_rounds)} of 12 rounds (up to "
                            f"{max(over_rounds)} at once), where their updates can get through")
        else:
            assert note is None
    assert any(c > 1 for c in counts) and any(c > 2 for c in counts)  # the cases above say something
    for robust in ("none", "norm_clip"):  # no count bounds these rules
        assert attackers_over_tolerance(tiny_config(federation__robust=robust, **over), set(bad)) is None
    assert attackers_over_tolerance(tiny_config(federation__robust="median", **over), set()) is None
    with Engine(tiny_config(federation__robust="multi_krum", federation__robust_f=0, **{**over, **SMALL, "clients__num": 10})):
        pass
    assert "federation.robust=multi_krum withstands 0 attacker(s)" in capsys.readouterr().out
