"""Tests for runtime.simulate: schedules run with real costs, as timelines, traces and pictures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO
from torch import nn

import autopipe
from autopipe.analysis import pipeline_ms
from autopipe.cost import CostModel
from autopipe.partitioning import PartitionOptions
from runtime.schedule import (
    Action,
    Schedule,
    ScheduleError,
    build_schedule,
    chain_dependencies,
    gpipe,
    one_f_one_b,
    peak_in_flight,
    pipedream,
    two_bw,
)
from runtime.simulate import (
    SimulationError,
    Timeline,
    chrome_trace,
    costs_from_pipeline,
    draw_timeline,
    main,
    measured_costs,
    simulate_costs,
    tied_parameter_bytes,
    tied_stage_groups,
    weight_versions,
)
from runtime.stage import load_generated

SCHEDULES = {"gpipe": gpipe, "1f1b": one_f_one_b}
GPT2 = REPO / "generated_models" / "gpt2_s512_p4_acyclic.py"


def uniform(schedule: Schedule, f: float = 1.0, b: float = 2.0, **extra):
    """Simulate ``schedule`` on a chain whose stages all take ``f`` and ``b`` per microbatch."""
    p = schedule.n_stages
    return simulate_costs(schedule, chain_dependencies(p), [f] * p, [b] * p, **extra)


def start(timeline, action: Action) -> float:
    return next(r.start_ms for r in timeline.records if r.action == action)


def end(timeline, action: Action) -> float:
    return next(r.end_ms for r in timeline.records if r.action == action)


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize(("p", "m"), [(1, 1), (2, 1), (2, 5), (4, 4), (4, 8), (5, 3)])
@pytest.mark.parametrize(("f", "b"), [(1.0, 2.0), (1.0, 1.0), (0.5, 3.0)])
def test_uniform_chain_takes_the_textbook_time(name: str, p: int, m: int, f: float, b: float):
    timeline = uniform(SCHEDULES[name](p, m), f, b)
    assert timeline.makespan_ms == pytest.approx((m + p - 1) * (f + b))
    assert timeline.bubble == pytest.approx((p - 1) / (m + p - 1))
    assert timeline.bubble_per_device() == pytest.approx([(p - 1) / (m + p - 1)] * p)


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_the_step_adds_its_time_once(name: str) -> None:
    p, m, step = 4, 6, 0.75
    timeline = uniform(SCHEDULES[name](p, m), step_ms=[step] * p)
    assert timeline.makespan_ms == pytest.approx((m + p - 1) * 3.0 + step)
    assert timeline.batch_ms == timeline.makespan_ms


@pytest.mark.parametrize("m", [1, 3, 8])
def test_gpipe_agrees_with_the_compilers_formula_on_a_chain(m: int) -> None:
    """(m - 1) * slowest + sum, when the slowest stage is slowest both ways (as in its analysis)."""
    forward, backward = [1.0, 3.0, 2.0, 0.5], [2.0, 5.0, 4.0, 1.5]
    timeline = simulate_costs(gpipe(4, m), chain_dependencies(4), forward, backward)
    batch = [(f + b) * m for f, b in zip(forward, backward)]
    assert timeline.makespan_ms == pytest.approx(pipeline_ms(batch, m))


def test_the_committed_gpt2_file_without_transfers_matches_its_analysis_less_comm() -> None:
    pipeline = load_generated(GPT2).PIPELINE
    costs = costs_from_pipeline(pipeline, microbatches=4)
    timeline = simulate_costs(
        gpipe(4, 4), chain_dependencies(4), costs.forward_ms, costs.backward_ms
    )
    batch = [s["costs"]["forward_ms"] + s["costs"]["backward_ms"] for s in pipeline["stages"]]
    assert timeline.makespan_ms == pytest.approx(pipeline_ms(batch, 4), rel=1e-9)


@pytest.mark.parametrize("m", [1, 4])
def test_transfers_delay_gpipe_on_two_stages_by_one_round_trip(m: int) -> None:
    """The last forward reaches stage 1 c_f later, the first gradient reaches stage 0 c_b later."""
    f, b, c_f, c_b = 1.0, 2.0, 0.3, 0.7
    timeline = uniform(gpipe(2, m), f, b, comm_ms={(0, 1): c_f, (1, 0): c_b})
    assert timeline.makespan_ms == pytest.approx((m + 1) * (f + b) + c_f + c_b)
    for i in range(m):
        assert start(timeline, Action("F", 1, i)) >= end(timeline, Action("F", 0, i)) + c_f
        assert start(timeline, Action("B", 0, i)) >= end(timeline, Action("B", 1, i)) + c_b


def test_comm_as_a_list_callable_or_number_gives_the_same_timeline() -> None:
    schedule = one_f_one_b(3, 5)
    forms = [
        [0.25, 0.25, 0.0],
        lambda src, dst, kind: 0.25,
        0.25,
        {(0, 1): 0.25, (1, 0): 0.25, (1, 2): 0.25, (2, 1): 0.25},
    ]
    ends = [[r.end_ms for r in uniform(schedule, comm_ms=form).records] for form in forms]
    assert all(e == pytest.approx(ends[0]) for e in ends)
    assert uniform(schedule).makespan_ms < uniform(schedule, comm_ms=0.25).makespan_ms


def test_a_skip_connection_is_waited_for() -> None:
    """Stage 2 receives from stage 0 directly; a slow 0 -> 2 link holds up its forwards."""
    dependencies = {0: set(), 1: {0}, 2: {0, 1}}
    slow = {(0, 2): 5.0, (2, 0): 4.0}
    timeline = simulate_costs(one_f_one_b(3, 4), dependencies, [1.0] * 3, [2.0] * 3, slow)
    for i in range(4):
        assert start(timeline, Action("F", 2, i)) >= end(timeline, Action("F", 0, i)) + 5.0
        assert start(timeline, Action("B", 0, i)) >= end(timeline, Action("B", 2, i)) + 4.0
    chain = simulate_costs(one_f_one_b(3, 4), chain_dependencies(3), [1.0] * 3, [2.0] * 3, slow)
    assert timeline.makespan_ms > chain.makespan_ms


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize(("p", "m"), [(2, 1), (3, 7), (4, 2), (4, 8)])
def test_peak_in_flight_matches_the_schedules_count(name: str, p: int, m: int) -> None:
    schedule = SCHEDULES[name](p, m)
    timeline = uniform(schedule, activation_bytes=[10.0] * p)
    assert timeline.peak_in_flight() == peak_in_flight(schedule)
    assert timeline.peak_activation_bytes() == [10.0 * n for n in peak_in_flight(schedule)]
    assert uniform(schedule).peak_activation_bytes() is None


def stage_actions(text: str, stage: int) -> tuple[Action, ...]:
    """Parse "F0 B0 S" into stage ``stage``'s actions."""
    return tuple(
        Action(word[0], stage, int(word[1:]) if word[1:] else None) for word in text.split()
    )


