"""End-to-end tests of the asynchronous schedules: a two-stage model trained with torchrun ends
with the weights of a single-process run of the same schedule on the same stages.

The reference runs both stages' actions in the order of the lockstep simulation, passing
tensors between stages directly, with the weight versions each action names
(:class:`runtime.weights.VersionStore`, whose update rules tests/test_weights.py pins by hand).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import launch
from test_weights import compute, lockstep_order
from torch import nn

import autopipe
from autopipe.cost import CostModel
from autopipe.partitioning import PartitionOptions
from runtime.data import DataSource
from runtime.schedule import build_schedule
from runtime.stage import build_local_stage, load_generated
from runtime.train import TrainConfig
from runtime.weights import VersionStore, versions_to_keep

STEPS, BATCH, M, LR, MOMENTUM = 4, 8, 2, 0.1, 0.9


class Block(nn.Module):
    """Linear, tanh, linear: a backward through it needs its second layer's weights, so the
    version a backward uses changes the gradients."""

    def __init__(self, n_in: int, n_hidden: int, n_out: int) -> None:
        super().__init__()
        self.n_in, self.n_hidden, self.n_out = n_in, n_hidden, n_out  # how autopipe rebuilds it
        self.first = nn.Linear(n_in, n_hidden)
        self.second = nn.Linear(n_hidden, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x)))


class TwoBlocks(nn.Module):
    """Two blocks, one per stage."""

    def __init__(self) -> None:
        super().__init__()
        self.head = Block(8, 32, 32)
        self.tail = Block(32, 32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(torch.tanh(self.head(x)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TwoBlocks cut between its blocks (by parameters, which halves it there), its weights,
    and STEPS batches of data in order."""
    folder = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    model = TwoBlocks()
    autopipe.compile(
        model, (torch.randn(BATCH, 8),), n_stages=2, method="params", output=folder / "tiny.py",
        analysis=False,
    )  # fmt: skip
    stage_0 = load_generated(folder / "tiny.py").build_stage(0)
    assert [name for name, _ in stage_0.named_parameters()][-1] == "head.second.bias"
    torch.save(model.state_dict(), folder / "init.pt")
    inputs = torch.randn(STEPS * BATCH, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 5, (STEPS * BATCH,), generator=torch.Generator().manual_seed(2))
    torch.save({"inputs": (inputs,), "labels": labels}, folder / "data.pt")
    return folder


def _flags(folder: Path, schedule: str, optimizer: str, *extra: str) -> list[str]:
    return [
        "--model", str(folder / "tiny.py"), "--init_checkpoint", str(folder / "init.pt"),
        "--data", f"tensors:{folder / 'data.pt'}", "--no_shuffle", "--batch_size", str(BATCH),
        "--microbatches", str(M), "--steps", str(STEPS), "--schedule", schedule,
        "--optimizer", optimizer, "--lr", str(LR), "--momentum", str(MOMENTUM), *extra,
    ]  # fmt: skip


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _optimizer(name: str, stage: nn.Module) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(stage.parameters(), lr=LR)
    return torch.optim.SGD(stage.parameters(), lr=LR, momentum=MOMENTUM)


