"""Simulate a schedule with real costs: when each action starts and ends, and what it holds.

:func:`runtime.schedule.simulate` runs a schedule in lockstep, every action one unit of time.
Here each action takes its stage's forward, backward or step time, and a value sent between
stages arrives after its transfer time, so the result predicts a batch's time, each device's
idle share (the bubble) and the activations each stage holds. Every device runs its actions in
the order given; an action starts once its device is free and everything it needs has arrived.

Costs come from a generated file (:func:`costs_from_pipeline`), or from anywhere as lists. The
timeline can be drawn (:func:`draw_timeline`) or written as a Chrome / Perfetto trace
(:func:`chrome_trace`), in the same format a measured run's records use.

``python -m runtime.simulate --model generated_models/X.py --schedule 1f1b --microbatches 8``
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from runtime.cli import OneLineParser, fail
from runtime.comm import carries_gradient, transfers, value_specs
from runtime.executor import microbatch_sizes
from runtime.layout import check_wpipe, make_layout
from runtime.schedule import (
    BACKWARD,
    FORWARD,
    SCHEDULE_NAMES,
    STEP,
    Action,
    Dependencies,
    Schedule,
    ScheduleError,
    _check_dependencies,
    _consumers,
    _prerequisites,
    build_schedule,
    stage_dependencies,
    weight_versions,
)
from runtime.stage import RuntimeConfigError, load_generated

PROG = "runtime.simulate"
DEFAULT_BANDWIDTH_GBPS = 12.0
"""The compiler's default link bandwidth (``--bw`` of ``autopipe.partition``)."""
BANDWIDTH_KEY = "bandwidth_gbps"
"""Where a generated file may record the bandwidth its costs assume: PIPELINE or a costs entry."""
GRID_MAX_MICROBATCHES = 16
KIND_NAMES = {FORWARD: "forward", BACKWARD: "backward", STEP: "step"}
KIND_COLOURS = {"forward": "#4c72b0", "backward": "#dd8452", "step": "#55a868"}
_MB = 1e6

CommFunction = Callable[[int, int, str], float]
CommCosts = CommFunction | Mapping[tuple[int, int], float] | Sequence[float] | float
"""Transfer times in ms for one microbatch, in one of four forms:

- ``comm(src, dst, kind)``: a value (kind ``F``) or a gradient (``B``) from ``src`` to ``dst``;
- ``{(src, dst): ms}``: per directed link (a gradient from c back to s is ``(c, s)``), else 0;
- ``[ms per stage]``: entry s is the time to move stage s's outputs over a link, either way;
- one number for every transfer.
"""
Key = tuple[Action, int]
"""An action and its occurrence: the k-th ``F3`` of a stage is ``(F3, k)``."""
Record = tuple[int, str, str, float, float]
"""What a trace is made of: (stage, action name, kind, start s, end s)."""


class SimulationError(ValueError):
    """Costs that cannot be simulated: a missing stage, a negative time, a file with no costs."""


@dataclass(frozen=True)
class TimedAction:
    """One action of the simulation: which device ran it, and when (ms from the start)."""

    action: Action
    device: int
    start_ms: float
    end_ms: float

    @property
    def duration_ms(self) -> float:
        """How long the action ran."""
        return self.end_ms - self.start_ms


@dataclass(frozen=True)
class Timeline:
    """A simulated run of ``schedule``: every action with its device, start and end.

    ``activation_bytes`` (per stage, one microbatch's) turns microbatches in flight into bytes.
    """

    schedule: Schedule
    records: tuple[TimedAction, ...]
    activation_bytes: tuple[float, ...] | None = None

    @property
    def n_devices(self) -> int:
        """Devices in the schedule, each running its own list of actions."""
        return len(self.schedule.actions)

    @property
    def makespan_ms(self) -> float:
        """From the first action's start to the last one's end."""
        return max((r.end_ms for r in self.records), default=0.0)

    @property
    def steps(self) -> int:
        """Optimizer steps per stage: 1 for a one-batch schedule, more for asynchronous ones."""
        counts = Counter(r.action.stage for r in self.records if r.action.kind == STEP)
        return max(max(counts.values(), default=1), 1)

    @property
    def batch_ms(self) -> float:
        """Time per batch: the makespan over the steps taken (fill and drain counted once)."""
        return self.makespan_ms / self.steps

    def busy_ms(self) -> list[float]:
        """Per device, the time spent running actions."""
        busy = [0.0] * self.n_devices
        for record in self.records:
            busy[record.device] += record.duration_ms
        return busy

    def bubble_per_device(self) -> list[float]:
        """Per device, the share of the makespan it sits idle."""
        makespan = self.makespan_ms
        if makespan <= 0:
            return [0.0] * self.n_devices
        return [(makespan - busy) / makespan for busy in self.busy_ms()]

    @property
    def bubble(self) -> float:
        """The idle share of all devices together."""
        makespan = self.makespan_ms
        if makespan <= 0:
            return 0.0
        return 1.0 - sum(self.busy_ms()) / (self.n_devices * makespan)

    def peak_in_flight(self) -> list[int]:
        """Per stage, the most microbatches held at once: from a forward's start to the end of
        its backward. Freed before allocated when both happen at the same moment."""
        events: list[list[tuple[float, int]]] = [[] for _ in range(self.schedule.n_stages)]
        for record in self.records:
            if record.action.kind == FORWARD:
                events[record.action.stage].append((record.start_ms, 1))
            elif record.action.kind == BACKWARD:
                events[record.action.stage].append((record.end_ms, -1))
        return [_peak(sorted(stage_events)) for stage_events in events]

    def peak_activation_bytes(self) -> list[float] | None:
        """Per stage, the bytes of activations held at the peak, if their sizes were given."""
        if self.activation_bytes is None:
            return None
        return [n * size for n, size in zip(self.peak_in_flight(), self.activation_bytes)]

    def trace_records(self) -> list[Record]:
        """The actions as (stage, name, kind, start s, end s), the format of measured traces."""
        return [
            (r.action.stage, str(r.action), r.action.kind, r.start_ms / 1e3, r.end_ms / 1e3)
            for r in self.records
        ]