def test_an_asynchronous_schedule_steps_after_every_backward() -> None:
    """PipeDream-like: warm-up, then F, B, S; each step waits only for the backwards before it."""
    schedule = Schedule(
        "async",
        2,
        4,
        (
            stage_actions("F0 F1 B0 S F2 B1 S F3 B2 S B3 S", 0),
            stage_actions("F0 B0 S F1 B1 S F2 B2 S F3 B3 S", 1),
        ),
    )
    timeline = uniform(schedule, step_ms=[0.5, 0.5])
    assert timeline.steps == 4
    assert timeline.batch_ms == pytest.approx(timeline.makespan_ms / 4)
    assert len(timeline.records) == 24
    steps = [r for r in timeline.records if r.action.kind == "S" and r.device == 0]
    assert steps[0].start_ms == pytest.approx(end(timeline, Action("B", 0, 0)))
    assert steps[0].start_ms < start(timeline, Action("B", 0, 1))
    assert timeline.peak_in_flight() == [2, 1]


def test_microbatch_numbers_may_repeat_across_batches() -> None:
    """Two batches of two microbatches, numbered 0 and 1 each time: the k-th F0 of stage 1 waits
    for the k-th F0 of stage 0."""
    text = "F0 F1 B1 B0 S F0 F1 B1 B0 S"
    schedule = Schedule("twice", 2, 2, (stage_actions(text, 0), stage_actions(text, 1)))
    timeline = uniform(schedule, comm_ms=0.5)
    assert timeline.steps == 2
    first, second = (r for r in timeline.records if r.action == Action("F", 1, 0))
    zeros = [r for r in timeline.records if r.action == Action("F", 0, 0)]
    assert second.start_ms >= zeros[1].end_ms + 0.5 > first.start_ms


