"""End-to-end tests of the runtime: real processes on gloo, over loopback only.

The transparency tests train a generated pipeline for a few steps with torchrun and compare the
saved weights with the original model trained in this process on the same data.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import autopipe
from autopipe.tasks import zoo_task
from conftest import REPO, free_port, launch
from runtime.comm import StageComm, Transfer, buffer_for, make_channels, transfers
from runtime.executor import microbatch_sizes
from runtime.layout import Layout

TIMEOUT_S = 120
STEPS = 3
LR = 0.1
MOMENTUM = 0.9


class SkipMLP(nn.Module):
    """A small MLP whose first activation skips two layers."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.hidden1 = nn.Linear(16, 16)
        self.hidden2 = nn.Linear(16, 16)
        self.out = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        return self.out(torch.relu(self.hidden2(torch.relu(self.hidden1(h)))) + h)


def _prepare(tmp_path: Path, model: nn.Module, inputs: tuple, labels: torch.Tensor, p: int):
    """Generate the pipeline file and save the weights and the batch the runtime will read."""
    generated = tmp_path / f"m{p}.py"
    autopipe.compile(model, inputs, n_stages=p, output=generated)
    torch.save(model.state_dict(), tmp_path / "init.pt")
    torch.save({"inputs": inputs, "labels": labels}, tmp_path / "data.pt")
    return generated


def _train_original(model: nn.Module, inputs: tuple, labels: torch.Tensor) -> dict:
    """STEPS steps of SGD with momentum on the full batch, mean cross entropy."""
    model = copy.deepcopy(model).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    for _ in range(STEPS):
        out = model(*inputs)
        F.cross_entropy(out.reshape(-1, out.shape[-1]), labels.reshape(-1)).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.state_dict()


