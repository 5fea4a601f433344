"""What the benchmarks share: running a command (a torchrun, a partitioning) as a measurement.

Each benchmark is a script run as ``python benchmarks/NAME.py``, so this file is importable
beside it as ``launch``.
"""

from __future__ import annotations

import os
import re
import signal
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# a rank's own one-line error, or the last line of a Python traceback
ERROR_LINE = re.compile(r"(runtime: error: .*|\b\w*(Error|Exception): .*)")


class BenchmarkError(Exception):
    """A run that failed or flags that cannot work, with a one-line reason."""


def failure_reason(output: str) -> str:
    """The run's own error line if there is one (not torchrun's summary), else its last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    found = [m.group(1) for line in lines if (m := ERROR_LINE.search(line))]
    own = [line for line in found if "ChildFailedError" not in line]
    return own[0] if own else lines[-1] if lines else "no output"


def run_measured(
    label: str, command: list[str], threads: int, timeout: float
) -> subprocess.CompletedProcess:
    """Run ``command`` from the repository with ``threads`` OpenMP threads per process, in its
    own process group, killed whole on timeout; a failure is a :class:`BenchmarkError`."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise BenchmarkError(f"{label} took over {timeout:.0f} s (raise --timeout)") from None
    if process.returncode != 0:
        reason = failure_reason(stderr or stdout)
        raise BenchmarkError(f"{label} failed (exit {process.returncode}): {reason}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


# the runtime's per-step line: step, loss and samples/s
STEP_LINE = re.compile(r"^step (\d+)\b.* loss (\S+)\b.* samples/s (\S+)")


@dataclass(frozen=True)
class Figures:
    """One run's throughput over its measured steps."""

    label: str
    samples_per_s: float
    median_samples_per_s: float
    first_loss: float
    last_loss: float


def torchrun(n_procs: int) -> list[str]:
    """torchrun on a free port, so other jobs on this machine do not collide with ours."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*launcher, "--nproc_per_node", str(n_procs)]


def figures(label: str, stdout: str, batch: int, warmup: int) -> Figures:
    """Samples over total time of the steps after ``warmup``, from the printed step lines."""
    steps = [
        (int(m.group(1)), float(m.group(2)), float(m.group(3)))
        for m in map(STEP_LINE.search, stdout.splitlines())
        if m
    ]
    measured = [(loss, rate) for step, loss, rate in steps if step >= warmup]
    if not measured:
        raise BenchmarkError(f"{label} printed no step lines after the {warmup} warm-up steps")
    seconds = sum(batch / rate for _, rate in measured)
    rates = [rate for _, rate in measured]
    return Figures(
        label,
        batch * len(measured) / seconds,
        statistics.median(rates),
        first_loss=steps[0][1],
        last_loss=steps[-1][1],
    )
