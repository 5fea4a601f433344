"""The `acyclic` method: a multilevel partitioner whose stage graph is a DAG by construction.

A pipeline deadlocks when a value flows from a later stage back to an earlier one, so every
step here keeps all edges going to the same or a later stage:

1. Coarsen: merge pairs of nodes joined by an edge, heavy edges (bytes) and light nodes first,
   but only when the merged graph stays acyclic (no other path joins the two nodes); repeat
   level by level until about ``10 * p`` nodes remain or merging stalls.
2. Initial partition: cut a topological order of the coarsest graph into ``p`` contiguous runs
   with the smallest possible largest compute (a contiguous cut of a topological order is
   acyclic). It balances compute alone; under a memory limit, step 3 first moves work out of
   the stages over it.
3. Uncoarsen: project the stages level by level onto finer nodes and, at each level, move
   single nodes to a neighbouring stage when all their predecessors sit in earlier-or-equal
   stages and all their successors in later-or-equal ones, and the move makes the pipeline
   faster: a lower slowest stage time from ``autopipe.cost`` (compute + communication), or the
   same slowest stage and a lower next slowest, and so on (so that work can flow towards a
   light stage through the stages in between), ties going to fewer bytes sent. No move
   empties a stage. Under a memory limit (``CostModel.memory_limit``, stage memory from
   ``autopipe.cost.stage_memory``) no move may raise a device's memory above the limit, and the
   bytes by which devices exceed it come first in the objective: a start within the limit stays
   within it, and moves that bring an over-limit device back under it win over faster ones.
   A device's memory is its stage's, or under wpipe the sum of its two stages'
   (``autopipe.cost.device_totals``).
4. The finest graph's own contiguous cut, the optimal contiguous split (the PipeDream
   program, which meets a memory limit whenever any contiguous split does) and, on a graph
   with few down-sets, the fastest acyclic split of all (an exact program over down-sets,
   ``autopipe.partitioning.downsets``, blind to memory), refined the same way, compete with
   the multilevel result. The split is searched for only where the other
   two exceed the memory limit or it is at most ``CONTIGUOUS_MARGIN`` slower than the better
   of them (a short search where it is not), so the result is never slower than it. The
   best by the same objective gets a last sweep that takes every move keeping the slowest
   stage as fast, and no further over the limit, while sending fewer bytes. The result thus meets a memory limit whenever a contiguous
   split does, except under wpipe: the program sees the limit per stage, and only refinement
   sees the sum of a device's two stages.

Stages may be non-contiguous in topological order. ``StageLoads`` prices moves incrementally;
it computes the same times and memory as ``autopipe.cost.stage_costs`` (the tests check that
they agree).
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property, partial
from typing import NamedTuple

import networkx as nx
import numpy as np

from autopipe.cost import CostModel, device_totals, stage_device, stage_memory
from autopipe.errors import UserError
from autopipe.partitioning.base import PartitionOptions, without_cycle_collection
from autopipe.partitioning.downsets import fastest_split
from autopipe.partitioning.pipedream import fitting_plan

NODES_PER_STAGE = 10
"""Coarsening stops at about this many nodes per stage: enough freedom for the first cut."""
MAX_LEVELS = 64
STALL_FRACTION = 0.05
"""A level that merges fewer than this fraction of its nodes ends coarsening."""
PATH_SEARCH_LIMIT = 32
"""Nodes an acyclicity check may visit before it gives up and declines the merge."""
REFINE_PASSES = 8
"""Sweeps per level; each sweep after the first revisits only the neighbourhood of what moved."""
CONTIGUOUS_MARGIN = 0.1
"""The optimal contiguous split is refined as a start only if its slowest stage is within this
fraction of the best other start's (refined): refinement seldom gains more on it, and the
search for a split that is not there is short."""
RELATIVE_TOLERANCE = 1e-9
"""How much a stage time must drop for a move to count as faster (float noise aside)."""
HELD_BYTES = ("state_bytes", "param_bytes", "activation_bytes")
"""Node attributes that a stage's memory sums, in the order ``stage_memory`` takes them."""

Key = tuple[float, tuple[float, ...], int]
"""The objective: bytes over the memory limit summed over the stages (inf for a move that a
limit forbids), then stage times slowest first, then the total bytes sent."""
FORBIDDEN: Key = (math.inf, (), 0)
"""The price of a move that would raise a stage's memory above the limit: never accepted."""


# The graph at one level ---------------------------------------------------------------------


@dataclass
class Values:
    """The values that may cross between clusters, as flat arrays.

    Value x moves ``nbytes[x]`` bytes when cut (the value, plus its gradient when it requires
    one) and a stage that receives it holds ``received[x]`` bytes (the value alone);
    ``producer[x]`` makes it, and the pairs k with ``pair_value[k] == x`` (sorted by value)
    name its consumers ``pair_consumer[k]``, never the producer itself. A value is sent when a
    consumer sits in another stage than its producer, and then counts once; every other stage
    with a consumer receives it once.
    """

    nbytes: np.ndarray
    received: np.ndarray
    producer: np.ndarray
    pair_value: np.ndarray
    pair_consumer: np.ndarray

    def __len__(self) -> int:
        return len(self.nbytes)

    def merged(self, parent: np.ndarray, size: int) -> Values:
        """The values that still cross clusters once each cluster is replaced by its parent."""
        home = parent[self.producer]
        consumer = parent[self.pair_consumer]
        keep = consumer != home[self.pair_value]
        value, consumer = np.divmod(np.unique(self.pair_value[keep] * size + consumer[keep]), size)
        kept, pair_value = np.unique(value, return_inverse=True)
        return Values(
            self.nbytes[kept],
            self.received[kept],
            home[kept],
            pair_value.astype(np.int64),
            consumer,
        )


