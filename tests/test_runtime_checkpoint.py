"""Tests of pipeline checkpoints: one process plays every rank by saving each stage in turn."""

from __future__ import annotations

import copy
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import autopipe
from runtime.checkpoint import (
    StageState,
    capture_rng,
    commit,
    latest_step,
    load_stage,
    main,
    merge,
    pipeline_meta,
    restore_rng,
    save_stage,
    stage_file,
    step_folder,
)
from runtime.stage import RuntimeConfigError, load_generated

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 120


class SharedLayer(nn.Module):
    """One layer used at both ends, so two stages hold it; declared out of execution order."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(16, 3)
        self.shared = nn.Linear(16, 16)
        self.body1 = nn.Linear(16, 256)
        self.body2 = nn.Linear(256, 256)
        self.body3 = nn.Linear(256, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.shared(x))
        h = self.body3(torch.relu(self.body2(torch.relu(self.body1(h)))))
        return self.head(torch.relu(self.shared(h)))


class TiedEmbedding(nn.Module):
    """An embedding whose weight is also the output layer's, under two keys."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.body1 = nn.Linear(16, 256)
        self.body2 = nn.Linear(256, 16)
        self.head = nn.Linear(16, 20, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body2(torch.relu(self.body1(self.emb(x))))))


def _trained(
    steps: int,
) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.StepLR]:
    """A small model after ``steps`` steps of Adam with a decaying learning rate."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    for _ in range(steps):
        _train_step(model, optimizer, scheduler)
    return model, optimizer, scheduler


def _train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.StepLR
) -> None:
    """One step on random data, so the RNG state matters as much as the weights."""
    model(torch.randn(5, 4)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()


def _state(step: int, model: dict, extra: dict | None = None) -> StageState:
    """A stage state with only weights, RNG and ``extra``."""
    return StageState(step, model, {}, None, capture_rng(), extra or {})


def _save_all(directory: Path, step: int, stage_dicts: list[dict], meta: dict | None = None):
    """Every rank saves its stage of ``step``, then rank 0 commits it."""
    for rank, state_dict in enumerate(stage_dicts):
        save_stage(directory, rank, len(stage_dicts), _state(step, state_dict))
    commit(directory, step, len(stage_dicts), meta or {})


def _weights(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((3,), value)}


def test_training_resumes_exactly_from_a_saved_stage(tmp_path: Path) -> None:
    model, optimizer, scheduler = _trained(3)
    state = StageState(
        step=3,
        model=model.state_dict(),
        optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(),
        rng=capture_rng(),
        extra={"samples_seen": 15},
    )
    save_stage(tmp_path, 0, 1, state)
    commit(tmp_path, 3, 1, {})
    for _ in range(2):
        _train_step(model, optimizer, scheduler)

    resumed, resumed_optimizer, resumed_scheduler = _trained(0)
    loaded = load_stage(tmp_path, 0, 1)
    resumed.load_state_dict(loaded.model)
    resumed_optimizer.load_state_dict(loaded.optimizer)
    resumed_scheduler.load_state_dict(loaded.scheduler)
    restore_rng(loaded.rng)
    for _ in range(2):
        _train_step(resumed, resumed_optimizer, resumed_scheduler)

    assert (loaded.step, loaded.extra) == (3, {"samples_seen": 15})
    assert resumed_scheduler.get_last_lr() == scheduler.get_last_lr()
    for key, value in model.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    for key, value in optimizer.state_dict()["state"][0].items():
        assert torch.equal(resumed_optimizer.state_dict()["state"][0][key], value), key


def test_restored_rng_repeats_the_same_random_numbers(tmp_path: Path) -> None:
    torch.manual_seed(1)
    dropout = nn.Dropout(0.5)
    save_stage(tmp_path, 0, 1, _state(7, _weights(0.0)))
    commit(tmp_path, 7, 1, {})
    expected = (torch.rand(6), dropout(torch.ones(20)))
    torch.rand(100)
    restore_rng(load_stage(tmp_path, 0, 1).rng)
    found = (torch.rand(6), dropout(torch.ones(20)))
    assert torch.equal(found[0], expected[0]) and torch.equal(found[1], expected[1])


def test_uncommitted_steps_and_leftover_temporary_files_are_ignored(tmp_path: Path) -> None:
    _save_all(tmp_path, 1, [_weights(1.0), _weights(2.0)])
    save_stage(tmp_path, 0, 2, _state(2, _weights(9.0)))
    save_stage(tmp_path, 1, 2, _state(2, _weights(9.0)))
    (step_folder(tmp_path, 2) / ".stage_1.pt.abc.tmp").write_bytes(b"half a file")
    (step_folder(tmp_path, 1) / ".stage_0.pt.abc.tmp").write_bytes(b"half a file")
    (tmp_path / ".latest.json.abc.tmp").write_text('{"step": 2')

    assert latest_step(tmp_path) == 1
    assert torch.equal(load_stage(tmp_path, 0, 2).model["w"], torch.full((3,), 1.0))
    assert torch.equal(load_stage(tmp_path, 1, 2).model["w"], torch.full((3,), 2.0))
    assert list(merge(tmp_path)) == ["w"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _save_all(tmp_path, 1, [_weights(1.0)])

    def crash_halfway(obj: object, stream) -> None:
        stream.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_halfway)
    with pytest.raises(OSError, match="disk full"):
        save_stage(tmp_path, 0, 1, _state(1, _weights(5.0)))
    monkeypatch.undo()
    assert [path.name for path in step_folder(tmp_path, 1).iterdir()] == ["stage_0.pt"]
    assert torch.equal(load_stage(tmp_path, 0, 1).model["w"], torch.full((3,), 1.0))


def test_commit_removes_older_steps(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        _save_all(tmp_path, step, [_weights(step), _weights(step)])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["latest.json", "step_00000003"]
    assert latest_step(tmp_path) == 3


def test_keep_last_keeps_complete_older_steps_only(tmp_path: Path) -> None:
    _save_all(tmp_path, 1, [_weights(1.0), _weights(1.0)])
    save_stage(tmp_path, 0, 2, _state(2, _weights(2.0)))
    for rank in range(2):
        save_stage(tmp_path, rank, 2, _state(3, _weights(3.0)))
    commit(tmp_path, 3, 2, {}, keep_last=2)
    assert sorted(path.name for path in tmp_path.glob("step_*")) == [
        "step_00000001",
        "step_00000003",
    ]


def test_commit_refuses_a_step_with_a_missing_stage(tmp_path: Path) -> None:
    _save_all(tmp_path, 1, [_weights(1.0), _weights(1.0)])
    save_stage(tmp_path, 0, 2, _state(2, _weights(2.0)))
    with pytest.raises(RuntimeConfigError, match="stage_1.pt is missing"):
        commit(tmp_path, 2, 2, {})
    assert latest_step(tmp_path) == 1
    assert stage_file(tmp_path, 1, 1).is_file()


def test_there_is_no_latest_step_before_a_commit(tmp_path: Path) -> None:
    assert latest_step(tmp_path / "absent") is None
    save_stage(tmp_path, 0, 1, _state(1, _weights(1.0)))
    assert latest_step(tmp_path) is None


def _break_stage_1(directory: Path) -> None:
    stage_file(directory, 4, 1).unlink()


def _damage_stage_1(directory: Path) -> None:
    stage_file(directory, 4, 1).write_bytes(b"not a checkpoint")


@pytest.mark.parametrize(
    ("n_stages", "alter", "message"),
    [
        (3, None, "written for 2 stages but the model has 3"),
        (2, _break_stage_1, "has no file for stage 1"),
        (2, _damage_stage_1, "cannot read stage file"),
    ],
)
def test_load_stage_rejects_a_checkpoint_that_does_not_fit(
    tmp_path: Path, n_stages: int, alter, message: str
) -> None:
    _save_all(tmp_path, 4, [_weights(1.0), _weights(2.0)])
    if alter is not None:
        alter(tmp_path)
    with pytest.raises(RuntimeConfigError, match=message) as raised:
        load_stage(tmp_path, 1, n_stages)
    assert "\n" not in str(raised.value)


def test_load_stage_without_a_checkpoint_says_so(tmp_path: Path) -> None:
    with pytest.raises(RuntimeConfigError, match="no committed checkpoint"):
        load_stage(tmp_path, 0, 1)
    with pytest.raises(RuntimeConfigError, match="no checkpoint folder"):
        load_stage(tmp_path / "absent", 0, 1)


def test_merge_keeps_the_first_copy_of_a_tied_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _save_all(tmp_path, 1, [{"a": torch.zeros(1), "w": torch.ones(2)}, {"w": torch.zeros(2)}])
    with caplog.at_level(logging.WARNING, logger="runtime.checkpoint"):
        merged = merge(tmp_path)
    assert list(merged) == ["a", "w"] and torch.equal(merged["w"], torch.ones(2))
    assert "tied w differs in stage 1" in caplog.text


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[nn.Module, Path]]:
    """Each test model with its generated two-stage file."""
    made = {}
    for model_class, inputs in (
        (SharedLayer, (torch.randn(4, 16),)),
        (TiedEmbedding, (torch.randint(0, 20, (4, 6)),)),
    ):
        torch.manual_seed(0)
        model = model_class()
        path = tmp_path_factory.mktemp("generated") / f"{model_class.__name__.lower()}.py"
        autopipe.compile(model, inputs, n_stages=2, output=path)
        made[model_class.__name__] = (model, path)
    return made


def _checkpoint_stages(directory: Path, model: nn.Module, path: Path, meta: dict) -> list[dict]:
    """Build the generated stages with ``model``'s weights and checkpoint them at step 5."""
    stages = load_generated(path).build_stages(model.state_dict())
    stage_dicts = [stage.state_dict() for stage in stages]
    _save_all(directory, 5, stage_dicts, meta)
    return stage_dicts


