"""The cost model: what a stage costs in time and memory. The one place these formulas live.

Costs are computed on the contracted graph (``autopipe.graph.contract``), whose nodes carry
``forward_ms``, ``backward_ms``, ``param_bytes``, ``state_bytes``, ``activation_bytes`` and
``sends`` (the values the node's group hands to other groups: name -> (bytes, requires_grad)).
Times are for one whole batch, as traced and profiled; a pipeline runs it as ``microbatches``
pieces.

- stage time = forward + backward + the time to send its outputs and to receive the gradients
  of those outputs (bytes / bandwidth; a gradient only where the value requires one). A value
  sent to several later stages is counted once. A stage replicated r times (data parallel)
  shares its compute among the replicas and adds the all-reduce of its gradients.
- links: on a hierarchical machine (``Level``s, innermost first) stage s runs on the devices
  after those of the stages before it, devices numbered level by level. A stage's transfers
  cross the link from its last device to the next stage's first, as PipeDream prices a cut,
  and its replicas all-reduce over the slowest link among their devices (``stage_links``).
- stage memory = weights and buffers + gradients + optimizer state + the activations of the
  microbatches in flight (their inputs and what the stage computes from them): GPipe keeps all
  m, 1F1B keeps min(p - s, m) on stage s. With recomputation a stage keeps only the inputs of the
  microbatches in flight, plus one microbatch's activations while it recomputes.
- devices: every stage has its own device(s), except under WPipe (ICLR'22), whose 2P stages
  form two groups of P: device d runs stage d of the first group and stage P + d of the second
  (``stage_device``). The first group keeps 2 versions of its weights, as PipeDream-2BW does,
  the second 1 (``CostModel.weight_versions``). For activations a WPipe stage s counts as a
  1F1B stage of the 2P-stage pipeline would, min(2P - s, m) microbatches in flight: the
  backward of a microbatch reaches stage s only after its forward and backward through the
  2P - s - 1 stages downstream, and a stage holds at most the m microbatches of one batch.
  This is an estimate, not WPipe's exact schedule (which moves the first group's next
  forwards ahead of the second group's backwards). A device's memory is the sum of its
  stages' (``device_totals``), and the memory limit applies to that sum.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import accumulate
from typing import Any

import networkx as nx

from autopipe.errors import UserError

SCHEDULES = ("1f1b", "gpipe", "wpipe")
OPTIMIZER_SLOTS = {"sgd": 1, "adam": 2, "adamw": 2}


@dataclass(frozen=True)
class CostModel:
    """The target machine and training setup that costs are measured against."""

    bandwidth: float = 12.0
    """Link bandwidth between stages, GB/s."""
    memory_limit: float | None = None
    """Bytes available on one device; None means no limit."""
    schedule: str = "1f1b"
    microbatches: int = 4
    optimizer_slots: int = 1
    """Tensors of optimizer state per parameter: 1 for SGD with momentum, 2 for Adam."""
    recomputation: bool = True

    def __post_init__(self) -> None:
        if self.bandwidth <= 0:
            raise UserError(f"--bw must be positive, got {self.bandwidth}")
        if self.schedule not in SCHEDULES:
            raise UserError(
                f"unknown schedule {self.schedule!r}; choose from {', '.join(SCHEDULES)}"
            )
        if self.microbatches < 1:
            raise UserError(f"--microbatches must be at least 1, got {self.microbatches}")
        if self.memory_limit is not None and self.memory_limit <= 0:
            raise UserError(f"--memory_limit must be positive, got {self.memory_limit}")

    def transfer_ms(self, nbytes: float) -> float:
        """Milliseconds to move ``nbytes`` over one link."""
        return nbytes / (self.bandwidth * 1e9) * 1e3

    @property
    def stages_per_device(self) -> int:
        """Stages one device runs: 2 under wpipe (one of each group), else 1."""
        return 2 if self.schedule == "wpipe" else 1

    def in_flight(self, stage: int, n_stages: int) -> int:
        """Microbatches whose activations stage ``stage`` holds at once."""
        if self.schedule == "gpipe":
            return self.microbatches
        return min(n_stages - stage, self.microbatches)

    def weight_versions(self, stage: int, n_stages: int) -> int:
        """Copies of its weights stage ``stage`` keeps: 2 in wpipe's first group, else 1."""
        if self.schedule == "wpipe" and stage < n_stages // 2:
            return 2
        return 1


