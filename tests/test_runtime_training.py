"""End-to-end tests of the runtime's training features: where weights start, recomputation,
data sets and epochs, learning-rate schedules, checkpoints, resuming, and failing ranks."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

import autopipe
from autopipe.partition import main as partition_main
from autopipe.tasks import zoo_task
from conftest import REPO, TORCHRUN_TIMEOUT_S, NoisyMLP, launch
from runtime.stage import load_generated
from runtime.train import lr_factor


def _noisy_flags(folder: Path, model: Path | None = None) -> list[str]:
    return [
        "--model", str(model or folder / "noisy.py"), "--init_checkpoint", str(folder / "init.pt"),
        "--data", f"tensors:{folder / 'data.pt'}", "--batch_size", "8", "--microbatches", "2",
        "--optimizer", "adam", "--lr", "0.01", "--lr_schedule", "cosine", "--warmup_steps", "1",
    ]  # fmt: skip


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _assert_same(found: dict, expected: dict) -> None:
    assert list(found) == list(expected)
    for key, value in expected.items():
        torch.testing.assert_close(found[key], value, rtol=0, atol=0, msg=key)


def _with_fault(source: Path, target: Path, stage: int, call: int, action: str) -> Path:
    """A copy of a generated file whose stage ``stage`` runs ``action`` on its ``call``-th
    forward: how a rank that crashes or is killed mid-run is made."""
    text = source.read_text()
    start = text.index(f"class Stage{stage}(nn.Module):")
    signature = re.compile(r"\n    def forward\(.*?\) -> tuple:\n", re.S).search(text, start)
    assert signature is not None
    hook = "        _fault()\n"
    helper = (
        "\n\nimport os, signal\n\n_CALLS = [0]\n\n\ndef _fault():\n    _CALLS[0] += 1\n"
        f"    if _CALLS[0] == {call}:\n        {action}\n"
    )
    text = text[: signature.end()] + hook + text[signature.end() :]
    target.write_text(text.replace("\nfrom torch import nn\n", "\nfrom torch import nn\n" + helper))
    return target


def test_weights_start_as_the_zoo_models_built_with_the_seed(tmp_path: Path) -> None:
    generated = tmp_path / "resnet_tiny_p2.py"
    assert partition_main(["vision", "--model", "resnet_tiny", "-p", "2", "-b", "8",
                           "-o", str(generated), "--no_analysis"]) == 0  # fmt: skip
    saved = tmp_path / "start.pt"
    _ok(launch(2, "--model", str(generated), "--seed", "3", "--lr", "0", "--steps", "1",
               "--batch_size", "8", "--save_checkpoint", str(saved)))  # fmt: skip
    original = zoo_task("vision", "resnet_tiny", 1, seed=3).model
    found = torch.load(saved)
    for name, parameter in original.named_parameters():
        torch.testing.assert_close(found[name], parameter.detach(), rtol=0, atol=0, msg=name)
    other_seed = zoo_task("vision", "resnet_tiny", 1, seed=4).model
    assert not torch.equal(found["conv1.weight"], other_seed.conv1.weight)


def test_recompute_gives_the_same_training_as_keeping_activations(noisy: Path) -> None:
    kept, again, trace = noisy / "kept.pt", noisy / "recomputed.pt", noisy / "trace.json"
    _ok(launch(2, *_noisy_flags(noisy), "--steps", "3", "--save_checkpoint", str(kept),
               "--trace", str(trace)))  # fmt: skip
    written = json.loads(trace.read_text())
    events = [e for e in written["traceEvents"] if e["ph"] == "X"]
    assert written["otherData"] == {
        "schedule": "1f1b", "microbatches": 2, "batch_size": 8, "microbatch_size": 4
    }  # fmt: skip
    per_stage = sorted(e["name"] for e in events if e["tid"] == 1)
    assert per_stage == sorted(["F0", "F1", "B0", "B1", "S"] * 3)  # 3 steps of 2 microbatches
    assert {e["tid"] for e in events} == {0, 1} and min(e["ts"] for e in events) == 0
    # stage 1 cannot start its first forward before stage 0 has sent it the values: it waits,
    # and the trace says how long, within the action's span
    first = min((e for e in events if e["tid"] == 1), key=lambda e: e["ts"])
    assert first["name"] == "F0" and first["args"]["waited_ms"] > 0
    assert all(0 < e["args"]["waited_ms"] <= e["dur"] / 1e3 for e in events if "args" in e)
    _ok(launch(2, *_noisy_flags(noisy), "--steps", "3", "--recompute",
               "--save_checkpoint", str(again)))  # fmt: skip
    _assert_same(torch.load(again), torch.load(kept))


def test_a_crashed_run_resumes_to_the_same_weights_and_merges(noisy: Path, tmp_path: Path) -> None:
    straight = tmp_path / "straight.pt"
    _ok(launch(2, *_noisy_flags(noisy), "--steps", "5", "--save_checkpoint", str(straight)))

    crashing = _with_fault(noisy / "noisy.py", tmp_path / "crashing.py", 1, 7,
                           'raise RuntimeError("injected fault")')  # fmt: skip
    checkpoints, resumed = tmp_path / "checkpoints", tmp_path / "resumed.pt"
    flags = ["--steps", "5", "--checkpoint_dir", str(checkpoints), "--checkpoint_every", "2"]
    crashed = launch(2, *_noisy_flags(noisy, crashing), *flags)
    assert crashed.returncode != 0
    assert "runtime: error: rank 1 failed: RuntimeError: injected fault" in crashed.stderr
    assert json.loads((checkpoints / "latest.json").read_text())["step"] == 2

    result = _ok(launch(2, *_noisy_flags(noisy), *flags, "--resume",
                        "--save_checkpoint", str(resumed)))  # fmt: skip
    assert [line.split()[1] for line in result.stdout.splitlines() if line.startswith("step ")] == [
        "2",
        "3",
        "4",
    ]
    _assert_same(torch.load(resumed), torch.load(straight))

    merged = tmp_path / "merged.pt"
    merge = subprocess.run(
        [sys.executable, "-m", "runtime.checkpoint", "merge", str(checkpoints), "-o", str(merged)],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert merge.returncode == 0, merge.stderr
    _assert_same(torch.load(merged), torch.load(straight))
    NoisyMLP().load_state_dict(torch.load(merged))


def test_a_killed_rank_stops_every_rank_without_hanging(noisy: Path, tmp_path: Path) -> None:
    killed = _with_fault(noisy / "noisy.py", tmp_path / "killed.py", 0, 3,
                         "os.kill(os.getpid(), signal.SIGKILL)")  # fmt: skip
    started = time.monotonic()
    result = launch(2, *_noisy_flags(noisy, killed), "--steps", "50", "--timeout", "60")
    assert result.returncode != 0
    assert time.monotonic() - started < TORCHRUN_TIMEOUT_S
    assert re.search(r"rank\s*:\s*0", result.stderr), result.stderr[-3000:]
    assert "SIGKILL" in result.stderr


def test_digits_epochs_and_json_log(tmp_path: Path) -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)
    )
    generated = tmp_path / "digits.py"
    autopipe.compile(model, (torch.randn(4, 1, 8, 8),), n_stages=2, output=generated)
    log = tmp_path / "log.jsonl"
    result = _ok(launch(2, "--model", str(generated), "--data", "digits", "--epochs", "2",
                        "--batch_size", "256", "--lr", "0.1", "--momentum", "0.9",
                        "--lr_schedule", "linear", "--log_json", str(log), "--random_init"))  # fmt: skip
    assert "digits: 1437 train samples" in result.stdout
    records = [json.loads(line) for line in log.read_text().splitlines()]
    steps_per_epoch = 1437 // 256 + 1  # the last 157 samples still fill 4 microbatches
    assert [r["step"] for r in records] == list(range(2 * steps_per_epoch))
    assert [r["epoch"] for r in records] == [0] * steps_per_epoch + [1] * steps_per_epoch
    assert records[steps_per_epoch - 1]["samples"] == 1437 - 5 * 256
    assert records[-1]["lr"] < records[0]["lr"] == pytest.approx(0.1)


def _snapshot(folder: Path, epoch: int, generated: ModuleType) -> dict:
    """Epoch ``epoch``'s stage snapshots merged into one state dict for the original model."""
    stages = range(len(generated.PIPELINE["stages"]))
    parts = [torch.load(folder / f"epoch_{epoch}" / f"stage_{s}.pt") for s in stages]
    return generated.merge_state_dicts(parts)


