"""The `metis` method: METIS k-way partitioning, repaired into an acyclic pipeline.

METIS (through pymetis) balances compute and minimizes the bytes cut on the *undirected*
graph, so its parts may send values to each other in both directions, which would deadlock a
pipeline. Each attempt therefore:

1. runs k-way METIS with vertex weights = compute (forward + backward ms) and edge weights =
   the bytes a cut moves (values plus their gradients), both scaled to integers;
2. orders the parts into stages by the mean topological position of their nodes;
3. repairs every edge that goes to an earlier stage, in two ways kept as two candidates: a sweep
   in topological order that moves each node to the latest stage of its predecessors when that
   is later (push), and a sweep in reverse order that moves each node to the earliest stage of
   its successors when that is earlier (pull);
4. drops stages the repair emptied and splits the stage with the most compute, in topological
   order, until there are exactly ``n_stages``.

Attempts use ``options.metis_attempts`` seeds derived from ``options.seed``; the candidate with
the fastest slowest stage wins (``autopipe.cost`` stage times compared slowest first, then the
fewer bytes sent).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import networkx as nx
import numpy as np
import pymetis

from autopipe.partitioning.acyclic import (
    ClusterGraph,
    balanced_split,
    check_request,
    index_graph,
    objective,
)
from autopipe.partitioning.base import PartitionOptions, without_cycle_collection

WEIGHT_SCALE = 1_000_000
"""Total integer vertex weight METIS sees; each vertex weighs at least 1."""
EDGE_SCALE = 10_000
"""Integer weight of the heaviest edge; each edge weighs at least 1."""


@without_cycle_collection
def partition_metis(coarse: nx.DiGraph, n_stages: int, options: PartitionOptions) -> dict[int, int]:
    """Stage of every contracted node: the best repaired METIS partition over several seeds."""
    check_request(coarse, n_stages)
    nodes, graph = index_graph(coarse)
    if n_stages == 1:
        return {n: 0 for n in nodes}
    csr = metis_graph(graph)
    best, best_key = None, None
    for seed in attempt_seeds(options.seed, options.metis_attempts):
        parts = metis_parts(csr, n_stages, seed)
        for stages in repairs(graph, ordered_stages(parts, n_stages)):
            stages = fill_stages(graph, stages, n_stages)
            key = objective(graph, stages, n_stages, options.cost)
            if best_key is None or key < best_key:
                best, best_key = stages, key
    return {n: best[u] for u, n in enumerate(nodes)}


def attempt_seeds(seed: int, attempts: int) -> list[int]:
    """``attempts`` (at least one) METIS seeds, a function of ``seed`` alone."""
    rng = random.Random(seed)
    return [rng.randrange(2**31 - 1) for _ in range(max(1, attempts))]


@dataclass(frozen=True)
class MetisGraph:
    """The undirected graph in the CSR form METIS reads, with integer weights."""

    xadj: list[int]
    adjncy: list[int]
    eweights: list[int]
    vweights: list[int]


def metis_graph(graph: ClusterGraph) -> MetisGraph:
    """Vertex weights = compute, edge weights = bytes a cut moves, both scaled to integers."""
    ends = np.concatenate([graph.source, graph.target])
    others = np.concatenate([graph.target, graph.source])
    weights = np.tile(_scaled(graph.edge_bytes, EDGE_SCALE), 2)
    order = np.lexsort((others, ends))
    xadj = np.concatenate([[0], np.cumsum(np.bincount(ends, minlength=len(graph)))])
    return MetisGraph(
        xadj.tolist(),
        others[order].tolist(),
        weights[order].tolist(),
        _scaled_total(graph.weight, WEIGHT_SCALE).tolist(),
    )


def metis_parts(csr: MetisGraph, n_parts: int, seed: int) -> list[int]:
    """Raw k-way METIS parts: the part of each node, by index."""
    adjacency = pymetis.CSRAdjacency(adj_starts=csr.xadj, adjacent=csr.adjncy)
    _, parts = pymetis.part_graph(
        n_parts,
        adjacency,
        vweights=csr.vweights,
        eweights=csr.eweights or None,
        recursive=False,
        options=pymetis.Options(seed=seed),
    )
    return list(parts)


def _scaled(values: np.ndarray, scale: int) -> np.ndarray:
    """Positive integers proportional to ``values``, the largest mapping to ``scale``."""
    largest = float(values.max()) if len(values) else 0.0
    if largest <= 0:
        return np.ones(len(values), dtype=np.int64)
    return np.maximum(1, np.rint(values / largest * scale)).astype(np.int64)


def _scaled_total(values: np.ndarray, scale: int) -> np.ndarray:
    """Positive integers proportional to ``values``, all of them summing to about ``scale``."""
    total = float(values.sum())
    if total <= 0:
        return np.ones(len(values), dtype=np.int64)
    return np.maximum(1, np.rint(values / total * scale)).astype(np.int64)


def ordered_stages(parts: list[int], n_parts: int) -> list[int]:
    """Number the parts as stages by the mean topological position of their nodes."""
    part = np.asarray(parts, dtype=np.int64)
    sizes = np.bincount(part, minlength=n_parts)
    sums = np.bincount(part, weights=np.arange(len(part), dtype=np.float64), minlength=n_parts)
    mean = np.where(sizes > 0, sums / np.maximum(sizes, 1), np.inf)
    rank = np.empty(n_parts, dtype=np.int64)
    rank[np.lexsort((np.arange(n_parts), mean))] = np.arange(n_parts)
    return rank[part].tolist()


def backward_edges(graph: ClusterGraph, stages: list[int]) -> int:
    """How many edges go to an earlier stage (each one a cycle in the stage graph)."""
    stage = np.asarray(stages, dtype=np.int64)
    return int(np.count_nonzero(stage[graph.target] < stage[graph.source]))


def repairs(graph: ClusterGraph, stages: list[int]) -> list[list[int]]:
    """Two acyclic versions of ``stages``: nodes pushed later to their predecessors' latest
    stage (sweeping forward), and nodes pulled earlier to their successors' earliest stage
    (sweeping backward). Node indices are a topological order, so one sweep of each suffices."""
    pushed = list(stages)
    for v, before in enumerate(graph.pred_lists):
        for u in before:
            pushed[v] = max(pushed[v], pushed[u])
    pulled = list(stages)
    for u in range(len(graph) - 1, -1, -1):
        for v in graph.succ_lists[u]:
            pulled[u] = min(pulled[u], pulled[v])
    return [pushed, pulled]


def fill_stages(graph: ClusterGraph, stages: list[int], n_stages: int) -> list[int]:
    """Renumber the non-empty stages in order, then split the stage with the most compute into
    an earlier and a later half of its nodes in topological order until there are ``n_stages``.

    Splitting a stage by topological position keeps every edge going forward: an edge inside it
    goes from the earlier half to the later one, or stays within a half.
    """
    used = sorted(set(stages))
    renumber = {s: k for k, s in enumerate(used)}
    stages = [renumber[s] for s in stages]
    count = len(used)
    while count < n_stages:
        members: list[list[int]] = [[] for _ in range(count)]
        for u, s in enumerate(stages):
            members[s].append(u)
        load = [sum(graph.weights[u] for u in m) for m in members]
        widest = max(
            (s for s in range(count) if len(members[s]) > 1),
            key=lambda s: (load[s], len(members[s]), -s),
        )
        cut = balanced_split([graph.weights[u] for u in members[widest]])
        later = set(members[widest][cut:])
        stages = [s + 1 if s > widest or u in later else s for u, s in enumerate(stages)]
        count += 1
    return stages
