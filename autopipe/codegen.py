"""Generate one standalone Python file per partitioned model.

The file holds one ``nn.Module`` per stage, with straight-line ``forward`` code, layers rebuilt
from their hyperparameters and registered under the original qualified names (so state dicts
line up with the original model), and ``PIPELINE``, the plain-dict description of how the
stages connect. Source text comes from the jinja2 templates in ``codegen_templates/`` and is
formatted by black; the same inputs give the same bytes.
"""

from __future__ import annotations

import keyword
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import black
import jinja2
import networkx as nx
import torch
import torch.fx as fx
from torch import nn

from autopipe.cost import StageCost
from autopipe.errors import UserError
from autopipe.graph import ValueInfo
from autopipe.partitioning import Partition
from autopipe.rebuild import Imports, check_rebuilt, constructor, literal

_HERE = Path(__file__).resolve().parent
TEMPLATE_DIRS = [_HERE / "codegen_templates", _HERE.parent / "codegen_templates"]
_LARGEST_EMBEDDED_CONSTANT = 4096
_RESERVED = frozenset({"self", "torch", "nn", "F", "operator", "math", "OrderedDict"})

_BINARY = {
    operator.add: "+",
    operator.sub: "-",
    operator.mul: "*",
    operator.truediv: "/",
    operator.floordiv: "//",
    operator.mod: "%",
    operator.pow: "**",
    operator.matmul: "@",
    operator.and_: "&",
    operator.or_: "|",
    operator.xor: "^",
    operator.lshift: "<<",
    operator.rshift: ">>",
    operator.eq: "==",
    operator.ne: "!=",
    operator.lt: "<",
    operator.le: "<=",
    operator.gt: ">",
    operator.ge: ">=",
}
_UNARY = {operator.neg: "-", operator.pos: "+", operator.invert: "~", operator.not_: "not "}
_DROPOUTS = frozenset(
    {
        nn.functional.dropout,
        nn.functional.dropout1d,
        nn.functional.dropout2d,
        nn.functional.dropout3d,
        nn.functional.alpha_dropout,
        nn.functional.feature_alpha_dropout,
    }
)


class _Source(str):
    """Text to paste as is where a constant would be written."""


@dataclass
class StagePlan:
    """What one stage holds and computes, before it is written as source."""

    index: int
    nodes: list[fx.Node] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    modules: dict[str, nn.Module] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class GeneratedFile:
    source: str
    pipeline: dict[str, Any]


def plan_stages(
    module: fx.GraphModule,
    graph: nx.DiGraph,
    assignment: dict[str, int],
    n_stages: int,
    original: nn.Module,
) -> list[StagePlan]:
    """Split the traced program into stages: nodes, inputs, outputs and held state."""
    plans = [StagePlan(k) for k in range(n_stages)]
    last = n_stages - 1
    placeholders = [n.name for n in module.graph.nodes if n.op == "placeholder"]
    order = {n.name: i for i, n in enumerate(module.graph.nodes)}
    needs: list[set[str]] = [set() for _ in range(n_stages)]
    for node in module.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        stages = (
            {assignment[u.name] for u in node.users if u.op != "output"} or {assignment[node.name]}
            if node.op == "get_attr"
            else {assignment[node.name]}
        )
        for stage in sorted(stages):
            plans[stage].nodes.append(node)
            for source in node.all_input_nodes:
                if source.op != "get_attr" and (
                    source.op == "placeholder" or assignment[source.name] != stage
                ):
                    needs[stage].add(source.name)
    model_outputs = graph.graph["outputs"]
    needs[last].update(n for n in model_outputs if n not in {x.name for x in plans[last].nodes})
    plans[0].inputs = list(placeholders)
    for stage in range(1, n_stages):
        plans[stage].inputs = sorted(needs[stage], key=order.__getitem__)
    for stage in range(n_stages):
        plans[stage].outputs = sorted(
            {
                n
                for later in range(stage + 1, n_stages)
                for n in needs[later]
                if (assignment[n] == stage and graph.nodes[n]["op"] != "placeholder")
                or (stage == 0 and graph.nodes[n]["op"] == "placeholder")
            },
            key=order.__getitem__,
        )
    plans[last].outputs = list(model_outputs)
    for plan in plans:
        _collect_state(module, plan)
    _place_orphans(original, plans[last], plans)
    return plans


