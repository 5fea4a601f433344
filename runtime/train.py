"""The training loop: set up this rank's stage, run the schedule, report, save.

A run is cut into segments (:class:`Segments`), each one schedule that starts and ends with an
empty pipeline, and training state is saved (``--checkpoint_dir``) only between segments. A
synchronous schedule (gpipe, 1f1b) makes a segment of every step, flushing the pipeline between
steps. An asynchronous one (pipedream, stale, 2bw, pipeoptim, wpipe) is one action list for a
whole segment, its microbatch k being part k % m of step k // m's batch, with steps inside it:
the whole run is one segment, or, with ``--checkpoint_every K``, every K steps are, so that the
pipeline is empty where a checkpoint is due and ``--resume`` goes on at the next segment.

That has a price, as PipeDream's own checkpoints at its epoch ends have: each segment drains its
pipeline (a bubble every K steps) and starts its weight versions afresh from the current
weights, so the updates after a segment boundary are those of a run's start (no stale or
stashed weights from before it), and a run with ``--checkpoint_every`` reaches other weights
than one without. ``--snapshot_dir`` weights are written by each rank on its own after the
step that ends an epoch, so they need no drained pipeline.

The first stage reads the model inputs, the last stage the labels; both draw the same samples
from the same seeded order, so no rank needs the other's data, and every rank knows each step's
batch size from the data source. With replicated stages or ``--dp`` (:mod:`runtime.layout`) a
batch is cut into ``microbatches * dp`` microbatches spread over the replicas, which sum their
gradients before each step (:mod:`runtime.replicas`). Every user error is found before the
process group starts where possible, so every rank stops with the same message.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from runtime import checkpoint
from runtime.comm import MODEL_INPUT_SOURCE, StageComm, make_channels
from runtime.data import DataSource, check_data
from runtime.executor import (
    Executor,
    Feed,
    LossFn,
    TraceRecord,
    microbatch_sizes,
    run_stages,
    split_microbatches,
    synchronize_tied,
    tied_groups,
)
from runtime.schedule import (
    ASYNC_SCHEDULES,
    SCHEDULE_NAMES,
    STEP,
    Schedule,
    ScheduleError,
    build_schedule,
    optimizer_steps,
    stage_dependencies,
)
from runtime.simulate import chrome_trace
from runtime.layout import (
    Layout,
    Role,
    check_layout,
    check_wpipe,
    layout_schedule,
    make_layout,
    validate_layout,
)
from runtime.replicas import StageReplica, replica_groups
from runtime.stage import (
    RuntimeConfigError,
    backend_for,
    build_local_stage,
    load_generated,
    local_device,
    original_state_dict,
)

log = logging.getLogger(__name__)

DEFAULT_STEPS = 10
_DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


@dataclass(frozen=True)
class TrainConfig:
    """Everything one run needs, as given on the command line or in a JSON config."""

    model: str
    schedule: str = "1f1b"
    vertical_sync: bool = False
    microbatches: int = 4
    dp: int = 1
    batch_size: int = 8
    steps: int | None = None
    epochs: int | None = None
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    loss: str = "cross_entropy"
    seed: int = 0
    data: str = "synthetic"
    no_shuffle: bool = False
    vocab_size: int | None = None
    num_classes: int | None = None
    no_dropout: bool = False
    recompute: bool = False
    init_checkpoint: str | None = None
    random_init: bool = False
    save_checkpoint: str | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    resume: bool = False
    snapshot_dir: str | None = None
    log_json: str | None = None
    trace: str | None = None
    no_progress: bool = False
    device: str = "auto"
    timeout: float = 300.0


LOSSES: dict[str, LossFn] = {
    "cross_entropy": lambda out, labels: F.cross_entropy(
        out.reshape(-1, out.shape[-1]), labels.reshape(-1)
    ),
    "mse": F.mse_loss,
}


OPTIMIZERS: dict[str, Callable[[list[nn.Parameter], TrainConfig], torch.optim.Optimizer]] = {
    "sgd": lambda params, c: torch.optim.SGD(
        params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay
    ),
    "adam": lambda params, c: torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay),
    "adamw": lambda params, c: torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay),
}


def lr_factor(schedule: str, step: int, total: int, warmup: int) -> float:
    """The learning rate of step ``step`` over ``--lr``: a linear warm-up over ``warmup`` steps,
    then constant, or decaying to zero at ``total`` linearly or along a half cosine."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


LR_SCHEDULES = ("constant", "linear", "cosine")


