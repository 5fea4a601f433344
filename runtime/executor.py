"""Run a schedule's actions on this rank: its F, B and S actions, in order.

The executor knows nothing about GPipe, 1F1B or PipeDream; it runs the action list it is given
(:func:`run_stages`): one batch's, or a segment's of an asynchronous run (the whole run, or the
steps between two checkpoints), with no microbatch in flight at its start or end. A forward
keeps the microbatch's inputs and outputs until its backward, which frees them. The last stage
turns outputs into a loss times the microbatch's weight (:class:`Feed`): its share of the batch
when the gradients of a batch are summed before a step, so that they are those of the mean loss
over the batch.

Actions that name a weight version compute with that version (:class:`VersionStore`): an F
with the version or PipeOptim's prediction, a B (and the forward it recomputes) with the
version, and an S keeps the versions later computes still use.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from runtime.comm import BACKWARD_CHANNEL, FORWARD_CHANNEL, StageComm
from runtime.layout import Layout
from runtime.replicas import StageReplica
from runtime.schedule import BACKWARD, FORWARD, STEP, Action, last_backwards
from runtime.weights import VersionStore, forwards_to_record, versions_to_keep

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LossHook = Callable[[int, torch.Tensor], None]
"""Told, on the last stage, each microbatch's run index and its loss (not weighted), a detached
scalar tensor on the stage's device: reading it waits for that device, so a hook that reads
only once per step keeps a GPU's queue full."""


@dataclass
class _Saved:
    """What a forward keeps for its backward: the received values and the outputs, or, when
    recomputing, the stage's arguments and the random state to run the forward again."""

    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor] | None
    args: list[torch.Tensor] | None = None
    rng: tuple[torch.Tensor, torch.Tensor | None] | None = None


@dataclass(frozen=True)
class Feed:
    """What the executor reads about the microbatches its actions name, looked up by run index
    when an action needs it, so that one action list may span many steps without holding their
    data: microbatch i of the list is microbatch ``first + i`` of the run.

    ``size_of(k)``: its samples; ``weight_of(k)``: the factor on its loss; ``inputs_for(k)``:
    its model inputs (rank 0); ``labels_for(k)``: its labels (last rank).
    """

    size_of: Callable[[int], int]
    weight_of: Callable[[int], float]
    inputs_for: Callable[[int], Mapping[str, torch.Tensor]] | None = None
    labels_for: Callable[[int], torch.Tensor] | None = None
    first: int = 0


@dataclass(frozen=True)
class TraceRecord:
    """When one action ran on one stage: ``perf_counter`` seconds of that process, and how many
    of them it spent waiting for messages (receives, the tied all-reduce) rather than computing.
    On NCCL a receive's wait holds up the GPU, not the process, so there the wait shows in the
    action's span (its end waits for the GPU) and not in ``waited``."""

    stage: int
    name: str
    kind: str
    start: float
    end: float
    waited: float = 0.0


@dataclass(frozen=True)
class TiedGroup:
    """This stage's copies of one tied parameter, and the group of ranks that hold a copy.

    ``share`` is this rank's factor on its copies' gradient before the sum over the group: one
    over its stage's replicas, which all hold that stage's whole gradient once they have summed
    theirs."""

    parameters: tuple[nn.Parameter, ...]
    ranks: tuple[int, ...]
    group: Any
    share: float = 1.0


def microbatch_sizes(batch: int, n_microbatches: int) -> list[int]:
    """The sizes ``torch.tensor_split`` gives a batch of ``batch`` cut into ``n_microbatches``:
    the first ``batch % n_microbatches`` one sample larger than the rest."""
    base, larger = divmod(batch, n_microbatches)
    return [base + 1] * larger + [base] * (n_microbatches - larger)


def split_microbatches(
    tensors: Mapping[str, torch.Tensor], batch_dims: Mapping[str, int | None], n_microbatches: int
) -> list[dict[str, torch.Tensor]]:
    """Cut each tensor along its batch dimension; one without a batch dimension goes to all."""
    parts = [{} for _ in range(n_microbatches)]
    for name, tensor in tensors.items():
        dim = batch_dims[name]
        pieces = (
            [tensor] * n_microbatches
            if dim is None
            else tensor.tensor_split(n_microbatches, dim=dim)
        )
        for part, piece in zip(parts, pieces):
            part[name] = piece
    return parts


