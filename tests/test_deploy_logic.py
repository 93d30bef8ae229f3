"""Deployment's own logic without the network: data owners' folders, the owners' answers, the
server's join and its dropouts. The transport here hands bytes straight to each owner's ``handle``
(the same bytes Flower carries in tests/test_deploy.py); what it leaves out is the network."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from colora.cli import main
from colora.codecs import unpack
from colora.config import ColoraError
from colora.data import load_task
from colora.data.party import load_party
from colora.deploy.owner import Owner
from colora.deploy.partition import split_data
from colora.deploy.pki import make_credentials, owner_public_keys
from colora.deploy.remote import RemoteClients, config_fingerprint, join_message, refusal_reason, unwrap_blob, wrap
from colora.engines import Engine
from colora.experiment import run_experiment
from colora.messages import decode, decode_result, encode, encode_result, header

from .conftest import read_rows, tiny_config


class DirectTransport:
    """Bytes to the owners' ``handle`` in this process; ``drop``: {round: clients that do not answer}."""

    def __init__(self, owners: list[Owner], drop: dict[int, set[int]] | None = None):
        self.owners, self.drop, self.node_of, self.calls, self.received, self.sent = owners, drop or {}, {}, 0, [], []

    def broadcast(self, nodes, blob, timeout):
        return {n: self.owners[n].handle(blob) for n in nodes}

    def bind(self, client, node):
        self.node_of[client] = node

    def exchange(self, messages, timeout):
        self.calls += 1
        gone = self.drop.get(self.calls, set())
        answers = {c: self.owners[self.node_of[c]].handle(b) for c, b in messages if c not in gone}
        self.received += answers.values()
        self.sent += [b for _, b in messages]
        return answers

    def wire_bytes(self):
        return 0, 0


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A deployment's keys: client_0 .. client_2 registered, client_3 a stranger's."""
    out = tmp_path_factory.mktemp("pki")
    make_credentials(out, 4, ["127.0.0.1"])
    return out


def _owners(cfg, folders, order=None, pki=None, keys=None):
    """Owners of ``folders`` (in ``order``), each with the key of its folder's client (or ``keys[i]``)."""
    order = order or list(range(len(folders)))
    out = []
    for i, k in enumerate(order):
        key = None if pki is None else pki / f"client_{keys[i] if keys else int(folders[k].name.split('_')[1])}"
        out.append(Owner(cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": str(folders[k])})}), key=key))
    return out


def _registered(pki, n=3):
    return owner_public_keys([pki / f"client_{k}.pub" for k in range(n)])


def _server_cfg(cfg, data):
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": str(data / "server")})})


def _deploy(cfg, data, owners, pki, out, log=None) -> list[dict]:
    """``cfg`` run by a server on ``data/server`` with ``owners`` (joined with their keys); its rows."""
    server_cfg = _server_cfg(cfg, data)
    remote = RemoteClients(server_cfg, owners if isinstance(owners, DirectTransport) else DirectTransport(owners),
                           _registered(pki), **({"log": log} if log else {}))
    remote.join_nodes(list(range(len(remote.transport.owners))))
    return read_rows(run_experiment(server_cfg, out=str(out), remote=remote))


@pytest.fixture
def deployment(tmp_path):
    cfg = tiny_config(rounds=2, clients__partition="dirichlet", clients__alpha=0.5)
    split_data(cfg, tmp_path / "data")
    return cfg, tmp_path / "data"


def test_owner_folders_hold_the_simulations_partition(deployment):
    cfg, data = deployment
    with Engine(cfg) as sim:
        task = load_task("synthetic", None, seed=cfg.seed, synthetic_train=cfg.data.synthetic_train, synthetic_eval=cfg.data.synthetic_eval)
        for k, part in enumerate(sim.train_parts):
            own = load_party(data / f"client_{k}", "synthetic")
            assert own.train.text_a == [task.train.text_a[i] for i in part]  # same rows, same order
            assert own.train.labels == [task.train.labels[i] for i in part] and len(own.eval) == 0
        server = load_party(data / "server", "synthetic")
        assert len(server.train) == 0 and server.eval.text_a == task.eval.text_a


SMALL = dict(data__synthetic_train=72, data__synthetic_eval=32, data__max_length=32, rounds=2, train__local_steps=2)
ADAMW_KEEP = dict(train__optimizer="adamw", train__lr=0.01, train__client_optimizer="keep")
MIXED = dict(federation__ranks=[2, 4, 8])
CASES = {  # every paradigm that deploys, with the state a client's task must carry (as tests/test_engines.py)
    "fedavg-dirichlet": dict(clients__partition="dirichlet", clients__alpha=0.5),
    "fedavg-fedit-fedadam-prox": dict(federation__server_optimizer="fedadam", federation__server_lr=0.01, train__prox_mu=0.1),
    "fedavg-zero_pad-mixed-keep": dict(federation__aggregator="zero_pad", **MIXED, **ADAMW_KEEP),
    "fedavg-svd-mixed-pooler": dict(federation__aggregator="svd", **MIXED, model__lora__modules_to_save=["pooler"]),
    "fedavg-stack-mixed": dict(federation__aggregator="stack", **MIXED),
    "fedavg-hlora": dict(federation__aggregator="hlora"),
    "fedavg-hafl-freeze-mixed": dict(federation__aggregator="hafl", federation__hafl_mode="freeze", **MIXED),
    "fedavg-scaffold-ffa": dict(train__correction="scaffold", federation__lora_mode="ffa"),
    "fedavg-dp-local": dict(privacy__mode="local", privacy__clip=1.0, privacy__noise_multiplier=0.8),
    "fedavg-dp-client": dict(privacy__mode="client", privacy__clip=0.5, privacy__noise_multiplier=0.5),
    "fedavg-trimmed_mean-norm": dict(federation__robust="trimmed_mean", federation__trim_fraction=0.34,
                                     federation__max_update_norm="auto"),
    "sl-u_shaped": dict(algorithm="sl", split__layer=2, split__u_shaped=True),
    "splitlora-shared-keep": dict(algorithm="splitlora", split__layer=1, split__aggregate_every=1, **ADAMW_KEEP),
    "splitlora-per_client-u_shaped-mixed": dict(algorithm="splitlora", split__layer=2, split__server="per_client",
                                                 split__u_shaped=True, federation__aggregator="svd", **MIXED),
    "declora-ring-keep": dict(algorithm="declora", gossip__topology="ring", **ADAMW_KEEP),
    "declora-complete-median": dict(algorithm="declora", gossip__topology="complete", federation__robust="median"),
    "declora-choco-time_varying": dict(algorithm="declora", gossip__topology="ring", gossip__time_varying=True,
                                        gossip__quantize_bits=4, **ADAMW_KEEP),
}


@pytest.mark.parametrize("case", list(CASES))
def test_deployed_rounds_equal_the_simulation_exactly(case, tmp_path, pki):
    cfg = tiny_config(**{**SMALL, **CASES[case]})
    split_data(cfg, tmp_path / "data")
    data = tmp_path / "data"
    sim = run_experiment(cfg, out=str(tmp_path / "sim"))
    server_cfg = _server_cfg(cfg, data)
    # owners join in another order than their client ids: the join binds each id to its owner
    transport = DirectTransport(_owners(cfg, [data / f"client_{k}" for k in range(3)], [2, 0, 1], pki))
    remote = RemoteClients(server_cfg, transport, _registered(pki))
    remote.join_nodes([0, 1, 2])
    dep = run_experiment(server_cfg, out=str(tmp_path / "dep"), remote=remote)
    for a, b in zip(read_rows(sim), read_rows(dep), strict=True):
        if a["round"] > 0:
            assert b["dropouts"] == [] and {"wire_bytes_up", "wire_bytes_down", "round_wall_s"} <= set(b)
        for key in ("eval/loss", "eval/accuracy", "train_loss", "bytes_up", "bytes_down", "sim_time_s", "epsilon"):
            if key in a:
                assert a[key] == pytest.approx(b[key], abs=1e-6) if a[key] is not None else b[key] is None, key
    info = json.loads((dep / "partition.json").read_text())
    assert info["sizes"] == remote.sizes and "histogram" not in info  # the owners' label counts stay with them
    results = [decode_result(b) for b in transport.received if header(b)["kind"] == "result"]
    assert all(r.moments is None for r in results)  # kept optimizer moments stay with their owners
    split_results = [decode(unwrap_blob(decode(b, "split_client")[1]), "split_result")[1] for b in transport.received
                     if header(b)["kind"] == "split_client" and header(b)["done"]]
    assert all(set(g["moments/"]) == {"#held"} for g in split_results)  # a split client part's too: a handle travels
    if cfg.algorithm == "declora":  # every node mixed itself: one mixed state from each node a round
        mixed = [decode(b, "mixed")[0]["node"] for b in transport.received if header(b)["kind"] == "mixed"]
        assert sorted(mixed) == sorted(list(range(3)) * cfg.rounds)
        if cfg.gossip.quantize_bits:  # and compressed its own message q_i
            sent = [header(b)["node"] for b in transport.received if header(b)["kind"] == "choco_q"]
            assert sorted(sent) == sorted(list(range(3)) * cfg.rounds)
            copies = {r: sum(g.startswith("pub") for b in transport.sent if header(b)["kind"] == "choco" and header(b)["round"] == r
                             for g in header(b)["groups"]) for r in (1, 2)}
            assert copies[1] > 0 and copies[2] == 0  # the nodes kept their neighbourhood's public copies
    if cfg.split.u_shaped:  # labels never leave a U-shaped client: not in anything the server received
        uplinks = [unpack(unwrap_blob(decode(b, "split_client")[1])) for b in transport.received
                   if header(b)["kind"] == "split_client" and not header(b)["done"]]
        assert uplinks and all("labels" not in u for u in uplinks)
        assert any("activation" in u or "activation.q" in u for u in uplinks)


def test_a_client_that_does_not_answer_is_a_dropout_and_too_few_answers_stop_the_run(deployment, tmp_path):
    cfg, data = deployment
    folders = [data / f"client_{k}" for k in range(3)]
    server_cfg = _server_cfg(cfg, data)
    remote = RemoteClients(server_cfg, DirectTransport(_owners(cfg, folders), drop={2: {1}}))  # round 2: client 1 silent
    remote.join_nodes([0, 1, 2])
    rows = read_rows(run_experiment(server_cfg, out=str(tmp_path / "dep"), remote=remote))
    assert rows[1]["dropouts"] == [] and rows[1]["clients"] == 3
    assert rows[2]["dropouts"] == [1] and rows[2]["clients"] == 2 and rows[2]["rejected_updates"] == 1
    assert [r.get("dropouts_total") for r in rows] == [None, 0, 1]
    strict = server_cfg.model_copy(update={"federation": server_cfg.federation.model_copy(update={"min_clients": 3})})
    remote = RemoteClients(strict, DirectTransport(_owners(cfg, folders), drop={2: {1}}))
    remote.join_nodes([0, 1, 2])
    with pytest.raises(ColoraError, match="only 2 of 3 clients answered"):
        run_experiment(strict, out=str(tmp_path / "strict"), remote=remote)
    assert [r["round"] for r in read_rows(tmp_path / "strict")] == [0, 1]  # round 1 kept for --resume


def test_owners_refuse_what_is_not_theirs(deployment):
    cfg, data = deployment
    owner = _owners(cfg, [data / "client_1"])[0]
    other = tiny_config(rounds=2, clients__partition="dirichlet", clients__alpha=0.5, train__lr=1e-3)
    assert config_fingerprint(other) != owner.fingerprint
    assert "another config" in refusal_reason(owner.handle(join_message(other)))
    assert owner.finished.is_set() and "another config" in owner.stop_reason  # the owner stops: exit 2
    assert "not a colora message" in refusal_reason(_owners(cfg, [data / "client_1"])[0].handle(b"\x00" * 20))
    fresh = _owners(cfg, [data / "client_1"])[0]
    scalars, _ = decode(fresh.handle(join_message(cfg)), "joined")
    assert scalars == {"client": 1, "samples": fresh.samples, "fingerprint": config_fingerprint(cfg), "signature": ""}
    assert "not one a data owner answers" in refusal_reason(fresh.handle(encode("result", {}, {})))


def test_a_client_id_is_taken_only_with_its_registered_key(deployment, pki):
    cfg, data = deployment
    folders = [data / f"client_{k}" for k in range(3)]
    # client 1's folder, signed with the stranger's key: a registered-but-wrong or unknown node
    owners = _owners(cfg, folders, pki=pki, keys=[0, 3, 2])
    logged = []
    remote = RemoteClients(cfg, DirectTransport(owners), _registered(pki), log=logged.append)
    with pytest.raises(ColoraError, match=r"clients \[1\]"):
        remote.join_nodes([0, 1, 2])
    assert logged == ["colora: a node claiming client 1 did not sign the join with client 1's registered key: ignored"]
    unsigned = _owners(cfg, folders)  # owners without keys cannot answer the challenge at all
    with pytest.raises(ColoraError, match=r"clients \[0, 1, 2\]"):
        RemoteClients(cfg, DirectTransport(unsigned), _registered(pki), log=logged.append).join_nodes([0, 1, 2])
    remote = RemoteClients(cfg, DirectTransport(_owners(cfg, folders, pki=pki)), _registered(pki))
    assert remote.join_nodes([0, 1, 2]) == [len(Owner(cfg.model_copy(update={"data": cfg.data.model_copy(
        update={"path": str(f)})})).runtime.trainer.parts[k]) for k, f in enumerate(folders)]


def test_the_join_refuses_duplicate_or_missing_owners(deployment):
    cfg, data = deployment
    twice = _owners(cfg, [data / "client_0", data / "client_0", data / "client_1"])
    with pytest.raises(ColoraError, match="claims client 0"):
        RemoteClients(cfg, DirectTransport(twice)).join_nodes([0, 1, 2])
    two = _owners(cfg, [data / "client_0", data / "client_1"])
    with pytest.raises(ColoraError, match=r"clients \[2\]"):
        RemoteClients(cfg, DirectTransport(two)).join_nodes([0, 1])


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("colora: error: ") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_bad_deployment_input_is_one_line_and_exit_2(deployment, tmp_path, capsys):
    cfg, data = deployment
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=True)))
    assert main(["deploy", "keys", str(tmp_path / "pki"), "--clients", "4"]) == 0
    pki = tmp_path / "pki"
    owner = ["deploy", "client", str(path), "--data", str(data / "client_0"), "--server", "127.0.0.1:9", "--key", str(pki / "client_0")]
    assert main([*owner, "--ca", str(tmp_path / "missing.crt")]) == 2
    err = _one_error_line(capsys)
    assert "CA certificate" in err and "no such file" in err
    (tmp_path / "bad.crt").write_text("not a certificate")
    assert main([*owner, "--ca", str(tmp_path / "bad.crt")]) == 2
    assert "not a PEM certificate" in _one_error_line(capsys)
    assert main(["deploy", "client", str(path), "--data", str(data / "server"), "--server", "127.0.0.1:9",
                 "--ca", str(pki / "ca.crt"), "--key", str(pki / "client_0")]) == 2
    assert "not a data owner's" in _one_error_line(capsys)
    assert main([*owner, "--ca", str(pki / "ca.crt"), "--set", "data.name=glue/mrpc", "--set", "model.task=seq-cls"]) == 2
    assert "data.name" in _one_error_line(capsys)
    other = tmp_path / "other"
    assert main(["deploy", "keys", str(other), "--clients", "1"]) == 0
    server = ["deploy", "server", str(path), "--owner-keys", *[str(pki / f"client_{k}.pub") for k in range(3)],
              "--data", str(data / "server"), "--out", str(tmp_path / "run")]
    (tmp_path / "mixed").mkdir()
    for name, source in (("ca.crt", other), ("server.pem", pki), ("server.key", pki)):
        (tmp_path / "mixed" / name).write_bytes((source / name).read_bytes())
    assert main([*server, "--credentials", str(tmp_path / "mixed")]) == 2
    assert "not signed by CA" in _one_error_line(capsys)
    assert main([*server, "--credentials", str(pki), "--set", "algorithm=central"]) == 2
    assert "central pools" in _one_error_line(capsys)
    assert main([*server, "--credentials", str(pki), "--set", "clients.byzantine.fraction=0.3"]) == 2
    assert "clients.byzantine simulates" in _one_error_line(capsys)
    assert main([*server, "--credentials", str(pki), "--set", "engine.fuse=2"]) == 2
    assert "engine.fuse=2" in _one_error_line(capsys)
    assert main([*server, "--credentials", str(pki), "--set", "clients.num=4", "--set", "clients.per_round=4"]) == 2
    assert "3 keys for clients.num=4" in _one_error_line(capsys)
    assert main([*server[:4], str(pki / "client_0.pub"), str(pki / "client_2.pub"), str(pki / "ca.crt"), *server[7:],
                 "--credentials", str(pki)]) == 2
    assert "ca.crt: missing or not an OpenSSH public key" in _one_error_line(capsys)
    assert main([*server[:4], str(pki / "client_0.pub"), str(pki / "client_2.pub"), str(pki / "client_3.pub"), *server[7:],
                 "--credentials", str(pki)]) == 2
    assert "clients [0, 2, 3] given" in _one_error_line(capsys)
    assert main(["deploy", "split-data", str(path), str(data)]) == 2
    assert "not empty" in _one_error_line(capsys)


