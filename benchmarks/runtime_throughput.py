"""Training throughput of a generated file: our runtime, torch.distributed.pipelining, one process.

Three measurements of the same stages on the same machine, one after the other:

1. our runtime: ``torchrun --nproc_per_node P -m runtime`` with the chosen schedule;
2. torch.distributed.pipelining: ``PipelineStage`` with ``ScheduleGPipe`` or ``Schedule1F1B``
   over the same P processes. Its stages form a chain, so each generated stage is wrapped in an
   adapter that takes the values live at the boundary before it (model inputs and values of
   earlier stages that this stage or a later one reads) and returns those live at the next one;
3. the unpartitioned model: every stage in sequence in one process, on the whole batch.

All three use the same synthetic data (the runtime's ``DataSource``), cross entropy on the first
model output, SGD stepped once per batch, the same starting weights (each stage's own
initialisation after seeding with ``--seed``, handed to our runtime as ``--init_checkpoint``),
dropout left on, and weights tied across stages (GPT-2's embedding and LM head) kept equal:
summed gradients in both pipelines, one shared tensor in the single process. Each run prints
``step K loss L samples/s S`` per step on its last rank; the first ``--warmup`` steps are
dropped (torch's first step also infers the shapes sent between stages) and the rest give
samples over their total time (and the median step, for reference). Both pipelines compute the
same losses; with ``gpipe`` only to rounding, as ours runs the backwards in reverse microbatch
order and torch's in order. The single process differs where microbatches matter (BatchNorm
statistics) and in its dropout masks.

Threads: every process of every run gets ``OMP_NUM_THREADS = max(1, cores // P)`` (``--threads``
overrides), so a pipeline process and the single process each have one device's share of the
machine, and a pipeline's efficiency, its samples/s over P times the single process's, is
measured against P such devices. The ideal is m / (m + P - 1) for m microbatches (a speedup of
P * m / (m + P - 1)). On a GPU box every rank uses ``cuda:<local rank>`` with NCCL, the single
process ``cuda:0``; on the CPU, gloo.

Generate a small model first, then measure it:

    python -m autopipe.partition vision --model resnet_tiny -p 2 -b 32 -o /tmp/resnet_tiny_p2.py
    python benchmarks/runtime_throughput.py --model /tmp/resnet_tiny_p2.py --schedule 1f1b \\
        --microbatches 4 --batch_size 32 --steps 20 --warmup 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# The working tree's runtime, the one ``python -m runtime`` run from the repository imports.
sys.path.insert(0, str(REPO))

import torch
import torch.distributed as dist
from launch import BenchmarkError, Figures, figures, run_measured, torchrun
from torch import nn

from runtime.comm import value_specs
from runtime.data import DataSource
from runtime.executor import reduce_tied_gradients, synchronize_tied, tied_groups
from runtime.layout import Layout
from runtime.stage import DEVICES, RuntimeConfigError, backend_for, load_generated, wants_cuda
from runtime.train import LOSSES, OPTIMIZERS, TrainConfig

PROG = "runtime_throughput"
LABELS = ("single process", "autopipe runtime", "torch pipelining")
LOSS = "cross_entropy"


class UsageError(BenchmarkError):
    """Flags that cannot make a run, with what to change."""


def pick_device(preference: str) -> torch.device:
    """``cuda:<LOCAL_RANK>`` when CUDA is wanted, else the CPU."""
    if wants_cuda(preference):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The runtime's config for the flags every run shares (data, loss, optimizer, seed)."""
    return TrainConfig(
        model=args.model,
        schedule=args.schedule,
        microbatches=args.microbatches,
        batch_size=args.batch_size,
        steps=args.steps,
        optimizer="sgd",
        lr=args.lr,
        loss=LOSS,
        seed=args.seed,
        init_checkpoint=args.init_checkpoint,
    )


def write_initial_weights(generated: ModuleType, seed: int, path: Path) -> None:
    """One set of starting weights for all three runs, under the original model's keys: each
    stage's own initialisation after seeding with ``seed``."""
    parts = []
    for index in range(len(generated.PIPELINE["stages"])):
        torch.manual_seed(seed)
        parts.append(generated.build_stage(index).state_dict())
    torch.save(generated.merge_state_dicts(parts), path)


