"""Point-to-point transfers of a pipeline's values between stages.

Every value in ``PIPELINE`` goes straight from the stage that produces it to each stage that
consumes it, adjacent or not; model inputs come from rank 0, which reads the data. Both sides
walk the same list of transfers (PIPELINE order), so sends and receives pair up without any
message saying what is coming. Receive buffers are shaped from PIPELINE with the batch dimension
set to the microbatch's size, which every rank knows, so batches of any size work.

Sends are asynchronous and kept until :meth:`StageComm.wait_sends`; receives are posted together
with ``batch_isend_irecv`` and waited on at once. A schedule that is deadlock-free when sends
never block therefore runs without deadlock here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

MODEL_INPUT_SOURCE = 0


@dataclass(frozen=True)
class Transfer:
    """Value ``name`` going from stage ``src`` to stage ``dst``; ``tag`` is its place in the list."""

    name: str
    src: int
    dst: int
    tag: int


def value_specs(pipeline: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """Every value's spec by name, across stages (each stage lists the values it touches)."""
    specs: dict[str, Mapping[str, Any]] = {}
    for stage in pipeline["stages"]:
        for name, spec in stage["values"].items():
            specs.setdefault(name, spec)
    return specs


def transfers(pipeline: Mapping[str, Any]) -> list[Transfer]:
    """All values crossing stage boundaries, in PIPELINE order: stage by stage, input by input."""
    specs = value_specs(pipeline)
    found: list[Transfer] = []
    for dst, stage in enumerate(pipeline["stages"]):
        for name in stage["inputs"]:
            producer = specs[name]["producer"]
            src = MODEL_INPUT_SOURCE if producer is None else producer
            if src != dst:
                found.append(Transfer(name, src, dst, len(found)))
    return found


def carries_gradient(spec: Mapping[str, Any]) -> bool:
    """A value sends a gradient back only if it needs one and a stage produced it."""
    dtype = getattr(torch, spec["dtype"])
    return bool(spec["requires_grad"]) and spec["producer"] is not None and dtype.is_floating_point


def buffer_for(spec: Mapping[str, Any], batch: int, device: torch.device) -> torch.Tensor:
    """An empty tensor shaped like the value, its batch dimension set to ``batch``."""
    shape = list(spec["shape"])
    if spec.get("batch_dim") is not None:
        shape[spec["batch_dim"]] = batch
    return torch.empty(shape, dtype=getattr(torch, spec["dtype"]), device=device)


class StageComm:
    """The sends and receives of one stage, forward (values) and backward (their gradients)."""

    def __init__(self, pipeline: Mapping[str, Any], rank: int, device: torch.device) -> None:
        self.rank = rank
        self.device = device
        self.specs = value_specs(pipeline)
        every = transfers(pipeline)
        self.incoming = [t for t in every if t.dst == rank]
        self.outgoing = [t for t in every if t.src == rank]
        # posted sends, each batch's works with its tensors, kept alive until they complete
        self._pending: list[tuple[list[dist.Work], list[torch.Tensor]]] = []

    def _wait_receives(self, ops: list[dist.P2POp]) -> None:
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()

    def _post_sends(self, ops: list[dist.P2POp]) -> None:
        if ops:
            self._release_completed()
            self._pending.append((dist.batch_isend_irecv(ops), [op.tensor for op in ops]))

    def _release_completed(self) -> None:
        """Forget sends that have completed, so their tensors can be freed before the step."""
        self._pending = [
            (works, tensors)
            for works, tensors in self._pending
            if not all(work.is_completed() for work in works)
        ]

    def receive_values(self, batch: int) -> dict[str, torch.Tensor]:
        """This stage's inputs from other stages for a microbatch of ``batch`` samples."""
        received: dict[str, torch.Tensor] = {}
        ops = []
        for t in self.incoming:
            received[t.name] = buffer_for(self.specs[t.name], batch, self.device)
            ops.append(dist.P2POp(dist.irecv, received[t.name], t.src, tag=t.tag))
        self._wait_receives(ops)
        return received

    def send_values(self, values: Mapping[str, torch.Tensor]) -> None:
        """Send each value this stage produces (or, on rank 0, reads) to every consumer."""
        ops = [
            dist.P2POp(dist.isend, values[t.name].detach().contiguous(), t.dst, tag=t.tag)
            for t in self.outgoing
        ]
        self._post_sends(ops)

    def receive_gradients(self, outputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Gradients of this stage's outputs, summed over the stages that consume them."""
        ops = []
        parts: list[tuple[str, torch.Tensor]] = []
        for t in self.outgoing:
            if t.name in outputs and carries_gradient(self.specs[t.name]):
                buffer = torch.empty_like(outputs[t.name], memory_format=torch.contiguous_format)
                parts.append((t.name, buffer))
                ops.append(dist.P2POp(dist.irecv, buffer, t.dst, tag=t.tag))
        self._wait_receives(ops)
        grads: dict[str, torch.Tensor] = {}
        for name, grad in parts:
            grads[name] = grads[name] + grad if name in grads else grad
        return grads

    def send_gradients(self, inputs: Mapping[str, torch.Tensor]) -> None:
        """Send the gradient of each received input back to the stage that sent it."""
        ops = []
        for t in self.incoming:
            if carries_gradient(self.specs[t.name]):
                value = inputs[t.name]
                grad = torch.zeros_like(value) if value.grad is None else value.grad
                ops.append(dist.P2POp(dist.isend, grad.contiguous(), t.src, tag=t.tag))
        self._post_sends(ops)

    def wait_sends(self) -> None:
        """Block until every send posted so far has completed, so its tensor may be freed."""
        for works, _ in self._pending:
            for work in works:
                work.wait()
        self._pending.clear()