class ValueLists:
    """Python-list views of ``Values`` for the move-by-move loops: per value its bytes,
    producer and consumers, and per cluster the values it produces and consumes."""

    def __init__(self, values: Values, n_clusters: int) -> None:
        clusters = np.arange(n_clusters + 1)
        self.nbytes = [int(b) for b in values.nbytes.tolist()]
        self.received = [int(b) for b in values.received.tolist()]
        self.producer = values.producer.tolist()
        self._consumers = values.pair_consumer.tolist()
        self._consumers_at = np.searchsorted(values.pair_value, np.arange(len(values) + 1)).tolist()
        by_producer = np.argsort(values.producer, kind="stable")
        self._produced = by_producer.tolist()
        self._produced_at = np.searchsorted(values.producer[by_producer], clusters).tolist()
        by_consumer = np.argsort(values.pair_consumer, kind="stable")
        self._consumed = values.pair_value[by_consumer].tolist()
        self._consumed_at = np.searchsorted(values.pair_consumer[by_consumer], clusters).tolist()

    def consumers(self, x: int) -> list[int]:
        return self._consumers[self._consumers_at[x] : self._consumers_at[x + 1]]

    def produced_by(self, cluster: int) -> list[int]:
        return self._produced[self._produced_at[cluster] : self._produced_at[cluster + 1]]

    def consumed_by(self, cluster: int) -> list[int]:
        return self._consumed[self._consumed_at[cluster] : self._consumed_at[cluster + 1]]


@dataclass
class ClusterGraph:
    """A DAG of clusters of contracted nodes (at the finest level, one node each).

    Edges are flat arrays sorted by (source, target); ``edge_bytes`` is what cutting the edges
    between two clusters would move. Clusters are numbered so that taking the lowest-numbered
    ready cluster first gives a program-like topological order.
    """

    weight: np.ndarray
    """Compute (forward + backward ms) of each cluster."""
    held: np.ndarray
    """(3, clusters) state, parameter and activation bytes of each cluster, the byte counts
    ``autopipe.cost.stage_memory`` sums over a stage."""
    source: np.ndarray
    target: np.ndarray
    edge_bytes: np.ndarray
    values: Values
    parent: np.ndarray | None = field(default=None)
    """The cluster of the next, coarser level each cluster merged into."""

    def __len__(self) -> int:
        return len(self.weight)

    @cached_property
    def weights(self) -> list[float]:
        return self.weight.tolist()

    @cached_property
    def held_lists(self) -> list[list[int]]:
        """Per cluster, its ``held`` bytes."""
        return self.held.T.tolist()

    @cached_property
    def value_lists(self) -> ValueLists:
        return ValueLists(self.values, len(self))

    @cached_property
    def succ_lists(self) -> list[list[int]]:
        """Successors of every cluster, in increasing order."""
        return _split(self.target, self.source, len(self))

    @cached_property
    def pred_lists(self) -> list[list[int]]:
        """Predecessors of every cluster, in increasing order."""
        order = np.argsort(self.target, kind="stable")
        return _split(self.source[order], self.target[order], len(self))

    @cached_property
    def succ(self) -> list[dict[int, int]]:
        """succ[u][v]: bytes on the edges u -> v."""
        out: list[dict[int, int]] = [{} for _ in range(len(self))]
        for u, v, nbytes in zip(
            self.source.tolist(), self.target.tolist(), self.edge_bytes.tolist()
        ):
            out[u][v] = nbytes
        return out

    @cached_property
    def pred(self) -> list[dict[int, int]]:
        """pred[v][u]: bytes on the edges u -> v."""
        into: list[dict[int, int]] = [{} for _ in range(len(self))]
        for u, v, nbytes in zip(
            self.source.tolist(), self.target.tolist(), self.edge_bytes.tolist()
        ):
            into[v][u] = nbytes
        return into

    def merged(self, parent: np.ndarray) -> ClusterGraph:
        """The coarser graph in which each cluster is replaced by its parent."""
        size = int(parent.max()) + 1
        a, b = parent[self.source], parent[self.target]
        keep = a != b
        pairs, where = np.unique(a[keep] * size + b[keep], return_inverse=True)
        nbytes = np.bincount(where, weights=self.edge_bytes[keep], minlength=len(pairs))
        source, target = np.divmod(pairs, size)
        held = np.zeros((len(self.held), size), dtype=np.int64)
        for row, counts in zip(held, self.held):
            np.add.at(row, parent, counts)
        return ClusterGraph(
            np.bincount(parent, weights=self.weight, minlength=size),
            held,
            source,
            target,
            np.rint(nbytes).astype(np.int64),
            self.values.merged(parent, size),
        )


def _split(items: np.ndarray, owners: np.ndarray, size: int) -> list[list[int]]:
    """``items`` grouped by their (sorted) ``owners`` into one list per owner 0..size-1."""
    bounds = np.searchsorted(owners, np.arange(size + 1)).tolist()
    flat = items.tolist()
    return [flat[bounds[k] : bounds[k + 1]] for k in range(size)]


