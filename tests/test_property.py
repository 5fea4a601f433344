"""Property test: random DAG models partition, generate and verify at 1 to 4 stages.

A model is a list of op specs interpreted by ``SpecNet``, whose ``forward`` loops over them,
keeping every value in a list; each op reads earlier values (so skips reach across many ops)
and appends one value of shape ``(BATCH, WIDTH)``. The ops cover layers called twice and tied
weights, parameters and buffers held by non-leaf modules, a buffer written in forward, tensor
methods and shape-dependent views, and in-place writes (methods, ``+=``, ``inplace=True``,
through views, into inputs). The draw tracks which tensors autograd has saved, so writes only
go where the original model itself can run backward. Models take one to three inputs, as a
tuple or a dict, and return a tensor, a tuple or a dict. Plain regression tests follow, one
for each bug the property found.
"""

from __future__ import annotations

import functools
import operator
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import autopipe
from autopipe.graph import placement_groups

BATCH = 3
TOO_FEW_GROUPS = "too few groups"
WIDTH = 8

# op kind -> (number of value operands, whether it writes into its first operand)
OPS: dict[str, tuple[int, bool]] = {
    "linear": (1, False),
    "linear_reuse": (1, False),
    "linear_tied": (1, False),
    "add": (2, False),
    "mul": (2, False),
    "tanh": (1, False),
    "scale": (1, False),
    "affine": (1, False),
    "reshape": (1, False),
    "center": (1, False),
    "pool": (1, False),
    "chunk": (1, False),
    "stat": (1, False),
    "add_": (2, True),
    "iadd": (2, True),
    "mul_": (1, True),
    "view_mul_": (1, True),
    "narrow_copy_": (2, True),
    "relu_": (1, True),
    "relu_module": (1, True),
    "relu_functional": (1, True),
}
_SAVES_OPERANDS = frozenset({"linear", "linear_reuse", "linear_tied", "mul", "scale", "affine"})
_SAVES_RESULT = frozenset({"tanh", "relu_", "relu_module", "relu_functional"})
_NEEDS_LINEAR = frozenset({"linear_reuse", "linear_tied"})


@dataclass(frozen=True)
class Op:
    """One op: its kind, the values it reads, the linear layer it reuses or ties to, and a
    variant (no bias; a frozen parameter and a non-persistent buffer; reshape or flatten)."""

    kind: str
    operands: tuple[int, ...]
    linear: int = -1
    flag: bool = False


@dataclass(frozen=True)
class Design:
    """Everything that describes one random model and how it is called."""

    n_inputs: int
    signature: str
    as_dict: bool
    input_order: tuple[int, ...]
    ops: tuple[Op, ...]
    outputs: tuple[int, ...]
    output_kind: str
    n_stages: int


