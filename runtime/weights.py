"""Weight versions of one stage: stashed (PipeDream, 2BW), current (stale) or predicted
(PipeOptim), for the F and B actions of an asynchronous schedule.

The current weights live in the module's parameters, and the optimizer updates them in place.
An older version that a later compute still uses is kept as its own tensors, copied just before
the step that would overwrite it (:meth:`VersionStore.step`).

A compute with version v (:meth:`VersionStore.use`) swaps v's tensors into ``param.data`` and
swaps the current ones back after. A forward whose backward needs other weights than the ones
it ran with records, while inside, autograd's saved tensors that are parameters (or views of
them) as references, not as tensors: the backward reads them from the version in use around
it. So

* a step between a forward and its backward neither trips autograd's check that saved tensors
  were not modified in place, nor changes the weights the backward computes with: the version
  of the B action decides (PipeDream's stash when it equals the F's, stale when it is newer);
* gradients land in ``.grad`` of the same Parameter objects, and the optimizer step applies
  them to the current weights: W(t + 1) = W(t) - lr * grad f(W_stashed).

Tensors computed from the weights (not views of them), such as activations, keep the values
of the forward's version, as they would without any of this.

Recording costs a Python call per saved tensor, so a forward records only where it must
(:func:`forwards_to_record`): where the backward computes with another version or the forward
with a prediction, or where a step comes between the two. Elsewhere the backward swaps in the
forward's version, and the saved parameters read it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import nn

from runtime.schedule import BACKWARD, FORWARD, STEP, Action

Direction = Callable[[Mapping, torch.Tensor, Mapping], torch.Tensor | None]
"""An optimizer's step direction for one parameter, from its group and its state."""


class VersionError(LookupError):
    """A compute asks for a weight version the stage does not hold."""


class _ParameterRef(NamedTuple):
    """A saved tensor that is parameter ``index``, or a view of it, of whichever version the
    backward runs with."""

    index: int
    size: torch.Size
    stride: tuple[int, ...]
    offset: int


def _storage(tensor: torch.Tensor) -> int:
    """Where a tensor's storage starts: views of one tensor share it."""
    return tensor.untyped_storage().data_ptr()


def _check_own_storage(parameters: Sequence[nn.Parameter]) -> None:
    """Saved parameters are told apart by storage, so each needs its own."""
    seen: set[int] = set()
    for parameter in parameters:
        if not parameter.numel():
            continue
        if _storage(parameter) in seen:
            raise ValueError(
                "VersionStore needs every parameter in its own storage; these share one "
                "(flattened parameters): keep versions of the module before flattening it"
            )
        seen.add(_storage(parameter))