def _microbatch(folder: Path, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Microbatch k of the run: part k % M of step k // M's batch, the data read in order."""
    data = torch.load(folder / "data.pt")
    step, part = divmod(k, M)
    rows = slice(step * BATCH, (step + 1) * BATCH)
    x, y = data["inputs"][0][rows], data["labels"][rows]
    return x.tensor_split(M)[part], y.tensor_split(M)[part]


def reference(folder: Path, schedule_name: str, optimizer: str, vertical_sync: bool) -> dict:
    """The weights the schedule reaches, run in this process on the generated stages."""
    generated = load_generated(folder / "tiny.py")
    initial = torch.load(folder / "init.pt")
    stages = [build_local_stage(generated, s, torch.device("cpu"), initial) for s in range(2)]
    optimizers = [_optimizer(optimizer, stage) for stage in stages]
    stores = [VersionStore(stage) for stage in stages]
    schedule = build_schedule(schedule_name, 2, M, STEPS, vertical_sync)
    keeps = [iter(versions_to_keep(actions)) for actions in schedule.actions]
    weight = 1.0 if schedule.microbatches_per_step == 1 else 1 / M
    sent: dict[int, torch.Tensor] = {}
    received: dict[int, torch.Tensor] = {}
    outputs: dict[tuple[int, int], torch.Tensor] = {}
    for action in lockstep_order(schedule):
        s, k = action.stage, action.microbatch
        if action.kind == "F":
            x, _ = _microbatch(folder, k)
            if s == 1:
                x = received[k] = sent.pop(k).detach().requires_grad_()
            with compute(stores[s], optimizers[s], action):
                (outputs[(s, k)],) = stages[s](x)
            if s == 0:
                sent[k] = outputs[(s, k)]
        elif action.kind == "B":
            with stores[s].use(action.version):
                if s == 1:
                    _, y = _microbatch(folder, k)
                    (weight * F.cross_entropy(outputs.pop((s, k)), y)).backward()
                else:
                    outputs.pop((s, k)).backward(received.pop(k).grad)
        else:
            with stores[s].step(next(keeps[s])):
                optimizers[s].step()
            optimizers[s].zero_grad()
    return generated.merge_state_dicts([stage.state_dict() for stage in stages])


@pytest.fixture(scope="module")
def tiny_wpipe(tiny: Path) -> Path:
    """TwoBlocks in 4 stages (a layer each) placed two per device for WPipe on 2 devices."""
    torch.manual_seed(0)
    options = PartitionOptions(cost=CostModel(schedule="wpipe"))
    autopipe.compile(
        TwoBlocks(), (torch.randn(BATCH, 8),), n_stages=4, method="params",
        output=tiny / "tiny_wpipe.py", analysis=False, options=options,
    )  # fmt: skip
    return tiny / "tiny_wpipe.py"


def wpipe_reference(folder: Path, generated: Path) -> dict:
    """WPipe's update rule on the whole model in this process: batch t is computed with the
    first group's weights of step t - 1 (its stages 0 and 1) and the second group's newest
    (stages 2 and 3), and both groups take that gradient with SGD and momentum."""
    model = TwoBlocks()
    model.load_state_dict(torch.load(folder / "init.pt"))
    stages = load_generated(generated)
    first_group = {
        key for s in (0, 1) for key in stages.build_stage(s, model.state_dict()).state_dict()
    }
    assert first_group and first_group != set(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    history = [{k: v.clone() for k, v in model.state_dict().items() if k in first_group}]
    for step in range(STEPS):
        computing = TwoBlocks()
        computing.load_state_dict({**model.state_dict(), **history[max(0, step - 1)]})
        loss = sum(
            F.cross_entropy(computing(x), y) * len(y) / BATCH
            for x, y in (_microbatch(folder, step * M + part) for part in range(M))
        )
        loss.backward()
        for live, used in zip(model.parameters(), computing.parameters()):
            live.grad = used.grad
        optimizer.step()
        optimizer.zero_grad()
        history.append({k: v.clone() for k, v in model.state_dict().items() if k in first_group})
    return model.state_dict()


def test_wpipe_training_follows_its_update_rule(
    tiny: Path, tiny_wpipe: Path, tmp_path: Path
) -> None:
    saved = tmp_path / "trained.pt"
    flags = _flags(
        tiny, "wpipe", "sgd", "--model", str(tiny_wpipe), "--save_checkpoint", str(saved)
    )
    result = _ok(launch(2, *flags, "--trace", str(tmp_path / "trace.json")))
    assert "rank 0: stages 0, 2\nrank 1: stages 1, 3" in result.stdout
    _assert_close(torch.load(saved), wpipe_reference(tiny, tiny_wpipe))
    steps = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("step ")]
    assert steps == [str(step) for step in range(STEPS)]


def test_wpipe_differs_from_2bw_and_from_fresh_weights(tiny: Path, tiny_wpipe: Path) -> None:
    """The rule the test above checks is WPipe's own: a one-step delay everywhere (2BW) or
    nowhere (plain SGD) reaches other weights on this model."""
    expected = wpipe_reference(tiny, tiny_wpipe)
    delayed = reference(tiny, "2bw", "sgd", False)
    assert any(not torch.allclose(expected[k], delayed[k], atol=1e-6) for k in expected)


def _assert_close(found: dict, expected: dict) -> None:
    assert list(found) == list(expected)
    for key, value in expected.items():
        torch.testing.assert_close(found[key], value, rtol=1e-5, atol=1e-7, msg=key)


CASES = [
    ("pipedream", "sgd", False),
    ("pipedream", "sgd", True),
    ("stale", "sgd", False),
    ("2bw", "sgd", False),
    ("pipeoptim", "sgd", False),
    ("pipeoptim", "adam", False),
]


@pytest.mark.parametrize(("schedule", "optimizer", "vertical_sync"), CASES)
def test_async_training_matches_the_single_process_run(
    tiny: Path, tmp_path: Path, schedule: str, optimizer: str, vertical_sync: bool
) -> None:
    saved, log = tmp_path / "trained.pt", tmp_path / "log.jsonl"
    extra = ["--vertical_sync"] if vertical_sync else []
    flags = _flags(tiny, schedule, optimizer, *extra, "--save_checkpoint", str(saved))
    result = _ok(launch(2, *flags, "--log_json", str(log)))
    expected = reference(tiny, schedule, optimizer, vertical_sync)
    _assert_close(torch.load(saved), expected)
    steps = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("step ")]
    assert steps == [str(step) for step in range(STEPS)]
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["samples"] for r in records] == [BATCH] * STEPS


