"""Pipeline schedules as data: which action each device runs, in order.

A schedule is a tuple of actions per device (``F3`` forward of microbatch 3, ``B2`` its
backward, ``S`` the optimizer step). It can be printed as a grid, checked against the stage
graph of a generated file, and simulated step by step, so that an executor only has to run the
actions it is given and knows nothing about GPipe or 1F1B.

Dependencies between stages come from a generated file's ``PIPELINE`` dict
(:func:`stage_dependencies`): for each stage, the earlier stages it receives values from.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

FORWARD = "F"
BACKWARD = "B"
STEP = "S"
KINDS = (FORWARD, BACKWARD, STEP)

Dependencies = Mapping[int, AbstractSet[int]]


class ScheduleError(ValueError):
    """A schedule that cannot run as written, with the first problem named."""


@dataclass(frozen=True)
class Action:
    """One unit of work: the forward or backward of a microbatch on a stage, or a stage's step."""

    kind: str
    stage: int
    microbatch: int | None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ScheduleError(f"action kind must be one of {KINDS}, got {self.kind!r}")
        if (self.kind == STEP) != (self.microbatch is None):
            raise ScheduleError(
                f"{self.kind} on stage {self.stage}: a step has no microbatch, F and B need one"
            )

    def __str__(self) -> str:
        return self.kind if self.microbatch is None else f"{self.kind}{self.microbatch}"


@dataclass(frozen=True)
class Simulation:
    """The outcome of a lockstep run: how many steps it took and when each action started.

    Every action takes one step here; a simulator with real costs can replace ``start`` with
    times and keep the rest.
    """

    steps: int
    start: Mapping[Action, int]


@dataclass(frozen=True)
class Schedule:
    """The actions of each device in order; device ``d`` runs ``actions[d]``.

    Here each device holds one stage, but every action names its stage, so a schedule may later
    put several stages on one device.
    """

    name: str
    n_stages: int
    n_microbatches: int
    actions: tuple[tuple[Action, ...], ...]

    def grid(self, dependencies: Dependencies | None = None) -> str:
        """A table with one row per device (here, per stage), one column per step, '.' if idle.

        The steps are those of the lockstep simulation (see :func:`simulate`).

        ``dependencies`` defaults to a chain (each stage receives from the one before).
        """
        deps = chain_dependencies(self.n_stages) if dependencies is None else dependencies
        simulation = simulate(self, deps)
        rows = [["."] * simulation.steps for _ in self.actions]
        for device, actions in enumerate(self.actions):
            for action in actions:
                rows[device][simulation.start[action]] = str(action)
        width = max((len(cell) for row in rows for cell in row), default=1)
        label = len(f"stage {len(rows) - 1}")
        lines = [
            f"{f'stage {device}':<{label}}  " + " ".join(cell.ljust(width) for cell in row)
            for device, row in enumerate(rows)
        ]
        return "\n".join(line.rstrip() for line in lines)

    def validate(self, dependencies: Dependencies) -> Simulation:
        """Check the schedule against the stage graph; see :func:`validate`."""
        return validate(self, dependencies)


def chain_dependencies(n_stages: int) -> dict[int, set[int]]:
    """The stage graph of a straight pipeline: stage s receives only from stage s - 1."""
    return {stage: {stage - 1} if stage else set() for stage in range(n_stages)}


def stage_dependencies(pipeline: Mapping) -> dict[int, set[int]]:
    """For each stage of a generated file's ``PIPELINE``, the earlier stages it receives from.

    Model inputs (producer None) add nothing. A producer that is not an earlier stage means the
    stage graph has a cycle, which no schedule can run, so it is rejected here.
    """
    dependencies: dict[int, set[int]] = {}
    for stage, spec in enumerate(pipeline["stages"]):
        producers: set[int] = set()
        for name in spec["inputs"]:
            producer = spec["values"][name]["producer"]
            if producer is None:
                continue
            if producer >= stage:
                raise ScheduleError(
                    f"stage {stage} receives {name!r} from stage {producer}, which is not an "
                    "earlier stage: the stage graph must be acyclic; partition the model again"
                )
            producers.add(producer)
        dependencies[stage] = producers
    return dependencies


def _check_counts(n_stages: int, n_microbatches: int) -> None:
    """Reject pipelines without stages or batches without microbatches."""
    if n_stages < 1:
        raise ScheduleError(f"n_stages must be at least 1, got {n_stages}")
    if n_microbatches < 1:
        raise ScheduleError(f"n_microbatches must be at least 1, got {n_microbatches}")


