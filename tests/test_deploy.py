"""Deployment for real, on loopback: ``colora deploy server`` (a Flower SuperLink with TLS and
SuperNode authentication) and data-owner processes (``colora deploy client``, each with its
SuperNode), started as subprocesses on 127.0.0.1 and ended by the tests, whatever happens."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from colora.config import build_config
from colora.deploy.owner import free_port
from colora.deploy.partition import split_data
from colora.deploy.pki import make_credentials
from colora.experiment import run_experiment

from .conftest import read_rows, tiny_raw

WAIT_S = 300.0


class Federation:
    """A config, its credentials (one spare owner key, never registered) and the owners' folders,
    and every process started on them (each in its own session, killed with its children)."""

    def __init__(self, root: Path, clients: int = 3, **over):
        raw, over = tiny_raw(**over)
        self.cfg = build_config(raw, {k.replace("__", "."): v for k, v in over.items()})
        self.root, self.clients, self.port, self.procs = root, clients, free_port(), []
        root.mkdir(parents=True)
        self.config = root / "exp.yaml"
        self.config.write_text(yaml.safe_dump(self.cfg.model_dump(mode="json", exclude_none=True)))
        make_credentials(root / "pki", clients + 1, ["127.0.0.1"])
        split_data(self.cfg, root / "data")

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "colora", "deploy", *args], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        proc.log_path = self.root / f"{name}.log"
        self.procs.append(proc)
        return proc

    def server(self, *extra: str, resume: bool = False) -> subprocess.Popen:
        pki = self.root / "pki"
        where = ["--resume", str(self.root / "run")] if resume else [str(self.config), "--out", str(self.root / "run")]
        return self._start("server", [
            "server", *where, "--credentials", str(pki), "--data", str(self.root / "data" / "server"),
            "--port", str(self.port), "--owner-keys", *[str(pki / f"client_{k}.pub") for k in range(self.clients)], *extra])

    def owner(self, k: int, key: int | None = None, *extra: str) -> subprocess.Popen:
        pki = self.root / "pki"
        return self._start(f"owner{k}-{len(self.procs)}", [
            "client", str(self.config), "--data", str(self.root / "data" / f"client_{k}"), "--server", f"127.0.0.1:{self.port}",
            "--ca", str(pki / "ca.crt"), "--key", str(pki / f"client_{k if key is None else key}"), *extra])

    def owners(self) -> list[subprocess.Popen]:
        """Every owner, one after another once the previous one's SuperNode is connected (on two
        cores, owners loading their models at once starve the SuperLink's answers)."""
        out = []
        for k in range(self.clients):
            out.append(self.owner(k))
            wait_for(out[-1], "colora: connected")
        return out

    def close(self) -> None:
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def log_of(proc) -> str:
    return Path(proc.log_path).read_text()


