"""Shared helpers for the tests."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest

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