def check_config(config: TrainConfig, pipeline: Mapping[str, Any]) -> None:
    """Reject flags that cannot work, before any process group exists."""
    choices = {
        "schedule": SCHEDULE_NAMES,
        "loss": LOSSES,
        "optimizer": OPTIMIZERS,
        "lr_schedule": LR_SCHEDULES,
    }
    for flag, known in choices.items():
        if getattr(config, flag) not in known:
            raise RuntimeConfigError(
                f"unknown {flag} {getattr(config, flag)!r}; choose from {', '.join(known)}"
            )
    for flag in ("microbatches", "batch_size", "steps", "epochs", "dp"):
        value = getattr(config, flag)
        if value is not None and value < 1:
            raise RuntimeConfigError(f"--{flag} must be at least 1, got {value}")
    for flag in ("warmup_steps", "checkpoint_every"):
        if getattr(config, flag) < 0:
            raise RuntimeConfigError(f"--{flag} cannot be negative, got {getattr(config, flag)}")
    if config.timeout <= 0:
        raise RuntimeConfigError(f"--timeout must be positive, got {config.timeout}")
    if config.steps is not None and config.epochs is not None:
        raise RuntimeConfigError("give --steps or --epochs, not both")
    if config.epochs is not None and config.data == "synthetic":
        raise RuntimeConfigError("--epochs needs a data set (--data); synthetic data has no epochs")
    if config.init_checkpoint is not None and not Path(config.init_checkpoint).is_file():
        raise RuntimeConfigError(f"no such file {config.init_checkpoint!r}")
    if config.init_checkpoint is not None and config.random_init:
        raise RuntimeConfigError("give --init_checkpoint or --random_init, not both")
    if (config.resume or config.checkpoint_every) and not config.checkpoint_dir:
        raise RuntimeConfigError("--resume and --checkpoint_every need --checkpoint_dir")
    if config.snapshot_dir is not None and config.data == "synthetic":
        raise RuntimeConfigError(
            "--snapshot_dir saves at the end of every epoch, which needs a data set (--data)"
        )
    if len(pipeline["model_outputs"]) < 1:
        raise RuntimeConfigError("the model has no outputs to compute a loss from")
    _check_schedule(config, len(pipeline["stages"]))
    if config.dp > 1 and config.microbatches * config.dp > config.batch_size:
        raise RuntimeConfigError(
            f"--dp {config.dp} copies of --microbatches {config.microbatches} cut a batch into "
            f"{config.microbatches * config.dp} microbatches, more than --batch_size "
            f"{config.batch_size}: every microbatch needs a sample"
        )
    check_data(whole_batches(config), pipeline)


def whole_batches(config: TrainConfig) -> TrainConfig:
    """The config as the data sees it: a batch cut into ``microbatches * dp`` microbatches."""
    return replace(config, microbatches=config.microbatches * config.dp, dp=1)


def _check_schedule(config: TrainConfig, n_stages: int) -> None:
    """Reject schedule options that cannot work with this run."""
    if config.vertical_sync and config.schedule != "pipedream":
        raise RuntimeConfigError(
            f"--vertical_sync is an option of --schedule pipedream, not of {config.schedule}"
        )
    if config.schedule == "2bw" and config.microbatches < n_stages:
        raise RuntimeConfigError(
            f"--schedule 2bw keeps two weight versions, which needs --microbatches of at least "
            f"the {n_stages} stages, got {config.microbatches}"
        )
    if config.recompute and config.schedule in ("stale", "pipeoptim"):
        raise RuntimeConfigError(
            f"--recompute with --schedule {config.schedule} would run the forward again with "
            "other weights than it first ran with: drop --recompute, or use pipedream or 2bw"
        )


def total_steps(config: TrainConfig, data: DataSource) -> int:
    """Steps of the whole run: ``--steps``, or ``--epochs`` over the data set."""
    if config.epochs is None or data.steps_per_epoch is None:
        return config.steps or DEFAULT_STEPS
    return config.epochs * data.steps_per_epoch


def initial_weights(config: TrainConfig, pipeline: Mapping[str, Any]) -> dict | None:
    """The original model's weights to start from: ``--init_checkpoint``, else the original
    model built again from its source with ``--seed``; None (each stage's own initialisation)
    with ``--random_init`` or when the file does not say how to build the original."""
    if config.init_checkpoint is not None:
        return torch.load(config.init_checkpoint, map_location="cpu")
    if config.random_init:
        return None
    source = pipeline.get("source")
    if source is None:
        log.warning(
            "the generated file does not say how to build the original model: starting from "
            "the stages' own initialisation (pass --init_checkpoint for the original's weights)"
        )
        return None
    return original_state_dict(source, config.seed)


