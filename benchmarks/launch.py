"""What the benchmarks share: running a command (a torchrun, a partitioning) as a measurement.

Each benchmark is a script run as ``python benchmarks/NAME.py``, so this file is importable
beside it as ``launch``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
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
