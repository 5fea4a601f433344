"""Predicted against measured time per batch: ``runtime.simulate`` next to the runtime, on the CPU.

For each model, a generated file is written with a profile measured on this CPU
(``autopipe.partition --profile measured --device cpu --no_recomputation``: the runtime does
not recompute), then for each schedule:

- predicted: the file's stage costs for one microbatch, simulated over ``--sim_steps`` batches
  (a synchronous schedule's action lists run once per batch, an asynchronous one without a
  flush), plus what the graph's profile leaves out, measured here with the same threads:
  - what the runtime adds to each stage's forward and backward (``probe_runtime``): reading
    the data, posting and receiving the stage's messages, the loss on the last stage, its own
    cost per action (building the arguments, the loop, the backward call, the time between
    actions). These are timed by training the file's hollow double (``hollow.py``: the same
    messages, data and loss; each stage's forward and backward working as long as the profile
    says the file's stage computes, so that the processes load the machine as the file's run
    does) under 1f1b (wpipe's file under wpipe), each stage's actions as that run met them
    less what the hollow stage's took alone. With ``--no_runtime_probe`` they are modelled
    instead: posting each message (a fixed cost, and a send's bytes at the probed writing
    rate), the loss, and reading the data, each timed in this process;
  - each stage's optimizer step, plus what the runtime adds to a step in the double's run;
  - transfers as gloo makes them between two processes here (``link_probe.py``: a fixed cost
    per message and a bandwidth, also used for the all-reduce of weights tied across stages
    before each step, 2 (k - 1) messages for k stages), or at ``--bw`` GB/s; gloo writes a
    send's bytes out before ``isend`` returns, so the part of a transfer its sender spent
    writing comes off the link's delay;
  - an asynchronous schedule's weight versions, which cost time a synchronous one does not
    spend: each stage's forward and backward pay for swapping a version in, its recorded
    forwards' share (``forwards_to_record`` of the stage's actions) for recording saved
    parameters, and its steps that keep a version for copying it, all timed on the stage in
    this process as ``version_overhead.py`` times them;
- measured: ``torchrun --nproc_per_node P -m runtime --device cpu --trace`` (gloo) for
  ``--steps`` batches; with ``--repeats R``, R runs of each, every schedule in turn in each
  round so that the machine's drift falls on them alike, and the median run counts;
- predicted with the stages timed together: the same, but each stage's forward and backward as
  ``stage_times.py`` times them, whole, with all P processes computing at once (plus what
  the runtime adds, as above). The profile is
  taken with the machine to itself; side by side the processes share its memory bandwidth,
  caches and cores, and this column shows how much of the error that accounts for;
- calibrated: the same again, but each stage's forward, backward and step as the measured run
  of another, synchronous, schedule met them (``python -m runtime.simulate --costs_from``:
  each action's span less its ``waited_ms``, and the runtime's own time between a rank's
  actions, after the warm-up): gpipe's run for every schedule but gpipe, 1f1b's for gpipe
  (``CALIBRATION``), an asynchronous schedule adding its weight versions as above. It
  predicts a schedule from a short run of another; wpipe's file runs under no other
  schedule, so its row has none;
- replayed: the same, with the schedule's own run (whose actions already pay for any weight
  versions). It is not a prediction but a check of the
  simulator: with the actions' costs right, what error is left comes from how the simulator
  runs the schedule and prices the links. The line under each row prints those costs, next
  to the profile's above.

Both sides are read the same way: a batch ends when the last stage ends the backward of its
last microbatch, and the time per batch is the median of the gaps between those ends, the
first ``--warmup`` measured batches and the simulation's first and last left out.

Microbatch size: by default the file is traced and profiled at the microbatch size (batch / m)
and its costs used as measured. On a CPU a node's time is not linear in the batch (fixed costs
per operation weigh more in a small batch), so a profile taken at the whole batch and divided
by m predicts less than a microbatch takes; ``--profile_at batch`` shows by how much.

Threads: every process, the profiling and these measurements included, gets
``OMP_NUM_THREADS = max(1, cores // P)`` (``--threads`` overrides): a stage is profiled with the
share of the machine it has when the P processes run side by side.

    python benchmarks/simulate_vs_measured.py                      # gpt2_tiny, p = 2, m = 4
    python benchmarks/simulate_vs_measured.py --models gpt2_tiny resnet_tiny --trace_dir tmp/tr
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch
from hollow import write_hollow
from launch import BenchmarkError, run_measured
from stage_times import stage_inputs, synthetic_inputs
from version_overhead import time_stage

from autopipe.tasks import FAMILIES
from runtime.comm import MODEL_INPUT_SOURCE, carries_gradient, transfers, value_specs
from runtime.data import DataSource
from runtime.layout import make_layout
from runtime.schedule import (
    ASYNC_SCHEDULES,
    BACKWARD,
    FORWARD,
    SCHEDULE_NAMES,
    Schedule,
    build_schedule,
    stage_dependencies,
)
from runtime.simulate import (
    MeasuredCosts,
    Timeline,
    chrome_trace,
    costs_from_pipeline,
    event_stage,
    measured_costs,
    microbatch_share,
    simulate_costs,
    tied_parameter_bytes,
    tied_stage_groups,
    value_bytes,
)
from runtime.stage import load_generated
from runtime.train import LOSSES, TrainConfig
from runtime.weights import forwards_to_record, versions_to_keep

PROG = "simulate_vs_measured"
LOSS = "cross_entropy"
LR = 0.01
MOMENTUM = 0.9
"""SGD with momentum, as PipeOptim is meant to run: its forwards write weights predicted along
the momentum (without momentum there is no direction, and nothing to write)."""
TARGET = 0.15
CALIBRATION = ("gpipe", "1f1b")
"""The synchronous schedules whose measured runs calibrate the other schedules' predictions."""
TIMING_REPEATS = 20
VERSION_ROUNDS = 20


