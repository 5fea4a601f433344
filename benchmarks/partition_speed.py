"""Wall time of every partitioner on a synthetic graph of 10,000 units, with and without a
memory limit that binds.

The graph is the layered one ``tests/test_metis_acyclic.py`` builds (100 layers of 100 units,
skip connections up to 8 layers back). The limit is ``--limit`` times the peak stage memory of
the unlimited ``acyclic`` partition, so that it binds; the best of ``--repeats`` runs is printed,
and a note where a method leaves a stage over the limit (``autopipe.partition`` would reject it).

    python benchmarks/partition_speed.py                 # p = 8, limit 0.9
    python benchmarks/partition_speed.py -p 16 --limit 0.9
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from test_metis_acyclic import MODEL, PARTITIONERS, layered

from autopipe.cost import stage_costs
from autopipe.errors import UserError
from autopipe.partitioning import METHODS, PartitionOptions, Plan


def best_seconds(run, repeats: int) -> tuple[float, object]:
    """The shortest of ``repeats`` timed calls of ``run``, and what the last returned."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        answer = run()
        times.append(time.perf_counter() - start)
    return min(times), answer


def over(coarse, answer, n_stages: int, options: PartitionOptions) -> str:
    """A note where the partition ``answer`` leaves a stage over the memory limit, else ''."""
    limit = options.cost.memory_limit
    stage_of = answer.stage_of if isinstance(answer, Plan) else answer
    peak = max(c.memory_bytes for c in stage_costs(coarse, stage_of, n_stages, options.cost))
    return "" if limit is None or peak <= limit else f" (over the limit: {peak / limit:.2f}x)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-p", "--stages", type=int, default=8)
    parser.add_argument("--limit", type=float, default=0.9, help="fraction of the free peak")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    coarse = layered(100, 100, seed=1, byte_scale=100_000)
    free = PARTITIONERS["acyclic"](coarse, args.stages, PartitionOptions())
    peak = max(c.memory_bytes for c in stage_costs(coarse, free, args.stages, MODEL))
    limited = PartitionOptions(cost=replace(MODEL, memory_limit=args.limit * peak))
    print(f"{coarse.number_of_nodes()} units, p = {args.stages}, limit {args.limit} of the peak")
    for name, method in sorted(METHODS.items()):
        row = [f"{name:<10}"]
        for label, options in (("free", PartitionOptions()), ("limited", limited)):
            try:
                run = functools.partial(method, coarse, args.stages, options)
                seconds, answer = best_seconds(run, args.repeats)
                row.append(f"{label} {seconds:.2f} s{over(coarse, answer, args.stages, options)}")
            except UserError as error:
                row.append(f"{label}: {error}")
        print("  ".join(row), flush=True)


if __name__ == "__main__":
    main()