def _save_checkpoint(
    generated: ModuleType, executors: Mapping[int, Executor], layout: Layout, path: str
) -> None:
    """Gather every stage's state dict (replica 0's) on rank 0 and save them merged, under
    original keys."""
    own = {
        index: {key: value.detach().cpu() for key, value in executor.stage.state_dict().items()}
        for index, executor in executors.items()
        if layout.first_rank(index) == executor.rank
    }
    rank = dist.get_rank()
    gathered: list[Any] | None = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(own, gathered, dst=0)
    if rank == 0:
        every = {index: state for part in gathered for index, state in part.items()}
        torch.save(generated.merge_state_dicts([every[s] for s in range(layout.n_stages)]), path)
        log.info("saved %s", path)


def _switch_off_dropout(stage: nn.Module) -> None:
    for module in stage.modules():
        if isinstance(module, _DROPOUT_TYPES):
            module.eval()


def prepare(config: TrainConfig) -> ModuleType:
    """Load the generated file and check the config, world size and rank layout, before any
    communication.

    An asynchronous schedule is validated for one step, the shortest segment a run may have
    (:class:`Segments`), and for 2p steps, not for the whole run: every stage then passes its
    warm-up, steps in steady state and drains, the pattern a longer segment repeats, at a cost
    that does not grow with the run's length.
    """
    generated = load_generated(config.model)
    check_config(config, generated.PIPELINE)
    layout = make_layout(generated.PIPELINE, config.dp)
    check_wpipe(config.schedule, layout, generated.PIPELINE)
    check_layout(layout, int(os.environ.get("WORLD_SIZE", "1")), config.microbatches, config.dp)
    if layout.replicated and config.vertical_sync:
        raise RuntimeConfigError(
            "--vertical_sync counts weight versions in steps of a stage, which replicated "
            "stages take at different rates: drop it, or run one rank per stage"
        )
    dependencies = stage_dependencies(generated.PIPELINE)
    try:
        for steps in (1, 2 * layout.n_stages):
            schedule = run_schedule(config, layout, steps)
            if layout.replicated:
                validate_layout(schedule, layout, dependencies)
            else:
                schedule.validate(dependencies)
    except ScheduleError as error:
        raise RuntimeConfigError(str(error)) from None
    return generated


def run_schedule(config: TrainConfig, layout: Layout, steps: int) -> Schedule:
    """The schedule of a segment of ``steps`` batches: one action list per rank (a
    synchronous schedule covers one batch, whatever ``steps``)."""
    if layout.shared:
        return build_schedule("wpipe", layout.n_stages, config.microbatches, steps)
    if layout.replicated:
        return layout_schedule(config.schedule, layout, config.microbatches * config.dp, steps)
    return build_schedule(
        config.schedule, layout.n_stages, config.microbatches, steps, config.vertical_sync
    )


@dataclass(frozen=True)
class Segments:
    """Steps ``[start, total)`` of a run cut into segments, each run as one schedule that starts
    and ends with an empty pipeline: the steps from one multiple of ``every`` to the next, the
    first and last segment shorter where ``start`` or ``total`` lie between multiples.

    A synchronous schedule flushes every step, so ``every`` is 1. An asynchronous one drains only
    at the end of a segment, where training state can be saved: ``every`` is
    ``--checkpoint_every``, or the whole run without it (see :func:`run_segments`).
    """

    start: int
    total: int
    every: int

    def of(self, step: int) -> range:
        """The segment that holds ``step``."""
        first = step - step % self.every
        return range(max(self.start, first), min(self.total, first + self.every))

    def __iter__(self) -> Iterator[range]:
        step = self.start
        while step < self.total:
            segment = self.of(step)
            yield segment
            step = segment.stop


def run_segments(config: TrainConfig, start: int, total: int) -> Segments:
    """The segments of steps ``[start, total)``: a step each for a synchronous schedule; for an
    asynchronous one, ``--checkpoint_every`` steps each, or the whole run as one."""
    if config.schedule not in ASYNC_SCHEDULES:
        return Segments(start, total, 1)
    return Segments(start, total, config.checkpoint_every or total)


