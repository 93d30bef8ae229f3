"""End to end on tiny models: the run directory contract, resume, peft export, causal LMs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import torch
import yaml
from peft import PeftModel

import colora
from colora.cli import main
from colora.config import build_config
from colora.engines import InProcessEngine
from colora.experiment import run_experiment
from colora.models import load_base_model, load_tokenizer

from .conftest import read_rows, tiny_config, tiny_raw

STRIP = ("wall_time_s",)


def _comparable(rows):
    return [{k: v for k, v in r.items() if k not in STRIP} for r in rows]


def test_cli_run_writes_the_contract_run_directory(tmp_path, capsys):
    raw, _ = tiny_raw()
    raw["clients"].update({"num": 4, "per_round": 2, "partition": "dirichlet"})
    cfg_path = tmp_path / "exp.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    assert main(["run", str(cfg_path), "--set", "rounds=2", "--out", str(out)]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["rounds"] == 2
    rows = read_rows(out)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert {"round", "sim_time_s", "bytes_up", "bytes_down", "train_loss", "eval/loss", "eval/accuracy"} <= r.keys()
    assert rows[0]["train_loss"] is None and rows[0]["bytes_up"] == 0
    assert rows[2]["bytes_up"] > rows[1]["bytes_up"] > 0 and rows[2]["sim_time_s"] > rows[1]["sim_time_s"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert {"algorithm", "rounds", "final", "best", "bytes_up", "bytes_down", "sim_time_s", "wall_time_s", "peak_rss_mb"} <= summary.keys()
    assert summary["final"]["eval/accuracy"] == rows[-1]["eval/accuracy"]
    assert summary["best"]["eval/accuracy"] == max(r["eval/accuracy"] for r in rows)
    assert summary["bytes_up"] == rows[-1]["bytes_up"] and summary["peak_rss_mb"] > 0
    assert summary["software"]["torch"] == torch.__version__ and summary["software"]["commit"] == _checkout_commit()
    part = json.loads((out / "partition.json").read_text())
    assert sum(part["sizes"]) == 240 and [sum(h) for h in part["histogram"]] == part["sizes"]
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert main(["report", str(out), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "index.html").is_file()


def _checkout_commit():
    """HEAD (+dirty) of the checkout these tests' colora comes from, asked of git here; None outside one."""
    root = Path(colora.__file__).resolve().parent.parent
    git = lambda *a: subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True)  # noqa: E731
    top = git("rev-parse", "--show-toplevel")
    if top.returncode != 0 or Path(top.stdout.strip()).resolve() != root:
        return None
    dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    return git("rev-parse", "HEAD").stdout.strip() + ("+dirty" if dirty else "")


def test_software_names_no_commit_for_a_copy_outside_its_own_checkout(tmp_path, monkeypatch):
    # an installed copy inside another project's repository (a venv in a project) must not be
    # credited with that project's commit
    import colora.rundir as rundir

    outer = tmp_path / "project"
    (outer / "venv" / "colora").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(outer)], check=True)
    monkeypatch.setattr(rundir, "__file__", str(outer / "venv" / "colora" / "rundir.py"))
    assert rundir._source_commit() is None


def test_bytes_are_the_serialized_adapter_payloads(tmp_path):
    from colora.states import payload_nbytes

    cfg = tiny_config(rounds=1, clients__num=4, clients__per_round=3)
    run = run_experiment(cfg, out=str(tmp_path / "r"))
    engine = InProcessEngine(cfg)
    one = payload_nbytes(engine.algorithm.global_state())
    row = read_rows(run)[-1]
    assert row["bytes_down"] == 3 * one and row["bytes_up"] == 3 * one


def test_resume_equals_an_uninterrupted_run(tmp_path):
    over = dict(rounds=4, clients__num=4, clients__per_round=2, clients__partition="dirichlet",
                train__prox_mu=0.01, train__client_optimizer="keep", federation__server_optimizer="fedadam", federation__server_lr=0.01)
    whole = run_experiment(tiny_config(**over), out=str(tmp_path / "whole"))
    part = run_experiment(tiny_config(**over), out=str(tmp_path / "part"), stop_after=2)
    assert [r["round"] for r in read_rows(part)] == [0, 1, 2]
    assert not (part / "summary.json").exists()
    assert main(["run", "--resume", str(part)]) == 0
    assert _comparable(read_rows(part)) == _comparable(read_rows(whole))
    a = json.loads((whole / "summary.json").read_text())
    b = json.loads((part / "summary.json").read_text())
    assert a["final"] == b["final"] and a["bytes_up"] == b["bytes_up"] and a["sim_time_s"] == b["sim_time_s"]


def test_resume_of_central_restores_optimizer_moments(tmp_path):
    over = dict(algorithm="central", rounds=4)
    whole = run_experiment(tiny_config(**over), out=str(tmp_path / "whole"))
    part = run_experiment(tiny_config(**over), out=str(tmp_path / "part"), stop_after=1)
    run_experiment(build_config(yaml.safe_load((part / "config.yaml").read_text())), resume=part)
    assert _comparable(read_rows(part)) == _comparable(read_rows(whole))