class Affine(nn.Module):
    """A non-leaf module holding its parameters and a buffer directly."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width))
        self.bias = nn.Parameter(torch.randn(width))
        self.register_buffer("offset", torch.randn(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight + self.bias + self.offset


class SpecNet(nn.Module):
    """Interprets a list of ops; subclasses only fix the signature of ``forward``."""

    def __init__(self, ops: tuple[Op, ...], outputs: tuple[int, ...], output_kind: str) -> None:
        super().__init__()
        self.ops = ops
        self.outputs = outputs
        self.output_kind = output_kind
        self.linears = nn.ModuleList()
        self.blocks = nn.ModuleList()
        self.relu = nn.ReLU(inplace=True)
        if any(op.kind == "stat" for op in ops):
            self.register_buffer("stat", torch.zeros(WIDTH))
        for index, op in enumerate(ops):
            if op.kind in ("linear", "linear_tied"):
                layer = nn.Linear(WIDTH, WIDTH, bias=not op.flag)
                if op.kind == "linear_tied":
                    layer.weight = self.linears[op.linear].weight
                self.linears.append(layer)
            elif op.kind == "scale":
                scale = nn.Parameter(torch.randn(WIDTH), requires_grad=not op.flag)
                self.register_parameter(f"scale{index}", scale)
                self.register_buffer(f"shift{index}", torch.randn(WIDTH), persistent=not op.flag)
            elif op.kind == "affine":
                self.blocks.append(Affine(WIDTH))

    def run(self, values: list[Any]) -> Any:
        """Apply every op in turn and return the chosen values as a tensor, tuple or dict."""
        linears, blocks = iter(self.linears), iter(self.blocks)
        for index, op in enumerate(self.ops):
            a = values[op.operands[0]]
            b = values[op.operands[-1]]
            if op.kind in ("linear", "linear_tied"):
                out = next(linears)(a)
            elif op.kind == "linear_reuse":
                out = self.linears[op.linear](a)
            elif op.kind == "add":
                out = a + b
            elif op.kind == "mul":
                out = a * b
            elif op.kind == "tanh":
                out = torch.tanh(a)
            elif op.kind == "scale":
                out = a * getattr(self, f"scale{index}") + getattr(self, f"shift{index}")
            elif op.kind == "affine":
                out = next(blocks)(a)
            elif op.kind == "reshape":
                folded = a.view(a.size(0), 2, a.shape[-1] // 2).transpose(1, 2)
                out = folded.reshape(a.shape[0], -1) if op.flag else folded.flatten(1)
            elif op.kind == "center":
                out = a - a.mean(dim=-1, keepdim=True)
            elif op.kind == "pool":
                out = a + a.sum(0) * 0.1 + a.mean()
            elif op.kind == "chunk":
                left, right = a.chunk(2, dim=-1)
                out = torch.cat([right, left * 2.0], dim=-1)
            elif (
                op.kind == "stat"
            ):  # a running statistic: every stat op writes the buffer, then reads it
                self.stat.add_(a.detach().mean(0))
                out = a + self.stat
            elif op.kind == "add_":
                out = a.add_(b)
            elif op.kind == "iadd":
                a += b
                values[op.operands[0]] = a
                out = a
            elif op.kind == "mul_":
                out = a.mul_(0.5)
            elif (
                op.kind == "narrow_copy_"
            ):  # fx cannot trace `a[:, :4] = ...`; this writes the same way
                a.narrow(1, 0, WIDTH // 2).copy_(b.narrow(1, WIDTH // 2, WIDTH // 2))
                out = a
            elif op.kind == "view_mul_":
                a.view(a.size(0), 2, -1).mul_(0.5)
                out = a
            elif op.kind == "relu_":
                out = a.relu_()
            elif op.kind == "relu_module":
                out = self.relu(a)
            else:
                out = nn.functional.relu(a, inplace=True)
            values.append(out)
        chosen = [values[i] for i in self.outputs]
        if self.output_kind == "single":
            return chosen[0]
        if self.output_kind == "tuple":
            return tuple(chosen)
        return {f"out{k}": v for k, v in enumerate(chosen)}


class OneInput(SpecNet):
    def forward(self, x: torch.Tensor) -> Any:
        return self.run([x])


class TwoInputs(SpecNet):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> Any:
        return self.run([x, y])


class OptionalInput(SpecNet):
    """Three inputs, the last one optional: left out, it is traced as a constant None."""

    def forward(self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor | None = None) -> Any:
        return self.run([x, y] if z is None else [x, y, z])


SIGNATURES: dict[str, tuple[type[SpecNet], tuple[int, ...]]] = {
    "one": (OneInput, (1,)),
    "two": (TwoInputs, (2,)),
    "optional": (OptionalInput, (2, 3)),
}


@dataclass
class _Values:
    """What the draw knows about each value: which tensor it is, and which tensors autograd saved."""

    tensor: list[int] = field(default_factory=list)
    saved: set[int] = field(default_factory=set)
    aliased: set[int] = field(default_factory=set)

    def add(self, tensor: int | None = None) -> None:
        if tensor is None:
            tensor = len(self.tensor)
        elif tensor in self.tensor:
            self.aliased.add(tensor)
        self.tensor.append(tensor)

    def writable(self) -> list[int]:
        return [i for i, t in enumerate(self.tensor) if t not in self.saved]


@st.composite
def designs(draw: st.DrawFn) -> Design:
    """A random model: inputs, a list of ops over earlier values, outputs and a stage count."""
    signature = draw(st.sampled_from(sorted(SIGNATURES)))
    n_inputs = draw(st.sampled_from(SIGNATURES[signature][1]))
    as_dict = draw(st.booleans())
    input_order = (
        tuple(draw(st.permutations(range(n_inputs)))) if as_dict else tuple(range(n_inputs))
    )
    values = _Values()
    for _ in range(n_inputs):
        values.add()
    n_linears = 0
    ops: list[Op] = []
    for _ in range(draw(st.integers(3, 12))):
        kind = draw(st.sampled_from(list(OPS)))  # one fixed list, so each kind keeps its chance
        if kind in _NEEDS_LINEAR and not n_linears:
            kind = "linear"
        arity, writes = OPS[kind]
        if writes:
            candidates = values.writable()
            if (
                kind == "iadd"
            ):  # fx traces `a += b` as `a = a + b`: only exact when `a` has no alias
                candidates = [i for i in candidates if values.tensor[i] not in values.aliased]
            if not candidates:
                kind, arity, writes = "add", 2, False
        # operands count back from the newest value: chains by default, skips of any length
        newest = len(values.tensor) - 1
        back = st.integers(0, newest).map(functools.partial(operator.sub, newest))
        first = draw(st.sampled_from(candidates[::-1])) if writes else draw(back)
        operands = (first,) + tuple(draw(back) for _ in range(arity - 1))
        linear = draw(st.integers(0, n_linears - 1)) if kind in _NEEDS_LINEAR else -1
        op = Op(kind, operands, linear, draw(st.booleans()))
        ops.append(op)
        n_linears += kind in ("linear", "linear_tied")
        if kind in _SAVES_OPERANDS:
            values.saved.update(values.tensor[i] for i in operands)
        if writes:
            values.add(values.tensor[first])
        else:
            values.add()
        if kind in _SAVES_RESULT:
            values.saved.add(values.tensor[-1])
    last = len(values.tensor) - 1
    extra = draw(st.lists(st.integers(0, last), max_size=3))
    outputs = tuple(extra) + (last,)
    kinds = ["tuple", "dict"] + (["single"] if len(outputs) == 1 else [])
    output_kind = draw(st.sampled_from(kinds))
    n_stages = draw(st.sampled_from([2, 3, 4, 1]))  # mostly more than one stage
    return Design(
        n_inputs, signature, as_dict, input_order, tuple(ops), outputs, output_kind, n_stages
    )


def build(design: Design) -> tuple[SpecNet, tuple[torch.Tensor, ...] | dict[str, torch.Tensor]]:
    """The model of ``design`` with fixed weights, and its example inputs."""
    torch.manual_seed(0)
    model = SIGNATURES[design.signature][0](design.ops, design.outputs, design.output_kind)
    generator = torch.Generator().manual_seed(1)
    tensors = [torch.randn(BATCH, WIDTH, generator=generator) for _ in range(design.n_inputs)]
    if not design.as_dict:
        return model, tuple(tensors)
    names = "xyz"
    return model, {names[i]: tensors[i] for i in design.input_order}


def compile_and_verify(model: nn.Module, inputs: Any, n_stages: int) -> str | None:
    """Compile ``model`` into a temporary file and verify it.

    Returns None on success, ``TOO_FEW_GROUPS`` when the model cannot be cut that often, and the
    traceback of anything else, so that the temporary file's random path is not where the test
    fails (hypothesis would take the failures of one bug for different ones).
    """
    with tempfile.TemporaryDirectory() as directory:
        try:
            result = autopipe.compile(model, inputs, n_stages, output=Path(directory) / "stages.py")
            result.verify()
        except autopipe.UserError as error:
            return (
                TOO_FEW_GROUPS
                if "stages is more than that" in str(error)
                else traceback.format_exc()
            )
        except Exception:  # noqa: BLE001 - any failure is reported with its traceback
            return traceback.format_exc()
    if len(result.stages) != n_stages:
        return f"{len(result.stages)} stages were built, not {n_stages}"
    return None


@settings(
    max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(designs())
def test_random_models_partition_generate_and_verify(design: Design) -> None:
    """Every random model compiles into the drawn number of stages and matches the original."""
    model, inputs = build(design)
    failure = compile_and_verify(model, inputs, design.n_stages)
    assume(failure != TOO_FEW_GROUPS)
    if failure is not None:
        pytest.fail(failure, pytrace=False)


# Regression tests for the bugs the property found, one model each.


class _Pair(nn.Module):
    """Two linear layers side by side; ``same`` returns the first result twice."""

    def __init__(self, same: bool) -> None:
        super().__init__()
        self.first = nn.Linear(WIDTH, WIDTH)
        self.second = nn.Linear(WIDTH, WIDTH)
        self.same = same

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.first(x)
        b = self.second(x)
        return (a, a) if self.same else (a, b)


class _WritesInput(nn.Module):
    """Writes a value that needs a gradient into its input ``x``, then reads ``x``."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(WIDTH, WIDTH)
        self.second = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x.add_(self.first(y))
        return self.second(x)


