"""Device presets, per-client heterogeneity, the memory check and TensorBoard logging."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import yaml

import colora.algorithms.fedavg as fedavg_module
import colora.algorithms.splitlora as splitlora_module
from colora.cli import main
from colora.config import ConfigError, DeviceProfile, load_presets
from colora.engines import InProcessEngine
from colora.experiment import run_experiment
from colora.system import ModelShape, activation_bytes, client_profiles, memory_report, training_memory

from .conftest import tiny_config, tiny_raw


def test_preset_fills_profiles_and_explicit_fields_override_it():
    cfg = tiny_config(system__preset="edge-weak", system__client={"memory_gb": 1.5})
    assert cfg.system.client == DeviceProfile(flops=1e10, up_mbps=20, down_mbps=20, latency_s=0.05, memory_gb=1.5)
    assert cfg.system.server.flops == 1e14
    assert set(load_presets()) >= {"edge-weak", "edge-strong", "datacenter"}
    assert load_presets()["edge-strong"]["client"]["flops"] == 1e12


def test_unknown_preset_and_custom_presets_file(tmp_path):
    with pytest.raises(ConfigError, match="system.preset='phone' is not a known preset .*edge-weak"):
        tiny_config(system__preset="phone")
    mine = tmp_path / "devices.yaml"
    profile = {"flops": 5e9, "up_mbps": 1, "down_mbps": 2, "latency_s": 0.3, "memory_gb": 1}
    mine.write_text(yaml.safe_dump({"phone": {"client": profile, "server": profile}}))
    cfg = tiny_config(system__preset="phone", system__presets_file=str(mine))
    assert cfg.system.client == DeviceProfile(**profile)
    with pytest.raises(ConfigError, match="system.presets_file 'nope.yaml' does not exist"):
        tiny_config(system__preset="phone", system__presets_file="nope.yaml")


def test_fixed_heterogeneity_gives_every_client_the_base_profile():
    cfg = tiny_config(clients__num=4, clients__per_round=4)
    assert client_profiles(cfg) == [cfg.system.client] * 4


def test_uniform_heterogeneity_is_seeded_bounded_and_touches_only_its_fields():
    cfg = tiny_config(clients__num=50, clients__per_round=5,
                      system__heterogeneity={"distribution": "uniform", "spread": 0.5, "fields": ["flops", "up_mbps"]})
    profiles = client_profiles(cfg)
    assert profiles == client_profiles(cfg)  # a function of the seed
    base = cfg.system.client
    flops = np.array([p.flops for p in profiles]) / base.flops
    ups = np.array([p.up_mbps for p in profiles]) / base.up_mbps
    assert flops.min() >= 0.5 and flops.max() <= 1.5 and flops.std() > 0.1
    assert not np.allclose(flops, ups)  # compute and link draw independent factors
    assert all(p.down_mbps == base.down_mbps and p.memory_gb == base.memory_gb for p in profiles)
    other = client_profiles(tiny_config(clients__num=50, clients__per_round=5, seed=1, system__heterogeneity={
        "distribution": "uniform", "spread": 0.5, "fields": ["flops", "up_mbps"]}))
    assert other != profiles


def test_lognormal_heterogeneity_keeps_the_base_profile_as_the_mean():
    cfg = tiny_config(clients__num=4000, clients__per_round=4,
                      system__heterogeneity={"distribution": "lognormal", "spread": 0.5, "fields": ["flops"]})
    flops = np.array([p.flops for p in client_profiles(cfg)]) / cfg.system.client.flops
    assert flops.mean() == pytest.approx(1.0, abs=0.03)  # E[exp(N(-s^2/2, s))] = 1
    assert np.log(flops).std() == pytest.approx(0.5, abs=0.03)
    with pytest.raises(ConfigError, match="uniform spread must be below 1"):
        tiny_config(system__heterogeneity={"distribution": "uniform", "spread": 1.0})


def test_training_memory_estimate_on_a_hand_computed_case():
    # one block: 2 * b * s * h * (34 + 5 * a * s / h) = 2 * 2 * 8 * 4 * (34 + 20) = 6912 bytes
    assert activation_bytes(2, 8, 4, 2) == 6912
    shape = ModelShape(base_bytes=1e6, adapter_params=1000, blocks=2, hidden=4, heads=2)
    assert training_memory(shape, batch=2, seq=8) == 1e6 + 16 * 1000 + 2 * 6912
    small = DeviceProfile(flops=1, up_mbps=1, down_mbps=1, latency_s=0, memory_gb=0.001)
    big = small.model_copy(update={"memory_gb": 1})
    report = memory_report([small, big], [1.03e6, 1.03e6])
    assert report["over"] == [0] and report["need_gb"] == pytest.approx([0.00103, 0.00103])


def test_memory_check_warns_enforces_and_split_clients_need_less(tmp_path, capsys):
    fed = InProcessEngine(tiny_config())
    split = InProcessEngine(tiny_config(algorithm="splitlora", split__layer=1))
    assert fed.memory["over"] == [] and len(fed.memory["need_gb"]) == 3
    assert max(split.memory["need_gb"]) < min(fed.memory["need_gb"])  # a split client holds 1 of 2 blocks
    tight = min(fed.memory["need_gb"]) * 0.99
    run_dir = run_experiment(tiny_config(rounds=1, system__client={"memory_gb": tight}), out=str(tmp_path / "warn"))
    assert "3 of 3 clients may not hold their part of the model" in capsys.readouterr().out
    system = json.loads((run_dir / "system.json").read_text())
    assert system["memory"]["over"] == [0, 1, 2] and system["clients"][0]["memory_gb"] == tight
    raw, _ = tiny_raw()
    raw["system"] = {"enforce_memory": True, "client": {"memory_gb": tight}}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(raw))
    assert main(["run", str(tmp_path / "t.yaml"), "--out", str(tmp_path / "enforced")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "system.enforce_memory: 3 of 3 clients cannot hold their part" in err


def _recording(monkeypatch, module, name):
    calls, real = [], getattr(module, name)

    def record(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, record)
    return calls


def test_each_client_is_timed_with_its_own_device(monkeypatch, tmp_path):
    het = {"distribution": "lognormal", "spread": 0.8}
    cfg = tiny_config(rounds=1, clients__num=4, clients__per_round=2, system__heterogeneity=het)
    calls = _recording(monkeypatch, fedavg_module, "fedavg_round_time")
    run_dir = run_experiment(cfg, out=str(tmp_path / "f"))
    devices = [DeviceProfile(**d) for d in json.loads((run_dir / "system.json").read_text())["clients"]]
    assert devices == client_profiles(cfg) and len(set(d.flops for d in devices)) == 4
    sampled = fedavg_module.sample_clients(cfg.seed, 1, 4, 2)
    assert calls[0][3] == [devices[k] for k in sampled]
    cfg = tiny_config(rounds=1, algorithm="splitlora", split__layer=1, clients__num=4, clients__per_round=2, system__heterogeneity=het)
    calls = _recording(monkeypatch, splitlora_module, "split_step_time")
    run_experiment(cfg, out=str(tmp_path / "s"))
    assert all(c[4] == [devices[k] for k in sampled] for c in calls) and len(calls) == cfg.train.local_steps


def _event_scalars(path) -> dict[str, list[tuple[int, float]]]:
    # TFRecord framing: uint64 length, uint32 crc, payload, uint32 crc; payloads are Event protos.
    from tensorboardX.proto.event_pb2 import Event

    data, pos, out = path.read_bytes(), 0, {}
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        event = Event.FromString(data[pos + 12:pos + 12 + length])
        pos += 16 + length
        for value in event.summary.value:
            out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_tensorboard_scalars_mirror_metrics_jsonl(tmp_path):
    run_dir = run_experiment(tiny_config(rounds=2, log__tensorboard=True), out=str(tmp_path / "tb"))
    files = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1
    scalars = _event_scalars(files[0])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [s for s, _ in scalars["eval/accuracy"]] == [r["round"] for r in rows]
    assert [v for _, v in scalars["eval/loss"]] == pytest.approx([r["eval/loss"] for r in rows], rel=1e-6)
    assert [v for _, v in scalars["bytes_up"]] == pytest.approx([r["bytes_up"] for r in rows])


def test_resource_rank_rule_follows_each_clients_own_memory():
    from colora.states import adapter_params_at

    probe = InProcessEngine(tiny_config())
    init = probe.adapters.initial_state(probe.adapters.default_rank)
    need = {r: training_memory(probe._shape(adapter_params_at(init, r)), 8, 48) for r in (2, 4, 8)}
    # memory uniform inside (need at rank 2, need at rank 8): every client fits rank 2, none rank 8
    mid, spread = (need[2] + need[8]) / 2, 0.999 * (need[8] - need[2]) / (need[2] + need[8])
    cfg = tiny_config(clients__num=12, clients__per_round=12, federation__rank_rule="resource",
                      federation__aggregator="svd", federation__rank_set=[2, 4, 8],
                      system__client={"memory_gb": mid / 1e9},
                      system__heterogeneity={"distribution": "uniform", "spread": spread, "fields": ["memory_gb"]})
    engine = InProcessEngine(cfg)
    assert set(engine.ranks) == {2, 4}
    for rank, device in zip(engine.ranks, engine.devices):
        assert need[rank] <= device.memory_gb * 1e9
        assert all(need[r] > device.memory_gb * 1e9 for r in (2, 4, 8) if r > rank)


def test_resource_rank_rule_gives_faster_clients_higher_ranks():
    cfg = tiny_config(clients__num=9, clients__per_round=9, federation__rank_rule="resource",
                      federation__aggregator="svd", federation__rank_set=[2, 4, 8],
                      system__heterogeneity={"distribution": "lognormal", "spread": 0.5, "fields": ["flops"]})
    engine = InProcessEngine(cfg)  # ample memory: ranks follow FLOP/s tertiles
    by_speed = [rank for _, rank in sorted(zip([d.flops for d in engine.devices], engine.ranks))]
    assert by_speed == [2, 2, 2, 4, 4, 4, 8, 8, 8]


def test_resource_rule_for_split_clients_counts_their_part_of_the_model_only():
    from colora.states import adapter_params_at

    over = dict(algorithm="splitlora", split__layer=1)
    probe = InProcessEngine(tiny_config(**over))
    init = probe.adapters.initial_state(probe.adapters.default_rank)
    part_at_8 = training_memory(probe._client_shape(8), 8, 48)
    whole_at_2 = training_memory(probe._shape(adapter_params_at(init, 2)), 8, 48)
    assert part_at_8 < whole_at_2  # a split client could not hold the whole model even at rank 2
    engine = InProcessEngine(tiny_config(**over, federation__rank_rule="resource", federation__aggregator="svd",
                                         federation__rank_set=[2, 4, 8], system__client={"memory_gb": part_at_8 / 1e9}))
    assert engine.ranks == [8] * engine.cfg.clients.num
