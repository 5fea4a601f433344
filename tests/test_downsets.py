"""The exact program over down-sets: it enumerates every down-set, its split is the fastest of
all acyclic splits (checked by brute force), and `acyclic` reaches it."""

from __future__ import annotations

import itertools
import random

import networkx as nx
import pytest

from autopipe.cost import CostModel
from autopipe.partitioning import PartitionOptions
from autopipe.partitioning.acyclic import index_graph, partition_acyclic, stage_times
from autopipe.partitioning.downsets import MAX_DOWNSETS, downsets, fastest_split
from test_metis_acyclic import chain, contracted, diamonds, multi_valued, wide

MODEL = CostModel(bandwidth=1e-5)
"""Slow links: 1000 bytes cost 0.1 ms, so sends weigh as much as compute."""


def small_dag(n: int, seed: int) -> nx.DiGraph:
    """Random edges, some long, and uneven compute and bytes: few down-sets, many splits."""
    rng = random.Random(seed)
    edges = sorted({(u, v) for v in range(1, n) for u in rng.sample(range(v), min(v, 2))})
    return contracted(
        [rng.uniform(0.2, 3.0) for _ in range(n)],
        edges,
        nbytes=[rng.randint(1, 20) * 1000 for _ in range(n)],
    )


def brute_downsets(coarse: nx.DiGraph) -> set[frozenset[int]]:
    nodes = list(coarse.nodes)
    return {
        frozenset(subset)
        for size in range(len(nodes) + 1)
        for subset in itertools.combinations(nodes, size)
        if all(set(coarse.predecessors(v)) <= set(subset) for v in subset)
    }


def brute_fastest(coarse: nx.DiGraph, n_stages: int) -> float:
    """The best slowest stage over every assignment with non-empty stages and forward edges."""
    nodes, graph = index_graph(coarse)
    index = {n: i for i, n in enumerate(nodes)}
    edges = [(index[u], index[v]) for u, v in coarse.edges]
    best = float("inf")
    for stages in itertools.product(range(n_stages), repeat=len(nodes)):
        if len(set(stages)) < n_stages or any(stages[u] > stages[v] for u, v in edges):
            continue
        best = min(best, max(stage_times(graph, list(stages), n_stages, MODEL)))
    return best


@pytest.mark.parametrize("shape", ["diamonds", "wide", "random", "multi_valued"])
def test_every_down_set_is_found_once(shape: str) -> None:
    coarse = {
        "diamonds": lambda: diamonds(3),
        "wide": lambda: wide(3, 3),
        "random": lambda: small_dag(9, 1),
        "multi_valued": lambda: multi_valued(9, 2),
    }[shape]()
    nodes, graph = index_graph(coarse)
    sets = downsets(graph)
    found = [frozenset(nodes[i] for i, member in enumerate(row) if member) for row in sets]
    assert len(found) == len(set(found))
    assert set(found) == brute_downsets(coarse)
    assert not found[0] and len(found[-1]) == len(nodes)
    assert [len(s) for s in found] == sorted(len(s) for s in found)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n_stages", [2, 3])
def test_the_split_is_the_fastest_of_all_acyclic_splits(seed: int, n_stages: int) -> None:
    coarse = small_dag(8, seed) if seed % 2 else multi_valued(8, seed)
    _, graph = index_graph(coarse)
    stages = fastest_split(graph, n_stages, MODEL)
    assert sorted(set(stages)) == list(range(n_stages))
    source, target = graph.source.tolist(), graph.target.tolist()
    assert all(stages[u] <= stages[v] for u, v in zip(source, target))
    assert max(stage_times(graph, stages, n_stages, MODEL)) == pytest.approx(
        brute_fastest(coarse, n_stages), rel=1e-9
    )


@pytest.mark.parametrize("seed", range(6))
def test_acyclic_reaches_the_fastest_split_where_the_graph_allows_the_program(seed: int) -> None:
    coarse = small_dag(12, seed)
    nodes, graph = index_graph(coarse)
    for n_stages in (3, 4):
        options = PartitionOptions(cost=MODEL)
        stage_of = partition_acyclic(coarse, n_stages, options)
        reached = max(stage_times(graph, [stage_of[n] for n in nodes], n_stages, MODEL))
        best = max(stage_times(graph, fastest_split(graph, n_stages, MODEL), n_stages, MODEL))
        assert reached <= best * (1 + 1e-9)


def test_graphs_too_big_for_the_program_are_declined() -> None:
    _, branchy = index_graph(wide(8, 6))  # 7^8 down-sets
    assert downsets(branchy) is None
    assert fastest_split(branchy, 4, MODEL) is None
    _, long_chain = index_graph(chain(1500))  # few down-sets, but 1501^2 pairs of 1500 nodes
    assert len(downsets(long_chain)) == 1501 <= MAX_DOWNSETS
    assert fastest_split(long_chain, 4, MODEL) is None
    _, short = index_graph(chain(3))
    assert fastest_split(short, 4, MODEL) is None
