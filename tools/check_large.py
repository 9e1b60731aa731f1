"""Accuracy at long sequences with GQA: each backend (and the ring on virtual ranks) against float64
math on a slice of query rows. python tools/check_large.py --seq 32768"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from fa3dist.kernels import get_backend
from fa3dist.kernels.numerics import relative_error
from fa3dist.layout import shard_positions, shard_sequence
from fa3dist.ring import ring_forward, run_thread_ring


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seq", type=int, default=32768)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--rows", type=int, default=512)
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    S, H, HK, D = args.seq, args.heads, args.kv_heads, 128
    q = torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(1, S, HK, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
    scale = D ** -0.5
    for causal in (True, False):
        rows = torch.cat([torch.arange(0, args.rows), torch.arange(S - args.rows, S)]).cuda()
        g = H // HK
        qr = q[:, rows].double()
        kk, vv = (t.double().repeat_interleave(g, dim=2) for t in (k, v))
        s = torch.einsum("bqhd,bkhd->bhqk", qr, kk) * scale
        if causal:
            s = s.masked_fill(rows[None, None, :, None] < torch.arange(S, device="cuda")[None, None, None, :],
                              float("-inf"))
        ref = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), vv)
        del s
        results = {}
        for name in ("triton", "cudnn", "flash2"):
            out, _ = get_backend(name).fwd(q, k, v, softmax_scale=scale, causal=causal)
            results[name] = out[:, rows]
        for name, backend in (("sdpa-cudnn-contig", "CUDNN_ATTENTION"), ("sdpa-flash-contig", "FLASH_ATTENTION")):
            from torch.nn.attention import SDPBackend, sdpa_kernel
            with sdpa_kernel(getattr(SDPBackend, backend)):
                out = F.scaled_dot_product_attention(*(t.transpose(1, 2).contiguous() for t in (q, k, v)),
                                                     is_causal=causal, enable_gqa=True, scale=scale)
            results[name] = out.transpose(1, 2)[:, rows]
        with __import__("torch.nn.attention", fromlist=["sdpa_kernel"]).sdpa_kernel(
                __import__("torch.nn.attention", fromlist=["SDPBackend"]).SDPBackend.CUDNN_ATTENTION):
            out = F.scaled_dot_product_attention(*(t.transpose(1, 2).contiguous() for t in
                                                   (q, k.repeat_interleave(g, 2), v.repeat_interleave(g, 2))),
                                                 is_causal=causal, scale=scale)
        results["sdpa-cudnn-mha"] = out.transpose(1, 2)[:, rows]
        for name in ("triton", "cudnn"):
            backend = get_backend(name)
            outs = run_thread_ring(lambda ring: ring_forward(
                *(shard_sequence(t, world_size=2, rank=ring.rank) for t in (q, k, v)), ring, backend=backend,
                softmax_scale=scale, causal=causal, layout="zigzag")[0], 2)
            full = torch.empty_like(q)
            for r, o in enumerate(outs):
                full[:, shard_positions(S, world_size=2, rank=r, device="cuda")] = o
            results[f"ring2-{name}"] = full[:, rows]
        for name, out in results.items():
            print(f"causal={causal} {name:20s} rel err vs float64 {relative_error(out, ref):.3e}", flush=True)


if __name__ == "__main__":
    main()
