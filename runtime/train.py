"""The training loop: set up this rank's stage, run K steps of a schedule, save a checkpoint.

Rank 0 makes or reads the model inputs, the last rank the labels; both draw from the same
seeded stream, so no rank needs the other's data. Every user error is found before the
process group starts where possible, so every rank stops with the same message.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from runtime.comm import MODEL_INPUT_SOURCE, StageComm, value_specs
from runtime.executor import (
    Executor,
    LossFn,
    split_microbatches,
    synchronize_tied,
    tied_groups,
)
from runtime.schedule import SCHEDULES, ScheduleError, stage_dependencies
from runtime.stage import (
    RuntimeConfigError,
    backend_for,
    build_local_stage,
    check_world_size,
    load_generated,
    local_device,
)

log = logging.getLogger(__name__)

TENSORS_PREFIX = "tensors:"
_DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


@dataclass(frozen=True)
class TrainConfig:
    """Everything one run needs, as given on the command line or in a JSON config."""

    model: str
    schedule: str = "1f1b"
    microbatches: int = 4
    batch_size: int = 8
    steps: int = 10
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    loss: str = "cross_entropy"
    seed: int = 0
    data: str = "synthetic"
    vocab_size: int | None = None
    num_classes: int | None = None
    no_dropout: bool = False
    init_checkpoint: str | None = None
    save_checkpoint: str | None = None
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


def check_config(config: TrainConfig, pipeline: Mapping[str, Any]) -> None:
    """Reject flags that cannot work, before any process group exists."""
    if config.schedule not in SCHEDULES:
        raise RuntimeConfigError(
            f"unknown schedule {config.schedule!r}; choose from {', '.join(SCHEDULES)}"
        )
    if config.loss not in LOSSES:
        raise RuntimeConfigError(f"unknown loss {config.loss!r}; choose from {', '.join(LOSSES)}")
    if config.optimizer not in OPTIMIZERS:
        raise RuntimeConfigError(
            f"unknown optimizer {config.optimizer!r}; choose from {', '.join(OPTIMIZERS)}"
        )
    if config.timeout <= 0:
        raise RuntimeConfigError(f"--timeout must be positive, got {config.timeout}")
    for flag in ("microbatches", "batch_size", "steps"):
        if getattr(config, flag) < 1:
            raise RuntimeConfigError(f"--{flag} must be at least 1, got {getattr(config, flag)}")
    if config.data == "synthetic" and config.microbatches > config.batch_size:
        raise RuntimeConfigError(
            f"--microbatches {config.microbatches} is more than --batch_size {config.batch_size}:"
            " every microbatch needs a sample"
        )
    if config.data != "synthetic" and not config.data.startswith(TENSORS_PREFIX):
        raise RuntimeConfigError(
            f"unknown data {config.data!r}; use synthetic or {TENSORS_PREFIX}PATH"
        )
    data_file = config.data.removeprefix(TENSORS_PREFIX) if config.data != "synthetic" else None
    for path in (config.init_checkpoint, data_file):
        if path is not None and not Path(path).is_file():
            raise RuntimeConfigError(f"no such file {path!r}")
    if len(pipeline["model_outputs"]) < 1:
        raise RuntimeConfigError("the model has no outputs to compute a loss from")


class DataSource:
    """Model inputs (rank 0) and labels (last rank) for each step, synthetic or from a file."""

    def __init__(self, config: TrainConfig, pipeline: Mapping[str, Any]) -> None:
        self.config = config
        self.specs = value_specs(pipeline)
        self.names = list(pipeline["model_inputs"])
        self.output = self.specs[pipeline["model_outputs"][0]]
        self._file: dict[str, Any] | None = None

    def _saved(self) -> dict[str, Any]:
        if self._file is None:
            path = self.config.data.removeprefix(TENSORS_PREFIX)
            self._file = torch.load(path, map_location="cpu")
        return self._file

    def _generator(self, step: int, stream: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.config.seed * 1_000_003 + 2 * step + stream)

    def _shape(self, spec: Mapping[str, Any], drop_last: bool = False) -> list[int]:
        shape = list(spec["shape"])
        if spec.get("batch_dim") is not None:
            shape[spec["batch_dim"]] = self.config.batch_size
        return shape[:-1] if drop_last else shape

    def inputs(self, step: int) -> dict[str, torch.Tensor]:
        """The model inputs of step ``step``, by name."""
        if self.config.data != "synthetic":
            saved = self._saved()["inputs"]
            if isinstance(saved, Mapping):
                return {name: saved[name] for name in self.names}
            return dict(zip(self.names, saved))
        generator = self._generator(step, 0)
        made = {}
        for name in self.names:
            spec = self.specs[name]
            dtype = getattr(torch, spec["dtype"])
            shape = self._shape(spec)
            if dtype.is_floating_point:
                made[name] = torch.randn(shape, generator=generator, dtype=dtype)
            else:
                high = self.config.vocab_size or self.output["shape"][-1]
                made[name] = torch.randint(0, high, shape, generator=generator, dtype=dtype)
        return made

    def labels(self, step: int) -> torch.Tensor:
        """The labels of step ``step``: class ids for cross entropy, targets for MSE."""
        if self.config.data != "synthetic":
            return self._saved()["labels"]
        generator = self._generator(step, 1)
        if self.config.loss == "mse":
            return torch.randn(self._shape(self.output), generator=generator)
        high = self.config.num_classes or self.output["shape"][-1]
        return torch.randint(0, high, self._shape(self.output, drop_last=True), generator=generator)

    def batch_size(self, inputs: Mapping[str, torch.Tensor]) -> int:
        """The batch size of a step's inputs, read along the first input's batch dimension."""
        name = self.names[0]
        dim = self.specs[name].get("batch_dim")
        return self.config.batch_size if dim is None else inputs[name].shape[dim]


def _broadcast_batch_size(batch: int, device: torch.device) -> int:
    """Rank 0 knows the step's batch size; every rank needs it to shape what it receives."""
    size = torch.tensor([batch], dtype=torch.int64, device=device)
    dist.broadcast(size, src=MODEL_INPUT_SOURCE)
    return int(size.item())


