"""The measurement scripts in benchmarks/ that run in one process still run and print a row
per stage (their figures are timings, so only their shape is checked)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import REPO


def _run(script: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *flags],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_version_overhead_times_every_stage_three_ways(noisy: Path) -> None:
    result = _run("version_overhead.py", "--model", str(noisy / "noisy.py"), "--rounds", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    rows = [line.split() for line in lines if line.split() and line.split()[0].isdigit()]
    assert [row[0] for row in rows] == ["0", "1"]
    assert all(len(row) == 9 and all(float(x) >= 0 for x in row[1:]) for row in rows)
    assert sum(line.startswith(("swapped:", "recorded:")) for line in lines) == 2


def test_version_overhead_rejects_a_missing_file_in_one_line() -> None:
    result = _run("version_overhead.py", "--model", "no/such/file.py")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("version_overhead: error:")
    assert "Traceback" not in result.stderr