@dataclass(frozen=True)
class Row:
    """One schedule of one model: predicted and measured time per batch."""

    model: str
    schedule: str
    p: int
    m: int
    predicted_ms: float
    measured_ms: float
    together_ms: float
    """Predicted with each stage's forward and backward timed whole while every process
    computes at once (``stage_times.py``), the profile's other costs kept."""
    replayed_ms: float
    """Predicted with each stage's actions as this schedule's measured run met them: what is
    left of the error is the simulator's, not the costs'."""
    calibrated_ms: float | None
    """Predicted with each stage's actions as the run of another schedule, ``calibrated_from``,
    met them (None where no other run of the file was measured)."""
    calibrated_from: str | None

    @property
    def error(self) -> float:
        """The prediction's error relative to the measurement."""
        return (self.predicted_ms - self.measured_ms) / self.measured_ms

    @property
    def together_error(self) -> float:
        return (self.together_ms - self.measured_ms) / self.measured_ms

    @property
    def replayed_error(self) -> float:
        return (self.replayed_ms - self.measured_ms) / self.measured_ms

    @property
    def calibrated_error(self) -> float | None:
        if self.calibrated_ms is None:
            return None
        return (self.calibrated_ms - self.measured_ms) / self.measured_ms


def family_of(model: str) -> str:
    """The zoo family (``vision``, ``nlp``) that holds ``model``."""
    for family, models in FAMILIES.items():
        if model in models:
            return family
    raise BenchmarkError(f"unknown model {model!r}; the zoo has {', '.join(_zoo())}")


def _zoo() -> list[str]:
    return [name for models in FAMILIES.values() for name in models]


def run_quietly(command: list[str], threads: int, timeout: float, label: str) -> str:
    """Run ``command`` from the repository with ``threads`` OpenMP threads; its stdout."""
    return run_measured(label, command, threads, timeout).stdout


def generate(
    model: str, args: argparse.Namespace, threads: int, folder: Path, wpipe: bool = False
) -> Path:
    """Write ``model`` as P stages, profiled on this CPU at the batch ``--profile_at`` says; with
    ``wpipe``, as 2P stages placed two per process (``--schedule wpipe``)."""
    batch = args.batch_size // args.microbatches
    if args.profile_at == "batch":
        batch = args.batch_size
    path = folder / f"{model}_b{batch}_p{args.stages}{'_wpipe' if wpipe else ''}.py"
    command = [
        *(sys.executable, "-m", "autopipe.partition", family_of(model), "--model", model),
        *("-p", str(args.stages), "-b", str(batch), "-o", str(path)),
        *("--profile", "measured", "--device", "cpu", "--no_recomputation"),
        *("--overwrite_profiles_cache", "--no_analysis"),
        *(("--schedule", "wpipe") if wpipe else ()),
    ]
    run_quietly(command, threads, args.timeout, f"partitioning {model}")
    return path


def median_ms(work: Callable[[], Any], prepare: Callable[[], Any] = lambda: None) -> float:
    """The median time of ``work`` over repeated runs after two untimed ones, each after an
    untimed ``prepare``."""
    times = []
    for repeat in range(TIMING_REPEATS + 2):
        prepare()
        start = time.perf_counter()
        work()
        if repeat >= 2:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def loss_ms(pipeline: dict[str, Any], microbatch: int) -> float:
    """The loss's forward and backward on one microbatch of the first model output, as the last
    stage runs them in each backward; the graph's profile stops at the model's outputs."""
    spec = value_specs(pipeline)[pipeline["model_outputs"][0]]
    shape = list(spec["shape"])
    shape[spec.get("batch_dim") or 0] = microbatch
    output = torch.randn(shape, requires_grad=True)
    labels = torch.randint(0, shape[-1], shape[:-1])
    return median_ms(lambda: LOSSES[LOSS](output, labels).backward())


