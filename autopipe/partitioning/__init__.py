"""Partitioning: which stage each node of the graph runs in.

A method takes the contracted graph (one node per group of nodes that must share a stage, see
``autopipe.graph.placement_groups``) and a number of stages, and returns a stage per node. The
result is expanded back to every fx node and validated before any code is generated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import networkx as nx
import torch.fx as fx

from autopipe.cost import (
    StageCost,
    StageLinks,
    check_memory,
    pipeline_links,
    stage_costs,
    stage_device,
)
from autopipe.errors import UserError
from autopipe.graph import contract, placement_groups
from autopipe.partitioning.base import (
    DeviceGroup,
    Level,
    Method,
    PartitionOptions,
    Plan,
    check_replicas,
)
from autopipe.partitioning.acyclic import partition_acyclic
from autopipe.partitioning.metis import partition_metis
from autopipe.partitioning.params import partition_by_params
from autopipe.partitioning.pipedream import partition_pipedream

DEFAULT_METHOD = "acyclic"

METHODS: dict[str, Method] = {
    "params": partition_by_params,
    "metis": partition_metis,
    "acyclic": partition_acyclic,
    "pipedream": partition_pipedream,
}

__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "DeviceGroup",
    "InvalidPartition",
    "Level",
    "Partition",
    "PartitionOptions",
    "Plan",
    "expand",
    "partition",
    "validate",
]


@dataclass
class Partition:
    """The result of partitioning: stages of fine and contracted nodes, replicas, the links
    each stage's transfers cross, and costs (transfers priced at those links)."""

    assignment: dict[str, int]
    coarse: nx.DiGraph
    stage_of: dict[int, int]
    n_stages: int
    replicas: tuple[int, ...]
    links: list[StageLinks]
    costs: list[StageCost]
    devices: tuple[int, ...] | None = None
    """The device of every stage where a device runs several (wpipe: stage s of 2P on device
    s mod P); None where every stage has its own devices, laid out in stage order."""


class InvalidPartition(Exception):
    """A method returned an assignment that cannot run as a pipeline."""


def partition(
    graph: nx.DiGraph,
    module: fx.GraphModule,
    n_stages: int,
    method: str,
    options: PartitionOptions = PartitionOptions(),
) -> Partition:
    """Assign every node of ``graph`` to a stage with ``method``; validate and cost the result.

    With ``options.replicas`` (fixed replicas per stage) the methods that can (pipedream)
    choose the cut for those replicas; the others cut ``n_stages`` stages and get them attached.

    With ``options.cost.schedule == "wpipe"``, ``n_stages`` is 2P for P devices: stage s runs
    on device s mod P, and the memory limit applies to the sum of a device's two stages.

    Raises UserError when the request cannot be met (more stages than the graph has units,
    a stage or device over the memory limit, replicas that do not fit the stages or the
    machine, an odd number of stages for wpipe).
    """
    if method not in METHODS:
        raise UserError(f"unknown partitioning method {method!r}; choose from {', '.join(METHODS)}")
    if n_stages < 1:
        raise UserError(f"the number of stages must be at least 1, got {n_stages}")
    per_device = options.cost.stages_per_device
    if n_stages % per_device:
        raise UserError(
            f"--schedule wpipe runs {per_device} stages on every device, so it needs an even "
            f"number of stages, got {n_stages}"
        )
    groups = placement_groups(graph, module)
    if n_stages > len(groups):
        layout = (
            f" ({per_device} on each of {n_stages // per_device} devices with "
            f"--schedule {options.cost.schedule})"
            if per_device > 1
            else ""
        )
        raise UserError(
            f"the model has {len(groups)} units that can go to different stages; "
            f"{n_stages} stages{layout} is more than that: lower -p"
        )
    _check_replicas(n_stages, options)
    coarse = contract(graph, groups)
    answer = METHODS[method](coarse, n_stages, options)
    plan = answer if isinstance(answer, Plan) else Plan(answer)
    stages = 1 + max(plan.stage_of.values())
    replicas = plan.replicas or options.replicas or (1,) * stages
    assignment = expand(graph, coarse, plan.stage_of)
    validate(graph, assignment, stages)
    links = pipeline_links(replicas, options.levels, options.cost.bandwidth)
    costs = stage_costs(coarse, plan.stage_of, stages, options.cost, [link.send for link in links])
    check_memory(costs, options.cost)
    devices = (
        tuple(stage_device(s, stages, options.cost) for s in range(stages))
        if options.cost.stages_per_device > 1
        else None
    )
    return Partition(
        assignment, coarse, dict(plan.stage_of), stages, tuple(replicas), links, costs, devices
    )


def _check_replicas(n_stages: int, options: PartitionOptions) -> None:
    """Fixed replicas must give every stage at least one (``check_replicas``) and, on a
    hierarchical machine, take all of its devices."""
    check_replicas(n_stages, options)
    if options.replicas is None or not options.levels:
        return
    devices = math.prod(level.count for level in options.levels)
    if sum(options.replicas) != devices:
        counts = " x ".join(str(level.count) for level in options.levels)
        raise UserError(
            f"the machine has {counts} = {devices} devices but the replicas take "
            f"{sum(options.replicas)}"
        )


def expand(graph: nx.DiGraph, coarse: nx.DiGraph, coarse_stage: dict[int, int]) -> dict[str, int]:
    """Stages for every node: group members follow their group, inputs go to stage 0, and a
    parameter read goes to the first stage that uses it (each stage repeats the reads it needs)."""
    assignment = {m: coarse_stage[c] for c in coarse.nodes for m in coarse.nodes[c]["members"]}
    for n in graph.nodes:
        if graph.nodes[n]["op"] == "placeholder":
            assignment[n] = 0
    for n in graph.nodes:
        if graph.nodes[n]["op"] == "get_attr":
            users = [assignment[s] for s in graph.successors(n) if s in assignment]
            assignment[n] = min(users, default=0)
    return assignment


def validate(graph: nx.DiGraph, assignment: dict[str, int], n_stages: int) -> None:
    """Check that an assignment can run as a pipeline; raise InvalidPartition if not."""
    missing = [n for n in graph.nodes if n not in assignment]
    if missing:
        raise InvalidPartition(f"{len(missing)} nodes have no stage, e.g. {missing[0]}")
    bad = [n for n, s in assignment.items() if not 0 <= s < n_stages]
    if bad:
        raise InvalidPartition(
            f"node {bad[0]} is given stage {assignment[bad[0]]}, outside 0..{n_stages - 1}"
        )
    used = {
        s for n, s in assignment.items() if graph.nodes[n]["op"] not in ("placeholder", "get_attr")
    }
    empty = sorted(set(range(n_stages)) - used)
    if empty:
        raise InvalidPartition(f"stage {empty[0]} has no operations")
    for u, v in graph.edges:
        if graph.nodes[u]["op"] == "get_attr":
            continue
        if assignment[u] > assignment[v]:
            raise InvalidPartition(
                f"{u} (stage {assignment[u]}) feeds {v} (stage {assignment[v]}): "
                "values may only flow to the same or a later stage"
            )
