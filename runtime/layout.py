"""Which rank runs which stage: pipelines with replicated stages, and grids of pipelines.

A generated file says how many data-parallel replicas each stage has (``PIPELINE`` stage
``"replicas"``, from the partitioner's plan or ``--stage_to_num_ranks``); ``--dp N`` runs N
copies of that whole plan. Ranks are handed out stage by stage, a stage's replicas on
consecutive ranks, so the ranks that all-reduce a stage's gradients sit side by side (on one
machine, where they fit):

    stage 0: 3 replicas, stage 1: 1, --dp 2  ->  stage 0 on ranks 0-5, stage 1 on ranks 6-7

A batch is cut into ``microbatches * dp`` microbatches. Microbatch k runs on replica
``k % replicas`` of every stage, so in a grid (every stage with N replicas) copy d of the
pipeline runs microbatches d, d + N, ... and each replica of a stage sees every replicas-th
microbatch. The replicas of a stage sum their gradients before each step, so a step applies the
gradient of the whole batch, as one process training the original model would.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from math import ceil, lcm
from typing import Any

from runtime.schedule import (
    BACKWARD,
    FORWARD,
    SCHEDULES,
    STEP,
    Action,
    Dependencies,
    Schedule,
    ScheduleError,
    _gpipe_order,
    _one_f_one_b_order,
    last_backwards,
    simulate,
)
from runtime.stage import RuntimeConfigError


@dataclass(frozen=True)
class Role:
    """What one rank runs: replica ``replica`` of stage ``stage``."""

    stage: int
    replica: int


@dataclass(frozen=True)
class Layout:
    """The ranks of each stage: ``replicas[s]`` consecutive ranks run stage s."""

    replicas: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.replicas or min(self.replicas) < 1:
            raise RuntimeConfigError(
                f"every stage needs at least one rank, got replicas {list(self.replicas)}"
            )

    @property
    def n_stages(self) -> int:
        return len(self.replicas)

    @property
    def world_size(self) -> int:
        return sum(self.replicas)

    @property
    def replicated(self) -> bool:
        """Whether any stage runs on more than one rank."""
        return max(self.replicas) > 1

    def first_rank(self, stage: int) -> int:
        """The lowest rank running ``stage``."""
        return sum(self.replicas[:stage])

    def ranks_of(self, stage: int) -> range:
        """Every rank running ``stage``, replica 0 first."""
        first = self.first_rank(stage)
        return range(first, first + self.replicas[stage])

    def role(self, rank: int) -> Role:
        """The stage and replica that ``rank`` runs."""
        if not 0 <= rank < self.world_size:
            raise RuntimeConfigError(f"rank {rank} is outside a layout of {self.world_size}")
        stage = 0
        while rank >= self.first_rank(stage) + self.replicas[stage]:
            stage += 1
        return Role(stage, rank - self.first_rank(stage))

    def rank_of(self, stage: int, microbatch: int) -> int:
        """The rank that runs ``microbatch`` (of a step) on ``stage``."""
        return self.first_rank(stage) + microbatch % self.replicas[stage]

    def microbatches_of(self, role: Role, n_microbatches: int) -> list[int]:
        """The microbatches of a step that ``role`` runs, in order."""
        return list(range(role.replica, n_microbatches, self.replicas[role.stage]))

    def rank_pairs(self, src: int, dst: int) -> list[tuple[int, int]]:
        """The (sender, receiver) ranks through which stage ``src`` passes values to ``dst``:
        those that share a microbatch, in order."""
        period = lcm(self.replicas[src], self.replicas[dst])
        pairs = {(self.rank_of(src, k), self.rank_of(dst, k)) for k in range(period)}
        return sorted(pairs)

    def warmup(self, stage: int) -> int:
        """1F1B's warm-up forwards on a rank of ``stage``: enough microbatches in flight to
        keep the later stages, all their replicas, busy (PipeDream's count)."""
        downstream = sum(self.replicas[stage:])
        return ceil(downstream / self.replicas[stage]) - 1

    def describe(self) -> str:
        """Which ranks run which stage, one line per stage."""
        lines = []
        for stage in range(self.n_stages):
            ranks = self.ranks_of(stage)
            if len(ranks) == 1:
                lines.append(f"stage {stage}: rank {ranks[0]}")
            else:
                listed = ", ".join(str(r) for r in ranks)
                lines.append(f"stage {stage}: ranks {listed} (replicas 0-{len(ranks) - 1})")
        return "\n".join(lines)


def stage_replicas(pipeline: Mapping[str, Any]) -> tuple[int, ...]:
    """The replicas per stage that a generated file plans (1 each where it says nothing)."""
    return tuple(int(stage.get("replicas", 1)) for stage in pipeline["stages"])


def make_layout(pipeline: Mapping[str, Any], dp: int = 1) -> Layout:
    """The file's plan of replicas, repeated ``dp`` times (``--dp``)."""
    if dp < 1:
        raise RuntimeConfigError(f"--dp must be at least 1, got {dp}")
    return Layout(tuple(r * dp for r in stage_replicas(pipeline)))


def check_layout(layout: Layout, world_size: int, microbatches: int, dp: int) -> None:
    """The world size must be the plan's rank count, and every replica needs a microbatch of
    every batch (its share of the gradient sum before each step)."""
    if world_size != layout.world_size:
        plan = ", ".join(f"{r}" for r in layout.replicas)
        grid = f" with --dp {dp}" if dp > 1 else ""
        raise RuntimeConfigError(
            f"the model has {layout.n_stages} stages run by {layout.world_size} processes "
            f"(ranks per stage: {plan}{grid}) but the world size is {world_size}: start "
            f"{layout.world_size} processes (torchrun --nproc_per_node {layout.world_size}, "
            "or over several machines)"
        )
    total = microbatches * dp
    widest = max(layout.replicas)
    if total < widest:
        stage = layout.replicas.index(widest)
        raise RuntimeConfigError(
            f"stage {stage} runs on {widest} ranks but a batch has only {total} microbatches "
            f"(--microbatches {microbatches}{f' x --dp {dp}' if dp > 1 else ''}): every rank "
            f"needs one; pass --microbatches {ceil(widest / dp)} or more"
        )


def layout_schedule(name: str, layout: Layout, n_microbatches: int) -> Schedule:
    """A synchronous schedule (``gpipe`` or ``1f1b``) for one batch of ``n_microbatches``, one
    action list per rank: each rank runs its stage's schedule over its own microbatches, 1F1B
    warming up with :meth:`Layout.warmup` forwards. With one rank per stage it is the plain
    schedule."""
    if name not in SCHEDULES:
        raise RuntimeConfigError(
            f"--schedule {name} does not run replicated stages yet: use "
            f"{' or '.join(SCHEDULES)}, or one rank per stage"
        )
    actions = []
    for rank in range(layout.world_size):
        role = layout.role(rank)
        mine = layout.microbatches_of(role, n_microbatches)
        if name == "gpipe":
            actions.append(tuple(_gpipe_order(role.stage, mine)))
        else:
            actions.append(tuple(_one_f_one_b_order(role.stage, mine, layout.warmup(role.stage))))
    return Schedule(name, layout.n_stages, n_microbatches, tuple(actions))


def gradient_reductions(schedule: Schedule, layout: Layout) -> dict[tuple[int, int], Hashable]:
    """Where replicas all-reduce: the last backward before each step on every rank of a
    replicated stage, keyed by stage and step, for :func:`runtime.schedule.simulate`."""
    found: dict[tuple[int, int], Hashable] = {}
    for rank, actions in enumerate(schedule.actions):
        stage = layout.role(rank).stage
        if layout.replicas[stage] > 1:
            for step, position in enumerate(last_backwards(actions)):
                found[(rank, position)] = (stage, step)
    return found


def validate_layout(schedule: Schedule, layout: Layout, dependencies: Dependencies) -> None:
    """Every microbatch runs forward then backward once on each stage, on the rank the layout
    names, each rank ends with its step, and the ranks, replicas' all-reduces included, cannot
    deadlock."""
    seen: Counter[Action] = Counter()
    for rank, actions in enumerate(schedule.actions):
        role = layout.role(rank)
        expected = [
            Action(kind, role.stage, k)
            for kind in (FORWARD, BACKWARD)
            for k in layout.microbatches_of(role, schedule.n_microbatches)
        ]
        computes = [a for a in actions if a.kind != STEP]
        if sorted(map(str, computes)) != sorted(map(str, expected)) or actions[-1].kind != STEP:
            raise ScheduleError(f"rank {rank} does not run exactly its microbatches, then a step")
        seen.update(computes)
    if len(seen) != 2 * layout.n_stages * schedule.n_microbatches:
        raise ScheduleError("the ranks do not cover every microbatch of every stage")
    simulate(schedule, dependencies, gradient_reductions(schedule, layout))
