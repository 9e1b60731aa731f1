"""Time every tuning candidate of the Triton forward and backward kernels against cuDNN.

A development tool for choosing the candidate lists and their order (the first runs without
tuning): python tools/sweep_configs.py --dims 128 64 256 --budget-s 280 --out sweep.json
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from fa3dist.bench.common import attention_flops, time_ms
from fa3dist.bench.peers import prepare
from fa3dist.kernels import triton_bwd, triton_fwd
from fa3dist.kernels.numerics import relative_error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dims", type=int, nargs="+", default=[128])
    parser.add_argument("--seq", type=int, default=16384)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--passes", nargs="+", default=["fwd", "bwd"])
    parser.add_argument("--budget-s", type=float, default=280)
    parser.add_argument("--out", default="sweep.json")
    args = parser.parse_args()
    start = time.time()
    rows = []
    for head_dim in args.dims:
        for causal in (False, True):
            batch, heads = args.tokens // args.seq, 2048 // head_dim
            gen = torch.Generator(device="cuda").manual_seed(head_dim + causal)
            q, k, v, do = (torch.randn(batch, args.seq, heads, head_dim, device="cuda", dtype=torch.bfloat16,
                                       generator=gen) for _ in range(4))
            scale = 1 / math.sqrt(head_dim)
            cudnn = prepare("cudnn", q, k, v, causal=causal)
            ref_out = cudnn.forward()
            out, lse = triton_fwd._launch(q, k, v, scale, causal, triton_fwd.candidate_configs(head_dim, q.dtype)[0])
            for pass_ in args.passes:
                flops = attention_flops(batch, heads, args.seq, head_dim, causal, pass_)
                if pass_ == "fwd":
                    base = time_ms(cudnn.forward)
                    cands = triton_fwd.candidate_configs(head_dim, q.dtype)
                    run = lambda cfg: triton_fwd._launch(q, k, v, scale, causal, cfg)  # noqa: E731
                    check = lambda res: relative_error(res[0], ref_out.transpose(1, 2))  # noqa: E731
                else:
                    do_b = do.transpose(1, 2).contiguous()
                    base = time_ms(lambda: torch.autograd.grad(ref_out, (cudnn.q, cudnn.k, cudnn.v), do_b,
                                                               retain_graph=True))
                    cands = triton_bwd.candidate_configs(head_dim, q.dtype)
                    ref_dq = torch.autograd.grad(ref_out, (cudnn.q,), do_b, retain_graph=True)[0].transpose(1, 2)
                    run = lambda cfg: triton_bwd.flash_bwd_config(do, q, k, v, out, lse, softmax_scale=scale,  # noqa
                                                                  causal=causal, config=cfg)
                    check = lambda res: relative_error(res[0], ref_dq)  # noqa: E731
                print(f"D={head_dim} causal={causal} {pass_}: cudnn {flops / base / 1e9:.0f} TFLOP/s", flush=True)
                for cfg in cands:
                    if time.time() - start > args.budget_s:
                        break
                    try:
                        err = check(run(cfg))
                        ms = time_ms(lambda: run(cfg))
                    except Exception as exc:
                        print(f"  {cfg}: failed {str(exc)[:120]}", flush=True)
                        rows.append({"D": head_dim, "causal": causal, "pass": pass_, "cfg": cfg, "error": str(exc)[:300]})
                        continue
                    tf = flops / ms / 1e9
                    print(f"  {cfg}: {tf:.0f} TFLOP/s ({tf * base / flops * 1e9:.2f} of cudnn) err {err:.2e}", flush=True)
                    rows.append({"D": head_dim, "causal": causal, "pass": pass_, "cfg": cfg, "ms": ms, "tflops": tf,
                                 "cudnn_tflops": flops / base / 1e9, "rel_err_vs_cudnn": err})
            json.dump(rows, open(args.out, "w"), indent=1)
    json.dump({"gpu": torch.cuda.get_device_name(), "rows": rows}, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
