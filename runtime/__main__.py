"""Command line: train a generated pipeline with torchrun, one process per stage.

    torchrun --nproc_per_node 4 -m runtime --model generated_models/X.py --schedule 1f1b \\
        --microbatches 8 --batch_size 32 --steps 100 --optimizer adamw --lr 1e-4

``--schedule pipedream`` (with ``--vertical_sync``), ``stale``, ``2bw`` or ``pipeoptim`` trains
asynchronously: one pipeline for the whole run, weight versions per microbatch. With
``--checkpoint_every K`` it is one pipeline per K steps instead, drained for each checkpoint:
a bubble every K steps, and a restart of the weight versions there, so the updates differ from
those of a run without checkpoints (as at PipeDream's epoch ends); ``--resume`` goes on with the
next K steps.

A file whose stages have replicas (``autopipe.partition --stage_to_num_ranks`` or
``--replication``) runs each replica on a rank of its own; ``--dp N`` runs N copies of the plan.

``--config FILE.json`` gives defaults that the flags override. User errors print one line,
``runtime: error: ...``, and exit with status 2 on every rank. A rank that crashes prints its
traceback and ``runtime: error: rank R failed: ...`` and exits with status 1; torchrun then stops
the other ranks, and a rank left waiting on a peer gives up after ``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch.distributed as dist

from runtime.cli import OneLineParser, error_line, fail
from runtime.data import FORMS_HELP
from runtime.schedule import SCHEDULE_NAMES
from runtime.stage import DEVICES, RuntimeConfigError
from runtime.train import (
    DEFAULT_STEPS,
    LOSSES,
    LR_SCHEDULES,
    OPTIMIZERS,
    TrainConfig,
    run,
)

PROG = "runtime"
# what gloo and NCCL say when the process at the other end has gone
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out")


def _flag(parser: argparse.ArgumentParser, name: str, help: str) -> None:
    """A switch whose absence leaves the config file's value (or the default) in place."""
    parser.add_argument(name, action="store_true", default=None, help=help)


def build_parser() -> argparse.ArgumentParser:
    """The flags; every default comes from :class:`TrainConfig` or the JSON config."""
    parser = OneLineParser(
        prog=PROG,
        description="Train a generated pipeline, one process per stage (or stage replica).",
    )
    parser.add_argument("--config", help="JSON file of defaults; flags override them")
    parser.add_argument("--model", help="generated file, e.g. generated_models/X.py")
    parser.add_argument(
        "--schedule",
        choices=sorted(SCHEDULE_NAMES),
        help="gpipe and 1f1b flush every step; pipedream, stale, 2bw and pipeoptim run "
        "asynchronously (default 1f1b)",
    )
    _flag(parser, "--vertical_sync", "pipedream: every stage uses the version stage 0 chose")
    parser.add_argument(
        "--microbatches",
        type=int,
        help="microbatches per batch and pipeline copy (default 4); replicas of a stage take "
        "turns with them",
    )
    parser.add_argument(
        "--dp",
        type=int,
        help="run N copies of the pipeline, each on 1/N of every batch, gradients summed per "
        "stage (world size: the plan's ranks x N; default 1)",
    )
    parser.add_argument("--batch_size", type=int)
    parser.add_argument("--steps", type=int, help=f"steps to train (default {DEFAULT_STEPS})")
    parser.add_argument("--epochs", type=int, help="passes over the data set, instead of --steps")
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS))
    parser.add_argument("--lr", type=float)
    parser.add_argument("--momentum", type=float)
    parser.add_argument("--weight_decay", type=float)
    parser.add_argument(
        "--lr_schedule", choices=LR_SCHEDULES, help="decay of the learning rate (default constant)"
    )
    parser.add_argument("--warmup_steps", type=int, help="linear warm-up steps (default 0)")
    parser.add_argument("--loss", choices=sorted(LOSSES))
    parser.add_argument("--seed", type=int)
    parser.add_argument("--data", help=f"{FORMS_HELP} (default synthetic)")
    _flag(parser, "--no_shuffle", "read the data set in order, every epoch")
    parser.add_argument("--vocab_size", type=int, help="synthetic token ids are below this")
    parser.add_argument("--num_classes", type=int, help="synthetic class labels are below this")
    _flag(parser, "--no_dropout", "switch dropout off, for exact comparisons")
    _flag(parser, "--recompute", "keep only stage inputs; run the forward again in backward")
    parser.add_argument("--init_checkpoint", help="the original model's state dict to start from")
    _flag(parser, "--random_init", "start from the stages' own initialisation")
    parser.add_argument("--save_checkpoint", help="write the trained weights, original keys")
    parser.add_argument("--checkpoint_dir", help="save every stage's training state here")
    parser.add_argument(
        "--checkpoint_every",
        type=int,
        help="steps between checkpoints (default: only at the end); an asynchronous schedule "
        "drains its pipeline and restarts its weight versions at each, which costs a bubble and "
        "changes the updates there",
    )
    _flag(
        parser,
        "--resume",
        "go on from the latest checkpoint in --checkpoint_dir (an asynchronous schedule with "
        "its pipeline empty there, as a new segment)",
    )
    parser.add_argument(
        "--snapshot_dir",
        help="each rank writes its stage's weights to DIR/epoch_E/stage_R.pt at the end of "
        "every epoch (needs --data)",
    )
    parser.add_argument("--log_json", help="append one JSON line per step to this file")
    parser.add_argument(
        "--trace",
        help="write every action's measured times, and how long each waited for messages "
        "(waited_ms), as a Chrome/Perfetto trace (JSON)",
    )
    _flag(parser, "--no_progress", "one line per step instead of a progress bar")
    parser.add_argument(
        "--device",
        choices=DEVICES,
        help="auto (default: cuda:<local rank> if CUDA is there), cpu, cuda",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        help="seconds a rank waits for a peer before giving up (default 300)",
    )
    return parser


def _read_config(path: str) -> dict[str, Any]:
    try:
        loaded = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise RuntimeConfigError(f"cannot read config {path!r}: {error}") from None
    known = {field.name for field in fields(TrainConfig)}
    unknown = sorted(set(loaded) - known)
    if unknown:
        raise RuntimeConfigError(f"config {path!r} has unknown key {unknown[0]!r}")
    return loaded


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Flags over JSON config over :class:`TrainConfig` defaults."""
    args = vars(build_parser().parse_args(argv))
    values = _read_config(args.pop("config")) if args.get("config") else {}
    values.update({key: value for key, value in args.items() if value is not None})
    if "model" not in values:
        raise RuntimeConfigError("--model is required (a generated file)")
    return TrainConfig(**values)


def _rank() -> str:
    return os.environ.get("RANK", "0")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        run(parse_config(argv))
    except RuntimeConfigError as error:
        fail(PROG, str(error))
    except Exception as error:  # noqa: BLE001 - any crash: name this rank, then exit non-zero
        _report_crash(error)
        sys.exit(1)


def _lost_contact(error: Exception) -> bool:
    """Whether ``error`` says a peer went away or stopped answering, rather than a fault here."""
    text = str(error)
    return isinstance(error, dist.DistError) or any(sign in text for sign in _PEER_GONE)


def _report_crash(error: Exception) -> None:
    """A peer's loss in one line (the rank that failed reports its own error); anything else
    with its traceback."""
    if _lost_contact(error):
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        error_line(
            PROG,
            f"rank {_rank()} lost contact with the pipeline ({first_line}); "
            "see the first rank that failed",
        )
        return
    traceback.print_exc()
    error_line(PROG, f"rank {_rank()} failed: {type(error).__name__}: {error}")


if __name__ == "__main__":
    main()
