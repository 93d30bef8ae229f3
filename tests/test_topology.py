"""Graphs and mixing matrices (colora/topology.py): exact properties of every family and rule."""

from __future__ import annotations

import math

import networkx as nx
import numpy as np
import pytest

from colora.config import ColoraError, GossipConfig
from colora.topology import (
    TOPOLOGIES,
    UNION_WINDOW,
    TopologySchedule,
    build_graph,
    make_topology,
    mix,
    mixing_matrix,
    read_edge_list,
    spectral_gap,
)

SIZES = (1, 2, 3, 5, 8, 12)


def _cases():
    for name in TOPOLOGIES:
        for rule in ("metropolis", "laplacian", "uniform"):
            if rule == "uniform" and name != "complete":
                continue
            for n in SIZES:
                yield name, rule, n


@pytest.mark.parametrize("name, rule, n", list(_cases()))
def test_every_mixing_matrix_is_symmetric_doubly_stochastic_and_local(name, rule, n):
    g = build_graph(name, n, p=0.8, seed=1)
    top = make_topology(g, rule, name)
    W = top.W
    assert W.shape == (n, n) and W.dtype == np.float64
    assert np.abs(W - W.T).max() <= 1e-12
    assert np.abs(W.sum(axis=1) - 1).max() <= 1e-12 and np.abs(W.sum(axis=0) - 1).max() <= 1e-12
    assert W.min() >= 0
    # gossip only along edges: W_ij != 0 needs i == j or an edge i-j
    for i, j in zip(*np.nonzero(W)):
        assert i == j or g.has_edge(int(i), int(j))
    assert 0 < top.gap <= 1
    assert top.neighbors == tuple(tuple(sorted(g.neighbors(i))) for i in range(n))


def test_metropolis_weights_and_ring_gap_match_closed_forms():
    g = build_graph("star", 6)
    W = mixing_matrix(g, "metropolis")
    assert W[0, 3] == 1 / 6 and W[3, 3] == 1 - 1 / 6 and abs(W[0, 0] - 1 / 6) < 1e-15  # hub degree 5
    for n in (5, 12, 40):
        # metropolis on a ring: W = (I + S + S^T) / 3, eigenvalues 1/3 + 2/3 cos(2 pi k / n)
        gap = spectral_gap(mixing_matrix(build_graph("ring", n), "metropolis"))
        assert abs(gap - 2 / 3 * (1 - math.cos(2 * math.pi / n))) < 1e-12
    # the ring's gap shrinks as 1/n^2 (DESIGN.md)
    gaps = [spectral_gap(mixing_matrix(build_graph("ring", n), "metropolis")) for n in (20, 40)]
    assert 3.9 < gaps[0] / gaps[1] < 4.1


def test_laplacian_mixing_is_the_papers_formula_with_spectrum_in_one_third_to_one():
    g = build_graph("erdos_renyi", 10, p=0.5, seed=3)
    L = nx.laplacian_matrix(g, nodelist=range(10)).toarray().astype(float)
    lam = np.linalg.eigvalsh(L)[-1]
    W = mixing_matrix(g, "laplacian")
    assert np.abs(W - (np.eye(10) - 2 * L / (3 * lam))).max() < 1e-15
    ev = np.linalg.eigvalsh(W)
    assert ev.min() >= 1 / 3 - 1e-12 and abs(ev.max() - 1) < 1e-12


def test_families_have_their_shapes():
    assert sorted(d for _, d in build_graph("torus", 16).degree()) == [4] * 16
    grid = build_graph("grid", 12)  # 3 x 4
    assert grid.number_of_edges() == 3 * 3 + 4 * 2
    expo = build_graph("exponential", 16)  # distances 1, 2, 4, 8 (8 is its own mirror)
    assert sorted(expo.neighbors(0)) == [1, 2, 4, 8, 12, 14, 15]
    star = build_graph("star", 7)
    assert star.degree(0) == 6 and all(star.degree(i) == 1 for i in range(1, 7))
    assert build_graph("complete", 5).number_of_edges() == 10
    assert build_graph("ring", 2).number_of_edges() == 1 and build_graph("ring", 1).number_of_edges() == 0
    a, b = build_graph("erdos_renyi", 20, p=0.3, seed=7), build_graph("erdos_renyi", 20, p=0.3, seed=7)
    assert set(a.edges()) == set(b.edges()) != set(build_graph("erdos_renyi", 20, p=0.3, seed=8).edges())


def _toy_states(n, rng):
    return [{"a": rng.standard_normal((4, 6)), "b": rng.standard_normal(5) * 10} for _ in range(n)]


@pytest.mark.parametrize("name, rule", [("ring", "metropolis"), ("star", "laplacian"), ("erdos_renyi", "metropolis"),
                                        ("exponential", "laplacian"), ("complete", "uniform")])
def test_mixing_preserves_the_network_average_exactly(name, rule):
    rng = np.random.default_rng(0)
    states = _toy_states(9, rng)
    W = make_topology(build_graph(name, 9, p=0.5, seed=2), rule, name).W
    mixed = mix(states, W)
    for k in ("a", "b"):
        before = np.mean([s[k] for s in states], axis=0)
        after = np.mean([s[k] for s in mixed], axis=0)
        assert np.abs(after - before).max() <= 1e-12
    if rule == "uniform":  # exact averaging in one step
        assert all(np.abs(s["a"] - np.mean([t["a"] for t in states], axis=0)).max() <= 1e-12 for s in mixed)


