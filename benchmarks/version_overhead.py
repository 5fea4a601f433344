"""What weight versions add to each stage's microbatch: asynchronous schedules against plain.

A synchronous schedule (gpipe, 1f1b) computes with the current weights. An asynchronous one
runs each forward and backward inside ``VersionStore.use``, which swaps the version the action
names into the parameters; a forward whose backward needs other weights, or has a step between
the two, also records the parameters autograd saves as references (one Python call per saved
tensor when packed and again when unpacked); and a step keeps the version it replaces by
copying it first. For each stage of a generated file, in one process, this times one
microbatch's forward, backward and SGD step three ways, taking turns for ``--rounds`` rounds:

- ``plain``: no versions, as gpipe and 1f1b run;
- ``swapped``: the forward and the backward inside ``use``, the step keeping its version;
- ``recorded``: the same with the forward recording saved parameters.

and prints the medians in milliseconds. ``simulate_vs_measured.py`` predicts from the plain
costs, so these differences are part of what it misses for the asynchronous schedules.

    python benchmarks/version_overhead.py --model generated_models/X.py --microbatch 4
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch
from torch import nn

from stage_times import forward_and_backward, stage_inputs, synthetic_inputs
from runtime.stage import RuntimeConfigError, load_generated
from runtime.weights import VersionStore

PROG = "version_overhead"
MODES = ("plain", "swapped", "recorded")
WARMUP = 3


def one_microbatch(
    module: nn.Module,
    store: VersionStore,
    optimizer: torch.optim.Optimizer,
    arguments: list[torch.Tensor],
    mode: str,
) -> tuple[float, float, float]:
    """Milliseconds of one forward, its backward (``forward_and_backward``) and an SGD step
    with gradient clearing, run the way ``mode`` names."""
    if mode == "plain":
        forward_ms, backward_ms = forward_and_backward(module, arguments, clear=False)
    else:
        forward_ms, backward_ms = forward_and_backward(
            module,
            arguments,
            lambda: store.use(store.current, record=mode == "recorded"),
            lambda: store.use(store.current, record=False),
            clear=False,
        )
    start = time.perf_counter()
    keeping = store.step(keep={store.current}) if mode != "plain" else contextlib.nullcontext()
    with keeping:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    step_ms = (time.perf_counter() - start) * 1e3
    return forward_ms, backward_ms, step_ms


def time_stage(generated: Any, stage: int, arguments: list[torch.Tensor], rounds: int) -> dict:
    """Per mode, the median forward, backward and step milliseconds of ``stage``."""
    module = generated.build_stage(stage).train()
    store = VersionStore(module)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.01)
    found: dict[str, list[tuple[float, float, float]]] = {mode: [] for mode in MODES}
    for round_ in range(WARMUP + rounds):
        for mode in MODES:
            figures = one_microbatch(module, store, optimizer, arguments, mode)
            if round_ >= WARMUP:
                found[mode].append(figures)
    return {
        mode: [statistics.median(column) for column in zip(*rows)] for mode, rows in found.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="generated file")
    parser.add_argument("--microbatch", type=int, default=4, help="samples per microbatch")
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds of the three modes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    try:
        if args.microbatch < 1 or args.rounds < 1 or args.threads < 1:
            raise RuntimeConfigError("--microbatch, --rounds and --threads must be at least 1")
        torch.set_num_threads(args.threads)
        generated = load_generated(args.model)
        pipeline = generated.PIPELINE
        model_inputs = synthetic_inputs(args.model, pipeline, args.microbatch)
    except RuntimeConfigError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(
        f"{args.model}: microbatch {args.microbatch}, {args.threads} thread(s), median of "
        f"{args.rounds} rounds (ms)"
    )
    print(
        f"{'stage':>5} {'F plain':>8} {'swapped':>8} {'recorded':>9} {'B plain':>8} "
        f"{'swapped':>8} {'recorded':>9} {'S plain':>8} {'keeping':>8}"
    )
    added = {"swapped": [], "recorded": []}
    for stage in range(len(pipeline["stages"])):
        arguments = stage_inputs(pipeline, stage, model_inputs, args.microbatch)
        times = time_stage(generated, stage, arguments, args.rounds)
        plain, swapped, recorded = (times[mode] for mode in MODES)
        print(
            f"{stage:>5} {plain[0]:>8.3f} {swapped[0]:>8.3f} {recorded[0]:>9.3f} "
            f"{plain[1]:>8.3f} {swapped[1]:>8.3f} {recorded[1]:>9.3f} "
            f"{plain[2]:>8.3f} {swapped[2]:>8.3f}"
        )
        for mode in added:
            extra = sum(times[mode][:2]) - sum(plain[:2])
            added[mode].append((extra, extra / sum(plain[:2])))
    for mode, rows in added.items():
        print(
            f"{mode}: a forward and backward take {statistics.mean(e for e, _ in rows):+.3f} ms "
            f"({statistics.mean(r for _, r in rows):+.1%}) against plain, averaged over stages"
        )


if __name__ == "__main__":
    main()
