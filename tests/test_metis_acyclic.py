"""The `metis` and `acyclic` partitioners: valid acyclic stage graphs, exactly p stages,
determinism, quality against the lower bound, and the incremental cost model they share."""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import replace

import networkx as nx
import numpy as np
import pytest

import autopipe
from autopipe.cost import CostModel, lower_bound_ms, stage_costs
from autopipe.errors import UserError
from autopipe.graph import build_graph, propagate_values
from autopipe.partitioning import METHODS, PartitionOptions, expand, partition, validate
from autopipe.partitioning.acyclic import (
    CONTIGUOUS_MARGIN,
    StageLoads,
    _Matcher,
    acyclic_stages,
    coarsen,
    faster,
    index_graph,
    objective,
    partition_acyclic,
    refine,
    stage_memories,
    stage_times,
)
from autopipe.partitioning.metis import (
    attempt_seeds,
    backward_edges,
    metis_graph,
    metis_parts,
    ordered_stages,
    partition_metis,
)
from autopipe.partitioning.params import partition_by_params
from autopipe.partitioning.pipedream import partition_pipedream
from autopipe.tasks import zoo_task
from autopipe.trace import trace

MODEL = CostModel()


# Synthetic contracted graphs ----------------------------------------------------------------


def contracted(
    compute: list[float],
    edges: list[tuple[int, int]],
    nbytes: int | list[int] = 1000,
    carried: dict[tuple[int, int], list[str]] | None = None,
    sizes: dict[str, tuple[int, bool]] | None = None,
) -> nx.DiGraph:
    """A graph with the attributes ``autopipe.graph.contract`` produces; node i has rank i.

    Node u's value ``v{u}`` rides every edge out of u, unless ``carried[(u, v)]`` names the
    values on that edge; ``sizes`` gives (bytes, requires_grad) of named values, and
    ``nbytes`` the bytes of each ``v{u}`` (gradients required).
    """
    carried, sizes = carried or {}, dict(sizes or {})
    per_node = nbytes if isinstance(nbytes, list) else [nbytes] * len(compute)
    names = {edge: carried.get(edge, [f"v{edge[0]}"]) for edge in edges}
    sent: list[set[str]] = [set() for _ in compute]
    for (u, _), on in names.items():
        sent[u].update(on)
    graph = nx.DiGraph()
    for i, ms in enumerate(compute):
        sizes.setdefault(f"v{i}", (per_node[i], True))
        graph.add_node(
            i,
            members=[f"n{i}"],
            order=i,
            rank=i,
            param_bytes=0,
            state_bytes=0,
            forward_ms=ms / 3,
            backward_ms=2 * ms / 3,
            activation_bytes=per_node[i],
            sends={name: sizes[name] for name in sorted(sent[i])},
        )
    for (u, v), on in names.items():
        graph.add_edge(u, v, values=list(on), bytes=sum(sizes[name][0] for name in on))
    return graph


def fine_graph(coarse: nx.DiGraph) -> nx.DiGraph:
    """The traced-graph view ``validate`` checks: one op per contracted node, plus an input
    feeding the first node and a parameter read feeding the last."""
    fine = nx.DiGraph()
    fine.add_node("x", op="placeholder")
    fine.add_node("w", op="get_attr")
    for n in coarse.nodes:
        fine.add_node(f"n{n}", op="call_function")
    fine.add_edges_from((f"n{u}", f"n{v}") for u, v in coarse.edges)
    fine.add_edge("x", f"n{min(coarse.nodes)}")
    fine.add_edge("w", f"n{max(coarse.nodes)}")
    return fine


def chain(n: int = 30) -> nx.DiGraph:
    return contracted([1.0 + (i % 3) for i in range(n)], [(i, i + 1) for i in range(n - 1)])


def diamonds(k: int = 8) -> nx.DiGraph:
    """k fork-join diamonds in a row: a -> (b, c) -> d, d being the next a."""
    edges = []
    for j in range(k):
        a, b, c, d = 3 * j, 3 * j + 1, 3 * j + 2, 3 * j + 3
        edges += [(a, b), (a, c), (b, d), (c, d)]
    return contracted([1.0, 2.0, 0.5] * k + [1.0], edges)