def build_stages(
    generated: ModuleType, indices: Sequence[int], config: TrainConfig, device: torch.device
) -> list[nn.Module]:
    """Stages ``indices`` with the shared starting weights, on ``device``, in training mode."""
    weights = torch.load(config.init_checkpoint, map_location="cpu")
    return [generated.build_stage(index, weights).to(device).train() for index in indices]


def report_step(step: int, loss: float, batch: int, seconds: float) -> None:
    """The runtime's own per-step line, so every run is parsed the same way."""
    print(f"step {step} loss {loss:.6f} samples/s {batch / seconds:.1f}", flush=True)


def live_values(pipeline: Mapping[str, Any]) -> list[list[str]]:
    """For each boundary k (before stage k, and k = P after the last), the values made before it
    that stage k or a later one reads; the loss reads the first model output after the last."""
    specs = value_specs(pipeline)
    stages = pipeline["stages"]
    n_stages = len(stages)
    last_reader = {name: -1 for name in specs}
    for index, stage in enumerate(stages):
        for name in stage["inputs"]:
            last_reader[name] = index
    last_reader[pipeline["model_outputs"][0]] = n_stages
    made_at = {
        name: -1 if spec["producer"] is None else spec["producer"] for name, spec in specs.items()
    }
    return [
        [name for name in specs if made_at[name] < k <= last_reader[name]]
        for k in range(n_stages + 1)
    ]


class ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous, as sending it needs: a stage that
    transposes what it receives would otherwise hand torch a strided gradient to receive into."""

    @staticmethod
    def forward(ctx: Any, value: torch.Tensor) -> torch.Tensor:
        return value.view_as(value)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class ChainAdapter(nn.Module):
    """A generated stage as a link of a chain: live values in, live values out, by position.

    ``forward(*incoming)`` picks the stage's inputs by name, runs it and returns the values live
    at the next boundary (the first model output, alone, after the last stage), contiguous as
    sending needs, as our runtime sends them; gradients go back contiguous too. A value that
    only passes through is returned unchanged, so its gradient flows back unchanged.
    """

    def __init__(
        self, stage: nn.Module, pipeline: Mapping[str, Any], index: int, live: list[list[str]]
    ) -> None:
        super().__init__()
        self.stage = stage
        self.inputs = list(pipeline["stages"][index]["inputs"])
        self.outputs = list(pipeline["stages"][index]["outputs"])
        self.incoming = live[index]
        self.outgoing = live[index + 1]
        self.is_last = index == len(pipeline["stages"]) - 1

    def forward(self, *incoming: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        received = (ContiguousGrad.apply(v) if v.requires_grad else v for v in incoming)
        values = dict(zip(self.incoming, received))
        values.update(zip(self.outputs, self.stage(*(values[name] for name in self.inputs))))
        if self.is_last:
            return values[self.outgoing[0]]
        return tuple(values[name].contiguous() for name in self.outgoing)


def pipelining_worker(args: argparse.Namespace) -> None:
    """Train ``args.steps`` batches with torch.distributed.pipelining; the last rank reports."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    schedules = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
    generated = load_generated(args.model)
    pipeline = generated.PIPELINE
    config = train_config(args)
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend_for(device))
    try:
        rank, n_stages = dist.get_rank(), len(pipeline["stages"])
        (stage,) = build_stages(generated, [rank], config, device)
        groups = tied_groups(pipeline, Layout((1,) * n_stages), rank, {rank: stage})
        synchronize_tied(groups)
        optimizer = OPTIMIZERS[config.optimizer](list(stage.parameters()), config)
        torch.manual_seed(config.seed + rank)
        adapter = ChainAdapter(stage, pipeline, rank, live_values(pipeline))
        schedule = schedules[config.schedule](
            PipelineStage(adapter, rank, n_stages, device),
            config.microbatches,
            loss_fn=LOSSES[config.loss],
        )
        data = DataSource(config, pipeline)
        is_last = rank == n_stages - 1
        for step in range(config.steps):
            started = time.perf_counter()
            model_inputs = ()
            if rank == 0:
                inputs = data.inputs(step)
                model_inputs = tuple(inputs[name].to(device) for name in adapter.incoming)
            kwargs: dict[str, Any] = {}
            losses: list[torch.Tensor] = []
            if is_last:
                kwargs = {"target": data.labels(step).to(device), "losses": losses}
            schedule.step(*model_inputs, **kwargs)
            reduce_tied_gradients(groups)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if is_last:
                loss = torch.stack(losses).mean().item()
                report_step(step, loss, config.batch_size, time.perf_counter() - started)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def tie_shared_weights(stages: Sequence[nn.Module], pipeline: Mapping[str, Any]) -> None:
    """Make each group of tied parameters one tensor again, as in the original model."""
    for members in pipeline.get("tied_parameters", []):
        (first_stage, first_key), *rest = members
        shared = stages[first_stage].get_parameter(first_key)
        for index, key in rest:
            owner, _, leaf = key.rpartition(".")
            setattr(stages[index].get_submodule(owner), leaf, shared)