def _peak(events: Sequence[tuple[float, int]]) -> int:
    """The highest running sum of +1 / -1 events sorted by time (frees first on ties)."""
    held = peak = 0
    for _, change in events:
        held += change
        peak = max(peak, held)
    return peak


def _non_negative(value: float, name: str) -> float:
    """``value`` as a float, if it is finite and not negative."""
    value = float(value)
    if value < 0 or not math.isfinite(value):
        raise SimulationError(f"{name} must be finite and >= 0, got {value}")
    return value


def _per_stage(values: Sequence[float] | None, n_stages: int, name: str) -> list[float]:
    """A list with one non-negative figure per stage; None means zeros."""
    if values is None:
        return [0.0] * n_stages
    if len(values) != n_stages:
        raise SimulationError(f"{name} has {len(values)} entries for {n_stages} stages")
    return [_non_negative(value, f"{name}[{stage}]") for stage, value in enumerate(values)]


def comm_function(comm_ms: CommCosts, n_stages: int) -> CommFunction:
    """Turn any of the forms of :data:`CommCosts` into ``comm(src, dst, kind) -> ms``."""
    if callable(comm_ms):
        return comm_ms
    if isinstance(comm_ms, Mapping):
        links = {tuple(link): _non_negative(ms, f"comm_ms[{link}]") for link, ms in comm_ms.items()}
        return lambda src, dst, kind: links.get((src, dst), 0.0)
    if isinstance(comm_ms, (int, float)):
        uniform = _non_negative(comm_ms, "comm_ms")
        return lambda src, dst, kind: uniform
    per_stage = _per_stage(comm_ms, n_stages, "comm_ms")
    return lambda src, dst, kind: per_stage[src if kind == FORWARD else dst]


def _occurrences(schedule: Schedule) -> list[list[Key]]:
    """Each action of each device with its occurrence number, counted in device order."""
    seen: Counter[Action] = Counter()
    keys = []
    for actions in schedule.actions:
        device_keys = []
        for action in actions:
            device_keys.append((action, seen[action]))
            seen[action] += 1
        keys.append(device_keys)
    return keys


def _step_prerequisites(device_keys: Sequence[Key]) -> dict[Key, list[Key]]:
    """For each step on a device, the backwards of its stage listed since that stage's last step.

    Asynchronous schedules step many times, each after some backwards, not after all of them."""
    pending: dict[int, list[Key]] = {}
    needs: dict[Key, list[Key]] = {}
    for key in device_keys:
        action = key[0]
        if action.kind == BACKWARD:
            pending.setdefault(action.stage, []).append(key)
        elif action.kind == STEP:
            needs[key] = pending.pop(action.stage, [])
    return needs


def _prerequisite_keys(
    schedule: Schedule,
    dependencies: Dependencies,
    keys: Sequence[Sequence[Key]],
) -> dict[Key, list[Key]]:
    """What every action waits for: :func:`runtime.schedule._prerequisites` for F and B (the
    same occurrence of the same microbatch), the stage's preceding backwards for a step."""
    consumers = _consumers(dependencies, schedule.n_stages)
    needs: dict[Key, list[Key]] = {}
    for device_keys in keys:
        needs.update(_step_prerequisites(device_keys))
        for action, occurrence in device_keys:
            if action.kind != STEP:
                found = _prerequisites(action, dependencies, consumers, schedule.n_microbatches)
                needs[(action, occurrence)] = [(a, occurrence) for a in found]
    return needs


def _deadlock_message(
    keys: Sequence[Sequence[Key]],
    position: Sequence[int],
    needs: Mapping[Key, Sequence[Key]],
    end: Mapping[Key, float],
) -> str:
    """Name the first stuck device, what it waits for, and why that never comes."""
    device = next(d for d, device_keys in enumerate(keys) if position[d] < len(device_keys))
    waiting = keys[device][position[device]]
    missing = next(key for key in needs[waiting] if key not in end)
    holder = next((d for d, k in enumerate(keys) if missing in k[position[d] :]), None)
    reason = (
        "it is not in the schedule"
        if holder is None
        else f"device {holder} is stuck at {keys[holder][position[holder]][0]}"
    )
    return (
        f"deadlock: device {device} waits at {waiting[0]} for {missing[0]} on stage "
        f"{missing[0].stage}, which never runs ({reason})"
    )


