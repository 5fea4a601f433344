"""Command line: partition a zoo model or your own into pipeline stages and generate its file.

python -m autopipe.partition vision --model wrn_28x10_c100_dr03_gn -p 4 -b 256 --crop 32
python -m autopipe.partition nlp --model gpt2 -p 4 -b 8 --seq_len 512
python -m autopipe.partition custom --task my_model.py:build -p 2 --sanity_check
python -m autopipe.partition vision --model resnet_tiny --partitioning_method pipedream \
    --stage_to_num_ranks 0:3,1:1
python -m autopipe.partition vision --model resnet_tiny -b 8 --crop 32 -p 2 --schedule wpipe
"""

from __future__ import annotations

import argparse
import logging
import math
import shlex
import sys
from typing import Sequence

from autopipe.compiler import ProfileSettings, compile
from autopipe.cost import OPTIMIZER_SLOTS, SCHEDULES, CostModel
from autopipe.dot import write_pictures
from autopipe.errors import UserError
from autopipe.partitioning import DEFAULT_METHOD, METHODS, Level, PartitionOptions
from autopipe.profile import DEVICES
from autopipe.tasks import DEFAULT_MODEL, FAMILIES, Task, custom_task, zoo_task
from autopipe.verify import VerificationError

DEFAULT_STAGES = 4


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m autopipe.partition",
        description="Trace, partition and generate a model as pipeline stages.",
    )
    families = parser.add_subparsers(dest="family", required=True, metavar="{vision,nlp,custom}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-p",
        "--n_partitions",
        type=int,
        default=None,
        help=f"number of pipeline stages (default {DEFAULT_STAGES}, or as many as "
        "--stage_to_num_ranks lists, which -p must then equal); with --schedule wpipe, the "
        "number of devices, each running 2 stages",
    )
    common.add_argument(
        "-b", "--batch_size", type=int, default=32, help="batch size to trace at (default 32)"
    )
    common.add_argument(
        "--partitioning_method",
        default=DEFAULT_METHOD,
        choices=sorted(METHODS),
        help=f"how to split the graph (default {DEFAULT_METHOD})",
    )
    common.add_argument(
        "--depth",
        type=int,
        default=None,
        help="keep every module nested deeper than N as one layer",
    )
    common.add_argument(
        "--basic_blocks",
        nargs="+",
        default=[],
        metavar="CLS",
        help="module classes to keep as one layer each",
    )
    common.add_argument(
        "-o",
        "--output",
        default=None,
        help="file to write (default generated_models/<model>_<size>_p<p>_<method>.py)",
    )
    common.add_argument(
        "--sanity_check",
        action="store_true",
        help="check outputs and gradients of the stages against the original model",
    )
    common.add_argument("--seed", type=int, default=0, help="seed for weights and example inputs")
    common.add_argument("-v", "--verbose", action="store_true", help="log what each step does")
    _add_cost_flags(common)

    vision = families.add_parser("vision", parents=[common], help="a vision model from the zoo")
    vision.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"one of: {', '.join(FAMILIES['vision'])}"
    )
    vision.add_argument(
        "--crop", type=int, default=None, help="image size (default: the model's own)"
    )

    nlp = families.add_parser("nlp", parents=[common], help="a language model from the zoo")
    nlp.add_argument("--model", required=True, help=f"one of: {', '.join(FAMILIES['nlp'])}")
    nlp.add_argument(
        "--seq_len", type=int, default=None, help="sequence length (default: the model's own)"
    )

    custom = families.add_parser("custom", parents=[common], help="your own model")
    custom.add_argument(
        "--task",
        required=True,
        metavar="FILE.py:NAME",
        help="NAME() returns (model, example_inputs): a tuple or dict of tensors",
    )
    return parser


