"""The exact fastest acyclic split of a graph with few down-sets.

A split into stages whose edges all go forward is a chain of down-sets (the clusters of stages
0..k are closed under predecessors, for every k), and a stage's time, its compute plus what it
sends (``acyclic.stage_times``), depends on its own clusters alone. So over the down-sets D of
the graph, the fastest slowest stage of k stages covering D is

    best[k][D] = min over down-sets C strictly inside D of max(best[k - 1][C], time(D - C)),

a program over pairs of down-sets. A chain of n clusters has n + 1 down-sets and each parallel
branch (a residual block's shortcut, say) multiplies them, so the program is exact and cheap on
the graphs that have at most ``MAX_DOWNSETS`` of them; ``fastest_split`` declines the others
(and those where the program would cost more than ``MAX_WORK``).
It minimises the slowest stage alone: memory is left to the caller's objective.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from autopipe.cost import CostModel

if TYPE_CHECKING:
    from autopipe.partitioning.acyclic import ClusterGraph

MAX_DOWNSETS = 2048
"""Above this many down-sets the program's (down-sets x down-sets) tables cost more than they
are worth (at 2048, 32 MB each)."""
MAX_WORK = 1e9
"""The most (down-sets)^2 x (clusters + stages) the program may cost: about a quarter of a
second here. A long chain passes the down-set cap but not this; the contiguous program, which
is exact on a chain, covers it."""


def downsets(graph: ClusterGraph, cap: int = MAX_DOWNSETS) -> np.ndarray | None:
    """Every down-set of ``graph`` as a row of a (down-sets, clusters) boolean array, by size
    (the empty one first, the whole graph last); None where there are more than ``cap``."""
    n = len(graph)
    preds, succs = graph.pred_lists, graph.succ_lists
    needs = [sum(1 << u for u in preds[v]) for v in range(n)]
    seen = {0}
    found = [0]
    layer = [(0, [v for v in range(n) if not preds[v]])]
    while layer:
        grown = []
        for members, ready in layer:
            for v in ready:
                bigger = members | (1 << v)
                if bigger in seen:
                    continue
                seen.add(bigger)
                if len(seen) > cap:
                    return None
                freed = [s for s in succs[v] if needs[s] & ~bigger == 0]
                grown.append((bigger, [r for r in ready if r != v] + freed))
        found.extend(members for members, _ in grown)
        layer = grown
    width = (n + 7) // 8
    packed = np.frombuffer(b"".join(m.to_bytes(width, "little") for m in found), np.uint8)
    bits = np.unpackbits(packed.reshape(len(found), width), axis=1, bitorder="little")
    return bits[:, :n].astype(bool)


def pair_times(graph: ClusterGraph, sets: np.ndarray, model: CostModel) -> np.ndarray:
    """times[c, d]: the time of the stage made of down-set d less down-set c, where c lies
    strictly inside d; inf elsewhere.

    The stage sends value x when x's producer is in it and some consumer is not. A consumer in
    c would put the producer in c too, so that is: the producer is in d but not in c, and x
    leaves d.
    """
    values = graph.values
    dense = sets.astype(np.float64)
    compute = dense @ graph.weight
    consumes = np.zeros((len(graph), len(values)))
    consumes[values.pair_consumer, values.pair_value] = 1.0
    consumers = consumes.sum(axis=0)
    inside_d = dense @ consumes  # per down-set and value, its consumers in the down-set
    made = dense[:, values.producer]
    outgoing = made * (inside_d < consumers) * values.nbytes
    sent = outgoing.sum(axis=1)[None, :] - made @ outgoing.T
    flags = sets.astype(np.float32)
    within = flags @ (1.0 - flags).T == 0  # counts, exact in float32
    np.fill_diagonal(within, False)
    times = compute[None, :] - compute[:, None] + model.transfer_ms(np.maximum(sent, 0.0))
    return np.where(within, times, np.inf)


def fastest_split(
    graph: ClusterGraph,
    n_stages: int,
    model: CostModel,
    cap: int = MAX_DOWNSETS,
    max_work: float = MAX_WORK,
) -> list[int] | None:
    """The stage of every cluster in a split into ``n_stages`` non-empty stages, all edges
    going forward, whose slowest stage is the fastest any such split reaches; None where the
    graph has more than ``cap`` down-sets, the program would cost more than ``max_work``, or
    there are fewer clusters than stages."""
    if len(graph) < n_stages or len(graph) ** 3 > max_work:  # n clusters, n + 1 down-sets
        return None
    sets = downsets(graph, cap)
    if sets is None:
        return None
    if len(sets) ** 2 * (len(graph) + n_stages) > max_work:
        return None
    times = pair_times(graph, sets, model)
    best = np.full(len(sets), np.inf)
    best[0] = 0.0
    choices = []
    for _ in range(n_stages):
        candidates = np.maximum(best[:, None], times)
        choice = candidates.argmin(axis=0)
        choices.append(choice)
        best = candidates[choice, np.arange(len(sets))]
    stages = [0] * len(graph)
    d = len(sets) - 1
    for stage in reversed(range(n_stages)):
        c = choices[stage][d]
        for cluster in np.flatnonzero(sets[d] & ~sets[c]).tolist():
            stages[cluster] = stage
        d = c
    return stages