def _run_pipeline(tmp_path: Path, generated: Path, p: int, schedule: str, m: int) -> dict:
    saved = tmp_path / f"trained_{schedule}_{p}.pt"
    result = launch(
        p, "--model", str(generated), "--schedule", schedule, "--microbatches", str(m),
        "--steps", str(STEPS), "--optimizer", "sgd", "--lr", str(LR),
        "--momentum", str(MOMENTUM), "--loss", "cross_entropy", "--no_dropout",
        "--data", f"tensors:{tmp_path / 'data.pt'}", "--init_checkpoint",
        str(tmp_path / "init.pt"), "--save_checkpoint", str(saved),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert _step_lines(result.stdout) == [str(step) for step in range(STEPS)], result.stdout
    return torch.load(saved)


def _step_lines(stdout: str) -> list[str]:
    return [line.split()[1] for line in stdout.splitlines() if line.startswith("step ")]


def _max_difference(found: dict, expected: dict) -> float:
    """Largest difference over every entry, after checking each is within tolerance."""
    assert list(found) == list(expected)
    worst = 0.0
    for key, value in expected.items():
        torch.testing.assert_close(found[key], value, rtol=1e-5, atol=1e-6, msg=key)
        worst = max(worst, (found[key].double() - value.double()).abs().max().item())
    return worst


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_skip_mlp_trains_like_the_original(tmp_path: Path, schedule: str) -> None:
    torch.manual_seed(0)
    model = SkipMLP()
    inputs, labels = (torch.randn(8, 8),), torch.randint(0, 5, (8,))
    generated = _prepare(tmp_path, model, inputs, labels, 2)
    trained = _run_pipeline(tmp_path, generated, 2, schedule, 4)
    difference = _max_difference(trained, _train_original(model, inputs, labels))
    print(f"skip MLP, {schedule}, p=2: max parameter difference {difference:.3g}")


def _dropout_off(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


@pytest.fixture(scope="module")
def gpt2_tiny_p4(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """gpt2_tiny in 4 stages (its embedding and head are tied across stages 0 and 3), with its
    weights and data saved and the weights the original reaches on them."""
    tmp_path = tmp_path_factory.mktemp("gpt2_tiny")
    task = zoo_task("nlp", "gpt2_tiny", 4)
    inputs = (task.example_inputs["input_ids"],)
    labels = torch.randint(0, 1000, inputs[0].shape, generator=torch.Generator().manual_seed(1))
    generated = _prepare(tmp_path, task.model, inputs, labels, 4)
    return tmp_path, generated, _train_original(_dropout_off(task.model), inputs, labels)


@pytest.mark.parametrize(("schedule", "m"), [("gpipe", 4), ("1f1b", 2)])
def test_gpt2_tiny_with_tied_weights_trains_like_the_original(
    gpt2_tiny_p4: tuple[Path, Path, dict], schedule: str, m: int
) -> None:
    tmp_path, generated, expected = gpt2_tiny_p4
    trained = _run_pipeline(tmp_path, generated, 4, schedule, m)
    difference = _max_difference(trained, expected)
    print(f"gpt2_tiny, {schedule}, p=4, m={m}: max parameter difference {difference:.3g}")


def test_smaller_batch_splits_unevenly_and_still_matches(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SkipMLP()
    generated = _prepare(tmp_path, model, (torch.randn(8, 8),), torch.randint(0, 5, (8,)), 2)
    inputs, labels = (torch.randn(6, 8),), torch.randint(0, 5, (6,))
    torch.save({"inputs": inputs, "labels": labels}, tmp_path / "data.pt")
    trained = _run_pipeline(tmp_path, generated, 2, "1f1b", 4)  # microbatches of 2, 2, 1, 1
    difference = _max_difference(trained, _train_original(model, inputs, labels))
    print(f"skip MLP, batch 6 in 4 microbatches: max parameter difference {difference:.3g}")


def test_synthetic_data_and_config_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    generated = _prepare(tmp_path, SkipMLP(), (torch.randn(8, 8),), torch.zeros(8), 2)
    config = tmp_path / "config.json"
    config.write_text('{"steps": 2, "schedule": "gpipe", "optimizer": "adam", "lr": 0.001}')
    result = launch(
        2, "--config", str(config), "--model", str(generated), "--schedule", "1f1b",
        "--loss", "mse", "--batch_size", "12", "--microbatches", "3",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert _step_lines(result.stdout) == ["0", "1"]
    assert all("samples/s" in line for line in result.stdout.splitlines() if "step " in line)


def test_wrong_world_size_is_a_one_line_error(tmp_path: Path) -> None:
    torch.manual_seed(0)
    generated = _prepare(tmp_path, SkipMLP(), (torch.randn(8, 8),), torch.zeros(8), 2)
    result = launch(3, "--model", str(generated), "--steps", "1")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("runtime: error:")]
    assert errors, result.stderr[-3000:]  # torchrun may stop the other ranks before they print
    assert len(set(errors)) == 1
    assert "2 stages" in errors[0] and "world size is 3" in errors[0]
    assert "runtime/train.py" not in result.stderr


def test_error_lines_of_ranks_failing_at_once_stay_whole() -> None:
    # Every rank of a run writes to one stderr, unbuffered where PYTHONUNBUFFERED is set (as in
    # many containers): a line written in two pieces could be spliced with another rank's.
    writer = (
        "import sys; from runtime.cli import error_line\n"
        "for i in range(2000): error_line('runtime', f'rank {sys.argv[1]} line {i} ' + 'x' * 300)"
    )
    shell = " & ".join(f'{sys.executable} -u -c "{writer}" {rank}' for rank in range(6))
    result = subprocess.run(
        f"{shell}; wait", shell=True, cwd=REPO, capture_output=True, text=True, check=True
    )
    lines = result.stderr.splitlines()
    assert len(lines) == 6 * 2000
    assert all(
        line.startswith("runtime: error: rank ") and line.endswith("x" * 300) for line in lines
    )
    assert all(line.count("runtime: error:") == 1 for line in lines)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--model", "no/such/file.py"], "no generated model file"),
        (["--model", "x.py", "--optimizer", "rmsprop"], "invalid choice: 'rmsprop'"),
    ],
)
def test_user_errors_exit_with_one_line(flags: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "runtime", *flags],
        cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("runtime: error:") and message in result.stderr


def _spec(producer: int | None, consumers: list[int], shape: list[int]) -> dict:
    return {
        "shape": shape, "dtype": "float32", "requires_grad": True, "batch_dim": 0,
        "producer": producer, "consumers": consumers,
    }  # fmt: skip


def test_a_value_goes_straight_to_every_consumer_in_pipeline_order() -> None:
    x, h, y = _spec(None, [0, 2], [8, 3]), _spec(0, [1, 2], [8, 4]), _spec(1, [2], [8, 4])
    pipeline = {
        "stages": [
            {"inputs": ["x"], "outputs": ["h"], "values": {"x": x, "h": h}},
            {"inputs": ["h"], "outputs": ["y"], "values": {"h": h, "y": y}},
            {"inputs": ["x", "h", "y"], "outputs": [], "values": {"x": x, "h": h, "y": y}},
        ]
    }
    assert transfers(pipeline) == [
        Transfer("h", 0, 1, 0),
        Transfer("x", 0, 2, 1),
        Transfer("h", 0, 2, 2),
        Transfer("y", 1, 2, 3),
    ]


def test_microbatch_sizes_are_those_of_tensor_split() -> None:
    assert microbatch_sizes(6, 4) == [2, 2, 1, 1]
    for batch in range(1, 40):
        for m in range(1, batch + 1):
            expected = [len(part) for part in torch.arange(batch).tensor_split(m)]
            assert microbatch_sizes(batch, m) == expected, (batch, m)


def test_receive_buffers_take_the_microbatch_size() -> None:
    spec = {**_spec(0, [1], [8, 5, 3]), "batch_dim": 1}
    assert buffer_for(spec, 2, torch.device("cpu")).shape == (8, 2, 3)


def _two_stages() -> dict[str, Any]:
    """Stage 0 turns model input x into h (4 x 3), which stage 1 takes."""
    x, h = _spec(None, [0], [4, 3]), _spec(0, [1], [4, 3])
    return {
        "stages": [
            {"inputs": ["x"], "outputs": ["h"], "values": {"x": x, "h": h}},
            {"inputs": ["h"], "outputs": [], "values": {"h": h}},
        ]
    }


def _exchange(rank: int, port: int, separate: bool, results: Any) -> None:
    """Rank 0 sends a value to rank 1 and gets its gradient back, over the given channels."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        pipeline = _two_stages()
        layout = Layout((1, 1))
        channels = make_channels(pipeline, layout, separate)
        comm = StageComm(pipeline, layout, rank, torch.device("cpu"), channels)
        if rank == 0:
            value = torch.arange(12.0).reshape(4, 3).requires_grad_()
            comm.send_values(0, {"h": value})
            grads = comm.receive_gradients(0, 4, {"h": value})
            results.put(grads["h"].tolist())
        else:
            received = comm.receive_values(0, 4)["h"].requires_grad_()
            (received * 2).sum().backward()
            comm.send_gradients(0, {"h": received})
        comm.wait_sends()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _stream(rank: int, port: int, results: Any) -> None:
    """Rank 0 sends 20 microbatches' values to rank 1 and waits for none of its sends; once
    rank 1 has them all, it reports how many sends it still holds, a while after."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        pipeline = _two_stages()
        layout = Layout((1, 1))
        channels = make_channels(pipeline, layout, separate=False)
        comm = StageComm(pipeline, layout, rank, torch.device("cpu"), channels, send_waiter=True)
        for microbatch in range(20):
            if rank == 0:
                comm.send_values(microbatch, {"h": torch.full((4, 3), float(microbatch))})
            else:
                assert comm.receive_values(microbatch, 4)["h"][0, 0].item() == microbatch
        dist.barrier()
        if rank == 0:
            deadline = time.monotonic() + 10
            while comm.pending_sends and time.monotonic() < deadline:
                time.sleep(0.01)
            results.put(comm.pending_sends)
        comm.close()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_sends_are_let_go_once_they_land_without_waiting_for_them() -> None:
    # a gloo send never reports itself completed: without the waiter thread all 20 sends, and
    # their tensors, would be held until wait_sends (an asynchronous run's end)
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    ranks = [context.Process(target=_stream, args=(r, port, results)) for r in (0, 1)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(TIMEOUT_S)
    assert [process.exitcode for process in ranks] == [0, 0]
    assert results.get(timeout=5) == 0


@pytest.mark.parametrize("separate", [True, False])
def test_values_and_gradients_cross_per_direction_channels(separate: bool) -> None:
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    ranks = [context.Process(target=_exchange, args=(r, port, separate, results)) for r in (0, 1)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(TIMEOUT_S)
    assert [process.exitcode for process in ranks] == [0, 0]
    assert results.get(timeout=5) == [[2.0] * 3] * 4
