"""The pipedream method: exact against brute force, memory limits, replication, hierarchical and
heterogeneous machines, server files, and an end-to-end partition of a zoo model."""

from __future__ import annotations

import itertools
import json
import math
import random
import re
from collections.abc import Iterator
from dataclasses import replace

import networkx as nx
import pytest

from autopipe.cost import CostModel, stage_costs
from autopipe.errors import UserError
from autopipe.partitioning import METHODS, PartitionOptions, Plan, partition, pipedream
from autopipe.partitioning.base import DeviceGroup, Level
from autopipe.partitioning.pipedream import (
    RelativeDeviceGroup,
    fitting_plan,
    load_server_file,
    partition_pipedream,
    solve_pipedream,
    stage_times,
)


def _graph(n: int, seed: int, skip: float = 0.0, big_node: int | None = None) -> nx.DiGraph:
    """A contracted graph as ``autopipe.graph.contract`` makes it: a chain with random costs,
    plus skip connections with probability ``skip`` (each node may send a second value far)."""
    rng = random.Random(seed)
    graph = nx.DiGraph()
    for r in range(n):
        params = rng.randrange(0, 4_000_000)
        graph.add_node(
            r,
            members=[f"op{r}"],
            order=r,
            rank=r,
            forward_ms=float(rng.randrange(1, 20)),
            backward_ms=float(rng.randrange(1, 40)),
            param_bytes=params,
            state_bytes=params + rng.randrange(0, 100_000),
            activation_bytes=rng.randrange(100_000, 2_000_000),
            sends={},
        )
    if big_node is not None:
        graph.nodes[big_node]["forward_ms"] = 400.0
        graph.nodes[big_node]["backward_ms"] = 800.0
    for r in range(n - 1):
        _send(graph, r, r + 1, f"main{r}", rng.randrange(10_000, 30_000_000), rng.random() < 0.8)
        if r + 2 < n and rng.random() < skip:
            _send(
                graph,
                r,
                rng.randrange(r + 2, n),
                f"skip{r}",
                rng.randrange(10_000, 30_000_000),
                rng.random() < 0.5,
            )
    return graph


def _send(graph: nx.DiGraph, u: int, v: int, name: str, nbytes: int, grad: bool) -> None:
    graph.nodes[u]["sends"][name] = (nbytes, grad)
    values = graph.edges[u, v]["values"] if graph.has_edge(u, v) else []
    graph.add_edge(u, v, values=values + [name])


def _splits(n: int, p: int) -> Iterator[dict[int, int]]:
    """Every way to cut 0..n-1 into p non-empty contiguous runs, as stage_of dicts."""
    for cuts in itertools.combinations(range(1, n), p - 1):
        bounds = (0, *cuts, n)
        yield {r: s for s in range(p) for r in range(bounds[s], bounds[s + 1])}


def _brute_force(graph: nx.DiGraph, p: int, model: CostModel) -> float:
    """The best bottleneck over all contiguous splits, by autopipe.cost.stage_costs."""
    best = math.inf
    for stage_of in _splits(graph.number_of_nodes(), p):
        costs = stage_costs(graph, stage_of, p, model)
        if model.memory_limit is None or all(c.memory_bytes <= model.memory_limit for c in costs):
            best = min(best, max(c.time_ms for c in costs))
    return best


def _check_plan(graph: nx.DiGraph, plan: Plan, p: int) -> None:
    """Stages are contiguous in rank order, numbered 0..p-1, none empty."""
    order = sorted(graph.nodes, key=lambda n: graph.nodes[n]["rank"])
    stages = [plan.stage_of[n] for n in order]
    assert stages[0] == 0 and all(b - a in (0, 1) for a, b in itertools.pairwise(stages))
    assert stages[-1] == p - 1