def _forward(stage: int, microbatch: int) -> Action:
    return Action(FORWARD, stage, microbatch)


def _backward(stage: int, microbatch: int) -> Action:
    return Action(BACKWARD, stage, microbatch)


def gpipe(n_stages: int, n_microbatches: int) -> Schedule:
    """GPipe: every forward, then every backward in reverse microbatch order, then a step."""
    _check_counts(n_stages, n_microbatches)
    actions = tuple(
        (
            *(_forward(stage, i) for i in range(n_microbatches)),
            *(_backward(stage, i) for i in reversed(range(n_microbatches))),
            Action(STEP, stage, None),
        )
        for stage in range(n_stages)
    )
    return Schedule("gpipe", n_stages, n_microbatches, actions)


def _one_f_one_b_stage(stage: int, n_stages: int, n_microbatches: int) -> Iterator[Action]:
    """Stage ``stage`` of 1F1B: warm-up forwards, one forward one backward, drain, step."""
    warmup = min(n_stages - stage - 1, n_microbatches)
    for i in range(warmup):
        yield _forward(stage, i)
    for i in range(n_microbatches - warmup):
        yield _forward(stage, warmup + i)
        yield _backward(stage, i)
    for i in range(n_microbatches - warmup, n_microbatches):
        yield _backward(stage, i)
    yield Action(STEP, stage, None)


def one_f_one_b(n_stages: int, n_microbatches: int) -> Schedule:
    """1F1B with a flush (PipeDream-Flush): GPipe's bubble, at most p - s microbatches held."""
    _check_counts(n_stages, n_microbatches)
    actions = tuple(
        tuple(_one_f_one_b_stage(stage, n_stages, n_microbatches)) for stage in range(n_stages)
    )
    return Schedule("1f1b", n_stages, n_microbatches, actions)


SCHEDULES: dict[str, Callable[[int, int], Schedule]] = {"gpipe": gpipe, "1f1b": one_f_one_b}


def _consumers(dependencies: Dependencies, n_stages: int) -> dict[int, set[int]]:
    """Invert the stage graph: for each stage, the stages that receive from it."""
    consumers: dict[int, set[int]] = {stage: set() for stage in range(n_stages)}
    for stage, producers in dependencies.items():
        for producer in producers:
            consumers[producer].add(stage)
    return consumers


def _check_dependencies(dependencies: Dependencies, n_stages: int) -> None:
    """Every stage named in the stage graph must exist in the schedule."""
    for stage, producers in sorted(dependencies.items()):
        for named in sorted({stage, *producers}):
            if not 0 <= named < n_stages:
                raise ScheduleError(
                    f"the dependencies name stage {named}, but the schedule has {n_stages} stages"
                )


def _prerequisites(
    action: Action,
    producers: Dependencies,
    consumers: Mapping[int, AbstractSet[int]],
    n_microbatches: int,
) -> list[Action]:
    """The actions, on any stage, that must finish before ``action`` may start."""
    stage, i = action.stage, action.microbatch
    if action.kind == FORWARD:
        return [_forward(t, i) for t in sorted(producers.get(stage, ()))]
    if action.kind == BACKWARD:
        return [_forward(stage, i), *(_backward(c, i) for c in sorted(consumers[stage]))]
    return [_backward(stage, j) for j in range(n_microbatches)]


def _actions_by_stage(schedule: Schedule) -> dict[int, list[Action]]:
    """Each stage's actions in the order its device runs them."""
    by_stage: dict[int, list[Action]] = {stage: [] for stage in range(schedule.n_stages)}
    for actions in schedule.actions:
        for action in actions:
            by_stage.setdefault(action.stage, []).append(action)
    return by_stage


def _check_ranges(schedule: Schedule) -> None:
    """Every action must name an existing stage and microbatch."""
    for actions in schedule.actions:
        for action in actions:
            if not 0 <= action.stage < schedule.n_stages:
                raise ScheduleError(
                    f"{action} names stage {action.stage}, "
                    f"but the schedule has {schedule.n_stages} stages"
                )
            if (
                action.microbatch is not None
                and not 0 <= action.microbatch < schedule.n_microbatches
            ):
                raise ScheduleError(
                    f"stage {action.stage} runs {action}, "
                    f"but the schedule has {schedule.n_microbatches} microbatches"
                )


def _expected_actions(stage: int, n_microbatches: int) -> list[Action]:
    """What one stage of a synchronous schedule runs: one F and one B per microbatch, one S."""
    return [
        *(_forward(stage, i) for i in range(n_microbatches)),
        *(_backward(stage, i) for i in range(n_microbatches)),
        Action(STEP, stage, None),
    ]


