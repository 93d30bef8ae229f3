"""Split learning (sl, splitlora): exact identities, real bytes on the wire, bad input, resume, export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import save as safetensors_save

from colora.cli import main
from colora.codecs import decode_tensor, encode_tensor
from colora.config import DeviceProfile
from colora.costmodel import adapter_sync_time, sequential_split_time, split_step_time
from colora.engines import InProcessEngine
from colora.experiment import run_experiment
from colora.models import byte_tokenizer, load_base_model, load_tokenizer
from colora.split.types import SplitJob
from colora.states import payload_nbytes
from colora.train import batch_indices, evaluate

from .conftest import read_rows, tiny_config, tiny_raw

SMALL = dict(data__synthetic_train=64, data__synthetic_eval=32, rounds=2)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models on a shared 2-core machine: one intra-op thread avoids oversubscription.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _final_loss(run_dir) -> float:
    return read_rows(run_dir)[-1]["eval/loss"]


def _e2e(e2e_dir) -> dict:
    return dict(model__task="causal-lm", data__name="e2e", data__path=str(e2e_dir), data__max_train=48,
                data__max_eval=16, data__max_length=64, rounds=2)


# (algorithm, split layer, u_shaped, optimizer overrides) checked against central for every model.
CASES = [("splitlora", 1, False, {}), ("splitlora", 3, True, {}), ("sl", 2, False, {}), ("sl", 2, True, {}),
         ("splitlora", 2, False, {"train__optimizer": "adamw", "train__lr": 0.01, "train__client_optimizer": "keep"})]


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-gpt2", "tiny-llama"])
def test_one_client_sl_and_splitlora_equal_central(tmp_path, model):
    # Client and server parts draw dropout from their own generators, a whole-model pass from one:
    # the runs are equal step for step with the base model's dropout off (model.dropout=0).
    common = dict(model__name=model, model__dropout=0.0, clients__num=1, clients__per_round=1, train__optimizer="sgd", train__lr=0.05, **SMALL)
    cen = run_experiment(tiny_config(algorithm="central", **common), out=str(tmp_path / "central"))
    ref = _final_loss(cen)
    assert abs(ref - read_rows(cen)[0]["eval/loss"]) > 1e-4  # training moved the model
    for algo, layer, u, opt in CASES:
        if opt:  # AdamW: central keeps its moments; splitlora must too (client_optimizer=keep)
            cen_opt = run_experiment(tiny_config(algorithm="central", **{**common, **opt}), out=str(tmp_path / "central-adamw"))
            ref_opt = _final_loss(cen_opt)
        run = run_experiment(tiny_config(algorithm=algo, split__layer=layer, split__u_shaped=u, **{**common, **opt}),
                             out=str(tmp_path / f"{algo}-{layer}-{u}-{bool(opt)}"))
        assert abs(_final_loss(run) - (ref_opt if opt else ref)) < 1e-6, (algo, layer, u, opt)
        assert read_rows(run)[-1]["bytes_up"] > 0


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
def test_one_client_causal_lm_equals_central(tmp_path, e2e_dir, model):
    common = dict(model__name=model, model__dropout=0.0, clients__num=1, clients__per_round=1, train__optimizer="sgd",
                  train__lr=0.5, **_e2e(e2e_dir))
    ref = _final_loss(run_experiment(tiny_config(algorithm="central", **common), out=str(tmp_path / "central")))
    for algo, layer, u in (("splitlora", 2, True), ("sl", 1, False)):
        run = run_experiment(tiny_config(algorithm=algo, split__layer=layer, split__u_shaped=u, **common), out=str(tmp_path / algo))
        assert abs(_final_loss(run) - ref) < 1e-6, (algo, layer, u)


@pytest.mark.parametrize("optimizer", [{"train__optimizer": "sgd", "train__lr": 0.05},
                                       {"train__optimizer": "adamw", "train__lr": 0.01}])
def test_per_client_servers_equal_fedavg(tmp_path, optimizer):
    """SplitFed-V1 with averaging once per round is FedAvg in parameter space (with sampling). Dropout
    off: split parties draw from their own generators, a whole-model pass from one."""
    common = dict(model__dropout=0.0, clients__num=3, clients__per_round=2, train__local_steps=2, **optimizer, **SMALL)
    fed = run_experiment(tiny_config(algorithm="fedavg", **common), out=str(tmp_path / "fedavg"))
    spl = run_experiment(tiny_config(algorithm="splitlora", split__server="per_client", split__aggregate_every=2, split__layer=2, **common),
                         out=str(tmp_path / "splitlora"))
    assert abs(_final_loss(fed) - _final_loss(spl)) < 1e-6
    shared = run_experiment(tiny_config(algorithm="splitlora", split__layer=2, **common), out=str(tmp_path / "shared"))
    assert abs(_final_loss(shared) - _final_loss(spl)) > 1e-6  # one shared server adapter is a different algorithm


def _expected_bytes(engine, client: int, step: int, dtype: str, u_shaped: bool) -> tuple[int, int]:
    """Serialized sizes of one step's payloads, rebuilt from the batch shape alone."""
    data, cfg = engine.runtime.split.data, engine.cfg
    idx = batch_indices(engine.parts[client], cfg.train.batch_size, step, cfg.seed, client)
    rows, width, hidden = len(idx), -(-max(len(data.input_ids[i]) for i in idx) // 8) * 8, engine.model.config.hidden_size

    def coded(name):
        if dtype == "int8":
            return {f"{name}.q": torch.zeros(rows, width, hidden, dtype=torch.int8), f"{name}.scale": torch.zeros(rows, width, 1)}
        return {name: torch.zeros(rows, width, hidden, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])}

    mask = {"attention_mask": torch.zeros(rows, width, dtype=torch.bool)}
    if not u_shaped:
        up = {**coded("activation"), **mask, "labels": torch.zeros(rows, dtype=torch.int64)}
        return len(safetensors_save(up)), len(safetensors_save(coded("grad")))
    size = lambda d: len(safetensors_save(d))  # noqa: E731
    return size({**coded("activation"), **mask}) + size(coded("grad")), size(coded("activation")) + size(coded("grad"))


