"""Models a user might bring, for the tests of `custom --task FILE.py:NAME`."""

import torch
from torch import nn


class Gate(nn.Module):
    """Control flow on a traced value: torch.fx cannot trace this, so it must become a leaf."""

    def __init__(self, width: int, threshold: float = 0.0) -> None:
        super().__init__()
        self.width = width
        self.threshold = threshold
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > self.threshold:
            return self.proj(x)
        return -self.proj(x)


class TwoTower(nn.Module):
    """Two keyword inputs, a gated branch, a skip across the model and a dict output."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.left = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
        self.right = nn.Sequential(nn.Linear(width, width), nn.Tanh())
        self.gate = Gate(width, threshold=0.5)
        self.head = nn.Linear(width, 4)
        self.scale = nn.Parameter(torch.ones(width))

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        a = self.left(image)
        b = self.right(text)
        mixed = self.gate(a * b) * self.scale + image
        return {"logits": self.head(mixed), "features": mixed}


def two_tower():
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "image": torch.randn(4, 16, generator=generator),
        "text": torch.randn(4, 16, generator=generator),
    }
    return TwoTower(), inputs


class RootBranches(nn.Module):
    """Control flow on a traced value in the root's own forward: nothing can be traced."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:
            return self.linear(x)
        return x


def untraceable():
    return RootBranches(), (torch.randn(2, 8),)


def not_a_task():
    return 42