class _ReturnsWrittenInput(nn.Module):
    """Writes into its input ``x`` and returns it."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(WIDTH, WIDTH)
        self.second = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x.add_(self.first(y))
        return self.second(x), x


class _ReadsInputAfterWrite(nn.Module):
    """``torch.tanh(x)`` reads the written input and depends on nothing, but feeds a later write
    into ``a``, which was made before the write into ``x``."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a = y + x
        x.mul_(0.5)
        a.add_(torch.tanh(x))
        return self.head(a)


class _ReadsBeforeWrite(nn.Module):
    """``a`` reads ``h`` before ``h`` is written into; ``a`` must not see the write."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.first(x)
        a = h + h
        h.add_(x)
        return h, self.head(a)


class _ReadsBetweenWrites(nn.Module):
    """``a`` reads ``h`` between two writes; the second goes through the first one's result."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.first(x)
        g = h.add_(x)
        a = h + h
        g.mul_(0.5)
        return h, self.head(a)


class _WriteMakesGrad(nn.Module):
    """``c`` needs no gradient until a write adds one; a later stage must send it back."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(WIDTH, WIDTH)
        self.layers = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x * 2.0
        c.add_(self.first(x))
        return self.layers(c)


class _RunningStat(nn.Module):
    """A buffer written in forward and read before and after, far apart."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("stat", torch.zeros(WIDTH))
        self.first = nn.Linear(WIDTH, WIDTH)
        self.second = nn.Linear(WIDTH, WIDTH)
        self.third = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.first(x) + self.stat
        self.stat.add_(a.detach().mean(0))
        return self.third(self.second(a) + self.stat)