def data_ms(path: Path, pipeline: dict[str, Any], batch_size: int) -> tuple[float, float]:
    """What reading one batch of the runtime's synthetic data takes: its model inputs, which
    the first rank reads, and its labels, which the last reads (the profile leaves both out)."""
    config = TrainConfig(model=str(path), batch_size=batch_size, microbatches=1, steps=1)
    data = DataSource(config, pipeline)
    step = itertools.count()
    return median_ms(lambda: data.inputs(next(step))), median_ms(lambda: data.labels(next(step)))


def step_ms(generated: ModuleType, index: int) -> float:
    """Stage ``index``'s SGD step and gradient clearing, as the runtime's step runs them."""
    stage = generated.build_stage(index)
    parameters = [p for p in stage.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=LR, momentum=MOMENTUM)

    def fill_gradients() -> None:
        for parameter in parameters:
            parameter.grad = torch.randn_like(parameter)

    def step() -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return median_ms(step, fill_gradients)


@dataclass(frozen=True)
class StageCosts:
    """What one microbatch costs each stage in the simulation, and where the costs came from."""

    forward_ms: list[float]
    backward_ms: list[float]
    step_ms: list[float]
    comm_ms: dict[tuple[int, int], float]
    loss_ms: float
    tied_ms: tuple[float, ...]
    forward_extra_ms: list[float]
    """The part of ``forward_ms`` the runtime adds to computing the stage (``RuntimeCosts``,
    or modelled); the same for the backward, the last stage's loss included (``loss_ms`` is
    shown, not charged again)."""
    backward_extra_ms: list[float]


@dataclass(frozen=True)
class Link:
    """How transfers between the processes are priced: a fixed cost per message and GB/s, and
    what posting one costs the process that posts it."""

    latency_ms: float
    gbps: float | None
    """None: the bandwidth the file records."""
    send_ms: float = 0.0
    """An ``isend``'s fixed cost to its caller, who also writes its bytes at ``send_gbps``."""
    send_gbps: float | None = None
    """None: sends cost their caller nothing."""
    receive_ms: float = 0.0
    """An ``irecv``'s cost to its caller."""

    def send_cost_ms(self, nbytes: float) -> float:
        """What an ``isend`` of ``nbytes`` costs its caller."""
        if self.send_gbps is None:
            return 0.0
        return self.send_ms + nbytes / (self.send_gbps * 1e6)


def probe_link(args: argparse.Namespace, threads: int) -> Link:
    """The link as gloo makes it between two processes on this machine (``link_probe.py``),
    or ``--bw`` GB/s with no fixed cost where given."""
    if args.bw is not None:
        return Link(0.0, args.bw)
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"),
        str(REPO / "benchmarks" / "link_probe.py"),
    ]
    found = json.loads(
        run_quietly(command, threads, args.timeout, "the link probe").splitlines()[-1]
    )
    return Link(
        found["latency_ms"],
        found["gbps"],
        found["send_post_ms"],
        found["send_gbps"],
        found["receive_post_ms"],
    )


@dataclass(frozen=True)
class Posts:
    """What the messages of one microbatch cost their posters: per stage, in its forward
    (values) and its backward (gradients); per directed link, the sender's part of its
    transfers and how many messages cross it."""

    forward_ms: list[float]
    backward_ms: list[float]
    written_ms: Counter[tuple[int, int]]
    messages: Counter[tuple[int, int]]


def posting_costs(pipeline: dict[str, Any], share: float, link: Link) -> Posts:
    """The posting costs of ``pipeline``'s messages. A transfer between two stages of one
    rank is no message: it is handed over in memory."""
    n_stages = len(pipeline["stages"])
    layout = make_layout(pipeline)
    specs = value_specs(pipeline)
    posts = Posts([0.0] * n_stages, [0.0] * n_stages, Counter(), Counter())
    for t in transfers(pipeline):
        if all(src == dst for src, dst in layout.rank_pairs(t.src, t.dst)):
            continue
        send = link.send_cost_ms(value_bytes(specs[t.name], share))
        posts.forward_ms[t.src] += send
        posts.forward_ms[t.dst] += link.receive_ms
        posts.written_ms[(t.src, t.dst)] += send
        posts.messages[(t.src, t.dst)] += 1
        if carries_gradient(specs[t.name]):
            posts.backward_ms[t.dst] += send
            posts.backward_ms[t.src] += link.receive_ms
            posts.written_ms[(t.dst, t.src)] += send
            posts.messages[(t.dst, t.src)] += 1
    return posts


@dataclass(frozen=True)
class RuntimeCosts:
    """What the runtime adds, per stage, to computing the stage in an action (ms): reading the
    data, posting and receiving its messages as they go in a running pipeline, the loss on the
    last stage, its own cost (building the arguments, the loop, the backward call, the time
    between actions); to a step, all but the update itself."""

    forward_ms: list[float]
    backward_ms: list[float]
    step_ms: list[float]


