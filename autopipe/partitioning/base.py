"""The interface every partitioning method implements.

A method is a function ``(coarse, n_stages, options) -> dict[int, int] | Plan``: it gets the
contracted graph (a DAG whose nodes carry the costs described in ``autopipe.graph.contract``
and ``autopipe.cost``) and returns the stage of every contracted node. A stage graph must be
acyclic: every edge goes to the same or a later stage; ``autopipe.partitioning.validate`` checks
it. Methods must be deterministic for a given ``options.seed``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Union

import networkx as nx

from autopipe.cost import CostModel


@dataclass(frozen=True)
class Level:
    """One level of a hierarchical machine: how many units it groups, and their link speed."""

    count: int
    bandwidth: float
    """GB/s between the units of this level."""


@dataclass(frozen=True)
class DeviceGroup:
    """Identical devices of one type in a heterogeneous cluster, with their per-node times."""

    server: str
    device_type: str
    count: int
    compute_ms: dict[str, float]
    """Forward + backward milliseconds of every fine graph node on this device type."""


@dataclass(frozen=True)
class PartitionOptions:
    """Settings every method may read; methods ignore what they do not use."""

    seed: int = 0
    cost: CostModel = field(default_factory=CostModel)
    replication: bool = False
    """pipedream: allow data-parallel replicas of a stage (n_stages is then the device count)."""
    levels: tuple[Level, ...] = ()
    """pipedream: a hierarchical machine, innermost level first (``-n 8 2 --bw 300 25``)."""
    devices: tuple[DeviceGroup, ...] = ()
    """pipedream: a heterogeneous cluster; each stage is timed on its slowest device."""
    metis_attempts: int = 10
    """metis: seeds tried; the best acyclic result wins."""


@dataclass(frozen=True)
class Plan:
    """A method's answer: the stage of every contracted node, and replicas per stage."""

    stage_of: dict[int, int]
    replicas: tuple[int, ...] | None = None
    """Data-parallel replicas of each stage; None means one each."""


Method = Callable[[nx.DiGraph, int, PartitionOptions], Union[dict[int, int], Plan]]