@pytest.mark.parametrize("name", ["SharedLayer", "TiedEmbedding"])
def test_merge_gives_the_original_state_dict_in_its_order(
    tmp_path: Path, compiled: dict, name: str
) -> None:
    model, path = compiled[name]
    pipeline = load_generated(path).PIPELINE
    _checkpoint_stages(tmp_path, model, path, pipeline_meta(path, pipeline))
    merged = merge(tmp_path)
    expected = model.state_dict()
    assert list(merged) == list(expected) == pipeline["state_keys"]
    for key, value in expected.items():
        assert torch.equal(merged[key], value), key


def test_the_shared_layer_really_is_in_both_stages_and_out_of_order(
    tmp_path: Path, compiled: dict
) -> None:
    """Without the model file merge falls back to stage order, which differs here: so the
    test above shows that merge follows ``state_keys`` and keeps one copy of the shared layer."""
    model, path = compiled["SharedLayer"]
    stage_dicts = _checkpoint_stages(tmp_path, model, path, {})
    assert all("shared.weight" in state_dict for state_dict in stage_dicts)
    by_stage = merge(tmp_path)
    assert sorted(by_stage) == sorted(model.state_dict())
    assert list(by_stage) != list(model.state_dict())
    assert list(merge(tmp_path, path)) == list(model.state_dict())


