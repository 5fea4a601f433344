"""Command line: train a generated pipeline with torchrun, one process per stage.

    torchrun --nproc_per_node 4 -m runtime --model generated_models/X.py --schedule 1f1b \\
        --microbatches 8 --batch_size 32 --steps 100 --optimizer adamw --lr 1e-4

``--config FILE.json`` gives defaults that the flags override. User errors print one line,
``runtime: error: ...``, and exit with status 2 on every rank.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from runtime.stage import DEVICES, RuntimeConfigError
from runtime.train import LOSSES, TrainConfig, run

PROG = "runtime"


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, like the runtime's own."""

    def error(self, message: str) -> None:  # type: ignore[override]
        _fail(message)


def _fail(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    """The flags; every default comes from :class:`TrainConfig` or the JSON config."""
    parser = _Parser(prog=PROG, description="Train a generated pipeline, one process per stage.")
    parser.add_argument("--config", help="JSON file of defaults; flags override them")
    parser.add_argument("--model", help="generated file, e.g. generated_models/X.py")
    parser.add_argument("--schedule", choices=["gpipe", "1f1b"])
    parser.add_argument("--microbatches", type=int)
    parser.add_argument("--batch_size", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--optimizer", choices=["sgd", "adam", "adamw"])
    parser.add_argument("--lr", type=float)
    parser.add_argument("--momentum", type=float)
    parser.add_argument("--weight_decay", type=float)
    parser.add_argument("--loss", choices=sorted(LOSSES))
    parser.add_argument("--seed", type=int)
    parser.add_argument(
        "--data",
        help="synthetic (default) or tensors:PATH, a torch.save'd "
        "{'inputs': ..., 'labels': ...} used at every step",
    )
    parser.add_argument("--vocab_size", type=int, help="synthetic token ids are below this")
    parser.add_argument("--num_classes", type=int, help="synthetic class labels are below this")
    parser.add_argument(
        "--no_dropout",
        action="store_true",
        default=None,
        help="switch dropout off, for exact comparisons",
    )
    parser.add_argument("--init_checkpoint", help="the original model's state dict")
    parser.add_argument("--save_checkpoint", help="write the trained weights, original keys")
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


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        run(parse_config(argv))
    except RuntimeConfigError as error:
        _fail(str(error))


if __name__ == "__main__":
    main()
