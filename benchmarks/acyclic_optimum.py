"""The best slowest stage that any acyclic split can reach, next to what the partitioners reach.

A split into stages whose edges all go forward is a chain of down-sets of the contracted graph
(the nodes of stages 0..k are closed under predecessors, for every k), and a stage's time
(compute plus its sends, ``autopipe.cost.stage_costs``) depends on its own nodes alone. So
over the down-sets D, the best slowest stage of k stages ending at D is

    best[k][D] = min over down-sets C inside D of max(best[k - 1][C], time(D - C)),

an exact program where the graph has few down-sets (a chain of n units has n + 1, a residual
network a few more per block): ``autopipe.partitioning.downsets``, which ``acyclic`` also runs
as one of its starts where the graph is small enough. This prints that optimum over the lower
bound max(total / p, costliest node) beside each method's, for zoo models with a flops profile
and no memory limit, the optimum priced by ``stage_costs``. Models with more than
``--max_downsets`` down-sets are skipped.

    python benchmarks/acyclic_optimum.py                       # p = 4, 300 GB/s and 12 GB/s
    python benchmarks/acyclic_optimum.py --models vgg16_bn -p 2 4 8 --bw 300
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import networkx as nx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from autopipe.cost import CostModel, lower_bound_ms, stage_costs
from autopipe.graph import build_graph, contract, placement_groups, propagate_values
from autopipe.partitioning import PartitionOptions, partition
from autopipe.partitioning.acyclic import index_graph
from autopipe.partitioning.downsets import downsets, fastest_split
from autopipe.profile import annotate, profile
from autopipe.tasks import FAMILIES, zoo_task
from autopipe.trace import trace

DEFAULT_MODELS = [
    name for family in FAMILIES.values() for name, spec in family.items() if spec.published_params
]


def optimum(coarse: nx.DiGraph, n_stages: int, model: CostModel, cap: int) -> float:
    """The best slowest stage over all acyclic splits into ``n_stages`` non-empty stages
    (``autopipe.partitioning.downsets``, with no cap on its work), as ``stage_costs`` prices
    the split reaching it."""
    nodes, graph = index_graph(coarse)
    stages = fastest_split(graph, n_stages, model, cap, max_work=math.inf)
    stage_of = {n: stages[i] for i, n in enumerate(nodes)}
    return max(c.time_ms for c in stage_costs(coarse, stage_of, n_stages, model))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("-p", "--stages", type=int, nargs="+", default=[4])
    parser.add_argument("--bw", type=float, nargs="+", default=[300.0, 12.0], help="GB/s")
    parser.add_argument("-b", "--batch_size", type=int, default=8)
    parser.add_argument("--methods", nargs="+", default=["acyclic", "pipedream"])
    parser.add_argument("--max_downsets", type=int, default=4000)
    args = parser.parse_args()
    shown = "".join(f" {m:>10}" for m in args.methods)
    print(f"{'model':<24} {'units':>5} {'down-sets':>9} {'GB/s':>5} {'p':>2} {'optimum':>8}{shown}")
    for model_name in args.models:
        family = next(f for f, models in FAMILIES.items() if model_name in models)
        task = zoo_task(family, model_name, args.batch_size)
        traced = trace(task.model, task.example_inputs)
        graph = build_graph(traced, propagate_values(traced))
        annotate(graph, profile(traced, graph, mode="flops", progress=False))
        coarse = contract(graph, placement_groups(graph, traced.graph_module))
        head = f"{model_name:<24} {coarse.number_of_nodes():>5}"
        sets = downsets(index_graph(coarse)[1], args.max_downsets)
        if sets is None:
            print(f"{head} {'>' + str(args.max_downsets):>9}  skipped", flush=True)
            continue
        for bandwidth in args.bw:
            model = CostModel(bandwidth=bandwidth)
            for p in args.stages:
                bound = lower_bound_ms(coarse, p)
                best = optimum(coarse, p, model, args.max_downsets)
                ratios = []
                for method in args.methods:
                    result = partition(
                        graph, traced.graph_module, p, method, PartitionOptions(cost=model)
                    )
                    ratios.append(max(c.time_ms for c in result.costs) / bound)
                row = "".join(f" {r:>10.3f}" for r in ratios)
                print(
                    f"{head} {len(sets):>9} {bandwidth:>5g} {p:>2} {best / bound:>8.3f}{row}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
