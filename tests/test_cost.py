"""The cost model and the analysis built on it."""

import networkx as nx
import pytest
import torch
from torch import nn

import autopipe
from autopipe.analysis import analyse, pipeline_ms
from autopipe.cost import (
    CostModel,
    Level,
    StageLinks,
    check_memory,
    device_stages,
    device_totals,
    link_bandwidth,
    lower_bound_ms,
    pipeline_links,
    replicated_ms,
    stage_costs,
    stage_device,
    stage_memory,
)
from autopipe.errors import UserError
from autopipe.partitioning import PartitionOptions
from autopipe.partitioning.pipedream import stage_times


def _chain() -> nx.DiGraph:
    """Three contracted nodes a -> b -> c; a also feeds c (a skip)."""
    coarse = nx.DiGraph()
    for rank, (fwd, params, acts) in enumerate(
        [(1.0, 100, 1000), (2.0, 200, 2000), (3.0, 300, 3000)]
    ):
        coarse.add_node(
            rank,
            rank=rank,
            forward_ms=fwd,
            backward_ms=2 * fwd,
            param_bytes=params,
            state_bytes=params + 8,
            activation_bytes=acts,
            members=[f"n{rank}"],
            sends={f"n{rank}": (10_000 * (rank + 1), rank != 1)},
        )
    coarse.add_edge(0, 1, values=["n0"])
    coarse.add_edge(1, 2, values=["n1"])
    coarse.add_edge(0, 2, values=["n0"])
    return coarse


def test_stage_time_adds_compute_and_transfers_of_values_and_gradients() -> None:
    model = CostModel(bandwidth=1.0, microbatches=2, recomputation=False)
    costs = stage_costs(_chain(), {0: 0, 1: 1, 2: 1}, 2, model)
    first, second = costs
    assert first.forward_ms == 1.0 and first.backward_ms == 2.0
    assert first.send_bytes == 10_000  # n0 goes to stage 1 once, though two nodes read it
    assert first.grad_bytes == 10_000
    assert first.comm_ms == pytest.approx(20_000 / 1e9 * 1e3)
    assert second.send_bytes == 0 and second.input_bytes == 10_000
    assert second.time_ms == 5.0 + 10.0
    assert first.memory_bytes == 108 + 100 * 2 + min(2, 2) * 1000 / 2


def test_memory_depends_on_schedule_and_recomputation() -> None:
    coarse = _chain()
    stage_of = {0: 0, 1: 1, 2: 2}
    gpipe = stage_costs(
        coarse, stage_of, 3, CostModel(schedule="gpipe", microbatches=8, recomputation=False)
    )
    one_f = stage_costs(
        coarse, stage_of, 3, CostModel(schedule="1f1b", microbatches=8, recomputation=False)
    )
    assert gpipe[0].memory_bytes - one_f[0].memory_bytes == (8 - 3) * 1000 / 8
    recompute = stage_costs(
        coarse, stage_of, 3, CostModel(schedule="gpipe", microbatches=8, recomputation=True)
    )
    assert recompute[2].memory_bytes < gpipe[2].memory_bytes


def test_memory_limit_and_bad_settings_are_user_errors() -> None:
    costs = stage_costs(_chain(), {0: 0, 1: 0, 2: 0}, 1, CostModel())
    with pytest.raises(UserError, match="stage 0 needs .* GB, the limit is"):
        check_memory(costs, CostModel(memory_limit=10.0))
    for bad in (
        dict(bandwidth=0),
        dict(schedule="zero"),
        dict(microbatches=0),
        dict(memory_limit=-1),
    ):
        with pytest.raises(UserError):
            CostModel(**bad)


def test_lower_bound_and_pipeline_estimate() -> None:
    coarse = _chain()
    assert lower_bound_ms(coarse, 2) == max(18.0 / 2, 9.0)
    assert lower_bound_ms(coarse, 4) == 9.0
    model = CostModel(bandwidth=1e6, microbatches=4)
    costs = stage_costs(coarse, {0: 0, 1: 1, 2: 2}, 3, model)
    per_microbatch = [c.time_ms / 4 for c in costs]
    assert pipeline_ms([c.time_ms for c in costs], 4) == pytest.approx(
        3 * max(per_microbatch) + sum(per_microbatch)
    )
    report = analyse(costs, (1, 1, 1), lower_bound_ms(coarse, 3), model, batch_size=32)
    assert report.single_device_ms == pytest.approx(18.0)
    assert [e.schedule for e in report.schedules] == ["gpipe", "1f1b"]
    assert report.schedules[0].speedup == pytest.approx(18.0 / report.schedules[0].batch_ms)
    assert report.bound_ratio == pytest.approx(max(c.time_ms for c in costs) / 9.0)
    assert "lower bound" in report.table() and "samples/s" in report.table()


