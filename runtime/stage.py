"""Stage loading: import a generated file and build this rank's stage on its device.

The generated file is all the runtime needs: its ``PIPELINE`` says how stages are wired and its
``build_stage`` builds one stage, optionally with the original model's weights.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

import torch
from torch import nn


class RuntimeConfigError(ValueError):
    """A user error in how the runtime was started: bad path, flag or world size."""


def load_generated(path: str | Path) -> ModuleType:
    """Import a generated pipeline file by path, checking it has what the runtime needs."""
    path = Path(path)
    if not path.is_file():
        raise RuntimeConfigError(f"no generated model file at {str(path)!r}")
    spec = importlib.util.spec_from_file_location(f"autopipe_generated_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise RuntimeConfigError(f"{str(path)!r} is not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in ("PIPELINE", "build_stage", "merge_state_dicts"):
        if not hasattr(module, name):
            raise RuntimeConfigError(
                f"{str(path)!r} has no {name}: pass a file written by autopipe.partition"
            )
    return module


def original_state_dict(source: Mapping[str, str], seed: int) -> dict[str, torch.Tensor]:
    """The original model's initial weights, built again the way the file was made from it (a
    zoo model, or the user's ``FILE.py:NAME`` factory) after seeding with ``seed``.

    Only this needs autopipe itself, for its model zoo; ``--init_checkpoint`` does not."""
    try:
        from autopipe.errors import UserError
        from autopipe.tasks import custom_task, zoo_task
    except ImportError:
        raise RuntimeConfigError(
            "building the original model needs autopipe installed: "
            "pass --init_checkpoint PATH or --random_init"
        ) from None
    try:
        if "task" in source:
            task = custom_task(source["task"], seed=seed)
        else:
            task = zoo_task(source["family"], source["model"], 1, seed=seed)
    except (UserError, KeyError) as error:
        raise RuntimeConfigError(
            f"cannot build the original model ({error}): pass --init_checkpoint PATH"
        ) from None
    return task.model.state_dict()


DEVICES = ("auto", "cpu", "cuda")


def wants_cuda(preference: str) -> bool:
    """Whether a ``--device`` preference asks for CUDA: ``cuda``, or ``auto`` where it is."""
    return preference == "cuda" or (preference == "auto" and torch.cuda.is_available())


def local_device(preference: str = "auto") -> torch.device:
    """This rank's device: ``cuda:<LOCAL_RANK>`` when CUDA is wanted (or, for ``auto``, there),
    else the CPU. A rank with no GPU of its own is a user error, not a crash in NCCL."""
    if preference not in DEVICES:
        raise RuntimeConfigError(f"unknown device {preference!r}; choose from {', '.join(DEVICES)}")
    if not wants_cuda(preference):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeConfigError("--device cuda but CUDA is not available here; use --device cpu")
    local_rank, visible = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if local_rank >= visible:
        raise RuntimeConfigError(
            f"local rank {local_rank} has no GPU of its own ({visible} visible): start at most "
            f"{visible} process{'es' if visible != 1 else ''} per machine, or pass --device cpu"
        )
    return torch.device("cuda", local_rank)


def backend_for(device: torch.device) -> str:
    """NCCL for GPUs, gloo for the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def build_local_stage(
    generated: ModuleType,
    rank: int,
    device: torch.device,
    state_dict: dict[str, torch.Tensor] | None,
) -> nn.Module:
    """Build stage ``rank`` (with the original model's ``state_dict`` when given) on ``device``."""
    try:
        stage = generated.build_stage(rank, state_dict)
    except KeyError as error:
        raise RuntimeConfigError(
            f"the checkpoint does not fit the model: {error.args[0]}"
        ) from None
    return stage.to(device).train()
