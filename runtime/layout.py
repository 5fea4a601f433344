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
from collections.abc import Hashable, Mapping, Sequence
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
    _current,
    _fixed,
    _one_f_one_b_order,
    _stashed,
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
    """The ranks of each stage: ``replicas[s]`` consecutive ranks run stage s; or, with
    ``devices`` (WPipe's two stages per device), stage s runs on rank ``devices[s]`` alone."""

    replicas: tuple[int, ...]
    devices: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not self.replicas or min(self.replicas) < 1:
            raise RuntimeConfigError(
                f"every stage needs at least one rank, got replicas {list(self.replicas)}"
            )
        if self.devices is not None and (
            len(self.devices) != len(self.replicas)
            or self.replicated
            or sorted(set(self.devices)) != list(range(max(self.devices) + 1))
        ):
            raise RuntimeConfigError(
                f"stages placed on devices {list(self.devices)} must each name one of devices "
                "0, 1, ..., every device used, and cannot also have replicas"
            )

    @property
    def n_stages(self) -> int:
        return len(self.replicas)

    @property
    def world_size(self) -> int:
        if self.devices is not None:
            return max(self.devices) + 1
        return sum(self.replicas)

    @property
    def replicated(self) -> bool:
        """Whether any stage runs on more than one rank."""
        return max(self.replicas) > 1

    @property
    def shared(self) -> bool:
        """Whether some rank runs more than one stage."""
        return self.world_size < self.n_stages

    def first_rank(self, stage: int) -> int:
        """The lowest rank running ``stage``."""
        if self.devices is not None:
            return self.devices[stage]
        return sum(self.replicas[:stage])

    def ranks_of(self, stage: int) -> range:
        """Every rank running ``stage``, replica 0 first."""
        first = self.first_rank(stage)
        return range(first, first + self.replicas[stage])

    def roles(self, rank: int) -> list[Role]:
        """What ``rank`` runs: one stage replica, or (with ``devices``) several stages."""
        if not 0 <= rank < self.world_size:
            raise RuntimeConfigError(f"rank {rank} is outside a layout of {self.world_size}")
        return [
            Role(stage, rank - self.first_rank(stage))
            for stage in range(self.n_stages)
            if rank in self.ranks_of(stage)
        ]

    def role(self, rank: int) -> Role:
        """The stage and replica that ``rank`` runs, where it runs one (its first otherwise)."""
        return self.roles(rank)[0]

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
        """Which ranks run which stage, one line per stage (per rank when ranks hold several)."""
        if self.shared:
            return "\n".join(
                f"rank {rank}: stages {', '.join(str(r.stage) for r in self.roles(rank))}"
                for rank in range(self.world_size)
            )
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
    """The file's plan of replicas, repeated ``dp`` times (``--dp``); or the devices its
    stages are placed on (a file partitioned for WPipe), which runs as it is."""
    if dp < 1:
        raise RuntimeConfigError(f"--dp must be at least 1, got {dp}")
    stages = pipeline["stages"]
    if any("device" in stage for stage in stages):
        if dp > 1:
            raise RuntimeConfigError(
                "--dp copies pipelines of one stage per rank; this file places two stages on "
                "each device (WPipe): drop --dp"
            )
        return Layout(stage_replicas(pipeline), tuple(int(s.get("device", -1)) for s in stages))
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


ASYNC_ON_REPLICAS = ("pipedream", "stale", "2bw")
"""Asynchronous schedules that run replicated stages. PipeOptim's prediction distance and
PipeDream's vertical sync count versions as steps of a stage, which replicas of different
stages take at different rates, so they run with one rank per stage only."""


def layout_schedule(name: str, layout: Layout, n_microbatches: int, steps: int = 1) -> Schedule:
    """Schedule ``name`` with one action list per rank, for batches of ``n_microbatches``.

    Each rank runs its stage's schedule over its own microbatches, 1F1B warming up with
    :meth:`Layout.warmup` forwards. A synchronous schedule (gpipe, 1f1b) covers one batch. An
    asynchronous one covers ``steps`` batches without a flush, the microbatches numbered over
    the run: ``2bw`` steps once a rank has run its share of a batch, every microbatch of batch t
    using version max(0, t - 1); ``pipedream`` (weight stashing) and ``stale`` step after every
    backward, the replicas of a stage averaging the gradients of the microbatches they ran side
    by side, as PipeDream's replicas do. With one rank per stage it is the plain schedule.
    """
    if name not in SCHEDULES and name not in ASYNC_ON_REPLICAS:
        raise RuntimeConfigError(
            f"--schedule {name} does not run replicated stages: use one of "
            f"{', '.join((*SCHEDULES, *ASYNC_ON_REPLICAS))}, or one rank per stage"
        )
    if name in SCHEDULES:
        actions = []
        for rank in range(layout.world_size):
            role = layout.role(rank)
            mine = layout.microbatches_of(role, n_microbatches)
            if name == "gpipe":
                actions.append(tuple(_gpipe_order(role.stage, mine)))
            else:
                warmup = layout.warmup(role.stage)
                actions.append(tuple(_one_f_one_b_order(role.stage, mine, warmup)))
        return Schedule(name, layout.n_stages, n_microbatches, tuple(actions))
    if name != "2bw":
        _check_whole_turns(name, layout, n_microbatches)
    total = steps * n_microbatches
    actions = tuple(
        _async_rank(name, layout, layout.role(rank), n_microbatches, total)
        for rank in range(layout.world_size)
    )
    per_step = n_microbatches if name == "2bw" else 1
    return Schedule(name, layout.n_stages, total, actions, per_step)