def test_the_schedules_differ_on_this_model(tiny: Path) -> None:
    """Each case above checks something of its own: stashing, vertical sync and prediction
    change the weights this model reaches."""
    finals = {case: reference(tiny, *case) for case in CASES}
    pairs = [(CASES[0], CASES[1]), (CASES[0], CASES[2]), (CASES[2], CASES[4])]
    for first, second in pairs:
        key = "head.first.weight"
        assert not torch.allclose(finals[first][key], finals[second][key]), (first, second)


def test_async_trace_and_checkpoint_at_the_end(tiny: Path, tmp_path: Path) -> None:
    trace, checkpoints = tmp_path / "trace.json", tmp_path / "checkpoints"
    flags = _flags(tiny, "pipedream", "sgd", "--trace", str(trace), "--recompute")
    _ok(launch(2, *flags, "--checkpoint_dir", str(checkpoints)))
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e["ph"] == "X"]
    names = [e["name"] for e in events if e["tid"] == 0]
    assert names.count("S") == STEPS * M and names[:3] == ["F0@0", "F1@0", "B0@0"]
    assert json.loads((checkpoints / "latest.json").read_text())["step"] == STEPS


def test_every_rank_knows_each_steps_batch_size(tiny: Path) -> None:
    # 32 samples in batches of 6: five full batches, then the 2 left over, then a new epoch.
    config = TrainConfig(
        model="tiny.py", data=f"tensors:{tiny / 'data.pt'}", batch_size=6, microbatches=M
    )
    data = DataSource(config, load_generated(tiny / "tiny.py").PIPELINE)
    assert [data.step_batch_size(step) for step in range(7)] == [6, 6, 6, 6, 6, 2, 6]
    for step in (4, 5):
        assert data.step_batch_size(step) == data.batch_size(data.inputs(step))


def _one_line_error(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("runtime: error:")]
    assert errors and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr.split("runtime: error:")[0][-2000:]


@pytest.mark.parametrize(
    ("schedule", "extra", "message"),
    [
        ("2bw", ["--microbatches", "1"], "needs --microbatches of at least the 2 stages, got 1"),
        ("1f1b", ["--vertical_sync"], "--vertical_sync is an option of --schedule pipedream"),
        ("pipeoptim", ["--recompute"], "would run the forward again with other weights"),
    ],
)
def test_async_flags_that_cannot_work_are_one_line_errors(
    tiny: Path, schedule: str, extra: list[str], message: str
) -> None:
    _one_line_error(launch(1, *_flags(tiny, schedule, "sgd"), *extra), message)


@pytest.mark.parametrize(
    ("schedule", "wpipe_file", "extra", "message"),
    [
        ("wpipe", False, [], "partition the model for it with"),
        ("1f1b", True, [], "which only --schedule wpipe runs"),
        ("wpipe", True, ["--dp", "2"], "drop --dp"),
    ],
)
def test_wpipe_needs_its_own_file_and_layout(
    tiny: Path, tiny_wpipe: Path, schedule: str, wpipe_file: bool, extra: list[str], message: str
) -> None:
    model = ["--model", str(tiny_wpipe)] if wpipe_file else []
    world = 2 if wpipe_file and "--dp" not in extra else 1
    _one_line_error(launch(world, *_flags(tiny, schedule, "sgd"), *model, *extra), message)