@pytest.mark.parametrize("dtype,u_shaped", [("fp32", False), ("bf16", True), ("int8", False)])
def test_bytes_per_step_are_the_serialized_payloads(dtype, u_shaped):
    engine = InProcessEngine(tiny_config(algorithm="splitlora", clients__num=3, clients__per_round=3, split__layer=2,
                                         split__activation_dtype=dtype, split__u_shaped=u_shaped, **SMALL))
    split, state = engine.split, engine.algorithm.global_state()
    client = {k: state[k] for k in split.client_keys}
    split.begin([0, 2], fresh_optimizers=True)
    res = split.step([SplitJob(0, client, 0), SplitJob(2, client, 5)], [{k: state[k] for k in split.server_keys}], 0.01)
    for i, (k, step) in enumerate(((0, 0), (2, 5))):
        assert (res.bytes_up[i], res.bytes_down[i]) == _expected_bytes(engine, k, step, dtype, u_shaped)
    assert res.messages == (2 if u_shaped else 1) and len(res.server_states) == 1


def test_round_bytes_add_activations_and_adapter_exchange(tmp_path):
    cfg = tiny_config(algorithm="splitlora", rounds=1, clients__num=2, clients__per_round=2, train__local_steps=2,
                      split__aggregate_every=1, split__layer=1, **{k: v for k, v in SMALL.items() if k != "rounds"})
    row = read_rows(run_experiment(cfg, out=str(tmp_path / "r")))[-1]
    engine = InProcessEngine(cfg)
    state = engine.algorithm.global_state()
    adapter = payload_nbytes({k: state[k] for k in engine.split.client_keys})  # same keys and shapes every time
    acts = [_expected_bytes(engine, k, s, "fp32", False) for k in (0, 1) for s in (0, 1)]
    # 2 steps x 2 clients of activations; 2 aggregations up; broadcast at start + after step 1 down.
    assert row["bytes_up"] == sum(u for u, _ in acts) + 2 * 2 * adapter
    assert row["bytes_down"] == sum(d for _, d in acts) + 2 * 2 * adapter


def test_int8_codec_error_is_within_half_a_step_per_row():
    x = torch.randn(3, 5, 16) * torch.tensor([1.0, 10.0, 0.0]).reshape(3, 1, 1)
    y = decode_tensor("a", encode_tensor("a", x, "int8"))
    step = x.abs().amax(dim=-1, keepdim=True) / 127
    assert (torch.abs(y - x) <= step / 2 + 1e-7).all() and (y[2] == 0).all()