def tied_groups(
    pipeline: Mapping[str, Any], layout: Layout, rank: int, stages: Mapping[int, nn.Module]
) -> list[TiedGroup]:
    """One process group per tied parameter held by several stages, over every rank of those
    stages, made in the same order on every rank (``new_group`` is collective); only the groups
    holding this rank are returned, with the copies that ``stages`` (this rank's, by index)
    hold."""
    named = {
        (index, key): parameter
        for index, stage in stages.items()
        for key, parameter in stage.named_parameters(remove_duplicate=False)
    }
    groups = []
    for members in pipeline.get("tied_parameters", []):
        holders = sorted({member_stage for member_stage, _ in members})
        if len(holders) < 2:
            continue
        ranks = tuple(sorted({r for s in holders for r in layout.ranks_of(s)}))
        group = dist.new_group(ranks=list(ranks))
        if rank not in ranks:
            continue
        unique = {id(named[(s, key)]): named[(s, key)] for s, key in members if s in stages}
        share = 1.0 / max(layout.replicas[s] for s in stages)
        groups.append(TiedGroup(tuple(unique.values()), ranks, group, share))
    return groups


def synchronize_tied(groups: Sequence[TiedGroup]) -> None:
    """Give every copy of a tied parameter the value of the lowest stage holding it."""
    with torch.no_grad():
        for tied in groups:
            first = tied.parameters[0]
            dist.broadcast(first.data, src=tied.ranks[0], group=tied.group)
            for other in tied.parameters[1:]:
                other.data.copy_(first.data)


def reduce_tied_gradients(groups: Sequence[TiedGroup]) -> None:
    """Sum the gradients of a tied parameter over its copies, as the original model does."""
    for tied in groups:
        local = [p.grad if p.grad is not None else torch.zeros_like(p) for p in tied.parameters]
        total = torch.stack(local).sum(0) if len(local) > 1 else local[0].clone()
        if tied.share != 1.0:
            total.mul_(tied.share)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=tied.group)
        for parameter in tied.parameters:
            parameter.grad = total.clone() if len(tied.parameters) > 1 else total


def _cuda_devices(tensors: Sequence[torch.Tensor]) -> list[int]:
    return sorted({t.device.index or 0 for t in tensors if t.is_cuda})


