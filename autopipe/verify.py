"""Transparency check: the stages, run in sequence, behave exactly like the original model.

The stages are wired by ``PIPELINE`` as the runtime wires them: every value that crosses a stage
boundary is copied and detached, and gradients travel back by hand, stage by stage. Outputs,
every parameter's gradient (by original name) and every buffer after the step are compared.
Dropout modules are switched off in both models and the random generators are seeded alike.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from autopipe.trace import bind_inputs

_DROPOUT_TYPES = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


class VerificationError(AssertionError):
    """The partitioned model does not compute what the original computes."""


@dataclass(frozen=True)
class VerifyReport:
    outputs: int
    gradients: int
    buffers: int
    max_difference: float

    def __str__(self) -> str:
        return (
            f"{self.outputs} outputs, {self.gradients} parameter gradients and {self.buffers} "
            f"buffers match the original (largest difference {self.max_difference:.3g})"
        )


def _switch_off_dropout(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, _DROPOUT_TYPES):
            m.eval()


def _receive(value: Any, spec: Mapping[str, Any]) -> Any:
    """What a stage gets over the wire: a fresh copy, asking for a gradient if the value has one."""
    if not isinstance(value, torch.Tensor):
        return value
    received = value.detach().clone()
    if spec.get("requires_grad") and (received.is_floating_point() or received.is_complex()):
        received.requires_grad_(True)
    return received


def _differs(found: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> float | None:
    """The largest difference if it is over tolerance, else None."""
    if found.shape != expected.shape:
        return float("inf")
    if not (found.is_floating_point() or found.is_complex()):
        return None if torch.equal(found, expected) else float("inf")
    difference = (found.double() - expected.double()).abs().max().item() if found.numel() else 0.0
    scale = expected.double().abs().max().item() if expected.numel() else 0.0
    return difference if difference > atol + rtol * scale or difference != difference else None


def _max_difference(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    worst = 0.0
    for a, b in pairs:
        if a.numel() and (a.is_floating_point() or a.is_complex()) and a.shape == b.shape:
            worst = max(worst, (a.double() - b.double()).abs().max().item())
    return worst


def verify(
    model: nn.Module,
    example_inputs: Sequence[Any] | Mapping[str, Any],
    generated: ModuleType,
    seed: int = 0,
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> VerifyReport:
    """Compare the generated stages with ``model`` on ``example_inputs``; raise on a mismatch.

    The user's model and inputs are not touched: copies are run, the model in training mode.
    """
    original = copy.deepcopy(model).train()
    _switch_off_dropout(original)
    stages = generated.build_stages(original.state_dict())
    for stage in stages:
        stage.train()
        _switch_off_dropout(stage)
    pipeline = generated.PIPELINE
    names, inputs, _ = bind_inputs(original, example_inputs)

    torch.manual_seed(seed)
    # the model may write into its inputs: it gets copies, so the stages see the inputs as given
    copies = tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, inputs)
    expected = original(**dict(zip(names, copies)))
    expected_outputs = [t for t in tree_flatten(expected)[0] if isinstance(t, torch.Tensor)]
    generator = torch.Generator().manual_seed(seed)
    output_grads = [
        torch.randn(t.shape, generator=generator, dtype=t.dtype) if t.requires_grad else None
        for t in expected_outputs
    ]
    pairs = [(t, g) for t, g in zip(expected_outputs, output_grads) if g is not None]
    if pairs:
        torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])

    torch.manual_seed(seed)
    values: dict[str, Any] = dict(zip(pipeline["model_inputs"], inputs))
    received: list[list[Any]] = []
    produced: list[tuple[Any, ...]] = []
    for index, (stage, spec) in enumerate(zip(stages, pipeline["stages"])):
        args = [_receive(values[name], spec["values"][name]) for name in spec["inputs"]]
        outputs = stage(*args)
        if len(outputs) != len(spec["outputs"]):
            raise VerificationError(
                f"stage {index} returned {len(outputs)} values, PIPELINE lists {len(spec['outputs'])}"
            )
        values.update(zip(spec["outputs"], outputs))
        received.append(args)
        produced.append(outputs)

    found_outputs = list(produced[-1])
    if len(found_outputs) != len(expected_outputs):
        raise VerificationError(
            f"the stages return {len(found_outputs)} outputs, the model {len(expected_outputs)}"
        )
    for name, found, expected in zip(pipeline["model_outputs"], found_outputs, expected_outputs):
        difference = _differs(found.detach(), expected.detach(), rtol, atol)
        if difference is not None:
            raise VerificationError(
                f"output {name!r} (stage {len(stages) - 1}) differs by {difference:.3g}"
            )

    # the model's output gradients enter at the last stage only; a value an earlier stage sends
    # on to be returned gets them back through the last stage's input
    seeds: dict[str, torch.Tensor] = {}
    for name, grad in zip(pipeline["model_outputs"], output_grads):
        if grad is not None:
            seeds[name] = seeds[name] + grad if name in seeds else grad
    grads: dict[str, torch.Tensor] = {}
    for index in reversed(range(len(stages))):
        spec = pipeline["stages"][index]
        upstream = seeds if index == len(stages) - 1 else grads
        # a value listed twice (a model returning it twice) already has its gradients summed
        pairs = [
            (t, upstream[name])
            for name, t in dict(zip(spec["outputs"], produced[index])).items()
            if isinstance(t, torch.Tensor) and t.requires_grad and name in upstream
        ]
        if pairs:
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
        for name, arg in zip(spec["inputs"], received[index]):
            if isinstance(arg, torch.Tensor) and arg.grad is not None:
                grads[name] = grads[name] + arg.grad if name in grads else arg.grad

    checked = _compare_state(original, stages, rtol, atol)
    compared = list(zip(found_outputs, expected_outputs)) + checked
    gradients = sum(1 for _, p in original.named_parameters() if p.grad is not None)
    buffers = len(list(original.named_buffers()))
    return VerifyReport(
        len(expected_outputs),
        gradients,
        buffers,
        _max_difference([(a.detach(), b.detach()) for a, b in compared]),
    )


def _compare_state(
    original: nn.Module, stages: list[nn.Module], rtol: float, atol: float
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Compare gradients (summed over every copy of a tied parameter) and buffers by original name."""
    state = original.state_dict(keep_vars=True)
    copies: dict[int, dict[int, tuple[int, nn.Parameter]]] = {}
    stage_buffers: dict[str, tuple[int, torch.Tensor]] = {}
    for index, stage in enumerate(stages):
        for key, param in stage.named_parameters(remove_duplicate=False):
            copies.setdefault(id(state[key]), {})[id(param)] = (index, param)
        for key, buffer in stage.named_buffers(remove_duplicate=False):
            stage_buffers[key] = (index, buffer)
    compared = []
    for name, param in original.named_parameters():
        held = copies.get(id(param), {})
        if not held:
            raise VerificationError(f"no stage holds parameter {name!r}")
        stage_grads = [p.grad for _, p in held.values() if p.grad is not None]
        where = ", ".join(str(i) for i in sorted({i for i, _ in held.values()}))
        if param.grad is None:
            if stage_grads and any(g.abs().max() > 0 for g in stage_grads):
                raise VerificationError(
                    f"parameter {name!r} (stage {where}) gets a gradient the original does not"
                )
            continue
        if not stage_grads:
            raise VerificationError(f"gradient of {name!r} (stage {where}) is missing")
        total = torch.stack(stage_grads).sum(0) if len(stage_grads) > 1 else stage_grads[0]
        difference = _differs(total, param.grad, rtol, atol)
        if difference is not None:
            raise VerificationError(
                f"gradient of {name!r} (stage {where}) differs by {difference:.3g}"
            )
        compared.append((total, param.grad))
    for name, buffer in original.named_buffers():
        if name not in stage_buffers:
            continue
        index, found = stage_buffers[name]
        difference = _differs(found, buffer, rtol, atol)
        if difference is not None:
            raise VerificationError(
                f"buffer {name!r} (stage {index}) differs by {difference:.3g} after the step"
            )
        compared.append((found, buffer))
    return compared
