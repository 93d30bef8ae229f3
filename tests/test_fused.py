"""``engine.fuse``: K clients trained in one batched pass over the shared base (colora.fused) give
the sequential results: every client's trained state, optimizer moments, loss and FLOPs, and whole
runs' eval losses, on every paradigm with parallel clients, with and without mixed ranks.

The base models' dropout stays ON in these tests (tiny models: 0.1), so they also check that every
client draws its own masks, at its own width, from its own stream: a fused pass that shared one
stream changes the trained states by ~0.3 (the last test shows a run is sensitive to the masks)."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from colora.cli import main
from colora.engines import Engine
from colora.experiment import run_experiment
from colora.messages import MessageError, bundle, unbundle
from colora.split.group import ServerGroup
from colora.types import ClientTask

from .conftest import cli_error, read_rows, round_one_killing_a_worker, tiny_config, tiny_raw, write_e2e, write_glue

SMALL = dict(data__synthetic_train=72, data__synthetic_eval=32, data__max_length=32, clients__num=4,
             train__optimizer="adamw")


def _tasks(engine: Engine, ranks: list[int], **extra) -> list[ClientTask]:
    """Three clients from perturbed seeded states (B != 0, so LoRA is live from the first step),
    with different start steps and step counts, one with a FedProx anchor, all keeping moments."""
    g = torch.Generator().manual_seed(5)
    tasks = []
    for c, r in enumerate(ranks):
        state = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in engine.adapters.initial_state(r).items()}
        tasks.append(ClientTask(c, state, start_step=c, steps=3 + (c == 1), lr=0.05, rank=r, keep_optimizer=True,
                                prox_anchor=engine.adapters.initial_state(r) if c == 2 else None, **extra))
    return tasks


@pytest.fixture
def float64():
    """A fused pass reduces in another order than K separate ones (one batched matmul over the group),
    so in float32 the trained states differ by ~1e-5 after a few Adam steps, by how much depending on
    the CPU's kernels (2.6e-5 on one machine, under 1e-5 on another). In float64 the same comparison
    agrees to ~1e-14 on any machine: these tests check equality to 1e-9, where a real mistake (another
    client's rows, mask or width) cannot hide under a tolerance sized for rounding."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def _assert_same(seq, fused, tasks, tol=1e-9):
    for a, b, t in zip(seq, fused, tasks):
        assert a.client_id == b.client_id == t.client_id
        assert a.state.keys() == b.state.keys() and a.moments.keys() == b.moments.keys()
        moved = max((a.state[k] - t.state[k]).abs().max().item() for k in a.state)
        assert moved > 1e-3  # the clients really trained
        for k in a.state:
            assert tol > 1e-6 or a.state[k].dtype == b.state[k].dtype == torch.float64  # exact only in float64
            torch.testing.assert_close(b.state[k], a.state[k], rtol=0, atol=tol)
        for k in a.moments:
            torch.testing.assert_close(b.moments[k].float(), a.moments[k].float(), rtol=0, atol=tol)
        assert b.loss == pytest.approx(a.loss, abs=tol)
        assert (b.flops, b.steps, b.num_samples) == (a.flops, a.steps, a.num_samples)


TRAINER_CASES = {
    "tiny-bert": {},
    "mixed-ranks-pooler": dict(federation__aggregator="zero_pad", federation__ranks=[2, 4, 8, 4],
                               model__lora__modules_to_save=["pooler"]),
    "bf16": dict(train__precision="bf16"),
    "sgd-clip": dict(train__optimizer="sgd", train__max_grad_norm=1.0, train__prox_mu=0.5),
    "tiny-gpt2": dict(model__name="tiny-gpt2"),
    "tiny-llama": dict(model__name="tiny-llama", model__dropout=0.1),
}


@pytest.mark.parametrize("case", list(TRAINER_CASES))
def test_a_fused_group_trains_each_client_as_alone(case, request):
    if case != "bf16":  # bf16 autocast rounds to 8 bits of mantissa whatever the default dtype
        request.getfixturevalue("float64")
    over = TRAINER_CASES[case]
    cfg = tiny_config(**{**SMALL, **over})
    with Engine(cfg) as engine:
        trainer = engine.runtime.trainer
        tasks = _tasks(engine, over.get("federation__ranks", [8, 8, 8, 8])[:3])
        seq = [trainer.run(t) for t in tasks]
        fused = trainer.run_fused(tasks)
    _assert_same(seq, fused, tasks, tol=1e-2 if case == "bf16" else 1e-9)


def test_fused_labels_regression_and_label_flip(tmp_path, float64):
    """STS-B (one regression output) and an attacker's flipped labels go through the fused loss."""
    root = tmp_path / "glue"
    write_glue(root, "STS-B")
    cfg = tiny_config(**{**SMALL, "clients__num": 3}, data__name="glue/stsb", data__path=str(root / "STS-B"))
    with Engine(cfg) as engine:
        tasks = _tasks(engine, [8, 8, 8])
        trainer = engine.runtime.trainer
        _assert_same([trainer.run(t) for t in tasks], trainer.run_fused(tasks), tasks)
    cfg = tiny_config(**SMALL)
    with Engine(cfg) as engine:
        tasks = _tasks(engine, [8, 8, 8], flip_labels=engine.task.num_labels)
        trainer = engine.runtime.trainer
        _assert_same([trainer.run(t) for t in tasks], trainer.run_fused(tasks), tasks)


def test_fused_causal_lm(tmp_path, float64):
    """Next-token loss per client over its own scored tokens, at its own width (E2E on tiny-gpt2)."""
    data = write_e2e(tmp_path / "e2e")
    cfg = tiny_config(**{**SMALL, "clients__num": 3, "data__max_length": 64}, model__name="tiny-gpt2",
                      model__task="causal-lm", data__name="e2e", data__path=str(data))
    with Engine(cfg) as engine:
        tasks = _tasks(engine, [8, 8, 8])
        trainer = engine.runtime.trainer
        _assert_same([trainer.run(t) for t in tasks], trainer.run_fused(tasks), tasks)


RUN = dict(data__synthetic_train=72, data__synthetic_eval=32, data__max_length=32, rounds=2, clients__num=4,
           clients__per_round=4, train__local_steps=2, train__lr=0.05)
RUN_CASES = {
    "fedavg-fedit-prox-fedadam": dict(train__prox_mu=0.1, federation__server_optimizer="fedadam", federation__server_lr=0.01),
    "fedavg-zero_pad-mixed-keep": dict(federation__aggregator="zero_pad", federation__ranks=[2, 4, 8, 4],
                                       train__optimizer="adamw", train__client_optimizer="keep"),
    "fedavg-stack-mixed": dict(federation__aggregator="stack", federation__ranks=[2, 4, 8, 4]),  # FLoRA: merged base
    "fedavg-hlora": dict(federation__aggregator="hlora"),
    "declora-choco": dict(algorithm="declora", gossip__topology="ring", gossip__quantize_bits=4),
    # split: the clients' parts fused, and the per-client server copies fused
    "splitlora-per_client-pooler": dict(algorithm="splitlora", split__layer=2, split__server="per_client",
                                        model__lora__modules_to_save=["pooler"]),
    "splitlora-per_client-u_shaped-mixed-keep": dict(
        algorithm="splitlora", split__layer=2, split__server="per_client", split__u_shaped=True,
        federation__aggregator="svd", federation__ranks=[2, 4, 8, 4], train__optimizer="adamw", train__client_optimizer="keep"),
    "splitlora-per_client-gpt2-bf16-activations": dict(algorithm="splitlora", split__layer=1, split__server="per_client",
                                                        model__name="tiny-gpt2", split__activation_dtype="bf16"),
}


def _run(tmp_path, name: str, **over) -> list[float]:
    run_experiment(tiny_config(**RUN, **over), tmp_path / name)
    return [r["eval/loss"] for r in read_rows(tmp_path / name)]


def _rows(tmp_path, name: str, **over) -> list[dict]:
    run_experiment(tiny_config(**RUN, **over), tmp_path / name)
    return read_rows(tmp_path / name)


@pytest.mark.parametrize("case", list(RUN_CASES))
def test_fused_runs_equal_sequential_runs(tmp_path, case):
    seq = _rows(tmp_path, "seq", **RUN_CASES[case])
    fused = _rows(tmp_path, "fused", **RUN_CASES[case], engine__fuse=3)  # groups of 3 and 1 (4 clients a round)
    loss = [r["eval/loss"] for r in seq]
    assert [r["eval/loss"] for r in fused] == pytest.approx(loss, abs=1e-5)
    assert [r["train_loss"] for r in fused[1:]] == pytest.approx([r["train_loss"] for r in seq[1:]], abs=1e-5)
    assert abs(loss[-1] - loss[0]) > 1e-3  # the run moved
    # bytes are counted per client message and FLOPs per client's own pass: the cost model agrees
    for key in ("bytes_up", "bytes_down", "sim_time_s"):
        assert [r[key] for r in fused] == [r[key] for r in seq], key


@pytest.mark.parametrize("case", ["fedavg-zero_pad-mixed-keep", "splitlora-per_client-u_shaped-mixed-keep"])
def test_fused_on_workers_equals_inprocess(tmp_path, case):
    """Workers get a fused group as one bundled task, or one bundled split conversation."""
    seq = _run(tmp_path, "seq", **RUN_CASES[case])
    fused = _run(tmp_path, "fused", **RUN_CASES[case], engine__fuse=2, engine__kind="workers", engine__workers=2)
    assert fused == pytest.approx(seq, abs=1e-5)
    memory = json.loads((tmp_path / "fused" / "system.json").read_text())["memory"]["fuse"]
    assert memory["fuse"] == 2 and memory["fits"] and memory["max_fuse"] >= 2


def test_the_masks_matter(tmp_path):
    """The base model's dropout matters to these runs: turned off, the eval losses move by far more
    than the tolerance, so a fused pass that drew other masks would fail the equalities above."""
    on = _run(tmp_path, "on", **RUN_CASES["fedavg-hlora"])
    off = _run(tmp_path, "off", **RUN_CASES["fedavg-hlora"], model__dropout=0.0)
    assert max(abs(a - b) for a, b in zip(on[1:], off[1:])) > 1e-4


def test_bundles_round_trip_and_refuse_garbage():
    blobs = [b"", b"abc", bytes(range(256))]
    assert unbundle(bundle(blobs)) == blobs
    with pytest.raises(MessageError):
        unbundle(b"not a bundle")


def test_fuse_settings_are_checked(tmp_path, capsys):
    raw, _ = tiny_raw()
    err = cli_error(tmp_path, capsys, raw, ["engine.fuse=0"])
    assert "engine.fuse" in err
    # 64 clients of batch 512 x 512 tokens at once cannot fit in this machine's memory: refused up front
    err = cli_error(tmp_path, capsys, raw, ["engine.fuse=64", "train.batch_size=512", "data.max_length=512"])
    assert "engine.fuse=64" in err and "engine.fuse<=" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_resume_with_another_fuse_ends_equal(tmp_path):
    case = RUN_CASES["fedavg-zero_pad-mixed-keep"]
    seq = _run(tmp_path, "seq", **case)
    part = run_experiment(tiny_config(**RUN, **case), out=str(tmp_path / "part"), stop_after=1)
    assert main(["run", "--resume", str(part), "--set", "engine.fuse=4"]) == 0
    assert [r["eval/loss"] for r in read_rows(part)] == pytest.approx(seq, abs=1e-5)


def test_a_worker_killed_mid_fused_split_group_is_replayed(tmp_path, capsys):
    """Kill -9 the worker holding a fused group's client parts after the server answered the group:
    the new worker replays the group's conversation from the transcript and the run does not change.
    The reference fuses the same groups in process: the replay must be exact, not merely within the
    float32 rounding that separates a fused pass from a sequential one."""
    case = RUN_CASES["splitlora-per_client-u_shaped-mixed-keep"]
    with Engine(tiny_config(**RUN, **case, engine__fuse=2)) as ref, \
            Engine(tiny_config(**RUN, **case, engine__kind="workers", engine__workers=2, engine__fuse=2)) as eng:
        def kill():  # the worker of group 0
            os.kill(eng.executor.pids()[0], signal.SIGKILL)
            eng.executor.dispatcher.transport.procs[0].join(10)
        round_one_killing_a_worker(ServerGroup, ref, eng, kill)
        assert eng.executor.dispatcher.restarts == 1
        for k, v in eng.algorithm.global_state().items():
            torch.testing.assert_close(v, ref.algorithm.global_state()[k], rtol=0, atol=1e-6)
    assert capsys.readouterr().out.count("colora: workers worker 0 (pid") == 1
