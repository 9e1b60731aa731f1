"""What one attention call costs the host: microseconds of CPU per call, with the GPU kept busy elsewhere.

At small shards (many ranks, moderate contexts) a ring step's kernel runs for a few hundred
microseconds; if issuing it costs the host as long, the host bounds the ring. This tool times the
calls the ring makes (``--rows`` query rows against ``--keys`` keys, merging into fp32 buffers
where the backend can) on a problem small enough that the GPU never holds the host back:

- ``call``: the backend's fwd (or bwd) as the ring calls it;
- for backend "triton" also ``launch``: the kernel launch alone (config already chosen, no checks);
- ``--profile``: the ``call`` loop under cProfile, the top functions by own time (a text file).

    python tools/host_cost.py --backends triton fa3 cudnn --passes fwd bwd --profile --out host.json

Timing: ``--calls`` calls after a warm-up that tunes and compiles; the host clock spans the calls
only (launches are asynchronous); the GPU's own time per call (CUDA events around the loop, after a
sync) is reported beside it, so a row whose GPU time is near its host time is not host-bound.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time
from collections.abc import Callable
from typing import Any

import torch

from fa3dist.kernels import get_backend, triton_bwd, triton_fwd
from fa3dist.kernels.autotune import pick_config


def _inputs(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    dtype = torch.bfloat16
    q, do = (torch.randn(1, args.rows, args.heads, args.head_dim, device="cuda", dtype=dtype) for _ in range(2))
    k, v = (torch.randn(1, args.keys, args.kv_heads, args.head_dim, device="cuda", dtype=dtype) for _ in range(2))
    return {"q": q, "k": k, "v": v, "do": do}


def _call(backend_name: str, pass_: str, x: dict[str, torch.Tensor], causal: bool) -> Callable[[], object]:
    """The call the ring makes for one step on ``backend_name``."""
    backend = get_backend(backend_name, "cuda", x["q"].dtype)
    scale = x["q"].shape[-1] ** -0.5
    q, k, v, do = x["q"], x["k"], x["v"], x["do"]
    out, lse = backend.fwd(q, k, v, softmax_scale=scale, causal=causal)
    if pass_ == "fwd":
        if not backend.fwd_accumulates:
            return lambda: backend.fwd(q, k, v, softmax_scale=scale, causal=causal)
        acc, acc_lse = out.float(), lse.clone()
        return lambda: backend.fwd(q, k, v, softmax_scale=scale, causal=causal, out=acc, lse=acc_lse, accumulate=True)
    if not backend.bwd_accumulates:
        return lambda: backend.bwd(do, q, k, v, out, lse, softmax_scale=scale, causal=causal)
    grads = {name: torch.zeros(t.shape, device="cuda") for name, t in (("dq", q), ("dk", k), ("dv", v))}
    return lambda: backend.bwd(do, q, k, v, out, lse, softmax_scale=scale, causal=causal, accumulate=True, **grads)


def _launch_only(pass_: str, x: dict[str, torch.Tensor], causal: bool) -> Callable[[], object]:
    """Our kernel's launch with the config the tuner chose for this call (no checks, no tuning lookup)."""
    q, k, v, do = x["q"], x["k"], x["v"], x["do"]
    scale = q.shape[-1] ** -0.5
    chosen: dict[str, Any] = {}

    def spy(key, configs, launch, **kw):  # the tuner's choice for exactly this call
        chosen["cfg"] = cfg = real_pick(key, configs, launch, **kw)
        return cfg

    real_pick = pick_config
    for module in (triton_fwd, triton_bwd):
        module.pick_config = spy
    try:
        out, lse = triton_fwd.flash_fwd(q, k, v, softmax_scale=scale, causal=causal)
        acc, acc_lse = out.float(), lse.clone()
        if pass_ == "fwd":
            triton_fwd.flash_fwd(q, k, v, softmax_scale=scale, causal=causal, out=acc, lse=acc_lse, accumulate=True)
            cfg = chosen["cfg"]
            return lambda: triton_fwd._launch(q, k, v, scale, causal, cfg, acc, acc_lse, True)
        grads = [torch.zeros(t.shape, device="cuda") for t in (q, k, v)]
        triton_bwd.flash_bwd(do, q, k, v, out, lse, softmax_scale=scale, causal=causal, accumulate=True,
                             dq=grads[0], dk=grads[1], dv=grads[2])
        cfg = chosen["cfg"]
        return lambda: triton_bwd.flash_bwd_config(do, q, k, v, out, lse, softmax_scale=scale, causal=causal,
                                                   config=cfg, dq=grads[0], dk=grads[1], dv=grads[2], accumulate=True)
    finally:
        for module in (triton_fwd, triton_bwd):
            module.pick_config = real_pick


def _time(fn: Callable[[], object], calls: int) -> tuple[float, float]:
    """(host µs per call, GPU µs per call) over ``calls`` calls after a warm-up."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - t0
    end.record()
    torch.cuda.synchronize()
    return host / calls * 1e6, start.elapsed_time(end) / calls * 1e3


def _profile(fn: Callable[[], object], calls: int, top: int) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", default=["triton"], help="backends to time (default: triton)")
    parser.add_argument("--passes", nargs="+", choices=("fwd", "bwd"), default=["fwd", "bwd"])
    parser.add_argument("--rows", type=int, default=256, help="query rows of the call (default 256)")
    parser.add_argument("--keys", type=int, default=256, help="keys of the call (default 256)")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--causal", action="store_true", help="a diagonal step (needs --rows == --keys)")
    parser.add_argument("--calls", type=int, default=200, help="timed calls per row (default 200)")
    parser.add_argument("--profile", action="store_true", help="also profile each triton call loop with cProfile")
    parser.add_argument("--top", type=int, default=30, help="functions in each profile (default 30)")
    parser.add_argument("--out", required=True, help="JSON file to write (profiles beside it, .txt)")
    args = parser.parse_args()
    x = _inputs(args)
    rows, profiles = [], []
    for pass_ in args.passes:
        for name in args.backends:
            kinds = [("call", _call(name, pass_, x, args.causal))]
            if name == "triton":
                kinds.append(("launch", _launch_only(pass_, x, args.causal)))
            for kind, fn in kinds:
                host_us, gpu_us = _time(fn, args.calls)
                rows.append({"pass": pass_, "backend": name, "what": kind, "host_us": host_us, "gpu_us": gpu_us})
                print(f"{pass_} {name:7s} {kind:6s} host {host_us:7.1f} us/call  gpu {gpu_us:7.1f} us/call", flush=True)
                if args.profile and name == "triton" and kind == "call":
                    profiles.append(f"== {pass_} {name} {kind}\n" + _profile(fn, args.calls, args.top))
    shape = {k: getattr(args, k) for k in ("rows", "keys", "heads", "kv_heads", "head_dim", "causal", "calls")}
    with open(args.out, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": shape, "rows": rows},
                  f, indent=1)
    if profiles:
        with open(args.out.removesuffix(".json") + "-profile.txt", "w") as f:
            f.write("\n".join(profiles))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