def long_skips(n: int = 40) -> nx.DiGraph:
    """A chain whose every fifth node also feeds the node ten places later."""
    edges = [(i, i + 1) for i in range(n - 1)] + [(i, i + 10) for i in range(0, n - 10, 5)]
    return contracted([1.0] * n, edges, nbytes=[1000 * (1 + i % 4) for i in range(n)])


def wide(branches: int = 8, length: int = 6) -> nx.DiGraph:
    """A source, ``branches`` parallel chains, and a sink that joins them."""
    sink = 1 + branches * length
    edges = []
    for b in range(branches):
        first = 1 + b * length
        edges.append((0, first))
        edges += [(first + k, first + k + 1) for k in range(length - 1)]
        edges.append((first + length - 1, sink))
    return contracted([1.0] * (sink + 1), edges)


def layered(
    layers: int, width: int, seed: int = 0, skip: float = 0.2, span: int = 8, byte_scale: int = 1000
) -> nx.DiGraph:
    """Layers of ``width`` nodes, each fed by one or two nodes of the layer before and, now
    and then, by one up to ``span`` layers back; compute about 1 ms per node."""
    rng = random.Random(seed)
    edges = set()
    for layer in range(1, layers):
        for k in range(width):
            v = layer * width + k
            for _ in range(rng.randint(1, 2)):
                edges.add(((layer - 1) * width + rng.randrange(width), v))
            if layer >= 2 and rng.random() < skip:
                back = rng.randint(2, min(span, layer))
                edges.add(((layer - back) * width + rng.randrange(width), v))
    n = layers * width
    compute = [rng.uniform(0.8, 1.2) for _ in range(n)]
    return contracted(
        compute, sorted(edges), nbytes=[rng.randint(1, 10) * byte_scale for _ in range(n)]
    )


def random_dag(n: int, density: float, seed: int, span: int = 4) -> nx.DiGraph:
    """Dense short-range edges: many merge candidates whose other paths run through pairs."""
    rng = random.Random(seed)
    edges = sorted(
        {(u, v) for v in range(n) for u in range(max(0, v - span), v) if rng.random() < density}
    )
    return contracted([rng.uniform(0.1, 2.0) for _ in range(n)], edges)


def multi_valued(n: int, seed: int) -> nx.DiGraph:
    """Every node makes two values (one without a gradient) that reach different consumers,
    so stage sends depend on values counted once over several consumers."""
    rng = random.Random(seed)
    edges = sorted({(u, v) for v in range(1, n) for u in rng.sample(range(v), min(v, 2))})
    carried, sizes = {}, {}
    for u, v in edges:
        sizes[f"a{u}"] = (rng.randint(1, 10**7), True)
        sizes[f"b{u}"] = (rng.randint(1, 10**7), False)
        carried[(u, v)] = rng.choice([[f"a{u}"], [f"b{u}"], [f"a{u}", f"b{u}"]])
    return contracted(
        [rng.uniform(0.0, 3.0) for _ in range(n)], edges, carried=carried, sizes=sizes
    )


def with_weights(graph: nx.DiGraph, seed: int) -> nx.DiGraph:
    """``graph`` with random parameter and state bytes on its nodes, so that stage memory
    depends on which nodes a stage holds and not only on the values it receives."""
    rng = random.Random(seed)
    for node in graph.nodes:
        params = rng.randrange(0, 4_000_000)
        graph.nodes[node]["param_bytes"] = params
        graph.nodes[node]["state_bytes"] = params + rng.randrange(0, 100_000)
    return graph


SHAPES = {
    "chain": chain,
    "diamonds": diamonds,
    "long_skips": long_skips,
    "wide": wide,
    "layered": lambda: layered(6, 5, seed=3),
}
PARTITIONERS = {"acyclic": partition_acyclic, "metis": partition_metis}


def slowest(coarse: nx.DiGraph, stage_of: dict[int, int], n_stages: int) -> float:
    return max(cost.time_ms for cost in stage_costs(coarse, stage_of, n_stages, MODEL))