def stage_device(stage: int, n_stages: int, model: CostModel) -> int:
    """The device that runs ``stage``: under wpipe stage s of 2P runs on device s mod P (device
    d holds partition d of each group); otherwise stage s runs on device s."""
    return stage % (n_stages // model.stages_per_device)


def device_stages(n_stages: int, model: CostModel) -> list[tuple[int, ...]]:
    """The stages each device runs, device by device."""
    devices: list[tuple[int, ...]] = [() for _ in range(n_stages // model.stages_per_device)]
    for stage in range(n_stages):
        devices[stage_device(stage, n_stages, model)] += (stage,)
    return devices


def device_totals(per_stage: Sequence[Any], model: CostModel) -> list[Any]:
    """A per-stage quantity (memory, time) summed over the stages of every device."""
    if model.stages_per_device == 1:
        return list(per_stage)
    return [sum(per_stage[s] for s in stages) for stages in device_stages(len(per_stage), model)]


@dataclass(frozen=True)
class Level:
    """One level of a hierarchical machine: how many units it groups, and their link speed."""

    count: int
    bandwidth: float
    """GB/s between the units of this level."""


def link_bandwidth(a: int, b: int, levels: Sequence[Level], default: float) -> float:
    """GB/s of the link between devices ``a`` and ``b``: that of the outermost level whose units
    tell them apart. Devices are numbered level by level, innermost first: with ``-n 8 2``,
    devices 0-7 form server 0 and 8-15 server 1, so 7 and 8 talk over the level-2 link.
    Without levels every link is ``default``."""
    bandwidth, unit = default, 1
    for level in levels:
        if a // unit != b // unit:
            bandwidth = level.bandwidth
        unit *= level.count
    return bandwidth


@dataclass(frozen=True)
class StageLinks:
    """The links a stage's transfers cross, in GB/s."""

    send: float
    """Its values and their gradients: from its last device to the next stage's first."""
    reduce: float
    """Its replicas' gradient all-reduce: the slowest link among its devices."""


def stage_links(first: int, replicas: int, levels: Sequence[Level], default: float) -> StageLinks:
    """The links of a stage run on devices ``first`` .. ``first + replicas - 1``, the next stage
    starting on the device after. Every value the stage sends, whichever later stage reads it,
    is priced at the link after it, as PipeDream prices a cut."""
    last = first + replicas - 1
    inner = [link_bandwidth(d, d + 1, levels, default) for d in range(first, last)]
    return StageLinks(link_bandwidth(last, last + 1, levels, default), min(inner, default=default))


def pipeline_links(
    replicas: Sequence[int], levels: Sequence[Level], default: float
) -> list[StageLinks]:
    """The links of every stage, stage s on the devices after those of the stages before it."""
    firsts = accumulate(replicas, initial=0)
    return [stage_links(first, r, levels, default) for first, r in zip(firsts, replicas)]


@dataclass(frozen=True)
class StageCost:
    """Time and memory of one stage, for one whole batch."""

    forward_ms: float
    backward_ms: float
    comm_ms: float
    send_bytes: int
    grad_bytes: int
    param_bytes: int
    state_bytes: int
    activation_bytes: int
    input_bytes: int
    memory_bytes: int

    @property
    def compute_ms(self) -> float:
        return self.forward_ms + self.backward_ms

    @property
    def time_ms(self) -> float:
        return self.compute_ms + self.comm_ms


def replicated_ms(
    compute_ms: Any, comm_ms: Any, param_bytes: Any, replicas: int, model: CostModel
) -> Any:
    """A stage run by ``replicas`` data-parallel copies: compute shared among them, its own
    transfers, and the all-reduce of its gradients, 4 (r - 1) P / (B r). Works on arrays too."""
    if replicas <= 1:
        return compute_ms + comm_ms
    return (
        compute_ms / replicas
        + comm_ms
        + model.transfer_ms(4.0 * (replicas - 1) * param_bytes / replicas)
    )


def node_compute_ms(coarse: nx.DiGraph, node: int) -> float:
    data = coarse.nodes[node]
    return data.get("forward_ms", 0.0) + data.get("backward_ms", 0.0)


def stage_costs(
    coarse: nx.DiGraph,
    stage_of: dict[int, int],
    n_stages: int,
    model: CostModel,
    send_bandwidth: Sequence[float] | None = None,
) -> list[StageCost]:
    """The cost of every stage of an assignment of contracted nodes to stages; each stage's
    transfers over a link of ``send_bandwidth[s]`` GB/s (default: the model's bandwidth)."""
    links = [
        model if send_bandwidth is None else replace(model, bandwidth=send_bandwidth[s])
        for s in range(n_stages)
    ]
    sums = [dict(forward=0.0, backward=0.0, params=0, state=0, acts=0) for _ in range(n_stages)]
    sends: list[dict[str, tuple[int, bool]]] = [{} for _ in range(n_stages)]
    receives: list[dict[str, int]] = [{} for _ in range(n_stages)]
    for node, data in coarse.nodes(data=True):
        s = stage_of[node]
        sums[s]["forward"] += data.get("forward_ms", 0.0)
        sums[s]["backward"] += data.get("backward_ms", 0.0)
        sums[s]["params"] += data.get("param_bytes", 0)
        sums[s]["state"] += data.get("state_bytes", 0)
        sums[s]["acts"] += data.get("activation_bytes", 0)
    for u, v, edge in coarse.edges(data=True):
        if stage_of[u] == stage_of[v]:
            continue
        produced = coarse.nodes[u].get("sends", {})
        for name in edge.get("values", ()):
            nbytes, grad = produced.get(name, (0, False))
            sends[stage_of[u]][name] = (nbytes, grad)
            receives[stage_of[v]][name] = nbytes
    costs = []
    for s in range(n_stages):
        send_bytes = sum(b for b, _ in sends[s].values())
        grad_bytes = sum(b for b, g in sends[s].values() if g)
        input_bytes = sum(receives[s].values())
        costs.append(
            StageCost(
                forward_ms=sums[s]["forward"],
                backward_ms=sums[s]["backward"],
                comm_ms=links[s].transfer_ms(send_bytes + grad_bytes),
                send_bytes=send_bytes,
                grad_bytes=grad_bytes,
                param_bytes=sums[s]["params"],
                state_bytes=sums[s]["state"],
                activation_bytes=sums[s]["acts"],
                input_bytes=input_bytes,
                memory_bytes=stage_memory(
                    sums[s]["state"],
                    sums[s]["params"],
                    sums[s]["acts"],
                    input_bytes,
                    s,
                    n_stages,
                    model,
                ),
            )
        )
    return costs


def stage_memory(
    state_bytes: int,
    param_bytes: int,
    activation_bytes: int,
    input_bytes: int,
    stage: int,
    n_stages: int,
    model: CostModel,
) -> int:
    """Bytes one device needs for a stage: state, the extra weight versions it keeps, gradients,
    optimizer state, activations."""
    inputs = input_bytes / model.microbatches
    produced = activation_bytes / model.microbatches
    in_flight = model.in_flight(stage, n_stages)
    if model.recomputation:
        activations = in_flight * inputs + produced
    else:
        activations = in_flight * (inputs + produced)
    extra_versions = model.weight_versions(stage, n_stages) - 1
    return int(
        state_bytes + param_bytes * (extra_versions + 1 + model.optimizer_slots) + activations
    )


def lower_bound_ms(coarse: nx.DiGraph, n_stages: int) -> float:
    """No partition's slowest stage can beat max(total compute / p, costliest single node)."""
    costs = [node_compute_ms(coarse, n) for n in coarse.nodes]
    return max(sum(costs) / n_stages, max(costs, default=0.0))


def check_memory(costs: list[StageCost], model: CostModel) -> None:
    """Raise a UserError naming the first device over the memory limit: its stage, or under
    wpipe the device and its two stages, whose memory it sums."""
    if model.memory_limit is None:
        return
    needs = device_totals([cost.memory_bytes for cost in costs], model)
    for device, (stages, need) in enumerate(zip(device_stages(len(costs), model), needs)):
        if need > model.memory_limit:
            where = (
                f"stage {stages[0]}"
                if len(stages) == 1
                else f"device {device} (stages {' and '.join(map(str, stages))})"
            )
            raise UserError(
                f"{where} needs {need / 1e9:.2f} GB, the limit is "
                f"{model.memory_limit / 1e9:.2f} GB: raise -p or --memory_limit"
            )