def _add_cost_flags(parser: argparse.ArgumentParser) -> None:
    profiling = parser.add_argument_group("profiling")
    profiling.add_argument(
        "--profile",
        choices=("flops", "measured"),
        default="flops",
        help="node costs from FLOPs and bytes on --device_spec (default), or measured on --device",
    )
    profiling.add_argument(
        "--device", default="cpu", help="device to measure on: cpu, cuda, cuda:N (default cpu)"
    )
    profiling.add_argument(
        "--device_spec",
        default="v100",
        choices=sorted(DEVICES),
        help="device description for --profile flops (default v100)",
    )
    profiling.add_argument(
        "--no_recomputation",
        action="store_true",
        help="backward does not re-run the forward (default: it does)",
    )
    profiling.add_argument(
        "--profiles_cache_name", default=None, help="file name of the measured-profile cache"
    )
    profiling.add_argument(
        "--overwrite_profiles_cache", action="store_true", help="measure again even if cached"
    )
    profiling.add_argument(
        "--save_memory_mode",
        action="store_true",
        help="keep the model on the host, move one node at a time to the device",
    )
    costs = parser.add_argument_group("cost model")
    costs.add_argument(
        "--bw",
        type=float,
        nargs="+",
        default=[12.0],
        metavar="GBPS",
        help="link bandwidth in GB/s; one per level with -n (default 12)",
    )
    costs.add_argument(
        "-n",
        "--num_devices",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="hierarchical machine, innermost first: -n 8 2 --bw 300 25 is 2 servers of 8 GPUs",
    )
    costs.add_argument(
        "--memory_limit", type=float, default=None, metavar="GB", help="memory per device in GB"
    )
    costs.add_argument(
        "--microbatches", type=int, default=4, help="microbatches per batch (default 4)"
    )
    costs.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default="1f1b",
        help="schedule whose memory counts (default 1f1b); wpipe cuts 2 stages per device, "
        "device d running stages d and p + d, and writes each stage's device into the file",
    )
    costs.add_argument(
        "--optimizer",
        choices=sorted(OPTIMIZER_SLOTS),
        default="sgd",
        help="optimizer whose state counts in memory (default sgd)",
    )
    methods = parser.add_argument_group("methods")
    methods.add_argument(
        "--replication",
        action="store_true",
        help="pipedream: allow data-parallel replicas of a stage (-p is then the device count)",
    )
    methods.add_argument(
        "--stage_to_num_ranks",
        default=None,
        metavar="S:R,...",
        help="data-parallel ranks of every stage: 0:3,1:1 is 2 stages, stage 0 on 3 ranks and "
        "stage 1 on 1; every stage from 0 up listed once. pipedream chooses the cut for these "
        "replicas, the other methods cut that many stages and attach them",
    )
    methods.add_argument(
        "--server_file", default=None, help="pipedream: heterogeneous devices, SparsePipe format"
    )
    methods.add_argument(
        "--metis_attempts", type=int, default=10, help="metis: seeds to try (default 10)"
    )
    methods.add_argument(
        "--metis_seed", type=int, default=None, help="metis: first seed (default --seed)"
    )
    output = parser.add_argument_group("analysis")
    output.add_argument("--no_analysis", action="store_true", help="skip the analysis")
    output.add_argument(
        "--analysis_only", action="store_true", help="print the analysis, write no file"
    )
    output.add_argument(
        "--dot",
        default=None,
        metavar="PATH",
        help="write a picture of the partitioned graph: PATH.dot (Graphviz) and PATH.svg",
    )


def stage_ranks(spec: str) -> tuple[int, ...]:
    """Replicas per stage from ``--stage_to_num_ranks``: "0:3,1:1" gives (3, 1)."""
    ranks: dict[int, int] = {}
    for item in spec.split(","):
        fields = item.split(":")
        if len(fields) != 2 or not all(field.strip().isdigit() for field in fields):
            raise UserError(
                f"--stage_to_num_ranks takes STAGE:RANKS pairs joined by commas, such as 0:3,1:1; "
                f"got {spec!r}"
            )
        stage, count = int(fields[0]), int(fields[1])
        if stage in ranks:
            raise UserError(f"--stage_to_num_ranks lists stage {stage} twice")
        if count < 1:
            raise UserError(
                f"--stage_to_num_ranks: stage {stage} has {count} ranks; every stage needs at least 1"
            )
        ranks[stage] = count
    missing = sorted(set(range(max(ranks) + 1)) - set(ranks))
    if missing:
        raise UserError(
            f"--stage_to_num_ranks must list every stage from 0 to {max(ranks)}; "
            f"stage {missing[0]} is missing"
        )
    return tuple(ranks[s] for s in range(len(ranks)))


