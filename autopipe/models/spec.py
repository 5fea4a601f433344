"""What the model zoo knows about each of its models."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Union

import torch
from torch import nn

ExampleInputs = Union[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class ModelSpec:
    """A zoo entry: how to build the model and how to make inputs for it.

    ``example_inputs(batch, size, generator)`` returns the inputs of one batch: a tuple of
    positional tensors or a dict of keyword tensors. ``size`` is the crop (vision) or the
    sequence length (nlp).
    """

    build: Callable[[], nn.Module]
    example_inputs: Callable[[int, int, torch.Generator], ExampleInputs]
    default_size: int
    published_params: int | None
    description: str


def image_inputs(channels: int = 3) -> Callable[[int, int, torch.Generator], ExampleInputs]:
    """Inputs of shape ``(batch, channels, size, size)`` drawn from a normal distribution."""

    def make(batch: int, size: int, generator: torch.Generator) -> ExampleInputs:
        return (torch.randn(batch, channels, size, size, generator=generator),)

    return make


def token_inputs(
    vocab_size: int, names: tuple[str, ...] = ("input_ids",)
) -> Callable[[int, int, torch.Generator], ExampleInputs]:
    """Keyword inputs of token ids ``(batch, size)``, one tensor per name."""

    def make(batch: int, size: int, generator: torch.Generator) -> dict[str, Any]:
        return {
            name: torch.randint(0, vocab_size, (batch, size), generator=generator) for name in names
        }

    return make