def wait_for(proc, pattern: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not re.search(pattern, log_of(proc)):
        assert proc.poll() is None or re.search(pattern, log_of(proc)), f"exited {proc.returncode} before {pattern!r}:\n{log_of(proc)[-3000:]}"
        assert time.monotonic() < deadline, f"no {pattern!r} within {timeout} s:\n{log_of(proc)[-3000:]}"
        time.sleep(0.5)


def finish(proc, timeout: float = WAIT_S) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {timeout} s:\n{log_of(proc)[-3000:]}")


@pytest.fixture
def federation(tmp_path):
    feds = []

    def make(**over) -> Federation:
        feds.append(Federation(tmp_path / f"fed{len(feds)}", **over))
        return feds[-1]

    yield make
    for f in feds:
        f.close()


def test_fedavg_deployed_equals_the_simulation_and_strangers_are_refused(federation, tmp_path):
    fed = federation(rounds=2, clients__partition="dirichlet", clients__alpha=0.5, federation__round_timeout_s=120)
    server = fed.server()
    wait_for(server, "waiting for them to join")
    # the spare key was never registered: its SuperNode is refused and the owner says so (exit 2)
    stranger = fed.owner(0, fed.clients, "--join-timeout", "1")
    assert finish(stranger) == 2
    line = log_of(stranger).strip().splitlines()[-1]
    assert line.startswith("colora: error: ") and "refused this node" in line
    owners = fed.owners()
    assert finish(server) == 0, log_of(server)[-3000:]
    assert all(finish(o) == 0 for o in owners)
    sim = run_experiment(fed.cfg, out=str(tmp_path / "sim"))
    dep_rows, sim_rows = read_rows(fed.root / "run"), read_rows(sim)
    assert [r["round"] for r in dep_rows] == [0, 1, 2]
    for a, b in zip(sim_rows, dep_rows, strict=True):
        for key in ("eval/loss", "eval/accuracy", "train_loss", "bytes_up", "bytes_down", "sim_time_s"):
            assert a[key] == pytest.approx(b[key], abs=1e-6) if a[key] is not None else b[key] is None, key
        if b["round"] > 0:  # what Flower carried: the payloads plus its own framing of them
            assert b["dropouts"] == [] and b["wire_bytes_up"] > b["bytes_up"] / b["round"] and b["round_wall_s"] > 0
    for name in ("config.yaml", "partition.json", "summary.json", "adapter"):
        assert (fed.root / "run" / name).exists()


def _deployed_equals_simulated(fed: Federation, sim_dir: Path, keys: tuple[str, ...]) -> None:
    """Run ``fed``'s config deployed (server and owners to the end) and simulated; every row's ``keys`` agree."""
    server = fed.server()
    wait_for(server, "waiting for them to join")
    owners = fed.owners()
    assert finish(server) == 0, log_of(server)[-3000:]
    assert all(finish(o) == 0 for o in owners)
    sim = read_rows(run_experiment(fed.cfg, out=str(sim_dir)))
    for a, b in zip(sim, read_rows(fed.root / "run"), strict=True):
        for key in keys:
            assert a.get(key) == pytest.approx(b.get(key), abs=1e-6) if a.get(key) is not None else b.get(key) is None, key


def test_secure_aggregation_deployed_matches_the_simulation_within_its_quantization(federation, tmp_path):
    """SecAgg+ (real masks, real Shamir shares, 3 owners): the server's global equals the plain
    weighted mean of the simulation within the protocol's rounding (values on a 16/2^22 grid,
    stochastically rounded), and the protocol's masked vectors and key exchanges are on the wire."""
    fed = federation(rounds=2, clients__partition="dirichlet", clients__alpha=0.5, federation__round_timeout_s=120,
                     federation__secure_aggregation=True)
    server = fed.server()
    wait_for(server, "waiting for them to join")
    owners = fed.owners()
    assert finish(server) == 0, log_of(server)[-3000:]
    assert all(finish(o) == 0 for o in owners)
    assert log_of(server).count("Secure aggregation completed") == 2  # Flower's SecAgg+ workflow, once a round
    sim = read_rows(run_experiment(fed.cfg, out=str(tmp_path / "sim")))
    plain = read_rows(run_experiment(build_config(fed.cfg.model_dump(mode="json"), {"federation.secure_aggregation": False}),
                                     out=str(tmp_path / "plain")))
    dep = read_rows(fed.root / "run")
    assert [r["round"] for r in dep] == [0, 1, 2]
    for a, p, b in zip(sim, plain, dep, strict=True):
        assert a["eval/loss"] == p["eval/loss"]  # simulated, the secure sum is the plain weighted mean exactly
        assert b["eval/loss"] == pytest.approx(a["eval/loss"], abs=1e-4)
        if b["round"] > 0:
            assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-3) and b["dropouts"] == []
            assert b["wire_bytes_up"] > 1.5 * b["bytes_up"] / b["round"]  # masked 64-bit vectors and key shares


def test_splitlora_u_shaped_deployed_equals_the_simulation(federation, tmp_path):
    fed = federation(algorithm="splitlora", rounds=2, split__layer=2, split__u_shaped=True, split__server="per_client",
                     train__local_steps=1, federation__round_timeout_s=120)
    _deployed_equals_simulated(fed, tmp_path / "sim", ("eval/loss", "train_loss", "bytes_up", "bytes_down", "sim_time_s"))