def index_graph(coarse: nx.DiGraph) -> tuple[list[int], ClusterGraph]:
    """The contracted graph's nodes in ``rank`` order, and the graph on their indices; read
    from the attributes ``autopipe.graph.contract`` sets, as ``autopipe.cost`` reads them."""
    nodes = sorted(coarse.nodes, key=lambda n: coarse.nodes[n]["rank"])
    index = {n: i for i, n in enumerate(nodes)}
    data = [coarse.nodes[n] for n in nodes]
    weight = np.array(
        [d.get("forward_ms", 0.0) + d.get("backward_ms", 0.0) for d in data], dtype=np.float64
    )
    held = np.array(
        [[int(d.get(name, 0)) for d in data] for name in HELD_BYTES], dtype=np.int64
    ).reshape(len(HELD_BYTES), len(nodes))
    edges, values = [], {}
    for u, n in enumerate(nodes):
        produced = data[u].get("sends", {})
        for m, edge in coarse.succ[n].items():
            v = index[m]
            crossing = 0
            for name in edge.get("values", ()):
                nbytes, requires_grad = produced.get(name, (0, False))
                cut = _cut_bytes(nbytes, requires_grad)
                values.setdefault((u, name), (cut, int(nbytes), []))[2].append(v)
                crossing += cut
            edges.append((u, v, crossing))
    edges.sort()
    source, target, edge_bytes = (
        np.array(column, dtype=np.int64).reshape(-1)
        for column in (zip(*edges) if edges else ((), (), ()))
    )
    return nodes, ClusterGraph(weight, held, source, target, edge_bytes, _values_table(values))


def _values_table(values: dict[tuple[int, str], tuple[int, int, list[int]]]) -> Values:
    """Flat arrays from {(producer, name): (cut bytes, received bytes, consumers)}, in
    insertion order."""
    nbytes = np.array([b for b, _, _ in values.values()], dtype=np.int64)
    received = np.array([r for _, r, _ in values.values()], dtype=np.int64)
    producer = np.array([u for u, _ in values], dtype=np.int64)
    pair_value = np.repeat(
        np.arange(len(values), dtype=np.int64), [len(c) for _, _, c in values.values()]
    )
    pair_consumer = np.array([v for _, _, c in values.values() for v in sorted(c)], dtype=np.int64)
    return Values(nbytes, received, producer, pair_value, pair_consumer)


def _cut_bytes(nbytes: int, requires_grad: bool) -> int:
    """Bytes a cut moves for one value: forward, and its gradient back when it has one."""
    return 2 * nbytes if requires_grad else nbytes


def check_request(coarse: nx.DiGraph, n_stages: int) -> None:
    """Reject stage counts no partition can meet with every stage non-empty."""
    if n_stages < 1:
        raise UserError(f"the number of stages must be at least 1, got {n_stages}")
    if n_stages > coarse.number_of_nodes():
        raise UserError(
            f"the graph has {coarse.number_of_nodes()} nodes; {n_stages} non-empty stages "
            "is more than that: lower -p"
        )


# The objective ------------------------------------------------------------------------------


def stage_totals(
    graph: ClusterGraph, stages: list[int], n_stages: int
) -> tuple[list[float], list[int], np.ndarray]:
    """Compute and bytes sent per stage, and per value how many consumers sit in another stage
    than its producer, for a stage per cluster (vectorized, the whole graph at once)."""
    stage = np.asarray(stages, dtype=np.int64)
    values = graph.values
    home = stage[values.producer]
    differs = stage[values.pair_consumer] != home[values.pair_value]
    away = np.bincount(values.pair_value, weights=differs, minlength=len(values)).astype(np.int64)
    sends = np.bincount(home, weights=np.where(away > 0, values.nbytes, 0), minlength=n_stages)
    compute = np.bincount(stage, weights=graph.weight, minlength=n_stages)
    return compute.tolist(), [int(s) for s in np.rint(sends).tolist()], away


def stage_times(
    graph: ClusterGraph, stages: list[int], n_stages: int, model: CostModel
) -> list[float]:
    """Every stage's ``StageCost.time_ms``: compute plus sending values and their gradients."""
    compute, sends, _ = stage_totals(graph, stages, n_stages)
    return _times(compute, sends, model)


def _times(compute: list[float], sends: list[int], model: CostModel) -> list[float]:
    return [c + model.transfer_ms(s) for c, s in zip(compute, sends)]


def stage_memories(
    graph: ClusterGraph, stages: list[int], n_stages: int, model: CostModel
) -> list[int]:
    """Every stage's ``StageCost.memory_bytes``: what its clusters hold and the values it
    receives from other stages (each once), priced by ``autopipe.cost.stage_memory``."""
    parts = _memory_parts(graph, stages, n_stages)
    return [stage_memory(*parts[s], s, n_stages, model) for s in range(n_stages)]


def _memory_parts(graph: ClusterGraph, stages: list[int], n_stages: int) -> list[list[int]]:
    """Per stage, the byte counts ``stage_memory`` takes: the ``HELD_BYTES`` of its clusters,
    then the bytes of the values it receives."""
    stage = np.asarray(stages, dtype=np.int64)
    held = [np.bincount(stage, weights=row, minlength=n_stages) for row in graph.held]
    values = graph.values
    at = stage[values.pair_consumer]
    away = at != stage[values.producer][values.pair_value]
    value, receiver = np.divmod(np.unique(values.pair_value[away] * n_stages + at[away]), n_stages)
    inputs = np.bincount(receiver, weights=values.received[value], minlength=n_stages)
    return np.rint(np.vstack([*held, inputs])).astype(np.int64).T.tolist()


