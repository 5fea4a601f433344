"""A generated file's hollow double: the same ``PIPELINE``, with stages that compute next to
nothing.

Each hollow stage takes the stage's inputs and gives its outputs with their names, shapes and
dtypes (the batch dimension set to the microbatch's size), so that the runtime reads the same
data, sends and receives the same messages and computes the same loss as it does for the file,
while the stages themselves cost only writing their outputs: a run of the double times what the
runtime adds to computing each stage. An output that carries a gradient gets one from a single
weight and from the mean of every input that wants a gradient, so that the backward sends each
of those a gradient of its shape, as the file's stages do.

The double has no weights tied across stages (their all-reduce is priced apart) and says
nothing of the original model, so the runtime starts it from its own initialisation.

    python benchmarks/hollow.py generated_models/X.py /tmp/X_hollow.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch

from runtime.stage import RuntimeConfigError, load_generated

PROG = "hollow"
WORK_SIZE = 32
CALIBRATION_ROUNDS = 500
CALIBRATION_TRIALS = 7

SOURCE = '''"""The hollow double of {name}: its PIPELINE, stages that compute next to nothing
or, where BUSY_ROUNDS says, for as long as the file's stages do."""

import torch
from torch import nn

PIPELINE = {pipeline!r}

BUSY_ROUNDS = {busy!r}
\"\"\"Per stage, the rounds of work its forward and its backward do (as long as the file's
stages compute, alone, where the double was written); None: no work.\"\"\"

_MATRIX = torch.full(({size}, {size}), 1.0 / {size})


def _work(rounds: int) -> None:
    for _ in range(rounds):
        torch.mm(_MATRIX, _MATRIX)


class _BusyBackward(torch.autograd.Function):
    """The identity, whose backward works ``rounds`` rounds."""

    @staticmethod
    def forward(ctx, anchor, rounds):
        ctx.rounds = rounds
        return anchor.clone()

    @staticmethod
    def backward(ctx, grad):
        _work(ctx.rounds)
        return grad, None


class HollowStage(nn.Module):
    """Stage ``index``'s outputs, shaped as the file's are, from its inputs."""

    def __init__(self, index: int) -> None:
        super().__init__()
        stage = PIPELINE["stages"][index]
        values = stage["values"]
        self.batch_dims = [values[name]["batch_dim"] for name in stage["inputs"]]
        self.outputs = [
            (values[name]["shape"], getattr(torch, values[name]["dtype"]), values[name]["batch_dim"])
            for name in stage["outputs"]
        ]
        self.weight = nn.Parameter(torch.zeros(()))
        self.rounds = (0, 0) if BUSY_ROUNDS is None else BUSY_ROUNDS[index]

    def forward(self, *args: torch.Tensor) -> tuple:
        _work(self.rounds[0])
        sizes = [arg.shape[dim] for arg, dim in zip(args, self.batch_dims) if dim is not None]
        anchor = self.weight
        for arg in args:
            if arg.requires_grad:
                anchor = anchor + arg.mean()
        anchor = _BusyBackward.apply(anchor, self.rounds[1])
        outputs = []
        for shape, dtype, batch_dim in self.outputs:
            shape = list(shape)
            if batch_dim is not None and sizes:
                shape[batch_dim] = sizes[0]
            value = torch.zeros(shape, dtype=dtype, device=self.weight.device)
            outputs.append(value + anchor.to(dtype) if dtype.is_floating_point else value)
        return tuple(outputs)


def build_stage(index: int, state_dict: dict | None = None) -> nn.Module:
    """Build hollow stage ``index``, loading ``state_dict`` (of hollow stages) when given."""
    stage = HollowStage(index)
    if state_dict is not None:
        stage.load_state_dict({{"weight": state_dict[f"{{index}}.weight"]}})
    return stage


def merge_state_dicts(stage_state_dicts: list) -> dict:
    """The stages' weights, keyed by stage."""
    return {{
        f"{{index}}.weight": state_dict["weight"]
        for index, state_dict in enumerate(stage_state_dicts)
    }}
'''


def rounds_per_ms() -> float:
    """How many rounds of a hollow stage's work (a ``WORK_SIZE``-square matrix product) this
    process does in a millisecond alone: the median of ``CALIBRATION_TRIALS`` after one untimed."""
    matrix = torch.full((WORK_SIZE, WORK_SIZE), 1.0 / WORK_SIZE)
    times = []
    for trial in range(CALIBRATION_TRIALS + 1):
        start = time.perf_counter()
        for _ in range(CALIBRATION_ROUNDS):
            torch.mm(matrix, matrix)
        if trial:
            times.append(time.perf_counter() - start)
    return CALIBRATION_ROUNDS / (statistics.median(times) * 1e3)


def hollow_pipeline(pipeline: dict[str, Any]) -> dict[str, Any]:
    """``pipeline`` less what ties the double to the original model: its source, its state
    keys and its tied weights."""
    hollow = {key: value for key, value in pipeline.items() if key != "source"}
    hollow["tied_parameters"] = []
    hollow["state_keys"] = [f"{index}.weight" for index in range(len(pipeline["stages"]))]
    return hollow


def write_hollow(
    path: str | Path,
    destination: str | Path,
    busy_ms: Sequence[tuple[float, float]] | None = None,
) -> Path:
    """Write the hollow double of the generated file at ``path`` to ``destination``; with
    ``busy_ms``, each stage's forward and backward work as long as those (ms, per stage)."""
    generated = load_generated(path)
    pipeline = hollow_pipeline(generated.PIPELINE)
    if busy_ms is not None:
        if len(busy_ms) != len(pipeline["stages"]):
            raise RuntimeConfigError(
                f"{len(busy_ms)} stages' busy times for a file of {len(pipeline['stages'])} stages"
            )
        rate = rounds_per_ms()
        rounds = [(round(forward * rate), round(backward * rate)) for forward, backward in busy_ms]
    source = SOURCE.format(
        name=Path(path).name,
        pipeline=pipeline,
        busy=None if busy_ms is None else rounds,
        size=WORK_SIZE,
    )
    destination = Path(destination)
    destination.write_text(source)
    return destination


def main() -> None:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("model", help="generated file")
    parser.add_argument("destination", help="where to write its hollow double")
    args = parser.parse_args()
    try:
        written = write_hollow(args.model, args.destination)
    except RuntimeConfigError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(f"wrote {written}")


if __name__ == "__main__":
    main()