def partition_options(args: argparse.Namespace) -> tuple[int, PartitionOptions]:
    """The number of stages asked for, and the partitioner's options, from the flags."""
    replicas = stage_ranks(args.stage_to_num_ranks) if args.stage_to_num_ranks else None
    levels: tuple[Level, ...] = ()
    if args.num_devices:
        if len(args.bw) != len(args.num_devices):
            raise UserError(
                f"-n names {len(args.num_devices)} levels, --bw gives {len(args.bw)} bandwidths"
            )
        levels = tuple(Level(count, bw) for count, bw in zip(args.num_devices, args.bw))
    elif len(args.bw) != 1:
        raise UserError("several --bw values need -n, one device count per level")
    devices = ()
    if args.server_file:
        from autopipe.partitioning.pipedream import load_server_file

        devices = load_server_file(args.server_file)
    cost = CostModel(
        bandwidth=args.bw[0],
        memory_limit=args.memory_limit * 1e9 if args.memory_limit is not None else None,
        schedule=args.schedule,
        microbatches=args.microbatches,
        optimizer_slots=OPTIMIZER_SLOTS[args.optimizer],
        recomputation=not args.no_recomputation,
    )
    seed = (
        args.metis_seed
        if args.metis_seed is not None and args.partitioning_method == "metis"
        else args.seed
    )
    options = PartitionOptions(
        seed=seed,
        cost=cost,
        replication=args.replication,
        replicas=replicas,
        levels=levels,
        devices=devices,
        metis_attempts=args.metis_attempts,
    )
    return stage_count(args, options), options


def stage_count(args: argparse.Namespace, options: PartitionOptions) -> int:
    """The number of stages: -p (under wpipe 2 per device), or as many as the fixed replicas
    list or the machine of -n has devices, checked against each other."""
    replicas = options.replicas
    n_stages = DEFAULT_STAGES if args.n_partitions is None else args.n_partitions
    if replicas is not None:
        if args.replication:
            raise UserError(
                "--stage_to_num_ranks fixes the replicas that --replication would choose: "
                "pass one of them"
            )
        if args.n_partitions is not None and args.n_partitions != len(replicas):
            listed = f"{len(replicas)} stage" + ("s" if len(replicas) > 1 else "")
            raise UserError(
                f"-p is {args.n_partitions} but --stage_to_num_ranks lists {listed}: "
                "-p counts stages, so leave it out or make it agree"
            )
        n_stages = len(replicas)
    if options.levels:
        machine_size = math.prod(level.count for level in options.levels)
        if replicas is None:
            n_stages = machine_size
        elif sum(replicas) != machine_size:
            raise UserError(
                f"-n {' '.join(map(str, args.num_devices))} is {machine_size} devices but "
                f"--stage_to_num_ranks uses {sum(replicas)} ranks"
            )
    return n_stages * options.cost.stages_per_device


def profile_settings(args: argparse.Namespace) -> ProfileSettings:
    return ProfileSettings(
        mode=args.profile,
        device=args.device,
        device_spec=args.device_spec,
        recomputation=not args.no_recomputation,
        save_memory_mode=args.save_memory_mode,
        cache_name=args.profiles_cache_name,
        overwrite_cache=args.overwrite_profiles_cache,
        progress=True,
    )


def task_source(args: argparse.Namespace) -> dict[str, str]:
    """How the runtime can build the original model again: zoo entry or the user's factory."""
    if args.family == "custom":
        return {"task": args.task}
    return {"family": args.family, "model": args.model}


def load_task(args: argparse.Namespace) -> Task:
    if args.family == "custom":
        return custom_task(args.task, seed=args.seed)
    size = args.crop if args.family == "vision" else args.seq_len
    return zoo_task(args.family, args.model, args.batch_size, size, seed=args.seed)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    command = "python -m autopipe.partition " + shlex.join(argv)
    try:
        n_stages, options = partition_options(args)
        task = load_task(args)
        result = compile(
            task.model,
            task.example_inputs,
            n_stages,
            method=args.partitioning_method,
            output=args.output,
            name=task.name,
            depth=args.depth,
            basic_blocks=args.basic_blocks,
            seed=args.seed,
            options=options,
            profiling=profile_settings(args),
            analysis=not args.no_analysis,
            write=not args.analysis_only,
            command=command,
            source=task_source(args),
        )
        if result.analysis is not None:
            print(result.analysis.table())
        if result.path is not None:
            print(f"wrote {result.path}")
        if args.dot:
            written = write_pictures(result.graph, result.assignment, args.dot)
            print(f"wrote {' and '.join(str(p) for p in written)}")
        if args.sanity_check and result.path is not None:
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