def test_a_deadlock_names_what_is_waited_for() -> None:
    schedule = Schedule("bad", 2, 1, (stage_actions("F0 B0 S", 0), stage_actions("B0 F0 S", 1)))
    with pytest.raises(ScheduleError, match="deadlock: device 0 waits at B0 for B0 on stage 1"):
        uniform(schedule)


def test_bad_costs_are_rejected() -> None:
    with pytest.raises(SimulationError, match="forward_ms has 1 entries for 2 stages"):
        simulate_costs(gpipe(2, 2), chain_dependencies(2), [1.0], [1.0, 1.0])
    with pytest.raises(
        SimulationError, match="backward_ms\\[1\\] must be finite and >= 0, got -1.0"
    ):
        simulate_costs(gpipe(2, 2), chain_dependencies(2), [1.0, 1.0], [1.0, -1.0])


def test_weight_versions_follow_the_schedule() -> None:
    assert weight_versions(one_f_one_b(3, 4)) == [1, 1, 1]
    assert weight_versions(pipedream(3, 6)) == [3, 2, 1]
    assert weight_versions(two_bw(3, 6, 3)) == [2, 2, 2]


def test_chrome_trace_has_one_complete_event_per_action() -> None:
    timeline = uniform(one_f_one_b(3, 4), step_ms=[0.1] * 3)
    trace = json.loads(json.dumps(chrome_trace(timeline, pid=2, label="predicted")))
    complete = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(complete) == len(timeline.records) == 3 * 9
    assert {e["cat"] for e in complete} == {"forward", "backward", "step"}
    assert {e["pid"] for e in trace["traceEvents"]} == {2}
    names = {
        e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"
    }
    assert names == {0: "stage 0", 1: "stage 1", 2: "stage 2"}
    last = max(complete, key=lambda e: e["ts"] + e["dur"])
    assert last["ts"] + last["dur"] == pytest.approx(timeline.makespan_ms * 1e3)


def test_chrome_trace_takes_measured_records_in_seconds() -> None:
    records = [(0, "F0", "F", 100.0, 100.5), (1, "F0", "F", 100.6, 101.0), (1, "S", "S", 101, 101)]
    complete = [e for e in chrome_trace(records)["traceEvents"] if e["ph"] == "X"]
    assert [(e["name"], e["cat"], e["tid"], e["ts"]) for e in complete] == [
        ("F0", "forward", 0, 0.0),
        ("F0", "forward", 1, pytest.approx(6e5)),
        ("S", "step", 1, pytest.approx(1e6)),
    ]
    assert complete[0]["dur"] == pytest.approx(5e5)
    assert all("args" not in e for e in complete)


def test_chrome_trace_says_how_long_a_measured_action_waited() -> None:
    records = [(0, "F0", "F", 0.0, 0.004, 0.0015), (1, "B0", "B", 0.001, 0.002)]
    complete = [e for e in chrome_trace(records)["traceEvents"] if e["ph"] == "X"]
    assert complete[0]["args"] == {"waited_ms": pytest.approx(1.5)}
    assert "args" not in complete[1]


@pytest.mark.parametrize(("suffix", "magic"), [(".png", b"\x89PNG\r\n\x1a\n"), (".svg", b"<")])
def test_the_timeline_is_drawn(tmp_path: Path, suffix: str, magic: bytes) -> None:
    path = tmp_path / f"timeline{suffix}"
    draw_timeline(uniform(one_f_one_b(4, 6), step_ms=[0.2] * 4), path)
    data = path.read_bytes()
    assert data.startswith(magic)
    if suffix == ".svg":
        assert b"<svg" in data and b"1f1b: p = 4, m = 6" in data


def test_costs_come_from_the_files_costs_and_value_specs() -> None:
    pipeline = load_generated(GPT2).PIPELINE
    costs = costs_from_pipeline(pipeline, microbatches=4)
    assert costs.bandwidth_gbps == 12.0 and costs.bandwidth_source == "default"
    assert costs.forward_ms[0] == pytest.approx(pipeline["stages"][0]["costs"]["forward_ms"] / 4)
    activation = 8 * 512 * 768 * 4 / 4
    assert set(costs.comm_ms) == {(0, 1), (1, 0), (1, 2), (2, 1), (2, 3), (3, 2)}
    assert costs.comm_ms[(0, 1)] == pytest.approx(activation / 12e6)
    assert costs.input_bytes[1:] == [activation] * 3
    faster = costs_from_pipeline({**pipeline, "bandwidth_gbps": 24.0}, microbatches=4)
    assert faster.bandwidth_source == "from the file"
    assert faster.comm_ms[(0, 1)] == pytest.approx(costs.comm_ms[(0, 1)] / 2)
    assert costs_from_pipeline(pipeline, 48.0, 4).bandwidth_source == "given"


