"""Partition quality of every method on every zoo model.

For each model (full size), profile (flops on a device description, or measured on this machine's CPU or GPU),
number of stages and method, prints the slowest stage over the lower bound
max(total / p, costliest node) (1.000 is ideal), the total bytes sent between stages, the
partitioner's wall time and the node count; then, per profile, how much better `acyclic` and
`pipedream` are than `params` at p = 4.

    python benchmarks/partition_quality.py                       # flops profile, all models
    python benchmarks/partition_quality.py --profile measured --models resnet50 gpt2 -b 4
    python benchmarks/partition_quality.py --profile measured --device cuda -b 32 -p 4
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from autopipe.cost import CostModel, lower_bound_ms
from autopipe.graph import build_graph, propagate_values
from autopipe.partitioning import METHODS, PartitionOptions, partition
from autopipe.profile import annotate, profile
from autopipe.tasks import FAMILIES, zoo_task
from autopipe.trace import trace

FULL_SIZE = [
    name for family in FAMILIES.values() for name, spec in family.items() if spec.published_params
]


def _family(model: str) -> str:
    return next(family for family, models in FAMILIES.items() if model in models)


def measure(
    model: str,
    mode: str,
    batch: int,
    stages: list[int],
    methods: list[str],
    bandwidth: float,
    device: str = "cpu",
) -> list[dict]:
    """One row per (p, method) for ``model`` profiled by ``mode`` (measured on ``device``)."""
    task = zoo_task(_family(model), model, batch)
    traced = trace(task.model, task.example_inputs)
    graph = build_graph(traced, propagate_values(traced))
    annotate(graph, profile(traced, graph, mode=mode, device=device, progress=False))
    rows = []
    for p in stages:
        for method in methods:
            options = PartitionOptions(cost=CostModel(bandwidth=bandwidth))
            start = time.perf_counter()
            result = partition(graph, traced.graph_module, p, method, options)
            seconds = time.perf_counter() - start
            slowest = max(c.time_ms for c in result.costs)
            bound = lower_bound_ms(result.coarse, p)
            rows.append(
                dict(
                    model=model,
                    profile=mode,
                    p=p,
                    method=method,
                    ratio=slowest / bound,
                    comm_mb=sum(c.send_bytes for c in result.costs) / 1e6,
                    seconds=seconds,
                    nodes=result.coarse.number_of_nodes(),
                    slowest_ms=slowest,
                )
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=FULL_SIZE)
    parser.add_argument("--profile", choices=("flops", "measured", "both"), default="flops")
    parser.add_argument("-b", "--batch_size", type=int, default=8)
    parser.add_argument("-p", "--stages", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--methods", nargs="+", default=sorted(METHODS))
    parser.add_argument("--bw", type=float, default=12.0, help="link bandwidth, GB/s (default 12)")
    parser.add_argument("--device", default="cpu", help="where measured profiles run: cpu or cuda")
    args = parser.parse_args()
    modes = ["flops", "measured"] if args.profile == "both" else [args.profile]
    print(
        f"{'model':<24} {'profile':<9} {'p':>2} {'method':<10} {'slowest/bound':>13} {'comm MB':>9} "
        f"{'seconds':>8} {'nodes':>6}"
    )
    rows = []
    for mode in modes:
        for model in args.models:
            for row in measure(
                model, mode, args.batch_size, args.stages, args.methods, args.bw, args.device
            ):
                rows.append(row)
                print(
                    f"{row['model']:<24} {row['profile']:<9} {row['p']:>2} {row['method']:<10} "
                    f"{row['ratio']:>13.3f} {row['comm_mb']:>9.2f} {row['seconds']:>8.3f} {row['nodes']:>6}",
                    flush=True,
                )
    print()
    for mode in modes:
        for method in ("acyclic", "pipedream"):
            if method not in args.methods or "params" not in args.methods:
                continue
            for model in args.models:
                at_4 = {
                    r["method"]: r
                    for r in rows
                    if r["model"] == model and r["profile"] == mode and r["p"] == 4
                }
                if method in at_4 and "params" in at_4:
                    gain = 1 - at_4[method]["slowest_ms"] / at_4["params"]["slowest_ms"]
                    print(
                        f"{mode:<9} p=4 {model:<24} {method:<10} slowest stage {gain:.1%} faster than params "
                        f"(ratio to bound {at_4[method]['ratio']:.3f} vs {at_4['params']['ratio']:.3f})"
                    )


if __name__ == "__main__":
    main()
