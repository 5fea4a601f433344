"""Tracing: the leaf policy and the automatic fallback to leaves."""

import pytest
import torch
from torch import nn

from autopipe.errors import UserError
from autopipe.trace import is_torch_layer, trace


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.linear(x)) + x


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(int(x.abs().sum().item()) % 3 + 1):
            x = self.linear(x)
        return x


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(Block(), Block())
        self.odd = Branchy()
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, scale: float = 2.0) -> torch.Tensor:
        return self.head(self.odd(self.stem(x)) * scale)


def _module_targets(result) -> list[str]:
    return [n.target for n in result.graph_module.graph.nodes if n.op == "call_module"]


def test_torch_layers_are_leaves_and_containers_are_not() -> None:
    assert is_torch_layer(nn.Conv2d(1, 1, 1))
    assert not is_torch_layer(nn.Sequential())
    assert not is_torch_layer(Block())


def test_untraceable_submodule_becomes_a_leaf_with_a_reason() -> None:
    result = trace(Net(), (torch.randn(2, 4),))
    assert set(result.auto_leaves) == {"odd"}
    assert "item" in result.auto_leaves["odd"] or "control flow" in result.auto_leaves["odd"]
    assert "odd" in _module_targets(result)
    assert "stem.0.linear" in _module_targets(result)


def test_depth_and_basic_blocks_make_leaves() -> None:
    top_level = trace(Net(), (torch.randn(2, 4),), depth=0)
    assert _module_targets(top_level) == ["stem", "odd", "head"]
    one_down = trace(Net(), (torch.randn(2, 4),), depth=1)
    assert _module_targets(one_down) == ["stem.0", "stem.1", "odd", "head"]
    by_class = trace(Net(), (torch.randn(2, 4),), basic_blocks=["Block"])
    assert _module_targets(by_class)[:2] == ["stem.0", "stem.1"]


def test_default_arguments_are_fixed_and_not_inputs() -> None:
    result = trace(Net(), (torch.randn(2, 4),))
    placeholders = [n.target for n in result.graph_module.graph.nodes if n.op == "placeholder"]
    assert placeholders == ["x"]
    assert result.input_names == ["x"]


def test_traced_module_computes_what_the_model_computes() -> None:
    model = Net().eval()
    x = torch.randn(3, 4)
    result = trace(model, {"x": x})
    torch.testing.assert_close(result.graph_module(x), model(x))


def test_root_that_cannot_be_traced_names_the_line() -> None:
    class Root(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:
                return x
            return -x

    with pytest.raises(UserError, match=r"test_trace.py:\d+: if x.sum\(\) > 0"):
        trace(Root(), (torch.randn(2),))


def test_inputs_that_do_not_fit_forward_are_user_errors() -> None:
    with pytest.raises(UserError, match="no parameter 'y'"):
        trace(Net(), {"y": torch.randn(2, 4)})
    with pytest.raises(UserError, match="takes 2 inputs"):
        trace(Net(), (torch.randn(2, 4), 1.0, 3))
