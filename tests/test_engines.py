"""Every paradigm gives the same run on every engine: ``inprocess`` (the reference), ``workers``
(worker processes mapping one base file) and ``ray`` (actors on a real two-node local cluster,
``ray.cluster_utils.Cluster``). Tasks and split conversations cross the engine boundary as bytes
only, and every generator is derived from (seed, client, step), so the runs agree exactly; the
tests allow 1e-6 in eval loss. A killed worker is restarted and its work rerun with no change."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from colora.cli import main
from colora.config import ColoraError
from colora.engines import Engine
from colora.experiment import run_experiment
from colora.messages import decode_result, decode_task, encode_result, encode_task
from colora.split.server import SplitServer
from colora.types import ClientResult, ClientTask

from .conftest import cli_error, read_rows, round_one_killing_a_worker, tiny_config, tiny_raw

SMALL = dict(data__synthetic_train=72, data__synthetic_eval=32, data__max_length=32, rounds=2, clients__num=4,
             clients__per_round=3, train__local_steps=2)
ADAMW_KEEP = dict(train__optimizer="adamw", train__lr=0.01, train__client_optimizer="keep")
MIXED = dict(federation__ranks=[2, 4, 8, 4])

# One run per row covers each paradigm and the state a client's task must carry: kept optimizer
# moments, FedProx anchors, mixed ranks through every aggregator, FLoRA's merged base, server
# optimizers, split both server modes and U-shaped, compressed time-varying gossip, a pooler trained in full.
CASES = {
    "central": dict(algorithm="central", **ADAMW_KEEP),
    "fedavg-fedit-fedadam-prox": dict(federation__server_optimizer="fedadam", federation__server_lr=0.01, train__prox_mu=0.1),
    "fedavg-product": dict(federation__aggregator="product"),
    "fedavg-zero_pad-mixed-keep": dict(federation__aggregator="zero_pad", **MIXED, **ADAMW_KEEP),
    "fedavg-svd-mixed-pooler": dict(federation__aggregator="svd", **MIXED, model__lora__modules_to_save=["pooler"]),
    "fedavg-stack-mixed": dict(federation__aggregator="stack", **MIXED),
    "fedavg-hlora": dict(federation__aggregator="hlora"),  # HLoRA assigns the ranks itself (by data size)
    "sl-u_shaped": dict(algorithm="sl", split__layer=2, split__u_shaped=True),
    "splitlora-shared-keep": dict(algorithm="splitlora", split__layer=1, split__aggregate_every=1, **ADAMW_KEEP),
    "splitlora-per_client-u_shaped-mixed": dict(algorithm="splitlora", split__layer=2, split__server="per_client",
                                                 split__u_shaped=True, federation__aggregator="svd", **MIXED,
                                                 model__lora__modules_to_save=["pooler"]),
    "declora-choco-time_varying": dict(algorithm="declora", gossip__topology="ring", gossip__time_varying=True,
                                        gossip__quantize_bits=4, **ADAMW_KEEP),
}
RAY_CASES = ["central", "fedavg-svd-mixed-pooler", "fedavg-stack-mixed", "sl-u_shaped", "splitlora-per_client-u_shaped-mixed",
             "declora-choco-time_varying"]


def _cfg(case: str, **engine):
    return tiny_config(**SMALL, **CASES[case], **{f"engine__{k}": v for k, v in engine.items()})


def _losses(run_dir) -> list[float]:
    return [r["eval/loss"] for r in read_rows(run_dir)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Each case's eval losses on the in-process engine (computed once per case)."""
    cache: dict[str, list[float]] = {}

    def get(case: str) -> list[float]:
        if case not in cache:
            cache[case] = _losses(run_experiment(_cfg(case), out=str(tmp_path_factory.mktemp(case) / "run")))
        return cache[case]
    return get


def _assert_equal(ref: list[float], got: list[float]) -> None:
    assert len(ref) == len(got) == SMALL["rounds"] + 1
    assert abs(ref[-1] - ref[0]) > 1e-5  # training moved the model
    assert max(abs(a - b) for a, b in zip(ref, got)) < 1e-6, (ref, got)


@pytest.mark.parametrize("case", list(CASES))
def test_workers_equal_inprocess(tmp_path, reference, case):
    run = run_experiment(_cfg(case, kind="workers", workers=2), out=str(tmp_path / "w"))
    _assert_equal(reference(case), _losses(run))
    engine = json.loads((run / "summary.json").read_text())["engine"]
    assert engine == {"kind": "workers", "workers": 2, "device": "cpu", "worker_restarts": 0}


def test_messages_round_trip_every_field():
    state = {"b.lora_A.weight": torch.randn(2, 3), "a.lora_B.weight": torch.randn(3, 2)}
    task = ClientTask(3, state, 7, 2, 0.01, prox_anchor=state, keep_optimizer=True, rank=2, base_delta=None,
                      moments={"b.lora_A.weight#exp_avg": torch.ones(2, 3), "b.lora_A.weight#step": torch.tensor(4.0)})
    back = decode_task(encode_task(task))
    assert (back.client_id, back.start_step, back.steps, back.lr, back.keep_optimizer, back.rank, back.base_delta) == \
        (3, 7, 2, 0.01, True, 2, None)
    for got, want in ((back.state, state), (back.prox_anchor, state), (back.moments, task.moments)):
        assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)  # order kept
    result = ClientResult(3, state, 40, 0.5, 1e6, 2)
    again = decode_result(encode_result(result))
    assert again.moments is None and again.num_samples == 40 and list(again.state) == list(state)


def test_resume_on_another_engine_ends_equal(tmp_path, reference):
    case = "fedavg-zero_pad-mixed-keep"
    part = run_experiment(_cfg(case), out=str(tmp_path / "part"), stop_after=1)
    assert main(["run", "--resume", str(part), "--set", "engine.kind=workers", "--set", "engine.workers=2"]) == 0
    _assert_equal(reference(case), _losses(part))


