"""The best slowest stage that any acyclic split can reach, next to what the partitioners reach.

A split into stages whose edges all go forward is a chain of down-sets of the contracted graph
(the nodes of stages 0..k are closed under predecessors, for every k), and a stage's time
(compute plus its sends, ``autopipe.cost.stage_costs``) depends on its own nodes alone. So
over the down-sets D, the best slowest stage of k stages ending at D is

    best[k][D] = min over down-sets C inside D of max(best[k - 1][C], time(D - C)),

an exact program where the graph has few down-sets (a chain of n units has n + 1, a residual
network a few more per block). This prints that optimum over the lower bound
max(total / p, costliest node) beside each method's, for zoo models with a flops profile and
no memory limit, and checks the optimum's split with ``stage_costs``. Models with more than
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
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from autopipe.cost import CostModel, lower_bound_ms, node_compute_ms, stage_costs
from autopipe.graph import build_graph, contract, placement_groups, propagate_values
from autopipe.partitioning import PartitionOptions, partition
from autopipe.profile import annotate, profile
from autopipe.tasks import FAMILIES, zoo_task
from autopipe.trace import trace

DEFAULT_MODELS = [
    name for family in FAMILIES.values() for name, spec in family.items() if spec.published_params
]


class TooManyDownsets(Exception):
    pass


def downsets(coarse: nx.DiGraph, nodes: list, cap: int) -> np.ndarray:
    """Every down-set of ``coarse`` as a row of a (down-sets, nodes) boolean array, smallest
    first; TooManyDownsets past ``cap``."""
    index = {node: i for i, node in enumerate(nodes)}
    needs = [sum(1 << index[u] for u in coarse.predecessors(node)) for node in nodes]
    found, layer = [0], [0]
    seen = {0}
    while layer:
        grown = []
        for members in layer:
            for i, need in enumerate(needs):
                bigger = members | (1 << i)
                if bigger != members and need & ~members == 0 and bigger not in seen:
                    seen.add(bigger)
                    grown.append(bigger)
        if len(seen) > cap:
            raise TooManyDownsets(len(seen))
        found += grown
        layer = grown
    bits = np.array([[(members >> i) & 1 for i in range(len(nodes))] for members in found])
    return bits.astype(bool)


def stage_times(coarse: nx.DiGraph, nodes: list, sets: np.ndarray, model: CostModel) -> np.ndarray:
    """time[c, d]: the time of the stage holding down-set d less down-set c, where c lies
    inside d and differs from it; inf elsewhere."""
    index = {node: i for i, node in enumerate(nodes)}
    compute = sets @ np.array([node_compute_ms(coarse, n) for n in nodes])
    consumers: dict[tuple[int, str], set[int]] = {}
    for u, v, edge in coarse.edges(data=True):
        for name in edge.get("values", ()):
            consumers.setdefault((index[u], name), set()).add(index[v])
    values = sorted(consumers)
    weights = np.empty(len(values))
    for k, (u, name) in enumerate(values):
        nbytes, grad = coarse.nodes[nodes[u]].get("sends", {}).get(name, (0, False))
        weights[k] = nbytes * (2 if grad else 1)
    made = sets[:, [u for u, _ in values]].astype(float)  # value made inside the down-set
    leaves = np.array([~sets[:, sorted(consumers[v])].all(axis=1) for v in values]).T
    outgoing = made * leaves * weights  # bytes a down-set sends out of itself, per value
    # a stage d - c sends what d sends out, less what c makes (c's nodes are not in the stage)
    sent = outgoing.sum(axis=1)[None, :] - made @ outgoing.T
    dense = sets.astype(np.float32)
    inside = dense @ (~sets).astype(np.float32).T == 0  # inside[c, d]: c within d
    np.fill_diagonal(inside, False)
    times = compute[None, :] - compute[:, None] + model.transfer_ms(np.maximum(sent, 0.0))
    return np.where(inside, times, np.inf)


def optimum(
    coarse: nx.DiGraph,
    nodes: list,
    sets: np.ndarray,
    times: np.ndarray,
    n_stages: int,
    model: CostModel,
) -> float:
    """The best slowest stage over all acyclic splits into ``n_stages`` non-empty stages, from
    the graph's down-sets ``sets`` and their ``stage_times``, checked against ``stage_costs``
    on the split reaching it."""
    best = np.full(len(sets), np.inf)
    best[0] = 0.0  # the empty down-set
    choices = []
    for _ in range(n_stages):
        candidates = np.maximum(best[:, None], times)
        choices.append(candidates.argmin(axis=0))
        best = candidates.min(axis=0)
    whole = len(sets) - 1
    stage_of, d = {}, whole
    for stage in reversed(range(n_stages)):
        c = choices[stage][d]
        for i in np.flatnonzero(sets[d] & ~sets[c]):
            stage_of[nodes[i]] = stage
        d = c
    checked = max(c.time_ms for c in stage_costs(coarse, stage_of, n_stages, model))
    assert math.isclose(checked, best[whole], rel_tol=1e-9), (checked, best[whole])
    return float(best[whole])


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
        nodes = list(coarse.nodes)
        head = f"{model_name:<24} {len(nodes):>5}"
        try:
            sets = downsets(coarse, nodes, args.max_downsets)
        except TooManyDownsets:
            print(f"{head} {'>' + str(args.max_downsets):>9}  skipped", flush=True)
            continue
        for bandwidth in args.bw:
            model = CostModel(bandwidth=bandwidth)
            times = stage_times(coarse, nodes, sets, model)
            for p in args.stages:
                bound = lower_bound_ms(coarse, p)
                best = optimum(coarse, nodes, sets, times, p, model)
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
