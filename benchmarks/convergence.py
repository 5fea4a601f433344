"""Convergence of every schedule: one model, one data set, one start, test accuracy per epoch.

A small CNN for scikit-learn's 8x8 digits is compiled into ``--stages`` pipeline stages, its
initial weights saved, and then trained on the CPU with every schedule in turn:

    torchrun --nproc_per_node 4 -m runtime --model CNN.py --data digits --epochs E \\
        --schedule S --init_checkpoint init.pt --snapshot_dir SNAPSHOTS --log_json LOG ...

from the same weights, seed and data order, with the same optimizer and learning rate. Each
rank writes its stage's weights at the end of every epoch (``--snapshot_dir``); this process
merges each epoch's stage files, builds the stages with them and runs them in sequence, in eval
mode, on the digits test split. It prints, per schedule, the final test accuracy, the final train
loss (the mean of the last epoch's step losses), the difference from 1f1b in points and whether
it is within ``TARGET_POINTS`` of 1f1b, and draws test accuracy per epoch to ``--plot``.

wpipe trains a second file of the same stage count whose stages are placed two per process
(``--schedule wpipe`` of the partitioner), on half the processes, from the same weights.

gpipe, 1f1b, 2bw and wpipe update once per batch; pipedream (with and without vertical sync), pipeoptim
and stale once per microbatch, so at the same learning rate they make m times as many updates
on batches m times smaller: that is how those methods train, and the header says so. stale is
the unmitigated baseline, reported whether or not it meets the target. The seconds column is
each torchrun's wall time, starting its processes included.

    python benchmarks/convergence.py --plot convergence.png

Defaults (Adam, lr 1e-3 on a cosine schedule, 8 epochs of batches of 64 in 4 microbatches)
take about 3 minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
# The working tree's autopipe and runtime, the ones ``python -m runtime`` run from it imports.
sys.path.insert(0, str(REPO))

import torch
from torch import nn

from launch import BenchmarkError, run_measured
import autopipe
from autopipe.cost import CostModel
from autopipe.partitioning import PartitionOptions
from runtime.data import DataSource
from runtime.stage import load_generated
from runtime.train import LR_SCHEDULES, OPTIMIZERS, TrainConfig

PROG = "convergence"
TARGET_POINTS = 1.0
REFERENCE = "1f1b"
UNMITIGATED = "stale"
INITIAL_WEIGHTS = "init.pt"
WHOLE_SPLIT = 1 << 20  # a batch size larger than the test split: all of it in one batch


@dataclass(frozen=True)
class Run:
    """One schedule to train with: its label, ``--schedule`` and extra runtime flags."""

    label: str
    schedule: str
    flags: tuple[str, ...] = ()
    per_microbatch: bool = False


RUNS = (
    Run("gpipe", "gpipe"),
    Run("1f1b", "1f1b"),
    Run("pipedream", "pipedream", per_microbatch=True),
    Run("pipedream-vs", "pipedream", ("--vertical_sync",), per_microbatch=True),
    Run("2bw", "2bw"),
    Run("pipeoptim", "pipeoptim", per_microbatch=True),
    Run("stale", "stale", per_microbatch=True),
    Run("wpipe", "wpipe"),
)


@dataclass(frozen=True)
class Outcome:
    """One run's test accuracy after each epoch and its last epoch's mean train loss."""

    run: Run
    accuracy: list[float]
    train_loss: float
    seconds: float


class DigitsCNN(nn.Module):
    """Four convolutions and two linear layers over 8x8 digits, without batch norm, so the
    microbatches a schedule cuts a batch into do not change what a step computes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv4 = nn.Conv2d(64, 64, 3, padding=1)
        self.hidden = nn.Linear(64 * 4 * 4, 128)
        self.out = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv2(torch.relu(self.conv1(x)))))
        x = torch.relu(self.conv4(torch.relu(self.conv3(x)))).flatten(1)
        return self.out(torch.relu(self.hidden(x)))


