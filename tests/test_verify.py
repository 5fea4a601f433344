"""The transparency check itself must catch a partitioned model that computes something else."""

from pathlib import Path

import pytest
import torch
from torch import nn

import autopipe
from autopipe.verify import verify


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Dropout(0.5), nn.Linear(6, 3)
    )


def test_a_wrong_weight_is_named_with_its_stage(tmp_path: Path) -> None:
    model = _mlp()
    result = autopipe.compile(model, (torch.randn(4, 6),), 2, output=tmp_path / "mlp.py")
    build = result.module.build_stages

    def tampered(state_dict=None):
        stages = build(state_dict)
        with torch.no_grad():
            stages[1].get_submodule("4").bias.add_(1.0)
        return stages

    result.module.build_stages = tampered
    with pytest.raises(autopipe.VerificationError, match=r"output .* \(stage 1\) differs"):
        result.verify()


def test_a_wrong_gradient_is_named_with_its_stage(tmp_path: Path) -> None:
    model = _mlp()
    result = autopipe.compile(model, (torch.randn(4, 6),), 2, output=tmp_path / "mlp.py")
    build = result.module.build_stages

    def scaled_gradient(state_dict=None):
        stages = build(state_dict)
        stages[0].get_submodule("0").weight.register_hook(lambda g: g * 2)
        return stages

    result.module.build_stages = scaled_gradient
    with pytest.raises(
        autopipe.VerificationError, match=r"gradient of '0.weight' \(stage 0\) differs"
    ):
        verify(model, (torch.randn(4, 6),), result.module)


def test_verify_leaves_the_users_model_untouched(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = autopipe.compile(model, (torch.randn(8, 4),), 2, output=tmp_path / "bn.py")
    report = result.verify()
    assert report.buffers == 3
    assert all(p.grad is None for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
