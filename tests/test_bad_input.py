"""Runs you can trust with bad input: each class of bad input, kill or concurrent use is refused
with exit 2 and one line (or survived), and nothing already computed is lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from colora import rundir
from colora.cli import main
from colora.compare import load_sweep
from colora.config import load_config
from colora.experiment import run_experiment

from .conftest import read_rows, tiny_raw, write_glue

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SECRET = "SECRET-CONTENT-7f3a"  # planted in files an error must not quote


def _config(tmp_path: Path, name: str = "exp.yaml", **sets) -> Path:
    raw, _ = tiny_raw()
    for key, value in sets.items():
        node = raw
        *parents, last = key.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("colora: error: ") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _bad(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    return _err(capsys)


def _csv_task(folder: Path, train_labels: list, dev_labels: list) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.csv").write_text("text,label\n" + "".join(f"sentence {i},{y}\n" for i, y in enumerate(train_labels)))
    (folder / "dev.csv").write_text("text,label\n" + "".join(f"other {i},{y}\n" for i, y in enumerate(dev_labels)))
    return folder


# -- 1. Non-finite state ---------------------------------------------------------------------------

def test_a_non_finite_aggregate_stops_the_run_before_it_is_checkpointed(tmp_path, capsys):
    """The issue's case: FedAvgM with server_lr=1e300 exited 0 with every value of adapter/ NaN or
    inf, and with more rounds overwrote the last good checkpoint and blamed train.lr."""
    cfg = _config(tmp_path, rounds=1, federation__server_optimizer="fedavgm", federation__server_lr=1.0e300)
    out = tmp_path / "run"
    err = _bad(capsys, ["run", str(cfg), "--out", str(out)])
    assert "round 1: the global adapter holds NaN, inf or entries above 1e+06 after the server optimizer" in err
    assert "federation.server_lr=1e+300 is the likely cause" in err and "train.lr" not in err
    assert not (out / "adapter").exists() and not (out / "summary.json").exists()


def test_a_diverged_but_finite_state_is_not_checkpointed_either(tmp_path, capsys):
    # server_lr=1e30 leaves finite entries of ~1e27 after round 1: a checkpoint of that state would
    # overflow in round 2 whatever the resumed settings, so it must not become "the last good one".
    cfg = _config(tmp_path, rounds=3, federation__server_optimizer="fedavgm", federation__server_lr=1.0e30)
    out = tmp_path / "run"
    err = _bad(capsys, ["run", str(cfg), "--out", str(out)])
    assert "round 1:" in err and "entries above 1e+06" in err and "federation.server_lr=1e+30" in err
    assert not (out / "checkpoint").exists() and [r["round"] for r in read_rows(out)] == [0]


def test_resume_with_a_smaller_setting_recovers_from_the_last_good_checkpoint(tmp_path, capsys):
    cfg = _config(tmp_path, rounds=4, federation__server_optimizer="fedavgm", federation__server_lr=1.0)
    out = run_experiment(load_config(cfg), out=str(tmp_path / "run"), stop_after=2)
    good = (out / rundir.CHECKPOINT).read_bytes()
    # Raising the server lr mid-run blows round 3 up: refused, and round 2's checkpoint stays as it was.
    err = _bad(capsys, ["run", "--resume", str(out), "--set", "federation.server_lr=1e300"])
    assert "round 3:" in err and "federation.server_lr=1e+300 is the likely cause" in err and "(round 2) is kept" in err
    assert (out / rundir.CHECKPOINT).read_bytes() == good and [r["round"] for r in read_rows(out)] == [0, 1, 2]
    assert main(["run", "--resume", str(out), "--set", "federation.server_lr=0.5"]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["federation"]["server_lr"] == 0.5
    changes = [json.loads(line) for line in (out / "changes.jsonl").read_text().splitlines()]
    assert [(c["after_round"], c["set"]) for c in changes] == [(2, {"federation.server_lr": 1e300}),
                                                              (2, {"federation.server_lr": 0.5})]
    assert [r["round"] for r in read_rows(out)] == [0, 1, 2, 3, 4]
    from safetensors.torch import load_file
    assert all(torch.isfinite(t).all() for t in load_file(out / "adapter" / "adapter_model.safetensors").values())


def test_a_non_finite_first_round_leaves_a_directory_the_same_command_restarts(tmp_path, capsys):
    cfg = _config(tmp_path, rounds=1, federation__server_optimizer="fedavgm", federation__server_lr=1.0e300,
                  train__lr=0.5)
    out = tmp_path / "run"
    err = _bad(capsys, ["run", str(cfg), "--out", str(out)])
    assert "round 1:" in err and "no round had finished: start again" in err
    assert not (out / "checkpoint").exists() and not (out / "adapter").exists()
    # The same command (with the setting fixed) starts that directory again.
    assert main(["run", str(cfg), "--out", str(out), "--set", "federation.server_lr=1.0"]) == 0
    assert (out / "summary.json").is_file()


def test_resume_refuses_changes_that_would_change_finished_rounds(tmp_path, capsys):
    raw, _ = tiny_raw()
    from colora.config import build_config
    part = run_experiment(build_config(raw, {"rounds": 3}), out=str(tmp_path / "part"), stop_after=1)
    err = _bad(capsys, ["run", "--resume", str(part), "--set", "clients.num=5"])
    assert "--resume --set clients.num: cannot change in a run under way" in err and "train.lr" in err
    err = _bad(capsys, ["run", "--resume", str(part), "--set", "rounds=0"])
    assert "rounds=0" in err
    assert not (part / "changes.jsonl").exists()  # refused changes leave no record
    assert main(["run", "--resume", str(part), "--set", "train.lr=0.001", "--set", "eval.every=2"]) == 0
    assert read_rows(part)[-1]["round"] == 3


# -- 2. One writer per run directory --------------------------------------------------------------

def _hold_lock(run_dir: Path) -> subprocess.Popen:
    code = ("import sys, time; from pathlib import Path; from colora.rundir import RunLock\n"
            "with RunLock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_run_directory_in_use_is_refused(tmp_path, capsys):
    raw, _ = tiny_raw()
    from colora.config import build_config
    cfg = _config(tmp_path, rounds=3)
    part = run_experiment(build_config(raw, {"rounds": 3}), out=str(tmp_path / "part"), stop_after=1)
    holder = _hold_lock(part)  # another process, e.g. a resume already under way
    try:
        assert "is in use by another colora process" in _bad(capsys, ["run", "--resume", str(part)])
        fresh = tmp_path / "fresh"
        fresh.mkdir()
        (fresh / rundir.MARKER).touch()
        holder2 = _hold_lock(fresh)  # a new run that has not checkpointed yet
        try:
            assert "is in use by another colora process" in _bad(capsys, ["run", str(cfg), "--out", str(fresh)])
        finally:
            holder2.kill()
            holder2.wait()
    finally:
        holder.kill()  # kill -9: the OS drops the lock with the process
        holder.wait()
    assert main(["run", "--resume", str(part)]) == 0
    assert read_rows(part)[-1]["round"] == 3


def _sweep_file(tmp_path: Path, runs: list[dict], rounds: int) -> Path:
    cfg = _config(tmp_path, "base.yaml", rounds=rounds)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"base": cfg.name, "runs": runs}))
    return path


def _wait(predicate, seconds: float = 60.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killing_compare_ends_its_runs_and_a_rerun_resumes_them(tmp_path, sig):
    sweep = _sweep_file(tmp_path, [{"seed": 0}, {"seed": 1}], rounds=40)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "colora", "compare", str(sweep), "--out", str(out), "--jobs", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    dirs = [out / "0-seed=0", out / "1-seed=1"]
    try:
        # both runs under way: each holds its lock and has checkpointed a round
        assert _wait(lambda: all(rundir.is_locked(d) and (d / rundir.CHECKPOINT).is_file() for d in dirs))
        proc.send_signal(sig)  # to the sweep process alone, not its group
        proc.wait(timeout=30)
        # its runs end with it (SIGTERM: the sweep ends them; kill -9: they get SIGTERM from the OS)
        assert _wait(lambda: not any(rundir.is_locked(d) for d in dirs), 30)
    finally:
        proc.kill()
        proc.wait()
    assert not all((d / "summary.json").is_file() for d in dirs)  # stopped mid-run
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    for d in dirs:
        assert [r["round"] for r in read_rows(d)] == list(range(41))  # resumed, nothing repeated or lost


# -- 3. Inputs are pinned -------------------------------------------------------------------------

def test_input_files_are_absolute_and_pinned_and_a_changed_one_refuses_resume(tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    _csv_task(work / "data", ["a", "b"] * 30, ["a", "b"] * 5)
    (work / "edges.txt").write_text("0 1\n1 2\n2 0\n")
    (work / "presets.yaml").write_text("mine: {client: {flops: 5.0e+9}}\n")
    cfg = _config(work, rounds=3, algorithm="declora", data__name="csv", data__path="data",
                  gossip__topology="edges.txt", system__presets_file="presets.yaml", system__preset="mine")
    part = run_experiment(load_config(cfg), out=str(tmp_path / "part"), stop_after=1)
    saved = yaml.safe_load((part / "config.yaml").read_text())
    assert saved["data"]["path"] == str(work / "data")
    assert saved["gossip"]["topology"] == str(work / "edges.txt")
    assert saved["system"]["presets_file"] == str(work / "presets.yaml")
    assert set(saved["pinned_inputs"]) == {"data.path", "gossip.topology", "system.presets_file"}
    assert saved["pinned_inputs"]["gossip.topology"] == rundir.file_digest(work / "edges.txt")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    (work / "edges.txt").write_text("0 1\n1 2\n")  # the graph changed under the run
    err = _bad(capsys, ["run", "--resume", str(part)])
    assert "gossip.topology=" in err and "changed since the run started" in err
    (work / "edges.txt").write_text("0 1\n1 2\n2 0\n")
    (work / "data" / "dev.csv").write_text("text,label\nx,a\ny,b\n")
    assert "data.path=" in _bad(capsys, ["run", "--resume", str(part)])
    (work / "data" / "dev.csv").write_text("text,label\n" + "".join(f"other {i},{y}\n" for i, y in enumerate(["a", "b"] * 5)))
    assert main(["run", "--resume", str(part)]) == 0  # the same files, read from another directory
    assert read_rows(part)[-1]["round"] == 3


# -- 4. --out never overwrites --------------------------------------------------------------------

def test_out_never_overwrites_what_is_not_a_colora_run(tmp_path, capsys):
    cfg = _config(tmp_path, rounds=1)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine\n")
    assert "is a file" in _bad(capsys, ["run", str(cfg), "--out", str(a_file)])
    assert "cannot create the run directory" in _bad(capsys, ["run", str(cfg), "--out", str(a_file / "sub")])
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "chapter1.tex").write_text("words\n")
    assert "holds files that are not a colora run" in _bad(capsys, ["run", str(cfg), "--out", str(foreign)])
    assert (foreign / "chapter1.tex").read_text() == "words\n" and len(list(foreign.iterdir())) == 1
    done = tmp_path / "done"
    assert main(["run", str(cfg), "--out", str(done)]) == 0
    assert "already holds a run (use --resume" in _bad(capsys, ["run", str(cfg), "--out", str(done)])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["run", str(cfg), "--out", str(empty)]) == 0
    # colora compare's --out likewise: its report files would overwrite the folder's own
    sweep = _sweep_file(tmp_path, [{"seed": 0}], rounds=1)
    assert "holds files that are not a colora sweep" in _bad(capsys, ["compare", str(sweep), "--out", str(foreign)])
    assert "is a file" in _bad(capsys, ["compare", str(sweep), "--out", str(a_file)])
    assert sorted(p.name for p in foreign.iterdir()) == ["chapter1.tex"]


def test_a_run_killed_before_its_first_checkpoint_starts_again(tmp_path, capsys, monkeypatch):
    cfg = _config(tmp_path, rounds=2)
    out = tmp_path / "run"
    from colora.algorithms.fedavg import FedAvg

    def killed(self, rnd):
        raise KeyboardInterrupt  # as Ctrl-C (or a kill) in round 1 would
    monkeypatch.setattr(FedAvg, "run_round", killed)
    assert main(["run", str(cfg), "--out", str(out)]) == 130
    assert read_rows(out)[0]["round"] == 0 and not (out / "checkpoint").exists()
    monkeypatch.undo()
    capsys.readouterr()
    assert "start it again with colora run CONFIG --out" in _bad(capsys, ["run", "--resume", str(out)])
    assert main(["run", str(cfg), "--out", str(out)]) == 0  # the same command starts it again
    assert [r["round"] for r in read_rows(out)] == [0, 1, 2]


def test_a_run_that_fails_during_setup_removes_the_folder_it_made(tmp_path, capsys):
    cfg = _config(tmp_path, rounds=1)
    out = tmp_path / "new" / "run"
    assert "data.max_length=9000" in _bad(capsys, ["run", str(cfg), "--out", str(out), "--set", "data.max_length=9000"])
    assert not out.exists()


# -- 5. Exit 2 and one bounded line, not a traceback ------------------------------------------------

def _write_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


LATIN1 = "caf\xe9: 1\n".encode("latin-1")  # not UTF-8


@pytest.mark.parametrize("case", ["config", "sweep", "edge_list", "jsonl", "csv", "tsv"])
def test_files_that_are_not_utf8_exit_2(tmp_path, capsys, case):
    cfg = _config(tmp_path, rounds=1)
    if case == "config":
        argv = ["run", str(_write_bytes(tmp_path / "c.yaml", LATIN1))]
    elif case == "sweep":
        argv = ["compare", str(_write_bytes(tmp_path / "s.yaml", LATIN1)), "--out", str(tmp_path / "o")]
    elif case == "edge_list":
        edges = _write_bytes(tmp_path / "g.txt", b"0 1\n\xff 2\n")
        argv = ["run", str(cfg), "--set", "algorithm=declora", "--set", f"gossip.topology={edges}"]
    else:
        ext = {"jsonl": "jsonl", "csv": "csv", "tsv": "tsv"}[case]
        folder = tmp_path / "data"
        if case == "tsv":
            write_glue(tmp_path, "SST-2")
            folder = tmp_path / "SST-2"
            _write_bytes(folder / "dev.tsv", b"sentence\tlabel\nd\xe9j\xe0 vu\t1\n")
            name = "glue/sst2"
        else:
            _csv_task(folder, ["a", "b"] * 5, ["a", "b"])
            (folder / "train.jsonl").write_text("".join(json.dumps({"text": f"s {i}", "label": i % 2}) + "\n" for i in range(10)))
            _write_bytes(folder / f"dev.{ext}", b'{"text": "caf\xe9", "label": 1}\n' if ext == "jsonl" else b"text,label\ncaf\xe9,a\n")
            name = ext
        argv = ["run", str(cfg), "--set", f"data.name={name}", "--set", f"data.path={folder}"]
    if argv[0] == "run" and "--out" not in argv:
        argv += ["--out", str(tmp_path / "run")]
    assert "is not UTF-8 text" in _bad(capsys, argv)


@pytest.mark.parametrize("text, needle", [
    ("base: [unclosed\n", "is not valid YAML"),
    ("- just\n- a list\n", "must hold a mapping"),
    ("base: exp.yaml\nruns: {algorithm: central}\n", "'runs' must be a list"),
    ("base: exp.yaml\nruns: [central]\n", "every entry of 'runs' must be a mapping"),
    ("base: exp.yaml\ngrid: {train.lr: 0.1}\n", "every 'grid' value a non-empty list"),
    ("base: missing.yaml\n", "does not exist"),
    ("runs: [{seed: 1}]\n", "needs a 'base' config"),
])
def test_bad_sweep_files_exit_2(tmp_path, capsys, text, needle):
    _config(tmp_path)
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(text)
    assert needle in _bad(capsys, ["compare", str(sweep), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("damage", ["truncated", "empty", "foreign", "not_torch"])
def test_a_damaged_checkpoint_exits_2(tmp_path, capsys, damage):
    raw, _ = tiny_raw()
    from colora.config import build_config
    part = run_experiment(build_config(raw, {"rounds": 3}), out=str(tmp_path / "part"), stop_after=1)
    path = part / rundir.CHECKPOINT
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "foreign":
        torch.save({"weights": torch.zeros(3)}, path)
    else:
        path.write_text(SECRET)
    err = _bad(capsys, ["run", "--resume", str(part)])
    assert "checkpoint" in err and "start a new run" in err and SECRET not in err


def test_metrics_with_a_half_written_last_line_resume_and_a_broken_middle_line_exits_2(tmp_path, capsys):
    raw, _ = tiny_raw()
    from colora.config import build_config
    part = run_experiment(build_config(raw, {"rounds": 3}), out=str(tmp_path / "part"), stop_after=2)
    whole = (part / "metrics.jsonl").read_text()
    (part / "metrics.jsonl").write_text(whole + '{"round": 3, "bytes_up": 12')  # killed mid-write
    assert main(["run", "--resume", str(part)]) == 0
    assert [r["round"] for r in read_rows(part)] == [0, 1, 2, 3]
    lines = (part / "metrics.jsonl").read_text().splitlines()
    (part / "metrics.jsonl").write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    (part / "summary.json").unlink()
    assert "metrics.jsonl, line 2: not a metrics row" in _bad(capsys, ["run", "--resume", str(part)])


@pytest.mark.parametrize("text, needle", [
    ("mine: [unclosed\n", "is not valid YAML"),
    ("- a\n- b\n", "expected a mapping of preset names"),
    (f"mine: {SECRET}\n", "preset 'mine' must be a mapping"),
    ("mine: {client: {flops: fast}}\n", "system.client.flops"),
])
def test_a_malformed_presets_file_exits_2(tmp_path, capsys, text, needle):
    cfg = _config(tmp_path, rounds=1)
    presets = tmp_path / "presets.yaml"
    presets.write_text(text)
    err = _bad(capsys, ["run", str(cfg), "--out", str(tmp_path / "r"), "--set", f"system.presets_file={presets}",
                        "--set", "system.preset=mine"])
    assert needle in err and SECRET not in err


@pytest.mark.parametrize("setting, needle", [
    ("seed=-1", "seed=-1: Input should be greater than or equal to 0"),
    ("train.lr=.inf", "train.lr=inf: inf and NaN are not allowed"),
    ("train.lr=.nan", "train.lr=nan: inf and NaN are not allowed"),
    ("federation.server_lr=.inf", "federation.server_lr=inf"),
    ("system.client.flops=.inf", "system.client.flops=inf"),
    ("model.lora.alpha=-.inf", "model.lora.alpha=-inf"),
    ("name=../escape", "a run name becomes a folder under runs/"),
    ("name=a/b", "a run name becomes a folder under runs/"),
])
def test_values_refused_at_load(tmp_path, capsys, setting, needle):
    cfg = _config(tmp_path, rounds=1)
    assert needle in _bad(capsys, ["run", str(cfg), "--set", setting])
    assert not (tmp_path / "runs").exists() and not Path("runs", "..", "escape").exists()


def test_nan_in_a_list_of_floats_is_refused(tmp_path, capsys):
    cfg = _config(tmp_path, rounds=1, clients__partition="label_skew", clients__num=2, clients__per_round=2,
                  clients__proportions=[[0.5, 0.5, 0, 0], [float("nan"), 1.0, 0, 0]])
    assert "inf and NaN are not allowed" in _bad(capsys, ["run", str(cfg)])


def test_a_yaml_alias_bomb_gives_a_short_line_quickly(tmp_path, capsys):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i, name in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        lines.append(f"{name}: &{name} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\nrounds: *i\n")
    start = time.monotonic()
    err = _bad(capsys, ["run", str(bomb)])
    assert time.monotonic() - start < 10 and len(err) < 300 and "expands to more than" in err
    # the same through a sweep and --set
    sweep = tmp_path / "s.yaml"
    sweep.write_text("\n".join(lines) + "\nbase: *i\n")
    assert "expands to more than" in _bad(capsys, ["compare", str(sweep), "--out", str(tmp_path / "o")])


def test_a_huge_value_is_quoted_short(tmp_path, capsys):
    cfg = _config(tmp_path, rounds=1)
    err = _bad(capsys, ["run", str(cfg), "--set", "train.lr=" + "x" * 100_000])
    assert err.startswith("colora: error: train.lr='xxx") and len(err) < 300


@pytest.mark.parametrize("make", ["bad_config_json", "no_weights", "garbage_weights", "not_a_folder"])
def test_a_model_folder_that_fails_to_load_exits_2(tmp_path, capsys, make):
    folder = tmp_path / "model"
    folder.mkdir()
    if make == "bad_config_json":
        (folder / "config.json").write_text("{not json")
    elif make == "no_weights":
        (folder / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 50, "hidden_size": 8,
                                                        "num_hidden_layers": 1, "num_attention_heads": 2}))
    elif make == "garbage_weights":
        (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
        (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    else:
        folder.rmdir()
        folder.write_text(SECRET)
    cfg = _config(tmp_path, rounds=1)
    err = _bad(capsys, ["run", str(cfg), "--set", f"model.name={folder}", "--out", str(tmp_path / "r")])
    assert f"model.name='{folder}'" in err and SECRET not in err and len(err) < 1100


# -- 6. Checks at load, not in round 1 --------------------------------------------------------------

@pytest.mark.parametrize("sets, needle", [
    (["data.max_length=1000"], "data.max_length=1000 exceeds the model's 512 positions"),
    (["model.lora.r=40"], "LoRA rank 40 (model.lora.r or federation.ranks/rank_set) exceeds min(d_in, d_out)=32"),
    (["federation.aggregator=svd", "federation.ranks=[2, 4, 64]"], "LoRA rank 64"),
    (["model.name=tiny-gpt2", "data.max_length=513"], "exceeds the model's 512 positions (gpt2)"),
])
def test_model_limits_are_checked_before_round_1(tmp_path, capsys, sets, needle):
    cfg = _config(tmp_path, rounds=1)
    argv = ["run", str(cfg), "--out", str(tmp_path / "r")]
    for s in sets:
        argv += ["--set", s]
    assert needle in _bad(capsys, argv)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("train, dev, needle", [
    (["a", "b"] * 5, ["a", "c"], "dev.csv, line 3: the label does not occur in the train file"),
    ([0, 1] * 5, [0, 2], "dev.csv, line 3: class id 2 does not occur in the train file"),
    (["a", "b", "nan"] * 4, ["a"], "train.csv, line 4: label column 'label' is empty, NaN or inf"),
    (["a", "b", ""] * 4, ["a"], "train.csv, line 4: label column 'label' is empty, NaN or inf"),
    ([0.5, 1.5] * 5, ["inf"], "dev.csv, line 2: label column 'label' is empty, NaN or inf"),
])
def test_bad_labels_are_refused_at_load(tmp_path, capsys, train, dev, needle):
    folder = _csv_task(tmp_path / "data", train, dev)
    cfg = _config(tmp_path, rounds=1, data__name="csv", data__path=str(folder))
    assert needle in _bad(capsys, ["run", str(cfg), "--out", str(tmp_path / "r")])


def test_glue_dev_classes_missing_from_train_and_nan_scores_are_refused(tmp_path, capsys):
    positives = [(1, "a fine film"), (1, "a good film")]
    sst = write_glue(tmp_path, "SST-2", train=positives, dev=[(0, "a dull film"), (1, "a fine film")])
    cfg = _config(tmp_path, rounds=1, data__name="glue/sst2", data__path=str(sst))
    assert "eval labels ['negative'] never occur in the train split" in _bad(capsys, ["run", str(cfg), "--out", str(tmp_path / "r")])
    sts = write_glue(tmp_path, "STS-B")
    dev = (sts / "dev.tsv").read_text().splitlines()
    cells = dev[1].split("\t")
    cells[-1] = "nan"
    (sts / "dev.tsv").write_text("\n".join([dev[0], "\t".join(cells), *dev[2:]]) + "\n")
    cfg = _config(tmp_path, rounds=1, data__name="glue/stsb", data__path=str(sts))
    assert "dev.tsv, line 2: the score is not a finite number" in _bad(capsys, ["run", str(cfg), "--out", str(tmp_path / "r")])


# -- 7. compare validates the whole sweep; one failing run stops nothing else ---------------------

@pytest.mark.parametrize("entry, needle", [
    ({"algorithm": "splitlora", "split.layer": 9}, "split.layer=9"),
    ({"algorithm": "declora", "gossip.topology": "missing-edges.txt"}, "no such edge-list file"),
    ({"data.name": "csv", "data.path": "DATA", "data.text_column": "body"}, "no column 'body'"),
    ({"federation.aggregator": "fedit", "federation.ranks": [2, 4, 8]}, "needs equal LoRA ranks"),
])
def test_compare_checks_every_entrys_setup_before_running_anything(tmp_path, capsys, entry, needle):
    folder = _csv_task(tmp_path / "data", ["a", "b"] * 10, ["a", "b"])
    entry = {k: str(folder) if v == "DATA" else v for k, v in entry.items()}
    sweep = _sweep_file(tmp_path, [{"algorithm": "central"}, entry], rounds=1)
    err = _bad(capsys, ["compare", str(sweep), "--out", str(tmp_path / "out")])
    assert err.startswith("colora: error: sweep run 1 (") and needle in err
    assert not (tmp_path / "out" / "0-central").exists()  # nothing ran


@pytest.mark.parametrize("jobs", [1, 2])
def test_one_failing_sweep_run_stops_nothing_else(tmp_path, capsys, jobs):
    # The middle run diverges in round 2 (a runtime failure validation cannot foresee).
    diverge = {"train.optimizer": "sgd", "train.lr": 1.0e12}
    sweep = _sweep_file(tmp_path, [{"seed": 0}, diverge, {"seed": 1}], rounds=3)
    out = tmp_path / "out"
    assert main(["compare", str(sweep), "--out", str(out), "--jobs", str(jobs)]) == 1
    err = capsys.readouterr().err
    assert "1 of 3 sweep runs failed" in err and "run 1 (lr=1000000000000.0-optimizer=sgd)" in err
    finished = sorted(p.parent.name for p in out.glob("*/summary.json"))
    assert finished == ["0-seed=0", "2-seed=1"]
    labels = [line.split(",")[0] for line in (out / "summary.csv").read_text().splitlines()[1:]]
    assert labels == ["tiny-seed=0", "tiny-seed=1"] and (out / "index.html").is_file()  # the report covers the others
    assert "train.lr=1e+12 is the likely cause" in (out / "1-lr=1000000000000.0-optimizer=sgd.log").read_text()


# -- 8. Paths ----------------------------------------------------------------------------------------

def test_errors_about_files_never_quote_their_content(tmp_path, capsys):
    cfg = _config(tmp_path, rounds=1)
    edges = tmp_path / "edges.txt"
    edges.write_text(f"0 1\n{SECRET} {SECRET}\n")
    err = _bad(capsys, ["run", str(cfg), "--out", str(tmp_path / "r"), "--set", "algorithm=declora",
                        "--set", f"gossip.topology={edges}"])
    assert "line 2" in err and SECRET not in err
    sst = write_glue(tmp_path, "SST-2")
    (sst / "dev.tsv").write_text(f"sentence\tlabel\nfine\t{SECRET}\n")
    cfg = _config(tmp_path, rounds=1, data__name="glue/sst2", data__path=str(sst))
    err = _bad(capsys, ["run", str(cfg), "--out", str(tmp_path / "r")])
    assert "dev.tsv, line 2" in err and SECRET not in err
    (sst / "train.tsv").write_text(f"{SECRET}\tother\nfine\t1\n")
    err = _bad(capsys, ["run", str(cfg), "--out", str(tmp_path / "r")])
    assert "header has no column 'sentence'" in err and SECRET not in err


# -- 9. A user's clone -------------------------------------------------------------------------------

def test_examples_load_for_a_hub_user_and_take_a_local_folder(tmp_path):
    configs = [p for p in EXAMPLES.glob("*.yaml") if "base" not in yaml.safe_load(p.read_text())]
    sweeps = [p for p in EXAMPLES.glob("*.yaml") if p not in configs]
    assert configs and sweeps
    for path in configs:
        data = load_config(path).data
        if data.name != "synthetic":  # the built-in task reads no files
            assert data.path is None, f"{path.name}: examples read the hub by default"
            assert "data.path" in path.read_text(), f"{path.name} should say how to point it at a local folder"
    for path in sweeps:
        assert load_sweep(path)
    glue = write_glue(tmp_path, "MRPC")
    assert load_config(EXAMPLES / "mrpc.yaml", [f"data.path={glue}"]).data.path == str(glue)