def compile_model(args: argparse.Namespace, wpipe: bool = False) -> Path:
    """The CNN compiled into ``--stages`` stages in ``--workdir``, its initial weights (seeded)
    saved beside it as ``INITIAL_WEIGHTS``; with ``wpipe``, stages placed two per device."""
    torch.manual_seed(args.seed)
    model = DigitsCNN()
    generated = args.workdir / ("digits_cnn_wpipe.py" if wpipe else "digits_cnn.py")
    example = (torch.randn(args.batch_size // args.microbatches, 1, 8, 8),)
    options = PartitionOptions(cost=CostModel(schedule="wpipe")) if wpipe else None
    autopipe.compile(
        model,
        example,
        n_stages=args.stages,
        output=generated,
        method=args.method,
        analysis=False,
        options=options,
    )
    torch.save(model.state_dict(), args.workdir / INITIAL_WEIGHTS)
    check_stages(load_generated(generated), args.method)
    return generated


def check_stages(generated: ModuleType, method: str) -> None:
    """Every stage must hold weights: a stage without any has nothing to train or to version."""
    for index, stage in enumerate(generated.build_stages()):
        if next(stage.parameters(), None) is None:
            raise BenchmarkError(
                f"--method {method} left stage {index} without weights: try another --method"
            )


def runtime_command(args: argparse.Namespace, run: Run, model: Path, folder: Path) -> list[str]:
    """torchrun of the runtime for ``run``, writing snapshots and a JSON log into ``folder``."""
    flags = {
        "--model": model,
        "--schedule": run.schedule,
        "--data": "digits",
        "--epochs": args.epochs,
        "--batch_size": args.batch_size,
        "--microbatches": args.microbatches,
        "--optimizer": args.optimizer,
        "--lr": args.lr,
        "--lr_schedule": args.lr_schedule,
        "--seed": args.seed,
        "--init_checkpoint": args.workdir / INITIAL_WEIGHTS,
        "--snapshot_dir": folder / "snapshots",
        "--log_json": folder / "log.jsonl",
        "--device": "cpu",
    }
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    pairs = [str(item) for pair in flags.items() for item in pair]
    processes = args.stages // 2 if run.schedule == "wpipe" else args.stages
    return [
        *launcher,
        *("--nproc_per_node", str(processes), "-m", "runtime"),
        *pairs,
        *run.flags,
        "--no_progress",
    ]


def train(command: list[str], label: str, timeout: float) -> float:
    """Run one training, one thread per process; its seconds."""
    started = time.perf_counter()
    run_measured(label, command, 1, timeout)
    return time.perf_counter() - started


def digits_test_split(pipeline: dict, model: Path) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The digits test split, as the runtime feeds the model: inputs by name and labels."""
    config = TrainConfig(str(model), data="digits", batch_size=WHOLE_SPLIT, microbatches=1)
    data = DataSource(config, pipeline, split="test")
    return data.inputs(0), data.labels(0)


@torch.no_grad()
def accuracy(generated: ModuleType, weights: dict, test: tuple[dict, torch.Tensor]) -> float:
    """Test accuracy in percent of the stages built with ``weights``, run in sequence."""
    pipeline = generated.PIPELINE
    values, labels = dict(test[0]), test[1]
    for spec, stage in zip(pipeline["stages"], generated.build_stages(weights)):
        stage.eval()
        values.update(zip(spec["outputs"], stage(*(values[name] for name in spec["inputs"]))))
    predicted = values[pipeline["model_outputs"][0]].argmax(-1)
    return 100.0 * (predicted == labels).float().mean().item()


def snapshot(generated: ModuleType, folder: Path, epoch: int) -> dict:
    """Epoch ``epoch``'s stage snapshots merged into the original model's state dict."""
    stages = range(len(generated.PIPELINE["stages"]))
    epoch_folder = folder / f"epoch_{epoch}"
    return generated.merge_state_dicts(
        [torch.load(epoch_folder / f"stage_{s}.pt", map_location="cpu") for s in stages]
    )


def last_epoch_loss(log: Path, epoch: int) -> float:
    """Mean of epoch ``epoch``'s step losses in a ``--log_json`` file."""
    records = [json.loads(line) for line in log.read_text().splitlines()]
    losses = [r["loss"] for r in records if r["epoch"] == epoch]
    return sum(losses) / len(losses)


def measure(
    args: argparse.Namespace, run: Run, model: Path, test: tuple[dict, torch.Tensor]
) -> Outcome:
    """Train with ``run``'s schedule, then score every epoch's snapshot on the test split."""
    generated = load_generated(model)
    folder = args.workdir / run.label
    folder.mkdir()
    seconds = train(runtime_command(args, run, model, folder), run.label, args.timeout)
    scores = [
        accuracy(generated, snapshot(generated, folder / "snapshots", epoch), test)
        for epoch in range(args.epochs)
    ]
    loss = last_epoch_loss(folder / "log.jsonl", args.epochs - 1)
    return Outcome(run, scores, loss, seconds)


def verdict(outcome: Outcome, reference: Outcome | None) -> tuple[str, str]:
    """The difference from 1f1b in points and whether it meets the target."""
    if reference is None:
        return "", ""
    if outcome.run.label == REFERENCE:
        return "", "reference"
    points = outcome.accuracy[-1] - reference.accuracy[-1]
    met = "yes" if points >= -TARGET_POINTS else "no"
    if outcome.run.label == UNMITIGATED:
        met += " (unmitigated)"
    return f"{points:+.2f}", met


def print_table(outcomes: Sequence[Outcome]) -> None:
    """One line per schedule: final accuracy and loss, difference from 1f1b, target met."""
    reference = next((o for o in outcomes if o.run.label == REFERENCE), None)
    print(
        f"{'schedule':<14} {'test acc %':>10} {'train loss':>10} {'vs 1f1b':>8} "
        f"{'within ' + format(TARGET_POINTS, 'g') + ' pt':<17} {'seconds':>7}"
    )
    for outcome in outcomes:
        points, met = verdict(outcome, reference)
        print(
            f"{outcome.run.label:<14} {outcome.accuracy[-1]:>10.2f} {outcome.train_loss:>10.4f} "
            f"{points:>8} {met:<17} {outcome.seconds:>7.1f}"
        )


def plot(outcomes: Sequence[Outcome], path: Path, title: str) -> None:
    """Test accuracy after each epoch, one line per schedule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for outcome in outcomes:
        epochs = range(1, len(outcome.accuracy) + 1)
        style = "--" if outcome.run.label == UNMITIGATED else "-"
        axes.plot(epochs, outcome.accuracy, style, marker="o", label=outcome.run.label)
    axes.set_xlabel("epoch")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def selected_runs(names: str | None) -> list[Run]:
    """The runs ``--schedules`` names, in the table's order; all by default."""
    if names is None:
        return list(RUNS)
    wanted = [name.strip() for name in names.split(",") if name.strip()]
    known = [run.label for run in RUNS]
    unknown = [name for name in wanted if name not in known]
    if unknown or not wanted:
        raise BenchmarkError(
            f"unknown schedule {(unknown or [names])[0]!r}; choose from {', '.join(known)}"
        )
    return [run for run in RUNS if run.label in wanted]


def check_args(args: argparse.Namespace, runs: Sequence[Run]) -> None:
    """Reject flags that cannot make every run, before starting any."""
    for flag in ("epochs", "batch_size", "microbatches", "stages"):
        if getattr(args, flag) < 1:
            raise BenchmarkError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.microbatches > args.batch_size:
        raise BenchmarkError(
            f"--microbatches {args.microbatches} is more than --batch_size {args.batch_size}"
        )
    if any(run.schedule == "2bw" for run in runs) and args.microbatches < args.stages:
        raise BenchmarkError(
            f"2bw needs --microbatches of at least the {args.stages} stages: raise it, or leave "
            "2bw out of --schedules"
        )
    if any(run.schedule == "wpipe" for run in runs) and args.stages % 2:
        raise BenchmarkError(
            f"wpipe runs two stages per process, so it needs an even --stages, got {args.stages}"
        )


def _labels(runs: Sequence[Run], per_microbatch: bool) -> str:
    return ", ".join(run.label for run in runs if run.per_microbatch == per_microbatch) or "none"


def header(args: argparse.Namespace, runs: Sequence[Run], steps_per_epoch: int) -> str:
    """What every run shares, and how many updates each kind of schedule makes."""
    batches = args.epochs * steps_per_epoch
    microbatches = batches * args.microbatches
    shared = (
        f"digits CNN, {args.stages} stages on the CPU (gloo, OMP_NUM_THREADS=1 per process); "
        f"{args.epochs} epochs of {steps_per_epoch} batches of {args.batch_size} in "
        f"{args.microbatches} microbatches; {args.optimizer}, lr {args.lr} {args.lr_schedule}, "
        f"seed {args.seed}, the same initial weights for all"
    )
    updates = (
        f"updates per stage: {batches} (one per batch) for {_labels(runs, False)}; "
        f"{microbatches} (one per microbatch of {args.batch_size // args.microbatches}) for "
        f"{_labels(runs, True)}"
    )
    return f"{shared}\n{updates}"


def benchmark(args: argparse.Namespace) -> None:
    """Compile once, train with every selected schedule, print the table, draw the plot."""
    runs = selected_runs(args.schedules)
    check_args(args, runs)
    with tempfile.TemporaryDirectory(prefix=f"{PROG}_") as scratch:
        args.workdir = Path(args.workdir or scratch).resolve() / PROG
        if args.workdir.exists():
            raise BenchmarkError(f"{args.workdir} exists: remove it or pass another --workdir")
        args.workdir.mkdir(parents=True)
        model = compile_model(args)
        models = (
            {"wpipe": compile_model(args, wpipe=True)}
            if any(run.schedule == "wpipe" for run in runs)
            else {}
        )
        pipeline = load_generated(model).PIPELINE
        config = TrainConfig(
            str(model), data="digits", batch_size=args.batch_size, microbatches=args.microbatches
        )
        print(header(args, runs, DataSource(config, pipeline).steps_per_epoch), flush=True)
        test = digits_test_split(pipeline, model)
        outcomes = []
        for run in runs:
            outcome = measure(args, run, models.get(run.schedule, model), test)
            scores = " ".join(f"{a:.1f}" for a in outcome.accuracy)
            print(f"{run.label}: test accuracy per epoch {scores}", flush=True)
            outcomes.append(outcome)
    print()
    print_table(outcomes)
    title = (
        f"digits CNN, p={args.stages}, m={args.microbatches}, batch {args.batch_size}, "
        f"{args.optimizer} lr {args.lr} {args.lr_schedule}"
    )
    plot(outcomes, Path(args.plot), title)
    print(f"plot: {args.plot}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.splitlines()[0], epilog="See the module docstring."
    )
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adam")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--lr_schedule", choices=LR_SCHEDULES, default="cosine", help="(default cosine)"
    )
    parser.add_argument(
        "--schedules", help=f"comma-separated subset of {','.join(r.label for r in RUNS)}"
    )
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument(
        "--method", default="metis", help="autopipe partitioning method (default metis)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default="convergence.png", help="accuracy-per-epoch figure")
    parser.add_argument(
        "--workdir", help="keep the model, snapshots and logs here (default: a temporary folder)"
    )
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds one run may take (default 600)"
    )
    return parser


def main() -> None:
    args = build_parser().parse_args()
    try:
        benchmark(args)
    except BenchmarkError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
