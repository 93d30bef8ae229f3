"""A data owner's colora process (``colora deploy client``): its own data folder, the model, and a
Flower SuperNode that connects it to the server over TLS with its registered key.

The process holds the frozen base and the LoRA adapters once and answers the server's messages
(colora.messages: join, task, bye) that the SuperNode's per-message ClientApp forwards over a local
Unix socket (colora.deploy.wire; the socket's folder is readable by this user only). It reads
nothing but its own folder; what it sends is what a simulated client sends: the trained adapter,
its loss, its FLOPs and its row count.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from ..adapters import RankedAdapters, attach_lora
from ..algorithms import get_algorithm
from ..algorithms.declora import advance, node_step
from ..codecs import from_gossip
from ..config import ColoraError, Config
from ..data.party import party_info
from ..engines.engine import check_max_length
from ..engines.runtime import ClientRuntime, load_data
from ..messages import MessageError, decode, decode_task, encode, encode_result, header
from ..models import load_base_model, load_tokenizer, resolve_device
from ..rundir import peak_rss_mb
from ..types import AdapterState, ClientTask
from .pki import check_client_credentials, load_owner_key, sign_join
from .remote import MISSING_COPY, config_fingerprint, decode_choco, decode_mix, joined_message, refusal, unwrap_blob, wrap
from .wire import recv_frame, send_frame

# Flower's SuperNode exits with this code when the SuperLink refuses or cannot be reached.
FLOWER_CONNECT_FAILED = 305
GOODBYE_S = 3.0
HELD = "#held"  # a split result's moments stand-in: the client step they end at (the owner keeps them)
# A node the SuperLink still counts online (an owner restarted within Flower's heartbeat patience, 2 x 30 s)
# is refused until it lapses: the owner retries every RETRY_S for up to its join timeout.
RETRY_S = 10.0
JOIN_TIMEOUT_S = 120.0


class Owner:
    """Answers the server's messages for one client from the data in ``cfg.data.path``."""

    def __init__(self, cfg: Config, client: int | None = None, key: Path | None = None):
        info = party_info(cfg.data.path)
        if info.get("role") != "owner":
            raise ColoraError(f"--data {cfg.data.path}: a {info.get('role')} folder, not a data owner's (colora deploy split-data writes client_K folders)")
        self.client = int(info["client"] if client is None else client)
        if not 0 <= self.client < cfg.clients.num:
            raise ColoraError(f"client {self.client} is not one of the config's clients.num={cfg.clients.num}")
        self.cfg, self.fingerprint, self.finished, self.stop_reason = cfg, config_fingerprint(cfg), threading.Event(), None
        self.signer = load_owner_key(key) if key is not None else None  # answers the server's join challenge
        tokenizer = load_tokenizer(cfg.model)
        task, data = load_data(cfg, tokenizer)
        base = load_base_model(cfg.model, task.num_labels, tokenizer, seed=cfg.seed)
        check_max_length(base.config, cfg.data.max_length)
        model = attach_lora(base, cfg.model, seed=cfg.seed).to(resolve_device(cfg.engine.device))
        # The trainer indexes rows by client id: this owner's rows are all of its data, in the order the
        # simulation's partition lists them (colora deploy split-data), so its batches are the simulation's.
        parts = [np.arange(0)] * cfg.clients.num
        parts[self.client] = np.arange(len(task.train))
        self.samples = len(task.train)
        split = get_algorithm(cfg.algorithm).runner == "split"
        self.runtime = ClientRuntime(cfg, model, RankedAdapters(model, cfg.seed), data, parts, [cfg.model.lora.r], split)
        self.lock = threading.Lock()
        self.moments: dict[int, AdapterState] = {}  # kept optimizer moments, by the client step they end at
        self.split_moments: dict[int, AdapterState] = {}  # the split client part's, likewise
        self.copies: dict[int, tuple[int, AdapterState]] = {}  # CHOCO: node -> (round, the public copy held)
        self._step = 0

    def handle(self, blob: bytes) -> bytes:
        """One message from the server in, the answer out (a refusal for anything unexpected)."""
        try:
            kind = header(blob).get("kind")
        except MessageError as exc:
            return refusal(str(exc))
        with self.lock:
            if kind == "join":
                scalars, _ = decode(blob, "join")
                if scalars.get("fingerprint") != self.fingerprint:
                    self.stop(f"the server runs another config (fingerprint {scalars.get('fingerprint')}, this owner's is "
                              f"{self.fingerprint}); start the owner with the server's config file")
                    return refusal(f"client {self.client}'s owner runs another config (fingerprint {self.fingerprint})")
                signature = sign_join(self.signer, str(scalars.get("nonce", "")), self.fingerprint, self.client) if self.signer else ""
                return joined_message(self.client, self.samples, self.fingerprint, signature)
            if kind == "task":
                task = header(blob)
                if task.get("client_id") != self.client:
                    return refusal(f"this owner holds client {self.client}'s data, not client {task.get('client_id')}'s")
                self.runtime.adapters.ensure(task.get("rank") or self.cfg.model.lora.r)
                return self._train(decode_task(blob))
            if kind in ("mix", "choco"):  # Dec-LoRA: this node's gossip step, on what the server relayed
                job = decode_mix(blob) if kind == "mix" else decode_choco(blob)
                if job.node != self.client:
                    return refusal(f"this owner is node {self.client}, not node {job.node}")
                if kind == "choco" and not self._fill_copies(job):
                    return refusal(f"{MISSING_COPY}: node {self.client} does not hold its neighbourhood's copies of round {job.round - 1}")
                out = node_step(job, self.cfg)
                if isinstance(out, bytes):  # CHOCO's message q_i, relayed to its neighbours
                    return wrap("choco_q", out, node=self.client)
                if kind == "choco":  # every copy moved by its q: keep them for the next round
                    comp = from_gossip(self.cfg.gossip.quantize_bits, self.cfg.gossip.topk)
                    self.copies = {j: (job.round, advance(job.public[j], comp, b)) for j, b in job.blobs.items()}
                return encode("mixed", {"node": self.client}, {"state/": out})
            if kind in ("split_job", "split_reply") and self.runtime.split is not None:
                return self._split(kind, blob)
            if kind == "bye":
                self.stop(None)
                return joined_message(self.client, self.samples, self.fingerprint)
            return refusal(f"a {kind!r} message is not one a data owner answers")

    def _fill_copies(self, job) -> bool:
        """Complete a CHOCO job with the public copies this node kept from the last round (the
        server sends only the ones it lacks); False when one it needs is not the round's."""
        need = job.blobs if job.phase == "mix" else [job.node]
        for j in need:
            if j not in job.public:
                version, copy = self.copies.get(j, (None, None))
                if version != job.round - 1:
                    return False
                job.public[j] = copy
        return True

    def _train(self, task: ClientTask) -> bytes:
        """A training task. Kept optimizer moments (train.client_optimizer: keep) stay on this machine:
        the simulation carries them in tasks and results (a stateless worker may run any client), but
        a deployed owner keeps its own, so they never cross the network. They are kept by the step
        count they belong to, so a round the server reruns after a restart starts from the same ones."""
        if task.keep_optimizer and task.moments is None:
            task.moments = self.moments.get(task.start_step)
        result = self.runtime.trainer.run(task)
        if result.moments is not None:
            self.moments = {k: v for k, v in self.moments.items() if k >= task.start_step}  # this round's start, and its end
            self.moments[task.start_step + result.steps] = result.moments
            result.moments = None
        return encode_result(result)

    def _split(self, kind: str, blob: bytes) -> bytes:
        """One turn of a split conversation: a job starts the client part (its uplink goes back), a
        server reply continues it (the next uplink, or the step's result when done).

        The client part's optimizer moments stay here: a result carries a handle in their place (the
        step they end at) and the server hands the handle back in the client's next job, exactly
        where the simulation hands back the moments; the owner then loads its own."""
        client = self.runtime.split
        try:
            if kind == "split_job":
                scalars, groups = decode(blob, "split_job")
                if scalars["client_id"] != self.client:
                    return refusal(f"this owner holds client {self.client}'s data, not client {scalars['client_id']}'s")
                held = groups.get("moments/")
                if held is not None and set(held) == {HELD}:
                    groups["moments/"] = self.split_moments.get(int(held[HELD]))
                    blob = encode("split_job", scalars, groups)
                self._step = int(scalars["step"])
                return wrap("split_client", client.start(blob), done=False)
            _, groups = decode(blob, "split_reply")
            done, message = client.reply(unwrap_blob(groups))
            if done:
                scalars, result = decode(message, "split_result")
                end = self._step + 1
                self.split_moments = {k: v for k, v in self.split_moments.items() if k >= self._step}
                self.split_moments[end] = result["moments/"]
                message = encode("split_result", scalars, {"state/": result["state/"], "moments/": {HELD: torch.tensor(end)}})
            return wrap("split_client", message, done=done)
        except (ValueError, KeyError, RuntimeError) as exc:  # a message that does not fit the conversation
            client.abort()
            return refusal(f"split step failed on client {self.client}'s owner: {exc}")

    def stop(self, reason: str | None) -> None:
        self.stop_reason = reason
        self.finished.set()