def _build_executors(
    config: TrainConfig, generated: ModuleType, layout: Layout, rank: int, device: torch.device
) -> dict[int, Executor]:
    """This rank's stages (one, or WPipe's two), each with its weights, tied copies made
    equal, its replicas' wrapper, optimizer and comm. Every rank makes the same process groups
    in the same order."""
    pipeline = generated.PIPELINE
    roles = layout.roles(rank)
    weights = initial_weights(config, pipeline)
    torch.manual_seed(config.seed)
    stages = {
        role.stage: build_local_stage(generated, role.stage, device, weights) for role in roles
    }
    if config.no_dropout:
        for stage in stages.values():
            _switch_off_dropout(stage)
    groups = tied_groups(pipeline, layout, rank, stages)
    synchronize_tied(groups)
    replicas = replica_groups(layout)
    nccl = backend_for(device) == "nccl"
    channels = make_channels(pipeline, layout, separate=nccl)
    mailbox: dict = {}
    executors = {}
    for index, stage in stages.items():
        replica = None
        if replicas[index] is not None:
            # pipedream and stale step after every backward: replicas average their
            # microbatches' gradients; otherwise each microbatch's loss carries its share
            # and replicas sum
            average = config.schedule in ASYNC_SCHEDULES and config.schedule != "2bw"
            replica = StageReplica(stage, replicas[index], device, average)
        # a stage without weights (only activations, say) steps an empty tensor, so that its
        # schedule and learning rate run as every other stage's
        weights_of_stage = list(stage.parameters()) or [nn.Parameter(torch.zeros(0, device=device))]
        optimizer = OPTIMIZERS[config.optimizer](weights_of_stage, config)
        comm = StageComm(
            pipeline,
            *(layout, rank, device, channels, index, mailbox),
            post_ahead=not nccl,
            send_waiter=not nccl and config.schedule in ASYNC_SCHEDULES,
            query_sends=nccl,
        )
        executors[index] = Executor(
            pipeline,
            rank,
            stage,
            comm,
            optimizer,
            LOSSES[config.loss],
            groups,
            config.recompute,
            replica,
        )
    return executors


