"""The networkx view of a traced model and the placement constraints derived from it."""

import networkx as nx
import torch
from torch import nn

from autopipe.graph import build_graph, contract, placement_groups, propagate_values
from autopipe.trace import trace


class SeqFirst(nn.Module):
    """Works on (seq, batch, features) internally, so one value has its batch in dim 1."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 6)
        self.act = nn.ReLU(inplace=True)
        self.register_buffer("offset", torch.zeros(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.size(0)
        seq_first = x.transpose(0, 1)
        y = self.act(self.proj(seq_first))
        y.add_(self.offset)
        return y.transpose(0, 1).reshape(batch, -1)


def _graph(model: nn.Module, *inputs: torch.Tensor):
    traced = trace(model, inputs)
    return traced, build_graph(traced, propagate_values(traced))


def test_nodes_carry_values_parameters_and_scopes() -> None:
    traced, graph = _graph(SeqFirst(), torch.randn(5, 3, 6))
    proj = graph.nodes["proj"]
    assert proj["op"] == "call_module" and proj["scope"] == "proj"
    assert proj["value"].shape == (3, 5, 6) and proj["value"].dtype == "float32"
    assert proj["value"].batch_dim == 1
    assert proj["value"].nbytes == 3 * 5 * 6 * 4 and proj["value"].requires_grad
    assert proj["state_bytes"] == {"proj.weight": 36 * 4, "proj.bias": 6 * 4}
    assert proj["param_bytes"] == 42 * 4
    assert graph.nodes["x"]["value"].batch_dim == 0
    assert not graph.nodes["size"]["value"].is_tensor
    assert graph.nodes["offset"]["state_bytes"] == {"offset": 24}
    assert graph.edges["proj", "act"]["bytes"] == 3 * 5 * 6 * 4
    assert nx.is_directed_acyclic_graph(graph)
    assert graph.graph["inputs"] == ["x"] and len(graph.graph["outputs"]) == 1


def test_propagation_leaves_the_models_buffers_alone() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _graph(model, torch.randn(8, 4))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_sizes_stay_with_users_and_inplace_ops_with_their_target() -> None:
    traced, graph = _graph(SeqFirst(), torch.randn(5, 3, 6))
    groups = placement_groups(graph, traced.graph_module)
    group_of = {n: i for i, g in enumerate(groups) for n in g}
    assert group_of["size"] == group_of["reshape"]
    assert group_of["act"] == group_of["proj"]  # ReLU(inplace=True) writes into proj's output
    assert group_of["add_"] == group_of["proj"]
    coarse = contract(graph, groups)
    assert nx.is_directed_acyclic_graph(coarse)
    assert sorted(coarse.nodes[n]["rank"] for n in coarse) == list(range(len(coarse)))
