"""``model.lora.modules_to_save``: modules trained in full beside LoRA and the head (e.g. a BERT
pooler that the checkpoint ships untrained): they train, travel (counted in bytes), are averaged
like the head, sit with the head on the right side of a split, and a name that matches nothing
exits 2 with one line."""

from __future__ import annotations

import pytest
import torch

from colora.engines import Engine
from colora.states import payload_nbytes

from .conftest import cli_error, spy_rounds, tiny_config, tiny_raw

POOLER = "base_model.model.bert.pooler.dense.weight"
SMALL = dict(data__synthetic_train=72, data__synthetic_eval=32, data__max_length=32, clients__num=4,
             clients__per_round=3, train__local_steps=2, train__lr=0.05, model__lora__modules_to_save=["pooler"])


def test_the_pooler_trains_travels_and_is_averaged():
    cfg = tiny_config(**SMALL, federation__weighting="uniform")
    seen, globals_, metrics, _ = spy_rounds(cfg, 1)
    (tasks, results), = seen
    start = globals_[0]
    assert {"base_model.model.bert.pooler.dense.bias", POOLER} <= set(start)
    for task, result in zip(tasks, results):
        assert torch.equal(task.state[POOLER], start[POOLER])  # clients start from the global pooler
        assert (result.state[POOLER] - start[POOLER]).abs().max() > 1e-4  # and train it
    mean = torch.stack([r.state[POOLER] for r in results]).mean(0)
    torch.testing.assert_close(globals_[1][POOLER], mean, rtol=0, atol=1e-6)
    # every upload carries the pooler: bytes are the real payloads
    assert metrics[0].bytes_up == sum(payload_nbytes(r.state) for r in results)


def test_the_pooler_is_frozen_without_the_setting():
    with Engine(tiny_config(**{**SMALL, "model__lora__modules_to_save": []})) as engine:
        assert not any("pooler" in k for k in engine.adapters.initial_state(8))


@pytest.mark.parametrize("u_shaped", [False, True])
def test_the_pooler_goes_with_the_head_in_a_split(u_shaped):
    cfg = tiny_config(**SMALL, algorithm="sl", split__layer=1, split__u_shaped=u_shaped)
    with Engine(cfg) as engine:
        client, server = set(engine.split.client_keys), set(engine.split.server_keys)
    side = client if u_shaped else server
    assert {POOLER, "base_model.model.classifier.weight"} <= side
    assert POOLER not in (server if u_shaped else client)


def test_a_module_the_model_lacks_exits_2(tmp_path, capsys):
    raw, _ = tiny_raw()
    err = cli_error(tmp_path, capsys, raw, ["model.lora.modules_to_save=[poolr]"])
    assert "model.lora.modules_to_save" in err and "'poolr'" in err


def test_lora_on_the_pooler_is_the_cheap_alternative():
    """``pooler.dense`` in target_modules (peft matches the name's suffix): the pooler gets a LoRA
    pair that trains and travels like every other, and nothing of it in full."""
    cfg = tiny_config(**{**SMALL, "model__lora__modules_to_save": [],
                         "model__lora__target_modules": ["query", "value", "pooler.dense"]})
    seen, globals_, _, _ = spy_rounds(cfg, 1)
    keys = sorted(k for k in globals_[0] if "pooler" in k)
    assert keys == ["base_model.model.bert.pooler.dense.lora_A.weight", "base_model.model.bert.pooler.dense.lora_B.weight"]
    assert globals_[1][keys[1]].abs().max() > 1e-4  # B left its zero init