def test_merge_rejects_a_model_file_the_checkpoint_does_not_fit(
    tmp_path: Path, compiled: dict
) -> None:
    model, path = compiled["SharedLayer"]
    _checkpoint_stages(tmp_path, model, path, {})
    with pytest.raises(RuntimeConfigError, match="lacks 'emb.weight'"):
        merge(tmp_path, compiled["TiedEmbedding"][1])
    one_stage = {"model": "x", "stages": [{}], "state_keys": ["w"]}
    with pytest.raises(RuntimeConfigError, match="written for 2 stages but the model has 1"):
        merge(tmp_path, one_stage)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "runtime.checkpoint", *args],
        cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
    )  # fmt: skip


def test_cli_merge_writes_a_state_dict_the_original_model_loads(
    tmp_path: Path, compiled: dict
) -> None:
    model, path = compiled["TiedEmbedding"]
    pipeline = load_generated(path).PIPELINE
    _checkpoint_stages(tmp_path / "ckpt", model, path, pipeline_meta(path, pipeline))
    output = tmp_path / "model.pt"
    result = _cli("merge", str(tmp_path / "ckpt"), "-o", str(output))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"wrote {output}: 6 tensors from step 5 of 2 stages\n"
    fresh = copy.deepcopy(model)
    for parameter in fresh.parameters():
        nn.init.zeros_(parameter)
    fresh.load_state_dict(torch.load(output), strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert [item.name for item in tmp_path.iterdir() if item.name.endswith(".tmp")] == []


CLI_ERRORS = [
    (["merge", "{tmp}/absent", "-o", "{tmp}/m.pt"], "no checkpoint folder"),
    (["merge", "{tmp}", "-o", "{tmp}/m.pt"], "no committed checkpoint"),
    (["merge", "{ckpt}", "-o", "{tmp}/no/such/m.pt"], "no folder"),
    (["merge", "{ckpt}", "-o", "{tmp}/m.pt", "--model", "{tmp}/x.py"], "no generated model"),
    (["merge", "{ckpt}"], "required: -o/--output"),
    (["split"], "invalid choice: 'split'"),
]


def _error_case(tmp_path: Path, args: list[str]) -> list[str]:
    """A one-stage checkpoint under ``tmp_path/ckpt`` and ``args`` pointing into ``tmp_path``."""
    _save_all(tmp_path / "ckpt", 1, [_weights(1.0)])
    return [arg.format(tmp=tmp_path, ckpt=tmp_path / "ckpt") for arg in args]


def _assert_one_line_error(code: int | str | None, stderr: str, message: str) -> None:
    assert code == 2, stderr
    assert stderr.strip().splitlines() == [stderr.strip()]
    assert stderr.startswith("runtime.checkpoint: error:") and message in stderr


@pytest.mark.parametrize(("args", "message"), CLI_ERRORS)
def test_cli_user_errors_exit_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(_error_case(tmp_path, args))
    _assert_one_line_error(exited.value.code, capsys.readouterr().err, message)
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize(("args", "message"), [CLI_ERRORS[1], CLI_ERRORS[4]])
def test_cli_user_errors_print_no_traceback_from_python_m(
    tmp_path: Path, args: list[str], message: str
) -> None:
    result = _cli(*_error_case(tmp_path, args))
    _assert_one_line_error(result.returncode, result.stderr, message)