class RunData:
    """The microbatches of a run: microbatch k is part k % m of step k // m's batch.

    Rank 0 reads a step's inputs, and the last rank its labels, when one of its microbatches
    first needs them, and keeps that one step's: an asynchronous run reaches the next step's
    microbatches only after the last of this one's.
    """

    def __init__(self, data: DataSource, device: torch.device, microbatches: int) -> None:
        self.data = data
        self.device = device
        self.m = microbatches
        self._inputs: tuple[int, list[dict[str, torch.Tensor]]] | None = None
        self._labels: tuple[int, list[torch.Tensor]] | None = None

    def batch_size(self, step: int) -> int:
        """Samples in step ``step``'s batch."""
        return self.data.step_batch_size(step)

    def size_of(self, k: int) -> int:
        """Samples in microbatch k."""
        step, part = divmod(k, self.m)
        return microbatch_sizes(self.batch_size(step), self.m)[part]

    def share_of(self, k: int) -> float:
        """Microbatch k's share of its step's batch."""
        return self.size_of(k) / self.batch_size(k // self.m)

    def inputs_for(self, k: int) -> dict[str, torch.Tensor]:
        """Rank 0: the model inputs of microbatch k."""
        step, part = divmod(k, self.m)
        if self._inputs is None or self._inputs[0] != step:
            self._inputs = step, self._input_parts(step)
        return self._inputs[1][part]

    def labels_for(self, k: int) -> torch.Tensor:
        """Last rank: the labels of microbatch k."""
        step, part = divmod(k, self.m)
        if self._labels is None or self._labels[0] != step:
            self._labels = step, self._label_parts(step)
        return self._labels[1][part]

    def _input_parts(self, step: int) -> list[dict[str, torch.Tensor]]:
        """The step's model inputs cut into microbatches, checked against its batch size."""
        inputs = {name: value.to(self.device) for name, value in self.data.inputs(step).items()}
        batch = self.batch_size(step)
        if self.data.batch_size(inputs) != batch:
            raise RuntimeConfigError(
                f"step {step}: the inputs hold {self.data.batch_size(inputs)} samples, "
                f"the data set's batch {batch}"
            )
        dims = {name: self.data.specs[name].get("batch_dim") for name in inputs}
        return split_microbatches(inputs, dims, self.m)

    def _label_parts(self, step: int) -> list[torch.Tensor]:
        """The step's labels cut into microbatches, checked against its batch size."""
        labels = self.data.labels(step).to(self.device)
        dim = self.data.output.get("batch_dim") or 0
        batch = self.batch_size(step)
        if labels.shape[dim] != batch:
            raise RuntimeConfigError(
                f"the inputs hold {batch} samples but the labels {labels.shape[dim]}"
            )
        return list(labels.tensor_split(self.m, dim=dim))


class Reporter:
    """What the last stage tells the user: a progress bar on a terminal, one line per step
    otherwise, JSON lines with ``--log_json``, and a summary at the end."""

    def __init__(self, config: TrainConfig, start: int, total: int, steps_per_epoch: int | None):
        self.total = total
        self.steps_per_epoch = steps_per_epoch
        self.samples = 0
        self.seconds = 0.0
        self.last_loss = math.nan
        self.json: TextIO | None = open(config.log_json, "a") if config.log_json else None
        self.bar = None
        if not config.no_progress and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def step(self, step: int, loss: float, lr: float, batch: int, seconds: float) -> None:
        self.samples += batch
        self.seconds += seconds
        self.last_loss = loss
        rate = batch / seconds
        epoch = step // self.steps_per_epoch if self.steps_per_epoch else None
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{rate:.1f}", refresh=False)
            self.bar.update(1)
        else:
            where = f" epoch {epoch}" if epoch is not None else ""
            print(
                f"step {step}{where} loss {loss:.6f} lr {lr:.4g} samples/s {rate:.1f}", flush=True
            )
        if self.json is not None:
            record = {"step": step, "epoch": epoch, "loss": loss, "lr": lr}
            record.update({"samples": batch, "seconds": seconds, "samples_per_s": rate})
            self.json.write(json.dumps(record) + "\n")
            self.json.flush()

    def close(self, steps: int) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.json is not None:
            self.json.close()
        if steps:
            rate = self.samples / self.seconds if self.seconds else 0.0
            print(
                f"trained {steps} steps: last loss {self.last_loss:.6f}, "
                f"{rate:.1f} samples/s on average",
                flush=True,
            )


class StepLosses:
    """Last stage: each step's loss, its microbatches' losses weighted by their share of the
    batch, reported once every microbatch of the step has run its backward (in an asynchronous
    run, while the next step's are already in flight).

    Where the last stage has replicas, each holds ``per_step(step)`` of a step's microbatches; they
    sum their parts (over ``group``, once all their backwards of the step have run, as in a
    synchronous schedule) and replica 0, the one with a ``reporter``, reports."""

    def __init__(
        self,
        reporter: Reporter | None,
        run_data: RunData,
        optimizer: torch.optim.Optimizer,
        since: float,
        per_step: Callable[[int], int] | None = None,
        group: Any = None,
    ) -> None:
        self.reporter = reporter
        self.run_data = run_data
        self.optimizer = optimizer
        self.since = since
        self.per_step = (lambda step: run_data.m) if per_step is None else per_step
        self.group = group
        self._sums: dict[int, torch.Tensor] = {}
        self._counts: dict[int, int] = {}

    def __call__(self, k: int, loss: torch.Tensor) -> None:
        """Take microbatch k's loss (a scalar tensor, summed on its device and read once the
        step is complete); report its step if that was the step's last one, with the learning
        rate the step's last update uses."""
        step = k // self.run_data.m
        weighted = loss.double() * self.run_data.share_of(k)
        self._sums[step] = self._sums[step] + weighted if step in self._sums else weighted
        self._counts[step] = self._counts.get(step, 0) + 1
        if self._counts[step] < self.per_step(step):
            return
        del self._counts[step]
        summed = self._sums.pop(step).reshape(1)
        if self.group is not None:
            dist.all_reduce(summed, group=self.group)
        total = summed.item()
        if self.reporter is None:
            return
        now = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]
        batch = self.run_data.batch_size(step)
        self.reporter.step(step, total, lr, batch, now - self.since)
        self.since = now


def _role_of(executor: Executor, layout: Layout) -> Role:
    """The stage and replica an executor runs."""
    stage = executor.stage_index
    return Role(stage, executor.rank - layout.first_rank(stage))


def _replica_rngs(executor: Executor, layout: Layout) -> list[dict] | None:
    """Every replica's random state, gathered on replica 0 (None elsewhere, and on a stage
    without replicas): a resumed replica goes on drawing its own dropout masks."""
    if executor.replica is None:
        return None
    role = _role_of(executor, layout)
    first = layout.first_rank(role.stage)
    gathered: list[Any] | None = [None] * layout.replicas[role.stage] if role.replica == 0 else None
    rng = checkpoint.capture_rng()
    dist.gather_object(rng, gathered, dst=first, group=executor.replica.group)
    return gathered


