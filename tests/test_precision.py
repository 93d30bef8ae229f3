"""train.precision=bf16: autocast really engages, stays close to fp32, and keeps every state fp32."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from colora.experiment import run_experiment
from colora.models import load_base_model, load_tokenizer
from colora.train import autocast
from tests.conftest import read_rows, tiny_config


def test_autocast_runs_linear_layers_in_bf16_and_leaves_fp32_alone():
    cfg = tiny_config()
    model = load_base_model(cfg.model, 2, load_tokenizer(cfg.model))
    seen = []
    hook = model.classifier.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    ids = torch.randint(5, 100, (2, 8))
    for precision in ("fp32", "bf16"):
        with autocast(precision, model):
            model(input_ids=ids)
    hook.remove()
    assert seen == [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("algorithm,extra", [("fedavg", {}), ("splitlora", {"split__layer": 1})])
def test_bf16_run_tracks_fp32_and_exports_fp32_adapter(tmp_path, algorithm, extra):
    runs = {}
    for precision in ("fp32", "bf16"):
        cfg = tiny_config(algorithm=algorithm, train__precision=precision, **extra)
        runs[precision] = run_experiment(cfg, out=str(tmp_path / precision))
    fp32, bf16 = (read_rows(runs[p]) for p in ("fp32", "bf16"))
    for a, b in zip(fp32, bf16):
        assert abs(a["eval/loss"] - b["eval/loss"]) < 0.05  # bf16 keeps ~3 significant digits
    assert any(a["eval/loss"] != b["eval/loss"] for a, b in zip(fp32, bf16))  # autocast was on
    weights = load_file(str(runs["bf16"] / "adapter" / "adapter_model.safetensors"))
    assert weights and all(t.dtype == torch.float32 for t in weights.values())
