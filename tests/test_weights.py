"""Tests for runtime.weights: the update rules of the asynchronous schedules, checked against
computations by hand, in one process."""

import copy
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from functools import cache

import pytest
import torch
from torch import nn

from runtime.schedule import (
    Action,
    Schedule,
    chain_dependencies,
    pipedream,
    pipeoptim,
    simulate,
    stale,
    two_bw,
)
from runtime.weights import (
    VersionError,
    VersionStore,
    forwards_to_record,
    predicted_weights,
    versions_to_keep,
)

LR = 0.1

Weights = list[torch.Tensor]
VersionRule = Callable[[int, int], tuple[int, int]]
"""(stage, microbatch) -> (version of its forward, version of its backward)."""


def linear(weight: list[list[float]]) -> nn.Linear:
    """A bias-free float64 linear layer with the given weight."""
    tensor = torch.tensor(weight, dtype=torch.float64)
    layer = nn.Linear(tensor.shape[1], tensor.shape[0], bias=False, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(tensor)
    return layer


def two_stages() -> list[nn.Module]:
    """Stage 0: h = C tanh(A x); stage 1: out = b h. Both stages' backwards need their weights."""
    first = nn.Sequential(linear([[0.5, -0.3], [0.8, 0.2]]), nn.Tanh(), linear([[0.7, -0.6]]))
    return [first, linear([[1.3]])]


def data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n fixed inputs of 2 features and n targets."""
    x = torch.tensor([[1.0 + 0.1 * i, (-1.0) ** i * 0.5] for i in range(n)], dtype=torch.float64)
    y = torch.tensor([[0.2 * i - 0.4] for i in range(n)], dtype=torch.float64)
    return x, y


def lockstep_order(schedule: Schedule) -> Iterator[Action]:
    """Every action, in the order of the lockstep simulation (by step, then device)."""
    start = simulate(schedule, chain_dependencies(schedule.n_stages)).start
    timed = [
        (start[action], device, index, action)
        for device, actions in enumerate(schedule.actions)
        for index, action in enumerate(actions)
    ]
    return (action for *_, action in sorted(timed, key=lambda t: t[:3]))


def compute(
    store: VersionStore, optimizer: torch.optim.Optimizer, action: Action, record: bool = True
) -> AbstractContextManager[None]:
    """The weights an F computes with."""
    if action.predict:
        return store.predicted(optimizer, action.predict)
    return store.use(action.version, record=record)


def run_pipeline(
    schedule: Schedule,
    momentum: float = 0.0,
    stages: list[nn.Module] | None = None,
    samples: tuple[torch.Tensor, torch.Tensor] | None = None,
    record_all: bool = False,
) -> list[Weights]:
    """Train ``stages`` (default ``two_stages``) on ``samples`` (default ``data``) with
    ``schedule`` in one process, passing tensors between stages as the runtime sends them;
    return each stage's final weights. The Fs record their saved parameters where the
    runtime's executor does (``forwards_to_record``), or, with ``record_all``, every F and B
    computes under the recording."""
    stages = two_stages() if stages is None else stages
    optimizers = [torch.optim.SGD(m.parameters(), lr=LR, momentum=momentum) for m in stages]
    stores = [VersionStore(m) for m in stages]
    keeps = [iter(versions_to_keep(actions)) for actions in schedule.actions]
    recorded = [forwards_to_record(actions) for actions in schedule.actions]
    x, y = data(schedule.n_microbatches) if samples is None else samples
    loss_weight = 1 / schedule.microbatches_per_step
    inputs: dict[tuple[int, int], torch.Tensor] = {}
    outputs: dict[tuple[int, int], torch.Tensor] = {}
    grads: dict[tuple[int, int], torch.Tensor] = {}
    last = len(stages) - 1
    for action in lockstep_order(schedule):
        s, i = action.stage, action.microbatch
        if action.kind == "F":
            value = x[i] if s == 0 else outputs[(s - 1, i)].detach().requires_grad_()
            record = record_all or i in recorded[s]
            with compute(stores[s], optimizers[s], action, record):
                outputs[(s, i)] = stages[s](value)
            inputs[(s, i)] = value
        elif action.kind == "B":
            with stores[s].use(action.version, record=record_all):
                if s == last:
                    loss = loss_weight * 0.5 * (outputs.pop((s, i)) - y[i]).pow(2).sum()
                    loss.backward()
                else:
                    outputs.pop((s, i)).backward(grads.pop((s + 1, i)))
            if s > 0:
                grads[(s, i)] = inputs.pop((s, i)).grad
        else:
            with stores[s].step(next(keeps[s])):
                optimizers[s].step()
            optimizers[s].zero_grad()
    return [[p.detach().clone() for p in stage.parameters()] for stage in stages]


def gradients_by_hand(
    forward: list[Weights], backward: list[Weights], x: torch.Tensor, y: torch.Tensor, w: float
) -> list[Weights]:
    """d(w/2 (out - y)^2) for one microbatch, written out: activations come from the forward's
    weights, the weights each backward multiplies by from the backward's."""
    (a_f, c_f), (b_f,) = forward
    (_, c_b), (b_b,) = backward
    activation = torch.tanh(a_f @ x)
    h = c_f @ activation
    error = w * (b_f @ h - y)
    grad_b = torch.outer(error, h)
    grad_h = b_b.T @ error
    grad_c = torch.outer(grad_h, activation)
    grad_z = (c_b.T @ grad_h) * (1 - activation**2)
    grad_a = torch.outer(grad_z, x)
    return [[grad_a, grad_c], [grad_b]]


def weights_by_hand(
    rule: VersionRule, n: int, per_step: int = 1, momentum: float = 0.0, predict: bool = False
) -> list[Weights]:
    """Each stage's final weights by the update rule of the schedule, written as recurrences:
    W_s(v) = W_s(v - 1) - lr * d_s(v), d_s(v) = momentum * d_s(v - 1) + the gradients of the
    microbatches of step v, each taken at the versions ``rule`` names. With ``predict`` a
    forward on stage s uses W_s(v) - lr * (p - s - 1) * d_s(v) instead of W_s(v)."""
    initial = [[p.detach().clone() for p in stage.parameters()] for stage in two_stages()]
    x, y = data(n)
    p = len(initial)

    @cache
    def weights(stage: int, version: int) -> tuple[torch.Tensor, ...]:
        if version == 0:
            return tuple(initial[stage])
        previous = weights(stage, version - 1)
        return tuple(w - LR * d for w, d in zip(previous, direction(stage, version)))

    @cache
    def direction(stage: int, version: int) -> tuple[torch.Tensor, ...]:
        batch = range((version - 1) * per_step, version * per_step)
        summed = [sum(parts) for parts in zip(*(gradients(i)[stage] for i in batch))]
        if version == 1:
            return tuple(summed)
        return tuple(momentum * d + g for d, g in zip(direction(stage, version - 1), summed))

    def forward_weights(stage: int, version: int) -> list[torch.Tensor]:
        steps = p - stage - 1 if predict else 0
        if steps == 0 or version == 0 or momentum == 0:
            return list(weights(stage, version))
        moves = direction(stage, version)
        return [w - LR * steps * d for w, d in zip(weights(stage, version), moves)]

    @cache
    def gradients(i: int) -> list[Weights]:
        versions = [rule(stage, i) for stage in range(p)]
        forward = [forward_weights(s, f) for s, (f, _) in enumerate(versions)]
        backward = [list(weights(s, b)) for s, (_, b) in enumerate(versions)]
        return gradients_by_hand(forward, backward, x[i], y[i], 1 / per_step)

    return [list(weights(stage, n // per_step)) for stage in range(p)]


def assert_weights_equal(actual: list[Weights], expected: list[Weights]) -> None:
    for stage_actual, stage_expected in zip(actual, expected):
        for a, e in zip(stage_actual, stage_expected):
            torch.testing.assert_close(a, e)


def newest_when_forward(stage: int, i: int, p: int = 2) -> int:
    """The steps stage s of an async 1F1B run took before the forward of microbatch i."""
    return max(0, i - (p - stage - 1))


def fresh_backward(stage: int, i: int) -> tuple[int, int]:
    """Forward with the newest weights, backward with those current at the backward: after a
    step per backward, microbatch i's backward comes after i steps on every stage."""
    return newest_when_forward(stage, i), i


def test_pipedream_updates_with_gradients_of_the_stashed_weights() -> None:
    n = 8
    actual = run_pipeline(pipedream(2, n))
    stashed = weights_by_hand(lambda s, i: (newest_when_forward(s, i),) * 2, n)
    assert_weights_equal(actual, stashed)
    unstashed = weights_by_hand(fresh_backward, n)
    assert not torch.allclose(stashed[0][0], unstashed[0][0])


def test_vertical_sync_uses_stage_zeros_version_on_both_stages() -> None:
    n = 8
    actual = run_pipeline(pipedream(2, n, vertical_sync=True))
    assert_weights_equal(actual, weights_by_hand(lambda s, i: (max(0, i - 1),) * 2, n))


def test_stale_backward_uses_the_weights_current_at_the_backward() -> None:
    n = 8
    actual = run_pipeline(stale(2, n))
    assert_weights_equal(actual, weights_by_hand(fresh_backward, n))


def test_two_bw_updates_with_gradients_of_the_version_before() -> None:
    m, n = 2, 8
    actual = run_pipeline(two_bw(2, n, m))
    # W(t + 1) = W(t) - lr * sum over batch t of grad f(W(t - 1)), on every stage.
    assert_weights_equal(actual, weights_by_hand(lambda s, i: (max(0, i // m - 1),) * 2, n, m))


def test_pipeoptim_forward_uses_predicted_weights_and_backward_the_current() -> None:
    n = 8
    actual = run_pipeline(pipeoptim(2, n), momentum=0.9)
    expected = weights_by_hand(fresh_backward, n, momentum=0.9, predict=True)
    assert_weights_equal(actual, expected)
    unpredicted = weights_by_hand(fresh_backward, n, momentum=0.9)
    assert not torch.allclose(expected[0][0], unpredicted[0][0])


def conv_stages() -> list[nn.Module]:
    """Layers whose backward reads parameters that autograd saved as they are (a convolution's
    and a layer norm's weights), not through a view of them as a linear layer's."""
    torch.manual_seed(0)
    first = nn.Sequential(
        nn.Conv2d(1, 2, 2, dtype=torch.float64),
        nn.Flatten(),
        nn.LayerNorm(8, dtype=torch.float64),
        nn.Linear(8, 2, dtype=torch.float64),
    )
    return [first, nn.Sequential(nn.Tanh(), nn.Linear(2, 1, dtype=torch.float64))]


@pytest.mark.parametrize(
    "schedule",
    [pipedream(2, 8), stale(2, 8), two_bw(2, 8, 2), two_bw(2, 12, 3), pipeoptim(2, 8)],
    ids=["pipedream", "stale", "2bw_m2", "2bw_m3", "pipeoptim"],
)
def test_recording_only_where_the_backward_needs_it_changes_nothing(schedule: Schedule) -> None:
    recorded = forwards_to_record(schedule.actions[0])
    assert 0 < len(recorded) or schedule.name == "2bw"
    assert len(forwards_to_record(schedule.actions[-1])) < schedule.n_microbatches
    generator = torch.Generator().manual_seed(1)
    n = schedule.n_microbatches
    samples = (
        torch.randn(n, 1, 1, 3, 3, dtype=torch.float64, generator=generator),
        torch.randn(n, 1, 1, dtype=torch.float64, generator=generator),
    )
    needed = run_pipeline(schedule, 0.9, conv_stages(), samples)
    always = run_pipeline(schedule, 0.9, conv_stages(), samples, record_all=True)
    assert_weights_equal(needed, always)
    assert not torch.allclose(needed[0][0], conv_stages()[0][0].weight)


def test_forwards_to_record() -> None:
    # pipedream, 2 stages: stage 0's F(i + 1) runs before the step after B(i), stage 1's
    # B follows its F at once
    assert forwards_to_record(pipedream(2, 6).actions[0]) == set(range(1, 6))
    assert forwards_to_record(pipedream(2, 6).actions[1]) == set()
    # stale: the B computes with the newer weights
    assert forwards_to_record(stale(2, 6).actions[0]) == set(range(1, 6))
    # 2bw: only the F a batch's step separates from its B
    assert forwards_to_record(two_bw(2, 8, 2).actions[1]) == set()
    assert forwards_to_record(pipeoptim(2, 4).actions[0]) == set(range(4))


def test_a_stashed_backward_updates_the_current_weights_by_hand() -> None:
    # f(w) = (w . x)^2 / 2, so grad f(w) = (w . x) x.
    layer = linear([[1.0, -1.0]])
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    store = VersionStore(layer)
    x = torch.tensor([1.0, 2.0], dtype=torch.float64)
    with store.use(0):
        out = layer(x)
    layer.weight.grad = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    with store.step(keep={0}):
        optimizer.step()
    optimizer.zero_grad()
    assert layer.weight.tolist() == [[0.0, -1.0]]
    with store.use(0):
        (0.5 * out.pow(2).sum()).backward()
    assert layer.weight.grad.tolist() == [[-1.0, -2.0]]
    with store.step(keep=set()):
        optimizer.step()
    assert layer.weight.tolist() == [[0.5, 0.0]]
    assert store.versions == (2,)


def stashed_setup() -> tuple[nn.Module, nn.Module, VersionStore, torch.optim.Optimizer]:
    """A two-layer module at version 1 holding version 0 stashed, and a copy of version 0."""
    module = two_stages()[0]
    at_version_0 = copy.deepcopy(module)
    optimizer = torch.optim.SGD(module.parameters(), lr=LR)
    store = VersionStore(module)
    for parameter in module.parameters():
        parameter.grad = torch.ones_like(parameter)
    with store.step(keep={0}):
        optimizer.step()
    optimizer.zero_grad()
    return module, at_version_0, store, optimizer


def test_use_restores_the_current_weights_exactly() -> None:
    module, at_version_0, store, _ = stashed_setup()
    current = [p.detach().clone() for p in module.parameters()]
    storages = [p.data_ptr() for p in module.parameters()]
    parameters = list(module.parameters())
    with store.use(0):
        for inside, old in zip(module.parameters(), at_version_0.parameters()):
            assert torch.equal(inside, old)
        module(torch.ones(2, dtype=torch.float64)).sum().backward()
    assert list(module.parameters()) == parameters
    assert [p.data_ptr() for p in module.parameters()] == storages
    for after, before in zip(module.parameters(), current):
        assert torch.equal(after, before)
    assert store.current == 1 and store.versions == (0, 1)


def test_gradients_of_a_stashed_forward_equal_those_of_a_copy_at_that_version() -> None:
    module, at_version_0, store, optimizer = stashed_setup()
    x = torch.tensor([[0.3, -0.7], [1.1, 0.4]], dtype=torch.float64)
    mine, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    with store.use(0):
        out = module(mine)
    for parameter in module.parameters():
        parameter.grad = torch.full_like(parameter, 0.5)
    with store.step(keep={0}):
        optimizer.step()
    optimizer.zero_grad()
    with store.use(0):
        out.pow(2).sum().backward()
    at_version_0(theirs).pow(2).sum().backward()
    for got, expected in zip(module.parameters(), at_version_0.parameters()):
        torch.testing.assert_close(got.grad, expected.grad)
    torch.testing.assert_close(mine.grad, theirs.grad)


def test_without_a_store_a_step_between_forward_and_backward_breaks_autograd() -> None:
    module = two_stages()[0]
    optimizer = torch.optim.SGD(module.parameters(), lr=LR)
    out = module(torch.ones(2, dtype=torch.float64))
    for parameter in module.parameters():
        parameter.grad = torch.ones_like(parameter)
    optimizer.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_a_released_version_cannot_be_used() -> None:
    module, _, store, optimizer = stashed_setup()
    with store.step(keep=set()):
        optimizer.step()
    assert store.versions == (2,)
    with pytest.raises(VersionError, match=r"weight version 0 is not held \(held: \[2\]\)"):
        with store.use(0):
            pass


def test_versions_to_keep_follows_the_stash() -> None:
    # Stage 0 of PipeDream, p = 4: microbatch i's backward uses version max(0, i - 3).
    keep = [{0}, {0, 1}, {0, 1, 2}, {1, 2, 3}, {2, 3, 4}, {3, 4}, {4}, set()]
    assert versions_to_keep(pipedream(4, 8).actions[0]) == keep
    assert versions_to_keep(pipedream(4, 8).actions[3]) == [set()] * 8
    assert versions_to_keep(stale(4, 8).actions[0]) == [set()] * 8
    assert versions_to_keep(two_bw(2, 6, 2).actions[0]) == [{0}, {1}, set()]


def momentum_sgd() -> tuple[nn.Linear, torch.optim.Optimizer]:
    layer = linear([[1.0, 2.0]])
    return layer, torch.optim.SGD(layer.parameters(), lr=LR, momentum=0.9, dampening=0.5)


GRADIENTS = ([[1.0, 0.0]], [[0.0, 1.0]])


def take_steps(layer: nn.Linear, optimizer: torch.optim.Optimizer) -> None:
    """Two real optimizer steps with the gradients of GRADIENTS."""
    for grad in GRADIENTS:
        layer.weight.grad = torch.tensor(grad, dtype=torch.float64)
        optimizer.step()


def test_predicted_weights_for_sgd_momentum() -> None:
    layer, optimizer = momentum_sgd()
    take_steps(layer, optimizer)
    # m_1 = g_1 (the first step takes the gradient as it is); m_2 = 0.9 m_1 + (1 - 0.5) g_2.
    m = [0.9 * 1.0 + 0.5 * 0.0, 0.9 * 0.0 + 0.5 * 1.0]
    w = [1.0 - LR * 1.0 - LR * m[0], 2.0 - LR * 0.0 - LR * m[1]]
    torch.testing.assert_close(layer.weight, torch.tensor([w], dtype=torch.float64))
    predicted = predicted_weights(optimizer, 3)[layer.weight]
    expected = [w[k] - LR * 3 * m[k] for k in range(2)]
    torch.testing.assert_close(predicted, torch.tensor([expected], dtype=torch.float64))


def adam_by_hand(weight_decay: float, decoupled: bool, steps: int) -> tuple[list, list]:
    """Weights after GRADIENTS by Adam's documented update, and the weights predicted
    ``steps`` ahead: W - lr * steps * (m_hat / (sqrt(v_hat) + eps) [+ weight_decay * W])."""
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    w, m, v = [1.0, 2.0], [0.0, 0.0], [0.0, 0.0]
    for t, (grad,) in enumerate(GRADIENTS, start=1):
        for k in range(2):
            g = grad[k] + (0.0 if decoupled else weight_decay * w[k])
            w[k] -= LR * weight_decay * w[k] if decoupled else 0.0
            m[k] = beta1 * m[k] + (1 - beta1) * g
            v[k] = beta2 * v[k] + (1 - beta2) * g * g
            m_hat, v_hat = m[k] / (1 - beta1**t), v[k] / (1 - beta2**t)
            w[k] -= LR * m_hat / (v_hat**0.5 + eps)
    t = len(GRADIENTS)
    directions = [
        m[k] / (1 - beta1**t) / ((v[k] / (1 - beta2**t)) ** 0.5 + eps)
        + (weight_decay * w[k] if decoupled else 0.0)
        for k in range(2)
    ]
    return w, [w[k] - LR * steps * directions[k] for k in range(2)]


@pytest.mark.parametrize(
    "make, weight_decay, decoupled",
    [
        (torch.optim.Adam, 0.0, False),
        (torch.optim.Adam, 0.1, False),
        (torch.optim.AdamW, 0.1, True),
    ],
)
def test_predicted_weights_for_adam_and_adamw(
    make: type[torch.optim.Optimizer], weight_decay: float, decoupled: bool
) -> None:
    layer = linear([[1.0, 2.0]])
    optimizer = make(layer.parameters(), lr=LR, weight_decay=weight_decay)
    take_steps(layer, optimizer)
    weights, predicted = adam_by_hand(weight_decay, decoupled, 2)
    torch.testing.assert_close(layer.weight, torch.tensor([weights], dtype=torch.float64))
    got = predicted_weights(optimizer, 2)[layer.weight]
    torch.testing.assert_close(got, torch.tensor([predicted], dtype=torch.float64))


def test_no_prediction_without_a_direction() -> None:
    layer, optimizer = momentum_sgd()
    assert torch.equal(predicted_weights(optimizer, 3)[layer.weight], layer.weight)
    plain = torch.optim.SGD(layer.parameters(), lr=LR)
    take_steps(layer, plain)
    assert torch.equal(predicted_weights(plain, 3)[layer.weight], layer.weight)
    take_steps(layer, optimizer)
    assert torch.equal(predicted_weights(optimizer, 0)[layer.weight], layer.weight)


def test_predicted_compute_restores_the_current_weights() -> None:
    layer, optimizer = momentum_sgd()
    take_steps(layer, optimizer)
    store = VersionStore(layer)
    current = layer.weight.detach().clone()
    expected = predicted_weights(optimizer, 2)[layer.weight]
    with store.predicted(optimizer, 2):
        assert torch.equal(layer.weight, expected)
        out = layer(torch.ones(2, dtype=torch.float64))
    assert torch.equal(layer.weight, current)
    torch.testing.assert_close(out, expected.sum(1))


def test_prediction_rejects_other_optimizers() -> None:
    layer = linear([[1.0, 2.0]])
    optimizer = torch.optim.RMSprop(layer.parameters(), lr=LR)
    with pytest.raises(ValueError, match="SGD, Adam and AdamW, not RMSprop"):
        predicted_weights(optimizer, 1)
