"""Partitioning for WPipe: 2P stages, stage s on device s mod P, memory counted per device."""

from pathlib import Path

import pytest

import autopipe
from autopipe import partition as cli
from autopipe.compiler import import_generated
from autopipe.cost import CostModel, stage_memory
from autopipe.errors import UserError
from autopipe.partitioning import DeviceGroup, Level, PartitionOptions
from autopipe.partitioning.acyclic import over_limit
from autopipe.partitioning.pipedream import _MemoryModel
from autopipe.tasks import Task, custom_task, zoo_task

WPIPE = CostModel(schedule="wpipe")

CHAIN_TASK = """
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)]), (torch.randn(8, 64),)
"""
"""Four linear layers, the only units there are: with 4 stages each stage is one layer."""


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _chain_task(tmp_path: Path) -> tuple[str, Task]:
    """``CHAIN_TASK`` as a file: its --task argument and the task built from it."""
    path = tmp_path / "chain_task.py"
    path.write_text(CHAIN_TASK)
    spec = f"{path}:build"
    return spec, custom_task(spec)


@pytest.mark.parametrize(
    "argv",
    [
        ["vision", "--model", "resnet_tiny", "-b", "8", "--crop", "32"],
        ["nlp", "--model", "gpt2_tiny", "-b", "2"],
    ],
    ids=["resnet_tiny", "gpt2_tiny"],
)
def test_wpipe_cuts_two_stages_per_device_and_names_their_devices(
    argv: list[str], tmp_path: Path, capsys
) -> None:
    output = tmp_path / "wpipe.py"
    code, out, err = _run(
        [*argv, "-p", "2", "--schedule", "wpipe", "--sanity_check", "-o", str(output)], capsys
    )
    assert code == 0, err
    assert "sanity check passed" in out
    pipeline = import_generated(output).PIPELINE
    assert pipeline["n_stages"] == 4 and pipeline["devices"] == 2
    assert [stage["device"] for stage in pipeline["stages"]] == [0, 1, 0, 1]
    assert "device 0 runs stages 0 and 2: " in out and "device 1 runs stages 1 and 3: " in out
    assert "wpipe with 4 microbatches: " in out and "x one device" in out
    assert "gpipe with" not in out and "1f1b with" not in out
    docstring = output.read_text().split('"""')[1]
    assert (
        "device 1 runs stages 1 and 3: " in docstring and "wpipe with 4 microbatches" in docstring
    )
    assert "wpipe with 2 stages per device" in docstring


@pytest.mark.parametrize("method", ["pipedream", "metis", "params"])
def test_every_method_cuts_two_stages_per_device(method: str, tmp_path: Path, capsys) -> None:
    output = tmp_path / f"{method}.py"
    code, _, err = _run(
        ["vision", "--model", "resnet_tiny", "-b", "8", "--crop", "32", "-p", "2"]
        + ["--schedule", "wpipe", "--partitioning_method", method, "-o", str(output)],
        capsys,
    )
    assert code == 0, err
    pipeline = import_generated(output).PIPELINE
    assert [stage["device"] for stage in pipeline["stages"]] == [0, 1, 0, 1]