def _collect_state(module: fx.GraphModule, plan: StagePlan) -> None:
    for node in plan.nodes:
        if node.op == "call_module":
            plan.modules[str(node.target)] = module.get_submodule(str(node.target))
    for node in plan.nodes:
        if node.op == "get_attr" and not _inside(str(node.target), plan.modules):
            owner, _, attr = str(node.target).rpartition(".")
            plan.tensors[str(node.target)] = getattr(module.get_submodule(owner), attr)


def _inside(path: str, modules: dict[str, nn.Module]) -> bool:
    return any(path.startswith(f"{m}.") for m in modules)


def _place_orphans(original_model: nn.Module, last: StagePlan, plans: list[StagePlan]) -> None:
    """Give the last stage the original model's state that no stage uses, so state dicts
    still round-trip."""
    held = set()
    for plan in plans:
        held |= set(_state_keys(plan))
    for key, tensor in original_model.state_dict(keep_vars=True).items():
        if key not in held and not _inside(key, last.modules):
            last.tensors[key] = tensor


def _state_keys(plan: StagePlan) -> dict[str, torch.Tensor]:
    """The stage's state dict keys and the original tensors behind them."""
    keys: dict[str, torch.Tensor] = {}
    for path, m in plan.modules.items():
        keys.update(m.state_dict(prefix=f"{path}.", keep_vars=True))
    for path, tensor in plan.tensors.items():
        keys[path] = tensor
    return keys


