"""The cost model and the analysis built on it."""

import networkx as nx
import pytest

from autopipe.analysis import analyse, pipeline_ms
from autopipe.cost import CostModel, check_memory, lower_bound_ms, replicated_ms, stage_costs
from autopipe.errors import UserError


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


def test_replicated_stage_shares_compute_and_pays_the_all_reduce() -> None:
    model = CostModel(bandwidth=1.0)
    assert replicated_ms(8.0, 1.0, 1e6, 1, model) == 9.0
    assert replicated_ms(8.0, 1.0, 1e6, 4, model) == pytest.approx(
        2.0 + 1.0 + 4 * 3 * 1e6 / 4 / 1e9 * 1e3
    )
    costs = stage_costs(_chain(), {0: 0, 1: 1, 2: 1}, 2, model)
    report = analyse(costs, (2, 1), 1.0, model, batch_size=None)
    assert report.stage_ms[0] == pytest.approx(replicated_ms(3.0, costs[0].comm_ms, 100, 2, model))
