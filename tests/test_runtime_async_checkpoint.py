"""Checkpoints of the asynchronous schedules: with ``--checkpoint_every K`` a run is cut into
segments of K steps, each a whole asynchronous schedule that drains, and saved between them.

The runs here train the two-stage model of tests/test_runtime_async.py for STEPS steps in
segments of EVERY, batches of 8 cut into 3 uneven microbatches, over a data set of two batches
(so epochs end inside segments). A single-process reference applies the update rule on the whole
model with the segments' drained restarts; a run that crashes after a checkpoint and is resumed
must end with the weights of that rule, and bit for bit with those of the run never interrupted.
"""

from __future__ import annotations

import functools
import json
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import launch
from test_runtime_async import TwoBlocks, _assert_close
from test_runtime_training import _assert_same, _ok, _with_fault

import autopipe
from autopipe.partitioning import PartitionOptions
from runtime.schedule import build_schedule
from runtime.stage import load_generated
from runtime.train import Segments, TrainConfig, lr_factor, run_segments

STEPS, EVERY, BATCH, M, LR, MOMENTUM = 7, 3, 8, 3, 0.1, 0.9
BATCHES_PER_EPOCH = 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TwoBlocks cut between its blocks, once with a rank per stage and once with stage 1 on two
    replicas; its weights, and two batches of data."""
    folder = tmp_path_factory.mktemp("tiny_segments")
    for name, options in (("tiny.py", None), ("replicated.py", PartitionOptions(replicas=(1, 2)))):
        torch.manual_seed(0)
        autopipe.compile(
            TwoBlocks(), (torch.randn(BATCH, 8),), n_stages=2, method="params",
            output=folder / name, analysis=False, options=options,
        )  # fmt: skip
        stage_0 = load_generated(folder / name).build_stage(0)
        assert [key for key, _ in stage_0.named_parameters()][-1] == "head.second.bias"
    torch.manual_seed(0)
    torch.save(TwoBlocks().state_dict(), folder / "init.pt")
    samples = BATCHES_PER_EPOCH * BATCH
    inputs = torch.randn(samples, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 5, (samples,), generator=torch.Generator().manual_seed(2))
    torch.save({"inputs": (inputs,), "labels": labels}, folder / "data.pt")
    return folder


def _flags(folder: Path, model: Path, schedule: str, checkpoints: Path) -> list[str]:
    return [
        "--model", str(model), "--init_checkpoint", str(folder / "init.pt"),
        "--data", f"tensors:{folder / 'data.pt'}", "--no_shuffle", "--batch_size", str(BATCH),
        "--microbatches", str(M), "--steps", str(STEPS), "--schedule", schedule,
        "--optimizer", "sgd", "--lr", str(LR), "--momentum", str(MOMENTUM),
        "--lr_schedule", "linear", "--no_progress",
        "--checkpoint_dir", str(checkpoints), "--checkpoint_every", str(EVERY),
    ]  # fmt: skip


@functools.cache
def _data(folder: Path) -> dict:
    return torch.load(folder / "data.pt")


def _microbatch(folder: Path, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Microbatch k of the run: part k % M of step k // M's batch, the data read in order."""
    data = _data(folder)
    step, part = divmod(k, M)
    first = step % BATCHES_PER_EPOCH * BATCH
    x, y = data["inputs"][0][first : first + BATCH], data["labels"][first : first + BATCH]
    return x.tensor_split(M)[part], y.tensor_split(M)[part]


def segmented_rule(folder: Path, delays: tuple[int, int], per_update: int, every: int) -> list:
    """The weights after each update of the whole model trained by an asynchronous rule, the
    run cut into segments of ``every`` steps with the pipeline drained between them.

    Update u takes the mean loss of the ``per_update`` microbatches from u * per_update on, its
    gradient computed with the weights of stage s (``head``, ``tail``) after update
    max(a, u - delays[s]), a the segment's first update: a segment restarts from its current
    weights, as a run does. SGD with momentum applies it to the newest weights, at the linear
    schedule's learning rate.
    """
    model = TwoBlocks()
    model.load_state_dict(torch.load(folder / "init.pt"))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    updates, per_segment = STEPS * M // per_update, every * M // per_update
    history = [{key: value.clone() for key, value in model.state_dict().items()}]
    for u in range(updates):
        first = u - u % per_segment
        used = [history[max(first, u - delay)] for delay in delays]
        computing = TwoBlocks()
        computing.load_state_dict(
            {key: used[0 if key.startswith("head.") else 1][key] for key in history[0]}
        )
        parts = [_microbatch(folder, k) for k in range(u * per_update, (u + 1) * per_update)]
        samples = sum(len(y) for _, y in parts)
        loss = sum(F.cross_entropy(computing(x), y) * len(y) / samples for x, y in parts)
        loss.backward()
        for live, computed in zip(model.parameters(), computing.parameters()):
            live.grad = computed.grad
        for group in optimizer.param_groups:
            group["lr"] = LR * lr_factor("linear", u, updates, 0)
        optimizer.step()
        optimizer.zero_grad()
        history.append({key: value.clone() for key, value in model.state_dict().items()})
    return history


PIPEDREAM = ((1, 0), 1)  # stage 0 computes with the weights of one update before; a step each
TWO_BW = ((1, 1), M)  # every stage with those of one batch before; a step per batch


