"""The whole path from a model to a generated, importable, verifiable pipeline file."""

from __future__ import annotations

import importlib.util
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable, Mapping, Sequence

import networkx as nx
from torch import nn

from autopipe.codegen import generate
from autopipe.errors import UserError
from autopipe.graph import build_graph, propagate_values
from autopipe.partitioning import Partition, PartitionOptions, partition
from autopipe.trace import TraceResult, trace
from autopipe.verify import VerifyReport, verify

log = logging.getLogger(__name__)

GENERATED_DIR = Path("generated_models")


@dataclass
class CompileResult:
    """A compiled pipeline: the file, the imported module, its stages with the model's weights."""

    path: Path
    module: ModuleType
    stages: list[nn.Module]
    pipeline: dict[str, Any]
    graph: nx.DiGraph
    partition: Partition
    traced: TraceResult
    model: nn.Module = field(repr=False)
    example_inputs: Sequence[Any] | Mapping[str, Any] = field(repr=False)

    @property
    def assignment(self) -> dict[str, int]:
        """The stage of every graph node."""
        return self.partition.assignment

    def verify(self, seed: int = 0, rtol: float = 1e-5, atol: float = 1e-6) -> VerifyReport:
        """Check the stages against the original model; raises VerificationError on a mismatch."""
        return verify(self.model, self.example_inputs, self.module, seed=seed, rtol=rtol, atol=atol)


def default_output(name: str, n_stages: int, method: str) -> Path:
    """``generated_models/<name>_p<p>_<method>.py``, with the name made a valid module name."""
    stem = re.sub(r"\W", "_", f"{name}_p{n_stages}_{method}")
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


def compile(  # noqa: A001 - the public name the API promises
    model: nn.Module,
    example_inputs: Sequence[Any] | Mapping[str, Any],
    n_stages: int,
    method: str = "params",
    output: str | Path | None = None,
    *,
    name: str | None = None,
    depth: int | None = None,
    basic_blocks: Iterable[str] = (),
    seed: int = 0,
    command: str | None = None,
) -> CompileResult:
    """Trace, partition and generate ``model`` as ``n_stages`` pipeline stages.

    Writes the generated file to ``output`` (default ``generated_models/<name>_p<p>_<method>.py``),
    imports it and builds its stages with the model's weights. ``command`` is the header line
    naming what produced the file; by default, this call.
    """
    name = name or type(model).__name__
    traced = trace(model, example_inputs, depth=depth, basic_blocks=basic_blocks)
    for qualname, reason in traced.auto_leaves.items():
        log.warning("kept %s as one layer: its tracing failed with %s", qualname, reason)
    values = propagate_values(traced)
    graph = build_graph(traced, values)
    planned = partition(graph, traced.graph_module, n_stages, method, PartitionOptions(seed=seed))
    header = "# " + (command or f"autopipe.compile({name}, n_stages={n_stages}, method={method!r})")
    generated = generate(
        traced.graph_module, graph, planned.assignment, planned.n_stages, header,
        extra={"model": name, "method": method, "batch_size": _batch_size(traced)}, original=model,
    )
    path = Path(output) if output is not None else default_output(name, n_stages, method)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(generated.source)
    module = import_generated(path)
    stages = module.build_stages(model.state_dict())
    return CompileResult(path, module, stages, module.PIPELINE, graph, planned, traced, model, example_inputs)


def _batch_size(traced: TraceResult) -> int | None:
    for value in traced.inputs:
        if hasattr(value, "shape") and len(value.shape) > 0:
            return int(value.shape[0])
    return None