def simulate_costs(
    schedule: Schedule,
    dependencies: Dependencies,
    forward_ms: Sequence[float],
    backward_ms: Sequence[float],
    comm_ms: CommCosts = 0.0,
    step_ms: Sequence[float] | None = None,
    activation_bytes: Sequence[float] | None = None,
    tied_stages: Sequence[AbstractSet[int]] = (),
    tied_ms: Sequence[float] = (),
) -> Timeline:
    """Run ``schedule`` with per-stage times for one microbatch (ms) and transfer times.

    A forward waits for its producers' forwards of the same microbatch plus the transfer, a
    backward for its own forward and its consumers' backwards plus the gradients' transfer, a
    step for the backwards of its stage before it. Transfers overlap computation (sends are
    asynchronous); only the receiver waits. Stages that hold copies of one tied weight sum its
    gradient before every step, so each group in ``tied_stages`` starts its k-th steps together,
    when the last of them gets there, and each of those steps takes the group's all-reduce,
    ``tied_ms`` (none where not given), on top of ``step_ms``. A forward that predicts weights (PipeOptim) also takes
    its stage's step time: it writes every weight once, as a step does. Raises
    :class:`ScheduleError` on a deadlock.
    """
    n = schedule.n_stages
    _check_dependencies(dependencies, n)
    durations = {
        FORWARD: _per_stage(forward_ms, n, "forward_ms"),
        BACKWARD: _per_stage(backward_ms, n, "backward_ms"),
        STEP: _per_stage(step_ms, n, "step_ms"),
    }
    reduce_ms = [0.0] * n
    for group, ms in zip(tied_stages, tied_ms):
        for stage in group:
            reduce_ms[stage] += _non_negative(ms, "tied_ms")
    held = (
        None
        if activation_bytes is None
        else tuple(_per_stage(activation_bytes, n, "activation_bytes"))
    )
    comm = comm_function(comm_ms, n)
    keys = _occurrences(schedule)
    needs = _prerequisite_keys(schedule, dependencies, keys)
    end: dict[Key, float] = {}
    position = [0] * len(keys)
    free = [0.0] * len(keys)
    timed: dict[tuple[int, int], TimedAction] = {}
    barrier = _StepBarrier(tied_stages)
    moved = True
    while moved:
        moved = False
        for device, device_keys in enumerate(keys):
            while position[device] < len(device_keys):
                key = device_keys[position[device]]
                ready = _ready_ms(key, needs[key], end, comm)
                if ready is None:
                    break
                start = barrier.start(key, max(free[device], ready))
                if start is None:
                    break
                action = key[0]
                duration = durations[action.kind][action.stage]
                if action.predict:  # PipeOptim writes predicted weights, a step's worth of work
                    duration += durations[STEP][action.stage]
                if action.kind == STEP:
                    duration += reduce_ms[action.stage]
                free[device] = end[key] = start + duration
                timed[(device, position[device])] = TimedAction(key[0], device, start, end[key])
                position[device] += 1
                moved = True
    if any(p < len(k) for p, k in zip(position, keys)):
        raise ScheduleError(_deadlock_message(keys, position, needs, end))
    return Timeline(schedule, tuple(timed[k] for k in sorted(timed)), held)


class _StepBarrier:
    """The k-th steps of stages that share a tied weight start together: each stage arrives
    when it is free and its backwards are done, and all start when the last has arrived."""

    def __init__(self, tied_stages: Sequence[AbstractSet[int]]) -> None:
        self.group_of = {stage: frozenset(group) for group in tied_stages for stage in group}
        self.arrived: dict[tuple[frozenset[int], int, int], float] = {}

    def start(self, key: Key, arrival: float) -> float | None:
        """When ``key`` may start, given it could at ``arrival``; None while its group waits."""
        action, occurrence = key
        group = self.group_of.get(action.stage)
        if action.kind != STEP or group is None:
            return arrival
        nth = occurrence + (action.version or 0)  # asynchronous steps are told apart by version
        self.arrived[(group, nth, action.stage)] = arrival
        times = [self.arrived.get((group, nth, stage)) for stage in sorted(group)]
        return None if any(t is None for t in times) else max(times)


def _ready_ms(
    key: Key, needs: Sequence[Key], end: Mapping[Key, float], comm: CommFunction
) -> float | None:
    """When everything ``key`` waits for has arrived, or None if something has not yet run."""
    ready = 0.0
    action = key[0]
    for need in needs:
        if need not in end:
            return None
        transfer = 0.0
        if need[0].stage != action.stage:
            transfer = comm(need[0].stage, action.stage, action.kind)
        ready = max(ready, end[need] + transfer)
    return ready


@dataclass(frozen=True)
class PipelineCosts:
    """A generated file's predicted costs for one microbatch, ready for :func:`simulate_costs`."""

    forward_ms: list[float]
    backward_ms: list[float]
    comm_ms: dict[tuple[int, int], float]
    """Per directed link: values forward, gradients back."""
    input_bytes: list[float]
    """Per stage, the inputs one microbatch keeps until its backward."""
    bandwidth_gbps: float
    bandwidth_source: str
    batch_size: int | None
    """The run's batch the costs are for (the file's unless another was given)."""
    tied_stages: tuple[frozenset[int], ...] = ()
    """Groups of stages holding copies of one tied weight (their steps wait for each other)."""
    tied_ms: tuple[float, ...] = ()
    """Per group, the all-reduce of its tied gradients before each step (none where the bytes
    of the tied weights were not given)."""