@pytest.mark.parametrize("skip", [0.0, 0.4])
def test_matches_brute_force_on_chains_and_dags(skip: float) -> None:
    for seed in range(12):
        n = random.Random(seed).randrange(4, 10)
        graph = _graph(n, seed, skip)
        for p in range(2, min(4, n) + 1):
            options = PartitionOptions(
                cost=CostModel(bandwidth=random.Random(seed).choice([1.0, 12.0, 100.0]))
            )
            solution = solve_pipedream(graph, p, options)
            _check_plan(graph, solution.plan, p)
            costs = stage_costs(graph, solution.plan.stage_of, p, options.cost)
            assert solution.bottleneck_ms == pytest.approx(max(c.time_ms for c in costs), rel=1e-12)
            assert list(solution.stage_ms) == pytest.approx([c.time_ms for c in costs], rel=1e-12)
            assert solution.bottleneck_ms == pytest.approx(
                _brute_force(graph, p, options.cost), rel=1e-12
            )


def test_memory_limit_picks_the_best_feasible_split() -> None:
    checked = 0
    for seed in range(40):
        graph = _graph(8, seed, skip=0.3)
        free = CostModel(
            bandwidth=12.0, recomputation=seed % 2 == 0, schedule=("1f1b", "gpipe")[seed % 3 == 0]
        )
        unlimited = solve_pipedream(graph, 3, PartitionOptions(cost=free))
        peak = max(c.memory_bytes for c in stage_costs(graph, unlimited.plan.stage_of, 3, free))
        limited = replace(free, memory_limit=peak - 1)
        expected = _brute_force(graph, 3, limited)
        if math.isinf(expected):
            continue
        solution = solve_pipedream(graph, 3, PartitionOptions(cost=limited))
        costs = stage_costs(graph, solution.plan.stage_of, 3, limited)
        assert all(c.memory_bytes <= limited.memory_limit for c in costs)
        assert solution.bottleneck_ms == pytest.approx(expected, rel=1e-12)
        assert solution.bottleneck_ms >= unlimited.bottleneck_ms
        checked += 1
    assert checked >= 10


def test_an_impossible_memory_limit_names_what_the_best_split_needs() -> None:
    graph = _graph(7, 3, skip=0.3)
    model = CostModel(memory_limit=1e6)
    needed = min(
        max(c.memory_bytes for c in stage_costs(graph, stage_of, 3, model))
        for stage_of in _splits(7, 3)
    )
    with pytest.raises(UserError) as error:
        partition_pipedream(graph, 3, PartitionOptions(cost=model))
    message = str(error.value)
    assert f"needs {needed / 1e9:.2f} GB per device" in message
    assert re.match(
        r"no split into 3 stages fits in 0\.00 GB: .*raise -p or --memory_limit$", message
    )


def test_fitting_plan_is_none_exactly_where_no_split_fits() -> None:
    """fitting_plan finds out whether a split fits without the search that names what the best
    one needs; at and around the least memory it agrees with partition_pipedream."""
    for seed in range(8):
        graph = _graph(8, seed, skip=0.3)
        model = CostModel(recomputation=seed % 2 == 0, schedule=("1f1b", "gpipe")[seed % 3 == 0])
        needed = min(
            max(c.memory_bytes for c in stage_costs(graph, stage_of, 3, model))
            for stage_of in _splits(8, 3)
        )
        for limit in (needed - 1, needed - 0.5, needed, needed + 0.5, 1.1 * needed):
            options = PartitionOptions(cost=replace(model, memory_limit=limit))
            try:
                expected = partition_pipedream(graph, 3, options)
            except UserError:
                expected = None
            assert (expected is None) == (limit < needed)
            assert fitting_plan(graph, 3, options) == expected


def test_fitting_plan_within_a_time_finds_the_optimum_only_if_it_is_that_fast() -> None:
    """Asked for a split no slower than some ms, fitting_plan returns the optimal split where
    it is that fast (also where blocks of nodes give no bound, on 600 nodes), else None."""
    for seed, n in ((0, 9), (1, 12), (2, 600)):
        graph = _graph(n, seed, skip=0.3)
        for limit in (None, 1.05):
            model = CostModel()
            if limit is not None:
                free = solve_pipedream(graph, 3, PartitionOptions(cost=model)).plan.stage_of
                peak = max(c.memory_bytes for c in stage_costs(graph, free, 3, model))
                model = replace(model, memory_limit=limit * peak)
            options = PartitionOptions(cost=model)
            best = solve_pipedream(graph, 3, options)
            for factor in (1.0, 1.01, 2.0):
                within = best.bottleneck_ms * factor
                assert fitting_plan(graph, 3, options, within) == best.plan
            assert fitting_plan(graph, 3, options, best.bottleneck_ms * 0.99) is None