def test_costs_scale_from_the_files_batch_to_the_runs_microbatch() -> None:
    """A file traced at batch 8 run at batch 4 in 2 microbatches: each microbatch is a quarter
    of the traced batch, in time and in bytes; the file's own batch gives the old split."""
    pipeline = load_generated(GPT2).PIPELINE
    assert pipeline["batch_size"] == 8
    costs = costs_from_pipeline(pipeline, microbatches=2, batch_size=4)
    quarter = costs_from_pipeline(pipeline, microbatches=4)
    assert costs.forward_ms == pytest.approx(quarter.forward_ms)
    assert costs.backward_ms == pytest.approx(quarter.backward_ms)
    assert costs.comm_ms == pytest.approx(quarter.comm_ms)
    assert costs.batch_size == 4 and quarter.batch_size == 8
    assert costs_from_pipeline(pipeline, microbatches=4, batch_size=8) == quarter
    with pytest.raises(SimulationError, match="a batch of 2 cannot make 4 microbatches"):
        costs_from_pipeline(pipeline, microbatches=4, batch_size=2)


def test_a_file_without_costs_is_a_clear_error() -> None:
    pipeline = load_generated(GPT2).PIPELINE
    stages = [{k: v for k, v in s.items() if k != "costs"} for s in pipeline["stages"]]
    with pytest.raises(SimulationError, match="stage 0 of the file has no predicted costs"):
        costs_from_pipeline({**pipeline, "stages": stages})


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-stage MLP file written by the compiler."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.Linear(64, 4))
    path = tmp_path_factory.mktemp("simulate") / "m.py"
    autopipe.compile(model, (torch.randn(8, 16),), n_stages=2, output=path)
    return path


