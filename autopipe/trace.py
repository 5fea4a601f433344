"""Trace a model into a torch.fx graph with a leaf policy and automatic fallback.

torch.nn's own layers are leaves: they stay one graph node each and are rebuilt from their
hyperparameters in the generated code. Every other module is traced through, unless it is
deeper than ``depth``, named in ``basic_blocks``, or its tracing fails; such a module becomes a
leaf too, and the reason is recorded so the user can see what happened.
"""

from __future__ import annotations

import inspect
import logging
import os
import traceback
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.fx as fx
from torch import nn

from autopipe.errors import UserError

log = logging.getLogger(__name__)

CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)
_TORCH_NN_PREFIXES = ("torch.nn.", "torch.ao.nn.")
_AUTOPIPE_DIR = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


def is_torch_layer(module: nn.Module) -> bool:
    """True for torch.nn's built-in layers (Conv2d, LayerNorm...), false for containers."""
    cls = type(module)
    return cls.__module__.startswith(_TORCH_NN_PREFIXES) and not issubclass(cls, CONTAINERS)


@dataclass
class LeafPolicy:
    """Which modules stay single graph nodes instead of being traced through."""

    depth: int | None = None
    basic_blocks: frozenset[str] = frozenset()
    auto_leaves: dict[str, str] = field(default_factory=dict)

    def is_leaf(self, module: nn.Module, qualname: str) -> bool:
        if qualname in self.auto_leaves or is_torch_layer(module):
            return True
        cls = type(module)
        if (
            cls.__name__ in self.basic_blocks
            or f"{cls.__module__}.{cls.__qualname__}" in self.basic_blocks
        ):
            return True
        return self.depth is not None and qualname != "" and qualname.count(".") + 1 > self.depth


@dataclass
class TraceResult:
    """A traced model: the graph module, how to call it, and which modules fell back to leaves."""

    graph_module: fx.GraphModule
    input_names: list[str]
    inputs: tuple[Any, ...]
    auto_leaves: dict[str, str]


class _SubmoduleFailed(Exception):
    def __init__(self, qualname: str, reason: str) -> None:
        super().__init__(qualname, reason)
        self.qualname = qualname
        self.reason = reason


