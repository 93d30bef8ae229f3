"""The local socket between Flower's per-message ClientApp process and the data owner's colora
process on the same machine: one request, one answer, each an 8-byte length then the bytes.

Kept free of torch and model code: Flower starts a ClientApp process for every message, and this is
all it imports of colora.
"""

from __future__ import annotations

import socket
import struct

FRAME = struct.Struct("<Q")
TIMEOUT_S = 24 * 3600.0  # a task's local training may take hours; the server's round timeout governs
# Secure aggregation (colora.deploy.secagg): SecAgg+ clips every value to ±CLIP before quantizing
# (LoRA factors and heads are far smaller); the training loss travels as loss / LOSS_SCALE.
CLIP, LOSS_SCALE = 8.0, 64.0


def send_frame(sock: socket.socket, blob: bytes) -> None:
    sock.sendall(FRAME.pack(len(blob)) + blob)


def recv_frame(sock: socket.socket) -> bytes:
    (size,) = FRAME.unpack(_recv_exact(sock, FRAME.size))
    return _recv_exact(sock, size)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError(f"the peer closed the socket after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def ask_owner(path: str, blob: bytes) -> bytes:
    """Send ``blob`` to the owner process listening on the Unix socket ``path``; its answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT_S)
        sock.connect(path)
        send_frame(sock, blob)
        return recv_frame(sock)
