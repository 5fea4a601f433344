"""The traced model as a networkx graph that carries what partitioning and codegen need.

Each fx node becomes a graph node with its kind, target, original scope, value metadata
(shape, dtype, batch dimension, bytes, requires_grad) and the original model's parameters and
buffers it holds. Each edge carries the bytes that would cross a stage boundary if it were cut.
"""

from __future__ import annotations

import logging
import operator
import weakref
from dataclasses import dataclass
from typing import Any, Iterable

import networkx as nx
import torch
import torch.fx as fx
from torch import nn
from torch._subclasses import FakeTensorMode
from torch.utils._pytree import tree_flatten

from autopipe.trace import TraceResult

log = logging.getLogger(__name__)

_VIEW_METHODS = frozenset(
    "view view_as reshape reshape_as expand expand_as transpose permute narrow select squeeze "
    "unsqueeze flatten unflatten split chunk unbind t T mT as_strided diagonal detach unfold "
    "movedim swapaxes real imag".split()
)
_VIEW_FUNCTIONS = frozenset(
    {
        torch.transpose,
        torch.permute,
        torch.narrow,
        torch.select,
        torch.squeeze,
        torch.unsqueeze,
        torch.flatten,
        torch.split,
        torch.chunk,
        torch.unbind,
        torch.reshape,
        torch.t,
        torch.movedim,
        torch.diagonal,
        torch.detach,
        operator.getitem,
    }
)
_INPLACE_OPERATORS = frozenset(
    {
        operator.iadd,
        operator.isub,
        operator.imul,
        operator.itruediv,
        operator.ifloordiv,
        operator.imod,
        operator.ipow,
        operator.imatmul,
        operator.iand,
        operator.ior,
        operator.ixor,
        operator.ilshift,
        operator.irshift,
        operator.setitem,
    }
)


@dataclass(frozen=True)
class ValueInfo:
    """What one node produces, at the traced batch size."""

    is_tensor: bool
    shape: tuple[int, ...] | None
    dtype: str | None
    requires_grad: bool
    batch_dim: int | None
    nbytes: int
    python_type: str


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _describe(value: Any, other: Any) -> ValueInfo:
    """Describe ``value``; ``other`` is the same node's value at a different batch size."""
    leaves = [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]
    nbytes = sum(t.numel() * t.element_size() for t in leaves)
    if not isinstance(value, torch.Tensor):
        return ValueInfo(
            False,
            None,
            None,
            any(t.requires_grad for t in leaves),
            None,
            nbytes,
            type(value).__name__,
        )
    shape = tuple(value.shape)
    batch_dim = None
    if isinstance(other, torch.Tensor) and other.dim() == value.dim():
        batch_dim = next((d for d, (a, b) in enumerate(zip(shape, other.shape)) if a != b), None)
    return ValueInfo(
        True, shape, dtype_name(value.dtype), value.requires_grad, batch_dim, nbytes, "Tensor"
    )


class _Recorder(fx.Interpreter):
    def __init__(self, module: fx.GraphModule) -> None:
        super().__init__(module)
        self.values: dict[str, Any] = {}
        self.tensors: dict[str, weakref.ref[torch.Tensor]] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        self.values[n.name] = _shallow_meta(result)
        if isinstance(result, torch.Tensor):
            self.tensors[n.name] = weakref.ref(result)
        if is_inplace(n, self.module):
            # a write with a value that needs a gradient makes the tensor written into (and the
            # tensors that view it) need one too: record the state they are sent in
            for name, ref in self.tensors.items():
                tensor = ref()
                if tensor is not None and tensor.requires_grad != self.values[name].requires_grad:
                    self.values[name] = _shallow_meta(tensor)
        return result


def _shallow_meta(value: Any) -> Any:
    """Keep only what describes a value, so fake or real tensors can be let go."""
    leaves, spec = tree_flatten(value)
    kept = [
        (
            torch.empty(t.shape, dtype=t.dtype, device="meta").requires_grad_(t.requires_grad)
            if isinstance(t, torch.Tensor)
            else t
        )
        for t in leaves
    ]
    return spec.unflatten(kept) if not isinstance(value, torch.Tensor) else kept[0]


