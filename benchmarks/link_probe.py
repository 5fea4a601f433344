"""Run under torchrun with 2 processes: time gloo point-to-point transfers between them.

Rank 0 sends a tensor to rank 1, which sends it back, ``ROUNDS`` times per size; half the
median round trip is one transfer. A line fit through the two sizes gives the fixed cost of a
message and the bandwidth. Then, for a message already sent, how long rank 1 waits for it when
it posts the receive only then (the transfer starts once both ends are posted) and when it
posted the receive ahead, before the send. Last, what posting costs the process that posts,
time it cannot spend computing: an ``irecv``, and an ``isend`` whose receive is already
posted, which gloo writes out before it returns, so that its cost grows with the bytes (a line
fit through the two sizes again: a fixed cost and the rate of writing). Rank 0 prints all of
it as JSON:

    {"latency_ms": 0.18, "gbps": 2.6, "late_receive_ms": 0.7, "early_receive_ms": 0.03,
     "send_post_ms": 0.07, "send_gbps": 4.1, "receive_post_ms": 0.05}

``simulate_vs_measured.py`` launches it to price transfers as this machine makes them; run it
alone with ``torchrun --standalone --nproc_per_node 2 benchmarks/link_probe.py``.
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
RECEIVE_BYTES = 512 * 1024
"""The message whose receive is posted late or ahead: a microbatch's activation, roughly."""
SENT_AHEAD_S = 0.005
"""How long before the receiver asks for the message its sender posted it."""


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


def receive_wait_ms(nbytes: int, rank: int, ahead: bool) -> float:
    """Median time rank 1 spends in the receive of a message rank 0 posted ``SENT_AHEAD_S``
    before: posting the receive and waiting (``ahead=False``), or only waiting for a receive
    posted before the send (``ahead=True``)."""
    buffer = torch.zeros(nbytes // 4)
    times = []
    for round_ in range(WARMUP + ROUNDS):
        dist.barrier()
        if rank == 0:
            dist.isend(buffer, 1).wait()
            continue
        posted = dist.irecv(buffer, 0) if ahead else None
        time.sleep(SENT_AHEAD_S)
        start = time.perf_counter()
        (posted or dist.irecv(buffer, 0)).wait()
        if round_ >= WARMUP:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times) if times else 0.0


def post_ms(nbytes: int, rank: int) -> tuple[float, float]:
    """Median milliseconds rank 0 spends in ``isend`` of an ``nbytes`` message whose receive
    rank 1 posted before a barrier, and rank 1 in that ``irecv``: (send, receive)."""
    buffer = torch.zeros(nbytes // 4)
    sends, receives = [], []
    for round_ in range(WARMUP + ROUNDS):
        start = time.perf_counter()
        posted = dist.irecv(buffer, 0) if rank == 1 else None
        receive = (time.perf_counter() - start) * 1e3
        dist.barrier()
        start = time.perf_counter()
        posted = dist.isend(buffer, 1) if rank == 0 else posted
        send = (time.perf_counter() - start) * 1e3
        posted.wait()
        if round_ >= WARMUP:
            sends.append(send)
            receives.append(receive)
    figures = torch.tensor([statistics.median(sends), statistics.median(receives)])
    dist.broadcast(figures[1:], src=1)
    return figures[0].item(), figures[1].item()


def line_fit(small_ms: float, large_ms: float) -> tuple[float, float]:
    """The fixed milliseconds and the milliseconds per byte of a line through the times of
    the two ``SIZES``."""
    per_byte_ms = max(large_ms - small_ms, 1e-9) / (SIZES[1] - SIZES[0])
    return max(small_ms - per_byte_ms * SIZES[0], 0.0), per_byte_ms


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    latency, per_byte_ms = line_fit(*(one_way_ms(nbytes, rank) for nbytes in SIZES))
    waits = [receive_wait_ms(RECEIVE_BYTES, rank, ahead) for ahead in (False, True)]
    posts = [post_ms(nbytes, rank) for nbytes in SIZES]
    send_post, send_per_byte_ms = line_fit(posts[0][0], posts[1][0])
    receive_post = statistics.mean(receive for _, receive in posts)
    # rank 1 measured the waits; rank 0 prints
    found = torch.tensor(waits, dtype=torch.float64)
    dist.broadcast(found, src=1)
    if rank == 0:
        figures = {
            "latency_ms": latency,
            "gbps": 1 / (per_byte_ms * 1e6),
            "late_receive_ms": found[0].item(),
            "early_receive_ms": found[1].item(),
            "send_post_ms": send_post,
            "send_gbps": 1 / (send_per_byte_ms * 1e6),
            "receive_post_ms": receive_post,
        }
        print(json.dumps(figures), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
