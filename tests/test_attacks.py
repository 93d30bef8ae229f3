"""Attacking clients (clients.byzantine): chosen by seed, listed in partition.json, doing exactly what
their attack says; the update screen drops a boosted update."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

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