def value_bytes(spec: Mapping[str, Any], share: float) -> float:
    """Bytes of one microbatch's value: ``share`` of the traced value (the whole value if it
    has no batch dim)."""
    numel = math.prod(spec["shape"])
    size = numel * getattr(torch, spec["dtype"]).itemsize
    return size * share if spec.get("batch_dim") is not None else float(size)


def _recorded_bandwidth(pipeline: Mapping[str, Any]) -> float | None:
    """The link bandwidth a file says its costs assume, if it says so."""
    if BANDWIDTH_KEY in pipeline:
        return float(pipeline[BANDWIDTH_KEY])
    for stage in pipeline["stages"]:
        if BANDWIDTH_KEY in stage.get("costs", {}):
            return float(stage["costs"][BANDWIDTH_KEY])
    return None


def _choose_bandwidth(
    pipeline: Mapping[str, Any], bandwidth_gbps: float | None
) -> tuple[float, str]:
    """The bandwidth to use and where it came from: given, recorded in the file, or default."""
    recorded = _recorded_bandwidth(pipeline)
    if bandwidth_gbps is not None:
        chosen, source = float(bandwidth_gbps), "given"
    elif recorded is not None:
        chosen, source = recorded, "from the file"
    else:
        chosen, source = DEFAULT_BANDWIDTH_GBPS, "default"
    if not chosen > 0:
        raise SimulationError(f"the bandwidth must be positive, got {chosen} GB/s")
    return chosen, source


