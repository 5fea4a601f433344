"""benchmarks/hollow.py: a generated file's hollow double exchanges what the file's stages
exchange (names, shapes, dtypes, gradients), so that the runtime runs it as it runs the file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import autopipe
from autopipe.tasks import zoo_task
from conftest import REPO, launch

sys.path.insert(0, str(REPO / "benchmarks"))

from hollow import write_hollow  # noqa: E402
from runtime.comm import value_specs  # noqa: E402
from runtime.stage import RuntimeConfigError, load_generated  # noqa: E402
from stage_times import stage_inputs, synthetic_inputs  # noqa: E402

MICROBATCH = 3


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """gpt2_tiny in 3 stages: token ids in, a tied embedding, several values per boundary."""
    task = zoo_task("nlp", "gpt2_tiny", 2)
    path = tmp_path_factory.mktemp("hollow") / "gpt2.py"
    autopipe.compile(task.model, task.example_inputs, 3, output=path, analysis=False)
    return path


def _outputs(generated, stage: int, arguments: list[torch.Tensor]) -> list[torch.Tensor]:
    module = generated.build_stage(stage).train()
    return list(module(*arguments))


def test_every_hollow_stage_gives_what_the_file_stage_gives(gpt2: Path, tmp_path: Path) -> None:
    generated = load_generated(gpt2)
    double = load_generated(write_hollow(gpt2, tmp_path / "double.py"))
    pipeline = generated.PIPELINE
    assert double.PIPELINE["stages"] == pipeline["stages"]
    assert double.PIPELINE["tied_parameters"] == [] != pipeline["tied_parameters"]
    assert "source" not in double.PIPELINE
    inputs = synthetic_inputs(gpt2, pipeline, MICROBATCH)
    for stage in range(len(pipeline["stages"])):
        arguments = stage_inputs(pipeline, stage, inputs, MICROBATCH)
        real = _outputs(generated, stage, arguments)
        hollow = _outputs(double, stage, arguments)
        assert [(t.shape, t.dtype, t.requires_grad) for t in hollow] == [
            (t.shape, t.dtype, t.requires_grad) for t in real
        ]
        # every input that wants a gradient gets one of its shape, as from the file's stage
        wanting = [a for a in arguments if a.requires_grad]
        if not wanting:  # the first stage takes token ids
            continue
        floats = [t for t in hollow if t.requires_grad]
        grads = torch.autograd.grad(floats, wanting, [torch.ones_like(t) for t in floats])
        assert [g.shape for g in grads] == [a.shape for a in wanting]
        assert all(g.abs().sum() > 0 for g in grads)


def test_the_runtime_trains_the_double(gpt2: Path, tmp_path: Path) -> None:
    double = write_hollow(gpt2, tmp_path / "double.py", [(0.2, 0.3)] * 3)
    result = launch(3, "--model", str(double), "--steps", "2", "--batch_size", "6", "--no_progress")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "trained 2 steps" in result.stdout


def test_busy_stages_work_in_proportion_to_the_times_given(gpt2: Path, tmp_path: Path) -> None:
    double = load_generated(write_hollow(gpt2, tmp_path / "busy.py", [(1, 2), (2, 4), (0, 0)]))
    rounds = double.BUSY_ROUNDS
    assert rounds[2] == (0, 0)
    assert 0 < rounds[0][0] < rounds[0][1] == rounds[1][0] < rounds[1][1]
    assert double.build_stage(1).rounds == rounds[1]
    idle = load_generated(write_hollow(gpt2, tmp_path / "idle.py"))
    assert idle.BUSY_ROUNDS is None and idle.build_stage(0).rounds == (0, 0)


def test_busy_times_must_match_the_stages(gpt2: Path, tmp_path: Path) -> None:
    with pytest.raises(RuntimeConfigError, match="2 stages' busy times for a file of 3"):
        write_hollow(gpt2, tmp_path / "busy.py", [(1, 2)] * 2)


def test_the_command_writes_a_double_or_says_why_not_in_one_line(
    gpt2: Path, tmp_path: Path
) -> None:
    script = str(REPO / "benchmarks" / "hollow.py")
    done = subprocess.run(
        [sys.executable, script, str(gpt2), str(tmp_path / "double.py")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    specs = value_specs(load_generated(tmp_path / "double.py").PIPELINE)
    assert specs == value_specs(load_generated(gpt2).PIPELINE)
    failed = subprocess.run(
        [sys.executable, script, "no/such/file.py", str(tmp_path / "x.py")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert failed.returncode == 2
    assert failed.stderr.strip().startswith("hollow: error:")
    assert "Traceback" not in failed.stderr
