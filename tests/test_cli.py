"""The command line: the main job, user errors as one-line messages, the sanity check."""

import subprocess
import sys
from pathlib import Path

import pytest

from autopipe import partition as cli
from autopipe.compiler import import_generated
from conftest import REPO


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_custom_task_with_fallback_leaf_passes_the_sanity_check(
    tmp_path: Path, capsys, caplog, user_models_file: Path
) -> None:
    output = tmp_path / "two_tower.py"
    code, out, err = _run(
        [
            "custom",
            "--task",
            f"{user_models_file}:two_tower",
            "-p",
            "3",
            "-o",
            str(output),
            "--sanity_check",
        ],
        capsys,
    )
    assert code == 0, err
    assert "sanity check passed" in out
    assert "kept gate as one layer" in caplog.text and "control flow" in caplog.text
    source = output.read_text()
    assert "from user_models import Gate" in source
    assert "Gate(16, threshold=0.5)" in source


@pytest.mark.parametrize(
    "argv, message",
    [
        (["vision", "--model", "no_such_model"], "unknown vision model 'no_such_model'"),
        (["vision", "--model", "vgg_tiny", "-p", "500", "-b", "2"], "500 stages is more than that"),
        (["custom", "--task", "missing.py:build"], "missing.py does not exist"),
        (["custom", "--task", "{assets}/user_models.py:untraceable"], "user_models.py:"),
        (
            ["custom", "--task", "{assets}/user_models.py:not_a_task"],
            "must return (model, example_inputs)",
        ),
        (
            ["custom", "--task", "{assets}/user_models.py:nothing_here"],
            "has no callable 'nothing_here'",
        ),
        (["vision", "--model", "vgg_tiny", "-b", "0"], "batch size must be at least 1"),
    ],
)
def test_user_errors_are_one_line(
    argv: list[str], message: str, capsys, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    argv = [a.replace("{assets}", str(REPO / "tests" / "assets")) for a in argv]
    code, out, err = _run(argv, capsys)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


def test_a_user_error_exits_non_zero_without_a_traceback(tmp_path: Path) -> None:
    process = subprocess.run(
        [sys.executable, "-m", "autopipe.partition", "nlp", "--model", "gpt3"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO), "PATH": ""},
        timeout=120,
    )
    assert process.returncode == 2
    assert process.stderr.startswith("autopipe: error: unknown nlp model 'gpt3'")
    assert "Traceback" not in process.stderr


