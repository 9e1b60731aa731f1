"""Where a ring step's time goes: torch.profiler over ring_fa3_attention on every rank.

Run under torchrun on N GPUs, e.g.
    torchrun --nproc-per-node 4 tools/profile_ring.py --tokens-per-rank 8192 --out prof
Each rank writes prof/rank<r>.json: the iteration time, and per CUDA stream the time its kernels
were busy, split into attention kernels, NCCL kernels and the rest (copies, adds, merges), plus the
compute stream's idle time inside the iterations. Rank 0 also writes its Chrome trace (gzip).
The profiler's own host overhead skews the ranks against each other; ``--timing-only`` instead
times iterations without it: through ``ring_fa3_attention``, through the same ring without the
ranks-agree check (one all_gather of a few integers over a gloo group per call, on the host), and
the same schedule without communication (``LoopbackRing``).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import shutil
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from fa3dist import ring_fa3_attention, shard_sequence
from fa3dist.api import attention
from fa3dist.kernels import get_backend
from fa3dist.ring import LoopbackRing, ProcessGroupRing


def kind(name: str) -> str:
    if "nccl" in name.lower():
        return "nccl"
    if name.startswith(("_fwd_kernel", "_gluon_fwd", "_bwd_")) or "attention" in name.lower() or "flash" in name.lower():
        return "attention"
    return "other"


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def summarize(trace_path: str, window_us: float) -> dict:
    with open(trace_path) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("cat") == "kernel"]
    streams: dict[int, dict] = collections.defaultdict(lambda: collections.defaultdict(list))
    for e in events:
        streams[e["args"]["stream"]][kind(e["name"])].append((e["ts"], e["ts"] + e["dur"]))
    out = {}
    for stream, kinds in streams.items():
        out[str(stream)] = {k: busy_us(v) / 1000 for k, v in kinds.items()}
        out[str(stream)]["all"] = busy_us([i for v in kinds.values() for i in v]) / 1000
    if not out:  # a CPU run has no kernels
        return {"streams_ms": {}, "compute_stream": None, "compute_idle_ms": 0.0}
    compute = max(out, key=lambda s: out[s].get("attention", 0.0))
    return {"streams_ms": out, "compute_stream": compute,
            "compute_idle_ms": window_us / 1000 - out[compute]["all"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens-per-rank", type=int, default=8192)
    parser.add_argument("--no-causal", dest="causal", action="store_false")
    parser.add_argument("--forward-only", action="store_true")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--high-priority", action="store_true", help="NCCL streams at high priority")
    parser.add_argument("--timing-only", action="store_true", help="time with and without the ranks-agree check")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    on_gpu = torch.cuda.is_available()  # a CPU run (gloo, reference backend) only smoke-tests this script
    device = "cuda" if on_gpu else "cpu"
    if on_gpu:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    options = None
    if on_gpu and args.high_priority:
        options = dist.ProcessGroupNCCL.Options()
        options.is_high_priority_stream = True
    dist.init_process_group("nccl" if on_gpu else "gloo", timeout=timedelta(seconds=120), pg_options=options)
    gen = torch.Generator(device=device).manual_seed(0)
    seq = args.tokens_per_rank * world
    full = [torch.randn(1, seq, h, 128, device=device, dtype=torch.bfloat16 if on_gpu else torch.float32,
                        generator=gen) for h in (32, 8, 8, 32)]
    q, k, v, do = (shard_sequence(t, world_size=world, rank=rank).requires_grad_(i < 3) for i, t in enumerate(full))

    def step(mode: str = "checked") -> None:
        if mode == "checked":
            out = ring_fa3_attention(q, k, v, causal=args.causal, backend=args.backend)
        else:  # the same ring without the check, or the same schedule without communication
            ring = ProcessGroupRing() if mode == "unchecked" else LoopbackRing(rank, world)
            out, _ = attention(q, k, v, ring, causal=args.causal, softmax_scale=128 ** -0.5,
                               layout="zigzag", backend=get_backend(args.backend, device))
        if not args.forward_only:
            out.backward(do)

    for _ in range(3):
        step()
    dist.barrier()
    if args.timing_only:
        times = {}
        for mode in ("checked", "unchecked", "no_comm") * 2:
            dist.barrier()
            begin = time.perf_counter()
            for _ in range(args.iters):
                step(mode)
            if on_gpu:
                torch.cuda.synchronize()
            ms = torch.tensor((time.perf_counter() - begin) * 1000 / args.iters, device=device)
            dist.all_reduce(ms, op=dist.ReduceOp.MAX)  # the slowest rank
            times.setdefault(mode, []).append(ms.item())
        if rank == 0:
            print(json.dumps({"tokens_per_rank": args.tokens_per_rank, "world_size": world, "backend": args.backend,
                              "high_priority": args.high_priority, "ms_per_iter": times}))
        dist.destroy_process_group()
        return
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if on_gpu else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        begin = time.perf_counter()
        for _ in range(args.iters):
            step()
        if on_gpu:
            torch.cuda.synchronize()
        window_ms = (time.perf_counter() - begin) * 1000
    os.makedirs(args.out, exist_ok=True)
    trace = os.path.join(args.out, f"trace-rank{rank}.json")
    prof.export_chrome_trace(trace)
    summary = {"rank": rank, "world_size": world, "tokens_per_rank": args.tokens_per_rank, "causal": args.causal,
               "pass": "fwd" if args.forward_only else "fwd+bwd", "iters": args.iters,
               "ms_per_iter": window_ms / args.iters, **summarize(trace, window_ms * 1000)}
    summary["compute_idle_ms"] /= args.iters
    for stream in summary["streams_ms"].values():
        for key in stream:
            stream[key] /= args.iters
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary))
    if rank == 0:
        with open(trace, "rb") as src, gzip.open(trace + ".gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
    os.remove(trace)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