def _inputs(n: int) -> tuple[torch.Tensor, ...]:
    """``n`` fixed example inputs of shape ``(BATCH, WIDTH)``."""
    generator = torch.Generator().manual_seed(1)
    return tuple(torch.randn(BATCH, WIDTH, generator=generator) for _ in range(n))


def _compile_and_verify(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], n_stages: int
) -> autopipe.CompileResult:
    """Compile ``model`` into a temporary file, verify it and return the result."""
    with tempfile.TemporaryDirectory() as directory:
        result = autopipe.compile(model, inputs, n_stages, output=Path(directory) / "stages.py")
        result.verify()
    return result


@pytest.mark.parametrize("n_stages", [1, 2])
def test_a_value_returned_twice_gets_its_gradient_once(n_stages: int) -> None:
    """verify: an output listed twice had its summed gradient applied once per listing."""
    torch.manual_seed(0)
    _compile_and_verify(_Pair(same=True), _inputs(1), n_stages)


def test_an_output_an_earlier_stage_sends_on_gets_its_gradient_once() -> None:
    """verify: an output made before the last stage got its gradient there and again on the way."""
    torch.manual_seed(0)
    result = _compile_and_verify(_Pair(same=False), _inputs(1), 2)
    assert result.pipeline["stages"][1]["inputs"][-1] in result.pipeline["model_outputs"]