WPIPE = CostModel(schedule="wpipe", microbatches=8, recomputation=False)


def test_wpipe_runs_stages_d_and_p_plus_d_on_device_d() -> None:
    assert [stage_device(s, 6, WPIPE) for s in range(6)] == [0, 1, 2, 0, 1, 2]
    assert device_stages(6, WPIPE) == [(0, 3), (1, 4), (2, 5)]
    assert device_totals([1, 2, 3, 4], WPIPE) == [4, 6]
    assert device_stages(3, CostModel()) == [(0,), (1,), (2,)]
    assert device_totals([1, 2, 3], CostModel()) == [1, 2, 3]


def test_wpipe_keeps_two_weight_versions_in_the_first_group_only() -> None:
    one_f = CostModel(schedule="1f1b", microbatches=8, recomputation=False)
    extra = [
        stage_memory(8, 100, 1000, 800, s, 4, WPIPE) - stage_memory(8, 100, 1000, 800, s, 4, one_f)
        for s in range(4)
    ]
    assert extra == [100, 100, 0, 0]
    assert [WPIPE.in_flight(s, 4) for s in range(4)] == [4, 3, 2, 1]
    two_microbatches = CostModel(schedule="wpipe", microbatches=2)
    assert [two_microbatches.in_flight(s, 4) for s in range(4)] == [2, 2, 2, 1]


def test_wpipe_memory_limit_applies_to_the_sum_of_a_devices_stages() -> None:
    costs = stage_costs(_chain(), {0: 0, 1: 1, 2: 1}, 2, WPIPE)
    stage_bytes = [c.memory_bytes for c in costs]
    limit = max(stage_bytes) + 1
    assert sum(stage_bytes) > limit
    with pytest.raises(UserError, match=r"device 0 \(stages 0 and 1\) needs .* GB, the limit is"):
        check_memory(costs, CostModel(schedule="wpipe", memory_limit=limit))
    check_memory(costs, CostModel(memory_limit=limit))


def test_wpipe_time_is_one_trip_through_the_stages_then_the_slowest_device() -> None:
    assert pipeline_ms([4.0, 2.0, 4.0, 6.0], 4, [8.0, 8.0]) == pytest.approx(3 * 2.0 + 4.0)
    assert pipeline_ms([4.0, 2.0], 4) == pipeline_ms([4.0, 2.0], 4, [4.0, 2.0])
    costs = stage_costs(_chain(), {0: 0, 1: 1, 2: 1}, 2, WPIPE)
    report = analyse(costs, (1, 1), 1.0, WPIPE, batch_size=16)
    (device,) = report.devices
    assert device.stages == (0, 1)
    assert device.time_ms == pytest.approx(sum(report.stage_ms))
    assert device.memory_bytes == sum(c.memory_bytes for c in costs)
    (estimate,) = report.schedules
    assert estimate.schedule == "wpipe" and estimate.peak_memory_bytes == device.memory_bytes
    assert estimate.batch_ms == pytest.approx(pipeline_ms(report.stage_ms, 8, [device.time_ms]))
    assert estimate.speedup == pytest.approx(report.single_device_ms / estimate.batch_ms)
    table = report.table()
    assert "device 0 runs stages 0 and 1: " in table and "wpipe with 8 microbatches" in table
    assert analyse(costs, (1, 1), 1.0, CostModel(), batch_size=16).devices == []


def test_a_small_models_times_keep_their_digits_in_the_table() -> None:
    coarse = _chain()
    for _, data in coarse.nodes(data=True):
        data["forward_ms"] /= 1000
        data["backward_ms"] /= 1000
    model = CostModel(bandwidth=1e6)
    costs = stage_costs(coarse, {0: 0, 1: 1, 2: 1}, 2, model)
    rows = analyse(costs, (1, 1), 0.003, model, batch_size=16).table().splitlines()
    assert rows[1].split()[1:3] == ["0.001", "0.002"]
    assert rows[2].split()[1:3] == ["0.005", "0.01"]
    assert "slowest stage 0.015" in rows[3] and "lower bound 0.003 ms" in rows[3]


