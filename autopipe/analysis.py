"""What a partition is expected to do: per-stage costs and the pipeline's predicted speed.

Everything here is derived from ``autopipe.cost``: per-stage times and memory for one batch,
and for the synchronous schedules (GPipe, 1F1B) the time per batch of m microbatches,
(m - 1) * slowest + sum of all stages (fill, steady state, drain), with the stage times of
one microbatch. Both schedules take the same time; they differ in memory. On a hierarchical
machine each stage's transfers and all-reduce are priced at the links it crosses
(``autopipe.cost.stage_links``, as the pipedream method prices them).

Under wpipe a device runs two stages (``autopipe.cost.device_stages``): the analysis adds each
device's time per batch (its stages' forward, backward and transfers) and memory (their sum),
and predicts the time per batch with the same formula, the slowest device in place of the
slowest stage (``pipeline_ms``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from autopipe.cost import (
    CostModel,
    StageCost,
    StageLinks,
    device_stages,
    device_totals,
    replicated_ms,
    stage_memory,
)

_MB = 1e6
_GB = 1e9


@dataclass(frozen=True)
class ScheduleEstimate:
    schedule: str
    batch_ms: float
    samples_per_s: float | None
    speedup: float
    peak_memory_bytes: int


@dataclass(frozen=True)
class DeviceLoad:
    """What one device does per batch where it runs several stages (wpipe)."""

    device: int
    stages: tuple[int, ...]
    time_ms: float
    """Its stages' forward, backward and transfer time per batch, summed."""
    memory_bytes: int
    """Its stages' memory, summed: what the memory limit applies to."""


@dataclass(frozen=True)
class Analysis:
    """The predicted behaviour of one partition."""

    costs: list[StageCost]
    replicas: tuple[int, ...]
    links: list[StageLinks]
    """The links each stage's transfers cross; its costs' comm_ms is priced at them."""
    stage_ms: list[float]
    """Each stage's time per batch, replicas and their all-reduce included."""
    lower_bound_ms: float
    single_device_ms: float
    microbatches: int
    batch_size: int | None
    schedules: list[ScheduleEstimate]
    devices: list[DeviceLoad] = field(default_factory=list)
    """Per device, where a device runs several stages (wpipe); empty where each stage has its
    own devices."""

    @property
    def slowest_ms(self) -> float:
        return max(self.stage_ms)

    @property
    def links_differ(self) -> bool:
        """Whether stages send over links of different speeds (then the table names them)."""
        return len({link.send for link in self.links[:-1]}) > 1

    @property
    def bound_ratio(self) -> float:
        """The slowest stage over the lower bound max(total / p, costliest node); 1.0 is ideal."""
        return self.slowest_ms / self.lower_bound_ms if self.lower_bound_ms > 0 else 1.0

    def table(self) -> str:
        """The analysis as plain text, for the terminal and the generated file's docstring."""
        replicated = any(r > 1 for r in self.replicas)
        linked = self.links_differ
        device_of = {stage: load.device for load in self.devices for stage in load.stages}
        lines = [
            f"{'stage':>5} {'fwd ms':>9} {'bwd ms':>9} {'params MB':>10} {'in MB':>8} {'out MB':>8} "
            f"{'comm ms':>8} {'memory GB':>10}"
            + (f" {'replicas':>8}" if replicated else "")
            + (f" {'link GB/s':>9}" if linked else "")
            + (f" {'device':>6}" if device_of else "")
        ]
        for index, (cost, replicas) in enumerate(zip(self.costs, self.replicas)):
            link = f"{self.links[index].send:g}" if index < len(self.costs) - 1 else "-"
            lines.append(
                f"{index:>5} {_ms(cost.forward_ms):>9} {_ms(cost.backward_ms):>9} {cost.param_bytes / _MB:>10.2f} "
                f"{cost.input_bytes / _MB:>8.2f} {cost.send_bytes / _MB:>8.2f} {_ms(cost.comm_ms):>8} "
                f"{cost.memory_bytes / _GB:>10.3f}"
                + (f" {replicas:>8}" if replicated else "")
                + (f" {link:>9}" if linked else "")
                + (f" {device_of[index]:>6}" if device_of else "")
            )
        for load in self.devices:
            lines.append(
                f"device {load.device} runs stages {' and '.join(map(str, load.stages))}: "
                f"{_ms(load.time_ms)} ms per batch, memory {load.memory_bytes / _GB:.3f} GB"
            )
        lines.append(
            f"slowest stage {_ms(self.slowest_ms)} ms per batch, lower bound {_ms(self.lower_bound_ms)} ms "
            f"(ratio {self.bound_ratio:.3f}); one device {_ms(self.single_device_ms)} ms"
        )
        for estimate in self.schedules:
            rate = (
                f", {estimate.samples_per_s:.1f} samples/s"
                if estimate.samples_per_s is not None
                else ""
            )
            lines.append(
                f"{estimate.schedule} with {self.microbatches} microbatches: {_ms(estimate.batch_ms)} ms per batch"
                f"{rate}, {estimate.speedup:.2f}x one device, peak memory {estimate.peak_memory_bytes / _GB:.3f} GB"
            )
        return "\n".join(lines)


