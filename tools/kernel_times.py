"""Per-kernel GPU times of our Triton forward and backward, causal against non-causal, from torch.profiler.

A diagnostic for the ring's decomposition cost: the ring turns one causal call into mostly
non-causal blocks, so a kernel that is slower per FLOP without the mask makes the ring slower.
"bwd_acc" adds the gradients into fp32 buffers in the kernels, "bwd_split" does so in the ring's
two calls per block (dK/dV, then dQ).
Usage (on a GPU): python tools/kernel_times.py --out times.json
"""

from __future__ import annotations

import argparse
import collections
import json

import torch
from torch.profiler import ProfilerActivity, profile

from fa3dist.kernels import flash_bwd, flash_fwd

# (Sq, Sk, causal): the one-call shape, and the ring's two block shapes at the same work
SHAPES = [(16384, 16384, True), (16384, 16384, False), (16384, 8192, False), (8192, 16384, False)]


def kernel_ms(fn, iters: int) -> dict[str, float]:
    """Mean GPU time per call of every kernel ``fn`` launches, by kernel name."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    totals: dict[str, float] = collections.defaultdict(float)
    for event in prof.events():
        if event.device_type.name == "CUDA":
            totals[event.name] += event.device_time / 1000 / iters
    return dict(totals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file for the rows")
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()
    heads, kv_heads, dim, dtype = 32, 8, 128, torch.bfloat16
    rows = []
    for seq_q, seq_k, causal in SHAPES:
        q, do = (torch.randn(1, seq_q, heads, dim, device="cuda", dtype=dtype) for _ in range(2))
        k, v = (torch.randn(1, seq_k, kv_heads, dim, device="cuda", dtype=dtype) for _ in range(2))
        out, lse = flash_fwd(q, k, v, softmax_scale=dim ** -0.5, causal=causal)
        flops = 4.0 * heads * seq_q * seq_k * dim / (2 if causal else 1)  # forward, as FlashAttention counts
        grads = [torch.zeros(t.shape, device="cuda") for t in (q, k, v)]  # fp32, as the ring's accumulators
        bwd_args = (do, q, k, v, out, lse)
        opts = {"softmax_scale": dim ** -0.5, "causal": causal}
        passes = {"fwd": lambda: flash_fwd(q, k, v, **opts),
                  "bwd": lambda: flash_bwd(*bwd_args, **opts),
                  "bwd_acc": lambda: flash_bwd(*bwd_args, **opts, dq=grads[0], dk=grads[1], dv=grads[2],
                                               accumulate=True),
                  "bwd_split": lambda: (flash_bwd(*bwd_args, **opts, dk=grads[1], dv=grads[2], accumulate=True),
                                        flash_bwd(*bwd_args, **opts, dq=grads[0], accumulate=True))}
        for name, fn in passes.items():
            times = kernel_ms(fn, args.iters)
            total = sum(times.values())
            pass_flops = flops * (2.5 if name.startswith("bwd") else 1.0)
            rows.append({"pass": name, "seq_q": seq_q, "seq_k": seq_k, "causal": causal, "ms": total,
                         "tflops": pass_flops / total / 1e9, "kernels_ms": times})
            print(f"{name} Sq={seq_q} Sk={seq_k} causal={causal}: {total:.2f} ms, "
                  f"{rows[-1]['tflops']:.0f} TFLOP/s; " + ", ".join(f"{n[:40]} {t:.2f}" for n, t in times.items()))
    with open(args.out, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