def test_message_scalars_cannot_shadow_the_format():
    # a scalar named like the format's own fields would silently replace them (a mix job's
    # neighbourhood order once did: the message then failed to decode on the other side)
    for name in ("kind", "groups", "order"):
        with pytest.raises(ValueError, match="reserves"):
            encode("mix", {name: [1, 2]}, {})


def test_a_malformed_split_update_is_dropped_not_aggregated(tmp_path, pki):
    cfg = tiny_config(**{**SMALL, "algorithm": "splitlora", "split__layer": 1, "train__local_steps": 1})
    split_data(cfg, tmp_path / "data")
    data = tmp_path / "data"
    owners = _owners(cfg, [data / f"client_{k}" for k in range(3)], pki=pki)
    honest = owners[1].handle

    def poisoned(blob):  # client 1 ends every split step with NaN in its adapter
        answer = honest(blob)
        if header(answer)["kind"] == "split_client" and header(answer)["done"]:
            scalars, groups = decode(unwrap_blob(decode(answer, "split_client")[1]), "split_result")
            state = {k: torch.full_like(v, float("nan")) for k, v in groups["state/"].items()}
            answer = wrap("split_client", encode("split_result", scalars, {"state/": state, "moments/": groups.get("moments/")}), done=True)
        return answer

    owners[1].handle = poisoned
    logged = []
    rows = _deploy(cfg, data, owners, pki, tmp_path / "dep", logged.append)
    assert [r["dropouts"] for r in rows[1:]] == [[1], [1]]
    assert all(math.isfinite(r["eval/loss"]) for r in rows)  # the NaN never reached the aggregate
    assert any("client 1's split update dropped" in line and "NaN" in line for line in logged)