def over_limit(memory: list[int], model: CostModel) -> int:
    """Bytes by which the devices exceed the memory limit, summed, from every stage's memory;
    0 without a limit."""
    if model.memory_limit is None:
        return 0
    limit = math.floor(model.memory_limit)
    return sum(m - limit for m in device_totals(memory, model) if m > limit)


def objective(graph: ClusterGraph, stages: list[int], n_stages: int, model: CostModel) -> Key:
    """Bytes over the memory limit, then stage times slowest first, then the total bytes sent:
    smaller is better."""
    compute, sends, _ = stage_totals(graph, stages, n_stages)
    excess = (
        over_limit(stage_memories(graph, stages, n_stages, model), model)
        if model.memory_limit is not None
        else 0
    )
    return excess, tuple(sorted(_times(compute, sends, model), reverse=True)), sum(sends)


class StageMemory(NamedTuple):
    """A stage's memory and what it is made of."""

    held: list[int]
    """State, parameter and activation bytes of its clusters (``HELD_BYTES``)."""
    inputs: int
    """Bytes of the values it receives from other stages, each once."""
    total: int
    """``autopipe.cost.stage_memory`` of the above."""


class StageLoads:
    """Per-stage compute and bytes sent, kept current while clusters move between stages.

    Moving cluster c from stage a to stage b can only change what stages a and b send: the
    values c produces, and the values c consumes whose producer sits in a or b. A move is
    priced by re-checking exactly those, with per value the count of its consumers that sit
    in another stage than its producer.

    Under a memory limit, the memory of stages a and b changes too: what c holds, and the
    values a and b receive, known from per value the count of its consumers in each stage. A
    move that would raise a device's memory above the limit prices at infinite excess, so no
    objective accepts it. Every device's memory and the excess are kept, so a move is priced
    from the two devices it touches, and a move that touches no device over the limit cannot
    lower the excess: ``best_case`` prices it without memory.
    """

    def __init__(
        self, graph: ClusterGraph, stages: list[int], n_stages: int, model: CostModel
    ) -> None:
        self.graph, self.stage, self.model, self.n_stages = graph, stages, model, n_stages
        self.compute, self.sends, away = stage_totals(graph, stages, n_stages)
        self.away = away.tolist()
        self.times = [self._time(c, s) for c, s in zip(self.compute, self.sends)]
        self.clusters_in = np.bincount(
            np.asarray(stages, dtype=np.int64), minlength=n_stages
        ).tolist()
        if model.memory_limit is not None:
            self._count_memory()

    def _count_memory(self) -> None:
        """Start keeping every stage's ``StageMemory`` and, per value, how many of its
        consumers sit in each stage."""
        graph, n_stages = self.graph, self.n_stages
        parts = _memory_parts(graph, self.stage, n_stages)
        self.memory = [self._memory(s, parts[s][:-1], parts[s][-1]) for s in range(n_stages)]
        self.device_of = [stage_device(s, n_stages, self.model) for s in range(n_stages)]
        self._tally_memory()
        at = np.asarray(self.stage, dtype=np.int64)[graph.values.pair_consumer]
        pairs, counts = np.unique(graph.values.pair_value * n_stages + at, return_counts=True)
        # How many consumers of value x sit in stage s, at x * n_stages + s (absent: none).
        self.consumers_in = dict(zip(pairs.tolist(), counts.tolist()))

    def _tally_memory(self) -> None:
        """Every device's memory, and the bytes by which the devices exceed the limit."""
        totals = [m.total for m in self.memory]
        self.device_memory = device_totals(totals, self.model)
        self.excess = over_limit(totals, self.model)

    def _time(self, compute: float, sends: int) -> float:
        """A stage's time, as ``StageCost.time_ms``: compute plus sending values and gradients."""
        return compute + self.model.transfer_ms(sends)

    def _memory(self, stage: int, held: list[int], inputs: int) -> StageMemory:
        """A stage's memory, as ``StageCost.memory_bytes``, with what it is made of."""
        return StageMemory(
            held, inputs, stage_memory(*held, inputs, stage, self.n_stages, self.model)
        )

    def key(self) -> Key:
        """The objective now."""
        excess = self.excess if self.model.memory_limit is not None else 0
        return excess, tuple(sorted(self.times, reverse=True)), sum(self.sends)

    def _changes(self, cluster: int, target: int) -> tuple[int, int, list[tuple[int, int]]]:
        """If ``cluster`` moved to ``target``: the change in bytes sent by its stage and by the
        target stage, and the new away-count of every value whose count changes."""
        values, stage, away = self.graph.value_lists, self.stage, self.away
        source = stage[cluster]
        delta_source = delta_target = 0
        updates = []
        for x in values.produced_by(cluster):
            count = sum(1 for v in values.consumers(x) if stage[v] != target)
            delta_source -= values.nbytes[x] if away[x] else 0
            delta_target += values.nbytes[x] if count else 0
            updates.append((x, count))
        for x in values.consumed_by(cluster):
            home = stage[values.producer[x]]
            if home != source and home != target:
                continue
            count = away[x] - (source != home) + (target != home)
            updates.append((x, count))
            if (count > 0) != (away[x] > 0):
                change = values.nbytes[x] if count else -values.nbytes[x]
                if home == source:
                    delta_source += change
                else:
                    delta_target += change
        return delta_source, delta_target, updates

    def _input_changes(self, cluster: int, target: int) -> tuple[int, int]:
        """If ``cluster`` moved to ``target``: the change in bytes received by its stage and
        by the target stage. A stage receives a value when it holds a consumer but not the
        producer."""
        values, stage, consumers_in = self.graph.value_lists, self.stage, self.consumers_in
        source, n_stages = stage[cluster], self.n_stages
        delta_source = delta_target = 0
        for x in values.consumed_by(cluster):
            home, first = stage[values.producer[x]], x * n_stages
            if home != source and consumers_in[first + source] == 1:
                delta_source -= values.received[x]
            if home != target and first + target not in consumers_in:
                delta_target += values.received[x]
        for x in values.produced_by(cluster):
            first = x * n_stages
            if first + source in consumers_in:
                delta_source += values.received[x]
            if first + target in consumers_in:
                delta_target -= values.received[x]
        return delta_source, delta_target

    def _memory_after(self, cluster: int, target: int) -> tuple[StageMemory, StageMemory]:
        """If ``cluster`` moved to ``target``: the memory of its stage and of the target stage."""
        source = self.stage[cluster]
        delta_source, delta_target = self._input_changes(cluster, target)
        own = self.graph.held_lists[cluster]
        before_source, before_target = self.memory[source], self.memory[target]
        return (
            self._memory(
                source,
                [a - b for a, b in zip(before_source.held, own)],
                before_source.inputs + delta_source,
            ),
            self._memory(
                target,
                [a + b for a, b in zip(before_target.held, own)],
                before_target.inputs + delta_target,
            ),
        )

    def _excess_after(self, cluster: int, target: int) -> float:
        """Bytes over the limit after moving ``cluster`` to ``target``; inf if the move raises
        a device's memory above the limit. Only the devices of the two stages change."""
        source, limit = self.stage[cluster], self.model.memory_limit
        assert limit is not None
        changes: dict[int, int] = {}
        for s, after in zip((source, target), self._memory_after(cluster, target)):
            device = self.device_of[s]
            changes[device] = changes.get(device, 0) + after.total - self.memory[s].total
        excess, floor = self.excess, math.floor(limit)
        for device, change in changes.items():
            was = self.device_memory[device]
            now = was + change
            if now > limit and now > was:
                return math.inf
            excess += max(now - floor, 0) - max(was - floor, 0)
        return excess

    def price(self, cluster: int, target: int, best_case: Key | None = None) -> Key:
        """The objective ``key()`` would return after moving ``cluster`` to stage ``target``;
        the times and bytes sent are taken from the move's ``best_case`` where given."""
        excess = self._excess_after(cluster, target) if self.model.memory_limit is not None else 0
        if excess == math.inf:
            return FORBIDDEN
        if best_case is not None:
            return excess, best_case[1], best_case[2]
        return self.time_price(cluster, target, excess)

    def best_case(self, cluster: int, target: int) -> Key | None:
        """Under a memory limit, where neither stage's device is over it: the move's price
        with memory left aside, at the present excess. Such a move keeps the excess or raises
        it (perhaps to inf), so ``refine`` accepts its ``price`` only if it accepts this.
        None elsewhere."""
        if self.model.memory_limit is None:
            return None
        floor = math.floor(self.model.memory_limit)
        if any(
            self.device_memory[self.device_of[s]] > floor for s in (self.stage[cluster], target)
        ):
            return None
        return self.time_price(cluster, target, self.excess)

    def time_price(self, cluster: int, target: int, excess: float) -> Key:
        """The objective after moving ``cluster`` to stage ``target``, with ``excess`` bytes
        over the memory limit: the move's times and bytes sent, memory left aside."""
        source = self.stage[cluster]
        delta_source, delta_target, _ = self._changes(cluster, target)
        weight = self.graph.weights[cluster]
        times = list(self.times)
        times[source] = self._time(self.compute[source] - weight, self.sends[source] + delta_source)
        times[target] = self._time(self.compute[target] + weight, self.sends[target] + delta_target)
        return (
            excess,
            tuple(sorted(times, reverse=True)),
            sum(self.sends) + delta_source + delta_target,
        )

    def move(self, cluster: int, target: int) -> None:
        """Move ``cluster`` to stage ``target`` and update every total."""
        source = self.stage[cluster]
        if self.model.memory_limit is not None:
            self._move_memory(cluster, target)
        delta_source, delta_target, updates = self._changes(cluster, target)
        weight = self.graph.weights[cluster]
        self.stage[cluster] = target
        for x, count in updates:
            self.away[x] = count
        self.compute[source] -= weight
        self.compute[target] += weight
        self.sends[source] += delta_source
        self.sends[target] += delta_target
        self.clusters_in[source] -= 1
        self.clusters_in[target] += 1
        for s in (source, target):
            self.times[s] = self._time(self.compute[s], self.sends[s])

    def _move_memory(self, cluster: int, target: int) -> None:
        """Update the memory totals for moving ``cluster`` to ``target`` (before it moves)."""
        source = self.stage[cluster]
        self.memory[source], self.memory[target] = self._memory_after(cluster, target)
        self._tally_memory()
        consumers_in = self.consumers_in
        for x in self.graph.value_lists.consumed_by(cluster):
            leaving, joining = x * self.n_stages + source, x * self.n_stages + target
            consumers_in[leaving] -= 1
            if consumers_in[leaving] == 0:
                del consumers_in[leaving]
            consumers_in[joining] = consumers_in.get(joining, 0) + 1


