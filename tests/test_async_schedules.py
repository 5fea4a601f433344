"""Tests for the asynchronous schedules of runtime.schedule: which weight version every forward
and backward uses on every stage, and how many versions each stage keeps."""

import pytest

from runtime.schedule import (
    ASYNC_SCHEDULES,
    SCHEDULES,
    Action,
    Schedule,
    ScheduleError,
    chain_dependencies,
    gpipe,
    one_f_one_b,
    peak_in_flight,
    pipedream,
    pipeoptim,
    simulate,
    stale,
    two_bw,
    validate,
    weight_versions,
    wpipe,
)

P, N = 4, 8


def versions(schedule: Schedule, kind: str) -> list[list[int]]:
    """versions(...)[s][i]: the version stage s uses for the ``kind`` of microbatch i."""
    table = [[-1] * schedule.n_microbatches for _ in range(schedule.n_stages)]
    for actions in schedule.actions:
        for action in actions:
            if action.kind == kind:
                table[action.stage][action.microbatch] = action.version
    return table


def steps_before(schedule: Schedule, kind: str) -> list[list[int]]:
    """steps_before(...)[s][i]: how many steps stage s ran before the ``kind`` of microbatch i."""
    table = [[-1] * schedule.n_microbatches for _ in range(schedule.n_stages)]
    for actions in schedule.actions:
        steps = 0
        for action in actions:
            steps += action.kind == "S"
            if action.kind == kind:
                table[action.stage][action.microbatch] = steps
    return table


def text(actions: tuple[Action, ...]) -> str:
    return " ".join(str(action) for action in actions)


def all_async(p: int, n: int) -> list[Schedule]:
    """Every asynchronous schedule for p stages and n microbatches (2bw at m = p when it fits)."""
    schedules = [pipedream(p, n), pipedream(p, n, vertical_sync=True), stale(p, n), pipeoptim(p, n)]
    return schedules + ([two_bw(p, n, p)] if n % p == 0 else [])


def test_pipedream_order_p4_n8() -> None:
    schedule = pipedream(P, N)
    assert text(schedule.actions[0]) == (
        "F0@0 F1@0 F2@0 F3@0 B0@0 S F4@1 B1@0 S F5@2 B2@0 S F6@3 B3@0 S F7@4 B4@1 S "
        "B5@2 S B6@3 S B7@4 S"
    )
    assert text(schedule.actions[3]) == " ".join(f"F{i}@{i} B{i}@{i} S" for i in range(N))
    assert schedule.microbatches_per_step == 1


def test_pipedream_forward_uses_newest_and_backward_the_same_version() -> None:
    schedule = pipedream(P, N)
    forward, backward = versions(schedule, "F"), versions(schedule, "B")
    assert forward == steps_before(schedule, "F")
    assert backward == forward
    assert forward == [[max(0, i - (P - s - 1)) for i in range(N)] for s in range(P)]
    assert backward != steps_before(schedule, "B")


def test_vertical_sync_uses_stage_zeros_version_everywhere() -> None:
    schedule = pipedream(P, N, vertical_sync=True)
    first = [max(0, i - (P - 1)) for i in range(N)]
    assert versions(schedule, "F") == [first] * P
    assert versions(schedule, "B") == [first] * P
    assert versions(schedule, "F")[0] == versions(pipedream(P, N), "F")[0]
    assert schedule.name == "pipedream-vs"


def test_stale_computes_with_the_weights_current_at_each_action() -> None:
    schedule = stale(P, N)
    assert versions(schedule, "F") == steps_before(schedule, "F")
    assert versions(schedule, "B") == steps_before(schedule, "B")
    assert versions(schedule, "B")[0] == list(range(N))
    assert versions(schedule, "F")[0] == [0, 0, 0, 0, 1, 2, 3, 4]
    differ = [i for i in range(N) if versions(schedule, "F")[0][i] != i]
    assert differ == list(range(1, N))