def _grow_batch(inputs: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """The same inputs with one more sample, along dim 0 of every tensor of the batch size."""
    tensors = [t for t in inputs if isinstance(t, torch.Tensor) and t.dim() > 0]
    if not tensors:
        return None
    batch = tensors[0].shape[0]
    return tuple(
        (
            torch.cat([t, t[:1]])
            if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == batch
            else t
        )
        for t in inputs
    )


def _run(module: fx.GraphModule, inputs: tuple[Any, ...], fake: bool) -> dict[str, Any]:
    recorder = _Recorder(module)
    if fake:
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        with mode:
            recorder.run(
                *[mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in inputs]
            )
    else:
        with torch.random.fork_rng():
            recorder.run(*[t.clone() if isinstance(t, torch.Tensor) else t for t in inputs])
    return recorder.values


def propagate_values(traced: TraceResult) -> dict[str, ValueInfo]:
    """Run the graph once at the traced batch size and once with one more sample.

    Runs on fake tensors when the model allows it (no compute, no memory), else on real ones.
    The model's buffers are restored afterwards, so nothing the user trained is changed.
    The second run tells each value's batch dimension: the dimension whose size changed.
    """
    module = traced.graph_module
    saved = {name: buf.detach().clone() for name, buf in module.named_buffers()}
    try:
        try:
            first = _run(module, traced.inputs, fake=True)
            fake = True
        except Exception as error:  # data-dependent code cannot run on fake tensors
            log.info("fake-tensor shape propagation failed (%s); running for real", error)
            first = _run(module, traced.inputs, fake=False)
            fake = False
        grown = _grow_batch(traced.inputs)
        try:
            second = _run(module, grown, fake=fake) if grown is not None else {}
        except Exception as error:
            log.info("the model does not run at another batch size (%s)", error)
            second = {}
    finally:
        with torch.no_grad():
            for name, buf in module.named_buffers():
                if name in saved:
                    buf.copy_(saved[name])
    return {name: _describe(value, second.get(name)) for name, value in first.items()}


def _scope(node: fx.Node) -> tuple[str, str]:
    """The original module path and class name a node comes from."""
    if node.op == "call_module":
        return str(node.target), ""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, cls = list(stack.values())[-1]
    return path, getattr(cls, "__name__", str(cls))


def _state_owned(root: nn.Module, node: fx.Node) -> dict[str, torch.Tensor]:
    """Parameters and buffers a node holds, by their original qualified names."""
    if node.op == "call_module":
        module = root.get_submodule(str(node.target))
        prefix = f"{node.target}."
        tensors = dict(module.named_parameters(prefix=str(node.target), remove_duplicate=False))
        tensors.update(module.named_buffers(prefix=str(node.target), remove_duplicate=False))
        return {name: t for name, t in tensors.items() if name.startswith(prefix)}
    if node.op == "get_attr":
        owner, _, attr = str(node.target).rpartition(".")
        tensor = getattr(root.get_submodule(owner), attr)
        if isinstance(tensor, torch.Tensor):
            return {str(node.target): tensor}
    return {}


def is_inplace(node: fx.Node, root: nn.Module) -> bool:
    """Whether a node writes into one of its inputs."""
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.endswith("__")
    if node.op == "call_function":
        return node.target in _INPLACE_OPERATORS or node.kwargs.get("inplace") is True
    if node.op == "call_module":
        return getattr(root.get_submodule(str(node.target)), "inplace", False) is True
    return False


def is_view(node: fx.Node) -> bool:
    if node.op == "call_method":
        return str(node.target) in _VIEW_METHODS
    return node.op == "call_function" and node.target in _VIEW_FUNCTIONS


def build_graph(traced: TraceResult, values: dict[str, ValueInfo]) -> nx.DiGraph:
    """The traced model as a DiGraph keyed by fx node name, in fx order."""
    root = traced.graph_module
    graph = nx.DiGraph()
    outputs: list[str] = []
    for order, node in enumerate(root.graph.nodes):
        if node.op == "output":
            outputs = [n.name for n in tree_flatten(node.args[0])[0] if isinstance(n, fx.Node)]
            continue
        info = values.get(node.name) or ValueInfo(False, None, None, False, None, 0, "NoneType")
        state = _state_owned(root, node)
        scope, scope_type = _scope(node)
        graph.add_node(
            node.name,
            order=order,
            op=node.op,
            target=_target_name(node),
            scope=scope,
            scope_type=scope_type,
            value=info,
            state_bytes={k: t.numel() * t.element_size() for k, t in state.items()},
            param_bytes=sum(
                t.numel() * t.element_size() for t in state.values() if isinstance(t, nn.Parameter)
            ),
            inplace=is_inplace(node, root),
            view=is_view(node),
        )
        for source in node.all_input_nodes:
            graph.add_edge(
                source.name,
                node.name,
                bytes=values[source.name].nbytes if source.name in values else 0,
                grad=values[source.name].requires_grad if source.name in values else False,
            )
    graph.graph["outputs"] = outputs
    graph.graph["inputs"] = [n.name for n in root.graph.nodes if n.op == "placeholder"]
    return graph


def _target_name(node: fx.Node) -> str:
    if isinstance(node.target, str):
        return node.target
    return getattr(node.target, "__qualname__", None) or getattr(
        node.target, "__name__", repr(node.target)
    )


def _convex_closure(graph: nx.DiGraph, members: set[str], order: dict[str, int]) -> set[str]:
    """Members plus every node on a path between two members."""
    low = min(order[n] for n in members)
    high = max(order[n] for n in members)
    below, stack = set(), list(members)
    while stack:
        for succ in graph.successors(stack.pop()):
            if order[succ] <= high and succ not in below:
                below.add(succ)
                stack.append(succ)
    above, stack = set(), list(members)
    while stack:
        for pred in graph.predecessors(stack.pop()):
            if order[pred] >= low and pred not in above:
                above.add(pred)
                stack.append(pred)
    return members | (below & above)


def _mutated_root(graph: nx.DiGraph, node: str, fx_nodes: dict[str, fx.Node]) -> str | None:
    """The node that made the tensor an in-place node writes into, looking through views and
    earlier in-place nodes (whose results are the tensor they wrote into)."""
    args = fx_nodes[node].args
    target = args[0] if args and isinstance(args[0], fx.Node) else None
    if target is None:
        inputs = fx_nodes[node].all_input_nodes
        target = inputs[0] if inputs else None
    while target is not None and (
        graph.nodes[target.name]["view"] or graph.nodes[target.name]["inplace"]
    ):
        inner = target.args[0] if target.args and isinstance(target.args[0], fx.Node) else None
        if inner is None:
            break
        target = inner
    return target.name if target is not None else None


def _aliases(graph: nx.DiGraph, root: str, fx_nodes: dict[str, fx.Node]) -> set[str]:
    """``root`` and the nodes whose value shares its memory: views of it and in-place results."""
    found, stack = {root}, [root]
    while stack:
        node = stack.pop()
        for succ in graph.successors(node):
            args = fx_nodes[succ].args
            if (
                succ not in found
                and (graph.nodes[succ]["view"] or graph.nodes[succ]["inplace"])
                and args
                and isinstance(args[0], fx.Node)
                and args[0].name == node
            ):
                found.add(succ)
                stack.append(succ)
    return found


def _must_share_stage_with_write(
    graph: nx.DiGraph,
    node: str,
    root: str | None,
    fx_nodes: dict[str, fx.Node],
    order: dict[str, int],
) -> list[str]:
    """The movable nodes that must run in the same stage as ``node``, which writes into ``root``."""
    if root is None:
        return []
    if graph.nodes[root]["op"] in ("placeholder", "get_attr"):
        target = fx_nodes[root].target
        roots = [
            n
            for n in graph.nodes
            if graph.nodes[n]["op"] == graph.nodes[root]["op"] and fx_nodes[n].target == target
        ]
        aliases = set().union(*(_aliases(graph, r, fx_nodes) for r in roots))
        return [s for a in aliases for s in graph.successors(a)] + [
            a for a in aliases if a not in roots
        ]
    aliases = _aliases(graph, root, fx_nodes)
    return [root] + [s for a in aliases for s in graph.successors(a) if order[s] < order[node]]


def placement_groups(graph: nx.DiGraph, module: fx.GraphModule) -> list[set[str]]:
    """Sets of nodes that must share a stage, each convex (no path leaves and re-enters it).

    - A value that is not a tensor (a size, a tuple) cannot be sent: it stays with its users.
    - An in-place operation stays with the node that made the tensor it writes into, so every
      later reader, in any stage, sees the value the original program would; so does every
      earlier reader of that tensor (or of a view of it), which must not see the write.
    - A write into a parameter or buffer stays with every reader of it, so one stage holds it;
      so does a write into an input (``autopipe.trace`` makes the program write into a copy).
    Inputs and parameter reads are left out: inputs live in stage 0, parameter reads are
    repeated in every stage that needs them.
    """
    fx_nodes = {n.name: n for n in module.graph.nodes}
    order = {n: graph.nodes[n]["order"] for n in graph.nodes}
    parent = {n: n for n in graph.nodes}

    def find(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    def union(nodes: Iterable[str]) -> None:
        nodes = list(nodes)
        for other in nodes[1:]:
            a, b = find(nodes[0]), find(other)
            if a != b:
                parent[max(a, b, key=order.__getitem__)] = min(a, b, key=order.__getitem__)

    movable = {n for n in graph.nodes if graph.nodes[n]["op"] not in ("placeholder", "get_attr")}
    for n in sorted(movable, key=order.__getitem__):
        data = graph.nodes[n]
        if not data["value"].is_tensor:
            union([n, *(s for s in graph.successors(n) if s in movable)])
        if data["inplace"]:
            root = _mutated_root(graph, n, fx_nodes)
            union([n, *_must_share_stage_with_write(graph, n, root, fx_nodes, order)])
    while True:
        groups: dict[str, set[str]] = {}
        for n in movable:
            groups.setdefault(find(n), set()).add(n)
        changed = False
        for members in groups.values():
            if len(members) > 1:
                closed = _convex_closure(graph, members, order) & movable
                if closed != members:
                    union(closed)
                    changed = True
        if not changed:
            break
    return sorted(groups.values(), key=lambda g: min(order[n] for n in g))


def contract(graph: nx.DiGraph, groups: list[set[str]]) -> nx.DiGraph:
    """One node per group, costs summed; edges carry the values (and bytes) crossing.

    A coarse node holds ``members``, ``param_bytes`` and ``state_bytes`` (parameter reads count
    for their first reader), ``forward_ms`` and ``backward_ms`` (0 where nothing was profiled),
    ``activation_bytes`` (what its members produce, views excluded) and ``sends`` (value name ->
    (bytes, requires_grad) for every value used outside the group). Its ``rank`` is its place in
    a topological order that follows the program.
    """
    owner = {n: i for i, g in enumerate(groups) for n in g}
    param_bytes = [sum(graph.nodes[n]["param_bytes"] for n in members) for members in groups]
    state_bytes = [
        sum(sum(graph.nodes[n]["state_bytes"].values()) for n in members) for members in groups
    ]
    for n in graph.nodes:
        readers = [s for s in graph.successors(n) if s in owner]
        if graph.nodes[n]["op"] == "get_attr" and readers:
            first = owner[min(readers, key=lambda s: graph.nodes[s]["order"])]
            param_bytes[first] += graph.nodes[n]["param_bytes"]
            state_bytes[first] += sum(graph.nodes[n]["state_bytes"].values())
    coarse = nx.DiGraph()
    for i, members in enumerate(groups):
        ordered = sorted(members, key=lambda n: graph.nodes[n]["order"])
        nodes = [graph.nodes[n] for n in ordered]
        coarse.add_node(
            i,
            members=ordered,
            order=nodes[0]["order"],
            param_bytes=param_bytes[i],
            state_bytes=state_bytes[i],
            forward_ms=sum(d.get("forward_ms", 0.0) for d in nodes),
            backward_ms=sum(d.get("backward_ms", 0.0) for d in nodes),
            activation_bytes=sum(
                d["value"].nbytes for d in nodes if d["value"].is_tensor and not d["view"]
            ),
            sends={
                n: (graph.nodes[n]["value"].nbytes, graph.nodes[n]["value"].requires_grad)
                for n in ordered
                if any(owner.get(s, i) != i for s in graph.successors(n))
            },
        )
    for u, v in graph.edges:
        if u in owner and v in owner and owner[u] != owner[v]:
            a, b = owner[u], owner[v]
            crossing = coarse.edges[a, b]["values"] if coarse.has_edge(a, b) else set()
            crossing.add(u)
            coarse.add_edge(a, b, values=crossing)
    for a, b, data in coarse.edges(data=True):
        data["bytes"] = sum(graph.nodes[u]["value"].nbytes for u in data["values"])
        data["values"] = sorted(data["values"], key=lambda n: graph.nodes[n]["order"])
    ranked = nx.lexicographical_topological_sort(coarse, key=lambda n: coarse.nodes[n]["order"])
    for rank, n in enumerate(ranked):
        coarse.nodes[n]["rank"] = rank
    return coarse