# Coarsening ---------------------------------------------------------------------------------


def _depths(graph: ClusterGraph) -> list[int]:
    """Longest-path depth of every cluster from the sources: it grows along every edge."""
    indegree = [len(p) for p in graph.pred]
    depth = [0] * len(graph)
    ready = deque(u for u in range(len(graph)) if indegree[u] == 0)
    succ = graph.succ
    while ready:
        u = ready.popleft()
        for v in succ[u]:
            if depth[v] <= depth[u]:
                depth[v] = depth[u] + 1
            indegree[v] -= 1
            if indegree[v] == 0:
                ready.append(v)
    return depth


class _Matcher:
    """Pairs clusters of one level for merging, keeping the merged graph acyclic.

    Merging the ends of edge u -> v creates a cycle exactly when another path leads from u to v.
    Pairs are taken one at a time, and each is checked against the graph with the earlier
    pairs already merged. Safe for certain: v is u's only successor, or u is v's only
    predecessor (every path from u goes through v, or every path into v comes from u). When v
    is exactly one level deeper than u (``depth[v] == depth[u] + 1``): depth rises by at least
    one along every edge, and a merged pair can lower it by at most one (entered at its deeper
    member, left from its shallower one), so another path from u to v can only run through
    earlier pairs whose members sit at u's and v's depths, each entered at its deeper member
    and left from its shallower one. ``_bypass`` searches exactly those paths. Other edges
    are left alone.
    """

    def __init__(self, graph: ClusterGraph, cap: float) -> None:
        self.graph, self.cap = graph, cap
        self.depth = _depths(graph)
        self.mate = [-1] * len(graph)

    def safe(self, u: int, v: int) -> bool:
        """Whether edge u -> v may merge now."""
        graph = self.graph
        if self.mate[u] >= 0 or self.mate[v] >= 0 or graph.weights[u] + graph.weights[v] > self.cap:
            return False
        if len(graph.succ[u]) == 1 or len(graph.pred[v]) == 1:
            return True
        return self.depth[v] == self.depth[u] + 1 and not self._bypass(u, v)

    def _bypass(self, u: int, v: int) -> bool:
        """Whether a path u -> (pair) -> ... -> v exists through merged pairs, or the search
        grew past ``PATH_SEARCH_LIMIT`` (then the merge is declined, to be safe)."""
        shallow = self.depth[u]
        stack, seen = [u], {u}
        while stack:
            x = stack.pop()
            for y in self.graph.succ[x]:
                if y == v:
                    if x != u:
                        return True
                    continue
                partner = self.mate[y]
                if partner < 0 or self.depth[y] != shallow + 1 or self.depth[partner] != shallow:
                    continue
                if partner not in seen:
                    if len(seen) >= PATH_SEARCH_LIMIT:
                        return True
                    seen.add(partner)
                    stack.append(partner)
        return False

    def partner(self, x: int) -> int:
        """The neighbour to merge ``x`` with: heaviest edge first, then the lightest one."""
        graph, best, best_key = self.graph, -1, None
        for y, nbytes in graph.succ[x].items():
            key = (nbytes, -graph.weights[y], -y)
            if (best_key is None or key > best_key) and self.safe(x, y):
                best, best_key = y, key
        for y, nbytes in graph.pred[x].items():
            key = (nbytes, -graph.weights[y], -y)
            if (best_key is None or key > best_key) and self.safe(y, x):
                best, best_key = y, key
        return best


