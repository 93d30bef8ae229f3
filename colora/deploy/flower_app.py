"""colora's Flower apps: the ServerApp runs the experiment on the SuperLink's side, the ClientApp
hands each message to the data owner's colora process (colora.deploy.owner).

Flower starts a fresh ClientApp process for every message it delivers; building a model in each
would cost seconds per message, so the ClientApp only forwards the message's bytes over a local
socket to the owner's long-running process (which holds the model and the data) and sends its
answer back. Every payload is a colora message (safetensors bytes) carried as one uint8 array of a
Flower ArrayRecord (numpy's format without pickle; Flower chunks it): nothing received is unpickled.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from ..config import ColoraError, load_config
from .wire import ask_owner

KEY = "colora"
MESSAGE_TYPE = "train"  # Flower routes by type; every colora message (join, task, bye) is one


def to_message(blob: bytes, **kw) -> Message:
    return Message(content=RecordDict({KEY: ArrayRecord({"blob": Array(np.frombuffer(blob, dtype=np.uint8))})}), **kw)


def from_message(msg: Message) -> bytes:
    return msg.content[KEY]["blob"].numpy().tobytes()


def wire_size(msg: Message) -> int:
    """Bytes Flower serializes for ``msg`` (its objects as pushed; HTTP and TLS framing not counted)."""
    return sum(len(o.deflate()) for o in get_all_nested_objects(msg).values())


class FlowerTransport:
    """colora.deploy.remote's transport over a Flower grid: client ids bound to SuperNode ids when
    the owners join."""

    def __init__(self, grid: Grid, context: Context | None = None):
        self.grid, self.context, self.node_of, self.up, self.down = grid, context, {}, 0, 0

    def wait_for_nodes(self, n: int, timeout: float) -> list[int]:
        """The first ``n`` connected SuperNodes (sorted), waiting up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while len(nodes := sorted(self.grid.get_node_ids())) < n:
            if time.monotonic() > deadline:
                raise ColoraError(f"only {len(nodes)} of {n} data owners connected within {timeout:g} s; start every owner "
                                  "(colora deploy client) or raise colora deploy server --join-timeout")
            time.sleep(0.5)
        return nodes

    def _send(self, pairs: list[tuple[int, bytes]], timeout: float) -> dict[int, bytes]:
        msgs = [to_message(blob, dst_node_id=node, message_type=MESSAGE_TYPE) for node, blob in pairs]
        self.down += sum(wire_size(m) for m in msgs)
        out = {}
        for reply in self.grid.send_and_receive(msgs, timeout=timeout):
            if reply.has_error() or not reply.has_content() or KEY not in reply.content:
                continue  # a ClientApp that failed: no answer from that node this time
            self.up += wire_size(reply)
            out[reply.metadata.src_node_id] = from_message(reply)
        return out

    def broadcast(self, nodes: list[int], blob: bytes, timeout: float) -> dict[int, bytes]:
        """``blob`` to every node; the answers by node id."""
        return self._send([(n, blob) for n in nodes], timeout)

    def bind(self, client: int, node: int) -> None:
        self.node_of[client] = node

    def exchange(self, messages: list[tuple[int, bytes]], timeout: float) -> dict[int, bytes]:
        client_of = {self.node_of[c]: c for c, _ in messages}
        answers = self._send([(self.node_of[c], blob) for c, blob in messages], timeout)
        return {client_of[node]: blob for node, blob in answers.items() if node in client_of}

    def wire_bytes(self) -> tuple[int, int]:
        return self.up, self.down

    def secure(self, tasks: list[tuple[int, bytes, int]], rnd: int, timeout: float):
        """One SecAgg+ round over (client, task bytes, weight): colora.deploy.secagg.Summed keyed by
        client id, or None when the protocol halted. Every protocol message is counted."""
        from .secagg import secure_sum

        summed = secure_sum(_Counted(self), self.context, [(self.node_of[c], blob, w) for c, blob, w in tasks], rnd, timeout)
        if summed is not None:
            client_of = {self.node_of[c]: c for c, _, _ in tasks}
            summed.answered = {client_of[n]: v for n, v in summed.answered.items() if n in client_of}
        return summed


class _Counted:
    """The grid as SecAgg+ uses it, with the bytes of every message counted in the transport."""

    def __init__(self, transport: FlowerTransport):
        self.transport = transport

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.transport.down += sum(wire_size(m) for m in messages)
        replies = list(self.transport.grid.send_and_receive(messages, timeout=timeout))
        self.transport.up += sum(wire_size(r) for r in replies if r.has_content())
        return replies

    def __getattr__(self, name):
        return getattr(self.transport.grid, name)


def _secure_stages(msg: Message, context: Context, call_next) -> Message:
    """Flower's secaggplus_mod for the SecAgg+ protocol's messages only; colora's own pass by."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        from flwr.client.mod import secaggplus_mod

        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


server_app = ServerApp()
client_app = ClientApp(mods=[_secure_stages])


@server_app.main()
def _serve(grid: Grid, context: Context) -> None:
    """Run the config given in the run config on the connected owners; the outcome goes to
    ``status`` (a JSON file colora deploy server reads: Flower's own exit codes do not carry it)."""
    from ..experiment import run_experiment  # torch and model code only here: the ClientApp never imports them
    from .pki import owner_public_keys
    from .remote import RemoteClients

    rc = context.run_config
    status = Path(str(rc["status"]))
    try:
        cfg = load_config(str(rc["config"]), json.loads(str(rc["overrides"])))
        transport = FlowerTransport(grid, context)
        remote = RemoteClients(cfg, transport, owner_public_keys([Path(p) for p in json.loads(str(rc["owner_keys"]))]))
        nodes = transport.wait_for_nodes(cfg.clients.num, float(rc["join_timeout"]))
        remote.join_nodes(nodes, float(rc["join_timeout"]))
        resume = str(rc["resume"])
        run_dir = run_experiment(cfg, out=str(rc["out"]) or None, resume=Path(resume) if resume else None, remote=remote)
        status.write_text(json.dumps({"ok": True, "run_dir": str(run_dir)}))
    except ColoraError as exc:
        status.write_text(json.dumps({"ok": False, "error": " ".join(str(exc).split())}))
    except BaseException as exc:
        status.write_text(json.dumps({"ok": False, "error": f"the server failed: {type(exc).__name__}: {exc}", "crash": True}))
        raise
    finally:
        if "remote" in locals():
            remote.bye()


@client_app.train()
def _forward(msg: Message, context: Context) -> Message:
    """One message to the owner's colora process and its answer back (under secure aggregation,
    the task inside Flower's FitIns and the trained state as the vector SecAgg+ masks)."""
    socket = str(context.node_config["colora-socket"])
    if KEY not in msg.content.array_records:
        from .secagg import secure_fit

        return secure_fit(msg, lambda blob: ask_owner(socket, blob))
    return to_message(ask_owner(socket, from_message(msg)), reply_to=msg)