def test_exported_adapter_loads_with_peft_and_gives_the_same_logits(tmp_path):
    cfg = tiny_config(rounds=2)
    run = run_experiment(cfg, out=str(tmp_path / "r"))
    engine = InProcessEngine(cfg)
    tok = load_tokenizer(cfg.model)
    base = load_base_model(cfg.model, engine.task.num_labels, tok, seed=123)  # head seed differs on purpose
    loaded = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
    from peft import get_peft_model_state_dict

    from colora.train import evaluate

    state = get_peft_model_state_dict(loaded)
    engine.slots.load(state)  # the exported state, put into the engine's own model
    batch = engine.eval_data.collate(list(range(8)))
    batch.pop("labels")
    engine.model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, engine.model(**batch).logits, atol=1e-6)
    final = read_rows(run)[-1]
    again = evaluate(loaded, engine.eval_data, engine.task, 32)
    assert abs(again["eval/loss"] - final["eval/loss"]) < 1e-6 and again["eval/accuracy"] == final["eval/accuracy"]


def test_causal_lm_on_e2e_with_tiny_gpt2_and_tiny_llama(tmp_path, e2e_dir):
    for name in ("tiny-gpt2", "tiny-llama"):
        cfg = tiny_config(model__name=name, model__task="causal-lm", data__name="e2e", data__path=str(e2e_dir),
                          data__max_train=96, data__max_eval=16, data__max_length=96, rounds=2, train__lr=1e-2)
        rows = read_rows(run_experiment(cfg, out=str(tmp_path / name)))
        assert "eval/perplexity" in rows[-1] and rows[-1]["eval/perplexity"] < rows[0]["eval/perplexity"]
        assert abs(rows[-1]["eval/perplexity"] - torch.tensor(rows[-1]["eval/loss"]).exp().item()) < 1e-3 * rows[-1]["eval/perplexity"]


def test_seq_cls_heads_for_gpt2_and_llama(tmp_path):
    for name in ("tiny-gpt2", "tiny-llama"):
        rows = read_rows(run_experiment(tiny_config(model__name=name, rounds=1), out=str(tmp_path / name)))
        assert rows[-1]["bytes_up"] > 0 and 0.0 <= rows[-1]["eval/accuracy"] <= 1.0


def test_memory_per_client_is_adapter_sized():
    """The engine keeps one model; a client adds only its index list and a step counter."""
    few = InProcessEngine(tiny_config(clients__num=2, clients__per_round=2))
    many = InProcessEngine(tiny_config(clients__num=40, clients__per_round=40))
    assert len(list(many.model.parameters())) == len(list(few.model.parameters()))
    assert sum(p.nbytes for p in many.parts) == sum(p.nbytes for p in few.parts)  # a partition of the same data
    assert len(many.algorithm.client_steps) == 40


def test_a_diverging_run_stops_with_exit_2_and_keeps_what_it_computed(tmp_path, capsys):
    raw, _ = tiny_raw()
    raw.update(rounds=3)
    raw["train"].update(optimizer="sgd", lr=1.0e12)
    cfg_path = tmp_path / "exp.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    assert main(["run", str(cfg_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "NaN" in err and "train.lr=1e+12" in err and len(err.splitlines()) == 1
    rows = read_rows(out)
    assert rows[0]["round"] == 0 and rows[-1]["round"] < 3  # rows computed before the failure survive
    if rows[-1]["round"] > 0:  # ...and agree with the checkpoint a resume would start from
        assert torch.load(out / "checkpoint" / "state.pt", weights_only=True)["round"] == rows[-1]["round"]
    assert (out / "config.yaml").is_file() and (out / "partition.json").is_file()


def test_log_shows_the_label_histogram(tmp_path, capsys):
    run_experiment(tiny_config(rounds=1, clients__num=12, clients__per_round=2, clients__partition="shards"), out=str(tmp_path / "r"))
    out = capsys.readouterr().out
    assert "food-neg" in out and "sport-pos" in out and "2 more clients in partition.json" in out
    assert "round 1/1" in out


def test_a_checkpoint_from_before_the_one_rule_server_resumes(tmp_path):
    """fedavg at equal ranks used to checkpoint its global adapter under "state"; such a run still
    resumes, and ends as an uninterrupted run does."""
    over = dict(rounds=3)
    whole = run_experiment(tiny_config(**over), out=str(tmp_path / "whole"))
    part = run_experiment(tiny_config(**over), out=str(tmp_path / "part"), stop_after=1)
    path = part / "checkpoint" / "state.pt"
    ckpt = torch.load(path, weights_only=True)
    algo = ckpt["algorithm"]
    ckpt["algorithm"] = {"state": algo["server"]["state"], "server_opt": algo["server_opt"], "client_steps": algo["client_steps"]}
    torch.save(ckpt, path)
    assert main(["run", "--resume", str(part)]) == 0
    assert [r["eval/loss"] for r in read_rows(part)] == [r["eval/loss"] for r in read_rows(whole)]