def _match(graph: ClusterGraph, cap: float, target: int, rng: random.Random) -> np.ndarray:
    """The cluster of the next level for each cluster, pairing light clusters first."""
    matcher = _Matcher(graph, cap)
    tiebreak = list(range(len(graph)))
    rng.shuffle(tiebreak)
    remaining = len(graph)
    for x in sorted(range(len(graph)), key=lambda u: (graph.weights[u], tiebreak[u])):
        if remaining <= target:
            break
        if matcher.mate[x] >= 0:
            continue
        y = matcher.partner(x)
        if y >= 0:
            matcher.mate[x], matcher.mate[y] = y, x
            remaining -= 1
    parent, next_id = [-1] * len(graph), 0
    for u in range(len(graph)):
        if parent[u] < 0:
            parent[u] = next_id
            if matcher.mate[u] >= 0:
                parent[matcher.mate[u]] = next_id
            next_id += 1
    return np.array(parent, dtype=np.int64)


def coarsen(finest: ClusterGraph, n_stages: int, seed: int) -> list[ClusterGraph]:
    """Levels from the finest to the coarsest; each level is a DAG whose clusters are unions
    of clusters of the level before (recorded in that level's ``parent``)."""
    levels = [finest]
    target = NODES_PER_STAGE * n_stages
    total = float(finest.weight.sum())
    cap = 2.0 * total / target if total > 0 else float("inf")
    rng = random.Random(seed)
    while len(levels[-1]) > target and len(levels) < MAX_LEVELS:
        graph = levels[-1]
        parent = _match(graph, cap, target, rng)
        merged = len(graph) - (int(parent.max()) + 1)
        if merged < max(1, STALL_FRACTION * len(graph)):
            break
        graph.parent = parent
        levels.append(graph.merged(parent))
    return levels


# Initial partition --------------------------------------------------------------------------


