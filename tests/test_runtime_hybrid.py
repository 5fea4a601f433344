"""Hybrid parallelism: replicated stages and grids of pipelines (``--dp``).

The layout and its schedules are checked in-process; the transparency tests train with torchrun
on 4 CPU processes (gloo) and compare with the original model trained in one process on the
same global batches.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import autopipe
from autopipe.partitioning import PartitionOptions
from autopipe.tasks import zoo_task
from conftest import REPO, launch
from runtime.layout import (
    Layout,
    Role,
    check_layout,
    gradient_reductions,
    layout_schedule,
    validate_layout,
)
from runtime.schedule import ScheduleError, chain_dependencies, one_f_one_b
from runtime.stage import RuntimeConfigError
from test_runtime import SkipMLP, _max_difference, _train_original
from test_runtime_training import _assert_same, _ok, _with_fault

STEPS = 3


def test_ranks_go_to_stages_replica_by_replica() -> None:
    layout = Layout((3, 1))
    assert layout.world_size == 4
    assert [layout.role(rank) for rank in range(4)] == [
        Role(0, 0), Role(0, 1), Role(0, 2), Role(1, 0),
    ]  # fmt: skip
    assert [layout.rank_of(0, k) for k in range(6)] == [0, 1, 2, 0, 1, 2]
    assert [layout.rank_of(1, k) for k in range(6)] == [3] * 6
    assert layout.rank_pairs(0, 1) == [(0, 3), (1, 3), (2, 3)]
    assert Layout((2, 2)).rank_pairs(0, 1) == [(0, 2), (1, 3)]  # two separate pipelines
    assert Layout((2, 4)).rank_pairs(0, 1) == [(0, 2), (0, 4), (1, 3), (1, 5)]
    assert layout.describe() == "stage 0: ranks 0, 1, 2 (replicas 0-2)\nstage 1: rank 3"
    with pytest.raises(RuntimeConfigError):
        layout.role(4)


def test_warmup_keeps_every_later_replica_busy() -> None:
    assert [Layout((1, 1, 1, 1)).warmup(s) for s in range(4)] == [3, 2, 1, 0]  # 1F1B's p - s - 1
    assert [Layout((2, 2)).warmup(s) for s in range(2)] == [1, 0]  # each copy is a 1F1B pipeline
    assert [Layout((3, 1)).warmup(s) for s in range(2)] == [1, 0]
    assert [Layout((1, 3)).warmup(s) for s in range(2)] == [3, 0]


def test_one_rank_per_stage_gives_the_plain_schedule() -> None:
    assert layout_schedule("1f1b", Layout((1, 1, 1)), 5).actions == one_f_one_b(3, 5).actions


@pytest.mark.parametrize("replicas", [(2, 2), (3, 1), (1, 3), (2, 1, 2), (4,), (2, 3)])
@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("microbatches", [4, 6, 7])
def test_replicated_schedules_are_complete_and_free_of_deadlock(
    replicas: tuple[int, ...], name: str, microbatches: int
) -> None:
    layout = Layout(replicas)
    schedule = layout_schedule(name, layout, microbatches)
    validate_layout(schedule, layout, chain_dependencies(layout.n_stages))
    for rank, actions in enumerate(schedule.actions):
        role = layout.role(rank)
        runs = sorted({a.microbatch for a in actions if a.microbatch is not None})
        assert runs == layout.microbatches_of(role, microbatches)
    reductions = gradient_reductions(schedule, layout)
    replicated_ranks = [r for r in range(layout.world_size) if replicas[layout.role(r).stage] > 1]
    assert sorted(rank for rank, _ in reductions) == replicated_ranks  # one per rank and step


def test_a_copy_of_a_grid_runs_1f1b_over_its_own_microbatches() -> None:
    schedule = layout_schedule("1f1b", Layout((2, 2)), 8)
    assert " ".join(map(str, schedule.actions[1])) == "F1 F3 B1 F5 B3 F7 B5 B7 S"
    assert " ".join(map(str, schedule.actions[3])) == "F1 B1 F3 B3 F5 B5 F7 B7 S"


def test_a_rank_missing_its_microbatches_is_caught() -> None:
    layout = Layout((2, 1))
    schedule = layout_schedule("gpipe", layout, 4)
    broken = schedule.__class__(
        schedule.name, 2, 4, (schedule.actions[0], schedule.actions[0], schedule.actions[2])
    )
    with pytest.raises(ScheduleError, match="rank 1"):
        validate_layout(broken, layout, chain_dependencies(2))


def test_world_size_and_microbatch_checks() -> None:
    with pytest.raises(RuntimeConfigError, match="run by 4 processes .* world size is 2"):
        check_layout(Layout((2, 2)), 2, 4, 2)
    with pytest.raises(RuntimeConfigError, match="stage 0 runs on 3 ranks .* only 2 microbatches"):
        check_layout(Layout((3, 1)), 4, 2, 1)
    check_layout(Layout((3, 1)), 4, 3, 1)


def _with_replicas(folder: Path, name: str, replicas: tuple[int, ...]) -> Path:
    """SkipMLP (the weights of ``skip_mlp``) in len(replicas) stages whose plan gives each stage
    its replicas, as ``--stage_to_num_ranks`` does."""
    torch.manual_seed(0)
    model, target = SkipMLP(), folder / name
    options = PartitionOptions(replicas=replicas, seed=0)
    autopipe.compile(model, (torch.randn(8, 8),), n_stages=len(replicas), output=target,
                     options=options)  # fmt: skip
    return target


@pytest.fixture(scope="module")
def skip_mlp(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """SkipMLP in 2 stages with its weights and a batch of 8 saved, and the weights the
    original reaches in STEPS steps on that batch."""
    folder = tmp_path_factory.mktemp("hybrid")
    torch.manual_seed(0)
    model = SkipMLP()
    inputs, labels = (torch.randn(8, 8),), torch.randint(0, 5, (8,))
    autopipe.compile(model, inputs, n_stages=2, output=folder / "skip.py")
    torch.save(model.state_dict(), folder / "init.pt")
    torch.save({"inputs": inputs, "labels": labels}, folder / "data.pt")
    return folder, _train_original(model, inputs, labels)


def _train(folder: Path, model: Path, n_procs: int, *flags: str) -> tuple[dict, str]:
    saved = folder / f"trained_{model.stem}_{'_'.join(flags)}.pt"
    result = _ok(launch(
        n_procs, "--model", str(model), "--steps", str(STEPS), "--optimizer", "sgd",
        "--lr", "0.1", "--momentum", "0.9", "--no_dropout", "--batch_size", "8",
        "--data", f"tensors:{folder / 'data.pt'}", "--init_checkpoint", str(folder / "init.pt"),
        "--save_checkpoint", str(saved), "--no_progress", *flags,
    ))  # fmt: skip
    return torch.load(saved), result.stdout


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_two_stages_times_two_copies_train_like_the_original(
    skip_mlp: tuple[Path, dict], schedule: str
) -> None:
    folder, expected = skip_mlp
    trained, stdout = _train(
        folder, folder / "skip.py", 4, "--dp", "2", "--microbatches", "2", "--schedule", schedule
    )
    difference = _max_difference(trained, expected)
    print(f"skip MLP, p=2 x dp=2, {schedule}: max parameter difference {difference:.3g}")
    assert "stage 0: ranks 0, 1 (replicas 0-1)\nstage 1: ranks 2, 3 (replicas 0-1)" in stdout
    assert [line.split()[1] for line in stdout.splitlines() if line.startswith("step ")] == [
        "0", "1", "2",
    ]  # fmt: skip


def test_a_three_plus_one_plan_trains_like_the_original(skip_mlp: tuple[Path, dict]) -> None:
    folder, expected = skip_mlp
    planned = _with_replicas(folder, "skip_3_1.py", (3, 1))
    trained, stdout = _train(folder, planned, 4, "--microbatches", "3")
    difference = _max_difference(trained, expected)
    print(f"skip MLP, 3+1 replicas, 1f1b: max parameter difference {difference:.3g}")
    assert "stage 0: ranks 0, 1, 2 (replicas 0-2)\nstage 1: rank 3" in stdout


@pytest.mark.parametrize("schedule", ["pipedream", "2bw"])
def test_an_asynchronous_grid_trains_like_one_pipeline_on_whole_microbatches(
    skip_mlp: tuple[Path, dict], schedule: str
) -> None:
    """Two copies each running half of every microbatch, their gradients averaged (pipedream)
    or summed with the batch shares (2bw), step as one pipeline running whole microbatches:
    the same weight versions, the same updates."""
    folder, _ = skip_mlp
    flags = ("--microbatches", "2", "--schedule", schedule)
    grid, grid_out = _train(folder, folder / "skip.py", 4, "--dp", "2", *flags)
    single, single_out = _train(folder, folder / "skip.py", 2, *flags)
    difference = _max_difference(grid, single)
    print(f"skip MLP, {schedule}, p=2 x dp=2 vs p=2: max parameter difference {difference:.3g}")
    losses = [[line.split()[3] for line in out.splitlines() if line.startswith("step ")]
              for out in (grid_out, single_out)]  # fmt: skip
    assert losses[0] == losses[1] and len(losses[0]) == STEPS


def test_pipedream_runs_an_uneven_plan(skip_mlp: tuple[Path, dict]) -> None:
    folder, _ = skip_mlp
    planned = _with_replicas(folder, "skip_3_1_async.py", (3, 1))
    trained, stdout = _train(folder, planned, 4, "--microbatches", "3", "--schedule", "pipedream")
    assert "trained 3 steps" in stdout
    assert all(torch.isfinite(value).all() for value in trained.values())


def test_tied_weights_across_replicated_stages(tmp_path: Path) -> None:
    task = zoo_task("nlp", "gpt2_tiny", 2)
    inputs = (task.example_inputs["input_ids"][:4],)
    labels = torch.randint(0, 1000, inputs[0].shape, generator=torch.Generator().manual_seed(1))
    autopipe.compile(task.model, inputs, n_stages=2, output=tmp_path / "gpt2.py")
    torch.save(task.model.state_dict(), tmp_path / "init.pt")
    torch.save({"inputs": inputs, "labels": labels}, tmp_path / "data.pt")
    for module in task.model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    expected = _train_original(task.model, inputs, labels)
    saved = tmp_path / "trained.pt"
    _ok(launch(
        4, "--model", str(tmp_path / "gpt2.py"), "--dp", "2", "--microbatches", "1",
        "--batch_size", "4", "--steps", str(STEPS), "--optimizer", "sgd", "--lr", "0.1",
        "--momentum", "0.9", "--no_dropout", "--data", f"tensors:{tmp_path / 'data.pt'}",
        "--init_checkpoint", str(tmp_path / "init.pt"), "--save_checkpoint", str(saved),
    ))  # fmt: skip
    difference = _max_difference(torch.load(saved), expected)
    print(f"gpt2_tiny, p=2 x dp=2, tied embedding: max parameter difference {difference:.3g}")


def test_a_crashed_grid_resumes_to_the_same_weights(noisy: Path, tmp_path: Path) -> None:
    def flags(model_file: Path) -> list[str]:
        return [
            "--model", str(model_file), "--init_checkpoint", str(noisy / "init.pt"),
            "--data", f"tensors:{noisy / 'data.pt'}", "--batch_size", "8",
            "--microbatches", "1", "--dp", "2", "--optimizer", "adam", "--lr", "0.01",
            "--steps", "4", "--no_progress",
        ]  # fmt: skip

    straight = tmp_path / "straight.pt"
    _ok(launch(4, *flags(noisy / "noisy.py"), "--save_checkpoint", str(straight)))
    crashing = _with_fault(noisy / "noisy.py", tmp_path / "crashing.py", 1, 3,
                           'raise RuntimeError("injected fault")')  # fmt: skip
    checkpoints, resumed = tmp_path / "checkpoints", tmp_path / "resumed.pt"
    saving = ["--checkpoint_dir", str(checkpoints), "--checkpoint_every", "2"]
    crashed = launch(4, *flags(crashing), *saving)  # each replica's third forward: step 2
    assert crashed.returncode != 0
    assert "RuntimeError: injected fault" in crashed.stderr
    assert json.loads((checkpoints / "latest.json").read_text())["step"] == 2
    _ok(launch(4, *flags(noisy / "noisy.py"), *saving, "--resume",
               "--save_checkpoint", str(resumed)))  # fmt: skip
    _assert_same(torch.load(resumed), torch.load(straight))


def _prepare_only(*flags: str, world_size: int) -> subprocess.CompletedProcess:
    """``python -m runtime`` as one rank of a world of ``world_size``: the checks made before
    any process group starts."""
    env = {**os.environ, "WORLD_SIZE": str(world_size), "RANK": "0"}
    return subprocess.run(
        [sys.executable, "-m", "runtime", "--device", "cpu", *flags],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("flags", "world_size", "message"),
    [
        (["--dp", "2"], 2, "run by 4 processes (ranks per stage: 2, 2 with --dp 2) but the world"),
        (["--dp", "0"], 2, "--dp must be at least 1"),
        (["--dp", "3", "--microbatches", "1", "--batch_size", "2"], 6, "--batch_size 2"),
        (["--dp", "2", "--schedule", "pipeoptim"], 4, "does not run replicated stages"),
        (["--dp", "2", "--schedule", "pipedream", "--vertical_sync"], 4, "--vertical_sync"),
    ],
)
def test_layout_errors_are_one_line(
    skip_mlp: tuple[Path, dict], flags: list[str], world_size: int, message: str
) -> None:
    folder, _ = skip_mlp
    result = _prepare_only("--model", str(folder / "skip.py"), *flags, world_size=world_size)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("runtime: error:")
    assert message in result.stderr


def test_pipedream_needs_microbatches_the_replicas_can_share(skip_mlp: tuple[Path, dict]) -> None:
    folder, _ = skip_mlp
    planned = _with_replicas(folder, "skip_3_1_uneven.py", (3, 1))
    flags = ("--model", str(planned), "--schedule", "pipedream", "--microbatches", "4")
    result = _prepare_only(*flags, world_size=4)
    assert result.returncode == 2, result.stderr
    assert "must divide among them" in result.stderr and "multiple of 3" in result.stderr
