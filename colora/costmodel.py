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


def declora_round_time(client_flops: list[float], sent_bytes: list[list[int]], clients: list[DeviceProfile]) -> float:
    """One synchronous Dec-LoRA round: every node computes its local steps, then sends its messages
    one after another on its own uplink (``sent_bytes[i]``: one entry per neighbour); receiving
    overlaps with sending on the separate downlink. No server: the round ends with the slowest node."""
    return max(
        compute_time(f, c) + sum(upload_time(b, c) for b in msgs)
        for f, msgs, c in zip(client_flops, sent_bytes, clients)
    )