def _load_weights(config: TrainConfig) -> dict[str, torch.Tensor] | None:
    if config.init_checkpoint is None:
        return None
    return torch.load(config.init_checkpoint, map_location="cpu")


def _save_checkpoint(generated: ModuleType, stage: nn.Module, rank: int, path: str) -> None:
    """Gather every stage's state dict on rank 0 and save them merged, under original keys."""
    own = {key: value.detach().cpu() for key, value in stage.state_dict().items()}
    gathered: list[Any] | None = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(own, gathered, dst=0)
    if rank == 0:
        torch.save(generated.merge_state_dicts(gathered), path)
        log.info("saved %s", path)


def _switch_off_dropout(stage: nn.Module) -> None:
    for module in stage.modules():
        if isinstance(module, _DROPOUT_TYPES):
            module.eval()


def prepare(config: TrainConfig) -> ModuleType:
    """Load the generated file and check the config and world size, before any communication."""
    generated = load_generated(config.model)
    check_config(config, generated.PIPELINE)
    n_stages = len(generated.PIPELINE["stages"])
    check_world_size(n_stages, int(os.environ.get("WORLD_SIZE", "1")))
    try:
        schedule = SCHEDULES[config.schedule](n_stages, config.microbatches)
        schedule.validate(stage_dependencies(generated.PIPELINE))
    except ScheduleError as error:
        raise RuntimeConfigError(str(error)) from None
    return generated


def _build_executor(config: TrainConfig, generated: ModuleType, rank: int) -> Executor:
    """This rank's stage with its weights, tied copies made equal, optimizer and comm."""
    pipeline = generated.PIPELINE
    device = local_device(config.device)
    torch.manual_seed(config.seed)
    stage = build_local_stage(generated, rank, device, _load_weights(config))
    if config.no_dropout:
        _switch_off_dropout(stage)
    groups = tied_groups(pipeline, rank, stage)
    synchronize_tied(groups)
    optimizer = OPTIMIZERS[config.optimizer](list(stage.parameters()), config)
    comm = StageComm(pipeline, rank, device)
    return Executor(pipeline, rank, stage, comm, optimizer, LOSSES[config.loss], groups)


def _input_parts(
    data: DataSource, step: int, device: torch.device, n_microbatches: int
) -> tuple[int, list[dict[str, torch.Tensor]]]:
    """Rank 0: the step's batch size and its model inputs cut into microbatches."""
    inputs = {name: value.to(device) for name, value in data.inputs(step).items()}
    dims = {name: data.specs[name].get("batch_dim") for name in inputs}
    return data.batch_size(inputs), split_microbatches(inputs, dims, n_microbatches)


def _label_parts(
    data: DataSource, step: int, device: torch.device, batch: int, n_microbatches: int
) -> list[torch.Tensor]:
    """Last rank: the step's labels cut into microbatches, checked against the batch size."""
    labels = data.labels(step).to(device)
    dim = data.output.get("batch_dim") or 0
    if labels.shape[dim] != batch:
        raise RuntimeConfigError(
            f"the inputs hold {batch} samples but the labels {labels.shape[dim]}"
        )
    return list(labels.tensor_split(n_microbatches, dim=dim))


def train(config: TrainConfig, generated: ModuleType) -> None:
    """Run ``config.steps`` steps of the schedule on this rank; the process group must exist."""
    pipeline = generated.PIPELINE
    rank, n_stages = dist.get_rank(), len(pipeline["stages"])
    device = local_device(config.device)
    executor = _build_executor(config, generated, rank)
    torch.manual_seed(config.seed + rank)
    actions = SCHEDULES[config.schedule](n_stages, config.microbatches).actions[rank]
    data = DataSource(config, pipeline)
    m = config.microbatches
    for step in range(config.steps):
        started = time.perf_counter()
        batch, input_parts = (
            _input_parts(data, step, device, m) if rank == MODEL_INPUT_SOURCE else (0, None)
        )
        batch = _broadcast_batch_size(batch, device)
        if batch < m:
            raise RuntimeConfigError(f"a batch of {batch} cannot be cut into {m} microbatches")
        label_parts = _label_parts(data, step, device, batch, m) if rank == n_stages - 1 else None
        loss = executor.run(actions, batch, m, input_parts, label_parts)
        if loss is not None:
            elapsed = time.perf_counter() - started
            print(f"step {step} loss {loss:.6f} samples/s {batch / elapsed:.1f}", flush=True)
    if config.save_checkpoint:
        _save_checkpoint(generated, executor.stage, rank, config.save_checkpoint)


def run(config: TrainConfig) -> None:
    """Check the config, start the process group, train, and always tear the group down."""
    generated = prepare(config)
    device = local_device(config.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=config.timeout)
    dist.init_process_group(
        backend=backend_for(device),
        timeout=timeout,
        device_id=device if device.type == "cuda" else None,
    )
    try:
        train(config, generated)
        # Every rank waits until all transfers have landed before tearing the group down;
        # gloo aborts a process whose peer closes a connection with data still in flight.
        dist.barrier()
    finally:
        dist.destroy_process_group()
