"""Check and time every Gluon config, forward or backward, against cuDNN, our tuned ``tl`` kernel and FA3
(when installed); ``--pass fp8``: every FP8 forward config against the bf16 ones (ours, FA3, cuDNN).

One device call: ``python tools/gluon_sweep.py --pass bwd --out $OUT/gluon_sweep_bwd.json``. Each cell
draws fresh inputs; an implementation is timed only after its output (forward: out; backward: dq, dk
and dv for cuDNN's out/LSE) matched float64 within 1.5x cuDNN's error, or, for cells too big for a
float64 reference, cuDNN within 1e-2 (FP8: 1e-1; its error is reported). FP8 runs on the bf16 inputs
quantized per tensor with incoherent processing, V already K-major (the quantization and transpose are
not timed). Figures are TFLOP/s as the FlashAttention papers count them
(forward 4*B*H*S^2*D, halved when causal; backward 2.5x that), medians of ``triton.testing.do_bench``,
all implementations in the same process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable

import torch

from fa3dist.bench.common import attention_flops, run_meta, time_ms
from fa3dist.bench.fp8 import fp8_gemm_tflops
from fa3dist.kernels import fp8, gluon_bwd, gluon_fwd, triton_bwd, triton_fwd
from fa3dist.kernels.fa3 import unavailable_reason
from fa3dist.kernels.numerics import relative_error
from fa3dist.kernels.reference import reference_bwd, reference_fwd
from fa3dist.kernels.sdpa import cudnn_bwd, cudnn_fwd

CELLS = [  # (B, S, H, H_kv, D, causal)
    *((16384 // s, s, 2048 // d, 2048 // d, d, c) for d in (128, 64, 256) for s in (16384, 1024) for c in (False, True)),
    (1, 32768, 32, 8, 128, True), (1, 131072, 32, 8, 128, True),
]
Impl = Callable[[], tuple[torch.Tensor, ...]]


def _time(fn, args) -> float:
    return time_ms(fn, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)


def _fwd_impls(q, k, v, scale, causal, fa3, tl: bool) -> dict[str, Impl]:
    impls: dict[str, Impl] = {"cudnn": lambda: cudnn_fwd(q, k, v, softmax_scale=scale, causal=causal)[:1]}
    if tl:
        os.environ["FA3DIST_KERNEL"] = "tl"
        triton_fwd.flash_fwd(q, k, v, softmax_scale=scale, causal=causal)  # tune the tl path
        impls["tl"] = lambda: triton_fwd.flash_fwd(q, k, v, softmax_scale=scale, causal=causal)[:1]
    if fa3 is not None:
        impls["fa3"] = lambda: fa3.fa3_fwd(q, k, v, softmax_scale=scale, causal=causal)[:1]
    for cfg in gluon_fwd.GLUON_CONFIGS.get(q.shape[-1], []):
        out = torch.full_like(q, float("nan"))
        lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], device="cuda")
        name = f"gluon {cfg.name}"
        impls[name] = lambda cfg=cfg, out=out, lse=lse: gluon_fwd.gluon_launch(q, k, v, scale, causal, cfg, out, lse,
                                                                              False)[:1]
    return impls


def _fp8_impls(q, k, v, scale, causal, fa3) -> dict[str, Impl]:
    impls: dict[str, Impl] = {"cudnn": lambda: cudnn_fwd(q, k, v, softmax_scale=scale, causal=causal)[:1]}
    if fa3 is not None:
        impls["fa3"] = lambda: fa3.fa3_fwd(q, k, v, softmax_scale=scale, causal=causal)[:1]
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], device="cuda")
    bf16_cfg = gluon_fwd.GLUON_CONFIGS[q.shape[-1]][0]
    impls["gluon bf16"] = lambda: gluon_fwd.gluon_launch(q, k, v, scale, causal, bf16_cfg, out, lse, False)[:1]
    x = fp8.quantize_qkv(q, k, v, incoherent=True)
    descales = fp8.check_fp8_inputs(x.q, x.k, x.v, x.q_descale, x.k_descale, x.v_descale, causal=causal)
    vt = fp8.kmajor_v(x.v)
    for cfg in gluon_fwd.GLUON_FP8_CONFIGS.get(q.shape[-1], []):
        out8 = torch.full_like(q, float("nan"))
        name = f"fp8 {cfg.name}"
        impls[name] = lambda cfg=cfg, out8=out8: gluon_fwd.gluon_launch(
            x.q, x.k, vt, scale, causal, cfg, out8, lse, False, descales=descales)[:1]
    return impls


def _bwd_impls(q, k, v, scale, causal, fa3, do, out, lse) -> dict[str, Impl]:
    args = (do, q, k, v, out, lse)
    opts = dict(softmax_scale=scale, causal=causal)
    impls: dict[str, Impl] = {"cudnn": lambda: cudnn_bwd(*args, **opts)}
    os.environ["FA3DIST_KERNEL"] = "tl"
    triton_bwd.flash_bwd(*args, **opts)  # tune the tl path
    impls["tl"] = lambda: triton_bwd.flash_bwd(*args, **opts)
    if fa3 is not None:
        impls["fa3"] = lambda: fa3.fa3_bwd(*args, **opts)
    for cfg in gluon_bwd.GLUON_BWD_CONFIGS.get(q.shape[-1], []):
        for dq in ("tma_reduce", "separate"):
            config = cfg.candidate(dq)
            impls[f"gluon {cfg.name}/{dq}"] = (
                lambda config=config: triton_bwd.flash_bwd_config(*args, **opts, config=config))
    return impls


def sweep(args) -> list[dict]:
    rows = []
    fa3 = None
    if unavailable_reason() is None:
        from fa3dist.kernels import fa3
    for batch, seq, heads, kv_heads, dim, causal in CELLS:
        if (args.head_dims and dim not in args.head_dims) or (args.seq_lens and seq not in args.seq_lens):
            continue
        gen = torch.Generator(device="cuda").manual_seed(seq + dim + causal)
        q = torch.randn(batch, seq, heads, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
        k, v = (torch.randn(batch, seq, kv_heads, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
                for _ in range(2))
        scale = 1 / math.sqrt(dim)
        flops = attention_flops(batch, heads, seq, dim, causal, "bwd" if args.pass_ == "bwd" else "fwd")
        base = {"B": batch, "S": seq, "H": heads, "Hkv": kv_heads, "D": dim, "causal": causal, "pass": args.pass_}
        out, lse = cudnn_fwd(q, k, v, softmax_scale=scale, causal=causal)
        if args.pass_ == "fwd":
            impls = _fwd_impls(q, k, v, scale, causal, fa3, not args.no_tl)
        elif args.pass_ == "fp8":
            impls = _fp8_impls(q, k, v, scale, causal, fa3)
        else:
            do = torch.randn(q.shape, device="cuda", dtype=q.dtype, generator=gen)
            impls = _bwd_impls(q, k, v, scale, causal, fa3, do, out, lse)
        theirs = impls["cudnn"]()
        small = batch * heads * seq * seq <= (2 ** 29 if args.pass_ == "bwd" else 2 ** 31)
        if small:  # float64 scores up to 16 GB (forward) or 4 GB (backward, three of them)
            q64, k64, v64 = q.double(), k.double(), v.double()
            if args.pass_ != "bwd":
                ref = reference_fwd(q64, k64, v64, softmax_scale=scale, causal=causal)[:1]
            else:
                ref = reference_bwd(do.double(), q64, k64, v64, out.double(), lse.double(), softmax_scale=scale,
                                    causal=causal)
            bound = 1.5 * max(relative_error(a, b) for a, b in zip(theirs, ref)) + 1e-4
        else:  # too big for the float64 reference: agree with cuDNN as closely as two bf16 kernels do
            ref, bound = theirs, 1e-2
        for name, fn in impls.items():
            row = {**base, "impl": name}
            try:
                got = fn()
                torch.cuda.synchronize()
                row.update(rel_err=max(relative_error(a, b) for a, b in zip(got, ref)),
                           bound=1e-1 if name.startswith("fp8") else bound, against="float64" if small else "cudnn")
                if not row["rel_err"] <= row["bound"]:
                    raise AssertionError(f"disagrees with {row['against']}")
                ms = _time(fn, args)
                row.update(ms=ms, tflops=flops / ms / 1e9)
            except Exception as err:  # report and go on
                row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
            rows.append(row)
            print({k: (round(x, 4) if isinstance(x, float) else x) for k, x in row.items()}, flush=True)
        del q, k, v, ref, theirs, impls
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--pass", dest="pass_", choices=("fwd", "bwd", "fp8"), default="fwd")
    parser.add_argument("--no-tl", action="store_true", help="forward: leave out our tl kernel (its tuning compiles many)")
    parser.add_argument("--fp8-ceiling", action="store_true", help="also time torch._scaled_mm at 8192^3 (meta)")
    parser.add_argument("--head-dims", type=int, nargs="*")
    parser.add_argument("--seq-lens", type=int, nargs="*")
    parser.add_argument("--warmup-ms", type=float, default=25)
    parser.add_argument("--rep-ms", type=float, default=100)
    args = parser.parse_args()
    rows = sweep(args)
    meta = run_meta(1)
    if args.fp8_ceiling:
        meta["fp8_gemm_ceiling"] = fp8_gemm_tflops(warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
        print("cuBLAS fp8 GEMM (torch._scaled_mm) 8192^3:", meta["fp8_gemm_ceiling"], flush=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    cells = sorted({(r["D"], r["S"], r["B"], r["H"], r["Hkv"], r["causal"]) for r in rows})
    for cell in cells:
        found = {r["impl"]: r.get("tflops") for r in rows if (r["D"], r["S"], r["B"], r["H"], r["Hkv"], r["causal"]) == cell}
        own = "fp8" if args.pass_ == "fp8" else "gluon"
        gluon = [(t, n) for n, t in found.items() if n.startswith(own) and t]
        best = max(gluon) if gluon else (None, None)
        line = " ".join(f"{n}={t:.0f}" if t else f"{n}=ERR" for n, t in found.items())
        ratio = f" best {own}/cudnn={best[0] / found['cudnn']:.3f}" if best[0] and found.get("cudnn") else ""
        if best[0] and found.get("fa3"):
            ratio += f" /fa3={best[0] / found['fa3']:.3f}"
        print(f"{args.pass_} D={cell[0]} S={cell[1]} B={cell[2]} H={cell[3]}/{cell[4]} causal={cell[5]}: {line}{ratio}")


if __name__ == "__main__":
    main()