class _Writer:
    """Turns stage plans into template data, collecting imports along the way."""

    def __init__(self, module: fx.GraphModule, original_keys: set[str]) -> None:
        self.module = module
        self.original_keys = original_keys
        self.imports = Imports()
        self.names = {n.name: _variable(n.name) for n in module.graph.nodes}
        self.tree: dict[str, Any] = {}
        self.namespace: dict[str, Any] = {
            "torch": torch,
            "nn": nn,
            "F": nn.functional,
            "operator": operator,
        }
        self._imported: set[str] = set()

    def stage(self, plan: StagePlan, graph: nx.DiGraph, root_name: str) -> dict[str, Any]:
        return {
            "index": plan.index,
            "doc": self._doc(plan),
            "init": self._init_lines(plan),
            "inputs": [self.names[n] for n in plan.inputs],
            "body": [self._line(n, graph, root_name) for n in plan.nodes],
            "outputs": [self.names[n] for n in plan.outputs],
        }

    def _doc(self, plan: StagePlan) -> str:
        scopes = list(plan.modules)
        if not scopes:
            return f"Stage {plan.index} of the pipeline."
        return f"Stage {plan.index}: from {scopes[0]} to {scopes[-1]}."

    def _init_lines(self, plan: StagePlan) -> list[str]:
        tree: dict[str, Any] = {}
        for path, m in plan.modules.items():
            source = constructor(m, self.imports)
            check_rebuilt(path, m, source, self._namespace())
            _insert(tree, path.split("."), _Source(source))
        self.tree = tree
        lines = [_top_level(name, value) for name, value in tree.items()]
        for path, tensor in plan.tensors.items():
            owner, _, attr = path.rpartition(".")
            if owner and not _tree_has(tree, owner.split(".")):
                for line in _make_containers(tree, owner.split(".")):
                    lines.append(line)
            lines.append(self._register(owner, attr, path, tensor))
        lines += _tie_lines(plan, tree)
        lines += [
            f"{_access(key, tree)}.requires_grad_(False)"
            for key, t in _state_keys(plan).items()
            if isinstance(t, nn.Parameter) and not t.requires_grad and key in self.original_keys
        ]
        return lines

    def _register(self, owner: str, attr: str, path: str, tensor: torch.Tensor) -> str:
        holder = _access(owner, self.tree) if owner else "self"
        if isinstance(tensor, nn.Parameter):
            frozen = "" if tensor.requires_grad else ", requires_grad=False"
            value = f"nn.Parameter({_zeros(tensor)}{frozen})"
            return f"{holder}.register_parameter({attr!r}, {value})"
        if path in self.original_keys:
            return f"{holder}.register_buffer({attr!r}, {_zeros(tensor)})"
        if tensor.numel() > _LARGEST_EMBEDDED_CONSTANT:
            raise UserError(
                f"{path} is a tensor of {tensor.numel()} elements that is not in the state dict "
                "(a non-persistent buffer or a constant); register it as a persistent buffer"
            )
        value = f"torch.tensor({tensor.detach().cpu().tolist()!r}, dtype={tensor.dtype})"
        return f"{holder}.register_buffer({attr!r}, {value}, persistent=False)"

    def _namespace(self) -> dict[str, Any]:
        """Names that rebuilt layers' source refers to; each import line runs once."""
        for line in sorted(self.imports.lines - self._imported):
            exec(line, self.namespace)  # noqa: S102 - import lines written by Imports
        self._imported |= self.imports.lines
        return self.namespace

    def _line(self, node: fx.Node, graph: nx.DiGraph, root_name: str) -> tuple[str, str]:
        data = graph.nodes[node.name]
        comment = data["scope"] or root_name
        if data["scope_type"]:
            comment += f" ({data['scope_type']})"
        return f"{self.names[node.name]} = {self._expression(node)}", comment

    def _arg(self, value: Any) -> str:
        return literal(
            value,
            self.imports,
            lambda v: (
                self.names[v.name]
                if isinstance(v, fx.Node)
                else v if isinstance(v, _Source) else None
            ),
        )

    def _call_args(self, args: tuple, kwargs: dict) -> str:
        parts = [self._arg(a) for a in args] + [f"{k}={self._arg(v)}" for k, v in kwargs.items()]
        return ", ".join(parts)

    def _expression(self, node: fx.Node) -> str:
        args, kwargs = node.args, dict(node.kwargs)
        if node.op == "get_attr":
            return _access(str(node.target), self.tree)
        if node.op == "call_module":
            return f"{_access(str(node.target), self.tree)}({self._call_args(args, kwargs)})"
        if node.op == "call_method":
            return f"{self._arg(args[0])}.{node.target}({self._call_args(args[1:], kwargs)})"
        target = node.target
        if target in _DROPOUTS:
            args, kwargs = _follow_training_mode(args, kwargs)
        if target in _BINARY and len(args) == 2 and not kwargs:
            return f"{self._arg(args[0])} {_BINARY[target]} {self._arg(args[1])}"
        if target in _UNARY and len(args) == 1 and not kwargs:
            return f"{_UNARY[target]}{self._arg(args[0])}"
        if target is operator.getitem and len(args) == 2:
            return f"{self._arg(args[0])}[{self._index(args[1])}]"
        if (
            target is getattr
            and len(args) == 2
            and isinstance(args[1], str)
            and args[1].isidentifier()
        ):
            return f"{self._arg(args[0])}.{args[1]}"
        return f"{self.imports.name_of_function(target)}({self._call_args(args, kwargs)})"

    def _index(self, index: Any) -> str:
        if isinstance(index, tuple) and index:
            return ", ".join(self._index_item(i) for i in index)
        return self._index_item(index)

    def _index_item(self, item: Any) -> str:
        if isinstance(item, slice):
            start, stop, step = (
                ("" if v is None else self._arg(v)) for v in (item.start, item.stop, item.step)
            )
            return f"{start}:{stop}" + (f":{step}" if step else "")
        return self._arg(item)


