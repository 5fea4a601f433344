"""Shared helpers for the tests."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import autopipe

ASSETS = Path(__file__).resolve().parent / "assets"
REPO = Path(__file__).resolve().parent.parent
TORCHRUN_TIMEOUT_S = 180


@pytest.fixture
def user_models_file() -> Path:
    return ASSETS / "user_models.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(n_procs: int, *flags: str) -> subprocess.CompletedProcess:
    """``torchrun -m runtime`` with ``n_procs`` CPU processes over loopback, from the repo root."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
        "--nproc_per_node", str(n_procs), "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), "-m", "runtime", "--device", "cpu", *flags,
    ]  # fmt: skip
    return subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT_S, check=False
    )


class NoisyMLP(nn.Module):
    """An MLP with batch norm and dropout in both halves, so recomputation and resuming must
    replay random masks and keep running statistics exact."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.norm = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.3)
        self.hidden = nn.Linear(16, 16)
        self.drop2 = nn.Dropout(0.2)
        self.out = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(torch.relu(self.norm(self.inp(x))))
        return self.out(self.drop2(torch.relu(self.hidden(h))) + h)


@pytest.fixture(scope="module")
def noisy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """NoisyMLP in 2 stages, with its weights and a 32-sample data set saved beside it."""
    tmp_path = tmp_path_factory.mktemp("noisy")
    torch.manual_seed(0)
    model = NoisyMLP()
    autopipe.compile(model, (torch.randn(8, 8),), n_stages=2, output=tmp_path / "noisy.py")
    torch.save(model.state_dict(), tmp_path / "init.pt")
    inputs = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 5, (32,), generator=torch.Generator().manual_seed(2))
    torch.save({"inputs": (inputs,), "labels": labels}, tmp_path / "data.pt")
    return tmp_path