def stage_costs(
    path: Path, args: argparse.Namespace, link: Link, runtime: RuntimeCosts | None
) -> StageCosts:
    """The file's costs scaled to one microbatch of the run, with what the runtime adds to each
    stage's actions: probed (``runtime``), or, with None, modelled as posting the messages, the
    loss in the last stage's backward and reading the data."""
    generated = load_generated(path)
    pipeline = generated.PIPELINE
    tied = tied_parameter_bytes(generated)
    costs = costs_from_pipeline(pipeline, link.gbps, args.microbatches, args.batch_size, tied)
    share = microbatch_share(pipeline, args.microbatches, args.batch_size)
    posts = posting_costs(pipeline, share, link)
    # a link between two stages of one rank carries no message (wpipe's skips): no delay
    comm = {
        pair: max(ms + link.latency_ms * posts.messages[pair] - posts.written_ms[pair], 0.0)
        for pair, ms in costs.comm_ms.items()
        if posts.messages[pair]
    }
    loss = loss_ms(pipeline, args.batch_size // args.microbatches)
    n_stages = len(pipeline["stages"])
    if runtime is None:
        inputs, labels = data_ms(path, pipeline, args.batch_size)
        forward_extra, backward_extra = list(posts.forward_ms), list(posts.backward_ms)
        # a step's batch is read in its first microbatch: each pays its share on average
        forward_extra[MODEL_INPUT_SOURCE] += inputs / args.microbatches
        backward_extra[-1] += labels / args.microbatches + loss
        step_extra = [0.0] * n_stages
    else:
        forward_extra, backward_extra = list(runtime.forward_ms), list(runtime.backward_ms)
        step_extra = list(runtime.step_ms)
    forward = [ms + extra for ms, extra in zip(costs.forward_ms, forward_extra)]
    backward = [ms + extra for ms, extra in zip(costs.backward_ms, backward_extra)]
    steps = [step_ms(generated, index) + step_extra[index] for index in range(n_stages)]
    tied_ms = tuple(
        ms + 2 * (len(group) - 1) * link.latency_ms
        for group, ms in zip(costs.tied_stages, costs.tied_ms)
    )
    return StageCosts(forward, backward, steps, comm, loss, tied_ms, forward_extra, backward_extra)


def probe_runtime(
    path: Path, args: argparse.Namespace, threads: int, scratch: Path, wpipe: bool = False
) -> RuntimeCosts:
    """What the runtime adds to each stage of ``path`` here, under the load of the file's own
    run: its hollow double (``hollow.py``: the same messages, data and loss, each stage's
    forward and backward working as long as the profile says the file's compute), trained under
    1f1b (wpipe for wpipe's file, which no other schedule runs), each stage's actions as the
    run met them (``run_costs``) less what the hollow stage's took alone."""
    generated = load_generated(path)
    pipeline = generated.PIPELINE
    profiled = costs_from_pipeline(
        pipeline, None, args.microbatches, args.batch_size, tied_parameter_bytes(generated)
    )
    busy = list(zip(profiled.forward_ms, profiled.backward_ms))
    double = write_hollow(path, scratch / f"{path.stem}_hollow.py", busy)
    trace = scratch / f"{path.stem}_hollow.json"
    measure(double, "wpipe" if wpipe else "1f1b", args, threads, trace)
    hollow = load_generated(double)
    n_stages = len(pipeline["stages"])
    found = run_costs(trace, n_stages, args)
    microbatch = args.batch_size // args.microbatches
    model_inputs = synthetic_inputs(double, hollow.PIPELINE, microbatch)
    alone = [
        time_stage(
            hollow,
            stage,
            stage_inputs(hollow.PIPELINE, stage, model_inputs, microbatch),
            VERSION_ROUNDS,
        )["plain"]
        for stage in range(n_stages)
    ]
    return RuntimeCosts(
        *(
            [max(ms - own[kind], 0.0) for ms, own in zip(met, alone)]
            for kind, met in enumerate((found.forward_ms, found.backward_ms, found.step_ms))
        )
    )


def timed_together(
    path: Path, costs: StageCosts, args: argparse.Namespace, threads: int
) -> tuple[StageCosts, dict[str, Any]]:
    """``costs`` with each stage's forward and backward as ``stage_times.py`` times them with
    every process computing at once (the loss still added to the last backward), and all that
    it measured."""
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone"),
        *("--nproc_per_node", str(args.stages), str(REPO / "benchmarks" / "stage_times.py")),
        *("--model", str(path), "--microbatch", str(args.batch_size // args.microbatches)),
    ]
    found = json.loads(
        run_quietly(command, threads, args.timeout, "timing the stages").splitlines()[-1]
    )
    together = found["together"]
    forward = [ms + extra for ms, extra in zip(together["forward_ms"], costs.forward_extra_ms)]
    backward = [ms + extra for ms, extra in zip(together["backward_ms"], costs.backward_extra_ms)]
    return replace(costs, forward_ms=forward, backward_ms=backward), found


@dataclass(frozen=True)
class VersionCosts:
    """Per stage, what weight versions add (ms) to a forward and a backward with a version
    swapped in, to those whose forward records saved parameters, and to a step that keeps the
    version it replaces (``version_overhead.py``'s modes less ``plain``)."""

    swapped_forward: list[float]
    swapped_backward: list[float]
    recorded_forward: list[float]
    recorded_backward: list[float]
    keeping_step: list[float]


def version_costs(path: Path, args: argparse.Namespace) -> VersionCosts:
    """Each stage of ``path`` timed on one microbatch plain, swapped and recorded."""
    generated = load_generated(path)
    pipeline = generated.PIPELINE
    microbatch = args.batch_size // args.microbatches
    model_inputs = synthetic_inputs(path, pipeline, microbatch)
    rows = []
    for stage in range(len(pipeline["stages"])):
        arguments = stage_inputs(pipeline, stage, model_inputs, microbatch)
        times = time_stage(generated, stage, arguments, VERSION_ROUNDS)
        added = [
            max(times[mode][index] - times["plain"][index], 0.0)
            for mode, index in (("swapped", 0), ("swapped", 1), ("recorded", 0), ("recorded", 1))
        ]
        rows.append([*added, max(times["swapped"][2] - times["plain"][2], 0.0)])
    return VersionCosts(*(list(column) for column in zip(*rows)))


def with_versions(costs: StageCosts, versions: VersionCosts, schedule: Schedule) -> StageCosts:
    """``costs`` with what ``schedule``'s weight versions add to each stage, on average over
    its actions: every F and B swaps a version in, the share of its forwards that record pays
    for recording in both, and the share of its steps that keep their version for the copy."""
    forward, backward = list(costs.forward_ms), list(costs.backward_ms)
    steps = list(costs.step_ms)
    for stage in range(schedule.n_stages):
        mine = [action for device in schedule.actions for action in device if action.stage == stage]
        forwards = sum(action.kind == FORWARD for action in mine)
        recorded = len(forwards_to_record(mine)) / forwards if forwards else 0.0
        keeps = versions_to_keep(mine)
        keeping = sum(k in keep for k, keep in enumerate(keeps)) / len(keeps) if keeps else 0.0
        swapped_f, swapped_b = versions.swapped_forward[stage], versions.swapped_backward[stage]
        forward[stage] += swapped_f + recorded * (versions.recorded_forward[stage] - swapped_f)
        backward[stage] += swapped_b + recorded * (versions.recorded_backward[stage] - swapped_b)
        steps[stage] += keeping * versions.keeping_step[stage]
    return replace(costs, forward_ms=forward, backward_ms=backward, step_ms=steps)


def run_schedule(name: str, n_stages: int, m: int, batches: int) -> Schedule:
    """``batches`` batches of ``name``: a synchronous schedule's lists repeated once per batch
    (as the runtime runs them), an asynchronous one built for the whole run."""
    if name in ASYNC_SCHEDULES:
        return build_schedule(name, n_stages, m, batches)
    one = build_schedule(name, n_stages, m)
    actions = tuple(device * batches for device in one.actions)
    return Schedule(name, n_stages, m, actions)


def predict(
    path: Path,
    costs: StageCosts,
    name: str,
    args: argparse.Namespace,
    versions: VersionCosts | None = None,
) -> Timeline:
    """The simulated run of ``--sim_steps`` batches of schedule ``name``; an asynchronous one
    with what its weight ``versions`` add."""
    pipeline = load_generated(path).PIPELINE
    n_stages = len(pipeline["stages"])
    schedule = run_schedule(name, n_stages, args.microbatches, args.sim_steps)
    if versions is not None and name in ASYNC_SCHEDULES:
        costs = with_versions(costs, versions, schedule)
    return simulate_costs(
        schedule,
        stage_dependencies(pipeline),
        costs.forward_ms,
        costs.backward_ms,
        costs.comm_ms,
        costs.step_ms,
        tied_stages=tied_stage_groups(pipeline),
        tied_ms=costs.tied_ms,
    )


def batch_gaps_ms(backward_ends_ms: Sequence[float], m: int) -> list[float]:
    """Time per batch from the last stage's backward ends: the gaps between the ends of every
    m-th one, each batch's last."""
    ends = sorted(backward_ends_ms)[m - 1 :: m]
    return [later - earlier for earlier, later in zip(ends, ends[1:])]


def predicted_batch_ms(timeline: Timeline, m: int) -> float:
    """Median time per batch of a simulated run, its first and last batch left out."""
    last = timeline.schedule.n_stages - 1
    ends = [
        r.end_ms for r in timeline.records if r.action.kind == BACKWARD and r.action.stage == last
    ]
    gaps = batch_gaps_ms(ends, m)
    return statistics.median(gaps[1:-1] or gaps)


def measure(path: Path, name: str, args: argparse.Namespace, threads: int, trace: Path) -> float:
    """Train ``--steps`` batches with the runtime; median time per batch after the warm-up."""
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone"),
        *("--nproc_per_node", str(args.stages), "-m", "runtime", "--model", str(path)),
        *("--schedule", name, "--microbatches", str(args.microbatches)),
        *("--batch_size", str(args.batch_size), "--steps", str(args.steps)),
        *("--optimizer", "sgd", "--lr", str(LR), "--momentum", str(MOMENTUM)),
        *("--loss", LOSS, "--device", "cpu"),
        *("--no_progress", "--trace", str(trace)),
    ]
    run_quietly(command, threads, args.timeout, f"the runtime with {name}")
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e["ph"] == "X"]
    stages = len(load_generated(path).PIPELINE["stages"])
    ends = [
        (e["ts"] + e["dur"]) / 1e3
        for e in events
        if e["cat"] == "backward" and event_stage(e, None) == stages - 1
    ]
    gaps = batch_gaps_ms(ends, args.microbatches)[args.warmup : -1]
    if not gaps:
        raise BenchmarkError(f"{name}: no batches left after the {args.warmup} warm-up ones")
    return statistics.median(gaps)