def _resumed_after_a_crash(
    folder: Path, model: Path, schedule: str, world: int, crash_at: int, tmp_path: Path
) -> tuple[subprocess.CompletedProcess, Path]:
    """Run on ``world`` ranks until stage 1 crashes on its ``crash_at``-th forward, in the
    second segment, then resume; the resumed run and the weights it saved."""
    checkpoints, resumed = tmp_path / "resumed_checkpoints", tmp_path / "resumed.pt"
    crashing = _with_fault(model, tmp_path / "crashing.py", 1, crash_at,
                           'raise RuntimeError("injected fault")')  # fmt: skip
    crashed = launch(world, *_flags(folder, crashing, schedule, checkpoints))
    assert crashed.returncode != 0 and "injected fault" in crashed.stderr
    assert json.loads((checkpoints / "latest.json").read_text())["step"] == EVERY
    flags = _flags(folder, model, schedule, checkpoints)
    result = _ok(launch(world, *flags, "--resume", "--save_checkpoint", str(resumed)))
    return result, resumed


def _reported_steps(result: subprocess.CompletedProcess) -> list[int]:
    return [int(line.split()[1]) for line in result.stdout.splitlines() if line.startswith("step ")]


def test_pipedream_segments_drain_and_a_crashed_run_resumes_exactly(
    tiny: Path, tmp_path: Path
) -> None:
    straight, log = tmp_path / "straight.pt", tmp_path / "log.jsonl"
    trace, snapshots = tmp_path / "trace.json", tmp_path / "snapshots"
    flags = _flags(tiny, tiny / "tiny.py", "pipedream", tmp_path / "checkpoints")
    _ok(launch(2, *flags, "--save_checkpoint", str(straight), "--log_json", str(log),
               "--trace", str(trace), "--snapshot_dir", str(snapshots)))  # fmt: skip
    history = segmented_rule(tiny, *PIPEDREAM, EVERY)
    _assert_close(torch.load(straight), history[-1])

    # every step reported once, in order, across the segments
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(STEPS))
    # stage 0 ran a whole pipedream schedule per segment: 3 steps, 3 steps, then 1
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e["ph"] == "X"]
    segment = {steps: build_schedule("pipedream", 2, M, steps).actions[0] for steps in (1, 3)}
    expected = [str(a) for steps in (3, 3, 1) for a in segment[steps]]
    assert [e["name"] for e in events if e["tid"] == 0] == expected
    # epochs end inside segments, and the last one with the run
    generated = load_generated(tiny / "tiny.py")
    for epoch in range(4):
        update = min((epoch + 1) * BATCHES_PER_EPOCH, STEPS) * M
        for stage in range(2):
            saved = torch.load(snapshots / f"epoch_{epoch}" / f"stage_{stage}.pt")
            _assert_close(saved, generated.build_stage(stage, history[update]).state_dict())

    crash_at = EVERY * M + 2  # the second forward of the second segment
    result, resumed = _resumed_after_a_crash(
        tiny, tiny / "tiny.py", "pipedream", 2, crash_at, tmp_path
    )
    assert _reported_steps(result) == list(range(EVERY, STEPS))
    _assert_same(torch.load(resumed), torch.load(straight))


def test_2bw_on_replicas_resumes_to_the_weights_of_its_segmented_rule(
    tiny: Path, tmp_path: Path
) -> None:
    """Stage 1's replicas take turns with a segment's microbatches, from the first one of each
    segment: the second starts at microbatch 9 of the run, which the first replica runs, and
    each replica reports its share of a step's loss as its segment numbers them."""
    crash_at = 7  # the first replica runs 5 of the first segment's 9 microbatches, the second 4
    model = tiny / "replicated.py"
    result, resumed = _resumed_after_a_crash(tiny, model, "2bw", 3, crash_at, tmp_path)
    assert "stage 1: ranks 1, 2 (replicas 0-1)" in result.stdout
    assert _reported_steps(result) == list(range(EVERY, STEPS))
    _assert_close(torch.load(resumed), segmented_rule(tiny, *TWO_BW, EVERY)[-1])


@pytest.mark.parametrize("rule", [PIPEDREAM, TWO_BW], ids=["pipedream", "2bw"])
def test_the_segments_change_the_updates(tiny: Path, rule: tuple) -> None:
    """The checks above see the segments: the drained restarts give other weights than one
    segment for the whole run, and than no delay at all."""
    segmented = segmented_rule(tiny, *rule, EVERY)[-1]
    for other in (segmented_rule(tiny, *rule, STEPS)[-1], segmented_rule(tiny, (0, 0), 1, 1)[-1]):
        assert any(not torch.allclose(segmented[k], other[k], atol=1e-6) for k in segmented)


def test_a_run_is_cut_at_multiples_of_checkpoint_every() -> None:
    assert list(Segments(0, 5, 2)) == [range(0, 2), range(2, 4), range(4, 5)]
    assert list(Segments(3, 8, 4)) == [range(3, 4), range(4, 8)]
    assert Segments(3, 8, 4).of(5) == range(4, 8)
    config = TrainConfig(model="tiny.py", checkpoint_every=3)
    assert list(run_segments(config, 1, 4)) == [range(1, 2), range(2, 3), range(3, 4)]
    pipedream = TrainConfig(model="tiny.py", schedule="pipedream", checkpoint_every=3)
    assert list(run_segments(pipedream, 1, 7)) == [range(1, 3), range(3, 6), range(6, 7)]
    assert list(run_segments(TrainConfig(model="tiny.py", schedule="2bw"), 2, 7)) == [range(2, 7)]
