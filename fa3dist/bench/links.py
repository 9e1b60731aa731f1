"""Link bandwidth and latency between the ranks of a group, as the cost model (``fa3dist.plan``)
counts them: time = latency + bytes / bandwidth, bandwidth in GB/s (1e9 bytes/s) per direction per
GPU, fitted to single calls of two sizes like the ones a ring step or an all-to-all makes."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .common import time_ms_events

MIB = 2**20


def _slowest_ms(call, group: dist.ProcessGroup | None, device: torch.device, repeats: int) -> float:
    ms = time_ms_events(call, min_iters=repeats, max_iters=repeats, barrier=lambda: dist.barrier(group=group))
    slowest = torch.tensor([ms], dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
    return slowest.item()


def _fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(GB/s, latency in us) of the line through two (bytes, ms) points.

    Raises RuntimeError when the larger transfer was not the slower one: noise, not a bandwidth.
    """
    (n0, t0), (n1, t1) = points
    if t1 <= t0:
        raise RuntimeError(f"link measurement is noise: {n1} bytes took {t1:.3f} ms, {n0} bytes {t0:.3f} ms; "
                           "rerun, or give the bandwidth in the plan config")
    ms_per_byte = (t1 - t0) / (n1 - n0)
    return 1e-6 / ms_per_byte, max(t0 - ms_per_byte * n0, 0.0) * 1e3


def measure_links(group: dist.ProcessGroup | None, device: torch.device,
                  sizes: tuple[int, int] = (16 * MIB, 128 * MIB), repeats: int = 5) -> dict[str, float]:
    """Bandwidth and latency of two patterns over ``group``, each fitted to single calls of the two
    ``sizes`` (bytes a rank sends), the median of ``repeats`` calls after a warm-up (barrier before
    each), the slowest rank's:
    - "send_recv": K and V (two buffers of half the size) to rank+1 from rank-1 in one
      ``batch_isend_irecv``, as a ring step sends them;
    - "all_to_all": ``all_to_all_single`` of size * W / (W-1) bytes, of which the size leaves the rank.
    Returns "<pattern>_gbps" and "<pattern>_latency_us". Every rank of ``group`` must call it."""
    from fa3dist.ring import ProcessGroupRing

    world = dist.get_world_size(group)
    ring = ProcessGroupRing(group)

    def send_recv_ms(size: int) -> float:
        halves = [torch.empty(size // 2, dtype=torch.uint8, device=device) for _ in range(2)]
        return _slowest_ms(lambda: ring.send_recv(halves).wait(), group, device, repeats)

    def all_to_all_ms(size: int) -> float:
        buffer = torch.empty(size // (world - 1) * world, dtype=torch.uint8, device=device)
        received = torch.empty_like(buffer)
        return _slowest_ms(lambda: dist.all_to_all_single(received, buffer, group=group), group, device, repeats)

    timed = {"send_recv": [(size, send_recv_ms(size)) for size in sizes],
             "all_to_all": [(size, all_to_all_ms(size)) for size in sizes]}
    results = {}
    for pattern, points in timed.items():
        results[f"{pattern}_gbps"], results[f"{pattern}_latency_us"] = _fit(points)
    return results
