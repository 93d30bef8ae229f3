"""splitlora with per-client LoRA ranks on the client side (HLoRA & peers applied to split learning)."""

from __future__ import annotations

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

from colora.algorithms.server import AdapterServer
from colora.cli import main
from colora.engines import InProcessEngine
from colora.experiment import run_experiment
from colora.models import load_base_model, load_tokenizer
from colora.split.types import SplitJob
from colora.states import lora_pairs, lora_rank, payload_nbytes
from colora.train import batch_indices

from .conftest import cli_error, read_rows, tiny_config, tiny_raw

SMALL = dict(algorithm="splitlora", split__layer=2, data__synthetic_train=64, data__synthetic_eval=32, rounds=2)


def _part(state, keys):
    return {k: state[k] for k in keys}


def test_client_runs_its_own_rank_and_the_server_the_global_rank():
    """One split step of a rank-2 client equals a plain forward of a model whose client-side LoRA
    layers have rank 2 and server-side ones rank 8 (peft rank_pattern); dropout off, since the split
    parties draw from their own generators and the plain forward from one."""
    cfg = tiny_config(model__dropout=0.0, clients__num=2, clients__per_round=2, federation__aggregator="svd", federation__ranks=[2, 8], **SMALL)
    engine = InProcessEngine(cfg)
    split, init = engine.split, engine.adapters.initial_state
    client, server = _part(init(2), split.client_keys), _part(init(8), split.server_keys)
    split.begin([0], fresh_optimizers=True)
    res = split.step([SplitJob(0, client, 0, rank=2)], [server], 0.01)
    assert lora_rank(res.client_states[0]) == 2 and lora_rank(res.server_states[0]) == 8
    assert any(not torch.equal(res.client_states[0][k], client[k]) for k in client)  # the rank-2 adapter trained

    prefixes = {p.removeprefix("base_model.model.") for p in lora_pairs(client)}
    base = load_base_model(cfg.model, engine.task.num_labels, load_tokenizer(cfg.model), seed=cfg.seed)
    ref = get_peft_model(base, LoraConfig(r=8, lora_alpha=cfg.model.lora.alpha, target_modules=cfg.model.lora.target_modules,
                                          rank_pattern={p: 2 for p in prefixes}, modules_to_save=["classifier"]))
    set_peft_model_state_dict(ref, {**client, **server})
    batch = engine.runtime.split.data.collate(batch_indices(engine.parts[0], cfg.train.batch_size, 0, cfg.seed, 0))
    ref.train()
    assert abs(float(ref(**batch).loss.detach()) - res.losses[0]) < 1e-6


def test_equal_ranks_through_zero_pad_equal_fedit(tmp_path):
    common = dict(clients__num=3, clients__per_round=2, train__local_steps=2, **SMALL)
    fedit = run_experiment(tiny_config(**common), out=str(tmp_path / "fedit"))
    padded = run_experiment(tiny_config(federation__aggregator="zero_pad", federation__ranks=[8, 8, 8], **common),
                            out=str(tmp_path / "zero_pad"))
    for a, b in zip(read_rows(fedit), read_rows(padded)):
        assert abs(a["eval/loss"] - b["eval/loss"]) < 1e-6


def test_svd_of_mixed_rank_client_sides_is_the_exact_mean_update(tmp_path, monkeypatch):
    seen = []
    aggregate = AdapterServer.aggregate

    def spy(self, states, weights):
        aggregate(self, states, weights)
        seen.append((states, weights, self.state))

    monkeypatch.setattr(AdapterServer, "aggregate", spy)
    cfg = tiny_config(clients__num=3, clients__per_round=3, train__local_steps=2, federation__aggregator="svd",
                      federation__ranks=[2, 4, 2], **{**SMALL, "rounds": 1})
    run_experiment(cfg, out=str(tmp_path / "svd"))
    (states, weights, glob), alpha = seen[-1], cfg.model.lora.alpha
    assert [lora_rank(s) for s in states] == [2, 4, 2] and lora_rank(glob) == 8  # 2 + 4 + 2 <= 8: exact
    total = sum(weights)
    for a, b in lora_pairs(glob).values():
        mean = sum(w / total * (alpha / lora_rank(s)) * s[b].double() @ s[a].double() for s, w in zip(states, weights))
        assert torch.allclose((alpha / 8) * glob[b].double() @ glob[a].double(), mean, atol=1e-6)


def test_adapter_bytes_follow_each_clients_rank(tmp_path):
    cfg = tiny_config(clients__num=2, clients__per_round=2, train__local_steps=1, federation__aggregator="svd",
                      federation__ranks=[2, 8], **{**SMALL, "rounds": 1})
    row = read_rows(run_experiment(cfg, out=str(tmp_path / "r")))[-1]
    engine = InProcessEngine(cfg)
    own = [payload_nbytes(_part(engine.adapters.initial_state(r), engine.split.client_keys)) for r in (2, 8)]
    assert own[0] < own[1]
    summary = yaml.safe_load((tmp_path / "r" / "summary.json").read_text())["split"]
    assert summary["total_adapter_bytes_up"] == sum(own)  # one aggregation, at the round's end
    assert summary["total_adapter_bytes_down"] == sum(own)  # the round's broadcast
    assert row["bytes_up"] == sum(own) + summary["total_activation_bytes_up"]


def test_resume_with_mixed_ranks_equals_uninterrupted(tmp_path):
    over = dict(clients__num=3, clients__per_round=2, train__local_steps=2, train__lr=0.01, train__client_optimizer="keep",
                split__aggregate_every=1, federation__aggregator="hlora", **{**SMALL, "rounds": 3})
    whole = run_experiment(tiny_config(**over), out=str(tmp_path / "whole"))
    part = run_experiment(tiny_config(**over), out=str(tmp_path / "part"), stop_after=1)
    assert main(["run", "--resume", str(part)]) == 0
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_time_s"} for r in rows]  # noqa: E731
    assert strip(read_rows(part)) == strip(read_rows(whole))


@pytest.mark.parametrize("sets,needle", [
    (["federation.aggregator=stack", "federation.ranks=[2, 4, 8]"], "stack is not available for algorithm=splitlora"),
    (["federation.aggregator=svd", "federation.ranks=[2, 4, 16]"], "exceed model.lora.r=8"),
    (["federation.ranks=[2, 4, 8]"], "federation.aggregator=fedit needs every client at model.lora.r=8"),
    (["algorithm=sl", "federation.ranks=[2, 4, 8]"], "algorithm=sl hands one client-side adapter"),
    (["federation.aggregator=zero_pad", "federation.hetlora_prune_gamma=0.9"], "hetlora_prune_gamma"),
])
def test_unsupported_rank_settings_exit_2_with_one_line(tmp_path, capsys, sets, needle):
    raw, _ = tiny_raw()
    raw.update(algorithm="splitlora", rounds=1, split={"layer": 2})
    assert needle in cli_error(tmp_path, capsys, raw, sets)