def _replicated_brute_force(graph: nx.DiGraph, devices: int, model: CostModel) -> float:
    """Best bottleneck over contiguous splits and replica counts, by the REFERENCE formula."""
    n, best = graph.number_of_nodes(), math.inf
    for count in range(1, min(n, devices) + 1):
        for stage_of in _splits(n, count):
            costs = stage_costs(graph, stage_of, count, model)
            for replicas in itertools.product(range(1, devices + 1), repeat=count):
                if sum(replicas) != devices:
                    continue
                times = [
                    c.compute_ms / m
                    + c.comm_ms
                    + model.transfer_ms(4 * (m - 1) * c.param_bytes / m)
                    for c, m in zip(costs, replicas)
                ]
                best = min(best, max(times))
    return best


def test_replication_matches_brute_force_and_uses_every_device() -> None:
    for seed in range(6):
        graph = _graph(6, seed, skip=0.3)
        model = CostModel(bandwidth=50.0)
        for devices in (2, 3, 4):
            solution = solve_pipedream(
                graph, devices, PartitionOptions(cost=model, replication=True)
            )
            assert sum(solution.plan.replicas) == devices
            assert len(solution.plan.replicas) == 1 + max(solution.plan.stage_of.values())
            assert solution.bottleneck_ms == pytest.approx(
                _replicated_brute_force(graph, devices, model), rel=1e-12
            )
            assert solution.bottleneck_ms == pytest.approx(
                max(
                    stage_times(
                        graph, solution.plan, PartitionOptions(cost=model, replication=True)
                    )
                ),
                rel=1e-12,
            )


def _fixed_brute_force(
    graph: nx.DiGraph, replicas: tuple[int, ...], model: CostModel, links: list[tuple[float, float]]
) -> float:
    """Best bottleneck over contiguous splits with stage s on ``replicas[s]`` devices, by the
    REFERENCE formula, with each stage's (send, all-reduce) bandwidths given in ``links``."""
    best, count = math.inf, len(replicas)
    for stage_of in _splits(graph.number_of_nodes(), count):
        costs = stage_costs(graph, stage_of, count, model)
        if model.memory_limit is not None and any(
            c.memory_bytes > model.memory_limit for c in costs
        ):
            continue
        times = [
            c.compute_ms / m
            + (c.send_bytes + c.grad_bytes) / (send * 1e9) * 1e3
            + 4 * (m - 1) * c.param_bytes / m / (reduce * 1e9) * 1e3
            for c, m, (send, reduce) in zip(costs, replicas, links)
        ]
        best = min(best, max(times))
    return best


@pytest.mark.parametrize("replicas", [(3, 1), (1, 2), (2, 1, 2), (1, 1, 3)])
def test_fixed_replicas_match_brute_force(replicas: tuple[int, ...]) -> None:
    for seed in range(6):
        graph = _graph(7, seed, skip=0.3)
        model = CostModel(bandwidth=50.0)
        options = PartitionOptions(cost=model, replicas=replicas)
        solution = solve_pipedream(graph, len(replicas), options)
        assert solution.plan.replicas == replicas
        _check_plan(graph, solution.plan, len(replicas))
        expected = _fixed_brute_force(graph, replicas, model, [(50.0, 50.0)] * len(replicas))
        assert solution.bottleneck_ms == pytest.approx(expected, rel=1e-12)
        assert solution.bottleneck_ms == pytest.approx(
            max(stage_times(graph, solution.plan, options)), rel=1e-12
        )


