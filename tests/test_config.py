"""Config validation and the CLI's exit-2 contract for bad input."""

from __future__ import annotations

import pytest
import yaml

from colora.cli import main
from colora.config import ConfigError, build_config, load_config, parse_override

from .conftest import tiny_raw


def _write(tmp_path, raw) -> str:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_defaults_follow_the_contract():
    cfg = build_config({})
    assert cfg.seed == 0 and cfg.algorithm == "fedavg" and cfg.rounds == 20
    assert cfg.model.lora.r == 8 and cfg.model.lora.alpha == 16
    assert cfg.clients.num == 10 and cfg.clients.per_round == 10 and cfg.clients.alpha == 0.5
    assert cfg.train.local_steps == 10 and cfg.train.batch_size == 16 and cfg.train.lr == 5.0e-4
    assert cfg.federation.aggregator == "fedit" and cfg.federation.rank_set == [2, 4, 8]
    assert cfg.split.layer == 3 and cfg.gossip.topology == "ring" and cfg.eval.every == 1


def test_overrides_are_typed():
    assert parse_override("train.lr=1e-3") == ("train.lr", "1e-3")  # YAML 1.1 keeps this a string...
    cfg = build_config({}, dict([parse_override("train.lr=1e-3"), parse_override("clients.num=20"),
                                 parse_override("federation.ranks=null")]))
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)  # ...which the typed layer parses
    assert cfg.clients.num == 20


@pytest.mark.parametrize(
    "over, needle",
    [
        ({"train.lrr": 1.0}, "unknown config key 'train.lrr'"),
        ({"bogus": 1}, "unknown config key 'bogus'"),
        ({"model.lora.r": 0}, "model.lora.r=0"),
        ({"model.lora.r": -4}, "model.lora.r=-4"),
        ({"clients.num": "many"}, "clients.num='many'"),
        ({"clients.per_round": 20, "clients.num": 10}, "clients.per_round=20 exceeds clients.num=10"),
        ({"algorithm": "fedsgd"}, "algorithm='fedsgd'"),
        ({"federation.ranks": [4, 0, 8], "clients.num": 3, "clients.per_round": 3}, "rank 0"),
        ({"gossip.p": 1.5}, "gossip.p=1.5"),
        ({"data.path": "/nonexistent/glue/MRPC"}, "data.path='/nonexistent/glue/MRPC': no such file or folder"),
    ],
)
def test_bad_values_name_key_and_value(over, needle):
    with pytest.raises(ConfigError) as info:
        build_config({}, over)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["run", "missing.yaml"], "config file 'missing.yaml' does not exist"),
        (["run", "{cfg}", "--set", "train.lr=-1"], "train.lr=-1"),
        (["run", "{cfg}", "--set", "nonsense"], "--set expects KEY=VALUE"),
        (["run", "{cfg}", "--set", "model.lora.r=0"], "model.lora.r=0"),
        (["run", "{cfg}", "--set", "data.name=glue/nope", "--set", "data.path=."], "nope"),
        (["run", "{cfg}", "--set", "model.name=/no/such/model"], "model.name='/no/such/model'"),
        (["run", "{cfg}", "--set", "algorithm=splitlora", "--set", "split.layer=9"], "split.layer=9 is outside [1, 3]"),
        (["run", "--resume", "{tmp}"], "no config.yaml"),
        (["run", "--resume", "{tmp}/nothing"], "no such folder"),
        (["report", "{tmp}/nothing", "--out", "{tmp}/rep"], "nothing"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, args, needle):
    raw, _ = tiny_raw()
    cfg = _write(tmp_path, raw)
    argv = [a.format(cfg=cfg, tmp=tmp_path) for a in args] + ["--out", str(tmp_path / "run")] * (args[0] == "run" and "--resume" not in args)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("colora: error: ") and needle in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_load_config_names_yaml_errors(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("rounds: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_config_name_defaults_to_file_stem(tmp_path):
    path = tmp_path / "mrpc_small.yaml"
    path.write_text("rounds: 2\n")
    assert load_config(path).name == "mrpc_small"


def test_algorithm_and_aggregator_names_come_from_their_registries(monkeypatch):
    """Names are registered once, where they are implemented; the config validates against them."""
    from colora import aggregation, algorithms

    with pytest.raises(ConfigError, match=r"algorithm='gossip2': not a registered name \(registered: central, fedavg"):
        build_config({"algorithm": "gossip2"})
    monkeypatch.setitem(algorithms.ALGORITHMS, "gossip2", algorithms.ALGORITHMS["declora"])
    assert build_config({"algorithm": "gossip2"}).algorithm == "gossip2"
    monkeypatch.setitem(aggregation.RULES, "median", aggregation.RULES["fedit"])
    assert build_config({"federation": {"aggregator": "median"}}).federation.aggregator == "median"
    monkeypatch.delitem(aggregation.RULES, "median")
    with pytest.raises(ConfigError, match="federation.aggregator='median': not a registered name"):
        build_config({"federation": {"aggregator": "median"}})