def test_two_bw_uses_the_version_before_last_for_a_whole_batch() -> None:
    m, n = 4, 16
    schedule = two_bw(P, n, m)
    expected = [max(0, i // m - 1) for i in range(n)]
    assert versions(schedule, "F") == [expected] * P
    assert versions(schedule, "B") == [expected] * P
    assert schedule.microbatches_per_step == m
    for actions in schedule.actions:
        assert [a.version for a in actions if a.kind == "S"] == [1, 2, 3, 4]
        backwards = [i for i, a in enumerate(actions) if a.kind == "B"]
        steps = [i for i, a in enumerate(actions) if a.kind == "S"]
        assert steps == [backwards[k * m + m - 1] + 1 for k in range(n // m)]


def test_two_bw_p4_n8() -> None:
    schedule = two_bw(P, N, P)
    assert versions(schedule, "F") == [[0] * N] * P
    assert text(schedule.actions[0]).endswith("B3@0 S F7@0 B4@0 B5@0 B6@0 B7@0 S")


def test_two_bw_rejects_fewer_microbatches_per_batch_than_stages() -> None:
    with pytest.raises(ScheduleError, match=r"m >= p\); got 3 for 4 stages.*at least 4"):
        two_bw(P, 12, 3)
    with pytest.raises(ScheduleError, match="must be a multiple of 4; got 10"):
        two_bw(P, 10, 4)


def test_pipeoptim_predicts_p_minus_s_minus_1_steps() -> None:
    schedule = pipeoptim(P, N)
    for actions in schedule.actions:
        for action in actions:
            if action.kind == "F":
                assert action.predict == P - action.stage - 1
            else:
                assert action.predict == 0
    assert versions(schedule, "F") == steps_before(schedule, "F")
    assert versions(schedule, "B") == steps_before(schedule, "B")
    assert str(schedule.actions[0][4]) == "B0@0"
    assert str(schedule.actions[0][6]) == "F4@1+3"


def test_versions_kept_per_stage() -> None:
    assert weight_versions(pipedream(P, N)) == [P - s for s in range(P)]
    assert weight_versions(two_bw(P, 16, P)) == [2] * P
    assert weight_versions(stale(P, N)) == [1] * P
    assert weight_versions(pipeoptim(P, N)) == [1] * P
    assert weight_versions(gpipe(P, N)) == [1] * P
    assert weight_versions(one_f_one_b(P, N)) == [1] * P


def test_vertical_sync_keeps_the_versions_it_will_use() -> None:
    # The last stage makes versions it uses only p - 1 microbatches later.
    assert weight_versions(pipedream(P, N, vertical_sync=True)) == [P] * P


def test_pipedream_versions_kept_in_short_and_long_runs() -> None:
    # p - s is the steady state, reached once a run has 2p - 1 microbatches.
    for n in range(2 * P - 1, 3 * P):
        assert weight_versions(pipedream(P, n)) == [P - s for s in range(P)]
    assert weight_versions(pipedream(P, 1)) == [1] * P
    assert weight_versions(pipedream(P, 3)) == [2, 2, 2, 1]


def test_peak_in_flight_of_async_schedules() -> None:
    for schedule in all_async(P, N):
        assert peak_in_flight(schedule) == [P - s for s in range(P)], schedule.name


@pytest.mark.parametrize("p", range(1, 6))
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 12])
def test_async_schedules_validate(p: int, n: int) -> None:
    for schedule in all_async(p, n):
        steps = n // (schedule.microbatches_per_step or n)
        simulation = validate(schedule, chain_dependencies(p))
        assert simulation == schedule.validate(chain_dependencies(p))
        for actions in schedule.actions:
            assert sum(a.kind == "S" for a in actions) == steps


def test_grid_prints_versions() -> None:
    assert pipedream(2, 3).grid() == (
        "stage 0  F0@0 F1@0 .    B0@0 S    F2@1 B1@0 S    .    B2@1 S\n"
        "stage 1  .    F0@0 B0@0 S    F1@1 B1@1 S    F2@2 B2@2 S    ."
    )
    assert len(pipeoptim(P, N).grid().splitlines()) == P


def test_simulation_finds_versioned_actions_by_their_work() -> None:
    simulation = simulate(pipedream(2, 3), chain_dependencies(2))
    assert simulation.start[Action("F", 1, 0)] == 1
    assert simulation.start[Action("S", 0, None, 2)] == 7
    assert Action("F", 0, 1, 2) == Action("F", 0, 1)
    assert Action("S", 0, None, 1) != Action("S", 0, None, 2)


def test_action_text_unchanged_without_version() -> None:
    assert str(Action("F", 1, 3)) == "F3"
    assert str(Action("F", 1, 3, 1)) == "F3@1"
    assert str(Action("F", 1, 3, 1, predict=2)) == "F3@1+2"
    assert str(Action("S", 1, None, 4)) == "S"


def test_action_rejects_bad_versions() -> None:
    with pytest.raises(ScheduleError, match="cannot be negative"):
        Action("F", 0, 1, -1)
    with pytest.raises(ScheduleError, match="only a versioned F predicts"):
        Action("B", 0, 1, 0, predict=1)
    with pytest.raises(ScheduleError, match="only a versioned F predicts"):
        Action("F", 0, 1, None, predict=1)


def hand_made(rows: list[list[str]], per_step: int = 1) -> Schedule:
    """An asynchronous schedule from text like [["F0@0", "B0@0", "S1"], ...]; "S1" is the step
    that makes version 1."""

    def parse(stage: int, word: str) -> Action:
        if word[0] == "S":
            return Action("S", stage, None, int(word[1:]))
        microbatch, version = word[1:].split("@")
        return Action(word[0], stage, int(microbatch), int(version))

    actions = tuple(tuple(parse(s, word) for word in row) for s, row in enumerate(rows))
    n = max(sum(word[0] == "F" for word in row) for row in rows)
    return Schedule("hand", len(rows), n, actions, per_step)


def test_hand_made_async_schedule_passes() -> None:
    schedule = hand_made(
        [["F0@0", "F1@0", "B0@0", "S1", "B1@0", "S2"], ["F0@0", "B0@0", "S1", "F1@1", "B1@1", "S2"]]
    )
    assert validate(schedule, chain_dependencies(2)).steps == 8


def test_validate_rejects_a_version_from_the_future() -> None:
    schedule = hand_made(
        [["F0@0", "F1@1", "B0@0", "S1", "B1@1", "S2"], ["F0@0", "B0@0", "S1", "F1@1", "B1@1", "S2"]]
    )
    message = (
        "stage 0: F1@1 uses version 1, but only 0 steps ran before it on that stage: "
        "a compute cannot use weights from the future"
    )
    with pytest.raises(ScheduleError, match=f"^{message}$"):
        validate(schedule, chain_dependencies(2))


def test_validate_rejects_backward_before_forward() -> None:
    schedule = hand_made(
        [["F0@0", "F1@0", "B0@0", "S1", "B1@0", "S2"], ["F0@0", "B0@0", "S1", "B1@1", "F1@1", "S2"]]
    )
    with pytest.raises(ScheduleError, match="^stage 1: B1@1 comes before F1@1$"):
        validate(schedule, chain_dependencies(2))


def test_validate_rejects_misplaced_and_misnumbered_steps() -> None:
    early = hand_made([["F0@0", "S1", "B0@0", "F1@0", "B1@0", "S2"]])
    with pytest.raises(ScheduleError, match="step 1 comes after 0 backwards, but the schedule"):
        validate(early, chain_dependencies(1))
    misnumbered = hand_made([["F0@0", "B0@0", "S2", "F1@1", "B1@1", "S2"]])
    with pytest.raises(ScheduleError, match="its step 1 is marked as making version 2"):
        validate(misnumbered, chain_dependencies(1))
    missing = hand_made([["F0@0", "B0@0", "S1", "F1@1", "B1@1"]])
    with pytest.raises(ScheduleError, match="stage 0 runs 1 steps, but 2 microbatches"):
        validate(missing, chain_dependencies(1))


def test_validate_rejects_unversioned_computes_and_odd_step_sizes() -> None:
    unversioned = Schedule(
        "bare", 1, 1, ((Action("F", 0, 0), Action("B", 0, 0), Action("S", 0, None, 1)),), 1
    )
    with pytest.raises(ScheduleError, match="F0 names no weight version"):
        validate(unversioned, chain_dependencies(1))
    odd = hand_made([["F0@0", "B0@0", "F1@0", "B1@0", "S1", "F2@1", "B2@1"]], per_step=2)
    with pytest.raises(ScheduleError, match="3 microbatches cannot be cut into steps of 2"):
        validate(odd, chain_dependencies(1))


def test_generators_reject_empty_pipelines() -> None:
    for make in (pipedream, stale, pipeoptim):
        with pytest.raises(ScheduleError, match="n_stages"):
            make(0, 4)
        with pytest.raises(ScheduleError, match="n_microbatches"):
            make(4, 0)
    with pytest.raises(ScheduleError, match="n_microbatches"):
        two_bw(4, 0, 4)


def test_registries() -> None:
    assert ASYNC_SCHEDULES == {
        "pipedream": pipedream,
        "stale": stale,
        "2bw": two_bw,
        "pipeoptim": pipeoptim,
        "wpipe": wpipe,
    }
    assert SCHEDULES == {"gpipe": gpipe, "1f1b": one_f_one_b}
    assert ASYNC_SCHEDULES["2bw"](2, 4, 2).name == "2bw"


def test_synchronous_schedules_are_unchanged() -> None:
    assert text(one_f_one_b(P, N).actions[0]) == "F0 F1 F2 F3 B0 F4 B1 F5 B2 F6 B3 F7 B4 B5 B6 B7 S"
    assert gpipe(P, N).microbatches_per_step is None
    assert validate(gpipe(P, N), chain_dependencies(P)).steps == 2 * (N + P - 1) + 1


@pytest.mark.parametrize(("p", "m"), [(1, 1), (2, 1), (2, 4), (3, 2), (4, 4), (4, 8)])
def test_wpipe_places_two_stages_per_device_and_validates(p: int, m: int) -> None:
    schedule = wpipe(2 * p, 3 * m, m)
    validate(schedule, chain_dependencies(2 * p))
    assert len(schedule.actions) == p
    for device, actions in enumerate(schedule.actions):
        assert {action.stage for action in actions} == {device, device + p}


def test_wpipe_group_one_is_a_batch_behind_and_group_two_fresh() -> None:
    p, m, batches = 3, 4, 4
    schedule = wpipe(2 * p, batches * m, m)
    used = {(kind, s): versions(schedule, kind)[s] for kind in "FB" for s in range(2 * p)}
    for k in range(batches * m):
        batch = k // m
        for s in range(2 * p):
            expected = max(0, batch - 1) if s < p else batch
            assert used[("F", s)][k] == used[("B", s)][k] == expected, (s, k)
    # each stage steps once per batch, after that batch's backwards on it
    for actions in schedule.actions:
        for stage in {a.stage for a in actions}:
            own = [a for a in actions if a.stage == stage]
            steps = [i for i, a in enumerate(own) if a.kind == "S"]
            assert len(steps) == batches
            for t, position in enumerate(steps):
                done = {a.microbatch for a in own[:position] if a.kind == "B"}
                assert done == set(range((t + 1) * m)), (stage, t)


def test_wpipe_runs_group_one_forwards_of_the_next_batch_early_and_keeps_its_versions() -> None:
    p, m = 2, 4
    schedule = wpipe(2 * p, 3 * m, m)
    device_0 = schedule.actions[0]
    first_next_batch = next(
        i for i, a in enumerate(device_0) if a.kind == "F" and a.stage == 0 and a.microbatch == m
    )
    last_group_two_backward = max(
        i for i, a in enumerate(device_0) if a.kind == "B" and a.stage == p and a.microbatch < m
    )
    assert first_next_batch < last_group_two_backward  # moved ahead of group 2's backwards
    assert weight_versions(schedule) == [2] * p + [1] * p


def test_wpipe_rejects_an_odd_stage_count_and_partial_batches() -> None:
    with pytest.raises(ScheduleError, match="even number of stages"):
        wpipe(3, 4, 2)
    with pytest.raises(ScheduleError, match="multiple of 4"):
        wpipe(4, 6, 4)