def _kill(engine: Engine, worker: int) -> None:
    os.kill(engine.executor.pids()[worker], signal.SIGKILL)
    engine.executor.dispatcher.transport.procs[worker].join(10)


def test_a_killed_worker_is_restarted_and_changes_nothing(tmp_path, capsys):
    """Kill -9 a worker between rounds and one in the middle of a split conversation (after the
    server answered it): the work is rerun, the server part replayed from its transcript, and the
    run equals the in-process one."""
    cfg = _cfg("fedavg-svd-mixed-pooler", kind="workers", workers=2)
    with Engine(tiny_config(**SMALL, **CASES["fedavg-svd-mixed-pooler"])) as ref, Engine(cfg) as eng:
        for rnd in (1, 2):
            ref.algorithm.run_round(rnd)
            eng.algorithm.run_round(rnd)
            if rnd == 1:
                _kill(eng, 0)
        assert eng.executor.dispatcher.restarts == 1 and eng.summary()["worker_restarts"] == 1
        assert all(torch.equal(ref.algorithm.global_state()[k], v) for k, v in eng.algorithm.global_state().items())

    case = "splitlora-per_client-u_shaped-mixed"
    with Engine(tiny_config(**SMALL, **CASES[case])) as ref, Engine(_cfg(case, kind="workers", workers=2)) as eng:
        round_one_killing_a_worker(SplitServer, ref, eng, lambda: _kill(eng, 0))  # the worker of job 0
        assert eng.executor.dispatcher.restarts == 1
        assert all(torch.equal(ref.algorithm.global_state()[k], v) for k, v in eng.algorithm.global_state().items())
    assert capsys.readouterr().out.count("colora: workers worker 0 (pid") == 2  # each restart is logged


def test_worker_errors_reach_the_driver_as_one_line(tmp_path):
    cfg = tiny_config(**SMALL, engine__kind="workers", engine__workers=2, train__lr=1e30)
    with pytest.raises(ColoraError, match="NaN or inf"):
        run_experiment(cfg, out=str(tmp_path / "nan"))


@pytest.mark.parametrize("sets,message", [
    (["engine.workers=0"], "engine.workers"),
    (["engine.kind=workers", f"engine.workers={(os.cpu_count() or 1) + 1}"], "cores of this machine"),
    (["engine.kind=threads"], "engine.kind"),
    (["engine.address=auto"], "is for kind=ray"),
    (["engine.kind=workers", "model.quantize=int8"], "needs engine.kind=inprocess"),
])
def test_bad_engine_settings_exit_2(tmp_path, capsys, sets, message):
    assert message in cli_error(tmp_path, capsys, tiny_raw()[0], sets)


def test_ray_without_the_extra_says_what_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(ColoraError, match=r"pip install 'colora\[ray\]'"):
        Engine(tiny_config(**SMALL, engine__kind="ray"))


# -- Ray: a real local cluster of two nodes ------------------------------------------------------

@pytest.fixture(scope="module")
def ray_cluster():
    import ray  # the ray extra is part of the test install (make setup: .[test,ray,...])
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    if ray.is_initialized():
        ray.shutdown()
    cluster.shutdown()


@pytest.mark.parametrize("case", RAY_CASES)
def test_ray_on_a_two_node_cluster_equals_inprocess(tmp_path, reference, ray_cluster, case):
    run = run_experiment(_cfg(case, kind="ray", workers=2, address=ray_cluster.address), out=str(tmp_path / "r"))
    _assert_equal(reference(case), _losses(run))


def test_ray_actors_spread_over_both_nodes_and_a_killed_actor_changes_nothing(ray_cluster, capsys):
    case = "fedavg-svd-mixed-pooler"
    with Engine(tiny_config(**SMALL, **CASES[case])) as ref, \
            Engine(_cfg(case, kind="ray", workers=2, address=ray_cluster.address)) as eng:
        for rnd in (1, 2):
            ref.algorithm.run_round(rnd)
            eng.algorithm.run_round(rnd)
            actors = eng.executor.dispatcher.transport
            if rnd == 1:
                assert len(set(actors.node_ids)) == 2  # one actor on each node (SPREAD)
                actors.kill(1)
        assert eng.executor.dispatcher.restarts == 1
        assert all(torch.equal(ref.algorithm.global_state()[k], v) for k, v in eng.algorithm.global_state().items())
    assert "colora: ray worker 1 (a Ray actor) died" in capsys.readouterr().out


def test_ray_with_fewer_cpus_than_workers_says_so_and_frees_the_cluster(ray_cluster, monkeypatch):
    from colora.engines import ray_engine

    monkeypatch.setattr(ray_engine, "_START_TIMEOUT_S", 5.0)  # the autoscaler's grace, shortened for the test
    case = "fedavg-svd-mixed-pooler"
    with pytest.raises(ColoraError, match=r"of 3 actors did not start within 5 s") as err, \
            Engine(_cfg(case, kind="ray", workers=3, address=ray_cluster.address)) as eng:
        eng.algorithm.run_round(1)
    assert "the cluster has 2 for 3" in str(err.value)
    with Engine(_cfg(case, kind="ray", workers=2, address=ray_cluster.address)) as eng:  # both CPUs free again
        eng.algorithm.run_round(1)
        assert eng.executor.dispatcher.restarts == 0


def test_unreachable_ray_address_exits_2(tmp_path, capsys):
    err = cli_error(tmp_path, capsys, tiny_raw()[0], ["engine.kind=ray", "engine.address=127.0.0.1:9"])
    assert "cannot connect to a Ray cluster" in err
