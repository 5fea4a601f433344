"""Per-node cost profiles: how long each node of a traced model takes forward and backward.

Partitioning balances pipeline stages by cost, so every graph node needs a forward and a
backward time. Two ways to get them:

- ``profile_flops`` is analytical. It runs each node on fake tensors (no compute, no memory,
  so it works for models bigger than the machine) under ``FlopCounterMode`` and prices the
  FLOPs and the bytes moved on a ``DeviceSpec`` with a roofline. It needs no target hardware
  and is deterministic, which makes partitions reproducible.
- ``profile_measured`` runs each node for real on a device and times it. It sees what the
  roofline cannot (kernel efficiency, launch overhead, memory peaks), at the price of noise and
  of needing the device; ``profile`` caches its results on disk.

Both leave the user's model as it was: parameters and buffers are swapped for private copies
(or fakes) while a profile runs, so BatchNorm running statistics are not updated and no
``.grad`` is set, and the global random state is restored afterwards.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import networkx as nx
import torch
from torch import fx, nn
from torch._subclasses import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import flop_counter
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from autopipe.errors import UserError
from autopipe.graph import is_inplace
from autopipe.trace import TraceResult

log = logging.getLogger(__name__)

CACHE_ENV_VAR = "AUTOPIPE_CACHE_DIR"
DEFAULT_CACHE_DIR = Path("~/.cache/autopipe/profiles")
_CACHE_FORMAT = 3  # 2: backwards into fresh .grad, less the fixed cost of starting one;
# 3: node times scaled to the whole graph's
_COSTLESS_OPS = frozenset({"placeholder", "get_attr", "output"})
_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)
_CACHED_REPEATS = 5  # what ``profile`` measures with: profile_measured's default
WHOLE_REPEATS = 3
"""Timed passes of the whole graph that node times are scaled to, after one untimed."""


@dataclass(frozen=True)
class NodeProfile:
    """What one node costs in one training step.

    ``backward_ms`` includes re-running the forward when the profile assumed recomputation
    (activation checkpointing: a stage's backward first recomputes its forward).
    ``peak_bytes`` is the peak device memory the node's run adds to what was allocated before
    it, where the device reports it (CUDA); None elsewhere.
    """

    forward_ms: float
    backward_ms: float
    peak_bytes: int | None


@dataclass(frozen=True)
class DeviceSpec:
    """The two numbers a roofline needs: peak arithmetic rate and memory bandwidth."""

    name: str
    peak_flops: float  # FLOP/s
    memory_bandwidth: float  # bytes/s


# Published vendor figures for dense (no structured sparsity) math on the SXM parts.
DEVICES: dict[str, DeviceSpec] = {
    # V100 SXM2: 15.7 TFLOP/s fp32 (Volta has no TF32), 900 GB/s HBM2.
    "v100": DeviceSpec("v100", 15.7e12, 900e9),
    # A100 SXM4 40 GB: 156 TFLOP/s TF32 tensor cores, 1555 GB/s HBM2.
    "a100": DeviceSpec("a100", 156e12, 1555e9),
    # A100 without TF32 (PyTorch's default for fp32 matmuls): 19.5 TFLOP/s fp32.
    "a100_fp32": DeviceSpec("a100_fp32", 19.5e12, 1555e9),
    # H100 SXM5: 494.7 TFLOP/s TF32 tensor cores, 3.35 TB/s HBM3.
    "h100": DeviceSpec("h100", 494.7e12, 3.35e12),
    # H100 without TF32: 66.9 TFLOP/s fp32.
    "h100_fp32": DeviceSpec("h100_fp32", 66.9e12, 3.35e12),
    # A modest 2-core CPU: about 100 GFLOP/s fp32 with AVX2 FMA, 20 GB/s DRAM.
    "cpu": DeviceSpec("cpu", 1e11, 2e10),
}

_ZERO = NodeProfile(0.0, 0.0, None)


# Shared machinery -----------------------------------------------------------------------------


def _tensors(value: Any) -> list[torch.Tensor]:
    """The tensors in a (possibly nested) value."""
    return [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]


def _differentiable(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def _nbytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct tensors (one tensor passed twice is read once)."""
    unique = {id(t): t for t in tensors}
    return sum(t.numel() * t.element_size() for t in unique.values())


def _keep(value: Any, device: torch.device | None = None) -> Any:
    """A node's output as the next nodes should see it: detached from this node's autograd
    graph (so memory does not pile up across nodes) but still saying whether it needs a grad."""

    def keep(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        kept = t.detach() if device is None else t.detach().to(device)
        return kept.requires_grad_(t.requires_grad) if _differentiable(t) else kept

    return tree_map(keep, value)


def _fresh(value: Any, device: torch.device | None) -> tuple[Any, list[torch.Tensor]]:
    """Detached copies of every tensor in ``value`` (so in-place ops and repeated runs never
    touch the originals), as autograd leaves where the original needed a grad.

    Returns the copies and the leaves that require grad.
    """
    leaves: list[torch.Tensor] = []
    copies: dict[int, torch.Tensor] = {}

    def fresh(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        if id(t) not in copies:
            copy = t.detach().to(device if device is not None else t.device, copy=True)
            if t.requires_grad and _differentiable(t):
                copy.requires_grad_()
                leaves.append(copy)
            copies[id(t)] = copy
        return copies[id(t)]

    return tree_map(fresh, value), leaves


def _non_leaf(value: Any) -> Any:
    """Leaves that require grad replaced by clones, which in-place ops may write into."""
    return tree_map(
        lambda t: t.clone() if isinstance(t, torch.Tensor) and t.requires_grad else t, value
    )


@contextlib.contextmanager
def _substituted_state(
    root: nn.Module, replace: Callable[[torch.Tensor, bool], torch.Tensor]
) -> Iterator[None]:
    """Temporarily put ``replace(tensor, is_buffer)`` in place of every parameter and buffer
    under ``root``, so a profile runs on copies (or fakes) and the model itself is untouched.

    A tensor held under several names (tied weights) gets one replacement, so it stays tied.
    Everything is put back on exit, also after an error.
    """
    replacements: dict[int, torch.Tensor] = {}
    swapped: list[tuple[dict[str, Any], str, torch.Tensor]] = []
    try:
        for module in root.modules():
            for store, is_buffer in ((module._parameters, False), (module._buffers, True)):
                for name, tensor in list(store.items()):
                    if tensor is None:
                        continue
                    if id(tensor) not in replacements:
                        replacements[id(tensor)] = replace(tensor, is_buffer)
                    swapped.append((store, name, tensor))
                    store[name] = replacements[id(tensor)]
        yield
    finally:
        for store, name, tensor in reversed(swapped):
            store[name] = tensor


def _private_copy(device: torch.device | None) -> Callable[[torch.Tensor, bool], torch.Tensor]:
    """Replacement for real runs: parameters as detached leaves on ``device`` (no copy when they
    are there already), buffers always copied, since forward may update them in place."""

    def replace(tensor: torch.Tensor, is_buffer: bool) -> torch.Tensor:
        target = device if device is not None else tensor.device
        copy = tensor.detach().to(target, copy=is_buffer)
        return copy.requires_grad_(tensor.requires_grad) if _differentiable(tensor) else copy

    return replace


def _module_state(module: nn.Module) -> list[torch.Tensor]:
    """The distinct parameters and buffers a leaf module holds (tied ones once)."""
    unique = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return list(unique.values())


def _module_params(module: nn.Module) -> list[torch.Tensor]:
    unique = {id(p): p for p in module.parameters() if p.requires_grad}
    return list(unique.values())


def _graph_inplace(graph: nx.DiGraph, node: fx.Node, root: nn.Module) -> bool:
    data = graph.nodes[node.name] if node.name in graph else {}
    return bool(data["inplace"]) if "inplace" in data else is_inplace(node, root)


@dataclass
class _Run:
    """One run of a node: its output, what its backward differentiates for, how long it took
    and the tensors it was handed (which its outputs may alias)."""

    out: Any
    targets: list[torch.Tensor]
    elapsed_ms: float
    handed: list[torch.Tensor]


class _NodeInterpreter(fx.Interpreter, abc.ABC):
    """Runs a graph node by node; subclasses say what to do with each costly node.

    ``profile_node`` gets the node and its inputs from the environment, records the node's
    profile and returns the value the later nodes use.
    """

    def __init__(self, module: fx.GraphModule, graph: nx.DiGraph) -> None:
        super().__init__(module, garbage_collect_values=True)
        self.nx_graph = graph
        self.profiles: dict[str, NodeProfile] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n.op in _COSTLESS_OPS:
            result = super().run_node(n)
            if n.op != "output":
                self.profiles[n.name] = _ZERO
            return result
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        return self.profile_node(n, args, kwargs)

    @abc.abstractmethod
    def profile_node(self, n: fx.Node, args: tuple, kwargs: dict) -> Any:
        """Run node ``n`` on ``args``, record its profile, and return its result."""

    def call(self, n: fx.Node, args: tuple, kwargs: dict) -> Any:
        """Run one node on the given inputs (the Interpreter's own call_module/function/method)."""
        return getattr(self, n.op)(n.target, args, kwargs)

    def grad_targets(self, n: fx.Node, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
        """What the backward of a node computes gradients for: its inputs that need one and,
        for a leaf module, the module's parameters."""
        targets = list(leaves)
        if n.op == "call_module":
            targets += _module_params(self.fetch_attr(str(n.target)))
        return targets

    def run_with_fresh_inputs(
        self,
        n: fx.Node,
        args: tuple,
        kwargs: dict,
        device: torch.device | None,
        inplace: bool,
        timer: Callable[[Callable[[], Any]], tuple[float, Any]] | None = None,
    ) -> _Run:
        """Run ``n`` once on fresh copies of its inputs, timed by ``timer`` when given.

        An in-place node gets clones of the leaves (autograd refuses in-place writes into a
        leaf that requires grad); a node not known to be in place that turns out to be is
        retried that way.
        """
        (args, kwargs), leaves = _fresh((args, kwargs), device)
        for attempt in (inplace, True):
            handed = _non_leaf((args, kwargs)) if attempt else (args, kwargs)
            try:
                with torch.enable_grad():
                    if timer is None:
                        elapsed, out = 0.0, self.call(n, *handed)
                    else:
                        elapsed, out = timer(lambda handed=handed: self.call(n, *handed))
                return _Run(out, self.grad_targets(n, leaves), elapsed, _tensors(handed))
            except RuntimeError as error:
                if attempt or not leaves or "in-place" not in str(error):
                    raise
                log.debug("%s writes into its input; rerunning it on clones", n.name)
        raise AssertionError("unreachable")


def _differentiable_outputs(out: Any) -> list[torch.Tensor]:
    return [t for t in _tensors(out) if _differentiable(t) and t.requires_grad]


# Analytical profile ---------------------------------------------------------------------------


def _sdpa_cpu_forward(
    query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any
) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward(
    grad_shape: Any, query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any
) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_shape, query_shape, key_shape, value_shape)


def _extra_flop_formulas() -> dict[Any, Callable[..., int]]:
    """FLOP formulas FlopCounterMode lacks: fake tensors made from CPU tensors take the CPU
    attention kernel, which it does not count."""
    aten = torch.ops.aten
    formulas: dict[Any, Callable[..., int]] = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        formulas[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_forward
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        formulas[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _sdpa_cpu_backward
    return formulas


def _roofline_ms(flops: int, nbytes: int, device: DeviceSpec) -> float:
    """Time of a kernel bound by compute or by memory traffic, whichever is slower, in ms."""
    return max(flops / device.peak_flops, nbytes / device.memory_bandwidth) * 1e3


def _shares_memory(t: torch.Tensor, others: list[torch.Tensor]) -> bool:
    storage = StorageWeakRef(t.untyped_storage())
    return any(StorageWeakRef(o.untyped_storage()) == storage for o in others)


class _FlopInterpreter(_NodeInterpreter):
    """Counts each node's FLOPs and bytes moved, forward and backward, and prices them."""

    def __init__(
        self,
        module: fx.GraphModule,
        graph: nx.DiGraph,
        device: DeviceSpec,
        recomputation: bool,
        counter: FlopCounterMode,
    ) -> None:
        super().__init__(module, graph)
        self.device = device
        self.recomputation = recomputation
        self.counter = counter

    def profile_node(self, n: fx.Node, args: tuple, kwargs: dict) -> Any:
        inplace = _graph_inplace(self.nx_graph, n, self.module)
        before = self.counter.get_total_flops()
        run = self.run_with_fresh_inputs(n, args, kwargs, None, inplace)
        forward_flops = self.counter.get_total_flops() - before

        inputs = _tensors((args, kwargs))
        outputs = _tensors(run.out)
        module = self.fetch_attr(str(n.target)) if n.op == "call_module" else None
        state = _module_state(module) if module is not None else []
        written = [t for t in outputs if inplace or not _shares_memory(t, run.handed + state)]
        if (
            forward_flops == 0 and not written
        ):  # a view, a getitem, a size: nothing computed or copied
            self.profiles[n.name] = _ZERO
            return _keep(run.out)
        state_bytes = _nbytes(state)
        if isinstance(module, _EMBEDDINGS):
            state_bytes = min(state_bytes, _nbytes(outputs))  # reads only the rows it gathers
        read_bytes = _nbytes(inputs) + state_bytes
        forward_ms = _roofline_ms(forward_flops, read_bytes + _nbytes(written), self.device)

        backward_ms = 0.0
        differentiable = _differentiable_outputs(run.out)
        if differentiable and run.targets:
            backward_flops = self._backward_flops(n, differentiable, run.targets, forward_flops)
            # Read the output grads and what forward read, write one grad per target.
            backward_bytes = _nbytes(differentiable) + read_bytes + _nbytes(run.targets)
            backward_ms = _roofline_ms(backward_flops, backward_bytes, self.device)
        if self.recomputation:
            backward_ms += forward_ms
        self.profiles[n.name] = NodeProfile(forward_ms, backward_ms, None)
        return _keep(run.out)

    def _backward_flops(
        self,
        n: fx.Node,
        outputs: list[torch.Tensor],
        targets: list[torch.Tensor],
        forward_flops: int,
    ) -> int:
        """FLOPs of the node's backward, or twice its forward where autograd cannot run."""
        before = self.counter.get_total_flops()
        try:
            # backward(), not grad(): FlopCounterMode's module hooks reject grad() on leaves.
            torch.autograd.backward(outputs, [torch.ones_like(t) for t in outputs], inputs=targets)
        except Exception as error:  # noqa: BLE001 - fake tensors refuse some backward kernels
            log.debug("no backward for %s (%s); taking twice its forward FLOPs", n.name, error)
            return 2 * forward_flops
        finally:
            for t in targets:
                t.grad = None
        return self.counter.get_total_flops() - before


def _fake_copy(mode: FakeTensorMode) -> Callable[[torch.Tensor, bool], torch.Tensor]:
    """Replacement for fake runs: the fake twin of each parameter and buffer (same shape,
    dtype and requires_grad, no data)."""

    def replace(tensor: torch.Tensor, is_buffer: bool) -> torch.Tensor:
        return mode.from_tensor(tensor)

    return replace


def _run_flops(
    traced: TraceResult, graph: nx.DiGraph, device: DeviceSpec, recomputation: bool, fake: bool
) -> dict[str, NodeProfile]:
    module = traced.graph_module
    counter = FlopCounterMode(display=False, custom_mapping=_extra_flop_formulas())
    context: contextlib.AbstractContextManager[Any]
    if fake:
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        inputs = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in traced.inputs]
        replace = _fake_copy(mode)
        context = mode
    else:
        inputs = [t.detach().clone() if isinstance(t, torch.Tensor) else t for t in traced.inputs]
        replace = _private_copy(None)
        context = contextlib.nullcontext()
    interpreter = _FlopInterpreter(module, graph, device, recomputation, counter)
    with torch.random.fork_rng(devices=[]), _substituted_state(module, replace), context, counter:
        interpreter.run(*inputs)
    return interpreter.profiles


def profile_flops(
    traced: TraceResult, graph: nx.DiGraph, device: DeviceSpec, recomputation: bool = True
) -> dict[str, NodeProfile]:
    """Predict every node's forward and backward time on ``device`` from FLOPs and bytes.

    Each node runs on fake tensors under ``FlopCounterMode``: its forward FLOPs, then its
    backward's by running autograd on its output (twice the forward where that fails). Bytes
    moved are the node's inputs, its newly written outputs and the parameters it reads (the
    backward: output grads, what forward read, and one grad per input or parameter that needs
    one). Time is the roofline ``max(flops / peak_flops, bytes / memory_bandwidth)``. Views,
    getitems and sizes cost 0; with ``recomputation`` the backward also pays the forward again.
    No timing anywhere, so the same graph always gives the same numbers. Models whose code
    depends on tensor values (which fake tensors do not have) run on real tensors instead,
    still counting rather than timing.
    """
    try:
        profiles = _run_flops(traced, graph, device, recomputation, fake=True)
    except Exception as error:  # noqa: BLE001 - data-dependent code cannot run on fake tensors
        log.info("fake-tensor FLOP counting failed (%s); counting on real tensors", error)
        profiles = _run_flops(traced, graph, device, recomputation, fake=False)
    total_forward = sum(p.forward_ms for p in profiles.values())
    total_backward = sum(p.backward_ms for p in profiles.values())
    log.info(
        "predicted on %s: forward %.3f ms, backward %.3f ms",
        device.name,
        total_forward,
        total_backward,
    )
    return profiles


# Measured profile -----------------------------------------------------------------------------


def _resolve_device(device: str | torch.device) -> torch.device:
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise UserError(f"unknown device {device!r}: {error}") from error
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {device!r} asked for, but CUDA is not available")
        if resolved.index is None:
            resolved = torch.device("cuda", torch.cuda.current_device())
    elif resolved.type != "cpu":
        raise UserError(f"profiling runs on 'cpu' or 'cuda[:N]', not {device!r}")
    return resolved


def device_name(device: str | torch.device) -> str:
    """What the hardware behind ``device`` is called, for cache keys: the GPU's name, or the
    CPU's with the number of threads PyTorch uses."""
    resolved = _resolve_device(device)
    if resolved.type == "cuda":
        return torch.cuda.get_device_name(resolved)
    return f"{_cpu_model()} ({torch.get_num_threads()} threads)"


def _cpu_model() -> str:
    """The CPU's marketing name where the OS tells it (Linux), else its architecture."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine() or "cpu"


class _Stopwatch:
    """Times a call on the device: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end), result
        start_time = time.perf_counter()
        result = fn()
        return (time.perf_counter() - start_time) * 1e3, result


class _MeasuringInterpreter(_NodeInterpreter):
    """Times each node forward and backward on real tensors."""

    def __init__(
        self,
        module: fx.GraphModule,
        graph: nx.DiGraph,
        device: torch.device,
        warmup: int,
        repeats: int,
        save_memory_mode: bool,
        bar: tqdm,
    ) -> None:
        super().__init__(module, graph)
        self.device = device
        self.warmup = warmup
        self.repeats = repeats
        self.save_memory_mode = save_memory_mode
        self.bar = bar
        self.stopwatch = _Stopwatch(device)
        self.cuda = device.type == "cuda"
        self.call_ms = 0.0
        """The fixed cost of a backward call, left out of node times (``_empty_backward_ms``)."""

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        self.bar.update()
        return result

    def profile_node(self, n: fx.Node, args: tuple, kwargs: dict) -> Any:
        inplace = _graph_inplace(self.nx_graph, n, self.module)
        baseline = torch.cuda.memory_allocated(self.device) if self.cuda else 0
        forward: list[float] = []
        backward: list[float] = []
        with self._node_state(n):
            if self.cuda:
                torch.cuda.reset_peak_memory_stats(self.device)
            for repetition in range(self.warmup + self.repeats):
                run = self.run_with_fresh_inputs(
                    n, args, kwargs, self.device, inplace, self.stopwatch
                )
                backward_ms = self._time_backward(n, run.out, run.targets)
                if repetition >= self.warmup:
                    forward.append(run.elapsed_ms)
                    backward.append(backward_ms)
                if repetition + 1 < self.warmup + self.repeats:
                    del run
            peak = torch.cuda.max_memory_allocated(self.device) - baseline if self.cuda else None
            kept = _keep(run.out, torch.device("cpu") if self.save_memory_mode else None)
        forward_time = statistics.median(forward)
        backward_time = max(statistics.median(backward) - self.call_ms, 0.0)
        self.profiles[n.name] = NodeProfile(
            forward_time, backward_time, max(0, peak) if peak is not None else None
        )
        return kept

    def _node_state(self, n: fx.Node) -> contextlib.AbstractContextManager[None]:
        """In save-memory mode, a leaf module's state is on the device only while it runs."""
        if not self.save_memory_mode or n.op != "call_module":
            return contextlib.nullcontext()
        return _substituted_state(self.fetch_attr(str(n.target)), _private_copy(self.device))

    def _time_backward(self, n: fx.Node, out: Any, targets: list[torch.Tensor]) -> float:
        """Time the backward of the outputs with random output grads into fresh ``.grad`` of
        ``targets``, as a stage's backward fills its parameters' (cleared after); 0 when
        nothing needs a grad. The time includes the fixed cost of the call (``call_ms``)."""
        outputs = _differentiable_outputs(out)
        if not outputs or not targets:
            return 0.0
        grads = [torch.randn_like(t) for t in outputs]
        for target in targets:
            target.grad = None
        try:
            elapsed, _ = self.stopwatch(
                lambda: torch.autograd.backward(outputs, grads, inputs=targets)
            )
        except RuntimeError as error:
            log.warning("cannot run the backward of %s (%s); counting it as 0", n.name, error)
            return 0.0
        finally:
            for target in targets:
                target.grad = None
        return elapsed


def _empty_backward_ms(
    stopwatch: _Stopwatch, device: torch.device, warmup: int, repeats: int
) -> float:
    """The fixed cost of starting a backward, as ``stopwatch`` reads it. A node's backward is
    timed as a backward call of its own, but a stage runs one backward through all its nodes
    and pays that cost once, so node times leave it out.

    It is what a backward through one scalar multiply takes less what one more multiply adds,
    2 t(1) - t(2), from the medians of at least 20 runs each."""
    leaf = torch.ones((), device=device, requires_grad=True)

    def median_ms(multiplies: int) -> float:
        times = []
        for repetition in range(warmup + max(repeats, 20)):
            out = leaf
            for _ in range(multiplies):
                out = out * 1.0
            leaf.grad = None
            elapsed, _ = stopwatch(lambda: torch.autograd.backward(out, inputs=[leaf]))
            if repetition >= warmup:
                times.append(elapsed)
        return statistics.median(times)

    return max(2 * median_ms(1) - median_ms(2), 0.0)


def _free_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on ``device``, where it can be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _whole_graph_ms(
    module: fx.GraphModule,
    graph: nx.DiGraph,
    inputs: list[Any],
    stopwatch: Callable[[Callable[[], Any]], tuple[float, Any]],
    device: torch.device,
    warmup: int,
) -> tuple[float, float] | None:
    """Median forward and backward milliseconds of ``WHOLE_REPEATS`` runs of the whole graph at
    once (after one untimed, where ``warmup``), its outputs' backward (random output grads)
    into fresh ``.grad``. A pass costs about what one run of every node does, so a few are
    enough beside the nodes' ``warmup + repeats`` each. None where nothing needs a gradient,
    the backward fails, or keeping every activation for the backward (twice the graph's value
    bytes, with their gradients) would take over half the device's free memory."""
    needed = 2 * sum(getattr(data.get("value"), "nbytes", 0) for _, data in graph.nodes(data=True))
    free = _free_bytes(device)
    if free is not None and needed > free / 2:
        log.info("not timing the whole graph: its activations (%.1f GB) may not fit", needed / 1e9)
        return None
    parameters = [p for p in module.parameters() if p.requires_grad]
    forward: list[float] = []
    backward: list[float] = []
    untimed = min(warmup, 1)
    try:
        for repetition in range(untimed + WHOLE_REPEATS):
            with torch.enable_grad():
                forward_ms, out = stopwatch(lambda: module(*inputs))
            outputs = _differentiable_outputs(out)
            if not outputs:
                return None
            grads = [torch.randn_like(t) for t in outputs]
            backward_ms, _ = stopwatch(lambda: torch.autograd.backward(outputs, grads))
            for parameter in parameters:
                parameter.grad = None
            del out, outputs, grads
            if repetition >= untimed:
                forward.append(forward_ms)
                backward.append(backward_ms)
    except RuntimeError as error:  # a backward that cannot run, or out of memory
        log.info(
            "not timing the whole graph: %s", str(error).splitlines()[0] if str(error) else error
        )
        return None
    finally:
        for parameter in parameters:
            parameter.grad = None
    return statistics.median(forward), statistics.median(backward)


def scaled_to_whole(
    profiles: dict[str, NodeProfile], forward_ms: float, backward_ms: float
) -> dict[str, NodeProfile]:
    """The node times scaled so that they add up to ``forward_ms`` and ``backward_ms``, the
    whole graph's (each scale on its own; a sum of zero is left alone).

    A node timed alone pays what the graph run whole does not (its own call, the stopwatch)
    and misses what the whole run pays (autograd scheduling every node, summing the gradients
    of a value used twice, data that has left the cache). On a CPU the node sums of the zoo's
    tiny models came out 3-19% over the whole forward and within 6% of the whole backward; on
    a GPU, timing a node alone also waits for each kernel launch. Scaling keeps the nodes'
    relative costs, which the partitioners balance, and makes the absolute ones, which weigh
    compute against transfers and predict the time per batch, those of the whole."""
    forward_sum = sum(p.forward_ms for p in profiles.values())
    backward_sum = sum(p.backward_ms for p in profiles.values())
    forward_scale = forward_ms / forward_sum if forward_sum > 0 else 1.0
    backward_scale = backward_ms / backward_sum if backward_sum > 0 else 1.0
    return {
        name: NodeProfile(
            p.forward_ms * forward_scale, p.backward_ms * backward_scale, p.peak_bytes
        )
        for name, p in profiles.items()
    }


def profile_measured(
    traced: TraceResult,
    graph: nx.DiGraph,
    device: str = "cpu",
    warmup: int = 2,
    repeats: int = 5,
    recomputation: bool = True,
    save_memory_mode: bool = False,
    progress: bool = True,
    whole: bool = True,
) -> dict[str, NodeProfile]:
    """Time every node forward and backward on ``device`` ("cpu", "cuda" or "cuda:N").

    The graph runs node by node. Each node runs ``warmup`` untimed then ``repeats`` timed times
    on fresh detached copies of its inputs, and the median counts: forward is the call,
    backward is the backward of its outputs (random output grads) into fresh ``.grad`` of its
    inputs that need a grad and its module's parameters, less the fixed cost of starting a
    backward (a stage pays it once, not per node: about 0.08 ms on a CPU, on a small model as
    much as the work). With ``whole`` (and not ``save_memory_mode``) the graph is then timed
    whole the same way, and the node times are scaled to add up to it (``scaled_to_whole``;
    the backward's to the whole less the fixed cost). With ``recomputation`` the backward
    also pays the forward again. On CUDA, ``peak_bytes`` is the peak memory a node adds.

    The model runs on private copies of its parameters and buffers, so its state (BatchNorm
    running statistics included) and its ``.grad`` stay as they were, and so does the random
    state. ``save_memory_mode`` keeps everything on the host and moves a node's module state
    and inputs to the device only while that node is profiled, for models that do not fit.
    """
    target = _resolve_device(device)
    if repeats < 1 or warmup < 0:
        raise UserError(
            f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}"
        )
    module = traced.graph_module
    home = torch.device("cpu") if save_memory_mode else target
    inputs = [
        t.detach().to(home, copy=True) if isinstance(t, torch.Tensor) else t for t in traced.inputs
    ]
    rng_devices = [target.index] if target.type == "cuda" else []
    with tqdm(
        total=len(module.graph.nodes),
        desc=f"profiling on {target}",
        unit="node",
        disable=not progress,
        leave=False,
    ) as bar:
        interpreter = _MeasuringInterpreter(
            module, graph, target, warmup, repeats, save_memory_mode, bar
        )
        # Events and peak statistics belong to the current CUDA device: make it the target.
        on_device = torch.cuda.device(target) if target.type == "cuda" else contextlib.nullcontext()
        with on_device, torch.random.fork_rng(devices=rng_devices), _substituted_state(
            module, _private_copy(None if save_memory_mode else target)
        ):
            interpreter.call_ms = _empty_backward_ms(interpreter.stopwatch, target, warmup, repeats)
            interpreter.run(*inputs)
            timed = None
            if whole and not save_memory_mode:
                timed = _whole_graph_ms(
                    module, graph, inputs, interpreter.stopwatch, target, warmup
                )
    profiles = interpreter.profiles
    log.info(
        "measured on %s: nodes forward %.3f ms, backward %.3f ms (%.3f ms per backward call "
        "left out); whole graph %s",
        target,
        sum(p.forward_ms for p in profiles.values()),
        sum(p.backward_ms for p in profiles.values()),
        interpreter.call_ms,
        "not timed" if timed is None else f"forward {timed[0]:.3f} ms, backward {timed[1]:.3f} ms",
    )
    if timed is not None:
        profiles = scaled_to_whole(profiles, timed[0], max(timed[1] - interpreter.call_ms, 0.0))
    if recomputation:
        profiles = {
            name: NodeProfile(p.forward_ms, p.backward_ms + p.forward_ms, p.peak_bytes)
            for name, p in profiles.items()
        }
    return profiles


# Graph annotation and caching -----------------------------------------------------------------


def annotate(graph: nx.DiGraph, profiles: dict[str, NodeProfile]) -> None:
    """Set ``forward_ms``, ``backward_ms`` and ``peak_bytes`` on every graph node, so the
    partitioner can read costs off the graph (0.0 and None for nodes without a profile)."""
    for name, data in graph.nodes(data=True):
        found = profiles.get(name, _ZERO)
        data["forward_ms"] = found.forward_ms
        data["backward_ms"] = found.backward_ms
        data["peak_bytes"] = found.peak_bytes


def _batch_size(traced: TraceResult) -> int | None:
    for value in traced.inputs:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return None


def cache_key(
    traced: TraceResult, graph: nx.DiGraph, device: str, recomputation: bool, repeats: int
) -> str:
    """A sha256 over what a measured profile depends on: every node's op, target, inputs,
    output shape and dtype, the batch size, the device's hardware name, the recomputation
    flag and the number of timed repeats."""
    nodes = []
    for node in traced.graph_module.graph.nodes:
        if node.op == "output":
            continue
        data = graph.nodes[node.name] if node.name in graph else {}
        value = data.get("value")
        target = data.get("target", str(node.target))
        nodes.append(
            [
                node.name,
                node.op,
                target,
                [i.name for i in node.all_input_nodes],
                list(value.shape) if value is not None and value.shape is not None else None,
                value.dtype if value is not None else None,
            ]
        )
    described = {
        "format": _CACHE_FORMAT,
        "nodes": nodes,
        "batch_size": _batch_size(traced),
        "device": device_name(device),
        "recomputation": recomputation,
        "repeats": repeats,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def default_cache_dir() -> Path:
    """``$AUTOPIPE_CACHE_DIR`` when set, else ``~/.cache/autopipe/profiles``."""
    return Path(os.environ.get(CACHE_ENV_VAR) or DEFAULT_CACHE_DIR).expanduser()


def _read_cache(path: Path, graph: nx.DiGraph) -> dict[str, NodeProfile] | None:
    """The profiles stored at ``path``, or None when they are unreadable or miss a node."""
    try:
        payload = json.loads(path.read_text())
        if payload.get("format") != _CACHE_FORMAT:
            raise ValueError(f"format {payload.get('format')!r}")
        profiles = {
            name: NodeProfile(
                float(p["forward_ms"]),
                float(p["backward_ms"]),
                None if p["peak_bytes"] is None else int(p["peak_bytes"]),
            )
            for name, p in payload["profiles"].items()
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        log.warning("ignoring the unreadable profile cache %s (%s)", path, error)
        return None
    missing = [n for n in graph.nodes if n not in profiles]
    if missing:
        log.warning("ignoring the profile cache %s: it has no profile for %s", path, missing[0])
        return None
    return profiles


def _write_cache(path: Path, profiles: dict[str, NodeProfile], about: dict[str, Any]) -> None:
    """Write atomically: a temporary file in the same folder, then a rename over ``path``, so
    a reader never sees half a file and concurrent writers leave one whole one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": _CACHE_FORMAT,
        **about,
        "profiles": {n: asdict(p) for n, p in profiles.items()},
    }
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as file:
            json.dump(payload, file, indent=1, sort_keys=True)
        os.chmod(temporary, 0o644)  # mkstemp makes it private; a cache is an ordinary file
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def profile(
    traced: TraceResult,
    graph: nx.DiGraph,
    mode: str = "flops",
    device: str = "cpu",
    device_spec: str = "v100",
    recomputation: bool = True,
    save_memory_mode: bool = False,
    cache_dir: str | Path | None = None,
    cache_name: str | None = None,
    overwrite_cache: bool = False,
    progress: bool = True,
) -> dict[str, NodeProfile]:
    """Profile every node, analytically (``mode="flops"`` on the ``device_spec`` preset) or by
    measuring on ``device`` (``mode="measured"``).

    Measured profiles are slow and depend on the hardware, so they are cached as JSON under
    ``cache_dir`` (default: ``default_cache_dir()``), in ``cache_name`` or in a file named by
    ``cache_key``; an existing file is reused unless ``overwrite_cache``. FLOP profiles are
    cheap and deterministic and are not cached.
    """
    if mode == "flops":
        if device_spec not in DEVICES:
            raise UserError(
                f"unknown device spec {device_spec!r}; choose from {', '.join(DEVICES)}"
            )
        return profile_flops(traced, graph, DEVICES[device_spec], recomputation)
    if mode != "measured":
        raise UserError(f"unknown profiling mode {mode!r}; choose 'flops' or 'measured'")
    repeats = _CACHED_REPEATS
    key = cache_key(traced, graph, device, recomputation, repeats)
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = folder / (cache_name or f"{key}.json")
    if path.is_file() and not overwrite_cache:
        cached = _read_cache(path, graph)
        if cached is not None:
            log.info("using the cached profile %s", path)
            return cached
    profiles = profile_measured(
        traced,
        graph,
        device=device,
        repeats=repeats,
        recomputation=recomputation,
        save_memory_mode=save_memory_mode,
        progress=progress,
    )
    about = {
        "key": key,
        "device": device_name(device),
        "batch_size": _batch_size(traced),
        "recomputation": recomputation,
        "repeats": repeats,
    }
    _write_cache(path, profiles, about)
    log.info("wrote the profile cache %s", path)
    return profiles
