"""``declora`` end to end on tiny models: the FedAvg identity, resume, bad input, label_skew."""

from __future__ import annotations

import json

import numpy as np
import pytest

from colora.cli import main
from colora.config import ConfigError, build_config
from colora.data import DataError, label_histogram, partition
from colora.experiment import run_experiment

from .conftest import cli_error, read_rows, tiny_config, tiny_raw

SMALL = dict(data__synthetic_train=90, data__synthetic_eval=32, data__max_length=32)



def test_declora_complete_uniform_sgd_equals_fedavg_uniform(tmp_path):
    common = dict(clients__num=3, clients__per_round=3, train__optimizer="sgd", train__lr=0.05, rounds=2,
                  train__local_steps=2, **SMALL)
    dec = run_experiment(tiny_config(algorithm="declora", gossip__topology="complete", gossip__mixing="uniform", **common),
                         out=str(tmp_path / "dec"))
    fed = run_experiment(tiny_config(algorithm="fedavg", federation__weighting="uniform", **common), out=str(tmp_path / "fed"))
    a, b = read_rows(dec), read_rows(fed)
    assert abs(a[-1]["eval/loss"] - b[-1]["eval/loss"]) < 1e-6
    assert abs(a[-1]["eval/loss"] - a[0]["eval/loss"]) > 1e-4  # training moved the adapter
    assert a[-1]["consensus_distance"] < 1e-12  # one uniform mixing step: everyone agrees
    # every node sends its adapter to 2 neighbours, a FedAvg client uploads once: 2x the traffic
    assert a[-1]["bytes_up"] == a[-1]["bytes_down"] == 2 * b[-1]["bytes_up"]


def test_resume_of_compressed_time_varying_declora_equals_an_uninterrupted_run(tmp_path):
    over = dict(algorithm="declora", rounds=3, clients__num=4, clients__per_round=4, clients__partition="dirichlet",
                gossip__topology="ring", gossip__time_varying=True, gossip__quantize_bits=4, gossip__gamma=0.8,
                gossip__eval_clients=True, train__local_steps=1, train__client_optimizer="keep", **SMALL)
    whole = run_experiment(tiny_config(**over), out=str(tmp_path / "whole"))
    part = run_experiment(tiny_config(**over), out=str(tmp_path / "part"), stop_after=1)
    assert main(["run", "--resume", str(part)]) == 0
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_time_s"} for r in rows]  # noqa: E731
    rows = read_rows(whole)
    assert strip(read_rows(part)) == strip(rows)
    assert rows[-1]["consensus_distance"] > 0 and "eval_clients/min_accuracy" in rows[-1]
    assert rows[-1]["eval_clients/min_loss"] <= rows[-1]["eval_clients/mean_loss"] <= rows[-1]["eval_clients/max_loss"]
    summary = json.loads((part / "summary.json").read_text())
    assert summary["algorithm"] == "declora" and summary["bytes_up"] == rows[-1]["bytes_up"] > 0
    assert (part / "adapter" / "adapter_model.safetensors").is_file()


def _cli(tmp_path, capsys, sets: list[str]) -> str:
    raw, _ = tiny_raw()
    raw["algorithm"] = "declora"
    raw["data"].update(synthetic_train=60, synthetic_eval=16, max_length=32)
    return cli_error(tmp_path, capsys, raw, sets)


def test_bad_gossip_input_exits_2_with_a_one_line_message(tmp_path, capsys):
    split = tmp_path / "split.txt"
    split.write_text("0 1\n")  # node 2 of 3 is cut off
    err = _cli(tmp_path, capsys, [f"gossip.topology={split}"])
    assert "disconnected" in err and "add edges to the edge-list file" in err
    err = _cli(tmp_path, capsys, ["gossip.topology=hypercube"])
    assert "gossip.topology='hypercube'" in err and "ring, complete, erdos_renyi, torus" in err
    unknown = tmp_path / "unknown.txt"
    unknown.write_text("0 1\n1 2\n2 7\n")
    err = _cli(tmp_path, capsys, [f"gossip.topology={unknown}"])
    assert "line 3: unknown node 7" in err
    assert "gossip.p=1.5" in _cli(tmp_path, capsys, ["gossip.p=1.5"])
    assert "needs a complete graph" in _cli(tmp_path, capsys, ["gossip.mixing=uniform", "clients.num=4"])


def test_label_skew_gives_each_client_its_exact_class_proportions():
    labels = np.array([0, 1] * 300)  # balanced: each client's mix equals its row
    rows = [[0.15, 0.85], [0.85, 0.15], [0.5, 0.5]]
    parts = partition(labels, 3, "label_skew", proportions=rows, seed=4, num_labels=2)
    assert label_histogram(labels, parts, 2).tolist() == [[30, 170], [170, 30], [100, 100]]
    assert sorted(np.concatenate(parts).tolist()) == list(range(600))
    again = partition(labels, 3, "label_skew", proportions=rows, seed=4, num_labels=2)
    assert all((a == b).all() for a, b in zip(parts, again))
    # unbalanced classes: each class is still split by its normalised column, exact to one example
    skewed = np.array([0] * 101 + [1] * 40 + [2] * 9)
    parts = partition(skewed, 2, "label_skew", proportions=[[0.5, 0.25, 0.25], [0.25, 0.25, 0.5]], num_labels=3)
    assert label_histogram(skewed, parts, 3).tolist() == [[67, 20, 3], [34, 20, 6]]
    with pytest.raises(DataError, match="3 classes; give one proportion per class"):
        partition(skewed, 2, "label_skew", proportions=[[0.5, 0.5], [0.5, 0.5]], num_labels=3)


@pytest.mark.parametrize("over, needle", [
    ({"clients.partition": "label_skew"}, "needs clients.proportions"),
    ({"clients.partition": "label_skew", "clients.num": 2, "clients.per_round": 2,
      "clients.proportions": [[0.5, 0.5]]}, "has 1 rows but clients.num=2"),
    ({"clients.partition": "label_skew", "clients.num": 2, "clients.per_round": 2,
      "clients.proportions": [[0.5, 0.6], [0.5, 0.5]]}, "row 0=[0.5, 0.6]: entries must be >= 0 and sum to 1"),
])
def test_label_skew_config_is_validated(over, needle):
    with pytest.raises(ConfigError) as info:
        build_config({}, over)
    assert needle in str(info.value) and "\n" not in str(info.value)
