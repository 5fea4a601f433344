"""The whole path from a model to a generated, importable, verifiable pipeline file."""

from __future__ import annotations

import importlib.util
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable, Mapping, Sequence

import networkx as nx
from torch import nn

from autopipe.analysis import Analysis, analyse
from autopipe.codegen import generate
from autopipe.cost import CostModel, lower_bound_ms
from autopipe.errors import UserError
from autopipe.graph import build_graph, propagate_values
from autopipe.partitioning import DEFAULT_METHOD, Partition, PartitionOptions, partition
from autopipe.profile import annotate, profile
from autopipe.trace import TraceResult, trace
from autopipe.verify import VerifyReport, verify

log = logging.getLogger(__name__)

GENERATED_DIR = Path("generated_models")


@dataclass
class CompileResult:
    """A compiled pipeline: the file, the imported module, its stages with the model's weights."""

    path: Path | None
    module: ModuleType | None
    stages: list[nn.Module]
    pipeline: dict[str, Any]
    graph: nx.DiGraph
    partition: Partition
    traced: TraceResult
    analysis: Analysis | None
    model: nn.Module = field(repr=False)
    example_inputs: Sequence[Any] | Mapping[str, Any] = field(repr=False)

    @property
    def assignment(self) -> dict[str, int]:
        """The stage of every graph node."""
        return self.partition.assignment

    def verify(self, seed: int = 0, rtol: float = 1e-5, atol: float = 1e-6) -> VerifyReport:
        """Check the stages against the original model; raises VerificationError on a mismatch."""
        if self.module is None:
            raise UserError("nothing was generated (write=False), so there is nothing to verify")
        return verify(self.model, self.example_inputs, self.module, seed=seed, rtol=rtol, atol=atol)


def default_output(name: str, n_stages: int, method: str, cost: CostModel = CostModel()) -> Path:
    """``generated_models/<name>_p<p>_<method>.py``, with the name made a valid module name;
    under wpipe p counts devices and the name says so: ``<name>_p<p>_wpipe_<method>.py``."""
    devices = n_stages // cost.stages_per_device
    schedule = "_wpipe" if cost.schedule == "wpipe" else ""
    stem = re.sub(r"\W", "_", f"{name}_p{devices}{schedule}_{method}")
    return GENERATED_DIR / f"{stem}.py"


def import_generated(path: Path) -> ModuleType:
    """Import a generated file by path."""
    module_name = "autopipe_generated_" + re.sub(r"\W", "_", path.stem)
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise UserError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class ProfileSettings:
    """How node costs are obtained: ``flops`` (analytical, deterministic) or ``measured``.

    The fields are ``autopipe.profile.profile``'s keyword arguments.
    """

    mode: str = "flops"
    device: str = "cpu"
    device_spec: str = "v100"
    recomputation: bool = True
    save_memory_mode: bool = False
    cache_name: str | None = None
    overwrite_cache: bool = False
    progress: bool = False


def compile(  # noqa: A001 - the public name the API promises
    model: nn.Module,
    example_inputs: Sequence[Any] | Mapping[str, Any],
    n_stages: int,
    method: str = DEFAULT_METHOD,
    output: str | Path | None = None,
    *,
    name: str | None = None,
    depth: int | None = None,
    basic_blocks: Iterable[str] = (),
    seed: int = 0,
    options: PartitionOptions | None = None,
    profiling: ProfileSettings = ProfileSettings(),
    analysis: bool = True,
    write: bool = True,
    command: str | None = None,
    source: Mapping[str, str] | None = None,
) -> CompileResult:
    """Trace, profile, partition and generate ``model`` as ``n_stages`` pipeline stages.

    Writes the generated file to ``output`` (default ``generated_models/<name>_p<p>_<method>.py``),
    imports it and builds its stages with the model's weights; with ``write=False`` only the
    partition and its analysis are made. ``options`` holds the cost model and method settings,
    ``profiling`` how node costs are obtained. ``command`` is the header line naming what
    produced the file; by default, this call. ``source`` says how to build the original model
    again (``{"family": ..., "model": ...}`` for the zoo, ``{"task": "FILE.py:NAME"}``), so the
    runtime can start from its initial weights; it is written into ``PIPELINE["source"]``.

    With ``options.cost.schedule == "wpipe"`` the stages run two per device: ``n_stages`` is 2P
    for P devices, stage s runs on device s mod P, and ``PIPELINE`` gives every stage its
    ``"device"`` and the top level the number of ``"devices"``.
    """
    name = name or type(model).__name__
    options = options or PartitionOptions(seed=seed)
    traced = trace(model, example_inputs, depth=depth, basic_blocks=basic_blocks)
    for qualname, reason in traced.auto_leaves.items():
        log.warning("kept %s as one layer: its tracing failed with %s", qualname, reason)
    graph = build_graph(traced, propagate_values(traced))
    annotate(graph, profile(traced, graph, **asdict(profiling)))
    planned = partition(graph, traced.graph_module, n_stages, method, options)
    batch_size = _batch_size(traced)
    report = (
        analyse(
            planned.costs,
            planned.replicas,
            lower_bound_ms(planned.coarse, sum(planned.replicas)),
            options.cost,
            batch_size,
            planned.links,
        )
        if analysis
        else None
    )
    if not write:
        return CompileResult(
            None, None, [], {}, graph, planned, traced, report, model, example_inputs
        )
    header = "# " + (command or f"autopipe.compile({name}, n_stages={n_stages}, method={method!r})")
    generated = generate(
        traced.graph_module,
        graph,
        planned,
        header,
        extra={
            "model": name,
            "method": method,
            "batch_size": batch_size,
            **({"source": dict(source)} if source else {}),
        },
        original=model,
        analysis=(
            f"{_settings_line(profiling, options, batch_size)}\n{report.table()}"
            if report
            else None
        ),
    )
    path = (
        Path(output) if output is not None else default_output(name, n_stages, method, options.cost)
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(generated.source)
    module = import_generated(path)
    stages = module.build_stages(model.state_dict())
    return CompileResult(
        path, module, stages, module.PIPELINE, graph, planned, traced, report, model, example_inputs
    )


def _settings_line(profiling: ProfileSettings, options: PartitionOptions, batch: int | None) -> str:
    """What the analysis assumed, in one line."""
    where = profiling.device_spec if profiling.mode == "flops" else profiling.device
    cost = options.cost
    layout = (
        f", {cost.schedule} with {cost.stages_per_device} stages per device"
        if cost.stages_per_device > 1
        else ""
    )
    return (
        f"{profiling.mode} profile on {where}, batch {batch}, {_links_text(options)}, "
        f"{cost.microbatches} microbatches{layout}"
    )


def _links_text(options: PartitionOptions) -> str:
    """The link speeds the analysis assumed: one for all, or one per level of the machine."""
    if not options.levels:
        return f"{options.cost.bandwidth:g} GB/s links"
    counts = " x ".join(str(level.count) for level in options.levels)
    speeds = " / ".join(f"{level.bandwidth:g}" for level in options.levels)
    return f"{counts} devices with {speeds} GB/s links per level (innermost first)"


def _batch_size(traced: TraceResult) -> int | None:
    for value in traced.inputs:
        if hasattr(value, "shape") and len(value.shape) > 0:
            return int(value.shape[0])
    return None
