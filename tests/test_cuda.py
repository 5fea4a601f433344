"""The CUDA paths, run where a GPU is: skipped on a machine without one, such as CI's.

A measured profile times nodes with CUDA events and records their peak memory; generated stages
on the GPU compute what the original model computes there; the runtime places its stage on
``cuda:<local rank>``, talks NCCL, and trains like the original model (one process: a pipeline
of one stage, and WPipe's two stages on one GPU, passed in memory).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import launch
from test_runtime import SkipMLP
from torch import nn

import autopipe
from autopipe.cost import CostModel
from autopipe.graph import build_graph, propagate_values
from autopipe.partitioning import PartitionOptions
from autopipe.profile import profile_measured
from autopipe.tasks import zoo_task
from autopipe.trace import trace
from runtime.stage import load_generated

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

STEPS, LR = 3, 0.05


def _batch() -> tuple[tuple[torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(8, 8, generator=generator),), torch.randint(0, 5, (8,), generator=generator)


def test_measured_profile_times_cuda_nodes_and_their_memory() -> None:
    task = zoo_task("vision", "resnet_tiny", 4)
    traced = trace(task.model.train(), task.example_inputs)
    graph = build_graph(traced, propagate_values(traced))
    profiles = profile_measured(traced, graph, device="cuda", warmup=1, repeats=2, progress=False)
    convolutions = [
        name
        for name, data in graph.nodes(data=True)
        if data["op"] == "call_module"
        and isinstance(traced.graph_module.get_submodule(data["target"]), nn.Conv2d)
    ]
    assert convolutions
    for name in convolutions:
        found = profiles[name]
        assert found.forward_ms > 0 and found.backward_ms > 0, name
        assert found.peak_bytes is not None and found.peak_bytes > 0, name


def test_generated_stages_on_the_gpu_match_the_original(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SkipMLP().cuda()
    (x,), labels = _batch()
    x, labels = x.cuda(), labels.cuda()
    path = tmp_path / "net_p2.py"
    autopipe.compile(copy.deepcopy(model).cpu(), (x.cpu(),), n_stages=2, output=path)
    generated = load_generated(path)
    state = model.state_dict()
    stages = [generated.build_stage(i, state).cuda() for i in range(2)]
    values = {"x": x}
    for spec, stage in zip(generated.PIPELINE["stages"], stages):
        values.update(zip(spec["outputs"], stage(*(values[n] for n in spec["inputs"]))))
    found = values[generated.PIPELINE["model_outputs"][0]]
    expected = model(x)
    torch.testing.assert_close(found, expected)
    F.cross_entropy(found, labels).backward()
    F.cross_entropy(expected, labels).backward()
    merged = generated.merge_state_dicts(
        [{k: p.grad for k, p in s.named_parameters()} for s in stages]
    )
    for key, parameter in model.named_parameters():
        torch.testing.assert_close(merged[key], parameter.grad, msg=key)


def _train_original_on_cuda(model: nn.Module, inputs, labels) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(model).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(STEPS):
        F.cross_entropy(model(*(x.cuda() for x in inputs)), labels.cuda()).backward()
        optimizer.step()
        optimizer.zero_grad()
    return {k: v.cpu() for k, v in model.state_dict().items()}


def _run(tmp_path: Path, generated: Path, schedule: str, m: int) -> tuple[str, dict]:
    saved = tmp_path / f"trained_{schedule}.pt"
    result = launch(
        1, "--model", str(generated), "--schedule", schedule, "--microbatches", str(m),
        "--steps", str(STEPS), "--optimizer", "sgd", "--lr", str(LR), "--loss",
        "cross_entropy", "--no_dropout", "--data", f"tensors:{tmp_path / 'data.pt'}",
        "--init_checkpoint", str(tmp_path / "init.pt"), "--save_checkpoint", str(saved),
        "--device", "cuda",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, torch.load(saved)


def _prepare(tmp_path: Path, model: nn.Module, n_stages: int, schedule: str) -> Path:
    inputs, labels = _batch()
    path = tmp_path / f"net_{schedule}.py"
    options = PartitionOptions(cost=CostModel(schedule=schedule))
    autopipe.compile(model, inputs, n_stages=n_stages, output=path, options=options)
    torch.save(model.state_dict(), tmp_path / "init.pt")
    torch.save({"inputs": inputs, "labels": labels}, tmp_path / "data.pt")
    return path


def _train_on_the_gpu(tmp_path: Path, n_stages: int, schedule: str, m: int):
    """The original model, and the runtime's output and weights after training its file of
    ``n_stages`` stages in one process on NCCL."""
    torch.manual_seed(0)
    model = SkipMLP()
    generated = _prepare(tmp_path, model, n_stages, schedule)
    stdout, trained = _run(tmp_path, generated, schedule, m)
    assert "nccl, rank 0 on cuda:0" in stdout, stdout
    assert list(trained) == list(model.state_dict())
    return model, stdout, trained


def test_one_stage_pipeline_on_nccl_trains_like_the_original(tmp_path: Path) -> None:
    model, _, trained = _train_on_the_gpu(tmp_path, 1, "gpipe", 4)
    expected = _train_original_on_cuda(model, *_batch())
    for key, value in expected.items():
        torch.testing.assert_close(trained[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_wpipe_runs_two_stages_on_one_gpu(tmp_path: Path) -> None:
    model, stdout, trained = _train_on_the_gpu(tmp_path, 2, "wpipe", 2)
    losses = [float(line.split()[3]) for line in stdout.splitlines() if line.startswith("step ")]
    assert len(losses) == STEPS and all(loss == loss for loss in losses), stdout
    assert any(not torch.equal(trained[k], v) for k, v in model.state_dict().items())