def from_run(costs: StageCosts, run: MeasuredCosts) -> StageCosts:
    """``costs`` with each stage's forward, backward and step as a measured run met them
    (``runtime.simulate.measured_costs``); the links and the tied all-reduce kept."""
    return replace(
        costs, forward_ms=run.forward_ms, backward_ms=run.backward_ms, step_ms=run.step_ms
    )


def calibration_run(name: str, measured: Sequence[str]) -> str | None:
    """The measured schedule whose run calibrates the prediction of ``name``: the first of
    ``CALIBRATION`` that is not ``name`` itself; None for wpipe, whose file no other runs."""
    if name == "wpipe":
        return None
    return next((other for other in CALIBRATION if other != name and other in measured), None)


def write_side_by_side(timeline: Timeline, measured: Path, destination: Path) -> None:
    """One Chrome / Perfetto trace: the prediction as process 0, the measured run as 1."""
    predicted = chrome_trace(timeline, pid=0, label=f"predicted: {timeline.schedule.name}")
    events = json.loads(measured.read_text())["traceEvents"]
    for event in events:
        event["pid"] = 1
    merged = {**predicted, "traceEvents": predicted["traceEvents"] + events}
    destination.write_text(json.dumps(merged) + "\n")


def check_args(args: argparse.Namespace) -> None:
    """Reject flags that cannot make a run, before any work."""
    for flag in ("stages", "microbatches", "batch_size", "steps", "sim_steps", "repeats"):
        if getattr(args, flag) < 1:
            raise BenchmarkError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.batch_size % args.microbatches:
        raise BenchmarkError(
            f"--batch_size {args.batch_size} must be a multiple of --microbatches "
            f"{args.microbatches}, so that the profiled microbatch is the run's"
        )
    if args.steps - args.warmup < 3:
        raise BenchmarkError(f"--steps must leave at least 3 batches after --warmup {args.warmup}")
    if args.sim_steps < 4:
        raise BenchmarkError(f"--sim_steps must be at least 4, got {args.sim_steps}")
    if "2bw" in args.schedules and args.microbatches < args.stages:
        raise BenchmarkError("2bw needs --microbatches of at least --stages: drop 2bw or raise m")
    for model in args.models:
        family_of(model)


