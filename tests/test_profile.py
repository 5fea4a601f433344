"""Per-node cost profiles: the analytical roofline, real measurements, annotation and caching."""

import json

import pytest
import torch
from torch import nn

import autopipe.profile as profiling
from autopipe.errors import UserError
from autopipe.graph import build_graph, propagate_values
from autopipe.profile import (
    DEVICES,
    DeviceSpec,
    NodeProfile,
    annotate,
    profile,
    profile_flops,
    profile_measured,
)
from autopipe.tasks import zoo_task
from autopipe.trace import trace

# Bandwidth so high that every node is compute-bound: times are FLOPs / peak exactly.
COMPUTE_BOUND = DeviceSpec("compute_bound", peak_flops=1e12, memory_bandwidth=1e30)


def _graph(model: nn.Module, inputs):
    traced = trace(model, inputs)
    return traced, build_graph(traced, propagate_values(traced))


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))
    return _graph(model, (torch.randn(64, 256),))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in after.items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in model.parameters())


class Awkward(nn.Module):
    """In-place writes (into the input, a module's and a method's), a tuple output, sizes,
    views, a buffer read and a tied weight."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.act = nn.ReLU(inplace=True)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 8, bias=False)
        self.head.weight = self.lin.weight
        self.register_buffer("offset", torch.ones(8))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x.add_(1.0)
        y = self.act(self.lin(x))
        y.mul_(2.0)
        attended, weights = self.attn(y + self.offset, y, y)
        steps = attended.size(1)
        z = self.norm(attended.reshape(-1, 8)).view(x.size(0), steps, 8)
        return self.head(z.transpose(0, 1)), weights


# Analytical ---------------------------------------------------------------------------------


def test_flops_linear_time_is_its_flops_over_the_peak() -> None:
    traced, graph = _mlp()
    profiles = profile_flops(traced, graph, COMPUTE_BOUND, recomputation=False)
    expected = 2 * 64 * 256 * 256 / COMPUTE_BOUND.peak_flops * 1e3
    assert profiles["_0"].forward_ms == pytest.approx(expected, rel=1e-12)
    # On the V100 preset a Linear this size is compute-bound too.
    v100 = profile_flops(traced, graph, DEVICES["v100"], recomputation=False)
    assert v100["_0"].forward_ms == pytest.approx(
        2 * 64 * 256 * 256 / DEVICES["v100"].peak_flops * 1e3, rel=1e-9
    )
    # The second Linear's input needs a grad: its backward computes two matmuls.
    assert profiles["_2"].backward_ms > profiles["_2"].forward_ms
    assert profiles["_2"].backward_ms == pytest.approx(2 * expected, rel=1e-12)
    assert profiles["_0"].peak_bytes is None


def test_flops_recomputation_adds_the_forward() -> None:
    traced, graph = _mlp()
    plain = profile_flops(traced, graph, DEVICES["v100"], recomputation=False)
    recomputed = profile_flops(traced, graph, DEVICES["v100"], recomputation=True)
    for name in graph.nodes:
        assert recomputed[name].forward_ms == plain[name].forward_ms
        assert recomputed[name].backward_ms == pytest.approx(
            plain[name].backward_ms + plain[name].forward_ms
        )
    assert recomputed["_2"].backward_ms > plain["_2"].backward_ms


def test_flops_is_deterministic_and_leaves_the_model_alone() -> None:
    task = zoo_task("nlp", "gpt2_tiny", 2)
    traced, graph = _graph(task.model, task.example_inputs)
    before = _state(task.model)
    first = profile_flops(traced, graph, DEVICES["a100"])
    second = profile_flops(traced, graph, DEVICES["a100"])
    assert first == second
    assert set(first) == set(graph.nodes)
    assert sum(p.forward_ms for p in first.values()) > 0
    _assert_untouched(task.model, before)
    assert task.model.lm_head.weight is task.model.wte.weight


def test_flops_charges_what_materialises_and_nothing_for_views() -> None:
    torch.manual_seed(0)
    model = Awkward().train()
    x = torch.randn(4, 5, 8)
    original = x.clone()
    traced, graph = _graph(model, (x,))
    before = _state(model)
    profiles = profile_flops(traced, graph, DEVICES["v100"], recomputation=False)
    costs = {name: profiles[name].forward_ms for name in graph.nodes}
    ops = {name: graph.nodes[name]["op"] for name in graph.nodes}
    assert all(costs[n] == 0 for n in graph.nodes if ops[n] in ("placeholder", "get_attr"))
    for name in ("lin", "attn", "norm", "head", "add_", "mul_", "act"):
        assert costs[name] > 0, name
    # The attention output is batch-first but strided, so reshape copies; view and transpose do not.
    assert costs["reshape"] > 0
    for name in ("getitem", "getitem_1", "size", "size_1", "view", "transpose"):
        assert costs[name] == 0 and profiles[name].backward_ms == 0, name
    # The input never needs a grad, so its in-place add has no backward.
    assert profiles["add_"].backward_ms == 0 and profiles["mul_"].backward_ms > 0
    _assert_untouched(model, before)
    assert torch.equal(x, original)


def test_flops_runs_on_the_zoo_convnet() -> None:
    task = zoo_task("vision", "resnet_tiny", 2)
    traced, graph = _graph(task.model, task.example_inputs)
    profiles = profile(traced, graph, mode="flops", device_spec="cpu")
    convs = [n for n in graph.nodes if graph.nodes[n]["op"] == "call_module" and "conv" in n]
    assert convs and all(
        profiles[n].forward_ms > 0 and profiles[n].backward_ms > profiles[n].forward_ms
        for n in convs
    )


# Measured -----------------------------------------------------------------------------------


def test_measured_times_compute_nodes_and_leaves_the_model_alone() -> None:
    task = zoo_task("vision", "resnet_tiny", 2)
    model = task.model.train()
    traced, graph = _graph(model, task.example_inputs)
    before = _state(model)
    assert any(k.endswith("running_mean") for k in before)
    profiles = profile_measured(traced, graph, warmup=1, repeats=1, progress=False)
    assert set(profiles) == set(graph.nodes)
    for name, data in graph.nodes(data=True):
        found = profiles[name]
        if data["op"] in ("placeholder", "get_attr"):
            assert found == NodeProfile(0.0, 0.0, None)
        elif data["op"] == "call_module":
            # less the fixed cost of a backward call, a parameter-free module's may be ~0
            weighted = any(
                True for _ in traced.graph_module.get_submodule(data["target"]).parameters()
            )
            assert found.forward_ms > 0 and found.backward_ms >= 0, name
            assert found.backward_ms > 0 or not weighted, name
            assert found.peak_bytes is None
    _assert_untouched(model, before)


def test_the_fixed_cost_of_a_backward_call_is_two_one_op_runs_less_a_two_op_run() -> None:
    reads = iter([1.0] * 20 + [1.25] * 20)  # 20 runs through one multiply, then through two

    def stopwatch(fn):
        return next(reads), fn()

    assert profiling._empty_backward_ms(stopwatch, torch.device("cpu"), 0, 1) == 0.75


def test_node_backward_times_leave_out_the_fixed_cost_of_a_backward_call(monkeypatch) -> None:
    traced, graph = _mlp()
    monkeypatch.setattr(profiling._Stopwatch, "__call__", lambda self, fn: (2.0, fn()))
    monkeypatch.setattr(profiling, "_empty_backward_ms", lambda *args: 0.5)
    profiles = profile_measured(traced, graph, recomputation=False, progress=False, whole=False)
    linear = next(name for name, data in graph.nodes(data=True) if data["op"] == "call_module")
    assert profiles[linear] == NodeProfile(2.0, 1.5, None)
    monkeypatch.setattr(profiling, "_empty_backward_ms", lambda *args: 3.0)
    profiles = profile_measured(traced, graph, recomputation=False, progress=False, whole=False)
    assert profiles[linear] == NodeProfile(2.0, 0.0, None)


def test_node_times_are_scaled_to_add_up_to_the_whole_graph() -> None:
    profiles = {
        "x": NodeProfile(0.0, 0.0, None),
        "a": NodeProfile(1.0, 3.0, 10),
        "b": NodeProfile(3.0, 1.0, None),
        "view": NodeProfile(0.5, 0.0, None),
    }
    scaled = profiling.scaled_to_whole(profiles, forward_ms=9.0, backward_ms=2.0)
    assert scaled["x"] == NodeProfile(0.0, 0.0, None)
    assert scaled["a"] == NodeProfile(2.0, 1.5, 10)
    assert scaled["b"] == NodeProfile(6.0, 0.5, None)
    assert scaled["view"] == NodeProfile(1.0, 0.0, None)
    # nothing to scale: left alone
    zero = {"x": NodeProfile(0.0, 0.0, None)}
    assert profiling.scaled_to_whole(zero, 1.0, 1.0) == zero


def test_measured_node_times_add_up_to_the_whole_graph_less_the_call(monkeypatch) -> None:
    traced, graph = _mlp()
    reads = iter(range(1, 100_000))  # every timed call reads a new figure
    monkeypatch.setattr(profiling._Stopwatch, "__call__", lambda self, fn: (next(reads), fn()))
    monkeypatch.setattr(profiling, "_empty_backward_ms", lambda *args: 0.5)
    whole = {}
    real = profiling._whole_graph_ms

    def timing_whole(*args):
        whole["ms"] = real(*args)
        return whole["ms"]

    monkeypatch.setattr(profiling, "_whole_graph_ms", timing_whole)
    plain = profile_measured(traced, graph, recomputation=False, progress=False)
    forward, backward = whole["ms"]
    assert sum(p.forward_ms for p in plain.values()) == pytest.approx(forward)
    assert sum(p.backward_ms for p in plain.values()) == pytest.approx(backward - 0.5)
    assert all(p.backward_ms > 0 for n, p in plain.items() if graph.nodes[n]["op"] != "placeholder")
    # recomputation adds each node's (scaled) forward to its backward
    recomputed = profile_measured(traced, graph, recomputation=True, progress=False)
    forward, backward = whole["ms"]
    assert sum(p.forward_ms for p in recomputed.values()) == pytest.approx(forward)
    assert sum(p.backward_ms for p in recomputed.values()) == pytest.approx(
        backward - 0.5 + forward
    )


def test_the_whole_graph_is_not_timed_where_it_may_not_fit_or_in_save_memory_mode(
    monkeypatch,
) -> None:
    traced, graph = _mlp()
    monkeypatch.setattr(profiling, "_free_bytes", lambda device: 1)
    found = profiling._whole_graph_ms(
        traced.graph_module, graph, list(traced.inputs), profiling._Stopwatch(torch.device("cpu")),
        torch.device("cpu"), 0,
    )  # fmt: skip
    assert found is None
    monkeypatch.undo()
    monkeypatch.setattr(profiling, "_whole_graph_ms", lambda *args: pytest.fail("timed whole"))
    profile_measured(traced, graph, save_memory_mode=True, progress=False)
    profile_measured(traced, graph, whole=False, progress=False)


def test_measured_handles_inplace_tuples_and_sizes() -> None:
    torch.manual_seed(0)
    model = Awkward().train()
    x = torch.randn(4, 5, 8)
    original = x.clone()
    traced, graph = _graph(model, (x,))
    before = _state(model)
    for save_memory_mode in (False, True):
        profiles = profile_measured(
            traced, graph, warmup=1, repeats=2, save_memory_mode=save_memory_mode, progress=False
        )
        assert set(profiles) == set(graph.nodes)
        assert (
            profiles["attn"].forward_ms > 0
            and profiles["attn"].backward_ms > profiles["attn"].forward_ms
        )
        # recomputation: the backward of a node without one is its forward again
        assert profiles["size"].backward_ms == profiles["size"].forward_ms
    _assert_untouched(model, before)
    assert torch.equal(x, original)


def test_measured_rejects_unknown_devices() -> None:
    traced, graph = _mlp()
    with pytest.raises(UserError):
        profile_measured(traced, graph, device="tpu", progress=False)
    with pytest.raises(UserError):
        profile(traced, graph, mode="guess")
    with pytest.raises(UserError):
        profile(traced, graph, device_spec="abacus")


# Annotation and caching ---------------------------------------------------------------------


def test_annotate_sets_costs_on_every_node() -> None:
    traced, graph = _mlp()
    profiles = profile_flops(traced, graph, DEVICES["v100"])
    del profiles["_1"]
    annotate(graph, profiles)
    for name, data in graph.nodes(data=True):
        assert {"forward_ms", "backward_ms", "peak_bytes"} <= data.keys()
    assert graph.nodes["_0"]["forward_ms"] == profiles["_0"].forward_ms
    assert graph.nodes["_1"]["forward_ms"] == 0.0 and graph.nodes["_1"]["peak_bytes"] is None


def test_measured_profiles_are_cached_reused_and_overwritten(tmp_path, monkeypatch) -> None:
    traced, graph = _mlp()
    real = profiling.profile_measured
    calls = []

    def measuring(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(profiling, "profile_measured", measuring)
    first = profile(traced, graph, mode="measured", cache_dir=tmp_path, progress=False)
    files = list(tmp_path.iterdir())
    key = profiling.cache_key(traced, graph, "cpu", True, 5)
    assert [f.name for f in files] == [f"{key}.json"] and len(calls) == 1
    assert (
        json.loads(files[0].read_text())["profiles"]["_0"]["forward_ms"] == first["_0"].forward_ms
    )

    def refuse(*args, **kwargs):
        raise AssertionError("measured again despite the cache")

    monkeypatch.setattr(profiling, "profile_measured", refuse)
    assert profile(traced, graph, mode="measured", cache_dir=tmp_path, progress=False) == first

    fixed = {name: NodeProfile(1.0, 2.0, None) for name in graph.nodes}
    monkeypatch.setattr(profiling, "profile_measured", lambda *args, **kwargs: fixed)
    assert (
        profile(traced, graph, mode="measured", cache_dir=tmp_path, overwrite_cache=True) == fixed
    )
    assert profile(traced, graph, mode="measured", cache_dir=tmp_path) == fixed
    assert [f.name for f in tmp_path.iterdir()] == [f"{key}.json"]  # no temporary file left


def test_cache_names_directories_and_keys(tmp_path, monkeypatch) -> None:
    traced, graph = _mlp()
    fixed = {name: NodeProfile(1.0, 2.0, None) for name in graph.nodes}
    monkeypatch.setattr(profiling, "profile_measured", lambda *args, **kwargs: fixed)
    monkeypatch.setenv("AUTOPIPE_CACHE_DIR", str(tmp_path / "env"))
    profile(traced, graph, mode="measured")
    assert len(list((tmp_path / "env").iterdir())) == 1
    profile(traced, graph, mode="measured", cache_dir=tmp_path / "given", cache_name="mlp.json")
    assert (tmp_path / "given" / "mlp.json").is_file()
    # flops profiles are not cached
    profile(traced, graph, mode="flops", cache_dir=tmp_path / "flops")
    assert not (tmp_path / "flops").exists()

    key = profiling.cache_key(traced, graph, "cpu", True, 5)
    assert key == profiling.cache_key(traced, graph, "cpu", True, 5)
    assert key != profiling.cache_key(traced, graph, "cpu", False, 5)
    assert key != profiling.cache_key(traced, graph, "cpu", True, 7)
    other_traced, other_graph = _graph(
        nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256)), (torch.randn(32, 256),)
    )
    assert key != profiling.cache_key(other_traced, other_graph, "cpu", True, 5)


def test_a_stale_cache_is_measured_again(tmp_path, monkeypatch) -> None:
    traced, graph = _mlp()
    fixed = {name: NodeProfile(1.0, 2.0, None) for name in graph.nodes}
    monkeypatch.setattr(profiling, "profile_measured", lambda *args, **kwargs: fixed)
    (tmp_path / "mlp.json").write_text('{"format": 1, "profiles": {}}')
    assert (
        profile(traced, graph, mode="measured", cache_dir=tmp_path, cache_name="mlp.json") == fixed
    )
    (tmp_path / "mlp.json").write_text("not json")
    assert (
        profile(traced, graph, mode="measured", cache_dir=tmp_path, cache_name="mlp.json") == fixed
    )