def test_the_command_prints_the_figures_and_writes_the_pictures(
    generated: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    png, trace = tmp_path / "t.png", tmp_path / "t.json"
    flags = ["--schedule", "gpipe", "--microbatches", "4", "--timeline", str(png)]
    main(["--model", str(generated), *flags, "--trace", str(trace), "--bw", "10"])
    out = capsys.readouterr().out
    assert "schedule gpipe, p = 2, m = 4, links 10 GB/s (given)" in out
    assert "predicted time per batch:" in out and "samples/s at batch 8" in out
    assert "bubble: " in out and "peak mb" in out
    assert "stage 0  F0 F1 F2 F3 .  .  B3 B2 B1 B0 S" in out
    assert png.read_bytes().startswith(b"\x89PNG")
    assert sum(e["ph"] == "X" for e in json.loads(trace.read_text())["traceEvents"]) == 2 * 9


def test_the_command_simulates_an_asynchronous_run(
    generated: Path, capsys: pytest.CaptureFixture
) -> None:
    main(["--model", str(generated), "--schedule", "pipedream", "--microbatches", "2"])
    out = capsys.readouterr().out
    assert "schedule pipedream, p = 2, m = 2," in out
    assert "predicted time per step:" in out and "(8 steps in " in out
    table = out.split("versions\n")[1].splitlines()
    assert [row.split()[-1] for row in table[:2]] == ["2", "1"]
    assert "stage 0  F0@0 F1@0" in out
    main(["--model", str(generated), "--schedule", "2bw", "--microbatches", "2", "--steps", "3"])
    assert "(3 steps in " in capsys.readouterr().out


@pytest.fixture(scope="module")
def generated_wpipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The MLP in four stages placed two per device for WPipe."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.Linear(64, 4))
    path = tmp_path_factory.mktemp("simulate") / "m_wpipe.py"
    options = PartitionOptions(cost=CostModel(schedule="wpipe"))
    autopipe.compile(model, (torch.randn(8, 16),), n_stages=4, output=path, options=options)
    return path


def test_the_command_simulates_wpipe_one_row_per_device(
    generated_wpipe: Path, capsys: pytest.CaptureFixture
) -> None:
    main(["--model", str(generated_wpipe), "--schedule", "wpipe", "--microbatches", "2"])
    out = capsys.readouterr().out
    assert "device 0  0:F0@0" in out and "device 1  .  " in out
    table = out.split("versions\n")[1].splitlines()
    assert [row.split()[-1] for row in table[:4]] == ["2", "2", "1", "1"]
    with pytest.raises(SystemExit):
        main(["--model", str(generated_wpipe), "--schedule", "1f1b"])
    assert "which only --schedule wpipe runs" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--model", "no/such/file.py"], "no generated model file"),
        (["--schedule", "2bw", "--microbatches", "1"], "2bw keeps two weight versions"),
        (["--steps", "0"], "--steps must be at least 1, got 0"),
        (["--schedule", "zigzag"], "invalid choice: 'zigzag'"),
        (["--microbatches", "0"], "--microbatches must be at least 1, got 0"),
        (["--bw", "-1"], "--bw must be positive"),
        (["--timeline", "t.pdf"], "--timeline must name a .png or .svg file"),
        (["--costs_from", "no/such/trace.json"], "no trace 'no/such/trace.json'"),
    ],
)
def test_user_errors_exit_with_one_line(
    generated: Path, capsys: pytest.CaptureFixture, flags: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(generated), *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("runtime.simulate: error:") and message in err


@pytest.mark.parametrize("schedule", ["1f1b", "pipedream"])
def test_stages_sharing_a_tied_weight_step_together(schedule: str) -> None:
    """Stage 0 is slow and stage 2 fast; tied, their k-th steps start at the same time, and
    an untied middle stage is not held back."""
    built = build_schedule(schedule, 3, 4, 2)
    deps = {0: set(), 1: {0}, 2: {1}}
    times = dict(forward_ms=[3.0, 1.0, 1.0], backward_ms=[6.0, 2.0, 2.0], step_ms=[0.5] * 3)
    free = simulate_costs(built, deps, **times)
    tied = simulate_costs(built, deps, **times, tied_stages=[{0, 2}])

    def steps(timeline: Timeline, stage: int) -> list[float]:
        return [t.start_ms for t in timeline.records if t.action.kind == "S" and t.device == stage]

    assert steps(tied, 0) == steps(tied, 2)
    assert steps(free, 0) != steps(free, 2)
    assert tied.makespan_ms >= free.makespan_ms


def test_tied_stage_groups_come_from_the_pipeline() -> None:
    pipeline = {
        "tied_parameters": [[[0, "wte.weight"], [3, "lm_head.weight"]], [[1, "a"], [1, "b"]]]
    }
    assert tied_stage_groups(pipeline) == (frozenset({0, 3}),)


def test_tied_steps_take_their_groups_all_reduce() -> None:
    built = build_schedule("1f1b", 3, 4)
    deps = {0: set(), 1: {0}, 2: {1}}
    times = dict(forward_ms=[1.0] * 3, backward_ms=[2.0] * 3, step_ms=[0.5] * 3)
    timeline = simulate_costs(built, deps, **times, tied_stages=[{0, 2}], tied_ms=[4.0])
    durations = {t.device: t.duration_ms for t in timeline.records if t.action.kind == "S"}
    assert durations == {0: 4.5, 1: 0.5, 2: 4.5}


def test_the_tied_all_reduce_is_a_ring_over_the_link_of_one_copy_per_weight() -> None:
    generated = load_generated(GPT2)
    tied = tied_parameter_bytes(generated)
    assert tied == {(0, "wte.weight"): 50257 * 768 * 4, (3, "lm_head.weight"): 50257 * 768 * 4}
    pipeline = generated.PIPELINE
    costs = costs_from_pipeline(pipeline, 10.0, tied_bytes=tied)
    assert costs.tied_stages == (frozenset({0, 3}),)
    # a ring over k = 2 stages moves 2 (k - 1) / k = 1 copy's bytes, at 10 GB/s
    assert costs.tied_ms == pytest.approx((50257 * 768 * 4 / 10e6,))
    assert costs_from_pipeline(pipeline, 10.0).tied_ms == ()


def test_a_forward_that_predicts_weights_pays_its_stages_step() -> None:
    """PipeOptim's forwards on stage 0 (of 2) predict one step ahead, writing every weight as a
    step does; stage 1's forwards predict nothing."""
    schedule = build_schedule("pipeoptim", 2, 2, steps=2)
    timeline = uniform(schedule, step_ms=[0.5, 0.25])
    for record in timeline.records:
        if record.action.kind == "F":
            expected = 1.5 if record.action.stage == 0 else 1.0
            assert record.action.predict == (1 if record.action.stage == 0 else 0)
            assert record.end_ms - record.start_ms == pytest.approx(expected)


def _event(tid: int, name: str, cat: str, ts_ms: float, dur_ms: float, waited_ms: float = 0.0):
    event = {"ph": "X", "tid": tid, "name": name, "cat": cat, "ts": ts_ms * 1e3,
             "dur": dur_ms * 1e3, "pid": 0}  # fmt: skip
    if waited_ms:
        event["args"] = {"waited_ms": waited_ms}
    return event


def test_measured_costs_are_what_each_stage_computed_with_the_runtimes_time_before() -> None:
    events = [
        # rank 0 runs stages 0 and 2 (named in the actions), rank 1 stage 1; each rank's
        # first action is left out (no time before it, and the warm-up)
        _event(0, "0:F0", "forward", 0.0, 50.0),
        _event(0, "0:F1", "forward", 51.0, 3.0, waited_ms=1.0),
        _event(0, "2:B1", "backward", 54.5, 4.0),
        _event(0, "0:S", "step", 60.0, 2.0, waited_ms=1.5),
        _event(1, "F0", "forward", 0.0, 40.0),
        _event(1, "F1", "forward", 40.2, 5.0, waited_ms=4.0),
        _event(1, "B1", "backward", 45.4, 6.0),
        _event(0, "2:F1", "forward", 62.0, 1.0),
        _event(0, "0:B1", "backward", 63.0, 2.0),
        {"ph": "M", "name": "thread_name", "pid": 0, "tid": 0, "args": {"name": "stage 0"}},
    ]
    trace = {"traceEvents": events, "otherData": {"microbatch_size": 3}}
    found = measured_costs(trace, 3, warmup=0.0)
    # between: stage 0 after 1.0 (F1), 1.5 (S) and 0.0 (B1); stage 1 after 0.2 twice; stage
    # 2 after 0.5 (B1) and 0.0 (F1)
    assert found.between_ms == pytest.approx([2.5 / 3, 0.2, 0.25])
    assert found.forward_ms == pytest.approx([2.0 + 2.5 / 3, 1.0 + 0.2, 1.0 + 0.25])
    assert found.backward_ms == pytest.approx([2.0 + 2.5 / 3, 6.0 + 0.2, 4.0 + 0.25])
    assert found.step_ms == pytest.approx([0.5 + 2.5 / 3, 0.0, 0.0])
    assert found.microbatch_size == 3
    # ranks that are not stages (replicas) map through stage_of_rank
    replicas = [_event(r, n, c, t, 1.0) for r in (0, 1, 2) for n, c, t in
                (("F0", "forward", 0.0), ("F1", "forward", 2.0), ("B0", "backward", 4.0))]  # fmt: skip
    found = measured_costs({"traceEvents": replicas}, 2, 0.0, stage_of_rank=[0, 0, 1])
    assert found.forward_ms == pytest.approx([2.0, 2.0]) and found.microbatch_size is None
    with pytest.raises(SimulationError, match=r"of stages \[0, 1, 2\], not of this file's 2"):
        measured_costs(trace, 2)
    with pytest.raises(SimulationError, match="holds no actions"):
        measured_costs({"traceEvents": []}, 2)


def test_the_command_predicts_from_a_measured_run(
    generated: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # a run of the file, as the runtime's --trace writes it: each stage takes 2 ms forward
    # and 3 ms backward, 0.5 ms between actions, a 1 ms step
    records = []
    for stage in (0, 1):
        clock = 0.0
        for name, seconds in (("F0", 0.002), ("F1", 0.002), ("B1", 0.003), ("B0", 0.003),
                              ("S", 0.001)):  # fmt: skip
            clock += 0.0005
            records.append((stage, name, name[0], clock, clock + seconds))
            clock += seconds
    trace = chrome_trace(records)
    trace["otherData"] = {"microbatch_size": 2}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(trace))
    flags = ["--model", str(generated), "--schedule", "gpipe", "--microbatches", "4"]
    main([*flags, "--costs_from", str(path)])
    out = capsys.readouterr().out
    table = out.split("versions\n")[1].splitlines()
    assert [row.split()[1:3] for row in table[:2]] == [["2.50", "3.50"]] * 2
    assert f"stage costs measured in {path}" in out
    with pytest.raises(SystemExit):
        main([*flags, "--batch_size", "16", "--costs_from", str(path)])
    err = capsys.readouterr().err
    assert "microbatches hold 2 samples, this prediction's 4" in err