def topological_order(graph: ClusterGraph) -> list[int]:
    """A topological order that takes the lowest-numbered ready cluster first, so that it
    follows the program order the cluster numbers come from."""
    indegree = [len(p) for p in graph.pred]
    ready = [u for u in range(len(graph)) if indegree[u] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        u = heapq.heappop(ready)
        order.append(u)
        for v in graph.succ[u]:
            indegree[v] -= 1
            if indegree[v] == 0:
                heapq.heappush(ready, v)
    return order


def contiguous_cut(weights: list[float], n_runs: int) -> list[int]:
    """Run index of each item: ``n_runs`` non-empty contiguous runs whose largest total is as
    small as possible (to float precision).

    Bisection on the bound, each bound tested by the greedy fill; the greedy runs at the best
    bound are then split until there are exactly ``n_runs`` of them.
    """
    prefix = np.concatenate([[0.0], np.cumsum(weights)])
    low = max(max(weights, default=0.0), float(prefix[-1]) / n_runs)
    high = float(prefix[-1])
    for _ in range(100):
        if high - low <= RELATIVE_TOLERANCE * high:
            break
        middle = (low + high) / 2
        if len(_greedy_runs(prefix, middle, n_runs)) <= n_runs:
            high = middle
        else:
            low = middle
    runs = _greedy_runs(prefix, high, len(weights))
    while len(runs) < n_runs:
        widest = max(
            (r for r in runs if r[1] - r[0] > 1),
            key=lambda r: (prefix[r[1]] - prefix[r[0]], r[1] - r[0]),
        )
        i = runs.index(widest)
        cut = widest[0] + balanced_split(weights[widest[0] : widest[1]])
        runs[i : i + 1] = [(widest[0], cut), (cut, widest[1])]
    assignment = [0] * len(weights)
    for run, (start, end) in enumerate(runs):
        assignment[start:end] = [run] * (end - start)
    return assignment


def _greedy_runs(prefix: np.ndarray, bound: float, limit: int) -> list[tuple[int, int]]:
    """Half-open runs, each as long as it can be without its total exceeding ``bound`` (one
    item at least), from the prefix sums of the weights; stops after ``limit + 1`` runs."""
    size = len(prefix) - 1
    runs, start = [], 0
    while start < size and len(runs) <= limit:
        end = int(np.searchsorted(prefix, prefix[start] + bound, side="right")) - 1
        end = min(max(end, start + 1), size)
        runs.append((start, end))
        start = end
    return runs


def balanced_split(weights: list[float]) -> int:
    """Where to cut a list of at least two items into two non-empty halves of nearly equal
    weight; equal weights (e.g. none profiled) split by count."""
    total, prefix, best, best_key = sum(weights), 0.0, 1, None
    for cut in range(1, len(weights)):
        prefix += weights[cut - 1]
        key = (max(prefix, total - prefix), abs(2 * cut - len(weights)))
        if best_key is None or key < best_key:
            best, best_key = cut, key
    return best


def initial_stages(graph: ClusterGraph, n_stages: int) -> list[int]:
    """Stages of the coarsest graph: its topological order cut into equal-compute runs."""
    order = topological_order(graph)
    weights = [graph.weights[u] for u in order]
    if sum(weights) <= 0:
        weights = [1.0] * len(order)
    stages = [0] * len(graph)
    for position, run in enumerate(contiguous_cut(weights, n_stages)):
        stages[order[position]] = run
    return stages


# Refinement ---------------------------------------------------------------------------------


def faster(candidate: Key, current: Key) -> bool:
    """Fewer bytes over the memory limit; or as few, and a faster slowest stage; or as fast,
    and a faster next slowest, and so on; or all as fast, and fewer bytes sent."""
    if candidate[0] != current[0]:
        return candidate[0] < current[0]
    for new, old in zip(candidate[1], current[1]):
        if new < old - RELATIVE_TOLERANCE * abs(old):
            return True
        if new > old:
            return False
    return candidate[2] < current[2]


def leaner(candidate: Key, current: Key) -> bool:
    """No more bytes over the memory limit, a slowest stage no slower (float noise aside) and
    fewer bytes sent."""
    return (
        candidate[0] <= current[0]
        and candidate[1][0] <= current[1][0] * (1 + RELATIVE_TOLERANCE)
        and candidate[2] < current[2]
    )


def _targets(graph: ClusterGraph, stages: list[int], cluster: int, n_stages: int) -> list[int]:
    """Stages ``cluster`` may move to with every edge still going forward: those of its
    neighbours, or one step either way, between its predecessors' and its successors' stages."""
    before = [stages[u] for u in graph.pred_lists[cluster]]
    after = [stages[v] for v in graph.succ_lists[cluster]]
    low = max(before, default=0)
    high = min(after, default=n_stages - 1)
    if low == high:
        return []
    here = stages[cluster]
    near = {here - 1, here + 1, *before, *after}
    return sorted(s for s in near if low <= s <= high and s != here)


def _movable(graph: ClusterGraph, stages: list[int]) -> list[int]:
    """Clusters that may have somewhere to go: ends of edges between stages, and clusters
    without predecessors or without successors."""
    stage = np.asarray(stages, dtype=np.int64)
    has_pred = np.zeros(len(graph), dtype=bool)
    has_pred[graph.target] = True
    has_succ = np.zeros(len(graph), dtype=bool)
    has_succ[graph.source] = True
    movable = ~(has_pred & has_succ)
    cut = stage[graph.source] != stage[graph.target]
    movable[graph.source[cut]] = True
    movable[graph.target[cut]] = True
    return np.flatnonzero(movable).tolist()


def refine(
    graph: ClusterGraph,
    loads: StageLoads,
    n_stages: int,
    accept: Callable[[Key, Key], bool] = faster,
    passes: int = REFINE_PASSES,
) -> None:
    """Greedy boundary refinement of one level: each cluster that may move, in order, goes to
    the target stage ``accept`` likes best over staying, if any; later sweeps revisit what
    moved and its neighbours. Every stage keeps at least one cluster.

    ``accept`` must never like a key better for a larger excess (``faster`` and ``leaner``
    don't), so that a move is priced with its memory only where its ``best_case`` is liked.
    """
    stages = loads.stage
    active = _movable(graph, stages)
    for _ in range(passes):
        moved = []
        for cluster in active:
            if loads.clusters_in[stages[cluster]] == 1:
                continue
            targets = _targets(graph, stages, cluster, n_stages)
            if not targets:
                continue
            current, best = loads.key(), -1
            for target in targets:
                best_case = loads.best_case(cluster, target)
                if best_case is not None and not accept(best_case, current):
                    continue
                candidate = loads.price(cluster, target, best_case)
                if accept(candidate, current):
                    current, best = candidate, target
            if best >= 0:
                loads.move(cluster, best)
                moved.append(cluster)
        if not moved:
            return
        touched = set(moved)
        for cluster in moved:
            touched.update(graph.pred_lists[cluster])
            touched.update(graph.succ_lists[cluster])
        active = sorted(touched)


# The method ---------------------------------------------------------------------------------


@without_cycle_collection
def partition_acyclic(
    coarse: nx.DiGraph, n_stages: int, options: PartitionOptions
) -> dict[int, int]:
    """Stage of every contracted node: multilevel coarsening, a contiguous first cut of the
    coarsest graph, then refinement level by level, all moves keeping the stage graph a DAG."""
    check_request(coarse, n_stages)
    nodes, graph = index_graph(coarse)
    if n_stages == 1:
        return {n: 0 for n in nodes}
    contiguous = partial(_best_contiguous, coarse, nodes, n_stages, options)
    stages = acyclic_stages(graph, n_stages, options, contiguous)
    return {n: stages[u] for u, n in enumerate(nodes)}


def _best_contiguous(
    coarse: nx.DiGraph,
    nodes: list[int],
    n_stages: int,
    options: PartitionOptions,
    within: float = math.inf,
) -> list[int] | None:
    """The optimal contiguous split of the cost model (the PipeDream program), as a start that
    refinement can only improve; None where no contiguous split fits in memory or none has
    its slowest stage within ``within`` ms."""
    plain = replace(options, replication=False, replicas=None, levels=(), devices=())
    try:
        plan = fitting_plan(coarse, n_stages, plain, within)
    except UserError:
        return None
    return None if plan is None else [plan.stage_of[n] for n in nodes]


def acyclic_stages(
    finest: ClusterGraph,
    n_stages: int,
    options: PartitionOptions,
    contiguous: Callable[[float], list[int] | None] = lambda within: None,
) -> list[int]:
    """The stage of every cluster of ``finest`` (see ``partition_acyclic``).

    Greedy refinement stops in local optima, so several starts are refined and the best one
    kept: the multilevel one, whose coarse moves shift whole regions, the finest graph's own
    contiguous cut, balanced to within one node, the fastest acyclic split of all on a graph
    with few down-sets (``downsets.fastest_split``), and the optimal contiguous split that
    ``contiguous`` returns, if any, whose slowest stage is at most the ms it is given. Each
    wins on some graphs. The result is never slower than that optimal split: where the other
    starts fit in memory, the split is asked for only if it is at most ``CONTIGUOUS_MARGIN``
    slower than the best of them. Without a memory limit, where the graph has few down-sets,
    no acyclic split has a faster slowest stage.
    """
    model = options.cost
    levels = coarsen(finest, n_stages, options.seed)
    candidates = [_uncoarsen(levels, n_stages, model)]
    if len(levels) > 1:
        flat = initial_stages(finest, n_stages)
        refine(finest, StageLoads(finest, flat, n_stages, model), n_stages)
        candidates.append(flat)
    exact = fastest_split(finest, n_stages, model)
    if exact is not None:
        refine(finest, StageLoads(finest, exact, n_stages, model), n_stages)
        candidates.append(exact)
    keys = [objective(finest, stages, n_stages, model) for stages in candidates]
    excess, times, _ = min(keys)
    start = contiguous(times[0] * (1 + CONTIGUOUS_MARGIN) if excess == 0 else math.inf)
    if start is not None:
        refine(finest, StageLoads(finest, start, n_stages, model), n_stages)
        candidates.append(start)
        keys.append(objective(finest, start, n_stages, model))
    best = candidates[keys.index(min(keys))]
    refine(finest, StageLoads(finest, best, n_stages, model), n_stages, accept=leaner)
    return best


def _uncoarsen(levels: list[ClusterGraph], n_stages: int, model: CostModel) -> list[int]:
    """Cut the coarsest level, then project the stages onto each finer level and refine."""
    stages = initial_stages(levels[-1], n_stages)
    for graph in reversed(levels):
        if graph.parent is not None:
            stages = [stages[p] for p in graph.parent.tolist()]
        refine(graph, StageLoads(graph, stages, n_stages, model), n_stages)
    return stages