def benchmark_model(
    model: str,
    args: argparse.Namespace,
    threads: int,
    scratch: Path,
    link: Link,
) -> list[Row]:
    """Generate and profile ``model``, then predict and measure every schedule."""
    paths = {False: generate(model, args, threads, scratch)}
    schedules = list(args.schedules)
    if "wpipe" in schedules:
        paths[True] = generate(model, args, threads, scratch, wpipe=True)
        tied = load_generated(paths[True]).PIPELINE.get("tied_parameters", [])
        if any(len({stage for stage, _ in members}) > 1 for members in tied):
            print(f"{model}: no wpipe row, it ties weights across stages, which wpipe cannot run")
            schedules.remove("wpipe")
            del paths[True]
    every_costs = {}
    for wpipe, path in paths.items():
        runtime = None
        if not args.no_runtime_probe:
            runtime = probe_runtime(path, args, threads, scratch, wpipe)
        every_costs[wpipe] = stage_costs(path, args, link, runtime)
    asynchronous = any(name in ASYNC_SCHEDULES for name in schedules)
    every_versions = {
        wpipe: version_costs(path, args) if asynchronous else None for wpipe, path in paths.items()
    }
    together = {}
    for wpipe, costs in every_costs.items():
        together[wpipe], found = timed_together(paths[wpipe], costs, args, threads)
        shown = ", ".join(
            f"stage {s}: F {f:.2f} B {b:.2f} S {st:.2f}"
            for s, (f, b, st) in enumerate(zip(costs.forward_ms, costs.backward_ms, costs.step_ms))
        )
        which = " (wpipe's file)" if wpipe else ""
        tied = "".join(f"; tied all-reduce {ms:.2f} per step" for ms in costs.tied_ms)
        print(
            f"{model}{which}: per microbatch (ms) {shown}; loss {costs.loss_ms:.2f} in the last B"
            + tied
        )
        added = ", ".join(
            f"stage {s}: F {f:.2f} B {b:.2f}"
            for s, (f, b) in enumerate(zip(costs.forward_extra_ms, costs.backward_extra_ms))
        )
        source = "modelled" if args.no_runtime_probe else "its hollow double's run"
        print(f"{model}{which}: of which the runtime adds ({source}, ms) {added}")
        whole = "; ".join(
            f"{mode} "
            + ", ".join(
                f"stage {s}: F {f:.2f} B {b:.2f}"
                for s, (f, b) in enumerate(
                    zip(found[mode]["forward_ms"], found[mode]["backward_ms"])
                )
            )
            for mode in ("alone", "together")
        )
        print(f"{model}{which}: each stage timed whole (ms), {whole}")
        versions = every_versions[wpipe]
        if versions is not None:
            shown = ", ".join(
                f"stage {s}: F {sf:.2f}/{rf:.2f} B {sb:.2f}/{rb:.2f} S {ks:.2f}"
                for s, (sf, rf, sb, rb, ks) in enumerate(
                    zip(
                        versions.swapped_forward,
                        versions.recorded_forward,
                        versions.swapped_backward,
                        versions.recorded_backward,
                        versions.keeping_step,
                    )
                )
            )
            print(f"{model}{which}: weight versions add (ms, swapped/recorded) {shown}")
    # rounds of every schedule in turn, so that the machine drifting affects them alike
    found: dict[str, list[tuple[float, Path]]] = {name: [] for name in schedules}
    for round_ in range(args.repeats):
        for name in schedules:
            trace = scratch / f"{model}_{name}_{round_}.json"
            found[name].append((measure(paths[name == "wpipe"], name, args, threads, trace), trace))
    runs = {name: median_run(rounds) for name, rounds in found.items()}
    met = {
        name: run_costs(trace, len(every_costs[name == "wpipe"].forward_ms), args)
        for name, (_, trace) in runs.items()
    }
    rows = []
    for name in schedules:
        path, costs = paths[name == "wpipe"], every_costs[name == "wpipe"]
        versions = every_versions[name == "wpipe"]
        timeline = predict(path, costs, name, args, versions)
        side_by_side = predict(path, together[name == "wpipe"], name, args, versions)
        measured, trace = runs[name]
        own = met[name]
        replay = predict(path, from_run(costs, own), name, args)
        reference = calibration_run(name, list(runs))
        calibrated = None
        if reference is not None:
            # the calibrating run is synchronous: an asynchronous schedule adds its versions
            calibrated = predict(path, from_run(costs, met[reference]), name, args, versions)
        row = Row(
            model,
            name,
            args.stages,
            args.microbatches,
            predicted_batch_ms(timeline, args.microbatches),
            measured,
            predicted_batch_ms(side_by_side, args.microbatches),
            predicted_batch_ms(replay, args.microbatches),
            None if calibrated is None else predicted_batch_ms(calibrated, args.microbatches),
            reference,
        )
        print_row(row)
        shown = ", ".join(
            f"stage {s}: F {f:.2f} B {b:.2f} S {st:.2f} ({gap:.2f})"
            for s, (f, b, st, gap) in enumerate(
                zip(own.forward_ms, own.backward_ms, own.step_ms, own.between_ms)
            )
        )
        print(f"  in the run (ms, waits left out, with the runtime's time before each): {shown}")
        rows.append(row)
        if args.trace_dir and name == args.trace_schedule:
            destination = Path(args.trace_dir) / f"{model}_{name}_p{args.stages}.json"
            write_side_by_side(timeline, trace, destination)
            print(f"  wrote {destination} (predicted: process 0, measured: process 1)")
    return rows


