"""Communication graphs and gossip mixing matrices for decentralized training (``gossip.*``).

This is the one place where graphs and mixing matrices are built and validated. Graphs are
``networkx.Graph`` objects (networkx builds the standard families: cycle, complete, G(n, p),
2-D grid/torus, star; it also checks connectivity); mixing matrices are dense float64 numpy
arrays, n x n, computed once per graph (O(n^2) memory, O(n^3) for the eigenvalues: trivial next
to training for the n <= a few hundred clients a simulation holds).

A mixing matrix W must be symmetric and doubly stochastic, and the graph connected, so that
repeated mixing drives every node to the network average: for x with mean x_bar,
||W^t x - x_bar|| <= |lambda_2|^t ||x - x_bar||, where |lambda_2| is the second largest
eigenvalue of W in absolute value. The *spectral gap* 1 - |lambda_2| is the rate; it is 0 for
a disconnected graph and shrinks as 1/n^2 on a ring.

Time-varying graphs (``gossip.time_varying``): ``erdos_renyi`` draws a fresh G(n, p) each round
from (run seed, round); a single round's graph may be disconnected, but the union of the graphs
of every window of :data:`UNION_WINDOW` consecutive rounds must be connected (B-connectivity,
checked for every window of the run before it starts). Deterministic families (ring, torus,
exponential, star, an edge-list file) are relabelled by a fresh seeded random permutation each
round: every node keeps the same number of neighbours and the spectral gap stays the same, but
who neighbours whom changes (for ``complete`` a relabelling changes nothing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import numpy as np

from .config import TOPOLOGY_NAMES as TOPOLOGIES
from .config import ColoraError, GossipConfig, read_text_file

MIXINGS = ("metropolis", "laplacian", "uniform")
UNION_WINDOW = 5  # rounds over which a time-varying graph's union must be connected
_TOL = 1e-12
_FIX_HINT = "raise gossip.p, pick another gossip.topology, or add edges to the edge-list file"


@dataclass(frozen=True)
class Topology:
    """One round's graph and its mixing matrix.

    ``neighbors[i]`` are the nodes that exchange messages with i (sorted, i excluded);
    ``W[i, j] > 0`` only for j in neighbors[i] or j == i (W is the graph's mixing matrix).
    """

    name: str
    graph: nx.Graph
    W: np.ndarray
    neighbors: tuple[tuple[int, ...], ...]
    gap: float

    @property
    def n(self) -> int:
        return self.W.shape[0]

    @property
    def degrees(self) -> np.ndarray:
        return np.array([len(nb) for nb in self.neighbors])

    def edges(self) -> frozenset[tuple[int, int]]:
        """Undirected edges as (low, high) pairs."""
        return frozenset((min(a, b), max(a, b)) for a, b in self.graph.edges())

    def describe(self) -> str:
        """One line: family, size, degree statistics and spectral gap."""
        d = self.degrees
        return (f"gossip: {self.name} on {self.n} nodes, {self.graph.number_of_edges()} edges, degree "
                f"min {d.min()} mean {d.mean():.2f} max {d.max()}, spectral gap 1-|lambda2| = {self.gap:.4g}")


# -- graphs -------------------------------------------------------------------------------------

def _grid_shape(n: int) -> tuple[int, int]:
    # a x b = n with a the largest divisor not above sqrt(n): as square as n allows
    # (a prime n gives 1 x n, i.e. a ring for the torus and a path for the grid).
    a = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return a, n // a


def _exponential(n: int) -> nx.Graph:
    # Each node links to the nodes at distance 2^0, 2^1, ... < n around the ring (both ways, so the
    # graph is undirected): degree about 2 log2(n), gap bounded away from 0 as n grows.
    g = nx.empty_graph(n)
    k = 1
    while k < n:
        g.add_edges_from((i, (i + k) % n) for i in range(n))
        k *= 2
    return g


def read_edge_list(path: str | Path, n: int) -> nx.Graph:
    """An undirected graph on nodes 0..n-1 from a file of ``i j`` lines (0-based ids).

    Blank lines and ``#`` comments are skipped; a node id outside 0..n-1, a malformed line or a
    self-loop is a :class:`ColoraError` naming the file, line and value. A relative path is
    relative to the working directory (also when a run is resumed).
    """
    g = nx.empty_graph(n)
    for lineno, raw in enumerate(read_text_file(path, "gossip.topology edge-list file").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        where = f"gossip.topology={str(path)!r} line {lineno}"
        if len(parts) != 2 or not all(p.lstrip("-").isdigit() and len(p) < 10 for p in parts):
            # The line itself is not echoed: the path may point at a file that is not ours to print.
            raise ColoraError(f"{where}: expected two node ids 'i j' (0-based integers), got {len(parts)} field(s) that are not")
        i, j = int(parts[0]), int(parts[1])
        for v in (i, j):
            if not 0 <= v < n:
                raise ColoraError(f"{where}: unknown node {v} (nodes are 0..{n - 1} for clients.num={n})")
        if i == j:
            raise ColoraError(f"{where}: self-loop {i} {j} (a node always mixes with itself)")
        g.add_edge(i, j)
    return g


def build_graph(name: str, n: int, *, p: float = 0.3, seed: int = 0) -> nx.Graph:
    """The named graph on nodes 0..n-1 (or the edge-list file ``name`` points to).

    ``seed`` only matters for ``erdos_renyi``. Unknown names that are not files are errors.
    """
    if name == "ring":
        g = nx.cycle_graph(n) if n > 2 else nx.path_graph(n)  # 1 node: alone; 2 nodes: one edge
    elif name == "complete":
        g = nx.complete_graph(n)
    elif name == "erdos_renyi":
        g = nx.gnp_random_graph(n, p, seed=int(seed))
    elif name in ("torus", "grid"):
        a, b = _grid_shape(n)
        g = nx.grid_2d_graph(a, b, periodic=name == "torus" and min(a, b) > 2)
        if name == "torus" and a <= 2 < b:  # a thin torus: wrap the long side only
            g.add_edges_from(((r, 0), (r, b - 1)) for r in range(a))
        g = nx.convert_node_labels_to_integers(g, ordering="sorted")
    elif name == "exponential":
        g = _exponential(n)
    elif name == "star":
        g = nx.star_graph(n - 1) if n > 1 else nx.empty_graph(1)  # node 0 is the hub
    elif Path(name).is_file():
        g = read_edge_list(name, n)
    else:
        raise ColoraError(
            f"gossip.topology={name!r}: unknown topology and no such edge-list file "
            f"(valid names: {', '.join(TOPOLOGIES)}, or a path to a file of 'i j' lines)"
        )
    g.remove_edges_from(list(nx.selfloop_edges(g)))
    return g


# -- mixing matrices ----------------------------------------------------------------------------

def mixing_matrix(graph: nx.Graph, rule: str) -> np.ndarray:
    """The symmetric, doubly stochastic gossip matrix of ``graph`` under ``rule``.

    - metropolis: W_ij = 1 / (1 + max(d_i, d_j)) on edges, W_ii = 1 - sum of the row's others.
      Local (each node needs only its neighbours' degrees); diagonal >= 1/(1 + d_i) > 0.
    - laplacian: W = I - 2 L / (3 lambda_max(L)) with L = D - A (Dec-LoRA's choice); its
      eigenvalues lie in [1/3, 1], so it never oscillates, at the price of a smaller gap.
    - uniform: W = 11^T / n, exact averaging in one step; only a complete graph can do it.
    """
    n = graph.number_of_nodes()
    A = nx.to_numpy_array(graph, nodelist=range(n), dtype=np.float64)
    deg = A.sum(axis=1)
    if rule == "metropolis":
        W = A / (1.0 + np.maximum.outer(deg, deg))
        W[np.diag_indices(n)] = 1.0 - W.sum(axis=1)
    elif rule == "laplacian":
        L = np.diag(deg) - A
        lam_max = float(np.linalg.eigvalsh(L)[-1]) if n > 1 else 0.0
        W = np.eye(n) - (2.0 / (3.0 * lam_max)) * L if lam_max > 0 else np.eye(n)
    elif rule == "uniform":
        if graph.number_of_edges() != n * (n - 1) // 2:
            raise ColoraError(
                f"gossip.mixing=uniform needs a complete graph (gossip.topology=complete), but the graph has "
                f"{graph.number_of_edges()} of {n * (n - 1) // 2} edges; use gossip.mixing=metropolis or laplacian"
            )
        W = np.full((n, n), 1.0 / n)
    else:
        raise ColoraError(f"gossip.mixing={rule!r}: unknown rule (valid: {', '.join(MIXINGS)})")
    return W


def spectral_gap(W: np.ndarray) -> float:
    """1 - |lambda_2|: one minus the second largest eigenvalue magnitude of symmetric W (1 for n = 1)."""
    if W.shape[0] == 1:
        return 1.0
    mags = np.sort(np.abs(np.linalg.eigvalsh(W)))
    return float(1.0 - mags[-2])


def check_mixing(W: np.ndarray, tol: float = _TOL) -> None:
    """Raise :class:`ColoraError` unless W is square, symmetric, nonnegative and doubly stochastic."""
    if W.ndim != 2 or W.shape[0] != W.shape[1]:
        raise ColoraError(f"mixing matrix has shape {W.shape}; it must be square")
    if np.abs(W - W.T).max() > tol:
        raise ColoraError(f"mixing matrix is not symmetric (max |W - W^T| = {np.abs(W - W.T).max():.3g})")
    if W.min() < -tol:
        raise ColoraError(f"mixing matrix has a negative entry ({W.min():.3g})")
    if np.abs(W.sum(axis=1) - 1.0).max() > tol:
        raise ColoraError(f"mixing matrix rows do not sum to 1 (max error {np.abs(W.sum(axis=1) - 1).max():.3g})")


def make_topology(graph: nx.Graph, rule: str, name: str, require_connected: bool = True) -> Topology:
    """Mixing matrix, neighbour lists and spectral gap of ``graph``, validated.

    A disconnected graph (spectral gap 0: parts of the network never meet) is an error saying
    how to fix it, unless ``require_connected`` is False (one round of a time-varying graph).
    """
    n = graph.number_of_nodes()
    if require_connected and n > 1 and not nx.is_connected(graph):
        parts = nx.number_connected_components(graph)
        raise ColoraError(
            f"gossip.topology={name!r} on {n} nodes is disconnected ({parts} components), so the clients "
            f"can never agree; {_FIX_HINT}"
        )
    W = mixing_matrix(graph, rule)
    check_mixing(W)
    gap = spectral_gap(W)
    if require_connected and gap <= _TOL:
        raise ColoraError(f"gossip.topology={name!r} with gossip.mixing={rule}: spectral gap {gap:.3g} <= 0; {_FIX_HINT}")
    neighbors = tuple(tuple(sorted(graph.neighbors(i))) for i in range(n))
    return Topology(name, graph, W, neighbors, gap)


# -- the per-round schedule ---------------------------------------------------------------------

def _round_seed(seed: int, rnd: int, tag: int) -> np.random.Generator:
    return np.random.default_rng([seed, tag, rnd])


class TopologySchedule:
    """The graph and mixing matrix of every round, for ``gossip`` settings and n nodes.

    Static graphs are built and validated once. Time-varying graphs are a pure function of
    (run seed, round), so a resumed run sees the same sequence; all windows of the run are
    checked for connectivity up front, so a bad setting fails before any training.
    """

    def __init__(self, cfg: GossipConfig, n: int, seed: int, rounds: int):
        self.cfg, self.n, self.seed = cfg, n, seed
        self._cache: dict[int, Topology] = {}  # the last rounds asked for (a round and its predecessor)
        name = cfg.topology
        if not cfg.time_varying:
            self.base = make_topology(self._graph(0), cfg.mixing, name)
            return
        if name == "erdos_renyi":
            self.base = None
            self._check_windows(rounds)
        else:
            self.base = make_topology(self._graph(0), cfg.mixing, name)

    def _graph(self, rnd: int) -> nx.Graph:
        if self.cfg.topology == "erdos_renyi":
            er_seed = int(_round_seed(self.seed, rnd, 0xE7).integers(2**31 - 1))
            return build_graph("erdos_renyi", self.n, p=self.cfg.p, seed=er_seed)
        return build_graph(self.cfg.topology, self.n)

    def _check_windows(self, rounds: int) -> None:
        for start in range(1, rounds + 1, UNION_WINDOW):
            stop = min(start + UNION_WINDOW - 1, rounds)
            union = nx.compose_all([self._graph(r) for r in range(start, stop + 1)])
            if self.n > 1 and not nx.is_connected(union):
                raise ColoraError(
                    f"gossip.topology=erdos_renyi with gossip.p={self.cfg.p} and gossip.time_varying=true: the union "
                    f"of the graphs of rounds {start}-{stop} on {self.n} nodes is disconnected; {_FIX_HINT}"
                )

    def at(self, rnd: int) -> Topology:
        """The topology used in round ``rnd`` (1-based)."""
        if not self.cfg.time_varying:
            return self.base
        if rnd not in self._cache:
            if self.base is None:
                top = make_topology(self._graph(rnd), self.cfg.mixing, self.cfg.topology, require_connected=False)
            else:
                perm = _round_seed(self.seed, rnd, 0x9E1).permutation(self.n)
                relabelled = nx.relabel_nodes(self.base.graph, {i: int(perm[i]) for i in range(self.n)})
                top = make_topology(relabelled, self.cfg.mixing, self.cfg.topology)
            self._cache = {r: t for r, t in self._cache.items() if r >= rnd - 1} | {rnd: top}
        return self._cache[rnd]

    def describe(self) -> str:
        """Degree statistics and spectral gap (of round 1's graph when it varies), one or two lines."""
        line = self.at(1).describe() + f" ({self.cfg.mixing} mixing)"
        if self.cfg.time_varying:
            how = ("a fresh G(n, p) draw" if self.base is None else "a fresh random relabelling of the nodes")
            line += f"\n  time-varying: {how} each round (round 1 shown); every {UNION_WINDOW}-round union is connected"
        return line


def mix(states: list[dict], W: np.ndarray) -> list[dict]:
    """theta_i <- sum_j W_ij theta_j for every node i, over the keys of the states.

    Sums only over W's nonzero entries in increasing j (O(edges x adapter) work); with W = 11^T/n
    every output is exactly FedIT's uniform mean of the inputs (same weights, same order).
    """
    return [mix_row(states, W, i) for i in range(W.shape[0])]


def mix_row(states: list[dict], W: np.ndarray, i: int) -> dict:
    """Node i's mix, sum_j W_ij theta_j, over W's nonzero entries of row i in increasing j."""
    js = [j for j in range(W.shape[1]) if W[i, j] != 0.0]
    return {k: sum(float(W[i, j]) * states[j][k] for j in js) for k in states[i]}