def _check_whole_turns(name: str, layout: Layout, n_microbatches: int) -> None:
    """A schedule that steps after every backward needs every replica of a stage to run as
    many microbatches as the others in a batch: their steps are one all-reduce."""
    for stage, replicas in enumerate(layout.replicas):
        if n_microbatches % replicas:
            raise RuntimeConfigError(
                f"--schedule {name} steps the {replicas} replicas of stage {stage} together "
                f"after every backward, so a batch's {n_microbatches} microbatches must divide "
                f"among them: pass --microbatches so that microbatches x dp is a multiple of "
                f"{replicas}"
            )


def _async_rank(
    name: str, layout: Layout, role: Role, per_batch: int, total: int
) -> tuple[Action, ...]:
    """One rank of an asynchronous schedule: 1F1B's order over its microbatches of the run,
    never flushed, each compute versioned and steps where the schedule takes them."""
    mine = layout.microbatches_of(role, total)
    # ``mine`` is in order, so the last one seen of each batch is its last
    last_of_batch = set({k // per_batch: k for k in mine}.values())
    if name == "2bw":
        rule = _fixed({k: max(0, k // per_batch - 1) for k in mine})
    elif name == "pipedream":
        rule = _stashed()
    else:
        rule = _current
    current, actions = 0, []
    for action in _one_f_one_b_order(role.stage, mine, layout.warmup(role.stage)):
        if action.kind == STEP:
            continue
        actions.append(rule(action, current))
        steps_here = action.kind == BACKWARD and (
            name != "2bw" or action.microbatch in last_of_batch
        )
        if steps_here:
            current += 1
            actions.append(Action(STEP, role.stage, None, current))
    return tuple(actions)


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
    names; a synchronous schedule ends each rank with its step, an asynchronous one never
    computes with a version its rank has not made; and the ranks, replicas' all-reduces
    included, cannot deadlock."""
    seen: Counter[Action] = Counter()
    for rank, actions in enumerate(schedule.actions):
        role = layout.role(rank)
        mine = layout.microbatches_of(role, schedule.n_microbatches)
        expected = [Action(kind, role.stage, k) for kind in (FORWARD, BACKWARD) for k in mine]
        computes = [a for a in actions if a.kind != STEP]
        if Counter(computes) != Counter(expected):
            raise ScheduleError(f"rank {rank} does not run exactly its microbatches")
        if schedule.microbatches_per_step is None and actions[-1].kind != STEP:
            raise ScheduleError(f"rank {rank} does not end with a step")
        _check_rank_order(rank, actions)
        seen.update(computes)
    if len(seen) != 2 * layout.n_stages * schedule.n_microbatches:
        raise ScheduleError("the ranks do not cover every microbatch of every stage")
    simulate(schedule, dependencies, gradient_reductions(schedule, layout))


def _check_rank_order(rank: int, actions: Sequence[Action]) -> None:
    """On one rank: each F before its B, and no compute with a version not yet made."""
    forwards: set[int] = set()
    steps = 0
    for action in actions:
        if action.kind == STEP:
            steps += 1
            continue
        if action.version is not None and action.version > steps:
            raise ScheduleError(
                f"rank {rank}: {action} uses version {action.version} after only {steps} "
                "steps: give the batch more microbatches (--microbatches)"
            )
        if action.kind == FORWARD:
            forwards.add(action.microbatch)
        elif action.microbatch not in forwards:
            raise ScheduleError(f"rank {rank}: {action} comes before its forward")


def check_wpipe(schedule: str, layout: Layout, pipeline: Mapping[str, Any]) -> None:
    """``--schedule wpipe`` and a file partitioned for it go together: 2p stages, stage s on
    device s % p. WPipe's groups step at different times, so no weight may be tied between
    stages."""
    if not layout.shared:
        if schedule == "wpipe":
            raise RuntimeConfigError(
                "--schedule wpipe runs two stages on each device: partition the model for it "
                "with python -m autopipe.partition ... --schedule wpipe"
            )
        return
    if schedule != "wpipe":
        raise RuntimeConfigError(
            f"this file places two stages on each device, which only --schedule wpipe runs "
            f"(not {schedule}): pass --schedule wpipe, or partition without --schedule wpipe"
        )
    if any(len({s for s, _ in members}) > 1 for members in pipeline.get("tied_parameters", [])):
        raise RuntimeConfigError(
            "--schedule wpipe updates its two groups of stages at different times, so it "
            "cannot keep a weight tied between stages equal: use another schedule for this model"
        )
    p = layout.world_size
    if layout.n_stages != 2 * p or layout.devices != tuple(s % p for s in range(2 * p)):
        raise RuntimeConfigError(
            f"--schedule wpipe runs stage s on device s % p of 2p stages; this file places "
            f"its {layout.n_stages} stages on devices {list(layout.devices or ())}"
        )