def _ms(ms: float) -> str:
    """A time in ms as the tables print it: two decimals, or three significant digits under
    0.1 ms, so that a small model's stages do not all read 0.00."""
    return f"{ms:.2f}" if ms >= 0.1 or ms == 0 else f"{ms:.3g}"


def pipeline_ms(
    stage_ms: list[float], microbatches: int, device_ms: list[float] | None = None
) -> float:
    """Time per batch of m microbatches: one microbatch through every stage (fill and drain),
    then m - 1 more at the pace of the slowest device, all in per-microbatch times.

    Each stage has its own device unless ``device_ms`` gives every device's time per batch
    (wpipe: stages d and P + d summed on device d). For GPipe and 1F1B this is their time per
    batch. WPipe does not flush between batches, so its steady state is m times the slowest
    device; the estimate charges every batch the fill as well, erring on the slow side by at
    most one microbatch's trip through the stages.
    """
    per_microbatch = [t / microbatches for t in stage_ms]
    slowest = max(per_microbatch) if device_ms is None else max(device_ms) / microbatches
    return (microbatches - 1) * slowest + sum(per_microbatch)


def analyse(
    costs: list[StageCost],
    replicas: tuple[int, ...],
    lower_bound_ms: float,
    model: CostModel,
    batch_size: int | None,
    links: list[StageLinks] | None = None,
) -> Analysis:
    """Predict per-stage costs and GPipe / 1F1B time, throughput, speedup and peak memory; under
    wpipe (``model.schedule``), per-device costs and the WPipe time instead.

    ``costs`` have their transfers priced at ``links`` (``Partition.links``); replicas
    all-reduce at each stage's ``reduce`` link. Without links, every link is the model's.
    """
    if links is None:
        links = [StageLinks(model.bandwidth, model.bandwidth) for _ in costs]
    single = sum(c.compute_ms for c in costs)
    stage_ms = [
        replicated_ms(
            c.compute_ms, c.comm_ms, c.param_bytes, r, replace(model, bandwidth=link.reduce)
        )
        for c, r, link in zip(costs, replicas, links)
    ]
    devices = device_loads(costs, stage_ms, model) if model.stages_per_device > 1 else []
    if devices:
        batch_ms = pipeline_ms(stage_ms, model.microbatches, [d.time_ms for d in devices])
        peak = max(d.memory_bytes for d in devices)
        estimates = [_estimate(model.schedule, batch_ms, peak, single, batch_size)]
    else:
        batch_ms = pipeline_ms(stage_ms, model.microbatches)
        estimates = [
            _estimate(schedule, batch_ms, _peak_memory(costs, model, schedule), single, batch_size)
            for schedule in ("gpipe", "1f1b")
        ]
    return Analysis(
        costs,
        replicas,
        list(links),
        stage_ms,
        lower_bound_ms,
        single,
        model.microbatches,
        batch_size,
        estimates,
        devices,
    )


def device_loads(
    costs: list[StageCost], stage_ms: list[float], model: CostModel
) -> list[DeviceLoad]:
    """Every device's stages, time per batch and memory, summed over its stages."""
    return [
        DeviceLoad(device, stages, time_ms, memory_bytes)
        for device, (stages, time_ms, memory_bytes) in enumerate(
            zip(
                device_stages(len(costs), model),
                device_totals(stage_ms, model),
                device_totals([c.memory_bytes for c in costs], model),
            )
        )
    ]


def _peak_memory(costs: list[StageCost], model: CostModel, schedule: str) -> int:
    """The largest stage memory if the stages ran ``schedule``."""
    scheduled = replace(model, schedule=schedule)
    return max(
        stage_memory(
            c.state_bytes,
            c.param_bytes,
            c.activation_bytes,
            c.input_bytes,
            s,
            len(costs),
            scheduled,
        )
        for s, c in enumerate(costs)
    )


def _estimate(
    schedule: str, batch_ms: float, peak: int, single_ms: float, batch_size: int | None
) -> ScheduleEstimate:
    return ScheduleEstimate(
        schedule=schedule,
        batch_ms=batch_ms,
        samples_per_s=batch_size / batch_ms * 1e3 if batch_size and batch_ms > 0 else None,
        speedup=single_ms / batch_ms if batch_ms > 0 else 1.0,
        peak_memory_bytes=peak,
    )