def _save_training_state(
    config: TrainConfig,
    generated: ModuleType,
    layout: Layout,
    executors: Mapping[int, Executor],
    schedulers: Mapping[int, Any],
    step: int,
) -> None:
    """Replica 0 of every stage writes the stage's state for ``step`` (with every replica's
    random state); rank 0 commits once all have."""
    rank, n_stages = dist.get_rank(), layout.n_stages
    for index, executor in executors.items():
        rngs = _replica_rngs(executor, layout)
        if layout.first_rank(index) != rank:
            continue
        state = checkpoint.StageState(
            step=step,
            model=executor.stage.state_dict(),
            optimizer=executor.optimizer.state_dict(),
            scheduler=schedulers[index].state_dict(),
            rng=checkpoint.capture_rng(),
            extra={} if rngs is None else {"replica_rng": rngs},
        )
        checkpoint.save_stage(config.checkpoint_dir, index, n_stages, state)
    dist.barrier()
    if rank == 0:
        meta = checkpoint.pipeline_meta(config.model, generated.PIPELINE)
        checkpoint.commit(config.checkpoint_dir, step, n_stages, meta)
        log.info("checkpoint of step %d in %s", step, config.checkpoint_dir)


def snapshot_file(directory: str | Path, epoch: int, rank: int) -> Path:
    """Where stage ``rank`` keeps its weights at the end of epoch ``epoch``."""
    return Path(directory) / f"epoch_{epoch}" / f"stage_{rank}.pt"