def test_a_choco_node_that_lost_its_copies_gets_them_again(tmp_path, pki):
    cfg = tiny_config(**{**SMALL, **CASES["declora-choco-time_varying"], "rounds": 3})
    split_data(cfg, tmp_path / "data")
    data = tmp_path / "data"
    sim = read_rows(run_experiment(cfg, out=str(tmp_path / "sim")))
    owners = _owners(cfg, [data / f"client_{k}" for k in range(3)], pki=pki)
    handle, forgot = owners[1].handle, []

    def restarted(blob):  # owner 1 comes back in round 2 without the copies it kept
        if header(blob)["kind"] == "choco" and header(blob)["round"] == 2 and not forgot:
            owners[1].copies.clear()
            forgot.append(True)
        return handle(blob)

    owners[1].handle = restarted
    rows = _deploy(cfg, data, owners, pki, tmp_path / "dep")
    assert forgot and [r["eval/loss"] for r in rows] == pytest.approx([r["eval/loss"] for r in sim], abs=1e-6)


def test_a_result_that_claims_more_rows_than_its_owner_joined_with_is_dropped(deployment, tmp_path, pki):
    cfg, data = deployment
    owners = _owners(cfg, [data / f"client_{k}" for k in range(3)], pki=pki)
    honest = owners[2].handle

    def inflated(blob):  # client 2 claims 100x its rows to weigh more in the average
        answer = honest(blob)
        if header(answer)["kind"] == "result":
            result = decode_result(answer)
            result.num_samples *= 100
            answer = encode_result(result)
        return answer

    owners[2].handle = inflated
    logged = []
    rows = _deploy(cfg, data, owners, pki, tmp_path / "dep", logged.append)
    assert [r["dropouts"] for r in rows[1:]] == [[2], [2]] and all(r["clients"] == 2 for r in rows[1:])
    assert any("claims" in line and "rows" in line for line in logged)


def test_a_server_listening_everywhere_is_reached_over_loopback_and_its_certificate_names_it(tmp_path):
    from cryptography import x509

    from colora.deploy.launch import local_address

    assert local_address("0.0.0.0") == local_address("::") == "127.0.0.1" and local_address("10.1.2.3") == "10.1.2.3"
    make_credentials(tmp_path, 1, ["server.example.org", "203.0.113.7"])
    cert = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = {str(v) for v in sans.get_values_for_type(x509.DNSName)} | {str(v) for v in sans.get_values_for_type(x509.IPAddress)}
    assert names == {"server.example.org", "203.0.113.7", "127.0.0.1", "localhost"}
