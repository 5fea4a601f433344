"""benchmarks/hybrid_throughput.py: its layouts, commands and parsing, without launching a run."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import hybrid_throughput as hybrid

ANALYSIS = """\
stage    fwd ms    bwd ms  params MB    in MB   out MB  comm ms  memory GB
    0      5.26      7.34       0.03     0.00     0.13     0.02      0.002
gpipe with 4 microbatches: 16.16 ms per batch, 1980.8 samples/s, 1.58x one device
1f1b with 4 microbatches: 17.00 ms per batch, 1882.4 samples/s, 1.50x one device
"""


def parse(*flags: str):
    args = hybrid.build_parser().parse_args(list(flags))
    args.model = args.model or hybrid.DEFAULT_MODELS[args.family]
    return args


def test_layouts_cover_pipeline_grid_and_data_parallelism():
    assert [(l.stages, l.replicas) for l in hybrid.layouts(4)] == [(4, 1), (2, 2), (1, 4)]
    assert [(l.stages, l.replicas) for l in hybrid.layouts(8)] == [(8, 1), (4, 2), (1, 8)]


def test_no_grid_where_it_would_repeat_a_layout_or_cannot_split():
    assert [(l.stages, l.replicas) for l in hybrid.layouts(2)] == [(2, 1), (1, 2)]
    assert [(l.stages, l.replicas) for l in hybrid.layouts(3)] == [(3, 1), (1, 3)]


def test_stage_to_num_ranks_gives_every_stage_the_replicas():
    assert hybrid.Layout("grid", 2, 2).stage_to_num_ranks() == "0:2,1:2"
    assert hybrid.Layout("data parallel", 1, 4).stage_to_num_ranks() == "0:4"


def test_prediction_is_read_for_the_chosen_schedule():
    assert hybrid.predicted_samples_per_s(ANALYSIS, "1f1b") == pytest.approx(1882.4)
    assert hybrid.predicted_samples_per_s(ANALYSIS, "gpipe") == pytest.approx(1980.8)
    assert hybrid.predicted_samples_per_s("wrote x.py\n", "1f1b") is None


def test_replicated_plans_are_asked_of_the_partitioner():
    args = parse("--crop", "32")
    grid = hybrid.Layout("grid", 2, 2)
    command = hybrid.partition_command(args, grid, Path("x.py"))
    assert command[command.index("--stage_to_num_ranks") + 1] == "0:2,1:2"
    assert command[command.index("-p") + 1] == "2"
    assert command[command.index("--crop") + 1] == "32"
    assert "--seq_len" not in command
    pipeline = hybrid.Layout("pipeline", 4, 1)
    assert "--stage_to_num_ranks" not in hybrid.partition_command(args, pipeline, Path("x.py"))


def test_every_layout_runs_microbatches_per_pipeline_copy():
    args = parse("--microbatches", "3")
    grid = hybrid.Layout("grid", 2, 2)

    def value(command, flag):
        return command[command.index(flag) + 1] if flag in command else None

    replicated = hybrid.runtime_command(args, grid, Path("x.py"))
    assert (value(replicated, "--microbatches"), value(replicated, "--dp")) == ("6", None)
    assert value(replicated, "--nproc_per_node") == "4"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model", "resnet_huge"], "has no model"),
        (["nlp", "--crop", "32"], "--crop is for vision"),
        (["--seq_len", "64"], "--seq_len is for nlp"),
        (["--processes", "1"], "--processes must be at least 2"),
        (["--warmup", "5", "--steps", "5"], "leaves none"),
        (["-b", "60"], "pass a multiple of 16"),
    ],
)
def test_flags_that_cannot_make_every_run_are_rejected(flags, message):
    with pytest.raises(hybrid.UsageError, match=message):
        hybrid.check_args(parse(*flags, "--device", "cpu"))
