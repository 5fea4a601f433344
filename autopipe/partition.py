"""Command line: partition a zoo model or your own into pipeline stages and generate its file.

    python -m autopipe.partition vision --model wrn_28x10_c100_dr03_gn -p 4 -b 256 --crop 32
    python -m autopipe.partition nlp --model gpt2 -p 4 -b 8 --seq_len 512
    python -m autopipe.partition custom --task my_model.py:build -p 2 --sanity_check
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from typing import Sequence

from autopipe.compiler import CompileResult, compile
from autopipe.errors import UserError
from autopipe.partitioning import METHODS
from autopipe.tasks import DEFAULT_MODEL, FAMILIES, Task, custom_task, zoo_task
from autopipe.verify import VerificationError

_MB = 1e6


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m autopipe.partition",
        description="Trace, partition and generate a model as pipeline stages.",
    )
    families = parser.add_subparsers(dest="family", required=True, metavar="{vision,nlp,custom}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-p", "--n_partitions", type=int, default=4, help="number of pipeline stages (default 4)")
    common.add_argument("-b", "--batch_size", type=int, default=32, help="batch size to trace at (default 32)")
    common.add_argument("--partitioning_method", default="params", choices=sorted(METHODS),
                        help="how to split the graph (default params)")
    common.add_argument("--depth", type=int, default=None,
                        help="keep every module nested deeper than N as one layer")
    common.add_argument("--basic_blocks", nargs="+", default=[], metavar="CLS",
                        help="module classes to keep as one layer each")
    common.add_argument("-o", "--output", default=None,
                        help="file to write (default generated_models/<model>_<size>_p<p>_<method>.py)")
    common.add_argument("--sanity_check", action="store_true",
                        help="check outputs and gradients of the stages against the original model")
    common.add_argument("--seed", type=int, default=0, help="seed for weights and example inputs")
    common.add_argument("-v", "--verbose", action="store_true", help="log what each step does")

    vision = families.add_parser("vision", parents=[common], help="a vision model from the zoo")
    vision.add_argument("--model", default=DEFAULT_MODEL, help=f"one of: {', '.join(FAMILIES['vision'])}")
    vision.add_argument("--crop", type=int, default=None, help="image size (default: the model's own)")

    nlp = families.add_parser("nlp", parents=[common], help="a language model from the zoo")
    nlp.add_argument("--model", required=True, help=f"one of: {', '.join(FAMILIES['nlp'])}")
    nlp.add_argument("--seq_len", type=int, default=None, help="sequence length (default: the model's own)")

    custom = families.add_parser("custom", parents=[common], help="your own model")
    custom.add_argument("--task", required=True, metavar="FILE.py:NAME",
                        help="NAME() returns (model, example_inputs): a tuple or dict of tensors")
    return parser


def load_task(args: argparse.Namespace) -> Task:
    if args.family == "custom":
        return custom_task(args.task, seed=args.seed)
    size = args.crop if args.family == "vision" else args.seq_len
    return zoo_task(args.family, args.model, args.batch_size, size, seed=args.seed)


def summary(result: CompileResult) -> str:
    """A table of what each stage holds and sends."""
    rows = [f"{'stage':>5} {'nodes':>6} {'params (M)':>11} {'in (MB)':>9} {'out (MB)':>9}"]
    counts = [0] * len(result.stages)
    for node, stage in result.assignment.items():
        if result.graph.nodes[node]["op"] not in ("placeholder", "get_attr"):
            counts[stage] += 1
    for index, (stage, spec) in enumerate(zip(result.stages, result.pipeline["stages"])):
        params = sum(p.numel() for p in stage.parameters())
        rows.append(
            f"{index:>5} {counts[index]:>6} {params / 1e6:>11.3f} "
            f"{spec['costs']['recv_bytes'] / _MB:>9.2f} {spec['costs']['send_bytes'] / _MB:>9.2f}"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    command = "python -m autopipe.partition " + shlex.join(argv)
    try:
        task = load_task(args)
        result = compile(
            task.model, task.example_inputs, args.n_partitions, method=args.partitioning_method,
            output=args.output, name=task.name, depth=args.depth, basic_blocks=args.basic_blocks,
            seed=args.seed, command=command,
        )
        print(summary(result))
        print(f"wrote {result.path}")
        if args.sanity_check:
            print(f"sanity check passed: {result.verify(seed=args.seed)}")
    except UserError as error:
        print(f"autopipe: error: {error}", file=sys.stderr)
        return 2
    except VerificationError as error:
        print(f"autopipe: sanity check failed: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
