"""Simulated wall-clock time from measured FLOPs and real payload bytes.

Model (deliberately simple and documented; every term is a measured quantity divided by a rate
from a device profile, ``system.client`` / ``system.server``):
- compute time  = FLOPs / profile.flops                 (FLOPs counted by torch's FlopCounterMode on
                                                          the real batches, forward + backward)
- transfer time = latency + 8 * bytes / (Mbit/s * 1e6)  (bytes = the serialized safetensors payload)

Per paradigm:
- ``central``: all compute at the server's speed, no communication.
- ``fedavg``:  the broadcast reaches the sampled clients in parallel (each at its downlink), then each
  client computes and uploads; the round waits for the slowest. Aggregation is an O(K * adapter)
  elementwise pass at the server and counted as 2 FLOPs per received parameter.
- ``splitlora``: per step, each client's part compute + activation up + gradient down in parallel
  (slowest client), then the server's compute for all clients' activations (its FLOP/s shared);
  plus a client-adapter exchange (up, average, down) every ``split.aggregate_every`` steps.
- ``sl``: the same split work strictly in sequence, plus the client-adapter hand-off per turn.
"""

from __future__ import annotations

from .config import DeviceProfile


def compute_time(flops: float, device: DeviceProfile) -> float:
    """Seconds to execute ``flops`` on ``device``."""
    return flops / device.flops


def upload_time(nbytes: int, device: DeviceProfile) -> float:
    """Seconds to send ``nbytes`` over the device's uplink (one message)."""
    return device.latency_s + 8.0 * nbytes / (device.up_mbps * 1e6)


def download_time(nbytes: int, device: DeviceProfile) -> float:
    """Seconds to receive ``nbytes`` over the device's downlink (one message)."""
    return device.latency_s + 8.0 * nbytes / (device.down_mbps * 1e6)


def central_round_time(flops: float, server: DeviceProfile) -> float:
    """Centralized training: compute only, at the server's speed."""
    return compute_time(flops, server)


def fedavg_round_time(
    client_flops: list[float],
    up_bytes: list[int],
    down_bytes: list[int],
    clients: list[DeviceProfile],
    server: DeviceProfile,
    aggregated_params: int,
) -> float:
    """One synchronous FedAvg round: max over sampled clients of download + compute + upload,
    plus the server's aggregation (2 FLOPs per received parameter)."""
    per_client = [
        download_time(d, c) + compute_time(f, c) + upload_time(u, c)
        for f, u, d, c in zip(client_flops, up_bytes, down_bytes, clients)
    ]
    return max(per_client) + compute_time(2.0 * aggregated_params, server)


def _transfer_time(nbytes: int, device: DeviceProfile, messages: int, up: bool) -> float:
    # ``messages`` messages of ``nbytes`` in total: one latency each, one serialization of the bytes.
    rate = device.up_mbps if up else device.down_mbps
    return messages * device.latency_s + 8.0 * nbytes / (rate * 1e6)


def split_step_time(
    client_flops: list[float],
    up_bytes: list[int],
    down_bytes: list[int],
    server_flops: list[float],
    clients: list[DeviceProfile],
    server: DeviceProfile,
    messages: int = 1,
) -> float:
    """One parallel split step (``splitlora``): every client computes its part and exchanges its
    activation/gradient concurrently (the slowest client sets the pace), and the server processes
    all clients' activations back to back (its FLOP/s shared among them).

    ``messages`` per direction per client: 1 (activation up, gradient down), 2 when U-shaped.
    """
    return max(_client_split_times(client_flops, up_bytes, down_bytes, clients, messages)) + compute_time(sum(server_flops), server)


def _client_split_times(client_flops, up_bytes, down_bytes, clients, messages: int) -> list[float]:
    # Each client's own part of a split step: its compute, activation(s) up, gradient(s) down.
    return [
        compute_time(f, c) + _transfer_time(u, c, messages, up=True) + _transfer_time(d, c, messages, up=False)
        for f, u, d, c in zip(client_flops, up_bytes, down_bytes, clients)
    ]


def sequential_split_time(
    client_flops: list[float],
    up_bytes: list[int],
    down_bytes: list[int],
    server_flops: list[float],
    clients: list[DeviceProfile],
    server: DeviceProfile,
    messages: int = 1,
) -> float:
    """The same split work strictly in sequence (``sl``): one client's step after another."""
    return sum(_client_split_times(client_flops, up_bytes, down_bytes, clients, messages)) + compute_time(sum(server_flops), server)


def adapter_sync_time(
    up_bytes: list[int],
    down_bytes: list[int],
    clients: list[DeviceProfile],
    server: DeviceProfile,
    aggregated_params: int,
) -> float:
    """Client adapters up in parallel, averaged at the fed server (2 FLOPs per received parameter),
    the average back down in parallel. A zero entry in ``down_bytes`` skips that download."""
    up = max(upload_time(u, c) for u, c in zip(up_bytes, clients)) if up_bytes else 0.0
    down = max((download_time(d, c) for d, c in zip(down_bytes, clients) if d), default=0.0)
    return up + compute_time(2.0 * aggregated_params, server) + down


def declora_round_time(client_flops: list[float], sent_bytes: list[list[int]], clients: list[DeviceProfile]) -> float:
    """One synchronous Dec-LoRA round: every node computes its local steps, then sends its messages
    one after another on its own uplink (``sent_bytes[i]``: one entry per neighbour); receiving
    overlaps with sending on the separate downlink. No server: the round ends with the slowest node."""
    return max(
        compute_time(f, c) + sum(upload_time(b, c) for b in msgs)
        for f, msgs, c in zip(client_flops, sent_bytes, clients)
    )
