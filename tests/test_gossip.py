"""Codecs (colora/codecs.py) and gossip steps without training (colora/algorithms/declora.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from colora.algorithms.declora import (
    choco_gossip,
    consensus_distance,
    network_average,
    plain_gossip,
    rounding_generator,
)
from colora.codecs import Compressor
from colora.config import DeviceProfile
from colora.costmodel import declora_round_time, upload_time
from colora.states import payload_nbytes, serialize
from colora.topology import build_graph, make_topology


def _gen(seed=0):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _state(seed=0, dtype=torch.float32):
    g = _gen(seed)
    # LoRA-shaped: A is r x d, B is d x r, plus a 1-D bias
    return {"m.lora_A.weight": torch.randn(4, 32, generator=g, dtype=dtype),
            "m.lora_B.weight": torch.randn(32, 4, generator=g, dtype=dtype) * 0.1,
            "head.bias": torch.randn(3, generator=g, dtype=dtype)}


@pytest.mark.parametrize("bits", [8, 4])
def test_quantization_is_unbiased_bounded_and_packed(bits):
    x = _state()
    comp = Compressor(bits=bits)
    payload = comp.encode(x, _gen(1))
    # one scale per slice along the shorter dimension: 4 (A) + 4 (B) + 1 (bias)
    assert payload["scales"].dtype == torch.float32 and payload["scales"].numel() == 9
    n = sum(t.numel() for t in x.values())
    assert payload["codes"].dtype == torch.uint8 and payload["codes"].numel() == math.ceil(n * bits / 8)
    assert comp.nbytes(payload) == len(serialize(payload)) < payload_nbytes(x) * (bits / 32 + 0.15)
    dec = comp.decode(payload, x)
    L = 2 ** (bits - 1) - 1
    for k, v in x.items():
        rows = v if v.dim() == 1 or v.shape[0] <= v.shape[1] else v.t()
        scale = rows.reshape(rows.shape[0] if v.dim() == 2 else 1, -1).abs().amax(dim=1) / L
        err = (dec[k] - v) if v.dim() == 1 or v.shape[0] <= v.shape[1] else (dec[k] - v).t()
        assert (err.reshape(scale.numel(), -1).abs() <= scale[:, None] * (1 + 1e-5)).all()
    # unbiased: the mean of many independent roundings approaches x
    mean = {k: torch.zeros_like(v) for k, v in x.items()}
    for s in range(400):
        d = comp.decode(comp.encode(x, _gen(100 + s)), x)
        for k in x:
            mean[k] += d[k] / 400
    for k, v in x.items():
        single = (dec[k] - v).abs().mean()
        assert (mean[k] - v).abs().mean() < single / 8  # noise shrinks ~ 1/sqrt(400) = 1/20
    again = comp.decode(comp.encode(x, _gen(1)), x)
    assert all(torch.equal(again[k], dec[k]) for k in x)  # same seed, same rounding


def test_topk_keeps_the_largest_entries_of_each_tensor():
    x = _state()
    comp = Compressor(topk=0.25)
    payload = comp.encode(x, None)
    dec = comp.decode(payload, x)
    for k, v in x.items():
        kept = dec[k] != 0
        assert kept.sum() == math.ceil(0.25 * v.numel())
        assert torch.equal(dec[k][kept], v[kept])
        assert v[~kept].abs().max() <= v[kept].abs().min()
    assert payload["indices"].dtype == torch.int32 and comp.nbytes(payload) == len(serialize(payload))
    both = Compressor(bits=8, topk=0.25)
    dec8 = both.decode(both.encode(x, _gen(0)), x)
    assert all(((dec8[k] != 0) <= (dec[k] != 0)).all() for k in x)


def _consensus_setup(n=6):
    g = _gen(7)
    states = [{"a": torch.randn(4, 16, generator=g, dtype=torch.float64),
               "b": torch.randn(16, 4, generator=g, dtype=torch.float64) * 3,
               "c": torch.randn(5, generator=g, dtype=torch.float64)} for _ in range(n)]
    top = make_topology(build_graph("ring", n), "metropolis", "ring")
    return states, top


def _error_to_average(states, avg0):
    return float(np.mean([sum(float(((s[k] - avg0[k]) ** 2).sum()) for k in s) for s in states]))


@pytest.mark.parametrize("bits, topk, gamma, rounds, tol", [(8, 0.0, 1.0, 120, 1e-20), (4, 0.0, 1.0, 120, 1e-20),
                                                           (0, 0.25, 0.3, 300, 1e-10)])
def test_choco_gossip_reaches_the_exact_average_without_an_error_floor(bits, topk, gamma, rounds, tol):
    states, top = _consensus_setup()
    avg0 = network_average(states)
    start = _error_to_average(states, avg0)
    comp = Compressor(bits=bits, topk=topk)
    public = [{k: torch.zeros_like(v) for k, v in states[0].items()}] * top.n
    full = payload_nbytes(states[0])
    for r in range(1, rounds + 1):
        states, public, sent = choco_gossip(states, public, top, comp, gamma, 0, r)
        avg = network_average(states)
        assert max(float((avg[k] - avg0[k]).abs().max()) for k in avg) < 1e-12  # the average never moves
        assert all(len(m) == 2 and m[0] < full for m in sent)  # two neighbours, compressed messages
    assert _error_to_average(states, avg0) < tol * start
    assert consensus_distance(states) < tol * start


def test_quantizing_parameters_before_mixing_leaves_an_error_floor():
    states, top = _consensus_setup()
    avg0 = network_average(states)
    start = _error_to_average(states, avg0)
    comp = Compressor(bits=8)
    for r in range(1, 121):
        sent = [comp.decode(comp.encode(s, rounding_generator(0, r, i)), s) for i, s in enumerate(states)]
        states = [{k: top.W[i, i] * states[i][k] + sum(top.W[i, j] * sent[j][k] for j in top.neighbors[i])
                   for k in states[i]} for i in range(top.n)]
    # the rounding noise random-walks the network average away and nothing pulls it back
    assert _error_to_average(states, avg0) > 1e-6 * start


def test_plain_gossip_counts_one_full_payload_per_neighbour():
    states = [_state(s) for s in range(5)]
    top = make_topology(build_graph("star", 5), "metropolis", "star")
    mixed, sent = plain_gossip(states, top)
    size = payload_nbytes(states[0])
    assert sent[0] == [size] * 4 and all(sent[i] == [size] for i in range(1, 5))
    assert torch.allclose(network_average(mixed)["head.bias"], network_average(states)["head.bias"], atol=1e-6)


def test_choco_resends_full_copies_on_new_edges_only():
    states = [_state(s) for s in range(4)]
    top = make_topology(build_graph("ring", 4), "metropolis", "ring")
    comp = Compressor(bits=4)
    _, public, sent = choco_gossip(states, [states[0]] * 4, top, comp, 1.0, 0, 1, fresh_edges=frozenset({(0, 1)}))
    full = payload_nbytes(public[0])
    assert sent[0][0] == full and sent[1][0] == full  # 0 <-> 1 resync in full precision
    assert sent[0][1] < full / 4 and sent[2] == [sent[2][0]] * 2 and sent[2][0] < full / 4


def test_declora_round_time_is_compute_plus_sequential_uploads_of_the_slowest_node():
    dev = DeviceProfile(flops=1e9, up_mbps=8, down_mbps=80, latency_s=0.01, memory_gb=1)
    t = declora_round_time([2e9, 1e9], [[1000, 1000, 1000], [10**6]], [dev, dev])
    assert t == max(2.0 + 3 * upload_time(1000, dev), 1.0 + upload_time(10**6, dev))
    # node 0: 2 s compute + 3 x (10 ms latency + 1 ms); node 1: 1 s + 10 ms + 1 s
    assert abs(t - (2.0 + 3 * 0.011)) < 1e-12