def _stage_costs(pipeline: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """Each stage's ``costs`` entry, or an error saying the file has none."""
    found = []
    for index, stage in enumerate(pipeline["stages"]):
        costs = stage.get("costs")
        if not costs or "forward_ms" not in costs or "backward_ms" not in costs:
            raise SimulationError(
                f"stage {index} of the file has no predicted costs (PIPELINE['stages'][{index}]"
                "['costs'] with forward_ms and backward_ms): write it again with autopipe.partition"
            )
        found.append(costs)
    return found


def link_messages(pipeline: Mapping[str, Any]) -> list[tuple[tuple[int, int], Mapping[str, Any]]]:
    """Each message of one microbatch as the runtime sends it, with its directed link and the
    spec of its value: every value to every stage that uses it, and a gradient back for each
    one that carries one."""
    specs = value_specs(pipeline)
    found = []
    for transfer in transfers(pipeline):
        spec = specs[transfer.name]
        found.append(((transfer.src, transfer.dst), spec))
        if carries_gradient(spec):
            found.append(((transfer.dst, transfer.src), spec))
    return found


def _link_bytes(pipeline: Mapping[str, Any], share: float) -> dict[tuple[int, int], float]:
    """Bytes per microbatch on each directed link (``link_messages``)."""
    links: dict[tuple[int, int], float] = {}
    for link, spec in link_messages(pipeline):
        links[link] = links.get(link, 0.0) + value_bytes(spec, share)
    return links


def microbatch_share(
    pipeline: Mapping[str, Any], microbatches: int, batch_size: int | None = None
) -> float:
    """One microbatch's size over the batch the file was traced and profiled at: a run of
    ``batch_size`` samples (default: the file's batch) cut into ``microbatches``."""
    if microbatches < 1:
        raise SimulationError(f"microbatches must be at least 1, got {microbatches}")
    traced = pipeline.get("batch_size")
    if batch_size is None or batch_size == traced:
        return 1.0 / microbatches
    if batch_size < microbatches:
        raise SimulationError(f"a batch of {batch_size} cannot make {microbatches} microbatches")
    if not traced:
        raise SimulationError(
            "the file does not record the batch size it was profiled at, so its costs cannot "
            f"be scaled to a batch of {batch_size}: leave the batch size out"
        )
    return batch_size / microbatches / traced


def costs_from_pipeline(
    pipeline: Mapping[str, Any],
    bandwidth_gbps: float | None = None,
    microbatches: int = 1,
    batch_size: int | None = None,
    tied_bytes: Mapping[tuple[int, str], int] | None = None,
) -> PipelineCosts:
    """Per-microbatch costs from a generated file's ``PIPELINE``: the stage times recorded in
    ``costs`` (for the batch the file was traced at) scaled to one microbatch of a run of
    ``batch_size`` samples (default: the file's batch) in ``microbatches``, and each link's
    bytes (from the value specs) over the bandwidth: ``bandwidth_gbps`` if given, else the one
    the file records, else the compiler's default, 12 GB/s.

    The scaling is linear in the samples. Small kernels on a CPU are not (fixed costs per
    operation weigh more in a small batch), so the closest prediction comes from a file
    profiled at the microbatch size itself (``-b`` of ``autopipe.partition`` = batch / m),
    where the share is 1 and the profile is used as measured.

    With ``tied_bytes`` (``tied_parameter_bytes``), each group of stages sharing tied weights
    also gets the time of a ring all-reduce of one copy of each, 2 (k - 1) / k of its bytes
    over the bandwidth for k stages, as the runtime sums tied gradients before every step.
    """
    share = microbatch_share(pipeline, microbatches, batch_size)
    costs = _stage_costs(pipeline)
    bandwidth, source = _choose_bandwidth(pipeline, bandwidth_gbps)
    links = _link_bytes(pipeline, share)
    specs = value_specs(pipeline)
    return PipelineCosts(
        forward_ms=[c["forward_ms"] * share for c in costs],
        backward_ms=[c["backward_ms"] * share for c in costs],
        comm_ms={link: nbytes / (bandwidth * 1e6) for link, nbytes in links.items()},
        input_bytes=[
            sum(value_bytes(specs[name], share) for name in stage["inputs"])
            for stage in pipeline["stages"]
        ],
        bandwidth_gbps=bandwidth,
        bandwidth_source=source,
        batch_size=pipeline.get("batch_size") if batch_size is None else batch_size,
        tied_stages=tied_stage_groups(pipeline),
        tied_ms=() if tied_bytes is None else _tied_reduce_ms(pipeline, tied_bytes, bandwidth),
    )


def tied_parameter_bytes(generated: Any) -> dict[tuple[int, str], int]:
    """Bytes of every copy of a tied weight that ``PIPELINE["tied_parameters"]`` names, read
    off the generated file's stages built on the meta device (no memory, no compute)."""
    wanted: dict[int, set[str]] = {}
    for members in generated.PIPELINE.get("tied_parameters", []):
        for stage, name in members:
            wanted.setdefault(stage, set()).add(name)
    found = {}
    for stage, names in sorted(wanted.items()):
        with torch.device("meta"):
            parameters = dict(generated.build_stage(stage).named_parameters(remove_duplicate=False))
        for name in sorted(names):
            found[(stage, name)] = parameters[name].numel() * parameters[name].element_size()
    return found


def _tied_reduce_ms(
    pipeline: Mapping[str, Any], tied_bytes: Mapping[tuple[int, str], int], bandwidth: float
) -> tuple[float, ...]:
    """Per group of ``tied_stage_groups``, a ring all-reduce of one copy of each of its tied
    weights over ``bandwidth`` GB/s."""
    total: dict[frozenset[int], float] = {}
    for members in pipeline.get("tied_parameters", []):
        group = frozenset(stage for stage, _ in members)
        total[group] = total.get(group, 0.0) + max(tied_bytes[tuple(m)] for m in members)
    return tuple(
        2 * (len(group) - 1) / len(group) * total[group] / (bandwidth * 1e6)
        for group in tied_stage_groups(pipeline)
    )


def tied_stage_groups(pipeline: Mapping[str, Any]) -> tuple[frozenset[int], ...]:
    """The stages of each tied weight held by more than one stage, from ``PIPELINE``."""
    groups = {
        frozenset(stage for stage, _ in members) for members in pipeline.get("tied_parameters", [])
    }
    return tuple(sorted((g for g in groups if len(g) > 1), key=sorted))


def _as_record(item: Any) -> tuple[Record, float]:
    """A trace record from a tuple or from anything with stage, name, kind, start and end, and
    the seconds it waited for messages (a measured record's ``waited``, else 0)."""
    if isinstance(item, tuple):
        stage, name, kind, start, end = item[:5]
        waited = item[5] if len(item) > 5 else 0.0
    else:
        stage, name, kind, start, end = item.stage, item.name, item.kind, item.start, item.end
        waited = getattr(item, "waited", 0.0)
    record = int(stage), str(name), KIND_NAMES.get(kind, kind), float(start), float(end)
    return record, float(waited)


@dataclass(frozen=True)
class MeasuredCosts:
    """What each stage's actions took in a measured run (the runtime's ``--trace``), on
    average over the run after its warm-up: a forward, a backward and a step, each less its
    waits for messages (``waited_ms``) and with the runtime's own time before it on its rank
    added (posting the next receives, the loop, a step's bookkeeping), since the simulator
    charges a stage only for its actions."""

    forward_ms: list[float]
    backward_ms: list[float]
    step_ms: list[float]
    between_ms: list[float]
    """The runtime's mean time before an action of the stage (already in the three above)."""
    microbatch_size: int | None
    """Samples in the run's (largest) microbatch; None for a trace that does not say."""


def event_stage(event: Mapping[str, Any], stage_of_rank: Sequence[int] | None) -> int:
    """The stage of a measured action: named where its rank runs several ("2:F3@1"), else
    the stage its rank (``tid``) runs."""
    stage, colon, _ = str(event["name"]).partition(":")
    if colon:
        return int(stage)
    rank = int(event["tid"])
    return stage_of_rank[rank] if stage_of_rank is not None else rank


def measured_costs(
    trace: Mapping[str, Any],
    n_stages: int,
    warmup: float = 0.2,
    stage_of_rank: Sequence[int] | None = None,
) -> MeasuredCosts:
    """Each stage's costs as the run that wrote ``trace`` (a runtime ``--trace``) met them,
    leaving out the first ``warmup`` of each rank's actions; ``stage_of_rank`` maps a rank to
    its stage where ranks are not stages (replicas)."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    if not events:
        raise SimulationError("the trace holds no actions: pass a trace the runtime wrote")
    computed: dict[tuple[int, str], list[float]] = {}
    between: dict[int, list[float]] = {}
    for rank in sorted({e["tid"] for e in events}):
        mine = sorted((e for e in events if e["tid"] == rank), key=lambda e: e["ts"])
        # the first action has no time before it to count
        for index in range(max(int(len(mine) * warmup), 1), len(mine)):
            before, event = mine[index - 1], mine[index]
            stage = event_stage(event, stage_of_rank)
            waited = event.get("args", {}).get("waited_ms", 0.0)
            gap = (event["ts"] - before["ts"] - before["dur"]) / 1e3
            computed.setdefault((stage, event["cat"]), []).append(event["dur"] / 1e3 - waited)
            between.setdefault(stage, []).append(gap)
    stages = sorted({stage for stage, _ in computed})
    if stages != list(range(n_stages)) or any(
        (stage, kind) not in computed for stage in stages for kind in ("forward", "backward")
    ):
        raise SimulationError(
            f"the trace's actions are of stages {stages}, not of this file's {n_stages} stages "
            "with a forward and a backward each: pass a trace of a run of this file"
        )
    mean_between = [statistics.mean(between[stage]) for stage in range(n_stages)]

    def charged(stage: int, kind: str) -> float:
        found = computed.get((stage, kind))
        return statistics.mean(found) + mean_between[stage] if found else 0.0

    size = trace.get("otherData", {}).get("microbatch_size")
    return MeasuredCosts(
        *(
            [charged(stage, kind) for stage in range(n_stages)]
            for kind in ("forward", "backward", "step")
        ),
        mean_between,
        None if size is None else int(size),
    )


def chrome_trace(
    source: Timeline | Iterable[Any], pid: int = 0, label: str | None = None
) -> dict[str, Any]:
    """A Chrome / Perfetto trace (``chrome://tracing``, ui.perfetto.dev) of a timeline or of
    records (stage, name, kind, start s, end s), such as a measured run's: one complete event per
    action, ``pid`` for the run, one thread per stage, times in µs from the earliest start. A
    record that waited for messages (a measured one's ``waited`` seconds, or a sixth entry)
    says how long in its event's ``args``, as ``waited_ms``."""
    items = source.trace_records() if isinstance(source, Timeline) else source
    pairs = [_as_record(item) for item in items]
    records = [record for record, _ in pairs]
    origin = min((r[3] for r in records), default=0.0)
    events: list[dict[str, Any]] = []
    if label is not None:
        events.append(_metadata("process_name", pid, 0, label))
    for stage in sorted({r[0] for r in records}):
        events.append(_metadata("thread_name", pid, stage, f"stage {stage}"))
        events.append(_metadata("thread_sort_index", pid, stage, stage))
    for (stage, name, kind, start, end), waited in pairs:
        event = {
            "name": name,
            "cat": kind,
            "ph": "X",
            "ts": round((start - origin) * 1e6, 3),
            "dur": round((end - start) * 1e6, 3),
            "pid": pid,
            "tid": stage,
        }
        if waited > 0:
            event["args"] = {"waited_ms": round(waited * 1e3, 3)}
        events.append(event)
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def _metadata(name: str, pid: int, tid: int, value: str | int) -> dict[str, Any]:
    """A metadata event: names or orders a process or thread in the trace viewer."""
    key = "sort_index" if name.endswith("sort_index") else "name"
    return {"name": name, "ph": "M", "pid": pid, "tid": tid, "args": {key: value}}


def format_ms(ms: float) -> str:
    """Two decimals, or three significant digits for times under 0.1 ms (small models)."""
    return f"{ms:.2f}" if ms >= 0.1 or ms == 0 else f"{ms:.3g}"


def timeline_title(timeline: Timeline) -> str:
    """Schedule, p, m and time per batch: the picture's title and the trace's process name."""
    schedule = timeline.schedule
    return (
        f"{schedule.name}: p = {schedule.n_stages}, m = {schedule.n_microbatches}, "
        f"{format_ms(timeline.batch_ms)} ms per {_unit(timeline)}"
    )


def _unit(timeline: Timeline) -> str:
    """What the time per batch is per: the batch, or each of an asynchronous run's steps."""
    return "batch" if timeline.steps == 1 else "step"


def draw_timeline(timeline: Timeline, path: str | Path) -> None:
    """Draw the timeline to a .png or .svg file: a row per device, a box per action coloured by
    kind and labelled with its microbatch, time in ms across. Uses matplotlib's Agg canvas,
    without touching pyplot's global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    longest = max((len(actions) for actions in timeline.schedule.actions), default=1)
    figure = Figure(figsize=(min(max(8.0, 0.3 * longest), 30.0), 1.2 + 0.5 * timeline.n_devices))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    _draw_boxes(axes, timeline)
    axes.set_yticks(range(timeline.n_devices))
    axes.set_yticklabels([_device_label(timeline, d) for d in range(timeline.n_devices)])
    axes.set_ylim(timeline.n_devices - 0.5, -0.5)
    axes.set_xlim(0, timeline.makespan_ms or 1.0)
    axes.set_xlabel("time (ms)")
    axes.set_title(timeline_title(timeline))
    handles = [Patch(color=colour, label=kind) for kind, colour in KIND_COLOURS.items()]
    axes.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    figure.tight_layout()
    figure.savefig(path)


def _device_label(timeline: Timeline, device: int) -> str:
    """A row's name: the stages its device runs."""
    stages = sorted({action.stage for action in timeline.schedule.actions[device]})
    return ", ".join(f"stage {s}" for s in stages) or f"device {device}"


def _draw_boxes(axes: Any, timeline: Timeline) -> None:
    """One box per action; labelled with the microbatch where the box is wide enough."""
    narrowest_label = timeline.makespan_ms / 120
    for record in timeline.records:
        kind = KIND_NAMES[record.action.kind]
        axes.barh(
            record.device,
            record.duration_ms,
            left=record.start_ms,
            height=0.8,
            color=KIND_COLOURS[kind],
            edgecolor="white",
            linewidth=0.5,
        )
        if record.duration_ms >= narrowest_label:
            microbatch = record.action.microbatch
            axes.text(
                record.start_ms + record.duration_ms / 2,
                record.device,
                "S" if microbatch is None else str(microbatch),
                ha="center",
                va="center",
                fontsize=7,
                color="white",
            )


def build_parser() -> argparse.ArgumentParser:
    """The command's flags; ``--schedule`` offers every schedule in SCHEDULE_NAMES."""
    parser = OneLineParser(
        prog=PROG,
        description="Predict a schedule's time per batch, bubble and memory from a generated "
        "file's costs.",
    )
    parser.add_argument("--model", required=True, help="generated file (generated_models/X.py)")
    parser.add_argument("--schedule", default="1f1b", choices=sorted(SCHEDULE_NAMES))
    parser.add_argument("--microbatches", type=int, default=4, help="microbatches per batch")
    parser.add_argument(
        "--batch_size",
        type=int,
        default=None,
        help="the run's batch size: the file's costs are scaled from the batch it was profiled "
        "at to one microbatch of this one (default: the file's)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=4,
        help="batches an asynchronous schedule runs without a flush (default 4); a synchronous "
        "one is simulated for one batch",
    )
    parser.add_argument(
        "--bw",
        type=float,
        default=None,
        help="link bandwidth in GB/s (default: the file's, else 12 as the compiler's)",
    )
    parser.add_argument(
        "--costs_from",
        metavar="TRACE",
        help="take each stage's forward, backward and step from a measured run of this file "
        "(the runtime's --trace, any schedule) instead of its profile: what its actions "
        "computed, less their waits, plus the runtime's time between them; links stay priced",
    )
    parser.add_argument("--timeline", help="draw the timeline to this .png or .svg file")
    parser.add_argument("--trace", help="write a Chrome / Perfetto trace to this .json file")
    return parser


def _check_args(args: argparse.Namespace) -> None:
    """Reject bad flags before any work is done."""
    for flag in ("microbatches", "steps"):
        if getattr(args, flag) < 1:
            raise SimulationError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.batch_size is not None and args.batch_size < 1:
        raise SimulationError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.bw is not None and not args.bw > 0:
        raise SimulationError(f"--bw must be positive, got {args.bw}")
    if args.timeline and Path(args.timeline).suffix not in (".png", ".svg"):
        raise SimulationError(f"--timeline must name a .png or .svg file, got {args.timeline!r}")
    if args.costs_from and not Path(args.costs_from).is_file():
        raise SimulationError(f"no trace {args.costs_from!r} (--costs_from)")
    for output in filter(None, (args.timeline, args.trace)):
        if not Path(output).parent.is_dir():
            raise SimulationError(f"no folder {str(Path(output).parent)!r} to write {output!r} in")


def report(
    timeline: Timeline, costs: PipelineCosts, dependencies: Dependencies, microbatches: int
) -> str:
    """The figures the command prints: time, throughput, bubble, per-stage table, grid."""
    schedule = timeline.schedule
    lines = [
        f"schedule {schedule.name}, p = {schedule.n_stages}, m = {microbatches}, "
        f"links {costs.bandwidth_gbps:g} GB/s ({costs.bandwidth_source})",
        f"predicted time per {_unit(timeline)}: {format_ms(timeline.batch_ms)} ms"
        + _steps(timeline)
        + _throughput(timeline, costs.batch_size, microbatches),
        f"bubble: {timeline.bubble:.1%} of the devices' time",
        *(
            f"stages {', '.join(map(str, sorted(group)))} all-reduce their tied weights' "
            f"gradients before every step: {format_ms(ms)} ms"
            for group, ms in zip(costs.tied_stages, costs.tied_ms)
        ),
        _stage_table(timeline, costs),
    ]
    if schedule.n_microbatches <= GRID_MAX_MICROBATCHES:
        lines.append(_grid(schedule, dependencies))
    return "\n".join(lines)


def _steps(timeline: Timeline) -> str:
    """For a run of several steps, how many and the whole run's time."""
    if timeline.steps == 1:
        return ""
    return f" ({timeline.steps} steps in {format_ms(timeline.makespan_ms)} ms)"


def _throughput(timeline: Timeline, batch_size: int | None, microbatches: int) -> str:
    """Samples/s at the file's batch size, split into ``microbatches``, over the makespan."""
    if not batch_size or timeline.makespan_ms <= 0:
        return ""
    samples = batch_size * timeline.schedule.n_microbatches / microbatches
    return f", {samples / timeline.makespan_ms * 1e3:.1f} samples/s at batch {batch_size}"


def _stage_table(timeline: Timeline, costs: PipelineCosts) -> str:
    """Per stage: microbatch times, bubble, peak microbatches and inputs held, weight versions."""
    rows = [
        f"{'stage':>5} {'fwd ms':>8} {'bwd ms':>8} {'bubble':>7} {'peak mb':>8} "
        f"{'input MB':>9} {'versions':>9}"
    ]
    held = timeline.peak_activation_bytes() or [0.0] * timeline.schedule.n_stages
    columns = zip(
        costs.forward_ms,
        costs.backward_ms,
        _stage_bubbles(timeline),
        timeline.peak_in_flight(),
        held,
        weight_versions(timeline.schedule),
    )
    for stage, (fwd, bwd, bubble, peak, nbytes, versions) in enumerate(columns):
        rows.append(
            f"{stage:>5} {format_ms(fwd):>8} {format_ms(bwd):>8} {bubble:>7.1%} {peak:>8} "
            f"{nbytes / _MB:>9.2f} {versions:>9}"
        )
    rows.append(
        "(times per microbatch; input MB: the received inputs the microbatches in flight keep "
        "for their backward, the least a stage holds)"
    )
    return "\n".join(rows)


def _stage_bubbles(timeline: Timeline) -> list[float]:
    """Each stage's bubble: that of the device running it."""
    by_device = timeline.bubble_per_device()
    bubbles = [0.0] * timeline.schedule.n_stages
    for device, actions in enumerate(timeline.schedule.actions):
        for action in actions:
            bubbles[action.stage] = by_device[device]
    return bubbles


def _grid(schedule: Schedule, dependencies: Dependencies) -> str:
    """The lockstep grid, or a line saying why the lockstep simulation cannot draw one."""
    try:
        return "lockstep grid (one action per step):\n" + schedule.grid(dependencies)
    except ScheduleError as error:
        return f"no lockstep grid: {error}"


def run(args: argparse.Namespace) -> str:
    """Simulate the file's costs under the schedule, write the pictures asked for, report."""
    _check_args(args)
    generated = load_generated(args.model)
    pipeline = generated.PIPELINE
    check_wpipe(args.schedule, make_layout(pipeline), pipeline)
    tied_bytes = tied_parameter_bytes(generated)
    costs = costs_from_pipeline(pipeline, args.bw, args.microbatches, args.batch_size, tied_bytes)
    dependencies = stage_dependencies(pipeline)
    n_stages = len(pipeline["stages"])
    step_ms = None
    notes = []
    if args.costs_from:
        measured = _measured_costs_for(args, pipeline, costs)
        costs = replace(costs, forward_ms=measured.forward_ms, backward_ms=measured.backward_ms)
        step_ms = measured.step_ms
        notes.append(
            f"stage costs measured in {args.costs_from} (the runtime's time between actions, "
            f"{', '.join(format_ms(ms) for ms in measured.between_ms)} ms per stage, included)"
        )
    schedule = build_schedule(args.schedule, n_stages, args.microbatches, args.steps)
    timeline = simulate_costs(
        schedule,
        dependencies,
        costs.forward_ms,
        costs.backward_ms,
        costs.comm_ms,
        step_ms,
        activation_bytes=costs.input_bytes,
        tied_stages=costs.tied_stages,
        tied_ms=costs.tied_ms,
    )
    written = []
    if args.timeline:
        draw_timeline(timeline, args.timeline)
        written.append(f"wrote {args.timeline}")
    if args.trace:
        trace = chrome_trace(timeline, label=f"predicted {timeline_title(timeline)}")
        Path(args.trace).write_text(json.dumps(trace) + "\n")
        written.append(f"wrote {args.trace}")
    replicas = [stage.get("replicas", 1) for stage in pipeline["stages"]]
    if max(replicas) > 1:
        notes.append(
            f"note: the file plans {replicas} replicas per stage; this predicts one rank per "
            "stage (the partitioner's analysis prices the replicas and their all-reduce)"
        )
    return "\n".join([report(timeline, costs, dependencies, args.microbatches), *written, *notes])


def _measured_costs_for(
    args: argparse.Namespace, pipeline: Mapping[str, Any], costs: PipelineCosts
) -> MeasuredCosts:
    """The stage costs of the trace ``--costs_from``, checked to be of microbatches of the size
    this prediction is for."""
    try:
        trace = json.loads(Path(args.costs_from).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SimulationError(f"cannot read the trace {args.costs_from!r}: {error}") from None
    if not isinstance(trace, dict):
        raise SimulationError(f"{args.costs_from!r} is not a Chrome / Perfetto trace")
    layout = make_layout(pipeline)
    ranks = None if layout.shared else [layout.role(r).stage for r in range(layout.world_size)]
    measured = measured_costs(trace, len(pipeline["stages"]), stage_of_rank=ranks)
    if costs.batch_size is not None and measured.microbatch_size is not None:
        size = microbatch_sizes(costs.batch_size, args.microbatches)[0]
        if size != measured.microbatch_size:
            raise SimulationError(
                f"the traced run's microbatches hold {measured.microbatch_size} samples, this "
                f"prediction's {size} (batch {costs.batch_size} in {args.microbatches}): pass "
                "the run's --batch_size and --microbatches"
            )
    return measured


def main(argv: list[str] | None = None) -> None:
    """``python -m runtime.simulate --model FILE --schedule NAME --microbatches M [...]``."""
    args = build_parser().parse_args(argv)
    try:
        print(run(args))
    except (RuntimeConfigError, ScheduleError, SimulationError, OSError) as error:
        fail(PROG, str(error))


if __name__ == "__main__":
    main()
