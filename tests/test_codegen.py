"""Generated files: standalone, deterministic, state-dict compatible, described by PIPELINE."""

import os
import re
import shlex
from pathlib import Path

import pytest
import torch
from torch import nn

import autopipe
from autopipe import partition as cli
from autopipe.tasks import zoo_task
from conftest import REPO


class Skip(nn.Module):
    """A skip connection from the first layer to the last, across every stage."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.layers[0](x)
        y = first
        for layer in self.layers[1:]:
            y = torch.relu(layer(y))
        return y + first


def _compile(
    tmp_path: Path,
    model: nn.Module,
    inputs,
    n_stages: int,
    name: str = "out.py",
    method: str = "acyclic",
):
    return autopipe.compile(model, inputs, n_stages, method=method, output=tmp_path / name)


def test_same_inputs_give_the_same_bytes(tmp_path: Path) -> None:
    task = zoo_task("nlp", "gpt2_tiny", 2)
    first = _compile(tmp_path, task.model, task.example_inputs, 3, "a.py").path.read_bytes()
    again = zoo_task("nlp", "gpt2_tiny", 2)
    second = _compile(tmp_path, again.model, again.example_inputs, 3, "b.py").path.read_bytes()
    assert first == second


def test_generated_file_imports_only_torch(tmp_path: Path) -> None:
    task = zoo_task("vision", "resnet_tiny", 2)
    source = _compile(tmp_path, task.model, task.example_inputs, 2).path.read_text()
    imports = [line for line in source.splitlines() if re.match(r"(import|from) ", line)]
    assert imports == ["import torch", "import torch.nn.functional as F", "from torch import nn"]


def test_state_dicts_round_trip(tmp_path: Path) -> None:
    task = zoo_task("nlp", "t5_tiny", 2)
    result = _compile(tmp_path, task.model, task.example_inputs, 4)
    original = task.model.state_dict()
    stage_dicts = [stage.state_dict() for stage in result.stages]
    for stage_dict in stage_dicts:
        assert set(stage_dict) <= set(original)
    merged = result.module.merge_state_dicts(stage_dicts)
    assert list(merged) == list(original)
    for key, value in original.items():
        assert torch.equal(merged[key], value), key


def test_fresh_stages_have_the_original_keys(tmp_path: Path) -> None:
    task = zoo_task("vision", "vit_tiny", 2)
    result = _compile(tmp_path, task.model, task.example_inputs, 3)
    fresh = result.module.build_stages()
    keys = [key for stage in fresh for key in stage.state_dict()]
    assert sorted(keys) == sorted(task.model.state_dict())
    for stage, spec in zip(fresh, result.pipeline["stages"]):
        assert set(stage.state_dict()) == set(spec["parameters"] + spec["buffers"])


def test_pipeline_describes_how_stages_connect(tmp_path: Path) -> None:
    result = _compile(tmp_path, Skip(), (torch.randn(4, 8),), 3, method="params")
    pipeline = result.pipeline
    stages = pipeline["stages"]
    assert stages[0]["inputs"] == pipeline["model_inputs"] == ["x"]
    assert stages[-1]["outputs"] == pipeline["model_outputs"]
    available = set(pipeline["model_inputs"])
    for index, stage in enumerate(stages):
        for name in stage["inputs"]:
            spec = stage["values"][name]
            assert name in available
            assert index in spec["consumers"]
            assert spec["producer"] is None if index == 0 else spec["producer"] < index
            assert {"shape", "dtype", "requires_grad", "batch_dim"} <= set(spec)
        available |= set(stage["outputs"])
    skip = "layers_0"
    assert skip in stages[0]["outputs"] and skip in stages[2]["inputs"]
    assert skip not in stages[1]["inputs"]
    assert (
        2 in stages[0]["values"][skip]["consumers"]
        and 1 not in stages[0]["values"][skip]["consumers"]
    )
    result.verify()


def test_tied_weights_across_stages_are_listed(tmp_path: Path) -> None:
    task = zoo_task("nlp", "gpt2_tiny", 2)
    result = _compile(tmp_path, task.model, task.example_inputs, 4)
    assert [[0, "wte.weight"], [3, "lm_head.weight"]] in result.pipeline["tied_parameters"]
    result.verify()


def test_tied_weights_within_a_stage_stay_one_tensor(tmp_path: Path) -> None:
    task = zoo_task("nlp", "gpt2_tiny", 2)
    result = _compile(tmp_path, task.model, task.example_inputs, 1)
    (stage,) = result.module.build_stages()
    assert stage.wte.weight is stage.lm_head.weight
    assert result.pipeline["tied_parameters"] == []


@pytest.mark.parametrize(
    "example", sorted((REPO / "generated_models").glob("*.py")), ids=lambda p: p.name
)
def test_committed_examples_regenerate_byte_for_byte(
    example: Path, tmp_path: Path, monkeypatch
) -> None:
    header = example.read_text().splitlines()[0]
    argv = shlex.split(header.removeprefix("# python -m autopipe.partition "))
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 0
    regenerated = tmp_path / "generated_models" / example.name
    assert regenerated.read_bytes() == example.read_bytes()


def test_committed_examples_exist() -> None:
    names = {p.name for p in (REPO / "generated_models").glob("*.py")}
    assert any(n.startswith("wrn_") for n in names) and any(n.startswith("gpt2") for n in names)
    assert os.path.isdir(REPO / "codegen_templates")
