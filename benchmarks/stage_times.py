"""Run under torchrun with P processes: time each stage of a generated file, whole, on one
microbatch, first alone and then with every process computing at once.

A node-by-node profile is taken in one process with the machine to itself. In a pipeline the
P processes compute side by side and share the machine's memory bandwidth, caches and cores
(gloo's threads among them), so the same stage can take longer there. This script measures
by how much: process r builds the stages that run on it (stage r, or WPipe's two), makes one
microbatch of inputs (the runtime's synthetic data for model inputs, random values shaped from
``PIPELINE`` for the rest), and times a forward and a backward (random output gradients):

- ``alone``: one process at a time, the others waiting at a barrier;
- ``together``: every process at once, each repeating until ``TOGETHER_S`` has passed so that
  none finishes early and leaves the machine to the others.

Rank 0 prints JSON: per stage, the median forward and backward milliseconds of each mode.

    torchrun --standalone --nproc_per_node 2 benchmarks/stage_times.py --model FILE --microbatch 4

``simulate_vs_measured.py`` launches it and predicts with both.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from contextlib import AbstractContextManager
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch
import torch.distributed as dist
from torch import nn

from runtime.comm import value_specs
from runtime.data import DataSource
from runtime.layout import make_layout
from runtime.stage import load_generated
from runtime.train import TrainConfig

REPEATS = 20
WARMUP = 3
TOGETHER_S = 1.0


def synthetic_inputs(path: str | Path, pipeline: dict[str, Any], microbatch: int) -> dict:
    """The model inputs of one microbatch as the runtime's synthetic data makes them."""
    config = TrainConfig(model=str(path), batch_size=microbatch, microbatches=1, steps=1)
    return DataSource(config, pipeline).inputs(0)


def stage_inputs(
    pipeline: dict[str, Any], stage: int, model_inputs: dict[str, torch.Tensor], microbatch: int
) -> list[torch.Tensor]:
    """One microbatch of the stage's arguments, in order."""
    specs = value_specs(pipeline)
    arguments = []
    for name in pipeline["stages"][stage]["inputs"]:
        spec = specs[name]
        if spec["producer"] is None:
            arguments.append(model_inputs[name])
            continue
        shape = list(spec["shape"])
        if spec.get("batch_dim") is not None:
            shape[spec["batch_dim"]] = microbatch
        dtype = getattr(torch, spec["dtype"])
        if dtype.is_floating_point:
            value = torch.randn(shape, dtype=dtype).requires_grad_(bool(spec["requires_grad"]))
        else:
            value = torch.zeros(shape, dtype=dtype)
        arguments.append(value)
    return arguments


def forward_and_backward(
    module: nn.Module,
    arguments: list[torch.Tensor],
    around_forward: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
    around_backward: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
    clear: bool = True,
) -> tuple[float, float]:
    """Milliseconds of one forward and of its backward, each inside a context of its own,
    seeded with random output gradients (drawn outside the timings: a last stage's logits take
    as long to fill as a layer); the gradients are cleared after, where ``clear``."""
    start = time.perf_counter()
    with around_forward():
        outputs = module(*arguments)
    forward_ms = (time.perf_counter() - start) * 1e3
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    roots = [o for o in outputs if isinstance(o, torch.Tensor) and o.requires_grad]
    grads = [torch.randn_like(o) for o in roots]
    start = time.perf_counter()
    with around_backward():
        if roots:
            torch.autograd.backward(roots, grads)
    backward_ms = (time.perf_counter() - start) * 1e3
    if clear:
        module.zero_grad(set_to_none=True)
    return forward_ms, backward_ms


def timed(run: Callable[[], tuple[float, float]], at_least_s: float) -> tuple[float, float]:
    """Median forward and backward ms over ``REPEATS`` runs after ``WARMUP``, going on until
    ``at_least_s`` has passed."""
    forwards, backwards = [], []
    start = time.perf_counter()
    while len(forwards) < WARMUP + REPEATS or time.perf_counter() - start < at_least_s:
        forward, backward = run()
        forwards.append(forward)
        backwards.append(backward)
    return statistics.median(forwards[WARMUP:]), statistics.median(backwards[WARMUP:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="generated file")
    parser.add_argument("--microbatch", type=int, required=True, help="samples per microbatch")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(rank)
    generated = load_generated(args.model)
    pipeline = generated.PIPELINE
    model_inputs = synthetic_inputs(args.model, pipeline, args.microbatch)
    # the runtime's own placement: stage r, WPipe's two stages, or a replica of a stage
    mine = [role.stage for role in make_layout(pipeline).roles(rank)]
    runs = {}
    for stage in mine:
        module = generated.build_stage(stage).train()
        arguments = stage_inputs(pipeline, stage, model_inputs, args.microbatch)
        runs[stage] = lambda module=module, arguments=arguments: forward_and_backward(
            module, arguments
        )
    found: dict[str, dict[int, tuple[float, float]]] = {"alone": {}, "together": {}}
    for turn in range(world):
        dist.barrier()
        if turn == rank:
            found["alone"] = {stage: timed(run, 0.0) for stage, run in runs.items()}
    dist.barrier()
    found["together"] = {stage: timed(run, TOGETHER_S) for stage, run in runs.items()}
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, found)
    if rank == 0:
        n_stages = len(pipeline["stages"])
        merged = {}
        for mode in ("alone", "together"):
            times = {s: t for part in gathered for s, t in part[mode].items()}
            merged[mode] = {
                "forward_ms": [times[s][0] for s in range(n_stages)],
                "backward_ms": [times[s][1] for s in range(n_stages)],
            }
        print(json.dumps(merged), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