@pytest.mark.parametrize("name, rule", [("ring", "metropolis"), ("ring", "laplacian"), ("torus", "metropolis"),
                                        ("star", "metropolis")])
def test_repeated_mixing_converges_at_the_rate_of_the_spectral_gap(name, rule):
    n, T = 12, 40
    top = make_topology(build_graph(name, n), rule, name)
    rate = 1 - top.gap
    x = np.random.default_rng(1).standard_normal(n)
    dev0 = np.linalg.norm(x - x.mean())
    for t in range(1, T + 1):
        x = top.W @ x
        assert np.linalg.norm(x - x.mean()) <= rate**t * dev0 * (1 + 1e-9)
    # the slowest mode decays at exactly that rate
    ev, vec = np.linalg.eigh(top.W)
    slow = vec[:, np.argsort(np.abs(ev))[-2]]
    y = np.linalg.matrix_power(top.W, T) @ slow
    assert abs(np.linalg.norm(y - y.mean()) / np.linalg.norm(slow - slow.mean()) - rate**T) <= 1e-9 * max(rate**T, 1e-300) + 1e-15


def test_uniform_mixing_needs_a_complete_graph():
    with pytest.raises(ColoraError, match="gossip.mixing=uniform needs a complete graph"):
        make_topology(build_graph("ring", 5), "uniform", "ring")


def test_disconnected_graph_is_an_error_that_says_how_to_fix_it(tmp_path):
    f = tmp_path / "two_parts.txt"
    f.write_text("0 1\n2 3\n")
    with pytest.raises(ColoraError) as info:
        TopologySchedule(GossipConfig(topology=str(f)), 4, 0, 3)
    msg = str(info.value)
    assert "disconnected" in msg and "2 components" in msg and "gossip.p" in msg and "\n" not in msg
    with pytest.raises(ColoraError, match="disconnected"):
        TopologySchedule(GossipConfig(topology="erdos_renyi", p=0.0), 5, 0, 3)


def test_edge_list_file_is_read_and_checked(tmp_path):
    f = tmp_path / "edges.txt"
    f.write_text("# a path with a chord\n0 1\n1 2\n\n2 3  # trailing comment\n0 2\n")
    g = read_edge_list(f, 4)
    assert sorted(g.edges()) == [(0, 1), (0, 2), (1, 2), (2, 3)]
    top = TopologySchedule(GossipConfig(topology=str(f), mixing="laplacian"), 4, 0, 2).at(1)
    assert top.neighbors == ((1, 2), (0, 2), (0, 1, 3), (2,))
    for text, needle in [("0 1\n1 4\n", "line 2: unknown node 4 (nodes are 0..3"), ("0 -1\n", "unknown node -1"),
                         ("0 1 2\n", "expected two node ids"), ("a b\n", "expected two node ids"), ("1 1\n", "self-loop")]:
        f.write_text(text)
        with pytest.raises(ColoraError) as info:
            read_edge_list(f, 4)
        assert needle in str(info.value) and str(f) in str(info.value)


def test_unknown_topology_names_the_valid_ones():
    with pytest.raises(ColoraError) as info:
        build_graph("hypercube", 4)
    assert "gossip.topology='hypercube'" in str(info.value) and "ring, complete, erdos_renyi" in str(info.value)


def test_time_varying_erdos_renyi_draws_a_seeded_graph_per_round_with_connected_unions():
    cfg = GossipConfig(topology="erdos_renyi", p=0.25, time_varying=True)
    a, b = TopologySchedule(cfg, 10, 0, 12), TopologySchedule(cfg, 10, 0, 12)
    edges = [a.at(r).edges() for r in range(1, 13)]
    assert edges == [b.at(r).edges() for r in range(1, 13)]  # a pure function of (seed, round)
    assert len(set(edges)) == 12
    for start in range(0, 12, UNION_WINDOW):
        union = nx.Graph(list(set().union(*edges[start:start + UNION_WINDOW])))
        union.add_nodes_from(range(10))
        assert nx.is_connected(union)
    for r in range(1, 13):  # a single round may be disconnected, yet its W is a valid mixing matrix
        W = a.at(r).W
        assert np.abs(W - W.T).max() <= 1e-12 and np.abs(W.sum(axis=1) - 1).max() <= 1e-12
    with pytest.raises(ColoraError, match="union of the graphs of rounds 1-5 .* is disconnected"):
        TopologySchedule(GossipConfig(topology="erdos_renyi", p=0.01, time_varying=True), 10, 0, 12)


def test_time_varying_deterministic_topology_is_a_fresh_relabelling_each_round():
    sched = TopologySchedule(GossipConfig(topology="ring", time_varying=True), 8, 3, 5)
    tops = [sched.at(r) for r in range(1, 6)]
    assert len({t.edges() for t in tops}) == 5
    assert all(abs(t.gap - tops[0].gap) < 1e-12 and list(t.degrees) == [2] * 8 for t in tops)
    assert "relabelling" in sched.describe() and "spectral gap" in sched.describe()
