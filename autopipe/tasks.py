"""Tasks: a model and one batch of example inputs, from the zoo or from the user's own file."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autopipe.errors import UserError
from autopipe.models import nlp, vision
from autopipe.models.spec import ExampleInputs, ModelSpec
from autopipe.rebuild import record_init_args

FAMILIES: dict[str, dict[str, ModelSpec]] = {"vision": vision.MODELS, "nlp": nlp.MODELS}
DEFAULT_MODEL = "wrn_28x10_c100_dr03_gn"


@dataclass
class Task:
    """A built model with example inputs, and the name generated files are called after."""

    name: str
    model: nn.Module
    example_inputs: ExampleInputs


def zoo_task(
    family: str, model: str, batch_size: int, size: int | None = None, seed: int = 0
) -> Task:
    """Build zoo model ``model`` with a batch of ``batch_size`` inputs of ``size`` (crop or length)."""
    models = FAMILIES[family]
    if model not in models:
        raise UserError(
            f"unknown {family} model {model!r}; choose from {', '.join(sorted(models))}"
        )
    if batch_size < 1:
        raise UserError(f"the batch size must be at least 1, got {batch_size}")
    spec = models[model]
    size = spec.default_size if size is None else size
    torch.manual_seed(seed)
    with record_init_args():
        built = spec.build()
    inputs = spec.example_inputs(batch_size, size, torch.Generator().manual_seed(seed))
    unit = "c" if family == "vision" else "s"
    return Task(f"{model}_{unit}{size}", built, inputs)


def custom_task(reference: str, seed: int = 0) -> Task:
    """Load ``FILE.py:NAME`` and call NAME(), which returns ``(model, example_inputs)``."""
    path_text, _, name = reference.rpartition(":")
    if not path_text or not name:
        raise UserError(f"--task takes FILE.py:NAME, got {reference!r}")
    path = Path(path_text)
    if not path.is_file():
        raise UserError(f"--task file {path} does not exist")
    module = _import_file(path)
    factory = getattr(module, name, None)
    if not callable(factory):
        raise UserError(f"{path} has no callable {name!r}")
    torch.manual_seed(seed)
    with record_init_args():
        result = factory()
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module)):
        raise UserError(
            f"{name}() must return (model, example_inputs), got {type(result).__name__}"
        )
    model, inputs = result
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if not isinstance(inputs, (tuple, list, dict)):
        raise UserError(f"{name}() must return example inputs as a tuple or dict of tensors")
    return Task(name, model, tuple(inputs) if isinstance(inputs, list) else inputs)


def _import_file(path: Path) -> Any:
    """Import a user's file as a module named after it, so generated files can import it too."""
    module_name = path.stem
    resolved = path.resolve()
    existing = sys.modules.get(module_name)
    if existing is not None and Path(getattr(existing, "__file__", "") or "").resolve() == resolved:
        return existing
    spec = importlib.util.spec_from_file_location(module_name, resolved)
    if spec is None or spec.loader is None:
        raise UserError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    if str(resolved.parent) not in sys.path:
        sys.path.insert(0, str(resolved.parent))
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[module_name]
        raise UserError(f"importing {path} failed: {type(error).__name__}: {error}") from error
    return module