def test_declora_deployed_equals_the_simulation_and_nodes_mix_themselves(federation, tmp_path):
    fed = federation(algorithm="declora", rounds=2, gossip__topology="ring", federation__round_timeout_s=120)
    _deployed_equals_simulated(fed, tmp_path / "sim", ("eval/loss", "train_loss", "bytes_up", "bytes_down", "consensus_distance"))


def test_a_killed_owner_is_a_dropout_and_rejoins_after_a_restart(federation):
    fed = federation(rounds=10, federation__round_timeout_s=15, federation__min_clients=2, train__local_steps=1)
    server = fed.server()
    wait_for(server, "waiting for them to join")
    owners = fed.owners()
    wait_for(server, r"round 1/10")
    os.killpg(owners[2].pid, signal.SIGKILL)  # kill -9 of the owner and its SuperNode, in round 2
    fed.owner(2)  # back at once: Flower admits its node again once the old one's heartbeat lapses
    assert finish(server) == 0, log_of(server)[-3000:]
    rows = read_rows(fed.root / "run")
    assert [r["round"] for r in rows] == list(range(11))
    dropped = [r["round"] for r in rows[1:] if r["dropouts"] == [2]]
    assert dropped and all(r["dropouts"] in ([], [2]) for r in rows[1:])
    assert any(r["dropouts"] == [] for r in rows if r["round"] > max(dropped)), "the restarted owner never rejoined"
    assert all(r["clients"] == 3 - len(r["dropouts"]) for r in rows[1:])
    assert "client 2 dropped out of this round" in log_of(server)


def test_a_killed_server_resumes_and_its_owners_reconnect(federation, tmp_path):
    fed = federation(rounds=4, federation__round_timeout_s=120)
    server = fed.server()
    wait_for(server, "waiting for them to join")
    owners = fed.owners()
    wait_for(server, r"round 2/4")
    os.killpg(server.pid, signal.SIGKILL)  # kill -9 of the server, its SuperLink and its ServerApp
    server.wait()
    done = [r["round"] for r in read_rows(fed.root / "run")]
    assert 2 <= done[-1] < 4  # round 3 may have finished or been in flight
    resumed = fed.server(resume=True)
    assert finish(resumed) == 0, log_of(resumed)[-3000:]
    assert all(finish(o) == 0 for o in owners)  # the same owner processes, reconnected
    sim = read_rows(run_experiment(fed.cfg, out=str(tmp_path / "sim")))
    rows = read_rows(fed.root / "run")
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    for a, b in zip(sim, rows, strict=True):  # nothing lost but the round in flight, which ran again
        for key in ("eval/loss", "train_loss", "bytes_up", "bytes_down"):
            assert a[key] == pytest.approx(b[key], abs=1e-6) if a[key] is not None else b[key] is None, key


def test_an_owner_whose_server_does_not_answer_says_so(federation):
    fed = federation(clients=1, clients__num=1, clients__per_round=1, rounds=1)
    owner = fed.owner(0, None, "--join-timeout", "3")  # nothing listens on fed.port
    assert finish(owner, 120) == 2
    line = log_of(owner).strip().splitlines()[-1]
    assert line.startswith("colora: error: ") and f"127.0.0.1:{fed.port}" in line and "did not answer" in line


def test_an_owner_on_another_config_stops_both_sides_with_one_line(federation):
    fed = federation(clients=1, clients__num=1, clients__per_round=1, rounds=1)
    server = fed.server()
    wait_for(server, "waiting for them to join")
    owner = fed.owner(0, None, "--set", "train.lr=0.1")
    assert finish(owner) == 2 and finish(server) == 2
    for proc, says in ((owner, "the server runs another config"), (server, "refused to join")):
        line = log_of(proc).strip().splitlines()[-1]
        assert line.startswith("colora: error: ") and says in line, log_of(proc)[-2000:]
    assert not (fed.root / "run").exists()  # nothing ran, nothing half-written