def test_wpipe_file_name_counts_devices_and_other_files_have_no_devices(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    flags = ["vision", "--model", "resnet_tiny", "-b", "8", "--crop", "32", "-p", "2"]
    code, out, err = _run([*flags, "--schedule", "wpipe", "--no_analysis"], capsys)
    assert code == 0, err
    assert "wrote generated_models/resnet_tiny_c32_p2_wpipe_acyclic.py" in out
    code, out, err = _run([*flags, "--no_analysis"], capsys)
    assert code == 0, err
    plain = import_generated(tmp_path / "generated_models" / "resnet_tiny_c32_p2_acyclic.py")
    assert "devices" not in plain.PIPELINE
    assert all("device" not in stage for stage in plain.PIPELINE["stages"])


def test_the_memory_limit_applies_to_both_stages_of_a_device(tmp_path: Path, capsys) -> None:
    spec, task = _chain_task(tmp_path)
    per_stage = autopipe.compile(
        task.model, task.example_inputs, 4, write=False, options=PartitionOptions(cost=WPIPE)
    )
    stage_bytes = [cost.memory_bytes for cost in per_stage.partition.costs]
    device_bytes = [load.memory_bytes for load in per_stage.analysis.devices]
    limit = (max(stage_bytes) + min(device_bytes)) / 2
    assert max(stage_bytes) < limit < min(device_bytes)
    flags = ["custom", "--task", spec, "--analysis_only", "--memory_limit", str(limit / 1e9)]
    code, _, err = _run([*flags, "-p", "4"], capsys)
    assert code == 0, err
    code, _, err = _run([*flags, "-p", "2", "--schedule", "wpipe"], capsys)
    assert code == 2
    assert "device 0 (stages 0 and 2) needs" in err and "the limit is" in err
    assert len(err.strip().splitlines()) == 1


def test_under_a_device_limit_refinement_moves_work_off_the_fullest_device() -> None:
    task = zoo_task("vision", "resnet_tiny", 8)
    free = autopipe.compile(
        task.model, task.example_inputs, 4, write=False, options=PartitionOptions(cost=WPIPE)
    )
    limit = 0.9 * max(load.memory_bytes for load in free.analysis.devices)
    limited = autopipe.compile(
        task.model,
        task.example_inputs,
        4,
        write=False,
        options=PartitionOptions(cost=CostModel(schedule="wpipe", memory_limit=limit)),
    )
    assert all(load.memory_bytes <= limit for load in limited.analysis.devices)
    assert limited.partition.devices == (0, 1, 0, 1)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--replication"], "--schedule wpipe cannot be combined with --replication"),
        (
            ["--stage_to_num_ranks", "0:1,1:1"],
            "--schedule wpipe cannot be combined with --stage_to_num_ranks",
        ),
        (["-n", "2", "--bw", "10"], "--schedule wpipe cannot be combined with -n"),
        (["-p", "50"], "100 stages (2 on each of 50 devices with --schedule wpipe)"),
    ],
)
def test_wpipe_mistakes_are_one_line(argv: list[str], message: str, capsys) -> None:
    code, _, err = _run(
        ["vision", "--model", "vgg_tiny", "-p", "2", "-b", "2", "--analysis_only"]
        + ["--schedule", "wpipe", *argv],
        capsys,
    )
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1


def test_python_api_takes_the_schedule_in_the_cost_model(tmp_path: Path) -> None:
    task = zoo_task("nlp", "gpt2_tiny", 2)
    result = autopipe.compile(
        task.model,
        task.example_inputs,
        4,
        output=tmp_path / "gpt2_wpipe.py",
        options=PartitionOptions(cost=WPIPE),
    )
    assert result.pipeline["devices"] == 2
    assert [stage["device"] for stage in result.pipeline["stages"]] == [0, 1, 0, 1]
    assert result.partition.devices == (0, 1, 0, 1)
    assert len(result.stages) == 4
    result.verify()


def test_python_api_rejects_what_wpipe_cannot_place(tmp_path: Path) -> None:
    _, task = _chain_task(tmp_path)
    with pytest.raises(UserError, match="needs an even number of stages, got 3"):
        autopipe.compile(
            task.model, task.example_inputs, 3, write=False, options=PartitionOptions(cost=WPIPE)
        )
    group = DeviceGroup("server", "v100", 2, {})
    for placed in (
        dict(replication=True),
        dict(replicas=(1, 1)),
        dict(levels=(Level(2, 10.0),)),
        dict(devices=(group,)),
    ):
        with pytest.raises(UserError, match="--schedule wpipe cannot be combined with"):
            PartitionOptions(cost=WPIPE, **placed)


def test_acyclic_counts_bytes_over_the_limit_per_device() -> None:
    stages = [5, 5, 5, 5]
    assert over_limit(stages, CostModel(schedule="wpipe", memory_limit=8)) == 2 + 2
    assert over_limit(stages, CostModel(memory_limit=8)) == 0


def test_pipedream_prices_a_wpipe_stage_by_its_group() -> None:
    parts = (8.0, 100.0, 1000.0, 800.0)
    for following in range(1, 5):
        base, *factors = _MemoryModel(WPIPE, following, 4).terms
        estimate = base + sum(f * b for f, b in zip(factors, parts))
        exact = stage_memory(*parts, 4 - following, 4, WPIPE)
        assert estimate == pytest.approx(exact, abs=1.0)