class VersionStore:
    """The weight versions of one stage module, for computes with old, current or predicted
    weights. Version v is the module's weights after v optimizer steps; it starts at 0."""

    def __init__(self, module: nn.Module) -> None:
        self.parameters = tuple(module.parameters())
        _check_own_storage(self.parameters)
        self._current = 0
        self._stored: dict[int, tuple[torch.Tensor, ...]] = {}
        self._in_use: int | None = None
        self._outside: tuple[torch.Tensor, ...] | None = None

    @property
    def current(self) -> int:
        """The version the parameters hold outside a compute: how many steps were taken."""
        return self._current

    @property
    def versions(self) -> tuple[int, ...]:
        """Every version held now, the current one included."""
        return tuple(sorted({*self._stored, self._current}))

    @contextlib.contextmanager
    def use(self, version: int | None, record: bool = True) -> Iterator[None]:
        """Compute with the weights of ``version``: run an F's forward or a B's backward inside.

        The parameters hold that version inside and the current weights again after. With
        ``record`` the parameters autograd saves inside are recorded as references, for a
        backward that runs with other weights; a backward itself runs without, and reads the
        references of its forward from the version it names. None means the current weights
        with nothing recorded, as a synchronous schedule computes.
        """
        if version is None:
            yield
            return
        tensors = tuple(self._tensor(version, k) for k in range(len(self.parameters)))
        with self._computing(tensors, version, record):
            yield

    @contextlib.contextmanager
    def predicted(self, optimizer: torch.optim.Optimizer, steps: int) -> Iterator[None]:
        """Run a forward with PipeOptim's prediction of the weights ``steps`` steps ahead of the
        current ones (see :func:`predicted_weights`). Its backward, run under ``use`` of the B's
        version, computes with those weights, not with the prediction."""
        weights = predicted_weights(optimizer, steps)
        tensors = tuple(weights.get(p, p.detach()) for p in self.parameters)
        with self._computing(tensors, self._current, record=True):
            yield

    @contextlib.contextmanager
    def step(self, keep: Collection[int] = ()) -> Iterator[None]:
        """Wrap the optimizer step that turns the current version v into v + 1.

        ``keep`` holds the versions up to v that later computes of this stage still use
        (:func:`versions_to_keep`): v is copied before the step if it is among them, and every
        other stored version is let go after.
        """
        if self._in_use is not None:
            raise RuntimeError("an optimizer step cannot run inside a compute of VersionStore")
        if self._current in keep:
            self._stored[self._current] = tuple(p.detach().clone() for p in self.parameters)
        yield
        self._current += 1
        self._stored = {v: tensors for v, tensors in self._stored.items() if v in keep}

    def _tensor(self, version: int, index: int) -> torch.Tensor:
        """Parameter ``index`` as it is in ``version``."""
        if version == self._current:
            if self._outside is not None:
                return self._outside[index]
            return self.parameters[index].data
        if version not in self._stored:
            raise VersionError(
                f"weight version {version} is not held (held: {list(self.versions)}): keep it at "
                "every step before its last use; versions_to_keep says which"
            )
        return self._stored[version][index]

    @contextlib.contextmanager
    def _computing(
        self, tensors: Sequence[torch.Tensor], version: int, record: bool
    ) -> Iterator[None]:
        """Swap ``tensors`` into the parameters and, with ``record``, record saved parameters
        as references."""
        if self._in_use is not None:
            raise RuntimeError("computes of one VersionStore do not nest")
        self._outside = tuple(p.data for p in self.parameters)
        self._in_use = version
        try:
            for parameter, tensor in zip(self.parameters, tensors):
                parameter.data = tensor
            if record:
                index = {_storage(t): k for k, t in enumerate(tensors) if t.numel()}
                with torch.autograd.graph.saved_tensors_hooks(
                    self._packer(index, tensors), self._unpack
                ):
                    yield
            else:
                yield
        finally:
            for parameter, tensor in zip(self.parameters, self._outside):
                parameter.data = tensor
            self._in_use = self._outside = None

    @staticmethod
    def _packer(
        index: Mapping[int, int], tensors: Sequence[torch.Tensor]
    ) -> Callable[[torch.Tensor], torch.Tensor | _ParameterRef]:
        """A pack hook that turns parameters, and views of them, into references."""

        def pack(saved: torch.Tensor) -> torch.Tensor | _ParameterRef:
            if saved.layout != torch.strided or saved.is_nested:
                return saved
            k = index.get(_storage(saved))
            if k is None:
                return saved
            offset = saved.storage_offset() - tensors[k].storage_offset()
            return _ParameterRef(k, saved.size(), saved.stride(), offset)

        return pack

    def _unpack(self, saved: torch.Tensor | _ParameterRef) -> torch.Tensor:
        """Read a reference from the version in use now (the current one outside ``use``)."""
        if not isinstance(saved, _ParameterRef):
            return saved
        version = self._current if self._in_use is None else self._in_use
        tensor = self._tensor(version, saved.index)
        return tensor.as_strided(saved.size, saved.stride, tensor.storage_offset() + saved.offset)