def _check_complete(stage: int, actions: Sequence[Action], n_microbatches: int) -> None:
    """A stage must run each of its actions exactly once."""
    for expected in _expected_actions(stage, n_microbatches):
        count = actions.count(expected)
        if count == 0:
            raise ScheduleError(f"stage {stage} never runs {expected}")
        if count > 1:
            raise ScheduleError(f"stage {stage} runs {expected} {count} times")


def _check_order(stage: int, actions: Sequence[Action]) -> None:
    """On a stage, each F comes before its B, and the step comes after every B."""
    position = {action: index for index, action in enumerate(actions)}
    step = position[Action(STEP, stage, None)]
    for action in actions:
        if action.kind != BACKWARD:
            continue
        forward = _forward(stage, action.microbatch)
        if position[forward] > position[action]:
            raise ScheduleError(f"stage {stage}: {action} comes before {forward}")
        if step < position[action]:
            raise ScheduleError(f"stage {stage}: S comes before {action}")


def _deadlock_message(
    step: int,
    remaining: Sequence[Sequence[Action]],
    done: Mapping[Action, int],
    producers: Dependencies,
    consumers: Mapping[int, AbstractSet[int]],
    n_microbatches: int,
) -> str:
    """Name the first device that cannot go on, what it waits for, and why that never runs."""
    device = next(d for d, actions in enumerate(remaining) if actions)
    action = remaining[device][0]
    needed = _prerequisites(action, producers, consumers, n_microbatches)
    missing = next(a for a in needed if a not in done)
    holder = next((d for d, actions in enumerate(remaining) if missing in actions), None)
    if holder is None:
        reason = "it is not in the schedule"
    else:
        reason = f"device {holder} is stuck at {remaining[holder][0]}"
    return (
        f"deadlock at step {step}: stage {action.stage} waits for {missing} on stage "
        f"{missing.stage}, which never runs ({reason})"
    )


def simulate(schedule: Schedule, dependencies: Dependencies) -> Simulation:
    """Run the schedule in lockstep, one action per device per step.

    A device runs its next action once every action it depends on, on any stage, finished in an
    earlier step; otherwise it idles. Raises :class:`ScheduleError` if no device can move.
    """
    _check_dependencies(dependencies, schedule.n_stages)
    consumers = _consumers(dependencies, schedule.n_stages)
    m = schedule.n_microbatches
    position = [0] * len(schedule.actions)
    start: dict[Action, int] = {}
    step = 0
    while any(pos < len(acts) for pos, acts in zip(position, schedule.actions)):
        waiting = [
            (device, acts[pos])
            for device, (pos, acts) in enumerate(zip(position, schedule.actions))
            if pos < len(acts)
        ]
        ready = [
            (device, action)
            for device, action in waiting
            if all(a in start for a in _prerequisites(action, dependencies, consumers, m))
        ]
        if not ready:
            remaining = [acts[pos:] for pos, acts in zip(position, schedule.actions)]
            message = _deadlock_message(step, remaining, start, dependencies, consumers, m)
            raise ScheduleError(message)
        for device, action in ready:
            start[action] = step
            position[device] += 1
        step += 1
    return Simulation(step, start)


def validate(schedule: Schedule, dependencies: Dependencies) -> Simulation:
    """Check that a synchronous schedule is complete, ordered and free of deadlock.

    Every stage must run one F and one B per microbatch and one S, each F before its B and the
    S last; then the lockstep simulation must finish. Returns that simulation; raises
    :class:`ScheduleError` naming the first problem found.
    """
    _check_ranges(schedule)
    for stage, actions in _actions_by_stage(schedule).items():
        _check_complete(stage, actions, schedule.n_microbatches)
        _check_order(stage, actions)
    return simulate(schedule, dependencies)


def peak_in_flight(schedule: Schedule) -> list[int]:
    """Per stage, the most microbatches whose forward ran and backward did not yet.

    That is how many microbatches' activations the stage holds at its peak: m for GPipe,
    min(p - s, m) for 1F1B on stage s.
    """
    by_stage = _actions_by_stage(schedule)
    peaks = []
    for stage in range(schedule.n_stages):
        held = peak = 0
        for action in by_stage[stage]:
            held += {FORWARD: 1, BACKWARD: -1}.get(action.kind, 0)
            peak = max(peak, held)
        peaks.append(peak)
    return peaks