def _save_atomically(value: Any, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename it, so a reader never
    finds half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(value, stream)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@dataclass
class EpochSnapshots:
    """``--snapshot_dir``: this rank's weights (original keys, on the CPU) after the optimizer
    step that ends each epoch, and after the last step of the run if that ends inside one.

    Called after every optimizer step, it counts the microbatches whose gradients the stage
    has applied; no rank waits for another, so in an asynchronous run each stage writes an
    epoch's file when it, not the pipeline, is done with the epoch's last microbatch.
    """

    directory: str
    stage: nn.Module
    rank: int
    per_step: int  # microbatches whose gradients one optimizer step applies
    per_epoch: int  # microbatches in an epoch
    total: int  # microbatches in the run
    applied: int = 0  # microbatches applied so far (a resumed run's before it stopped)

    def __call__(self) -> None:
        self.applied += self.per_step
        if self.applied % self.per_epoch == 0 or self.applied == self.total:
            self.save((self.applied - 1) // self.per_epoch)

    def save(self, epoch: int) -> None:
        """Write this stage's current weights as epoch ``epoch``'s snapshot."""
        weights = {key: value.detach().cpu() for key, value in self.stage.state_dict().items()}
        path = snapshot_file(self.directory, epoch, self.rank)
        _save_atomically(weights, path)
        log.info("snapshot of epoch %d in %s", epoch, path)


def _write_trace(
    config: TrainConfig, records: list[TraceRecord], origin: float, n_stages: int
) -> None:
    """Gather every rank's action times on rank 0 and write them as a Chrome/Perfetto trace,
    the format ``python -m runtime.simulate --trace`` predicts in. Each rank's clock starts at
    a barrier, so the stages line up to within that barrier's skew, across machines too.
    ``otherData`` says what ran (``python -m runtime.simulate --costs_from`` reads it)."""
    shifted = [replace(r, start=r.start - origin, end=r.end - origin) for r in records]
    rank = dist.get_rank()
    gathered: list[Any] | None = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(shifted, gathered, dst=0)
    if rank == 0:
        label = f"measured: {config.schedule}, p={n_stages}, m={config.microbatches}"
        every = [record for part in gathered for record in part]
        trace = chrome_trace(every, label=label)
        trace["otherData"] = {
            "schedule": config.schedule,
            "microbatches": config.microbatches,
            "batch_size": config.batch_size,
            "microbatch_size": microbatch_sizes(config.batch_size, config.microbatches * config.dp)[
                0
            ],
        }
        Path(config.trace).write_text(json.dumps(trace))
        log.info("wrote trace %s", config.trace)


def _resume(
    config: TrainConfig,
    layout: Layout,
    executors: Mapping[int, Executor],
    schedulers: Mapping[int, Any],
) -> int:
    """Restore this rank's stages (WPipe's two, or one), their optimizers and schedules, and
    its random state; the step to go on from. A replica takes its stage's file, and its own
    random state where the file kept it."""
    if checkpoint.latest_step(config.checkpoint_dir) is None:
        print(f"no checkpoint in {config.checkpoint_dir} yet: starting from step 0", flush=True)
        return 0
    states = {
        index: checkpoint.load_stage(config.checkpoint_dir, index, layout.n_stages)
        for index in executors
    }
    for index, state in states.items():
        executors[index].stage.load_state_dict(state.model)
        executors[index].optimizer.load_state_dict(state.optimizer)
        if state.scheduler is not None:
            schedulers[index].load_state_dict(state.scheduler)
    # one process, one random state: every stage file of a rank holds the same
    role = layout.role(dist.get_rank())
    state = states[role.stage]
    rngs = state.extra.get("replica_rng")
    same_replicas = rngs is not None and len(rngs) == layout.replicas[role.stage]
    checkpoint.restore_rng(rngs[role.replica] if same_replicas else state.rng)
    return state.step


def _checkpoint_due(config: TrainConfig, steps_done: int, total: int) -> bool:
    """Whether to save training state after ``steps_done`` steps: at the end of the run and
    every ``--checkpoint_every`` steps, when there is a ``--checkpoint_dir``."""
    every = config.checkpoint_every
    due = steps_done == total or (every and steps_done % every == 0)
    return bool(config.checkpoint_dir) and bool(due)


def _loss_weight(schedule: Schedule, run_data: RunData) -> Callable[[int], float]:
    """A microbatch's factor on its loss: its share of the batch where a step applies the
    gradients of a whole batch, 1 where every microbatch is a minibatch of its own (an
    asynchronous schedule that steps after every backward)."""
    if schedule.microbatches_per_step == 1:
        return lambda k: 1.0
    return run_data.share_of


def _after_step(scheduler: Any, snapshots: EpochSnapshots | None) -> Callable[[], None]:
    """What runs after every optimizer step: the learning-rate schedule's step and, with
    ``--snapshot_dir``, the epoch snapshots."""
    if snapshots is None:
        return scheduler.step

    def after_step() -> None:
        scheduler.step()
        snapshots()

    return after_step


def _applied_per_step(schedule: Schedule, layout: Layout, stage: int, per_batch: int) -> int:
    """Microbatches of the run whose gradients one step of ``stage`` applies: a batch's for a
    synchronous schedule, ``microbatches_per_step`` for an asynchronous one, times the stage's
    replicas where each replica steps after every backward (they step together)."""
    if schedule.microbatches_per_step is None:
        return per_batch
    if schedule.microbatches_per_step == 1:
        return layout.replicas[stage]
    return schedule.microbatches_per_step


def _snapshots(
    config: TrainConfig,
    executor: Executor,
    layout: Layout,
    schedule: Schedule,
    data: DataSource,
    steps: range,
) -> EpochSnapshots | None:
    """The epoch snapshots of ``--snapshot_dir`` for a run of ``steps``; None without, and on
    replicas other than a stage's first (they hold the same weights)."""
    role = _role_of(executor, layout)
    if config.snapshot_dir is None or role.replica != 0:
        return None
    m = config.microbatches * config.dp
    return EpochSnapshots(
        config.snapshot_dir,
        executor.stage,
        role.stage,
        per_step=_applied_per_step(schedule, layout, role.stage, m),
        per_epoch=data.steps_per_epoch * m,
        total=steps.stop * m,
        applied=steps.start * m,
    )


def _step_losses(
    executor: Executor,
    layout: Layout,
    segments: Segments,
    run_data: RunData,
    reporter: Reporter | None,
    since: float,
) -> StepLosses | None:
    """What the last stage's ranks do with their losses; None on the other stages."""
    role = _role_of(executor, layout)
    if role.stage != layout.n_stages - 1:
        return None
    if executor.replica is None:
        return StepLosses(reporter, run_data, executor.optimizer, since)
    m, replicas = run_data.m, layout.replicas[role.stage]

    def mine(step: int) -> int:
        """This replica's microbatches in ``step``, numbered as in its segment's schedule, which
        hands microbatch i to replica i % replicas."""
        first = (step - segments.of(step).start) * m
        return sum(k % replicas == role.replica for k in range(first, first + m))

    return StepLosses(reporter, run_data, executor.optimizer, since, mine, executor.replica.group)


def train(config: TrainConfig, generated: ModuleType, device: torch.device) -> None:
    """Run every segment of the run on this rank, saving training state after those where a
    checkpoint is due; the process group must exist."""
    pipeline = generated.PIPELINE
    layout = make_layout(pipeline, config.dp)
    rank = dist.get_rank()
    if rank == 0 and (layout.replicated or layout.shared):
        print(f"rank layout:\n{layout.describe()}", flush=True)
    executors = _build_executors(config, generated, layout, rank, device)
    data = DataSource(whole_batches(config), pipeline)
    total = total_steps(config, data)
    m = config.microbatches * config.dp
    schedule_of = functools.cache(functools.partial(run_schedule, config, layout))
    schedulers = _schedulers(config, executors, layout, schedule_of, total)
    torch.manual_seed(config.seed + rank)
    start = _resume(config, layout, executors, schedulers) if config.resume else 0
    segments = run_segments(config, start, total)
    # how the run's schedules step (microbatches_per_step), whatever their number of steps
    schedule = schedule_of(1)
    if rank == 0:
        backend = dist.get_backend()
        print(f"data {data.description}; {total} steps; {backend}, rank 0 on {device}", flush=True)
    run_data = RunData(data, device, m)
    last = executors.get(layout.n_stages - 1)
    feed = Feed(
        size_of=run_data.size_of,
        weight_of=_loss_weight(schedule, run_data),
        inputs_for=run_data.inputs_for if MODEL_INPUT_SOURCE in executors else None,
        labels_for=run_data.labels_for if last is not None else None,
    )
    reports = last is not None and _role_of(last, layout).replica == 0
    reporter = Reporter(config, start, total, data.steps_per_epoch) if reports else None
    trace: list[TraceRecord] | None = [] if config.trace else None
    if trace is not None:
        dist.barrier()
    origin = time.perf_counter()
    losses = None
    if last is not None:
        losses = _step_losses(last, layout, segments, run_data, reporter, origin)
    after_step = {
        index: _after_step(
            schedulers[index],
            _snapshots(config, executor, layout, schedule, data, range(start, total)),
        )
        for index, executor in executors.items()
    }
    for segment in segments:
        actions = schedule_of(len(segment)).actions[rank]
        segment_feed = replace(feed, first=segment.start * m)
        run_stages(executors, actions, segment_feed, trace, losses, after_step)
        if _checkpoint_due(config, segment.stop, total):
            _save_training_state(config, generated, layout, executors, schedulers, segment.stop)
    for executor in executors.values():
        executor.comm.close()
    if reporter is not None:
        reporter.close(total - start)
    if trace is not None:
        _write_trace(config, trace, origin, layout.n_stages)
    if config.save_checkpoint:
        _save_checkpoint(generated, executors, layout, config.save_checkpoint)


def _schedulers(
    config: TrainConfig,
    executors: Mapping[int, Executor],
    layout: Layout,
    schedule_of: Callable[[int], Schedule],
    total: int,
) -> dict[int, Any]:
    """Each stage's learning-rate schedule over the optimizer steps it takes in the whole run,
    counted over the run's segments (a resumed run goes on along the same schedule)."""
    rank = dist.get_rank()
    segments = run_segments(config, 0, total)
    return {
        index: torch.optim.lr_scheduler.LambdaLR(
            executor.optimizer,
            _lr_lambda(
                config,
                sum(_updates(schedule_of(len(s)), layout, rank, index, len(s)) for s in segments),
            ),
        )
        for index, executor in executors.items()
    }


def _updates(schedule: Schedule, layout: Layout, rank: int, stage: int, steps: int) -> int:
    """How many optimizer steps ``stage`` takes on this rank in ``schedule``, a segment of
    ``steps`` batches."""
    if layout.replicated and schedule.microbatches_per_step is not None:
        actions = schedule.actions[rank]
        return sum(action.kind == STEP and action.stage == stage for action in actions)
    return optimizer_steps(schedule, steps)


def _lr_lambda(config: TrainConfig, updates: int) -> Callable[[int], float]:
    """The learning-rate factor of each optimizer step of a run of ``updates`` steps."""
    return lambda step: lr_factor(config.lr_schedule, step, updates, config.warmup_steps)


def run(config: TrainConfig) -> None:
    """Check the config, start the process group, train, and always tear the group down."""
    generated = prepare(config)
    device = local_device(config.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend=backend_for(device),
        timeout=datetime.timedelta(seconds=config.timeout),
        device_id=device if device.type == "cuda" else None,
    )
    try:
        train(config, generated, device)
        # Every rank waits until all transfers have landed before tearing the group down;
        # gloo aborts a process whose peer closes a connection with data still in flight.
        dist.barrier()
    finally:
        dist.destroy_process_group()