class _LeafTracer(fx.Tracer):
    def __init__(self, policy: LeafPolicy) -> None:
        super().__init__()
        self.policy = policy

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return self.policy.is_leaf(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        qualname = self.path_of_module(m)
        if self.is_leaf_module(m, qualname):
            return super().call_module(m, forward, args, kwargs)
        try:
            return super().call_module(m, forward, args, kwargs)
        except _SubmoduleFailed:
            raise
        except Exception as error:  # any failure inside the submodule makes it a leaf
            raise _SubmoduleFailed(qualname, _describe_failure(error)) from error


def _describe_failure(error: BaseException) -> str:
    """The error in one line, with the first line of user code that raised it."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = f"{type(error).__name__}: {message}" if message else type(error).__name__
    frame = _user_frame(error)
    if frame is not None:
        text += f" (at {os.path.basename(frame.filename)}:{frame.lineno}: {frame.line})"
    return text


def _user_frame(error: BaseException) -> traceback.FrameSummary | None:
    frames = traceback.extract_tb(error.__traceback__)
    for frame in reversed(frames):
        path = os.path.abspath(frame.filename)
        if not path.startswith((_TORCH_DIR, _AUTOPIPE_DIR)) and "<" not in frame.filename:
            return frame
    return None


def bind_inputs(
    model: nn.Module, example_inputs: Sequence[Any] | Mapping[str, Any]
) -> tuple[list[str], tuple[Any, ...], dict[str, Any]]:
    """Match example inputs to ``model.forward``'s parameters.

    Returns the names of the traced inputs, their values in that order, and the fixed values
    (defaults) of every other parameter.
    """
    params = list(inspect.signature(model.forward).parameters.values())
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        raise UserError(
            f"{type(model).__name__}.forward takes *args or **kwargs; "
            "wrap the model so that forward names its inputs"
        )
    if isinstance(example_inputs, Mapping):
        given = dict(example_inputs)
        unknown = sorted(set(given) - {p.name for p in params})
        if unknown:
            raise UserError(
                f"{type(model).__name__}.forward has no parameter {unknown[0]!r} "
                f"(it takes {', '.join(p.name for p in params)})"
            )
    else:
        values = tuple(example_inputs)
        if len(values) > len(params):
            raise UserError(
                f"{type(model).__name__}.forward takes {len(params)} inputs, "
                f"{len(values)} example inputs were given"
            )
        given = {p.name: v for p, v in zip(params, values)}
    names, inputs, constants = [], [], {}
    for p in params:
        if p.name in given:
            names.append(p.name)
            inputs.append(given[p.name])
        elif p.default is not p.empty:
            constants[p.name] = p.default
        else:
            raise UserError(
                f"{type(model).__name__}.forward needs input {p.name!r}; pass it in example_inputs"
            )
    return names, tuple(inputs), constants


def trace(
    model: nn.Module,
    example_inputs: Sequence[Any] | Mapping[str, Any],
    depth: int | None = None,
    basic_blocks: Iterable[str] = (),
) -> TraceResult:
    """Trace ``model`` with torch.fx; modules that cannot be traced become leaves."""
    names, inputs, constants = bind_inputs(model, example_inputs)
    policy = LeafPolicy(depth=depth, basic_blocks=frozenset(basic_blocks))
    while True:
        tracer = _LeafTracer(policy)
        try:
            graph = tracer.trace(model, concrete_args=constants or None)
            break
        except _SubmoduleFailed as failure:
            log.info(
                "tracing %s failed, keeping it as a leaf: %s", failure.qualname, failure.reason
            )
            policy.auto_leaves[failure.qualname] = failure.reason
        except Exception as error:
            raise UserError(
                f"cannot trace {type(model).__name__}.forward itself: {_describe_failure(error)}; "
                "move that code into a submodule (it then becomes a leaf) or name it with --basic_blocks"
            ) from error
    _drop_constant_inputs(graph, model, set(constants))
    _copy_written_inputs(graph, model)
    graph_module = fx.GraphModule(model, graph, class_name=type(model).__name__)
    return TraceResult(graph_module, names, inputs, dict(policy.auto_leaves))


def _copy_written_inputs(graph: fx.Graph, model: nn.Module) -> None:
    """Make the program copy each input it writes into in place, and use the copy throughout.

    The write then goes into a value that a node makes, so it is placed like any other write
    (see ``autopipe.graph.placement_groups``) and every later reader, in any stage, gets the
    written value; inputs themselves are only ever read. Stages never wrote into the caller's
    tensors anyway: what crosses to a stage is a copy.
    """
    from autopipe.graph import is_inplace, is_view  # autopipe.graph imports this module

    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for placeholder in placeholders:
        aliases, written = {placeholder}, False
        for node in graph.nodes:
            if node.args and node.args[0] in aliases:
                if is_inplace(node, model):
                    aliases.add(node)
                    written = True
                elif is_view(node):
                    aliases.add(node)
        if not written:
            continue
        with graph.inserting_after(placeholders[-1]):
            copy = graph.call_method("clone", (placeholder,))
        placeholder.replace_all_uses_with(
            copy, delete_user_cb=lambda user, copy=copy: user is not copy
        )


def _drop_constant_inputs(graph: fx.Graph, model: nn.Module, constant_names: set[str]) -> None:
    """Remove the placeholders fx makes for fixed arguments, with the checks it hangs on them.

    fx makes one placeholder per parameter of ``forward``, in order, but may rename them.
    """
    parameters = list(inspect.signature(model.forward).parameters)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for name, node in zip(parameters, placeholders):
        if name not in constant_names:
            continue
        checks = _only_checks_below(node)
        if checks is None:
            continue
        for check in reversed(checks):
            graph.erase_node(check)
        graph.erase_node(node)


def _only_checks_below(node: fx.Node) -> list[fx.Node] | None:
    """The assertion nodes that use ``node`` in order, or None if real code uses it."""
    found: list[fx.Node] = []
    stack = list(node.users)
    while stack:
        user = stack.pop()
        if user in found:
            continue
        name = getattr(user.target, "__name__", "")
        if user.op != "call_function" or name not in ("eq", "_assert", "_assert_is_none"):
            return None
        found.append(user)
        stack.extend(user.users)
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return sorted(found, key=order.__getitem__)