def _follow_training_mode(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Functional dropout records the training flag of trace time; tie it to the stage's mode."""
    if "training" in kwargs:
        kwargs["training"] = _Source("self.training")
    elif len(args) > 2:
        args = (*args[:2], _Source("self.training"), *args[3:])
    return args, kwargs


def _variable(name: str) -> str:
    name = name if name.isidentifier() else "".join(c if c.isalnum() else "_" for c in name)
    return f"{name}_" if keyword.iskeyword(name) or name in _RESERVED else name


def _is_plain_attribute(name: str, owner_type: type) -> bool:
    return name.isidentifier() and not keyword.iskeyword(name) and not hasattr(owner_type, name)


def _access(path: str, tree: dict[str, Any]) -> str:
    """Source that reaches a submodule, parameter or buffer of a stage by its original path.

    Containers made here are ``nn.ModuleDict``s (``self.layer1["0"].conv1``); inside a rebuilt
    layer, attributes are reached as attributes.
    """
    parts = path.split(".")
    if hasattr(nn.Module, parts[0]):
        raise UserError(
            f"{path!r}: {parts[0]!r} clashes with an nn.Module attribute; rename it in the model"
        )
    text = (
        f"self.{parts[0]}"
        if _is_plain_attribute(parts[0], nn.Module)
        else f"getattr(self, {parts[0]!r})"
    )
    node: Any = tree.get(parts[0])
    for part in parts[1:]:
        if isinstance(node, dict) and part in node:
            text += f".{part}" if _is_plain_attribute(part, nn.ModuleDict) else f"[{part!r}]"
            node = node[part]
        else:
            text = (
                f"{text}.{part}"
                if _is_plain_attribute(part, type(None))
                else f"getattr({text}, {part!r})"
            )
            node = None
    return text


def _insert(tree: dict[str, Any], parts: list[str], value: _Source) -> None:
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _tree_has(tree: dict[str, Any], parts: list[str]) -> bool:
    node: Any = tree
    for part in parts:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _make_containers(tree: dict[str, Any], parts: list[str]) -> list[str]:
    """Create empty containers down to ``parts``, returning the lines that do it."""
    lines, node = [], tree
    for depth, part in enumerate(parts):
        if isinstance(node, _Source):
            break
        if part not in node:
            node[part] = {}
            if depth == 0:
                lines.append(_top_level(part, {}))
            else:
                lines.append(
                    f"{_access('.'.join(parts[:depth]), tree)}[{part!r}] = nn.ModuleDict()"
                )
        node = node[part]
    return lines


def _render_tree(value: Any) -> str:
    if isinstance(value, _Source):
        return str(value)
    items = ", ".join(f"{name!r}: {_render_tree(child)}" for name, child in value.items())
    return f"nn.ModuleDict({{{items}}})"


def _top_level(name: str, value: Any) -> str:
    if hasattr(nn.Module, name):
        raise UserError(f"{name!r} clashes with an nn.Module attribute; rename it in the model")
    if _is_plain_attribute(name, nn.Module):
        return f"self.{name} = {_render_tree(value)}"
    return f"self.add_module({name!r}, {_render_tree(value)})"


def _zeros(tensor: torch.Tensor) -> str:
    shape = ", ".join(str(d) for d in tensor.shape)
    dtype = "" if tensor.dtype == torch.float32 else f", dtype={tensor.dtype}"
    return f"torch.zeros({shape or '()'}{dtype})"


def _tie_lines(plan: StagePlan, tree: dict[str, Any]) -> list[str]:
    """Within a stage, keys that were one tensor in the original stay one tensor."""
    first: dict[int, str] = {}
    lines = []
    for key, tensor in _state_keys(plan).items():
        if id(tensor) in first:
            owner, _, attr = key.rpartition(".")
            holder = _access(owner, tree) if owner else "self"
            lines.append(f"setattr({holder}, {attr!r}, {_access(first[id(tensor)], tree)})")
        else:
            first[id(tensor)] = key
    return lines


def _value_spec(info: ValueInfo, producer: int | None, consumers: list[int]) -> dict[str, Any]:
    return {
        "shape": list(info.shape) if info.shape is not None else None,
        "dtype": info.dtype,
        "requires_grad": info.requires_grad,
        "batch_dim": info.batch_dim,
        "producer": producer,
        "consumers": consumers,
    }


def _cost_entry(cost: StageCost) -> dict[str, Any]:
    """A stage's predicted costs, rounded so that files stay readable."""
    return {
        "forward_ms": round(cost.forward_ms, 4),
        "backward_ms": round(cost.backward_ms, 4),
        "comm_ms": round(cost.comm_ms, 4),
        "param_bytes": cost.param_bytes,
        "send_bytes": cost.send_bytes,
        "recv_bytes": cost.input_bytes,
        "memory_bytes": cost.memory_bytes,
    }


def describe_pipeline(
    original_model: nn.Module,
    graph: nx.DiGraph,
    plans: list[StagePlan],
    extra: dict[str, Any],
    partition: Partition,
) -> dict[str, Any]:
    """The PIPELINE dict: inputs, outputs, stages with value specs, state and tied groups.

    Where a device runs several stages (wpipe), every stage also names its ``"device"`` and
    the top level gives the number of ``"devices"``; other files do not have these keys.
    """
    consumers: dict[str, list[int]] = {}
    producers: dict[str, int] = {}
    for plan in plans:
        for name in plan.inputs:
            consumers.setdefault(name, []).append(plan.index)
    for plan in plans:
        for name in plan.outputs:
            producers.setdefault(name, plan.index)
    original = original_model.state_dict(keep_vars=True)
    stages = []
    held: dict[int, list[list[Any]]] = {}
    for plan in plans:
        keys = {k: t for k, t in _state_keys(plan).items() if k in original}
        for key in keys:
            held.setdefault(id(original[key]), []).append([plan.index, key])
        from_data = set(plan.inputs) if plan.index == 0 else set()
        values = {
            name: _value_spec(
                graph.nodes[name]["value"],
                None if name in from_data else producers.get(name),
                consumers.get(name, []),
            )
            for name in dict.fromkeys(plan.inputs + plan.outputs)
        }
        stages.append(
            {
                "inputs": list(plan.inputs),
                "outputs": list(plan.outputs),
                "values": values,
                "parameters": [k for k, t in keys.items() if isinstance(t, nn.Parameter)],
                "buffers": [k for k, t in keys.items() if not isinstance(t, nn.Parameter)],
                "replicas": partition.replicas[plan.index],
                **(
                    {"device": partition.devices[plan.index]}
                    if partition.devices is not None
                    else {}
                ),
                "costs": _cost_entry(partition.costs[plan.index]),
            }
        )
    tied = [group for group in held.values() if len({stage for stage, _ in group}) > 1]
    inputs = graph.graph["inputs"]
    input_info = [graph.nodes[n]["value"] for n in inputs]
    batch_dims = [i.batch_dim for i in input_info if i.batch_dim is not None]
    return {
        **extra,
        "model_inputs": list(inputs),
        "model_outputs": list(graph.graph["outputs"]),
        "batch_dim": batch_dims[0] if batch_dims else 0,
        "n_stages": len(plans),
        **({"devices": len(set(partition.devices))} if partition.devices is not None else {}),
        "stages": stages,
        "tied_parameters": tied,
        "state_keys": list(original),
    }


def generate(
    module: fx.GraphModule,
    graph: nx.DiGraph,
    partition: Partition,
    header: str,
    extra: dict[str, Any],
    original: nn.Module,
    analysis: str | None = None,
) -> GeneratedFile:
    """Source text of the generated file for ``partition``, formatted by black.

    ``module`` is the traced ``original``; the original model gives the state dict keys.
    ``analysis``, when given, is appended to the file's docstring.
    """
    plans = plan_stages(module, graph, partition.assignment, partition.n_stages, original)
    writer = _Writer(module, set(original.state_dict()))
    root_name = type(module).__name__
    stages = [writer.stage(plan, graph, root_name) for plan in plans]
    pipeline = describe_pipeline(original, graph, plans, extra, partition)
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader([str(d) for d in TEMPLATE_DIRS]),
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    text = environment.get_template("stages.py.j2").render(
        header=header,
        model_name=extra.get("model", root_name),
        imports=sorted(writer.imports.lines),
        stages=stages,
        pipeline=literal(pipeline, Imports()),
        devices=pipeline.get("devices"),
        analysis=analysis,
    )
    try:
        source = black.format_str(text, mode=black.Mode(line_length=100))
    except black.InvalidInput as error:
        raise RuntimeError(f"generated code is not valid Python: {error}") from error
    return GeneratedFile(source, pipeline)