def test_epoch_snapshots_merge_into_the_model_and_end_at_the_trained_weights(
    tmp_path: Path,
) -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)
    )
    generated = tmp_path / "digits.py"
    autopipe.compile(model, (torch.randn(4, 1, 8, 8),), n_stages=2, output=generated)
    torch.save(model.state_dict(), tmp_path / "init.pt")
    flags = ["--model", str(generated), "--data", "digits", "--epochs", "2", "--batch_size",
             "512", "--lr", "0.1", "--init_checkpoint", str(tmp_path / "init.pt")]  # fmt: skip
    _ok(launch(2, *flags, "--snapshot_dir", str(tmp_path / "1f1b"),
               "--save_checkpoint", str(tmp_path / "trained.pt")))  # fmt: skip
    module = load_generated(generated)
    assert sorted(path.name for path in (tmp_path / "1f1b").iterdir()) == ["epoch_0", "epoch_1"]
    first, last = (_snapshot(tmp_path / "1f1b", epoch, module) for epoch in (0, 1))
    model.load_state_dict(first, strict=True)
    _assert_same(last, torch.load(tmp_path / "trained.pt"))
    assert not torch.equal(first["3.weight"], last["3.weight"])
    _ok(launch(2, *flags, "--schedule", "pipedream", "--snapshot_dir", str(tmp_path / "pd")))
    for epoch in (0, 1):
        model.load_state_dict(_snapshot(tmp_path / "pd", epoch, module), strict=True)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--steps", "2", "--epochs", "1"], "not both"),
        (["--epochs", "1"], "synthetic data has no epochs"),
        (["--snapshot_dir", "snapshots"], "needs a data set"),
        (["--resume"], "need --checkpoint_dir"),
        (["--data", "cifar10:/no/such/dir"], "cifar10"),
        (["--lr_schedule", "exponential"], "invalid choice"),
    ],
)
def test_training_flags_that_cannot_work_are_one_line_errors(
    noisy: Path, flags: list[str], message: str
) -> None:
    result = launch(1, "--model", str(noisy / "noisy.py"), *flags)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("runtime: error:")]
    assert errors and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr.split("runtime: error:")[0][-2000:]


def test_learning_rate_schedules() -> None:
    assert [lr_factor("constant", s, 10, 0) for s in (0, 5, 9)] == [1.0, 1.0, 1.0]
    assert [lr_factor("linear", s, 10, 2) for s in (0, 1, 2, 6)] == [0.5, 1.0, 1.0, 0.5]
    assert lr_factor("cosine", 0, 10, 0) == 1.0
    assert lr_factor("cosine", 5, 10, 0) == pytest.approx(0.5)
    assert lr_factor("cosine", 10, 10, 0) == pytest.approx(0.0)