@pytest.mark.parametrize("n_stages", [1, 2])
def test_a_model_writing_into_its_input(n_stages: int) -> None:
    """verify ran the original on the user's inputs, so the stages saw them already written."""
    torch.manual_seed(0)
    inputs = _inputs(2)
    given = [t.clone() for t in inputs]
    _compile_and_verify(_WritesInput(), inputs, n_stages)
    assert all(torch.equal(a, b) for a, b in zip(inputs, given))


def test_a_model_returning_an_input_it_wrote_into() -> None:
    """trace: the write into ``x`` went into the copy of ``x`` of the stage that ran it, while
    the returned ``x`` came from stage 0; now the program writes into a copy it makes itself."""
    torch.manual_seed(0)
    result = _compile_and_verify(_ReturnsWrittenInput(), _inputs(2), 2)
    x = next(n for n in result.traced.graph_module.graph.nodes if n.name == "x")
    assert [(user.op, user.target) for user in x.users] == [("call_method", "clone")]


def _group_of(result: autopipe.CompileResult, node: str) -> set[str]:
    """The placement group that holds ``node``."""
    groups = placement_groups(result.graph, result.traced.graph_module)
    return next(g for g in groups if node in g)


def test_a_write_into_an_input_comes_before_every_later_reader() -> None:
    """placement_groups: the write into ``x`` was in no group, so ``torch.tanh(x)``, which
    depends on nothing, could run in stage 0, before the write in stage 1, on the unwritten input.
    """
    torch.manual_seed(0)
    result = _compile_and_verify(_ReadsInputAfterWrite(), _inputs(2), 2)
    assert {"add", "mul_", "tanh", "add_"} <= _group_of(result, "mul_")


def test_a_reader_before_a_write_stays_with_the_write() -> None:
    """placement_groups: ``a = h + h`` could run in a later stage than ``h.add_(x)``, on the
    written ``h``."""
    torch.manual_seed(0)
    result = _compile_and_verify(_ReadsBeforeWrite(), _inputs(1), 2)
    assert {"first", "add", "add_"} <= _group_of(result, "add_")


def test_a_reader_between_two_writes_stays_with_the_second() -> None:
    """placement_groups: the second write's tensor was taken to be the first write's result, so
    readers of ``h`` itself were not kept with it."""
    torch.manual_seed(0)
    result = _compile_and_verify(_ReadsBetweenWrites(), _inputs(1), 2)
    assert {"first", "add_", "add", "mul_"} <= _group_of(result, "mul_")


def test_a_write_that_adds_a_gradient_is_sent_with_it() -> None:
    """propagate_values: ``c`` was described as it was made, needing no gradient, so the next
    stage got it without one and ``first`` got no gradient."""
    torch.manual_seed(0)
    result = _compile_and_verify(_WriteMakesGrad(), _inputs(1), 2)
    assert result.graph.nodes["mul"]["value"].requires_grad


@pytest.mark.parametrize("n_stages", [1, 2, 3])
def test_a_buffer_written_in_forward_is_held_by_one_stage(n_stages: int) -> None:
    """placement_groups: every stage reading ``stat`` held its own copy, and only one saw the write."""
    torch.manual_seed(0)
    result = _compile_and_verify(_RunningStat(), _inputs(1), n_stages)
    assert sum("stat" in spec["buffers"] for spec in result.pipeline["stages"]) == 1