def test_fixed_replicas_respect_memory_and_the_machine_levels() -> None:
    servers = (Level(2, 300.0), Level(2, 1.0))
    # stage 0 on devices 0-2 all-reduces across the servers and sends within server 1
    links = [(300.0, 1.0), (300.0, 300.0)]
    checked = 0
    for seed in range(8):
        graph = _graph(7, seed, skip=0.3)
        free = CostModel(bandwidth=300.0)
        options = PartitionOptions(cost=free, replicas=(3, 1), levels=servers)
        solution = solve_pipedream(graph, 2, options)
        assert solution.bottleneck_ms == pytest.approx(
            _fixed_brute_force(graph, (3, 1), free, links), rel=1e-12
        )
        peak = max(c.memory_bytes for c in stage_costs(graph, solution.plan.stage_of, 2, free))
        limited = replace(free, memory_limit=peak - 1)
        expected = _fixed_brute_force(graph, (3, 1), limited, links)
        if math.isinf(expected):
            with pytest.raises(UserError, match="no split into 2 stages on 4 devices fits"):
                solve_pipedream(graph, 2, replace(options, cost=limited))
            continue
        fitted = solve_pipedream(graph, 2, replace(options, cost=limited))
        assert fitted.bottleneck_ms == pytest.approx(expected, rel=1e-12)
        checked += 1
    assert checked >= 2


def test_fixed_replicas_must_fit_the_stages() -> None:
    graph = _graph(6, 0)
    for replicas, message in (
        ((2, 1), "2 replica counts were given for 3 stages"),
        ((2, 0, 1), "at least one replica"),
    ):
        with pytest.raises(UserError, match=message):
            partition_pipedream(graph, 3, PartitionOptions(replicas=replicas))
    with pytest.raises(UserError, match="cannot be combined with --replication"):
        partition_pipedream(graph, 2, PartitionOptions(replicas=(1, 1), replication=True))
    with pytest.raises(UserError, match="2 x 2 = 4 devices but 3 ranks"):
        partition_pipedream(
            graph, 2, PartitionOptions(replicas=(2, 1), levels=(Level(2, 1.0), Level(2, 1.0)))
        )


def test_replication_beats_a_pipeline_when_one_layer_dominates() -> None:
    graph = _graph(6, 1, big_node=2)
    for r in graph.nodes:
        graph.nodes[r]["param_bytes"] = graph.nodes[r]["state_bytes"] = 1000
    plain = solve_pipedream(graph, 4, PartitionOptions())
    replicated = solve_pipedream(graph, 4, PartitionOptions(replication=True))
    assert sum(replicated.plan.replicas) == 4
    assert max(replicated.plan.replicas) > 1
    assert replicated.bottleneck_ms < 0.7 * plain.bottleneck_ms


def test_replication_respects_memory_and_in_flight_activations() -> None:
    graph = _graph(6, 2, skip=0.3)
    free = CostModel(bandwidth=50.0)
    options = PartitionOptions(cost=free, replication=True)
    unlimited = solve_pipedream(graph, 3, options)
    count = len(unlimited.plan.replicas)
    peak = max(c.memory_bytes for c in stage_costs(graph, unlimited.plan.stage_of, count, free))
    limited = replace(options, cost=replace(free, memory_limit=peak - 1))
    try:
        solution = solve_pipedream(graph, 3, limited)
    except UserError:
        return
    count = len(solution.plan.replicas)
    assert all(
        c.memory_bytes <= peak - 1
        for c in stage_costs(graph, solution.plan.stage_of, count, limited.cost)
    )
    assert solution.bottleneck_ms >= unlimited.bottleneck_ms


def test_hierarchical_machine_prices_server_cuts_at_the_slow_link() -> None:
    levels = (Level(2, 300.0), Level(2, 1.0))
    for seed in range(6):
        graph = _graph(8, seed)
        options = PartitionOptions(cost=CostModel(bandwidth=300.0), levels=levels)
        solution = solve_pipedream(graph, 4, options)
        _check_plan(graph, solution.plan, 4)
        fast = stage_costs(graph, solution.plan.stage_of, 4, CostModel(bandwidth=300.0))
        slow = stage_costs(graph, solution.plan.stage_of, 4, CostModel(bandwidth=1.0))
        expected = [fast[0].time_ms, slow[1].time_ms, fast[2].time_ms, fast[3].time_ms]
        assert list(solution.stage_ms) == pytest.approx(expected, rel=1e-12)
        best = math.inf
        for stage_of in _splits(8, 4):
            fast = stage_costs(graph, stage_of, 4, CostModel(bandwidth=300.0))
            slow = stage_costs(graph, stage_of, 4, CostModel(bandwidth=1.0))
            best = min(
                best, max(fast[0].time_ms, slow[1].time_ms, fast[2].time_ms, fast[3].time_ms)
            )
        assert solution.bottleneck_ms == pytest.approx(best, rel=1e-12)