def _capture_rng(args: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The CPU random state and, when the stage runs on a GPU, that GPU's."""
    devices = _cuda_devices(args)
    cuda = torch.cuda.get_rng_state(devices[0]) if devices else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def _replayed_rng(
    rng: tuple[torch.Tensor, torch.Tensor | None], args: Sequence[torch.Tensor]
) -> Iterator[None]:
    """Run a block with the random state of an earlier forward, leaving the current one as is."""
    devices = _cuda_devices(args)
    with torch.random.fork_rng(devices=devices[:1]):
        torch.set_rng_state(rng[0])
        if devices and rng[1] is not None:
            torch.cuda.set_rng_state(rng[1], devices[0])
        yield


class Executor:
    """Runs a stage's actions, exchanging values and gradients through ``comm``.

    With ``replica`` (the stage has data-parallel replicas) the stage runs through it, and the
    last backward before each step sums the gradients over the replicas."""

    def __init__(
        self,
        pipeline: Mapping[str, Any],
        rank: int,
        stage: nn.Module,
        comm: StageComm,
        optimizer: torch.optim.Optimizer,
        loss_fn: LossFn,
        groups: Sequence[TiedGroup],
        recompute: bool = False,
        replica: StageReplica | None = None,
    ) -> None:
        self.rank = rank
        self.stage_index = comm.stage
        self.recompute = recompute
        self.spec = pipeline["stages"][self.stage_index]
        self.is_last = self.stage_index == len(pipeline["stages"]) - 1
        self.stage = stage
        self.replica = replica
        self.module: Callable[..., Any] = stage if replica is None else replica
        self.comm = comm
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.groups = groups
        self.store: VersionStore | None = None
        self._saved: dict[int, _Saved] = {}

    def begin(self, actions: Sequence[Action]) -> None:
        """Get ready to run ``actions``, this stage's in the order it runs them: the weight
        versions each step keeps, and where the replicas sum gradients."""
        self._keeps = iter(self._prepare_versions(actions))
        self._recorded = forwards_to_record(actions) if self.store is not None else frozenset()
        self._reduce_at = set(last_backwards(actions)) if self.replica is not None else set()
        self._position = 0

    def execute(
        self,
        action: Action,
        feed: Feed,
        trace: list[TraceRecord] | None = None,
        on_loss: LossHook | None = None,
        on_step: Callable[[], None] | None = None,
    ) -> None:
        """Run the next of the actions given to :meth:`begin`."""
        started = self._clock() if trace is not None else 0.0
        waited = self.comm.waited
        if action.kind == FORWARD:
            self._forward(action, feed)
        elif action.kind == BACKWARD:
            self._backward(action, feed, on_loss, self._position in self._reduce_at)
        elif action.kind == STEP:
            self._step(next(self._keeps, frozenset()), on_step)
        self._position += 1
        if trace is not None:
            # a rank running several stages names each action's stage: "2:F3@1"
            name = f"{action.stage}:{action}" if self.comm.layout.shared else str(action)
            trace.append(
                TraceRecord(
                    self.rank, name, action.kind, started, self._clock(), self.comm.waited - waited
                )
            )

    def post_receives(self, action: Action, feed: Feed) -> None:
        """Post ahead the receives ``action`` (a later one of this stage) will wait for."""
        if action.kind == FORWARD:
            kind = FORWARD_CHANNEL
        elif action.kind == BACKWARD and not self.is_last:
            kind = BACKWARD_CHANNEL
        else:
            return
        self.comm.post_receives(
            kind, action.microbatch, feed.size_of(feed.first + action.microbatch)
        )

    def _prepare_versions(self, actions: Sequence[Action]) -> list[frozenset[int]]:
        """For actions that name weight versions, a new store of versions and, per step, the
        versions it keeps; no store for a synchronous list, which computes with the current
        weights. A list's versions count its own steps, so its version 0 is the weights it
        starts with: each segment of an asynchronous run starts afresh, as a run does."""
        if all(action.version is None for action in actions):
            self.store = None
            return []
        self.store = VersionStore(self.stage)
        return versions_to_keep(actions)

    def _weights_for(self, action: Action) -> contextlib.AbstractContextManager[None]:
        """The weights an F or B computes with: its version, or PipeOptim's prediction; an F
        records its saved parameters only where its B needs that (``forwards_to_record``)."""
        if self.store is None:
            return contextlib.nullcontext()
        if action.predict:
            return self.store.predicted(self.optimizer, action.predict)
        record = action.kind == FORWARD and action.microbatch in self._recorded
        return self.store.use(action.version, record=record)

    def _clock(self) -> float:
        if self.comm.device.type == "cuda":
            torch.cuda.synchronize(self.comm.device)
        return time.perf_counter()

    def _forward(self, action: Action, feed: Feed) -> None:
        i = action.microbatch
        k = feed.first + i
        model_inputs = feed.inputs_for(k) if feed.inputs_for is not None else {}
        received = self.comm.receive_values(i, feed.size_of(k))
        for name, value in received.items():
            if self.comm.specs[name]["requires_grad"] and value.is_floating_point():
                value.requires_grad_(True)
        available = {**model_inputs, **received}
        args = [available[name] for name in self.spec["inputs"]]
        with self._weights_for(action):
            if self.recompute:
                rng = _capture_rng(args)
                with torch.no_grad():
                    outputs = dict(zip(self.spec["outputs"], self.module(*args)))
                self._saved[i] = _Saved(received, None, args, rng)
            else:
                outputs = dict(zip(self.spec["outputs"], self.module(*args)))
                self._saved[i] = _Saved(received, outputs)
        self.comm.send_values(i, {**model_inputs, **outputs})

    @contextlib.contextmanager
    def _outputs_for_backward(self, saved: _Saved) -> Iterator[dict[str, torch.Tensor]]:
        """The forward's outputs with their autograd graph, recomputed when they were not kept.

        The recomputation replays the forward's random state, so dropout masks repeat; the
        buffers it updates are put back once the backward is done (batch norm saves them for
        its backward), so running statistics are updated only once per microbatch."""
        if saved.outputs is not None:
            yield saved.outputs
            return
        buffers = [(b, b.detach().clone()) for b in self.stage.buffers()]
        with _replayed_rng(saved.rng, saved.args), torch.enable_grad():
            outputs = dict(zip(self.spec["outputs"], self.module(*saved.args)))
        yield outputs
        with torch.no_grad():
            for buffer, before in buffers:
                buffer.copy_(before)

    def _backward(
        self, action: Action, feed: Feed, on_loss: LossHook | None, reduce: bool = False
    ) -> None:
        """Backward of a microbatch; with ``reduce``, the replicas sum their gradients in it."""
        i = action.microbatch
        k = feed.first + i
        saved = self._saved.pop(i)
        label = feed.labels_for(k) if self.is_last and feed.labels_for is not None else None
        loss_value = None
        with self._weights_for(action), self._outputs_for_backward(saved) as outputs:
            if self.is_last:
                loss = self.loss_fn(outputs[self.spec["outputs"][0]], label)
                loss_value = loss.detach()
                roots, grads = [loss * feed.weight_of(k)], [None]
            else:
                received = self.comm.receive_gradients(i, feed.size_of(k), outputs)
                pairs = [(outputs[n], g) for n, g in received.items() if outputs[n].requires_grad]
                roots, grads = [t for t, _ in pairs], [g for _, g in pairs]
            with self._reducing(reduce, roots):
                if roots:
                    torch.autograd.backward(roots, grads)
        self.comm.send_gradients(i, saved.inputs)
        if on_loss is not None and loss_value is not None:
            on_loss(k, loss_value)

    def _reducing(
        self, reduce: bool, roots: Sequence[torch.Tensor]
    ) -> contextlib.AbstractContextManager[None]:
        """Where the replicas sum their gradients: around the step's last backward."""
        if not reduce or self.replica is None:
            return contextlib.nullcontext()
        return self.replica.reducing(roots)

    def _step(self, keep: frozenset[int], on_step: Callable[[], None] | None) -> None:
        """Sum tied gradients, update (keeping the versions later computes use), and clear."""
        with self.comm.waiting():
            reduce_tied_gradients(self.groups)
        with self.store.step(keep) if self.store is not None else contextlib.nullcontext():
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step()


def run_stages(
    executors: Mapping[int, Executor],
    actions: Sequence[Action],
    feed: Feed,
    trace: list[TraceRecord] | None = None,
    on_loss: LossHook | None = None,
    on_step: Mapping[int, Callable[[], None]] | None = None,
) -> None:
    """Run one rank's ``actions`` over the stages it holds (one, or WPipe's two), each action by
    its stage's executor in the rank's order, reading what their microbatches need from ``feed``.

    On the last stage ``on_loss`` hears each microbatch's loss after its backward; ``on_step``
    maps a stage to what runs after each of its optimizer steps (an LR scheduler's step). With
    ``trace``, each action's start and end (``perf_counter`` seconds, waiting for the GPU where
    there is one) are appended to it. Before each action the receives of the next are posted
    where the comm posts ahead (gloo), so that their data can arrive while this one computes.
    Returns once every send has completed.
    """
    for stage, executor in executors.items():
        executor.begin([action for action in actions if action.stage == stage])
    # receives are posted in action order, as the channels' FIFO pairing needs
    if actions:
        executors[actions[0].stage].post_receives(actions[0], feed)
    for action, following in zip(actions, [*actions[1:], None]):
        if following is not None:
            executors[following.stage].post_receives(following, feed)
        step = (on_step or {}).get(action.stage)
        executors[action.stage].execute(action, feed, trace, on_loss, step)
    for executor in executors.values():
        executor.comm.wait_sends()
