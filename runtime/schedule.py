"""Pipeline schedules as data: which action each device runs, in order.

A schedule is a tuple of actions per device (``F3`` forward of microbatch 3, ``B2`` its
backward, ``S`` the optimizer step). It can be printed as a grid, checked against the stage
graph of a generated file, and simulated step by step, so that an executor only has to run the
actions it is given and knows nothing about GPipe or 1F1B.

Synchronous schedules (GPipe, 1F1B) step once, after all the backwards. Asynchronous ones
(PipeDream, stale, PipeDream-2BW, PipeOptim) cover many steps without a flush (a whole run, or
the steps between two checkpoints), step inside them, and name on each F and B the weight
version it computes with (``F5@2``: version 2, the stage's weights after 2 steps of the schedule).

Dependencies between stages come from a generated file's ``PIPELINE`` dict
(:func:`stage_dependencies`): for each stage, the earlier stages it receives values from.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace

FORWARD = "F"
BACKWARD = "B"
STEP = "S"
KINDS = (FORWARD, BACKWARD, STEP)

Dependencies = Mapping[int, AbstractSet[int]]


class ScheduleError(ValueError):
    """A schedule that cannot run as written, with the first problem named."""


@dataclass(frozen=True)
class Action:
    """One unit of work: the forward or backward of a microbatch on a stage, or a stage's step.

    ``version`` is set in asynchronous schedules only. On an F or B it is the weight version the
    compute uses (v: the stage's weights after v steps, 0 the initial ones); on an S it is the
    version the step makes (1 for a stage's first step). ``predict`` (F only, PipeOptim) asks for
    the weights predicted that many steps ahead of ``version``.

    Two actions are equal when they name the same work: the same F or B of a microbatch on a
    stage, or the same step of a stage. The weights an F or B uses annotate it and are left out,
    so ``Action("F", 1, 3)`` finds ``F3@2`` of stage 1 in a schedule or a simulation.
    """

    kind: str
    stage: int
    microbatch: int | None
    version: int | None = None
    predict: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ScheduleError(f"action kind must be one of {KINDS}, got {self.kind!r}")
        if (self.kind == STEP) != (self.microbatch is None):
            raise ScheduleError(
                f"{self.kind} on stage {self.stage}: a step has no microbatch, F and B need one"
            )
        if self.version is not None and self.version < 0:
            raise ScheduleError(f"{self}: a weight version counts steps, so it cannot be negative")
        if self.predict and (self.kind != FORWARD or self.version is None or self.predict < 0):
            raise ScheduleError(
                f"{self.kind} on stage {self.stage}: only a versioned F predicts weights, "
                f"a positive number of steps ahead (got predict={self.predict})"
            )

    def _identity(self) -> tuple[str, int, int | None, int | None]:
        """The work named: F and B by microbatch, S by the version it makes."""
        return self.kind, self.stage, self.microbatch, self.version if self.kind == STEP else None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Action):
            return NotImplemented
        return self._identity() == other._identity()

    def __hash__(self) -> int:
        return hash(self._identity())

    def __str__(self) -> str:
        if self.microbatch is None:
            return self.kind
        text = f"{self.kind}{self.microbatch}"
        if self.version is not None:
            text += f"@{self.version}"
        if self.predict:
            text += f"+{self.predict}"
        return text


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
    microbatches_per_step: int | None = None
    """None for a synchronous schedule (one step per stage, after all its backwards); k for an
    asynchronous one, where each stage steps after every k-th backward and every F and B
    names its weight version."""

    def grid(self, dependencies: Dependencies | None = None) -> str:
        """A table with one row per device, one column per step, '.' if idle; a device that
        holds several stages names the stage in each cell (``2:F3@1``: stage 2's F3).

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
        # a row per stage, or per device where devices hold several (with the stage in a cell)
        name = "stage" if len(rows) == self.n_stages else "device"
        if name == "device":
            for device, actions in enumerate(self.actions):
                for action in actions:
                    rows[device][simulation.start[action]] = f"{action.stage}:{action}"
            width = max(len(cell) for row in rows for cell in row)
        label = len(f"{name} {len(rows) - 1}")
        lines = [
            f"{f'{name} {device}':<{label}}  " + " ".join(cell.ljust(width) for cell in row)
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


def _gpipe_order(stage: int, microbatches: Sequence[int]) -> Iterator[Action]:
    """One device of GPipe: the forwards of ``microbatches``, their backwards in reverse, a step."""
    yield from (_forward(stage, i) for i in microbatches)
    yield from (_backward(stage, i) for i in reversed(microbatches))
    yield Action(STEP, stage, None)


def gpipe(n_stages: int, n_microbatches: int) -> Schedule:
    """GPipe: every forward, then every backward in reverse microbatch order, then a step."""
    _check_counts(n_stages, n_microbatches)
    every = range(n_microbatches)
    actions = tuple(tuple(_gpipe_order(stage, every)) for stage in range(n_stages))
    return Schedule("gpipe", n_stages, n_microbatches, actions)


def _one_f_one_b_order(stage: int, microbatches: Sequence[int], warmup: int) -> Iterator[Action]:
    """One device of 1F1B: ``warmup`` forwards, then one forward one backward, drain, step."""
    warmup = min(warmup, len(microbatches))
    for i in microbatches[:warmup]:
        yield _forward(stage, i)
    for ahead, behind in zip(microbatches[warmup:], microbatches):
        yield _forward(stage, ahead)
        yield _backward(stage, behind)
    for i in microbatches[len(microbatches) - warmup :]:
        yield _backward(stage, i)
    yield Action(STEP, stage, None)


def _one_f_one_b_stage(stage: int, n_stages: int, n_microbatches: int) -> Iterator[Action]:
    """Stage ``stage`` of 1F1B: p - s - 1 warm-up forwards, one forward one backward, drain."""
    return _one_f_one_b_order(stage, range(n_microbatches), n_stages - stage - 1)


def one_f_one_b(n_stages: int, n_microbatches: int) -> Schedule:
    """1F1B with a flush (PipeDream-Flush): GPipe's bubble, at most p - s microbatches held."""
    _check_counts(n_stages, n_microbatches)
    actions = tuple(
        tuple(_one_f_one_b_stage(stage, n_stages, n_microbatches)) for stage in range(n_stages)
    )
    return Schedule("1f1b", n_stages, n_microbatches, actions)


SCHEDULES: dict[str, Callable[[int, int], Schedule]] = {"gpipe": gpipe, "1f1b": one_f_one_b}

_VersionRule = Callable[[Action, int], Action]
"""Given an F or B of a stage and the stage's current version there, the versioned action."""


def _async_stage(
    stage: int, n_stages: int, n_microbatches: int, per_step: int, rule: _VersionRule
) -> tuple[Action, ...]:
    """One stage of an asynchronous schedule: 1F1B's order of computes, never flushed, with a
    step after every ``per_step``-th backward, each compute versioned by ``rule``."""
    current = 0
    actions = []
    for action in _one_f_one_b_stage(stage, n_stages, n_microbatches):
        if action.kind == STEP:
            continue
        actions.append(rule(action, current))
        if action.kind == BACKWARD and (action.microbatch + 1) % per_step == 0:
            current += 1
            actions.append(Action(STEP, stage, None, current))
    return tuple(actions)


def _async_schedule(
    name: str,
    n_stages: int,
    n_microbatches: int,
    rules: Sequence[_VersionRule],
    per_step: int = 1,
) -> Schedule:
    """An asynchronous schedule with one version rule per stage."""
    actions = tuple(
        _async_stage(stage, n_stages, n_microbatches, per_step, rules[stage])
        for stage in range(n_stages)
    )
    return Schedule(name, n_stages, n_microbatches, actions, per_step)


def _current(action: Action, current: int) -> Action:
    """Compute with the newest weights the stage has."""
    return replace(action, version=current)


def _stashed() -> _VersionRule:
    """A forward uses the newest weights; its backward uses the same version, stashed."""
    used: dict[int, int] = {}

    def rule(action: Action, current: int) -> Action:
        return replace(action, version=used.setdefault(action.microbatch, current))

    return rule


def _fixed(versions: Mapping[int, int]) -> _VersionRule:
    """Forward and backward of microbatch i use ``versions[i]``, whatever the stage has."""
    return lambda action, current: replace(action, version=versions[action.microbatch])


def _predicting(steps: int) -> _VersionRule:
    """A forward predicts the weights ``steps`` steps ahead; a backward uses the newest ones."""

    def rule(action: Action, current: int) -> Action:
        return replace(action, version=current, predict=steps if action.kind == FORWARD else 0)

    return rule


def pipedream(n_stages: int, n_microbatches: int, vertical_sync: bool = False) -> Schedule:
    """PipeDream: asynchronous 1F1B over a whole run, a step after every backward.

    Stage s runs min(p - s - 1, n) warm-up forwards, then forward, backward, step, and drains.
    A forward uses the newest weights and its backward the same version (weight stashing), so
    stage s keeps p - s versions. With ``vertical_sync`` every stage uses, for microbatch i,
    the version stage 0 used for its forward, so all stages see W(t - p + 1).
    """
    _check_counts(n_stages, n_microbatches)
    stashed = [_stashed() for _ in range(n_stages)]
    schedule = _async_schedule("pipedream", n_stages, n_microbatches, stashed)
    if not vertical_sync:
        return schedule
    first = {a.microbatch: a.version for a in schedule.actions[0] if a.kind == FORWARD}
    synced = [_fixed(first)] * n_stages
    return _async_schedule("pipedream-vs", n_stages, n_microbatches, synced)


def stale(n_stages: int, n_microbatches: int) -> Schedule:
    """PipeDream's order without stashing: forward and backward each use the weights current
    when they run, so a backward computes with newer weights than its forward saw."""
    _check_counts(n_stages, n_microbatches)
    return _async_schedule("stale", n_stages, n_microbatches, [_current] * n_stages)


def two_bw(n_stages: int, n_microbatches: int, microbatches_per_batch: int) -> Schedule:
    """PipeDream-2BW: asynchronous 1F1B, one step per batch of m microbatches per stage.

    Every microbatch of batch t (i // m == t) uses version max(0, t - 1) on every stage, so
    W(t + 1) = W(t) - lr * grad f(W(t - 1)) and each stage keeps two versions. Needs m >= p and
    a whole number of batches.
    """
    _check_counts(n_stages, n_microbatches)
    m = microbatches_per_batch
    if m < n_stages:
        raise ScheduleError(
            f"2bw keeps two weight versions, which needs at least as many microbatches per batch "
            f"as stages (m >= p); got {m} for {n_stages} stages: pass microbatches_per_batch "
            f"(--microbatches) of at least {n_stages}"
        )
    if n_microbatches % m:
        raise ScheduleError(
            f"2bw steps after every {m} microbatches, so n_microbatches must be a multiple of "
            f"{m}; got {n_microbatches}"
        )
    versions = {i: max(0, i // m - 1) for i in range(n_microbatches)}
    rules = [_fixed(versions)] * n_stages
    return _async_schedule("2bw", n_stages, n_microbatches, rules, per_step=m)


def pipeoptim(n_stages: int, n_microbatches: int) -> Schedule:
    """PipeOptim: PipeDream's order without a stash; weights are predicted instead.

    A forward on stage s uses the newest version predicted p - s - 1 steps ahead (the steps the
    stage takes before its backward in steady state; the last stage predicts nothing), and its
    backward uses the newest version. Warm-up forwards run before any step, when the optimizer
    has no direction yet, so their prediction leaves the weights as they are.
    """
    _check_counts(n_stages, n_microbatches)
    rules = [_predicting(n_stages - stage - 1) for stage in range(n_stages)]
    return _async_schedule("pipeoptim", n_stages, n_microbatches, rules)


def wpipe(n_stages: int, n_microbatches: int, microbatches_per_batch: int) -> Schedule:
    """WPipe: 2p stages in two groups on p devices; device d runs stage d (group 1) and stage
    p + d (group 2), so a microbatch crosses the devices twice.

    No flush: every stage steps once per batch of m microbatches, the groups alternately as
    their batches complete. Group 2 computes batch t with version t, the newest (one version
    kept); group 1 with version max(0, t - 1), as in PipeDream-2BW (two versions kept), which
    lets group 1 run the forwards of batch t + 1 before group 2 has finished the backwards of
    batch t. Each device's order comes from a lockstep list scheduling of the 2p-stage chain:
    at every step a device runs, among the actions it may run (inputs there, weights made), a
    step first, then the oldest microbatch's backward, then the oldest forward.
    """
    _check_counts(n_stages, n_microbatches)
    m = microbatches_per_batch
    if n_stages % 2:
        raise ScheduleError(
            f"wpipe runs two stages on every device, so it needs an even number of stages; got "
            f"{n_stages}: partition with --schedule wpipe"
        )
    if n_microbatches % m:
        raise ScheduleError(
            f"wpipe steps after every {m} microbatches, so n_microbatches must be a multiple of "
            f"{m}; got {n_microbatches}"
        )
    devices = n_stages // 2

    def version(stage: int, microbatch: int) -> int:
        batch = microbatch // m
        return max(0, batch - 1) if stage < devices else batch

    actions = _list_schedule(n_stages, devices, n_microbatches, m, version)
    return Schedule("wpipe", n_stages, n_microbatches, actions, m)


def _list_schedule(
    n_stages: int,
    devices: int,
    n_microbatches: int,
    per_step: int,
    version: Callable[[int, int], int],
) -> tuple[tuple[Action, ...], ...]:
    """Each device's actions, found by running the chain of ``n_stages`` stages, stage s on
    device s % ``devices``, in lockstep: an F waits for the previous stage's F and for its
    stage to have made ``version(stage, microbatch)``, a B for the next stage's B (and its own
    F), and a stage steps once it has run the backwards of a whole batch of ``per_step``."""
    done: set[tuple[str, int, int]] = set()
    steps = [0] * n_stages
    backwards = [0] * n_stages
    next_forward = [0] * n_stages
    pending_backward: list[set[int]] = [set() for _ in range(n_stages)]
    orders: list[list[Action]] = [[] for _ in range(devices)]
    remaining = 2 * n_stages * n_microbatches
    while remaining:
        chosen: list[tuple[int, Action]] = []
        for device in range(devices):
            options = []
            for stage in range(device, n_stages, devices):
                if backwards[stage] >= (steps[stage] + 1) * per_step:
                    options.append((0, 0, Action(STEP, stage, None, steps[stage] + 1)))
                for k in sorted(pending_backward[stage]):
                    after = stage == n_stages - 1 or (BACKWARD, stage + 1, k) in done
                    if after:
                        options.append((1, k, _backward(stage, k)))
                        break
                k = next_forward[stage]
                if k < n_microbatches and steps[stage] >= version(stage, k):
                    if stage == 0 or (FORWARD, stage - 1, k) in done:
                        options.append((2, k, _forward(stage, k)))
            if options:
                chosen.append((device, min(options, key=lambda o: (o[0], o[1], -o[2].stage))[2]))
        if not chosen:
            raise ScheduleError("the list scheduling of the stages got stuck")
        for device, action in chosen:
            stage, k = action.stage, action.microbatch
            if action.kind == STEP:
                steps[stage] += 1
                orders[device].append(action)
                continue
            orders[device].append(replace(action, version=version(stage, k)))
            done.add((action.kind, stage, k))
            remaining -= 1
            if action.kind == FORWARD:
                next_forward[stage] += 1
                pending_backward[stage].add(k)
            else:
                pending_backward[stage].discard(k)
                backwards[stage] += 1
    for stage in range(n_stages):
        if backwards[stage] > steps[stage] * per_step:
            orders[stage % devices].append(Action(STEP, stage, None, steps[stage] + 1))
            steps[stage] += 1
    return tuple(tuple(order) for order in orders)


ASYNC_SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "pipedream": pipedream,
    "stale": stale,
    "2bw": two_bw,
    "pipeoptim": pipeoptim,
    "wpipe": wpipe,
}
"""Asynchronous schedules, generated for a whole run; ``2bw`` also takes the microbatches per
batch and ``pipedream`` takes ``vertical_sync``. Kept apart from :data:`SCHEDULES`, whose
schedules cover one batch: :func:`build_schedule` makes either kind for a run."""

SCHEDULE_NAMES: tuple[str, ...] = (*SCHEDULES, *ASYNC_SCHEDULES)
"""Every schedule a run can use: the synchronous ones, then the asynchronous ones."""


def build_schedule(
    name: str, n_stages: int, microbatches: int, steps: int = 1, vertical_sync: bool = False
) -> Schedule:
    """The schedule ``name`` for a run of ``steps`` batches of ``microbatches`` microbatches.

    A synchronous schedule covers one batch and is run again for every step. An asynchronous
    one covers the whole run without a flush: ``steps * microbatches`` microbatches, microbatch
    k being part ``k % microbatches`` of step ``k // microbatches``'s batch. ``vertical_sync``
    is PipeDream's option and an error with any other schedule.
    """
    if name not in SCHEDULE_NAMES:
        raise ScheduleError(f"unknown schedule {name!r}; choose from {', '.join(SCHEDULE_NAMES)}")
    if vertical_sync and name != "pipedream":
        raise ScheduleError(f"vertical sync is an option of pipedream, not of {name}")
    if name in SCHEDULES:
        return SCHEDULES[name](n_stages, microbatches)
    _check_counts(n_stages, microbatches)
    n = steps * microbatches
    if name == "pipedream":
        return pipedream(n_stages, n, vertical_sync)
    if name == "2bw":
        return two_bw(n_stages, n, microbatches)
    if name == "wpipe":
        return wpipe(n_stages, n, microbatches)
    return ASYNC_SCHEDULES[name](n_stages, n)


def optimizer_steps(schedule: Schedule, steps: int) -> int:
    """How many optimizer steps each stage takes in a run of ``steps`` batches: one per batch
    for a synchronous schedule, one per ``microbatches_per_step`` microbatches otherwise."""
    if schedule.microbatches_per_step is None:
        return steps
    return schedule.n_microbatches // schedule.microbatches_per_step


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
    backwards: Sequence[Action] | None = None,
) -> list[Action]:
    """The actions, on any stage, that must finish before ``action`` may start.

    A step waits for the backwards whose gradients it applies: ``backwards``, those of its stage
    run on its device since that stage's previous step, or every microbatch's when not given
    (the one step of a synchronous schedule).
    """
    stage, i = action.stage, action.microbatch
    if action.kind == FORWARD:
        return [_forward(t, i) for t in sorted(producers.get(stage, ()))]
    if action.kind == BACKWARD:
        return [_forward(stage, i), *(_backward(c, i) for c in sorted(consumers[stage]))]
    if backwards is not None:
        return list(backwards)
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


def _check_each_once(stage: int, actions: Sequence[Action], expected: Sequence[Action]) -> None:
    """A stage must run each expected action exactly once."""
    counts = Counter(actions)
    for expected_action in expected:
        count = counts[expected_action]
        if count == 0:
            raise ScheduleError(f"stage {stage} never runs {expected_action}")
        if count > 1:
            raise ScheduleError(f"stage {stage} runs {expected_action} {count} times")


def _check_complete(stage: int, actions: Sequence[Action], n_microbatches: int) -> None:
    """A stage must run each of its actions exactly once."""
    _check_each_once(stage, actions, _expected_actions(stage, n_microbatches))


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
    """Name the first device that cannot go on, what it waits for, and why that never runs.

    A step is never the one stuck: the backwards it waits for ran before it on its device.
    Where every device could go on but for a collective, say so.
    """
    for actions in remaining:
        if not actions or actions[0].kind == STEP:
            continue
        action = actions[0]
        needed = _prerequisites(action, producers, consumers, n_microbatches)
        missing = next((a for a in needed if a not in done), None)
        if missing is not None:
            break
    else:
        heads = ", ".join(f"device {d} at {a[0]}" for d, a in enumerate(remaining) if a)
        return f"deadlock at step {step}: replicas wait for each other's all-reduce ({heads})"
    holder = next((d for d, actions in enumerate(remaining) if missing in actions), None)
    if holder is None:
        reason = "it is not in the schedule"
    else:
        reason = f"device {holder} is stuck at {remaining[holder][0]}"
    return (
        f"deadlock at step {step}: stage {action.stage} waits for {missing} on stage "
        f"{missing.stage}, which never runs ({reason})"
    )


def simulate(
    schedule: Schedule,
    dependencies: Dependencies,
    collectives: Mapping[tuple[int, int], Hashable] | None = None,
) -> Simulation:
    """Run the schedule in lockstep, one action per device per step.

    A device runs its next action once every action it depends on, on any stage, finished in an
    earlier step; otherwise it idles. A step depends on the backwards of its stage run on its
    device since that stage's previous step. ``collectives`` marks actions that also wait for
    each other, as replicas all-reducing their gradients do: it maps (device, position in its
    list) to a key, and the actions sharing a key run together, once each of them could run.
    Raises :class:`ScheduleError` if no device can move.
    """
    _check_dependencies(dependencies, schedule.n_stages)
    consumers = _consumers(dependencies, schedule.n_stages)
    m = schedule.n_microbatches
    together = _collective_members(collectives or {})
    position = [0] * len(schedule.actions)
    since_step: list[dict[int, list[Action]]] = [{} for _ in schedule.actions]
    start: dict[Action, int] = {}
    step = 0

    def needs(device: int, action: Action) -> list[Action]:
        backwards = since_step[device].get(action.stage, [])
        return _prerequisites(action, dependencies, consumers, m, backwards)

    while any(pos < len(acts) for pos, acts in zip(position, schedule.actions)):
        waiting = {
            device: acts[pos]
            for device, (pos, acts) in enumerate(zip(position, schedule.actions))
            if pos < len(acts)
        }
        able = {
            device
            for device, action in waiting.items()
            if all(a in start for a in needs(device, action))
        }
        ready = [
            (device, waiting[device])
            for device in sorted(able)
            if all(
                member in able and position[member] == at
                for member, at in together.get(
                    (collectives or {}).get((device, position[device])), ()
                )
            )
        ]
        if not ready:
            remaining = [acts[pos:] for pos, acts in zip(position, schedule.actions)]
            message = _deadlock_message(step, remaining, start, dependencies, consumers, m)
            raise ScheduleError(message)
        for device, action in ready:
            start[action] = step
            position[device] += 1
            _track_backwards(since_step[device], action)
        step += 1
    return Simulation(step, start)


def _collective_members(
    collectives: Mapping[tuple[int, int], Hashable],
) -> dict[Hashable, list[tuple[int, int]]]:
    """Each collective's members: the (device, position) of every action sharing its key."""
    members: dict[Hashable, list[tuple[int, int]]] = {}
    for place, key in collectives.items():
        members.setdefault(key, []).append(place)
    return members


def _track_backwards(since_step: dict[int, list[Action]], action: Action) -> None:
    """Keep, per stage, the backwards run since its last step: what its next step applies."""
    if action.kind == BACKWARD:
        since_step.setdefault(action.stage, []).append(action)
    elif action.kind == STEP:
        since_step.pop(action.stage, None)


def _check_steps_per_run(schedule: Schedule) -> None:
    """An asynchronous run must be a whole number of steps of at least one microbatch."""
    per_step, n = schedule.microbatches_per_step, schedule.n_microbatches
    if per_step < 1 or n % per_step:
        raise ScheduleError(
            f"{schedule.name}: {n} microbatches cannot be cut into steps of {per_step}; "
            "microbatches_per_step must be positive and divide n_microbatches"
        )


def _check_versioned(stage: int, action: Action, steps: int) -> None:
    """An F or B of an asynchronous schedule names a version the stage already made."""
    if action.version is None:
        raise ScheduleError(
            f"stage {stage}: {action} names no weight version; every F and B of an "
            "asynchronous schedule must"
        )
    if action.version > steps:
        raise ScheduleError(
            f"stage {stage}: {action} uses version {action.version}, but only {steps} steps ran "
            "before it on that stage: a compute cannot use weights from the future"
        )


def _check_step(stage: int, action: Action, steps: int, backwards: int, per_step: int) -> None:
    """The n-th step of a stage makes version n and comes after exactly n * per_step backwards."""
    if action.version != steps:
        raise ScheduleError(
            f"stage {stage}: its step {steps} is marked as making version {action.version}; "
            "a stage's steps make versions 1, 2, ... in order"
        )
    if backwards != steps * per_step:
        raise ScheduleError(
            f"stage {stage}: step {steps} comes after {backwards} backwards, but the schedule "
            f"steps after every {per_step}"
        )


def _check_async_stage(stage: int, actions: Sequence[Action], schedule: Schedule) -> None:
    """One stage of an asynchronous schedule: complete, each F before its B, steps where the
    schedule says, and no compute using a version its stage has not made yet."""
    n, per_step = schedule.n_microbatches, schedule.microbatches_per_step
    computes = [a for a in actions if a.kind != STEP]
    expected = [_forward(stage, i) for i in range(n)] + [_backward(stage, i) for i in range(n)]
    _check_each_once(stage, computes, expected)
    forwards: set[int] = set()
    steps = backwards = 0
    for action in actions:
        if action.kind == STEP:
            steps += 1
            _check_step(stage, action, steps, backwards, per_step)
            continue
        _check_versioned(stage, action, steps)
        if action.kind == FORWARD:
            forwards.add(action.microbatch)
            continue
        if action.microbatch not in forwards:
            forward = computes[computes.index(_forward(stage, action.microbatch))]
            raise ScheduleError(f"stage {stage}: {action} comes before {forward}")
        backwards += 1
    if steps != n // per_step:
        raise ScheduleError(
            f"stage {stage} runs {steps} steps, but {n} microbatches at {per_step} per step "
            f"make {n // per_step}"
        )


def validate(schedule: Schedule, dependencies: Dependencies) -> Simulation:
    """Check that a schedule is complete, ordered and free of deadlock.

    Every stage must run one F and one B per microbatch, each F before its B. A synchronous
    schedule has one S per stage, last. An asynchronous one has an S after every
    ``microbatches_per_step``-th backward of a stage, and each F and B uses a version its
    stage already made. Then the lockstep simulation must finish. Returns that simulation;
    raises :class:`ScheduleError` naming the first problem found.
    """
    _check_ranges(schedule)
    if schedule.microbatches_per_step is not None:
        _check_steps_per_run(schedule)
    for stage, actions in _actions_by_stage(schedule).items():
        if schedule.microbatches_per_step is None:
            _check_complete(stage, actions, schedule.n_microbatches)
            _check_order(stage, actions)
        else:
            _check_async_stage(stage, actions, schedule)
    return simulate(schedule, dependencies)


def last_backwards(actions: Sequence[Action]) -> list[int]:
    """Positions, in one device's action list, of the last backward before each step: where a
    stage's replicas sum their gradients."""
    found, last = [], None
    for position, action in enumerate(actions):
        if action.kind == BACKWARD:
            last = position
        elif action.kind == STEP and last is not None:
            found.append(last)
            last = None
    return found


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


def _held_spans(actions: Sequence[Action]) -> list[tuple[int, int]]:
    """For each version a stage makes, the positions in its action list over which it is held.

    Version v is held from the step that makes it (the start, for version 0) while it is the
    current one, and beyond that until the last F or B that uses it: a version a later compute
    needs must be kept from when it is made, even if nothing uses it for a while.
    """
    made = [0]
    last_use: dict[int, int] = {}
    for index, action in enumerate(actions):
        if action.kind == STEP:
            made.append(index)
        elif action.version is not None:
            last_use[action.version] = index
    ends = [later - 1 for later in made[1:]] + [len(actions) - 1]
    return [
        (begin, max(end, last_use.get(version, end)))
        for version, (begin, end) in enumerate(zip(made, ends))
    ]


def weight_versions(schedule: Schedule) -> list[int]:
    """Per stage, the most weight versions it must hold at once: the current one and every
    older one that a later F or B still uses (held from the step that made it).

    p - s for PipeDream on stage s, 2 for PipeDream-2BW, 1 for a synchronous schedule, for
    stale and for PipeOptim. PipeOptim stores one version but, on stages that predict, needs one
    more buffer for the predicted weights while a forward runs; that buffer is not counted here.
    """
    by_stage = _actions_by_stage(schedule)
    counts = []
    for stage in range(schedule.n_stages):
        actions = by_stage[stage]
        change = [0] * (len(actions) + 1)
        for begin, end in _held_spans(actions):
            change[begin] += 1
            change[end + 1] -= 1
        held = peak = 0
        for delta in change:
            held += delta
            peak = max(peak, held)
        counts.append(max(peak, 1))
    return counts