# Validity -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(PARTITIONERS))
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_valid_acyclic_exact_and_deterministic(method: str, shape: str) -> None:
    coarse = SHAPES[shape]()
    fine = fine_graph(coarse)
    for n_stages in range(1, 5):
        options = PartitionOptions(seed=n_stages)
        stage_of = PARTITIONERS[method](coarse, n_stages, options)
        validate(fine, expand(fine, coarse, stage_of), n_stages)
        assert sorted(set(stage_of.values())) == list(range(n_stages))
        assert all(stage_of[u] <= stage_of[v] for u, v in coarse.edges)
        assert PARTITIONERS[method](coarse, n_stages, options) == stage_of


def test_methods_are_registered() -> None:
    assert METHODS["acyclic"] is partition_acyclic
    assert METHODS["metis"] is partition_metis


@pytest.mark.parametrize("seed", range(6))
def test_random_dense_graphs_stay_valid(seed: int) -> None:
    coarse = random_dag(150, 0.4, seed)
    n_stages = 2 + seed % 4
    for method in PARTITIONERS.values():
        stage_of = method(coarse, n_stages, PartitionOptions(seed=seed))
        assert sorted(set(stage_of.values())) == list(range(n_stages))
        assert all(stage_of[u] <= stage_of[v] for u, v in coarse.edges)


def test_graphs_without_edges_or_profile() -> None:
    isolated = contracted([0.0] * 7, [])
    for method in PARTITIONERS.values():
        stage_of = method(isolated, 3, PartitionOptions())
        assert sorted(set(stage_of.values())) == [0, 1, 2]
        assert method(chain(5), 5, PartitionOptions()) == {i: i for i in range(5)}


# Coarsening ---------------------------------------------------------------------------------


def _is_dag(level) -> bool:
    graph = nx.DiGraph()
    graph.add_nodes_from(range(len(level)))
    graph.add_edges_from(zip(level.source.tolist(), level.target.tolist()))
    return nx.is_directed_acyclic_graph(graph)


@pytest.mark.parametrize("seed", range(8))
def test_every_coarsening_level_is_acyclic(seed: int) -> None:
    _, finest = index_graph(random_dag(120, 0.5, seed))
    levels = coarsen(finest, 1, seed)
    assert len(levels) > 2
    assert all(_is_dag(level) for level in levels)
    for finer, coarser in itertools.pairwise(levels):
        assert len(coarser) < len(finer) and np.isclose(coarser.weight.sum(), finer.weight.sum())


def test_a_merge_closing_a_path_through_an_earlier_pair_is_refused() -> None:
    # u1 -> v1 and u2 -> v2, crossed by u1 -> v2 and u2 -> v1: once u1 and v1 are merged,
    # merging u2 and v2 would close the cycle {u1, v1} -> {u2, v2} -> {u1, v1}.
    _, graph = index_graph(contracted([1.0] * 4, [(0, 2), (1, 3), (0, 3), (1, 2)]))
    matcher = _Matcher(graph, cap=float("inf"))
    assert matcher.safe(1, 3)
    matcher.mate[0], matcher.mate[2] = 2, 0
    assert not matcher.safe(1, 3)


# The incremental cost model -----------------------------------------------------------------


def _contiguous_stages(n: int, n_stages: int, rng: random.Random) -> list[int]:
    cuts = sorted(rng.sample(range(1, n), n_stages - 1))
    return [sum(1 for c in cuts if c <= u) for u in range(n)]