def test_zoo_model_writes_the_default_file_name(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, _ = _run(
        ["nlp", "--model", "bert_tiny", "-p", "2", "-b", "2", "--seq_len", "16"], capsys
    )
    assert code == 0
    assert (tmp_path / "generated_models" / "bert_tiny_s16_p2_acyclic.py").is_file()
    assert "wrote generated_models/bert_tiny_s16_p2_acyclic.py" in out


def test_analysis_is_printed_and_embedded(tmp_path: Path, capsys) -> None:
    output = tmp_path / "vgg.py"
    code, out, _ = _run(
        [
            "vision",
            "--model",
            "vgg_tiny",
            "-p",
            "2",
            "-b",
            "4",
            "-o",
            str(output),
            "--microbatches",
            "8",
        ],
        capsys,
    )
    assert code == 0
    assert "lower bound" in out and "1f1b with 8 microbatches" in out
    docstring = output.read_text().split('"""')[1]
    assert "Analysis (predicted)" in docstring and "gpipe with 8 microbatches" in docstring


def test_analysis_only_writes_nothing_and_no_analysis_prints_none(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, _ = _run(
        ["vision", "--model", "vgg_tiny", "-p", "2", "-b", "4", "--analysis_only"], capsys
    )
    assert code == 0 and "lower bound" in out and "wrote" not in out
    assert not (tmp_path / "generated_models").exists()
    code, out, _ = _run(
        ["vision", "--model", "vgg_tiny", "-p", "2", "-b", "4", "--no_analysis"], capsys
    )
    assert code == 0 and "lower bound" not in out
    source = (tmp_path / "generated_models" / "vgg_tiny_c32_p2_acyclic.py").read_text()
    assert "Analysis (predicted)" not in source


def test_dot_writes_graphviz_and_svg(tmp_path: Path, capsys) -> None:
    code, out, _ = _run(
        [
            "vision",
            "--model",
            "vgg_tiny",
            "-p",
            "3",
            "-b",
            "2",
            "--analysis_only",
            "--dot",
            str(tmp_path / "picture"),
        ],
        capsys,
    )
    assert code == 0
    dot = (tmp_path / "picture.dot").read_text()
    assert dot.startswith("digraph partition") and "cluster_2" in dot and "label=" in dot
    assert (tmp_path / "picture.svg").read_text().lstrip().startswith("<?xml")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--memory_limit", "0.0001"], "GB, the limit is 0.00 GB"),
        (["--bw", "10", "20"], "several --bw values need -n"),
        (["-n", "2", "2", "--bw", "10"], "-n names 2 levels, --bw gives 1"),
        (["--microbatches", "0"], "--microbatches must be at least 1"),
        (["--stage_to_num_ranks", "0:3"], "-p is 2 but --stage_to_num_ranks lists 1 stage"),
        (["--stage_to_num_ranks", "0:0,1:1"], "stage 0 has 0 ranks; every stage needs at least 1"),
        (["--stage_to_num_ranks", "0:2,2:1"], "every stage from 0 to 2; stage 1 is missing"),
        (["--stage_to_num_ranks", "x"], "takes STAGE:RANKS pairs joined by commas"),
        (["--stage_to_num_ranks", "0:1,0:2"], "lists stage 0 twice"),
        (["--stage_to_num_ranks", "0:2,1:1", "--replication"], "pass one of them"),
        (
            ["--stage_to_num_ranks", "0:2,1:1", "-n", "2", "2", "--bw", "9", "1"],
            "-n 2 2 is 4 devices but --stage_to_num_ranks uses 3 ranks",
        ),
    ],
)
def test_cost_flag_mistakes_are_one_line(
    argv: list[str], message: str, capsys, tmp_path: Path
) -> None:
    code, _, err = _run(
        ["vision", "--model", "vgg_tiny", "-p", "2", "-b", "2", "--analysis_only", *argv], capsys
    )
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("method", ["pipedream", "acyclic", "metis", "params"])
def test_stage_to_num_ranks_fixes_the_replicas_in_the_file(
    method: str, tmp_path: Path, capsys
) -> None:
    output = tmp_path / "ranked.py"
    code, out, err = _run(
        [
            "vision",
            "--model",
            "vgg_tiny",
            "-b",
            "2",
            "--partitioning_method",
            method,
            "--stage_to_num_ranks",
            "0:3,1:1",
            "-o",
            str(output),
        ],
        capsys,
    )
    assert code == 0, err
    pipeline = import_generated(output).PIPELINE
    assert pipeline["n_stages"] == 2
    assert [stage["replicas"] for stage in pipeline["stages"]] == [3, 1]
    header, first, second = out.splitlines()[:3]
    assert header.split()[-1] == "replicas"
    assert first.split()[-1] == "3" and second.split()[-1] == "1"


def test_a_hierarchical_machine_is_named_in_the_analysis(tmp_path: Path, capsys) -> None:
    output = tmp_path / "servers.py"
    code, out, err = _run(
        ["vision", "--model", "vgg_tiny", "-b", "2", "-n", "2", "2", "--bw", "300", "1"]
        + ["-o", str(output)],
        capsys,
    )
    assert code == 0, err
    assert [row.split()[-1] for row in out.splitlines()[:5]] == ["GB/s", "300", "1", "300", "-"]
    docstring = output.read_text().split('"""')[1]
    assert "2 x 2 devices with 300 / 1 GB/s links per level (innermost first)" in docstring
