"""The `params` method: contiguous stages of about equal parameter size.

This is what peers do when they have no profile (equal parameter size per stage); it is the
baseline the profiled methods are measured against.
"""

from __future__ import annotations

import networkx as nx

from autopipe.partitioning.base import PartitionOptions, without_cycle_collection


@without_cycle_collection
def partition_by_params(
    coarse: nx.DiGraph, n_stages: int, options: PartitionOptions
) -> dict[int, int]:
    """Cut the topological order into ``n_stages`` runs minimizing the largest parameter size.

    Every node weighs its parameter bytes plus one, so parameter-free tails still spread. The
    smallest feasible bound is found by bisection; the greedy cut at that bound is then split
    further until there are exactly ``n_stages`` non-empty stages.
    """
    order = sorted(coarse.nodes, key=lambda n: coarse.nodes[n]["rank"])
    weights = [coarse.nodes[n]["param_bytes"] + 1 for n in order]
    low, high = max(weights), sum(weights)
    while low < high:
        bound = (low + high) // 2
        if len(_greedy_runs(weights, bound)) <= n_stages:
            high = bound
        else:
            low = bound + 1
    runs = _greedy_runs(weights, low)
    while len(runs) < n_stages:
        widest = max((r for r in runs if r[1] - r[0] > 1), key=lambda r: r[1] - r[0])
        i = runs.index(widest)
        middle = (widest[0] + widest[1]) // 2
        runs[i : i + 1] = [(widest[0], middle), (middle, widest[1])]
    return {order[k]: stage for stage, (start, end) in enumerate(runs) for k in range(start, end)}


def _greedy_runs(weights: list[int], bound: int) -> list[tuple[int, int]]:
    """Half-open index runs, each as long as it can be without exceeding ``bound``."""
    runs, start, total = [], 0, 0
    for k, w in enumerate(weights):
        if total + w > bound and k > start:
            runs.append((start, k))
            start, total = k, 0
        total += w
    runs.append((start, len(weights)))
    return runs
