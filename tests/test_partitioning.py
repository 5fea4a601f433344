"""The partitioner interface, the params method and the validation every assignment passes."""

import pytest
import torch
from torch import nn

from autopipe.errors import UserError
from autopipe.graph import build_graph, propagate_values
from autopipe.partitioning import (
    METHODS,
    InvalidPartition,
    Level,
    PartitionOptions,
    partition,
    validate,
)
from autopipe.trace import trace


def _chain(widths: list[int]) -> nn.Sequential:
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers)


def _setup(model: nn.Module, *inputs: torch.Tensor):
    traced = trace(model, inputs)
    return traced, build_graph(traced, propagate_values(traced))


def _stage_params(graph, assignment, n_stages: int) -> list[int]:
    totals = [0] * n_stages
    for node, stage in assignment.items():
        totals[stage] += graph.nodes[node]["param_bytes"]
    return totals


def test_params_method_balances_parameter_bytes() -> None:
    traced, graph = _setup(_chain([64, 64, 64, 64, 64, 64, 64, 64, 64]), torch.randn(2, 64))
    assignment = partition(graph, traced.graph_module, 4, "params").assignment
    totals = _stage_params(graph, assignment, 4)
    assert max(totals) == min(totals)


def test_params_method_is_optimal_for_a_chain() -> None:
    widths = [8, 64, 8, 32, 8, 16, 8, 128, 8]
    traced, graph = _setup(_chain(widths), torch.randn(2, 8))
    assignment = partition(graph, traced.graph_module, 3, "params").assignment
    layer_bytes = [(a * b + b) * 4 for a, b in zip(widths, widths[1:])]
    best = min(
        max(sum(layer_bytes[:i]), sum(layer_bytes[i:j]), sum(layer_bytes[j:]))
        for i in range(1, len(layer_bytes))
        for j in range(i + 1, len(layer_bytes))
    )
    assert max(_stage_params(graph, assignment, 3)) == best


def test_every_stage_gets_work_and_edges_go_forward() -> None:
    traced, graph = _setup(_chain([4] * 6), torch.randn(2, 4))
    for n_stages in range(1, 6):
        assignment = partition(graph, traced.graph_module, n_stages, "params").assignment
        validate(graph, assignment, n_stages)
        assert {assignment[n] for n in graph.nodes if graph.nodes[n]["op"] == "placeholder"} == {0}


def test_validation_rejects_backward_edges_and_empty_stages() -> None:
    traced, graph = _setup(_chain([4, 4, 4]), torch.randn(2, 4))
    assignment = partition(graph, traced.graph_module, 2, "params").assignment
    reversed_assignment = {
        n: 1 - s if graph.nodes[n]["op"] != "placeholder" else 0 for n, s in assignment.items()
    }
    with pytest.raises(InvalidPartition, match="values may only flow"):
        validate(graph, reversed_assignment, 2)
    with pytest.raises(InvalidPartition, match="stage 2 has no operations"):
        validate(graph, assignment, 3)


def test_too_many_stages_and_unknown_methods_are_user_errors() -> None:
    traced, graph = _setup(_chain([4, 4]), torch.randn(2, 4))
    with pytest.raises(UserError, match="lower -p"):
        partition(graph, traced.graph_module, 5, "params")
    with pytest.raises(UserError, match="choose from"):
        partition(graph, traced.graph_module, 2, "no-such-method")
    assert "params" in METHODS


def test_fixed_replicas_go_with_every_method() -> None:
    traced, graph = _setup(_chain([8] * 7), torch.randn(2, 8))
    for method in METHODS:
        result = partition(
            graph, traced.graph_module, 3, method, PartitionOptions(replicas=(2, 1, 3))
        )
        assert result.n_stages == 3 and result.replicas == (2, 1, 3)
        validate(graph, result.assignment, 3)


def test_fixed_replicas_must_fit_the_stages_and_the_machine() -> None:
    traced, graph = _setup(_chain([8] * 4), torch.randn(2, 8))
    module = traced.graph_module
    with pytest.raises(UserError, match="2 replica counts were given for 3 stages"):
        partition(graph, module, 3, "params", PartitionOptions(replicas=(1, 1)))
    with pytest.raises(UserError, match="at least one replica"):
        partition(graph, module, 2, "acyclic", PartitionOptions(replicas=(0, 1)))
    with pytest.raises(UserError, match="cannot be combined with --replication"):
        partition(graph, module, 2, "acyclic", PartitionOptions(replicas=(1, 1), replication=True))
    servers = (Level(2, 10.0), Level(2, 1.0))
    with pytest.raises(UserError, match="2 x 2 = 4 devices but the replicas take 3"):
        partition(graph, module, 2, "acyclic", PartitionOptions(replicas=(2, 1), levels=servers))