def test_replicated_stage_shares_compute_and_pays_the_all_reduce() -> None:
    model = CostModel(bandwidth=1.0)
    assert replicated_ms(8.0, 1.0, 1e6, 1, model) == 9.0
    assert replicated_ms(8.0, 1.0, 1e6, 4, model) == pytest.approx(
        2.0 + 1.0 + 4 * 3 * 1e6 / 4 / 1e9 * 1e3
    )
    costs = stage_costs(_chain(), {0: 0, 1: 1, 2: 1}, 2, model)
    report = analyse(costs, (2, 1), 1.0, model, batch_size=None)
    assert report.stage_ms[0] == pytest.approx(replicated_ms(3.0, costs[0].comm_ms, 100, 2, model))


SERVERS = (Level(2, 300.0), Level(2, 1.0))
"""-n 2 2 --bw 300 1: two servers of two devices, 300 GB/s inside a server, 1 GB/s between."""


def test_a_link_is_the_outermost_level_its_devices_differ_in() -> None:
    assert link_bandwidth(0, 1, SERVERS, 300.0) == 300.0
    assert link_bandwidth(1, 2, SERVERS, 300.0) == 1.0
    assert link_bandwidth(2, 3, SERVERS, 300.0) == 300.0
    assert link_bandwidth(0, 3, SERVERS, 300.0) == 1.0
    racks = (Level(8, 300.0), Level(2, 25.0), Level(2, 5.0))
    assert [link_bandwidth(d, d + 1, racks, 300.0) for d in (6, 7, 15, 23)] == [300, 25, 5, 25]
    assert link_bandwidth(3, 9, (), 12.0) == 12.0


def test_stages_take_the_devices_after_those_before_them() -> None:
    assert pipeline_links((1, 1, 1, 1), SERVERS, 300.0)[:3] == [
        StageLinks(300.0, 300.0),
        StageLinks(1.0, 300.0),
        StageLinks(300.0, 300.0),
    ]
    three_then_one = pipeline_links((3, 1), SERVERS, 300.0)
    assert three_then_one[0] == StageLinks(send=300.0, reduce=1.0)
    assert pipeline_links((1, 3), SERVERS, 300.0)[0].send == 300.0
    assert pipeline_links((2, 2), SERVERS, 300.0)[0] == StageLinks(send=1.0, reduce=300.0)


def test_analysis_prices_each_stage_at_the_link_it_crosses() -> None:
    model = CostModel(bandwidth=300.0)
    links = pipeline_links((2, 1), SERVERS, 300.0)
    costs = stage_costs(_chain(), {0: 0, 1: 1, 2: 1}, 2, model, [link.send for link in links])
    assert costs[0].comm_ms == pytest.approx(CostModel(bandwidth=1.0).transfer_ms(20_000))
    report = analyse(costs, (2, 1), 1.0, model, batch_size=None, links=links)
    assert report.stage_ms[0] == pytest.approx(
        replicated_ms(3.0, costs[0].comm_ms, 100, 2, CostModel(bandwidth=300.0))
    )


def _wide_chain() -> tuple[nn.Module, torch.Tensor]:
    """Eight equal layers whose activations take long enough to send to show in the table."""
    torch.manual_seed(0)
    layers = [nn.Sequential(nn.Linear(256, 256), nn.ReLU()) for _ in range(8)]
    return nn.Sequential(*layers), torch.randn(512, 256)


@pytest.mark.parametrize("method", ["pipedream", "acyclic"])
def test_the_stage_whose_cut_crosses_servers_pays_the_slow_link(method: str) -> None:
    model, batch = _wide_chain()
    options = PartitionOptions(cost=CostModel(bandwidth=300.0), levels=SERVERS)
    result = autopipe.compile(model, (batch,), 4, method=method, write=False, options=options)
    report = result.analysis
    fast, slow = CostModel(bandwidth=300.0), CostModel(bandwidth=1.0)
    for stage, (cost, link) in enumerate(zip(report.costs, [fast, slow, fast, fast])):
        assert cost.send_bytes > 0 or stage == 3
        assert cost.comm_ms == pytest.approx(link.transfer_ms(cost.send_bytes + cost.grad_bytes))
    assert report.costs[1].comm_ms > 100 * report.costs[0].comm_ms
    rows = report.table().splitlines()
    assert rows[0].split()[-2:] == ["link", "GB/s"]
    assert [row.split()[-1] for row in rows[1:5]] == ["300", "1", "300", "-"]
    if method == "pipedream":
        plan = autopipe.partitioning.Plan(result.partition.stage_of)
        assert report.stage_ms == pytest.approx(stage_times(result.partition.coarse, plan, options))