@pytest.mark.parametrize("seed", range(4))
def test_stage_loads_agree_with_the_cost_model_move_by_move(seed: int) -> None:
    rng = random.Random(seed)
    coarse = with_weights(multi_valued(60, seed), seed)
    nodes, graph = index_graph(coarse)
    n_stages = 4
    stages = _contiguous_stages(len(nodes), n_stages, rng)
    start = stage_costs(coarse, dict(zip(nodes, stages)), n_stages, MODEL)
    limit = float(sorted(c.memory_bytes for c in start)[n_stages // 2])
    model = replace(MODEL, memory_limit=limit)
    loads = StageLoads(graph, stages, n_stages, model)
    forbidden = 0
    for _ in range(200):
        node, target = rng.randrange(len(nodes)), rng.randrange(n_stages)
        source = stages[node]
        if target == source or loads.clusters_in[source] == 1:
            continue
        before = [m.total for m in loads.memory]
        priced = loads.price(node, target)
        loads.move(node, target)
        key = loads.key()
        costs = stage_costs(coarse, dict(zip(nodes, stages)), n_stages, model)
        memory = [c.memory_bytes for c in costs]
        assert [m.total for m in loads.memory] == memory
        assert stage_memories(graph, stages, n_stages, model) == memory
        assert key[0] == sum(m - limit for m in memory if m > limit)
        raised = any(memory[s] > limit and memory[s] > before[s] for s in (source, target))
        forbidden += raised
        if raised:
            assert priced[0] == math.inf
        else:
            assert priced[0] == key[0] and priced[2] == key[2]
            assert priced[1] == pytest.approx(key[1], rel=1e-9, abs=1e-12)
        expected = [cost.time_ms for cost in costs]
        assert loads.times == pytest.approx(expected, rel=1e-9, abs=1e-12)
        assert stage_times(graph, stages, n_stages, MODEL) == pytest.approx(
            expected, rel=1e-9, abs=1e-12
        )
    assert forbidden > 0


def test_coarse_levels_are_priced_as_their_members() -> None:
    rng = random.Random(5)
    coarse = with_weights(multi_valued(200, 5), 5)
    nodes, finest = index_graph(coarse)
    levels = coarsen(finest, 2, seed=0)
    owner = np.arange(len(finest))
    for depth, level in enumerate(levels):
        stages = (
            _contiguous_stages(len(level), 3, rng) if len(level) > 3 else list(range(len(level)))
        )
        stage_of = {n: stages[owner[u]] for u, n in enumerate(nodes)}
        costs = stage_costs(coarse, stage_of, 3, MODEL)
        expected = [cost.time_ms for cost in costs]
        assert stage_times(level, stages, 3, MODEL) == pytest.approx(expected, rel=1e-9, abs=1e-12)
        assert stage_memories(level, stages, 3, MODEL) == [cost.memory_bytes for cost in costs]
        if level.parent is not None:
            owner = level.parent[owner]


def test_faster_orders_memory_excess_first_then_slowest_stage_then_bytes() -> None:
    assert faster((0, (5.0, 1.0), 100), (0, (6.0, 0.0), 0))
    assert faster((0, (6.0, 1.0), 100), (0, (6.0, 2.0), 0))
    assert faster((0, (6.0, 2.0), 10), (0, (6.0, 2.0), 20))
    assert not faster((0, (6.0, 2.0), 20), (0, (6.0, 2.0), 20))
    assert faster((10, (9.0, 9.0), 100), (20, (1.0, 1.0), 0))
    assert not faster((math.inf, (1.0, 1.0), 0), (5, (9.0, 9.0), 100))


# Quality ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_stages", [2, 3, 4])
def test_acyclic_beats_equal_count_and_nears_the_lower_bound(n_stages: int) -> None:
    coarse = layered(20, 10, seed=n_stages)
    assert coarse.number_of_nodes() == 200
    stage_of = partition_acyclic(coarse, n_stages, PartitionOptions())
    equal_count = partition_by_params(coarse, n_stages, PartitionOptions())
    assert slowest(coarse, stage_of, n_stages) <= slowest(coarse, equal_count, n_stages)
    assert slowest(coarse, stage_of, n_stages) <= 1.10 * lower_bound_ms(coarse, n_stages)


def _two_chains(n: int) -> nx.DiGraph:
    """Chains a_i = 2i and b_i = 2i+1 with heavy links, crossed by light a_i -> b_(i+1) and
    b_i -> a_(i+1): METIS likes to cut the light edges, which leaves the chains feeding each
    other both ways."""
    edges, carried, sizes = [], {}, {}
    for i in range(n - 1):
        for u, v, heavy in (
            (2 * i, 2 * i + 2, True),
            (2 * i + 1, 2 * i + 3, True),
            (2 * i, 2 * i + 3, False),
            (2 * i + 1, 2 * i + 2, False),
        ):
            edges.append((u, v))
            name = f"v{u}" if heavy else f"s{u}"
            carried[(u, v)] = [name]
            sizes[name] = (10**6 if heavy else 10**3, True)
    return contracted([1.0] * (2 * n), edges, carried=carried, sizes=sizes)


def test_metis_repairs_parts_that_feed_each_other() -> None:
    coarse = _two_chains(10)
    _, graph = index_graph(coarse)
    csr = metis_graph(graph)
    seeds = attempt_seeds(0, 10)
    raw = [ordered_stages(metis_parts(csr, 2, seed), 2) for seed in seeds]
    assert any(backward_edges(graph, stages) > 0 for stages in raw)
    stage_of = partition_metis(coarse, 2, PartitionOptions(seed=0))
    fine = fine_graph(coarse)
    validate(fine, expand(fine, coarse, stage_of), 2)
    assert all(stage_of[u] <= stage_of[v] for u, v in coarse.edges)


def test_ten_thousand_nodes_give_valid_partitions() -> None:
    # how fast: benchmarks/partition_speed.py
    coarse = layered(100, 100, seed=1, byte_scale=100_000)
    for method in PARTITIONERS.values():
        stage_of = method(coarse, 8, PartitionOptions())
        assert sorted(set(stage_of.values())) == list(range(8))
        assert all(stage_of[u] <= stage_of[v] for u, v in coarse.edges)


# Memory limits ------------------------------------------------------------------------------

LIMITED_SHAPES = {
    "layered": lambda seed: layered(6, 5, seed=seed),
    "random_dag": lambda seed: random_dag(60, 0.4, seed),
    "multi_valued": lambda seed: multi_valued(60, seed),
}


@pytest.mark.parametrize("shape", sorted(LIMITED_SHAPES))
def test_acyclic_meets_a_memory_limit_that_its_contiguous_start_meets(shape: str) -> None:
    checked = 0
    for seed in range(6):
        coarse = with_weights(LIMITED_SHAPES[shape](seed), seed)
        n_stages = 3 + seed % 3
        free = partition_acyclic(coarse, n_stages, PartitionOptions())
        peak = max(c.memory_bytes for c in stage_costs(coarse, free, n_stages, MODEL))
        model = replace(MODEL, memory_limit=0.97 * peak)
        options = PartitionOptions(cost=model)
        try:
            start = partition_pipedream(coarse, n_stages, options).stage_of
        except UserError:
            continue
        stage_of = partition_acyclic(coarse, n_stages, options)
        costs = stage_costs(coarse, stage_of, n_stages, model)
        assert max(c.memory_bytes for c in costs) <= model.memory_limit
        assert max(c.time_ms for c in costs) <= slowest(coarse, start, n_stages) * (1 + 1e-9)
        fine = fine_graph(coarse)
        validate(fine, expand(fine, coarse, stage_of), n_stages)
        assert sorted(set(stage_of.values())) == list(range(n_stages))
        checked += 1
    assert checked >= 4


@pytest.mark.parametrize("shape", sorted(LIMITED_SHAPES))
def test_acyclic_is_never_slower_than_the_optimal_contiguous_split(shape: str) -> None:
    for seed, n_stages in itertools.product(range(4), (2, 4, 7)):
        coarse = with_weights(LIMITED_SHAPES[shape](seed), seed)
        split = partition_pipedream(coarse, n_stages, PartitionOptions()).stage_of
        stage_of = partition_acyclic(coarse, n_stages, PartitionOptions())
        assert slowest(coarse, stage_of, n_stages) <= slowest(coarse, split, n_stages) * (1 + 1e-9)


def test_the_contiguous_split_is_searched_for_only_where_it_can_win() -> None:
    """Where the other starts fit in memory, only a split at most CONTIGUOUS_MARGIN slower
    than the best of them is asked for; where they do not, any split that fits."""
    coarse = with_weights(layered(6, 5, seed=2), 2)
    nodes, graph = index_graph(coarse)
    asked: list[float] = []

    def contiguous(within: float) -> None:
        asked.append(within)

    for limit in (None, 1.0):
        options = PartitionOptions(cost=replace(MODEL, memory_limit=limit))
        stages = acyclic_stages(graph, 3, options, contiguous)
        if limit is None:
            best = objective(graph, stages, 3, MODEL)[1][0]
            assert asked.pop() == pytest.approx(best * (1 + CONTIGUOUS_MARGIN), rel=1e-6)
        else:
            assert asked.pop() == math.inf


def test_refinement_brings_a_stage_under_the_limit_before_it_balances_time() -> None:
    # four light nodes holding big weights, then four heavy nodes holding none: stage 0 must
    # give up a weight-holding node to fit, though that slows the slowest stage, stage 1
    coarse = contracted([1.0] * 4 + [10.0] * 4, [(i, i + 1) for i in range(7)])
    for node in range(4):
        coarse.nodes[node]["param_bytes"] = coarse.nodes[node]["state_bytes"] = 10**8
    fitting = {n: int(n >= 3) for n in coarse.nodes}
    limit = float(max(c.memory_bytes for c in stage_costs(coarse, fitting, 2, MODEL)))
    model = replace(MODEL, memory_limit=limit)
    nodes, graph = index_graph(coarse)
    stages = [int(n >= 4) for n in nodes]
    assert max(stage_memories(graph, stages, 2, model)) > limit
    refine(graph, StageLoads(graph, stages, 2, model), 2)
    assert max(stage_memories(graph, stages, 2, model)) <= limit
    assert max(stage_times(graph, stages, 2, model)) > 40.0


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_a_memory_limit_no_stage_reaches_changes_nothing(shape: str) -> None:
    coarse = with_weights(SHAPES[shape](), 0)
    roomy = replace(MODEL, memory_limit=1e15)
    for n_stages in range(2, 5):
        assert partition_acyclic(
            coarse, n_stages, PartitionOptions(seed=n_stages, cost=roomy)
        ) == partition_acyclic(coarse, n_stages, PartitionOptions(seed=n_stages))


# End to end ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet_tiny():
    task = zoo_task("vision", "resnet_tiny", 2)
    traced = trace(task.model, task.example_inputs)
    graph = build_graph(traced, propagate_values(traced))
    for _, data in graph.nodes(data=True):
        data["forward_ms"] = data["value"].nbytes / 1e6 + 0.001
        data["backward_ms"] = 2 * data["forward_ms"]
    return traced, graph


@pytest.mark.parametrize("method", ["acyclic", "metis"])
def test_partition_a_zoo_model(resnet_tiny, method: str) -> None:
    traced, graph = resnet_tiny
    result = partition(graph, traced.graph_module, 3, method, PartitionOptions())
    assert result.n_stages == 3
    validate(graph, result.assignment, 3)
    assert max(c.time_ms for c in result.costs) <= 1.5 * lower_bound_ms(result.coarse, 3)
    again = partition(graph, traced.graph_module, 3, method, PartitionOptions())
    assert again.assignment == result.assignment


UNLIMITED = {
    ("vision", "resnet_tiny", 3): "00000110000001111111111111111222222222222222222222222222",
    ("nlp", "gpt2_tiny", 4): (
        "0000000000000000000000000000000000000011111122222222222222222222222222233333333333"
    ),
}
"""Stage of every graph node (flops profile, batch 2), in graph order, as the partitioner gave
them before refinement knew about memory limits."""


@pytest.mark.parametrize("family, name, n_stages", sorted(UNLIMITED), ids=str)
def test_without_a_memory_limit_zoo_partitions_are_unchanged(
    family: str, name: str, n_stages: int
) -> None:
    task = zoo_task(family, name, 2)
    result = autopipe.compile(
        task.model, task.example_inputs, n_stages, write=False, analysis=False
    )
    stages = "".join(str(result.assignment[n]) for n in result.graph.nodes)
    assert stages == UNLIMITED[family, name, n_stages]


def test_a_zoo_model_meets_a_limit_below_its_unlimited_partition() -> None:
    task = zoo_task("nlp", "bert_tiny", 2)
    free = autopipe.compile(task.model, task.example_inputs, 3, write=False, analysis=False)
    limit = 0.9 * max(c.memory_bytes for c in free.partition.costs)
    limited = autopipe.compile(
        task.model,
        task.example_inputs,
        3,
        write=False,
        analysis=False,
        options=PartitionOptions(cost=CostModel(memory_limit=limit)),
    )
    assert max(c.memory_bytes for c in limited.partition.costs) <= limit
    validate(limited.graph, limited.assignment, 3)