def versions_to_keep(actions: Sequence[Action]) -> list[frozenset[int]]:
    """For each step in one stage's action list, in order: the versions up to the one it
    replaces that a later F or B still uses, which :meth:`VersionStore.step` must keep."""
    last_use: dict[int, int] = {}
    for index, action in enumerate(actions):
        if action.kind != STEP and action.version is not None:
            last_use[action.version] = index
    keeps = []
    live: set[int] = set()
    current = 0
    for index, action in enumerate(actions):
        if action.kind != STEP:
            continue
        live = {v for v in live | {current} if last_use.get(v, -1) > index}
        keeps.append(frozenset(live))
        current += 1
    return keeps


def forwards_to_record(actions: Sequence[Action]) -> frozenset[int]:
    """The microbatches of one stage's action list whose F must record saved parameters as
    references (``VersionStore.use(..., record=True)``): those whose B computes with other
    weights than the F (the F predicts them, or the B names another version), and those with a
    step between the F and the B, which updates the parameters autograd saved in place (autograd
    refuses to read a saved tensor modified since). Every other B finds the weights its F saved
    by swapping in the same version."""
    recorded = set()
    forwards: dict[int, tuple[Action, int]] = {}
    steps = 0
    for action in actions:
        if action.kind == STEP:
            steps += 1
        elif action.version is None:
            continue
        elif action.kind == FORWARD:
            forwards[action.microbatch] = (action, steps)
        elif action.kind == BACKWARD and action.microbatch in forwards:
            forward, steps_before = forwards.pop(action.microbatch)
            stepped = steps > steps_before
            if forward.predict or forward.version != action.version or stepped:
                recorded.add(action.microbatch)
    return frozenset(recorded)


def _sgd_direction(group: Mapping, parameter: torch.Tensor, state: Mapping) -> torch.Tensor | None:
    """SGD's step direction: the momentum buffer m_t = u m_(t-1) + (1 - dampening) g_t.

    Without momentum SGD keeps no direction, so there is nothing to predict with.
    """
    return state.get("momentum_buffer")


def _adam_direction(group: Mapping, parameter: torch.Tensor, state: Mapping) -> torch.Tensor | None:
    """Adam's step direction m_hat / (sqrt(v_hat) + eps), bias-corrected at the steps taken;
    AdamW adds its decoupled weight decay, weight_decay * W."""
    if "step" not in state:
        return None
    t = float(state["step"])
    beta1, beta2 = (float(beta) for beta in group["betas"])
    second = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
    m_hat = state["exp_avg"] / (1 - beta1**t)
    v_hat = second / (1 - beta2**t)
    direction = m_hat / (v_hat.sqrt() + group["eps"])
    if group.get("decoupled_weight_decay"):
        direction = direction + group["weight_decay"] * parameter.detach()
    return direction


def _direction_rule(optimizer: torch.optim.Optimizer) -> Direction:
    """The step direction of a supported optimizer."""
    if isinstance(optimizer, torch.optim.SGD):
        return _sgd_direction
    if isinstance(optimizer, torch.optim.Adam):
        return _adam_direction
    raise ValueError(
        f"weight prediction (pipeoptim) knows the step direction of SGD, Adam and AdamW, "
        f"not {type(optimizer).__name__}: use one of those or another schedule"
    )


def predicted_weights(
    optimizer: torch.optim.Optimizer, steps: int
) -> dict[nn.Parameter, torch.Tensor]:
    """PipeOptim's weights ``steps`` steps ahead: W_hat = W - lr * steps * dW, per parameter.

    dW is the optimizer's own step direction, read from its state: the momentum buffer for SGD,
    m_hat / (sqrt(v_hat) + eps) for Adam, plus weight_decay * W for AdamW. A parameter with no
    direction yet (before the first step, or SGD without momentum) is predicted to stay as it
    is, and is returned as the parameter's own data rather than a copy.
    """
    direction_of = _direction_rule(optimizer)
    predicted = {}
    with torch.no_grad():
        for group in optimizer.param_groups:
            lr = float(group["lr"])
            for parameter in group["params"]:
                direction = direction_of(group, parameter, optimizer.state.get(parameter, {}))
                if direction is None or steps == 0:
                    predicted[parameter] = parameter.detach()
                else:
                    predicted[parameter] = parameter.detach() - lr * steps * direction
    return predicted
