"""The interface every partitioning method implements.

A method is a function ``(coarse, n_stages, options) -> dict[int, int] | Plan``: it gets the
contracted graph (a DAG whose nodes carry the costs described in ``autopipe.graph.contract``
and ``autopipe.cost``) and returns the stage of every contracted node. A stage graph must be
acyclic: every edge goes to the same or a later stage; ``autopipe.partitioning.validate`` checks
it. Methods must be deterministic for a given ``options.seed``.
"""

from __future__ import annotations

import functools
import gc
from dataclasses import dataclass, field
from typing import Callable, TypeVar, Union

import networkx as nx

from autopipe.cost import CostModel, Level
from autopipe.errors import UserError


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
    replicas: tuple[int, ...] | None = None
    """Data-parallel replicas of every stage, fixed by the user (``--stage_to_num_ranks``), one
    per stage: pipedream chooses the cut for them, the other methods cut and attach them."""
    levels: tuple[Level, ...] = ()
    """pipedream: a hierarchical machine, innermost level first (``-n 8 2 --bw 300 25``)."""
    devices: tuple[DeviceGroup, ...] = ()
    """pipedream: a heterogeneous cluster; each stage is timed on its slowest device."""
    metis_attempts: int = 10
    """metis: seeds tried; the best acyclic result wins."""

    def __post_init__(self) -> None:
        if self.cost.schedule == "wpipe":
            _check_wpipe(self)


@dataclass(frozen=True)
class Plan:
    """A method's answer: the stage of every contracted node, and replicas per stage."""

    stage_of: dict[int, int]
    replicas: tuple[int, ...] | None = None
    """Data-parallel replicas of each stage; None means one each."""


_PLACEMENT_FLAGS = {
    "replication": "--replication",
    "replicas": "--stage_to_num_ranks",
    "levels": "-n",
    "devices": "--server_file",
}
"""Options that choose which devices run a stage, and the flags that set them."""


def _check_wpipe(options: PartitionOptions) -> None:
    """WPipe fixes where stages run (stage s of 2P on device s mod P, one replica each), so
    the options that place stages otherwise do not apply."""
    for name, flag in _PLACEMENT_FLAGS.items():
        if getattr(options, name):
            raise UserError(
                f"--schedule wpipe cannot be combined with {flag}: wpipe runs stages d and P + d "
                "on device d, one replica each"
            )


Method = Callable[[nx.DiGraph, int, PartitionOptions], Union[dict[int, int], Plan]]

_Call = TypeVar("_Call", bound=Callable)


def without_cycle_collection(method: _Call) -> _Call:
    """``method`` run with Python's cycle collector paused, as it was before on return.

    A partitioner makes many short-lived containers while the model's graph keeps many
    long-lived ones; the collector would rescan those over and over (about a tenth of the
    time on 10,000 units). What the partitioner leaves in cycles is collected after it."""

    @functools.wraps(method)
    def run(*args, **kwargs):
        if not gc.isenabled():
            return method(*args, **kwargs)
        gc.disable()
        try:
            return method(*args, **kwargs)
        finally:
            gc.enable()

    return run  # type: ignore[return-value]


def check_replicas(n_stages: int, options: PartitionOptions) -> None:
    """Reject fixed replicas that do not give each of ``n_stages`` stages at least one, or that
    come with ``replication`` (which chooses replicas itself)."""
    fixed = options.replicas
    if fixed is None:
        return
    if options.replication:
        raise UserError(
            "fixed replicas (--stage_to_num_ranks) cannot be combined with --replication"
        )
    if len(fixed) != n_stages:
        raise UserError(f"{len(fixed)} replica counts were given for {n_stages} stages")
    if min(fixed) < 1:
        raise UserError(f"every stage needs at least one replica, got {list(fixed)}")
