"""The measurement scripts in benchmarks/ that run in one process still run and print a row
per stage (their figures are timings, so only their shape is checked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
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


def _event(tid: int, name: str, cat: str, ts_ms: float, dur_ms: float, waited_ms: float = 0.0):
    event = {"ph": "X", "tid": tid, "name": name, "cat": cat, "ts": ts_ms * 1e3,
             "dur": dur_ms * 1e3}  # fmt: skip
    if waited_ms:
        event["args"] = {"waited_ms": waited_ms}
    return event


def test_in_pipeline_reads_what_each_stage_computed_from_a_measured_trace(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from simulate_vs_measured import in_pipeline

    events = [
        # rank 0 runs stages 0 and 2 (named), rank 1 runs stage 1; the first action of each
        # rank is the warm-up left out
        _event(0, "0:F0", "forward", 0.0, 50.0),
        _event(0, "0:F1", "forward", 51.0, 3.0, waited_ms=1.0),
        _event(0, "2:B1", "backward", 54.5, 4.0),
        _event(0, "0:S", "step", 60.0, 2.0, waited_ms=1.5),
        _event(1, "F0", "forward", 0.0, 40.0),
        _event(1, "F1", "forward", 40.2, 5.0, waited_ms=4.0),
        _event(1, "B1", "backward", 45.4, 6.0),
        {"ph": "M", "name": "thread_name", "tid": 0, "args": {"name": "stage 0"}},
    ]
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    found = in_pipeline(trace, 3, 0.25)
    assert found.forward_ms == pytest.approx([2.0, 1.0, 0.0])
    assert found.backward_ms == pytest.approx([0.0, 6.0, 4.0])
    assert found.step_ms == pytest.approx([0.5, 0.0, 0.0])
    # between: stage 0 after 1.0 (F1) and 1.5 (S), stage 1 after 0.2 and 0.2, stage 2 after 0.5
    assert found.between_ms == pytest.approx([1.25, 0.2, 0.5])
