"""Run under torchrun with 2 processes: time gloo point-to-point transfers between them.

Rank 0 sends a tensor to rank 1, which sends it back, ``ROUNDS`` times per size; half the
median round trip is one transfer. A line fit through the two sizes gives the fixed cost of a
message and the bandwidth, which rank 0 prints as JSON:

    {"latency_ms": 0.18, "gbps": 2.6}

``simulate_vs_measured.py`` launches it to price transfers as this machine makes them.
"""

from __future__ import annotations

import json
import statistics
import time

import torch
import torch.distributed as dist

SIZES = (64 * 1024, 4 * 1024 * 1024)
"""Bytes per message: one small enough to show the fixed cost, one large enough for bandwidth."""
ROUNDS = 40
WARMUP = 5


def one_way_ms(nbytes: int, rank: int) -> float:
    """Half the median round trip of an ``nbytes`` tensor between ranks 0 and 1."""
    buffer = torch.zeros(nbytes // 4)
    times = []
    for round_ in range(WARMUP + ROUNDS):
        dist.barrier()
        start = time.perf_counter()
        if rank == 0:
            dist.send(buffer, 1)
            dist.recv(buffer, 1)
        else:
            dist.recv(buffer, 0)
            dist.send(buffer, 0)
        if round_ >= WARMUP:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times) / 2


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    small, large = (one_way_ms(nbytes, rank) for nbytes in SIZES)
    per_byte_ms = max(large - small, 1e-9) / (SIZES[1] - SIZES[0])
    latency = max(small - per_byte_ms * SIZES[0], 0.0)
    if rank == 0:
        print(json.dumps({"latency_ms": latency, "gbps": 1 / (per_byte_ms * 1e6)}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