def single_worker(args: argparse.Namespace) -> None:
    """Train ``args.steps`` batches of every stage in sequence, in this process."""
    generated = load_generated(args.model)
    pipeline = generated.PIPELINE
    config = train_config(args)
    device = pick_device(args.device)
    stages = build_stages(generated, range(len(pipeline["stages"])), config, device)
    tie_shared_weights(stages, pipeline)
    parameters = list({id(p): p for s in stages for p in s.parameters()}.values())
    optimizer = OPTIMIZERS[config.optimizer](parameters, config)
    loss_fn = LOSSES[config.loss]
    data = DataSource(config, pipeline)
    torch.manual_seed(config.seed)
    for step in range(config.steps):
        started = time.perf_counter()
        values = {name: value.to(device) for name, value in data.inputs(step).items()}
        labels = data.labels(step).to(device)
        for spec, stage in zip(pipeline["stages"], stages):
            values.update(zip(spec["outputs"], stage(*(values[name] for name in spec["inputs"]))))
        loss = loss_fn(values[pipeline["model_outputs"][0]], labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        report_step(step, loss.item(), config.batch_size, time.perf_counter() - started)


def shared_flags(args: argparse.Namespace) -> list[str]:
    """The flags our runtime and the workers share; the model path absolute, as runs start in
    the repository."""
    flags = {
        "--model": Path(args.model).resolve(),
        "--schedule": args.schedule,
        "--microbatches": args.microbatches,
        "--batch_size": args.batch_size,
        "--steps": args.steps,
        "--lr": args.lr,
        "--seed": args.seed,
        "--init_checkpoint": args.init_checkpoint,
    }
    return [str(item) for pair in flags.items() for item in pair]


def commands(args: argparse.Namespace, n_stages: int) -> dict[str, list[str]]:
    """The three runs, labelled, in the order they are made."""
    worker = [str(Path(__file__).resolve())]
    device = [] if args.device == "auto" else ["--device", args.device]
    ours = ["-m", "runtime", *shared_flags(args), "--optimizer", "sgd", "--loss", LOSS, *device]
    theirs = [*worker, *shared_flags(args), "--device", args.device]
    single, mine, torchs = LABELS
    return {
        single: [sys.executable, *theirs, "--worker", "single"],
        mine: [*torchrun(n_stages), *ours],
        torchs: [*torchrun(n_stages), *theirs, "--worker", "pipelining"],
    }


def check_args(args: argparse.Namespace, n_stages: int) -> None:
    """Reject flags that cannot make all three runs, before starting any."""
    for flag in ("microbatches", "batch_size", "steps", "repeats"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.warmup >= args.steps:
        raise UsageError(
            f"--warmup {args.warmup} leaves none of the --steps {args.steps} to measure"
        )
    if args.microbatches > args.batch_size:
        raise UsageError(
            f"--microbatches {args.microbatches} is more than --batch_size {args.batch_size}"
        )
    if args.schedule == "1f1b" and args.microbatches < n_stages:
        raise UsageError(
            f"torch's Schedule1F1B needs at least as many microbatches as stages: "
            f"raise --microbatches to {n_stages} or use --schedule gpipe"
        )
    if wants_cuda(args.device) and torch.cuda.device_count() < n_stages:
        raise UsageError(
            f"{n_stages} stages need {n_stages} GPUs, {torch.cuda.device_count()} visible; "
            "pass --device cpu"
        )


def print_table(rows: Sequence[Figures], single: Figures, n_stages: int) -> None:
    """One line per run; speedup over the single process, efficiency = speedup / P."""
    print(
        f"{'run':<18} {'samples/s':>10} {'median':>10} {'speedup':>8} {'efficiency':>10} "
        f"{'first loss':>10} {'last loss':>10}"
    )
    for row in rows:
        speedup = row.samples_per_s / single.samples_per_s
        efficiency = "" if row is single else f"{speedup / n_stages:.3f}"
        print(
            f"{row.label:<18} {row.samples_per_s:>10.1f} {row.median_samples_per_s:>10.1f} "
            f"{speedup:>8.2f} {efficiency:>10} {row.first_loss:>10.4f} {row.last_loss:>10.4f}"
        )


def benchmark(args: argparse.Namespace) -> None:
    """Make the three runs one after the other and print their figures."""
    generated = load_generated(args.model)
    pipeline = generated.PIPELINE
    n_stages, m = len(pipeline["stages"]), args.microbatches
    check_args(args, n_stages)
    cores = len(os.sched_getaffinity(0))
    threads = args.threads or max(1, cores // n_stages)
    print(
        f"{args.model}: {n_stages} stages, {args.schedule}, {m} microbatches, batch "
        f"{args.batch_size}, {args.steps} steps of which {args.warmup} warm-up, SGD lr {args.lr}"
    )
    device = "cuda:<local rank>, NCCL" if wants_cuda(args.device) else "cpu, gloo"
    print(
        f"device {device}; {cores} cores, OMP_NUM_THREADS={threads} in each of the {n_stages} "
        "pipeline processes and in the single process",
        flush=True,
    )
    rounds: list[dict[str, Figures]] = []
    with tempfile.TemporaryDirectory(prefix=f"{PROG}_") as scratch:
        args.init_checkpoint = str(Path(scratch) / "initial_weights.pt")
        write_initial_weights(generated, args.seed, Path(args.init_checkpoint))
        for round_index in range(args.repeats):
            runs = list(commands(args, n_stages).items())
            if round_index % 2:
                # the two pipelines take turns going first, so neither always meets the
                # machine the other left behind
                runs[1], runs[2] = runs[2], runs[1]
            measured = {}
            for label, command in runs:
                done = run_measured(label, command, threads, args.timeout)
                measured[label] = figures(label, done.stdout, args.batch_size, args.warmup)
            rounds.append(measured)
    rows = [_median_figures([measured[label] for measured in rounds]) for label in LABELS]
    single, ours, theirs = rows
    print()
    if len(rounds) > 1:
        print(f"median over {len(rounds)} rounds of each run's samples/s:")
    print_table(rows, single, n_stages)
    ideal = m / (m + n_stages - 1)
    print(
        f"ideal: efficiency m/(m+p-1) = {ideal:.3f}, speedup p*m/(m+p-1) = {ideal * n_stages:.2f}"
    )
    print()
    ratios = [r[LABELS[1]].samples_per_s / r[LABELS[2]].samples_per_s for r in rounds]
    if len(rounds) > 1:
        print(
            "ours / torch.distributed.pipelining per round: "
            + " ".join(f"{x:.2f}x" for x in ratios)
        )
    print(
        f"ours / torch.distributed.pipelining = {statistics.median(ratios):.2f}x "
        f"({ours.samples_per_s:.1f} vs {theirs.samples_per_s:.1f} samples/s; efficiency "
        f"{ours.samples_per_s / (n_stages * single.samples_per_s):.3f} vs "
        f"{theirs.samples_per_s / (n_stages * single.samples_per_s):.3f}, ideal {ideal:.3f})"
    )


def _median_figures(runs: Sequence[Figures]) -> Figures:
    """One run's figures standing for several of the same command: the median of each rate."""
    return replace(
        runs[0],
        samples_per_s=statistics.median(run.samples_per_s for run in runs),
        median_samples_per_s=statistics.median(run.median_samples_per_s for run in runs),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.splitlines()[0], epilog="See the module docstring."
    )
    parser.add_argument("--model", required=True, help="generated file, e.g. /tmp/X_p2.py")
    parser.add_argument("--schedule", choices=("gpipe", "1f1b"), default="1f1b")
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out (default 3)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="rounds of the three runs; figures are medians over rounds (default 1)",
    )
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=DEVICES, default="auto")
    parser.add_argument(
        "--threads", type=int, help="OMP_NUM_THREADS per process (default cores // stages)"
    )
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds one run may take (default 600)"
    )
    parser.add_argument("--worker", choices=("pipelining", "single"), help=argparse.SUPPRESS)
    parser.add_argument("--init_checkpoint", help=argparse.SUPPRESS)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    try:
        if args.worker == "pipelining":
            pipelining_worker(args)
        elif args.worker == "single":
            single_worker(args)
        else:
            benchmark(args)
    except (UsageError, RuntimeConfigError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    except BenchmarkError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
