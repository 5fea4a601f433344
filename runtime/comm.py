"""Point-to-point transfers of a pipeline's values between stages.

Every value in ``PIPELINE`` goes straight from the stage that produces it to each stage that
consumes it, adjacent or not; model inputs come from rank 0, which reads the data. Both sides
walk the same list of transfers (PIPELINE order), so sends and receives pair up without any
message saying what is coming. Receive buffers are shaped from PIPELINE with the batch dimension
set to the microbatch's size, which every rank knows, so batches of any size work.

Each direction between two stages is a channel of its own, a two-rank process group: values go
from ``src`` to ``dst`` on one, their gradients come back on another. Both ends put messages on a
channel in the same order (schedule order, then PIPELINE order), so every channel is a FIFO with
one sender and one receiver (on gloo, whose sends never wait, all channels share the default
group). Where a stage has replicas (:mod:`runtime.layout`), channels join ranks, not stages: a
microbatch's values go from the rank that runs it on one stage to the rank that runs it on the
next. Sends are asynchronous, each kept with its tensor until it completes (see
:class:`StageComm`); a receive blocks only its own rank. With NCCL, where a send does
not complete until its receive is posted, a pending send therefore holds up only later sends on
its own channel, never a receive or another channel, and a schedule that is deadlock-free when
sends never block (what :meth:`runtime.schedule.Schedule.validate` checks) runs without deadlock.

Receives may be posted ahead (:meth:`StageComm.post_receives`), while the rank still computes
the action before the one that needs them: a transfer moves only once both of its ends are
posted (gloo's, like NCCL's, waits for the receive), so a receive posted late costs a round trip
between the processes on top of the data, and one posted ahead lets the data arrive during that
computation. Posting never blocks, and both ends still post a channel's messages in schedule
order, so the FIFO pairing and the deadlock argument above are unchanged. The runtime posts
ahead on gloo, where it was measured; on NCCL, where a posted receive is a kernel waiting on
the GPU beside the other channels' and no run across several GPUs has been made yet, a receive
is posted when its action needs it.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from runtime.layout import Layout

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


FORWARD_CHANNEL, BACKWARD_CHANNEL = "values", "gradients"


ChannelKey = tuple[int, int, str, int, int]
"""A channel: (sending rank, receiving rank, kind, sending stage, receiving stage)."""


def make_channels(
    pipeline: Mapping[str, Any], layout: Layout, separate: bool = True
) -> dict[ChannelKey, Any]:
    """One two-rank process group per direction between each pair of stages that exchange
    values, on each pair of ranks that run them: values from src to dst, and gradients back
    where any of them carries one. Every rank must call this in the same order (``new_group``
    is collective). A rank that runs both stages passes values in memory, with no channel.

    With ``separate=False`` every channel is the default group (None): right for gloo, whose
    sends never wait for their receives and whose tags tell transfers apart, and faster there
    than a group, with its own connections and threads, per channel."""
    specs = value_specs(pipeline)
    pairs: dict[tuple[int, int, int, int], bool] = {}
    for t in transfers(pipeline):
        for src, dst in layout.rank_pairs(t.src, t.dst):
            if src != dst:
                key = (src, dst, t.src, t.dst)
                pairs[key] = pairs.get(key, False) or carries_gradient(specs[t.name])
    channels: dict[ChannelKey, Any] = {}
    for (src, dst, src_stage, dst_stage), with_gradients in sorted(pairs.items()):
        kinds = (FORWARD_CHANNEL, BACKWARD_CHANNEL) if with_gradients else (FORWARD_CHANNEL,)
        for kind in kinds:
            channels[(src, dst, kind, src_stage, dst_stage)] = (
                dist.new_group(ranks=sorted((src, dst))) if separate else None
            )
    return channels


class SendWaiter:
    """Waits for posted sends in a thread of its own, oldest first, and lets each go (its work
    and tensor) once it has completed.

    A gloo send never says it has completed (its ``is_completed`` stays false until someone
    waits for it), and waiting for it where it was posted could deadlock: it completes only
    once its receiver posts the receive, which may wait on this rank's next sends. Waiting in
    another thread blocks only that thread (``wait`` lets go of the GIL), so the sends of an
    asynchronous run, which drains only at its end, are freed as they land instead of piling
    up with their tensors for the whole run."""

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[dist.Work, torch.Tensor] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="autopipe-sends", daemon=True)
        self._thread.start()

    def add(self, work: dist.Work, tensor: torch.Tensor) -> None:
        """Wait for ``work``, the send of ``tensor``, after those added before it."""
        self._raise_error()
        self._queue.put((work, tensor))

    @property
    def pending(self) -> int:
        """Sends added and not yet completed."""
        return self._queue.unfinished_tasks

    def wait(self) -> None:
        """Block until every send added so far has completed; raise what a wait raised."""
        self._queue.join()
        self._raise_error()

    def close(self) -> None:
        """Stop the thread once the sends added so far are waited for."""
        self._queue.put(None)
        self._thread.join()

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:
                    item[0].wait()
            except BaseException as error:  # handed to the caller of add or wait
                self._error = error
            finally:
                item = None  # the work and its tensor go now, not after the next get
                self._queue.task_done()


class StageComm:
    """The sends and receives of one stage, forward (values) and backward (their gradients).

    Each send is kept with its tensor until it completes. NCCL's sends say when they have
    (``query_sends``), and a later send lets the completed ones go. gloo's never say so: they
    are kept until :meth:`wait_sends` (a synchronous schedule's, at the end of each step), or,
    with ``send_waiter`` (an asynchronous run, which waits only at its end), a
    :class:`SendWaiter` lets each go as it lands."""

    def __init__(
        self,
        pipeline: Mapping[str, Any],
        layout: Layout,
        rank: int,
        device: torch.device,
        channels: Mapping[ChannelKey, Any],
        stage: int | None = None,
        mailbox: dict[tuple[str, int, int], torch.Tensor] | None = None,
        post_ahead: bool = True,
        send_waiter: bool = False,
        query_sends: bool = True,
    ) -> None:
        self.rank = rank
        self.post_ahead = post_ahead
        self.query_sends = query_sends
        self.layout = layout
        self.device = device
        self.specs = value_specs(pipeline)
        stage = layout.role(rank).stage if stage is None else stage
        self.stage = stage
        # values and gradients passed between two stages of this rank, by kind, tag, microbatch
        self.mailbox: dict[tuple[str, int, int], torch.Tensor] = {} if mailbox is None else mailbox
        every = transfers(pipeline)
        self.incoming = [t for t in every if t.dst == stage]
        self.outgoing = [t for t in every if t.src == stage]
        self.channels = channels
        # posted sends, each with its tensor, kept alive until they complete
        self._pending: list[tuple[dist.Work, torch.Tensor]] = []
        self._waiter = SendWaiter() if send_waiter else None
        # receives posted ahead, by kind and microbatch: (transfer, buffer, work)
        self._posted: dict[tuple[str, int], list[tuple[Transfer, torch.Tensor, Any]]] = {}
        self.waited = 0.0
        """Seconds spent so far blocked on messages (:meth:`waiting`): what a trace shows."""

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """Count the time inside as waiting for messages in :attr:`waited`."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.waited += time.perf_counter() - started

    def _post_sends(self, sends: list[tuple[torch.Tensor, int, Any, int]]) -> None:
        """Post every (tensor, dst, group, tag) send without waiting."""
        if sends and self.query_sends and self._waiter is None:
            self._release_completed()
        for tensor, dst, group, tag in sends:
            work = dist.isend(tensor, dst, group=group, tag=tag)
            if self._waiter is None:
                self._pending.append((work, tensor))
            else:
                self._waiter.add(work, tensor)

    def _release_completed(self) -> None:
        """Forget sends that have completed, so their tensors can be freed before the step."""
        self._pending = [
            (work, tensor) for work, tensor in self._pending if not work.is_completed()
        ]

    def _peer(self, stage: int, microbatch: int) -> int:
        """The rank that runs ``microbatch`` on ``stage``."""
        return self.layout.rank_of(stage, microbatch)

    def _take(self, kind: str, transfer: Transfer, microbatch: int) -> torch.Tensor:
        """A value (or gradient) another stage of this rank left for ``microbatch``; the
        schedule runs the producer first, so it is there."""
        try:
            return self.mailbox.pop((kind, transfer.tag, microbatch))
        except KeyError:
            raise RuntimeError(
                f"stage {self.stage} needs {kind} of {transfer.name!r} for microbatch "
                f"{microbatch} before stage {transfer.src if kind == FORWARD_CHANNEL else transfer.dst} "
                "on the same rank made it: the schedule runs them out of order"
            ) from None

    def post_receives(self, kind: str, microbatch: int, batch: int) -> None:
        """Post now, where this comm posts ahead, the receives from other ranks of
        ``microbatch`` (``batch`` samples): its values (``FORWARD_CHANNEL``) or its outputs'
        gradients (``BACKWARD_CHANNEL``). The receive of that kind waits for them."""
        if self.post_ahead:
            self._post_receives(kind, microbatch, batch)

    def _post_receives(self, kind: str, microbatch: int, batch: int) -> None:
        """Post the receives of ``microbatch`` of this kind, unless they are posted already."""
        key = (kind, microbatch)
        if key in self._posted:
            return
        receives = []
        if kind == FORWARD_CHANNEL:
            for t in self.incoming:
                src = self._peer(t.src, microbatch)
                if src != self.rank:
                    channel = self.channels[(src, self.rank, FORWARD_CHANNEL, t.src, t.dst)]
                    receives.append((t, src, channel))
        else:
            for t in self.outgoing:
                dst = self._peer(t.dst, microbatch)
                if carries_gradient(self.specs[t.name]) and dst != self.rank:
                    channel = self.channels[(self.rank, dst, BACKWARD_CHANNEL, t.src, t.dst)]
                    receives.append((t, dst, channel))
        posted = []
        for t, peer, channel in receives:
            # a gradient has the shape of the value it came from, which its sender received
            # into a buffer of this shape
            buffer = buffer_for(self.specs[t.name], batch, self.device)
            posted.append((t, buffer, dist.irecv(buffer, peer, group=channel, tag=t.tag)))
        self._posted[key] = posted

    def _received(self, kind: str, microbatch: int, batch: int) -> dict[int, torch.Tensor]:
        """The remote receives of ``microbatch`` of this kind, by transfer tag, once they are in."""
        self._post_receives(kind, microbatch, batch)
        posted = self._posted.pop((kind, microbatch))
        with self.waiting():
            for _, _, work in posted:
                work.wait()
        return {t.tag: buffer for t, buffer, _ in posted}

    def receive_values(self, microbatch: int, batch: int) -> dict[str, torch.Tensor]:
        """This stage's inputs from other stages for ``microbatch``, of ``batch`` samples."""
        remote = self._received(FORWARD_CHANNEL, microbatch, batch)
        received: dict[str, torch.Tensor] = {}
        for t in self.incoming:
            if t.tag in remote:
                received[t.name] = remote[t.tag]
            else:
                received[t.name] = self._take(FORWARD_CHANNEL, t, microbatch)
        return received

    def send_values(self, microbatch: int, values: Mapping[str, torch.Tensor]) -> None:
        """Send each value of ``microbatch`` this stage produces (or, on the first stage,
        reads) to every consumer."""
        sends = []
        for t in self.outgoing:
            dst = self._peer(t.dst, microbatch)
            if dst == self.rank:
                self.mailbox[(FORWARD_CHANNEL, t.tag, microbatch)] = values[t.name].detach().clone()
                continue
            channel = self.channels[(self.rank, dst, FORWARD_CHANNEL, t.src, t.dst)]
            sends.append((values[t.name].detach().contiguous(), dst, channel, t.tag))
        self._post_sends(sends)

    def receive_gradients(
        self, microbatch: int, batch: int, outputs: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Gradients of this stage's ``outputs`` for ``microbatch`` (``batch`` samples), summed
        over the stages that consume them."""
        remote = self._received(BACKWARD_CHANNEL, microbatch, batch)
        grads: dict[str, torch.Tensor] = {}
        for t in self.outgoing:
            if t.name not in outputs or not carries_gradient(self.specs[t.name]):
                continue
            if self._peer(t.dst, microbatch) == self.rank:
                grad = self._take(BACKWARD_CHANNEL, t, microbatch)
            else:
                grad = remote[t.tag]
            grads[t.name] = grads[t.name] + grad if t.name in grads else grad
        return grads

    def send_gradients(self, microbatch: int, inputs: Mapping[str, torch.Tensor]) -> None:
        """Send the gradient of each received input back to the rank that sent it."""
        sends = []
        for t in self.incoming:
            if carries_gradient(self.specs[t.name]):
                value = inputs[t.name]
                grad = torch.zeros_like(value) if value.grad is None else value.grad
                src = self._peer(t.src, microbatch)
                if src == self.rank:
                    self.mailbox[(BACKWARD_CHANNEL, t.tag, microbatch)] = grad
                    continue
                channel = self.channels[(src, self.rank, BACKWARD_CHANNEL, t.src, t.dst)]
                sends.append((grad.contiguous(), src, channel, t.tag))
        self._post_sends(sends)

    @property
    def pending_sends(self) -> int:
        """Sends posted and kept until they complete (or until they are found completed)."""
        return len(self._pending) + (0 if self._waiter is None else self._waiter.pending)

    def wait_sends(self) -> None:
        """Block until every send posted so far has completed, so its tensor may be freed."""
        if self._waiter is not None:
            self._waiter.wait()
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()

    def close(self) -> None:
        """Wait for the sends posted so far and stop waiting in the background."""
        self.wait_sends()
        if self._waiter is not None:
            self._waiter.close()
            self._waiter = None
