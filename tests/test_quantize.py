"""Quantized frozen base (``model.quantize``, colora/quantize.py). Needs the optional ``quant``
extra (bitsandbytes), which `make test` installs: a missing install fails these tests, it does not
skip them."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from colora.config import ColoraError, build_config
from colora.quantize import quantize_base, resident_nbytes

from .conftest import read_rows, tiny_config

HAVE_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.usefixtures("_require_bnb")


@pytest.fixture
def _require_bnb():
    assert HAVE_BNB, "bitsandbytes is missing: pip install 'colora[quant]' (make test installs it)"



def test_missing_bitsandbytes_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ColoraError, match=r"model.quantize needs bitsandbytes.*colora\[quant\]"):
        quantize_base(torch.nn.Sequential(torch.nn.Linear(4, 4)), "int8")
    assert quantize_base(model := torch.nn.Linear(2, 2), "none") is model


@needs_bnb
@pytest.mark.parametrize("mode, layer", [("int8", "Linear8bitLt"), ("4bit", "Linear4bit")])
def test_quantized_base_gets_peft_bitsandbytes_lora_layers_and_trains(tmp_path, mode, layer):
    from colora.engines import InProcessEngine
    from colora.experiment import run_experiment

    over = dict(algorithm="declora", model__quantize=mode, rounds=2, train__local_steps=2, train__lr=0.02,
                data__synthetic_train=90, data__synthetic_eval=32, data__max_length=32, model__lora__modules_to_save=["bert.pooler"])
    engine = InProcessEngine(tiny_config(**over))
    lora_layers = {type(m).__name__ for m in engine.model.modules() if hasattr(m, "lora_A")}
    assert lora_layers == {layer}  # peft's QLoRA layers, not a plain Linear around a quantized weight
    head = engine.model.base_model.model.classifier
    assert head.modules_to_save["default"].weight.dtype == torch.float32  # the head trains in fp32
    pooler = engine.model.base_model.model.bert.pooler.modules_to_save["default"].dense
    assert type(pooler) is torch.nn.Linear and pooler.weight.dtype == torch.float32  # so does a module trained in full
    rows = read_rows(run_experiment(tiny_config(**over), out=str(tmp_path / mode)))
    assert all(math.isfinite(r["eval/loss"]) for r in rows)
    assert abs(rows[-1]["eval/loss"] - rows[0]["eval/loss"]) > 1e-5


@needs_bnb
def test_quantized_resident_base_shrinks():
    from colora.models import load_base_model, load_tokenizer

    sizes = {}
    for mode in ("none", "int8", "4bit"):
        cfg = build_config({"model": {"name": "tiny-llama", "task": "causal-lm", "quantize": mode}})
        model = load_base_model(cfg.model, 1, load_tokenizer(cfg.model))
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not model.lm_head]
        sizes[mode] = (resident_nbytes(model), sum(resident_nbytes(m) for m in linears))
    full, int8, nf4 = sizes["none"], sizes["int8"], sizes["4bit"]
    # int8: one byte per weight plus a 4-byte scale per output row of 32 or 64 entries
    expected = sum(m.out_features * m.in_features + 4 * m.out_features for m in linears)
    assert int8[1] == expected + sum(4 * m.bias.numel() for m in linears if m.bias is not None)
    assert nf4[1] < full[1] / 2 and int8[0] < 0.6 * full[0] and nf4[0] < 0.6 * full[0]