def median_run(rounds: list[tuple[float, Path]]) -> tuple[float, Path]:
    """The median round's time per batch and trace (the lower middle one of an even count)."""
    return sorted(rounds)[(len(rounds) - 1) // 2]


def run_costs(trace: Path, n_stages: int, args: argparse.Namespace) -> MeasuredCosts:
    """The stage costs of a measured run, its warm-up batches left out."""
    return measured_costs(json.loads(trace.read_text()), n_stages, args.warmup / args.steps)


HEADER = (
    f"{'model':<12} {'schedule':<10} {'p':>2} {'m':>3} {'predicted ms':>12} "
    f"{'measured ms':>11} {'error':>7} {'together ms':>11} {'error':>7} "
    f"{'calibrated ms':>19} {'error':>7} {'replayed ms':>11} {'error':>7}"
)


def print_row(row: Row) -> None:
    calibrated = "n/a".rjust(19) + " " + "".rjust(7)
    if row.calibrated_ms is not None:
        calibrated = (
            f"{f'({row.calibrated_from}) {row.calibrated_ms:.2f}':>19} "
            f"{row.calibrated_error:>+7.1%}"
        )
    print(
        f"{row.model:<12} {row.schedule:<10} {row.p:>2} {row.m:>3} {row.predicted_ms:>12.2f} "
        f"{row.measured_ms:>11.2f} {row.error:>+7.1%} {row.together_ms:>11.2f} "
        f"{row.together_error:>+7.1%} {calibrated} {row.replayed_ms:>11.2f} "
        f"{row.replayed_error:>+7.1%}",
        flush=True,
    )


def summary(rows: Sequence[Row]) -> str:
    """The worst error of each prediction and whether it meets the target."""
    lines = []
    for label, error in (
        ("profile", lambda row: row.error),
        ("stages timed together", lambda row: row.together_error),
        ("calibrated on another schedule's run", lambda row: row.calibrated_error),
        ("replayed (the run's own actions)", lambda row: row.replayed_error),
    ):
        found = [row for row in rows if error(row) is not None]
        if not found:
            continue
        worst = max(found, key=lambda row: abs(error(row)))
        verdict = "met" if abs(error(worst)) <= TARGET else "missed"
        lines.append(
            f"{label}: worst error {error(worst):+.1%} ({worst.model} {worst.schedule}); mean "
            f"|error| {statistics.mean(abs(error(r)) for r in found):.1%} over {len(found)} "
            f"rows; target {TARGET:.0%}: {verdict}"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.splitlines()[0], epilog="See the module docstring."
    )
    parser.add_argument("--models", nargs="+", default=["gpt2_tiny"], help="zoo models")
    parser.add_argument("--schedules", nargs="+", choices=SCHEDULE_NAMES, default=SCHEDULE_NAMES)
    parser.add_argument("-p", "--stages", type=int, default=2, help="stages, one process each")
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=60, help="batches the runtime trains")
    parser.add_argument("--warmup", type=int, default=10, help="measured batches left out")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs of every schedule, in rounds; the median run counts (default 1)",
    )
    parser.add_argument("--sim_steps", type=int, default=8, help="batches simulated")
    parser.add_argument(
        "--profile_at",
        choices=("microbatch", "batch"),
        default="microbatch",
        help="profile at batch / m and use the costs as measured (default), or at the batch "
        "and divide by m",
    )
    parser.add_argument(
        "--bw", type=float, default=None, help="link GB/s (default: gloo's here, probed)"
    )
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS (default cores // stages)")
    parser.add_argument(
        "--no_runtime_probe",
        action="store_true",
        help="model what the runtime adds to each action (posting its messages, the loss, "
        "the data) instead of timing it on the file's hollow double",
    )
    parser.add_argument("--trace_dir", help="write predicted and measured traces side by side")
    parser.add_argument("--trace_schedule", choices=SCHEDULE_NAMES, default="1f1b")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per subprocess")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    try:
        check_args(args)
        cores = len(os.sched_getaffinity(0))
        threads = args.threads or max(1, cores // args.stages)
        torch.set_num_threads(threads)
        if args.trace_dir:
            Path(args.trace_dir).mkdir(parents=True, exist_ok=True)
        print(
            f"cpu, gloo: {cores} cores, OMP_NUM_THREADS={threads} per process; p = "
            f"{args.stages}, m = {args.microbatches}, batch {args.batch_size}, profiled at "
            f"the {args.profile_at}; {args.steps} batches trained, the first {args.warmup} left out",
            flush=True,
        )
        link = probe_link(args, threads)
        print(
            f"links: {link.latency_ms:.3f} ms per message and "
            + (f"{link.gbps:.2f} GB/s" if link.gbps else "the file's GB/s")
            + (" (--bw)" if args.bw is not None else " (gloo between two processes, probed)")
            + (
                f"; posting costs its caller {link.send_ms:.3f} ms and the bytes at "
                f"{link.send_gbps:.2f} GB/s a send, {link.receive_ms:.3f} ms a receive"
                if link.send_gbps is not None
                else ""
            ),
            flush=True,
        )
        rows = []
        with tempfile.TemporaryDirectory(prefix=f"{PROG}_") as scratch:
            print(HEADER)
            for model in args.models:
                rows += benchmark_model(model, args, threads, Path(scratch), link)
    except BenchmarkError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(summary(rows))


if __name__ == "__main__":
    main()
