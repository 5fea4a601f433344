"""Tests for runtime.schedule: schedules as data, checked against a stage graph."""

import importlib.util
import re
import subprocess
import sys
from types import ModuleType

import pytest
from conftest import REPO

from runtime.schedule import (
    ASYNC_SCHEDULES,
    SCHEDULE_NAMES,
    SCHEDULES,
    Action,
    Schedule,
    ScheduleError,
    build_schedule,
    chain_dependencies,
    gpipe,
    one_f_one_b,
    optimizer_steps,
    peak_in_flight,
    pipedream,
    simulate,
    stage_dependencies,
    validate,
)


def text(actions: tuple[Action, ...]) -> str:
    """A stage's actions as compact text, e.g. "F0 F1 B1 B0 S"."""
    return " ".join(str(action) for action in actions)


def skip_dependencies(n_stages: int) -> dict[int, set[int]]:
    """A chain plus a skip connection from stage 0 to stage 2."""
    dependencies = chain_dependencies(n_stages)
    dependencies[2].add(0)
    return dependencies


def load_generated(name: str) -> ModuleType:
    """Import a generated model file by path, as the runtime will."""
    spec = importlib.util.spec_from_file_location(name, REPO / "generated_models" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stage_schedule(
    name: str, actions: list[list[str]], n_microbatches: int | None = None
) -> Schedule:
    """A hand-made schedule from text like [["F0", "B0", "S"], ...], one list per stage.

    ``n_microbatches`` defaults to the most forwards on any stage.
    """

    def parse(stage: int, word: str) -> Action:
        return Action(word[0], stage, int(word[1:]) if word[1:] else None)

    if n_microbatches is None:
        n_microbatches = max(sum(word.startswith("F") for word in row) for row in actions)
    rows = tuple(tuple(parse(stage, word) for word in row) for stage, row in enumerate(actions))
    return Schedule(name, len(actions), n_microbatches, rows)


def test_action_text() -> None:
    assert str(Action("F", 1, 3)) == "F3"
    assert str(Action("B", 0, 0)) == "B0"
    assert str(Action("S", 2, None)) == "S"


def test_action_rejects_bad_kind_and_step_with_microbatch() -> None:
    with pytest.raises(ScheduleError, match="kind"):
        Action("W", 0, 1)
    with pytest.raises(ScheduleError, match="step has no microbatch"):
        Action("S", 0, 1)
    with pytest.raises(ScheduleError, match="need one"):
        Action("F", 0, None)


def test_gpipe_actions_p4_m8() -> None:
    schedule = gpipe(4, 8)
    expected = "F0 F1 F2 F3 F4 F5 F6 F7 B7 B6 B5 B4 B3 B2 B1 B0 S"
    assert text(schedule.actions[0]) == expected
    assert text(schedule.actions[3]) == expected
    assert all(action.stage == 3 for action in schedule.actions[3])


def test_one_f_one_b_actions_p4_m8() -> None:
    schedule = one_f_one_b(4, 8)
    assert text(schedule.actions[0]) == "F0 F1 F2 F3 B0 F4 B1 F5 B2 F6 B3 F7 B4 B5 B6 B7 S"
    assert text(schedule.actions[3]) == "F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5 F6 B6 F7 B7 S"


def test_one_f_one_b_with_fewer_microbatches_than_stages() -> None:
    schedule = one_f_one_b(4, 2)
    assert text(schedule.actions[0]) == "F0 F1 B0 B1 S"
    assert text(schedule.actions[2]) == "F0 F1 B0 B1 S"
    assert text(schedule.actions[3]) == "F0 B0 F1 B1 S"


def test_registry_and_names() -> None:
    assert SCHEDULES == {"gpipe": gpipe, "1f1b": one_f_one_b}
    assert [make(2, 3).name for make in SCHEDULES.values()] == ["gpipe", "1f1b"]
    assert SCHEDULE_NAMES == ("gpipe", "1f1b", *ASYNC_SCHEDULES)
    assert SCHEDULE_NAMES[2:] == ("pipedream", "stale", "2bw", "pipeoptim", "wpipe")


def test_build_schedule_covers_a_batch_or_a_whole_run() -> None:
    assert build_schedule("1f1b", 2, 3, steps=5) == one_f_one_b(2, 3)
    assert optimizer_steps(gpipe(2, 3), 5) == 5
    run = build_schedule("pipedream", 2, 3, steps=5)
    assert run == pipedream(2, 15) and optimizer_steps(run, 5) == 15
    assert build_schedule("pipedream", 2, 3, 5, vertical_sync=True).name == "pipedream-vs"
    two_bw = build_schedule("2bw", 2, 3, steps=5)
    assert (two_bw.n_microbatches, two_bw.microbatches_per_step) == (15, 3)
    assert optimizer_steps(two_bw, 5) == 5
    for name in ("stale", "pipeoptim"):
        assert build_schedule(name, 2, 3, steps=5).n_microbatches == 15
    with pytest.raises(ScheduleError, match="vertical sync is an option of pipedream, not of 2bw"):
        build_schedule("2bw", 2, 3, 5, vertical_sync=True)
    with pytest.raises(ScheduleError, match="unknown schedule 'zigzag'; choose from gpipe, 1f1b"):
        build_schedule("zigzag", 2, 3)
    with pytest.raises(ScheduleError, match="n_microbatches"):
        build_schedule("stale", 2, 0, steps=5)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_generators_reject_empty_pipelines(name: str) -> None:
    with pytest.raises(ScheduleError, match="n_stages"):
        SCHEDULES[name](0, 4)
    with pytest.raises(ScheduleError, match="n_microbatches"):
        SCHEDULES[name](4, 0)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_validate_passes_for_chains_and_skips(name: str) -> None:
    for p in range(1, 7):
        for m in range(1, 9):
            schedule = SCHEDULES[name](p, m)
            graphs = [chain_dependencies(p)] + ([skip_dependencies(p)] if p > 2 else [])
            for dependencies in graphs:
                simulation = validate(schedule, dependencies)
                assert simulation.steps == 2 * (m + p - 1) + 1, (name, p, m)
                assert schedule.validate(dependencies) == simulation


def test_simulation_start_steps() -> None:
    simulation = gpipe(2, 2).validate(chain_dependencies(2))
    assert simulation.start[Action("F", 1, 0)] == 1
    assert simulation.start[Action("B", 0, 1)] == 4
    assert simulation.start[Action("S", 0, None)] == 6


def test_validate_catches_backward_before_forward() -> None:
    schedule = stage_schedule(
        "swapped",
        [["F0", "F1", "F2", "B2", "B1", "B0", "S"], ["F0", "F1", "B2", "F2", "B1", "B0", "S"]],
    )
    with pytest.raises(ScheduleError, match="^stage 1: B2 comes before F2$"):
        validate(schedule, chain_dependencies(2))


def test_validate_catches_step_before_backward() -> None:
    schedule = stage_schedule("early step", [["F0", "B0", "S"], ["F0", "S", "B0"]])
    with pytest.raises(ScheduleError, match="^stage 1: S comes before B0$"):
        validate(schedule, chain_dependencies(2))


def test_validate_catches_missing_backward() -> None:
    schedule = stage_schedule("missing", [["F0", "F1", "B1", "B0", "S"], ["F0", "F1", "B1", "S"]])
    with pytest.raises(ScheduleError, match="^stage 1 never runs B0$"):
        validate(schedule, chain_dependencies(2))


def test_validate_catches_duplicate_and_out_of_range_actions() -> None:
    duplicate = stage_schedule("twice", [["F0", "F0", "B0", "S"]], n_microbatches=1)
    with pytest.raises(ScheduleError, match="^stage 0 runs F0 2 times$"):
        validate(duplicate, chain_dependencies(1))
    beyond = stage_schedule("beyond", [["F0", "F1", "B1", "B0", "S"]], n_microbatches=1)
    with pytest.raises(ScheduleError, match="runs F1, but the schedule has 1 microbatches"):
        validate(beyond, chain_dependencies(1))


def test_validate_catches_deadlock() -> None:
    # Stage 0 waits for stage 1's B0 before sending F1, but stage 1 wants F1 before B0.
    schedule = stage_schedule(
        "deadlock", [["F0", "B0", "F1", "B1", "S"], ["F0", "F1", "B0", "B1", "S"]]
    )
    message = (
        "deadlock at step 2: stage 0 waits for B0 on stage 1, which never runs "
        "(device 1 is stuck at F1)"
    )
    with pytest.raises(ScheduleError, match=f"^{re.escape(message)}$"):
        validate(schedule, chain_dependencies(2))


def test_validate_catches_a_cyclic_stage_graph() -> None:
    schedule = gpipe(3, 1)
    with pytest.raises(ScheduleError, match="stage 0 waits for F0 on stage 2, which never runs"):
        validate(schedule, {0: {2}, 1: {0}, 2: {1}})


def test_validate_rejects_unknown_stages_in_dependencies() -> None:
    with pytest.raises(ScheduleError, match="name stage 3, but the schedule has 2 stages"):
        validate(gpipe(2, 2), {0: set(), 1: {0}, 3: {1}})


def test_simulate_names_an_action_missing_from_the_schedule() -> None:
    schedule = stage_schedule("no forward", [["B0", "S"], ["F0", "B0", "S"]])
    message = "stage 0 waits for F0 on stage 0, which never runs (it is not in the schedule)"
    with pytest.raises(ScheduleError, match=re.escape(message)):
        simulate(schedule, chain_dependencies(2))


def test_grid_p2_m2() -> None:
    assert gpipe(2, 2).grid() == "stage 0  F0 F1 .  .  B1 B0 S\nstage 1  .  F0 F1 B1 B0 S  ."
    assert one_f_one_b(2, 2).grid() == "stage 0  F0 F1 .  B0 .  B1 S\nstage 1  .  F0 B0 F1 B1 S  ."


def test_grid_raises_on_deadlock() -> None:
    schedule = stage_schedule("deadlock", [["F0", "B0", "S"], ["B0", "F0", "S"]])
    with pytest.raises(ScheduleError, match="deadlock"):
        schedule.grid()


def test_peak_in_flight() -> None:
    for p in range(1, 7):
        for m in range(1, 9):
            assert peak_in_flight(gpipe(p, m)) == [m] * p
            assert peak_in_flight(one_f_one_b(p, m)) == [min(p - s, m) for s in range(p)]


def test_stage_dependencies_of_a_generated_file() -> None:
    pipeline = load_generated("gpt2_s512_p4_acyclic").PIPELINE
    dependencies = stage_dependencies(pipeline)
    assert dependencies == {0: set(), 1: {0}, 2: {1}, 3: {2}}
    for name in SCHEDULES:
        validate(SCHEDULES[name](4, 8), dependencies)


def value(producer: int | None) -> dict:
    """A PIPELINE value entry with only the field the dependencies read."""
    return {"producer": producer}


def test_stage_dependencies_with_a_skip_and_a_model_input() -> None:
    pipeline = {
        "stages": [
            {"inputs": ["x"], "values": {"x": value(None)}},
            {"inputs": ["a"], "values": {"a": value(0)}},
            {
                "inputs": ["b", "a", "mask"],
                "values": {"a": value(0), "b": value(1), "mask": value(None)},
            },
        ]
    }
    assert stage_dependencies(pipeline) == {0: set(), 1: {0}, 2: {0, 1}}


def test_stage_dependencies_rejects_a_later_producer() -> None:
    pipeline = {
        "stages": [
            {"inputs": ["b"], "values": {"b": value(1)}},
            {"inputs": [], "values": {}},
        ]
    }
    with pytest.raises(ScheduleError, match="stage 0 receives 'b' from stage 1"):
        stage_dependencies(pipeline)


def test_schedule_module_does_not_import_the_compiler() -> None:
    code = "import sys, runtime.schedule; assert 'autopipe' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
