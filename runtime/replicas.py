"""Data-parallel replicas of a stage: torch's DistributedDataParallel over the stage's ranks.

Each replica runs its own microbatches of a batch (:mod:`runtime.layout`) and accumulates their
gradients; its last backward before a step all-reduces them with the other replicas, bucket by
bucket while the backward runs, as DDP does. Two things differ from DDP's plain use:

- The gradients are summed, not averaged: every microbatch's loss already carries its share of
  the batch, so the sum over all replicas is the gradient of the batch's mean loss, the one a
  single process training the original model computes. Schedules that step after every
  backward (PipeDream's) average instead: each microbatch is a minibatch of its own there, and
  the replicas' side-by-side microbatches make one larger one.
- Which backward reduces is chosen at backward time, not at forward time: 1F1B runs forwards of
  later microbatches before the backwards of earlier ones, so the forwards all run without
  synchronisation and the reducer is armed just before the step's last backward (what
  ``torch.distributed.pipelining`` does for DDP stages too).

Buffers (batch-norm statistics) are not broadcast: each replica keeps those of its own
microbatches, and checkpoints take replica 0's.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from runtime.layout import Layout


def replica_groups(layout: Layout) -> list[Any]:
    """A process group per stage over its replicas (None for a stage with one rank). Every
    rank must call this at the same point: ``new_group`` is collective."""
    return [
        dist.new_group(ranks=list(layout.ranks_of(stage))) if layout.replicas[stage] > 1 else None
        for stage in range(layout.n_stages)
    ]


def _sum_gradients(group, bucket):  # type: ignore[no-untyped-def]
    """DDP communication hook: all-reduce a bucket of gradients (a ``dist.GradBucket``) as a
    sum. Left unannotated: DDP checks the annotation as an object, and this module's are text."""
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda done: done.value()[0])


def _average_gradients(group, bucket):  # type: ignore[no-untyped-def]
    """DDP communication hook: all-reduce a bucket of gradients as a mean over the group."""
    size = dist.get_world_size(group)
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda done: done.value()[0].div_(size))


def _no_buffer_sync() -> dict[str, bool]:
    """DDP's option to leave buffers alone in forward, by the name this torch knows."""
    parameters = inspect.signature(DistributedDataParallel.__init__).parameters
    if "forward_sync_buffers" in parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


class StageReplica:
    """A stage wrapped for its replicas: forwards without synchronisation, and a context in
    which a backward sums the accumulated gradients over the replicas."""

    def __init__(
        self, stage: nn.Module, group: Any, device: torch.device, average: bool = False
    ) -> None:
        self.group = group
        self.ddp = DistributedDataParallel(
            stage,
            device_ids=[device] if device.type == "cuda" else None,
            process_group=group,
            **_no_buffer_sync(),
        )
        self.ddp.register_comm_hook(group, _average_gradients if average else _sum_gradients)

    def __call__(self, *args: torch.Tensor) -> Any:
        with self.ddp.no_sync():
            return self.ddp(*args)

    @contextlib.contextmanager
    def reducing(self, outputs: Sequence[torch.Tensor]) -> Iterator[None]:
        """Arm the reducer for the backward of ``outputs`` run inside: it all-reduces the
        accumulated gradients. A generated stage holds only parameters its forward uses, so
        every one of them gets a gradient (DDP's ``find_unused_parameters`` is not needed)."""
        self.ddp.reducer.prepare_for_backward(list(outputs))
        yield