def test_hierarchical_machine_needs_matching_stage_count() -> None:
    with pytest.raises(UserError, match="2 x 2 = 4 devices"):
        partition_pipedream(
            _graph(8, 0), 3, PartitionOptions(levels=(Level(2, 300.0), Level(2, 25.0)))
        )


def test_heterogeneous_devices_time_stages_on_their_device_type() -> None:
    graph = _graph(8, 4)
    own = {
        f"op{r}": graph.nodes[r]["forward_ms"] + graph.nodes[r]["backward_ms"] for r in graph.nodes
    }
    devices = (
        DeviceGroup("a", "fast", 2, own),
        RelativeDeviceGroup("b", "slow", 1, {}, slowdown=3.0),
    )
    options = PartitionOptions(cost=CostModel(bandwidth=1000.0), devices=devices)
    solution = solve_pipedream(graph, 3, options)
    costs = stage_costs(graph, solution.plan.stage_of, 3, options.cost)
    expected = [costs[0].time_ms, costs[1].time_ms, 3.0 * costs[2].compute_ms + costs[2].comm_ms]
    assert list(solution.stage_ms) == pytest.approx(expected, rel=1e-12)
    best = math.inf
    for stage_of in _splits(8, 3):
        c = stage_costs(graph, stage_of, 3, options.cost)
        best = min(best, max(c[0].time_ms, c[1].time_ms, 3.0 * c[2].compute_ms + c[2].comm_ms))
    assert solution.bottleneck_ms == pytest.approx(best, rel=1e-12)
    replicated = solve_pipedream(graph, 3, replace(options, replication=True))
    assert replicated.bottleneck_ms <= solution.bottleneck_ms + 1e-9
    with pytest.raises(UserError, match="3 devices but 4"):
        partition_pipedream(graph, 4, options)