def test_bad_split_input_exits_2_with_a_clear_message(tmp_path, capsys):
    raw, _ = tiny_raw()
    raw.update(algorithm="splitlora", rounds=1)
    cfg_path = tmp_path / "exp.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    assert main(["run", str(cfg_path), "--set", "split.layer=4", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert "split.layer=4" in err and "[1, 3]" in err and len(err.splitlines()) == 1
    assert main(["run", str(cfg_path), "--set", "algorithm=sl", "--set", "split.server=per_client", "--out", str(tmp_path / "b")]) == 2
    assert "split.server=per_client" in capsys.readouterr().err

    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    folder = tmp_path / "tiny-distilbert"
    tok = byte_tokenizer(bert_style=True)
    DistilBertForSequenceClassification(DistilBertConfig(vocab_size=len(tok), dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                                         num_labels=4, pad_token_id=tok.pad_token_id)).save_pretrained(folder)
    tok.save_pretrained(folder)
    argv = ["run", str(cfg_path), "--set", f"model.name={folder}", "--set", "model.lora.target_modules=[q_lin, v_lin]",
            "--set", "split.layer=1", "--out", str(tmp_path / "c")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "'distilbert' is not supported" in err and "gpt2" in err and len(err.splitlines()) == 1


def test_resume_equals_uninterrupted_and_export_loads_with_peft(tmp_path):
    over = dict(algorithm="splitlora", rounds=3, clients__num=3, clients__per_round=2, train__local_steps=2, train__lr=0.01,
                train__client_optimizer="keep", split__aggregate_every=1, split__layer=2, split__u_shaped=True,
                data__synthetic_train=64, data__synthetic_eval=32)
    whole = run_experiment(tiny_config(**over), out=str(tmp_path / "whole"))
    part = run_experiment(tiny_config(**over), out=str(tmp_path / "part"), stop_after=1)
    assert main(["run", "--resume", str(part)]) == 0
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_time_s"} for r in rows]  # noqa: E731
    assert strip(read_rows(part)) == strip(read_rows(whole))
    a, b = (json.loads((d / "summary.json").read_text()) for d in (whole, part))
    assert a["final"] == b["final"] and a["split"] == b["split"] and a["sim_time_s"] == b["sim_time_s"]
    s = a["split"]
    assert s["client_adapter_params"] + s["server_adapter_params"] == InProcessEngine(tiny_config(**over)).slots.num_params()
    assert s["client_flops_per_sample"] > 0 and s["server_flops_per_sample"] > 0 and s["activation_bytes_up_per_step"] > 0

    cfg = tiny_config(**over)  # the exported union of client and server adapters is one peft adapter
    engine = InProcessEngine(cfg)
    base = load_base_model(cfg.model, engine.task.num_labels, load_tokenizer(cfg.model), seed=99)
    loaded = PeftModel.from_pretrained(base, str(whole / "adapter")).eval()
    again = evaluate(loaded, engine.eval_data, engine.task, 32)
    assert abs(again["eval/loss"] - read_rows(whole)[-1]["eval/loss"]) < 1e-6


def test_e2e_generation_metrics(tmp_path, e2e_dir):
    cfg = tiny_config(algorithm="splitlora", model__name="tiny-gpt2", split__layer=2, eval__generate=2, eval__max_new_tokens=8,
                      **_e2e(e2e_dir))
    row = read_rows(run_experiment(cfg, out=str(tmp_path / "g")))[-1]
    assert {"eval/perplexity", "eval/bleu", "eval/nist", "eval/rouge_l", "eval/cider"} <= row.keys()
    from colora.nlg import nlg_metrics

    refs = [["there is a cheap pub near the river .", "a cheap pub by the river"], ["the eagle serves french food"]]
    perfect = nlg_metrics([r[0] for r in refs], refs)
    assert abs(perfect["eval/bleu"] - 100) < 1e-6 and abs(perfect["eval/rouge_l"] - 1) < 1e-9
    assert nlg_metrics(["", "x"], refs)["eval/bleu"] == 0.0


def test_generation_needs_a_data_to_text_task():
    with pytest.raises(Exception, match="eval.generate=2"):
        InProcessEngine(tiny_config(eval__generate=2, **SMALL))


def test_split_cost_model_runs_clients_in_parallel_and_sl_in_sequence():
    dev = DeviceProfile(flops=1e9, up_mbps=8, down_mbps=16, latency_s=0.01, memory_gb=1)
    srv = DeviceProfile(flops=1e10, up_mbps=1e4, down_mbps=1e4, latency_s=0.0, memory_gb=1)
    args = ([1e9, 2e9], [10**6, 10**6], [2 * 10**6, 2 * 10**6], [1e10, 1e10], [dev, dev], srv)
    per_client = [1.0 + 0.01 + 1.0 + 0.01 + 1.0, 2.0 + 0.01 + 1.0 + 0.01 + 1.0]
    assert np.isclose(split_step_time(*args), max(per_client) + 2.0)
    assert np.isclose(sequential_split_time(*args), sum(per_client) + 2.0)
    assert np.isclose(split_step_time(*args, messages=2), max(per_client) + 0.02 + 2.0)
    assert np.isclose(adapter_sync_time([10**6], [0], [dev], srv, 5 * 10**9), 0.01 + 1.0 + 1.0)