def serve(owner: Owner, path: str) -> socket.socket:
    """Answer framed messages on the Unix socket ``path`` in a background thread."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(8)

    def answer(conn: socket.socket) -> None:
        with conn:
            try:
                send_frame(conn, owner.handle(recv_frame(conn)))
            except (ConnectionError, OSError):
                pass  # the ClientApp went away (its SuperNode stopped): nothing to answer

    def loop() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return  # closed
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()
    return server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_command(name: str) -> str:
    """Flower's console script ``name`` beside this Python (the ``deploy`` extra installs it)."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if found is None:
        raise ColoraError(f"{name} not found: install the deploy extra (pip install 'colora[deploy]')")
    return found


def flower_env(home: Path) -> dict[str, str]:
    """The environment of Flower's processes: this Python's scripts first, a private Flower home."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", "FLWR_HOME": str(home)}


def _start_node(command: list[str], env: dict, connected: threading.Event) -> tuple[subprocess.Popen, list[str]]:
    """Start a Flower SuperNode; its output lines collect in the returned list, ``connected`` set
    once the SuperLink has accepted it."""
    node = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []

    def read() -> None:
        for line in node.stdout:
            lines.append(line)
            if "SuperNode ID" in line:
                connected.set()
                print(f"colora: connected ({line.strip().split()[-1]})", flush=True)
    threading.Thread(target=read, daemon=True).start()
    return node, lines


def run_owner(cfg: Config, server: str, ca: Path, key: Path, client: int | None = None, join_timeout: float = JOIN_TIMEOUT_S,
              log=print) -> int:
    """Join the federation at ``server`` (host:port) as a data owner and answer until the run ends.

    Returns 0 when the server ends the run; raises ColoraError (exit 2) on bad credentials, a server
    that refuses or does not answer for ``join_timeout`` seconds, or another config."""
    check_client_credentials(ca, key)
    owner = Owner(cfg, client, key)
    folder = tempfile.mkdtemp(prefix="colora-owner-")  # 0700: only this user reaches the socket
    path = os.path.join(folder, "socket")
    listener = serve(owner, path)
    env = flower_env(Path(folder) / "flower")  # the run's Flower app lands here, not in ~/.flwr
    command = [flower_command("flower-supernode"), "--root-certificates", str(ca), "--superlink", server,
               "--auth-supernode-private-key", str(key), "--node-config", f'colora-socket="{path}"', "--max-wait-time", str(join_timeout)]
    log(f"colora: data owner of client {owner.client} ({owner.samples} rows) joining {server}")
    node, lines, connected, began = None, [], threading.Event(), time.monotonic()
    try:
        while not owner.finished.wait(0.5):
            if node is None or node.poll() is not None:
                if node is not None:
                    if connected.is_set():  # a working connection lost (the server restarts, the network broke):
                        connected.clear()   # keep trying for another join timeout
                        began = time.monotonic()
                        log(f"colora: lost the connection to {server}; reconnecting")
                    elif time.monotonic() - began > join_timeout:
                        tail = " ".join(" ".join(lines[-6:]).split())[-400:]
                        raise ColoraError(f"the server at {server} refused this node or did not answer for {join_timeout:g} s "
                                          f"(Flower SuperNode exit code {node.returncode}); check the address, that the server "
                                          f"runs, and that this owner's public key is registered with it ({tail})")
                    # refused: not registered, or still online from before (a restart, or a retry of a slow
                    time.sleep(RETRY_S)  # activation): the server frees a node once its heartbeat lapses
                node, lines = _start_node(command + ["--port", str(free_port())], env, connected)
    finally:
        if node is not None:
            time.sleep(GOODBYE_S if node.poll() is None else 0)  # the SuperNode delivers the answer to the last message
            node.terminate()
            try:
                node.wait(10)
            except subprocess.TimeoutExpired:
                node.kill()
        listener.close()
        shutil.rmtree(folder, ignore_errors=True)
    if owner.stop_reason is not None:
        raise ColoraError(owner.stop_reason)
    log(f"colora: the server ended the run; client {owner.client}'s owner stops (peak memory {peak_rss_mb():.0f} MB)")
    return 0