def _solve_with(
    graph: nx.DiGraph, p: int, options: PartitionOptions, blocks: int, trials: tuple[float, ...]
):
    """Solve with the bound search set: ``blocks`` for the block guess, ``trials`` for the
    lower-bound multiples; a huge ``blocks`` and no ``trials`` solve without any bound."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipedream, "_GUESS_BLOCKS", blocks)
        patch.setattr(pipedream, "_TRIAL_FACTORS", trials)
        try:
            return solve_pipedream(graph, p, options)
        except UserError as error:
            return str(error)


def test_pruning_by_bounds_keeps_the_exact_optimum_and_its_ties() -> None:
    levels = (Level(2, 40.0), Level(2, 2.0))
    for seed in range(4):
        graph = _graph(48, seed, skip=0.2)
        unlimited = solve_pipedream(graph, 4, PartitionOptions())
        peak = max(
            c.memory_bytes for c in stage_costs(graph, unlimited.plan.stage_of, 4, CostModel())
        )
        for options in (
            PartitionOptions(cost=CostModel(bandwidth=1.0)),
            PartitionOptions(replication=True),
            PartitionOptions(levels=levels),
            PartitionOptions(cost=CostModel(memory_limit=0.9 * peak)),
            PartitionOptions(replication=True, cost=CostModel(memory_limit=0.95 * peak)),
            PartitionOptions(replicas=(1, 3, 1, 2)),
            PartitionOptions(replicas=(2, 1, 1, 1), cost=CostModel(memory_limit=0.9 * peak)),
        ):
            exact = _solve_with(graph, 4, options, blocks=10**9, trials=())
            for blocks, trials in ((6, (1.3, 3.0)), (10**9, (1.01, 1.1))):
                pruned = _solve_with(graph, 4, options, blocks, trials)
                if isinstance(exact, str):
                    assert pruned == exact
                else:
                    assert pruned.plan == exact.plan
                    assert pruned.bottleneck_ms == pytest.approx(exact.bottleneck_ms, rel=1e-12)


def test_ties_go_to_earlier_cuts_and_results_repeat() -> None:
    graph = nx.DiGraph()
    for r in range(6):
        graph.add_node(
            r,
            members=[f"op{r}"],
            rank=r,
            forward_ms=1.0,
            backward_ms=0.0,
            param_bytes=0,
            state_bytes=0,
            activation_bytes=0,
            sends={},
        )
    first = partition_pipedream(graph, 4, PartitionOptions())
    assert [first.stage_of[r] for r in range(6)] == [0, 1, 2, 2, 3, 3]
    assert partition_pipedream(graph, 4, PartitionOptions()) == first


def test_server_files(tmp_path) -> None:
    (tmp_path / "v100.json").write_text(json.dumps({"op0": 1.5, "op1": 2}))
    good = tmp_path / "servers.txt"
    good.write_text(
        "# two servers\nalpha\nV100 4 v100.json\nK80 2 3.5\n\nbeta\nV100 2 v100.json  # same profile\n"
    )
    groups = load_server_file(good)
    assert [(g.server, g.device_type, g.count) for g in groups] == [
        ("alpha", "V100", 4),
        ("alpha", "K80", 2),
        ("beta", "V100", 2),
    ]
    assert groups[0].compute_ms == {"op0": 1.5, "op1": 2.0}
    assert isinstance(groups[1], RelativeDeviceGroup) and groups[1].slowdown == 3.5
    bad = {
        "V100 4 v100.json\n": "line 1: a GPU line before any server name",
        "alpha\nV100 four v100.json\n": "line 2: the GPU count must be a positive integer",
        "alpha\nV100 4\n": "line 2: expected a server name",
        "alpha\nV100 4 missing.json\n": "line 2: cannot read profile",
        "alpha\nV100 4 -2\n": "line 2: a slowdown factor must be a positive number",
        "alpha\nbeta\nV100 1 2\n": "line 1: server alpha lists no GPUs",
        "alpha\nV100 1 2\nalpha\nV100 1 2\n": "line 3: server alpha is listed twice",
        "alpha\nV100 1 broken.json\n": "line 2: profile .* is not JSON",
        "alpha\nV100 1 list.json\n": "line 2: profile .* must map node names",
        "": "lists no GPUs",
    }
    (tmp_path / "broken.json").write_text("{")
    (tmp_path / "list.json").write_text("[1, 2]")
    for text, message in bad.items():
        path = tmp_path / "bad.txt"
        path.write_text(text)
        with pytest.raises(UserError, match=message) as error:
            load_server_file(path)
        assert "\n" not in str(error.value)
    with pytest.raises(UserError, match="cannot read server file"):
        load_server_file(tmp_path / "absent.txt")


def test_a_profile_missing_a_node_is_a_user_error() -> None:
    devices = (DeviceGroup("a", "fast", 2, {"op0": 1.0}),)
    with pytest.raises(UserError, match="no time for node op1"):
        partition_pipedream(_graph(4, 0), 2, PartitionOptions(devices=devices))


def test_partitions_a_zoo_model_end_to_end() -> None:
    from autopipe.graph import build_graph, propagate_values
    from autopipe.tasks import zoo_task
    from autopipe.trace import trace

    task = zoo_task("nlp", "gpt2_tiny", 2)
    traced = trace(task.model, task.example_inputs)
    graph = build_graph(traced, propagate_values(traced))
    for _, data in graph.nodes(data=True):
        data["forward_ms"] = 1e-6 * data["value"].nbytes + 1e-7 * data["param_bytes"]
        data["backward_ms"] = 2 * data["forward_ms"]
    assert "pipedream" in METHODS
    result = partition(graph, traced.graph_module, 4, "pipedream", PartitionOptions())
    assert result.n_stages == 4 and result.replicas == (1, 1, 1, 1)
    times = [c.time_ms for c in result.costs]
    assert max(times) == pytest.approx(
        max(stage_times(result.coarse, Plan(result.stage_of), PartitionOptions()))
    )
    replicated = partition(
        graph, traced.graph_module, 4, "pipedream", PartitionOptions(replication=True)
    )
    assert sum(replicated.replicas) == 4 and len(replicated.replicas) == replicated.n_stages
