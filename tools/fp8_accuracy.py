"""FP8 attention accuracy on the CPU: output RMSE against float64 attention, quantization emulated.

A CPU emulation of the FP8 forward's numerics (kernels/fp8.py: e4m3 q/k/v with descales, P rounded
to e4m3 as FA3 does), not a kernel run. Inputs follow the FA3 paper's outlier distribution: each
entry N(0, 1), plus N(0, outlier_std^2) on a random outlier_prob of the entries, drawn in float64
and rounded to bf16 once; those bf16 tensors are the inputs of every row, and the truth is float64
attention of them. RMSE = sqrt(mean((out - truth)^2)) over every element of out, out in bf16 as a
kernel returns it (fp16 for the fp16 row).

Rows: fp16 and bf16 (the reference backend: fp32 math), then fp8 with per-tensor or per-(batch,
head) scales, each with and without incoherent processing. For fp8 rows "rmse_inputs" keeps P
exact (the q/k/v quantization alone); the "fp8 P only" row quantizes P alone. With ``--kernel`` (a
CUDA GPU) every fp8 row also runs our FP8 forward (``flash_fwd``, the Gluon kernel on sm90) on the
same e4m3 inputs: "rmse_kernel".

Usage: python tools/fp8_accuracy.py --out-dir bench/results --stem fp8-accuracy-cpu-2026-12-02
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from typing import Any

import torch

from fa3dist.bench.common import markdown_table, run_meta, write_results
from fa3dist.kernels.fp8 import GRANULARITIES, P_SCALE, attention_p_fp8, fp8_reference_fwd, quantize_qkv
from fa3dist.kernels.reference import reference_fwd
from fa3dist.kernels.triton_fwd import flash_fwd

PAPER = {"fp16": 1.9e-4, "fp8 tensor": 2.4e-2, "fp8 block+incoherent": 9.1e-3}  # FA3 paper, H100


def outlier_inputs(shape: tuple[int, ...], *, outlier_prob: float, outlier_std: float,
                   gen: torch.Generator) -> torch.Tensor:
    """N(0, 1) entries plus N(0, outlier_std^2) on a random ``outlier_prob`` of them, rounded to bf16."""
    x = torch.randn(shape, dtype=torch.float64, generator=gen)
    mask = torch.rand(shape, dtype=torch.float64, generator=gen) < outlier_prob
    x = x + mask * outlier_std * torch.randn(shape, dtype=torch.float64, generator=gen)
    return x.to(torch.bfloat16)


def rmse(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.double() - ref.double()).pow(2).mean().sqrt().item()


def measure(head_dim: int, causal: bool, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every row of one (head_dim, causal) case, on one draw of the inputs."""
    gen = torch.Generator().manual_seed(args.seed * 1000 + head_dim * 2 + causal)
    q_shape = (args.batch, args.seq, args.heads, head_dim)
    kv_shape = (args.batch, args.seq, args.kv_heads, head_dim)
    q, k, v = (outlier_inputs(s, outlier_prob=args.outlier_prob, outlier_std=args.outlier_std, gen=gen)
               for s in (q_shape, kv_shape, kv_shape))
    opts = {"softmax_scale": 1 / math.sqrt(head_dim), "causal": causal}
    truth, _ = reference_fwd(q.double(), k.double(), v.double(), **opts)
    case = {"head_dim": head_dim, "causal": causal, "out_rms": truth.pow(2).mean().sqrt().item()}
    rows = []

    def add(name: str, granularity: str | None, incoherent: bool | None, out: torch.Tensor,
            inputs_only: torch.Tensor | None = None, kernel: torch.Tensor | None = None) -> None:
        err = rmse(out, truth)
        rows.append({**case, "format": name, "granularity": granularity, "incoherent": incoherent, "rmse": err,
                     "rel_rmse": err / case["out_rms"],
                     "rmse_inputs": None if inputs_only is None else rmse(inputs_only, truth),
                     "rmse_kernel": None if kernel is None else rmse(kernel.cpu(), truth)})

    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        add(name, None, None, reference_fwd(q.to(dtype), k.to(dtype), v.to(dtype), **opts)[0])
    p_only, _ = attention_p_fp8(q.double(), k.double(), v.double(), **opts, block_n=args.block_n)
    add("fp8 P only", None, None, p_only.to(torch.bfloat16))
    for granularity in GRANULARITIES:
        for incoherent in (False, True):
            fp8 = quantize_qkv(q, k, v, granularity=granularity, incoherent=incoherent, seed=args.seed)
            inputs = (fp8.q, fp8.k, fp8.v, fp8.q_descale, fp8.k_descale, fp8.v_descale)
            out, _ = fp8_reference_fwd(*inputs, **opts, block_n=args.block_n)
            exact_p, _ = fp8_reference_fwd(*inputs, **opts, quantize_p=False)
            kernel = None
            if args.kernel:
                on_gpu = [t.cuda() for t in inputs]
                kernel = flash_fwd(*on_gpu[:3], **opts, q_descale=on_gpu[3], k_descale=on_gpu[4], v_descale=on_gpu[5])[0]
            add("fp8", granularity, incoherent, out.to(torch.bfloat16), exact_p.to(torch.bfloat16), kernel)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--outlier-prob", type=float, default=0.001)
    parser.add_argument("--outlier-std", type=float, default=10.0, help="std of the added outlier term (N(0,100))")
    parser.add_argument("--block-n", type=int, default=128, help="key block of the emulated running max")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out-dir", default=None, help="write <stem>.json and <stem>.md here")
    parser.add_argument("--stem", default="fp8-accuracy-cpu")
    parser.add_argument("--kernel", action="store_true", help="also run our FP8 forward on the GPU (rmse_kernel)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    rows = [row for head_dim in args.head_dims for causal in (False, True) for row in measure(head_dim, causal, args)]
    header = ["D", "causal", "format", "scales", "incoherent", "RMSE", "RMSE / RMS(out)", "RMSE, P exact",
              *(["RMSE, our kernel"] if args.kernel else [])]
    table = markdown_table(header, [[r["head_dim"], r["causal"], r["format"], r["granularity"], r["incoherent"],
                                     r["rmse"], r["rel_rmse"], r["rmse_inputs"], *([r["rmse_kernel"]] if args.kernel else [])]
                                    for r in rows])
    rms_out = ", ".join(f"D={r['head_dim']} {'causal' if r['causal'] else 'full'} {r['out_rms']:.3g}"
                        for r in rows if r["format"] == "bf16")
    meta = run_meta(1, command=shlex.join(["python", "tools/fp8_accuracy.py", *sys.argv[1:]]), kind=("CPU emulation of the FP8 forward's quantization (kernels/fp8.py), and our FP8 kernel on the same "
                          "inputs (rmse_kernel)" if args.kernel else "CPU emulation of the FP8 forward's quantization "
                          "(kernels/fp8.py), not a kernel run"),
                    shape={"batch": args.batch, "seq": args.seq, "heads": args.heads, "kv_heads": args.kv_heads},
                    distribution=f"N(0,1) + N(0,{args.outlier_std ** 2:g}) * Bernoulli({args.outlier_prob:g}) per "
                                 f"entry, float64 rounded to bf16; truth: float64 attention of the bf16 inputs",
                    emulation=f"e4m3fn q/k/v with fp32 descales; P = {P_SCALE:g} exp(S - m_j) rounded to e4m3 "
                              f"(m_j running max over key blocks of {args.block_n}); row sum unrounded; float64 "
                              f"math; out rounded to bf16",
                    paper_h100=PAPER, seconds=round(time.time() - start, 1))
    notes = (f"{meta['kind']}. Distribution: {meta['distribution']}. Emulation: {meta['emulation']}. "
             f"B={args.batch}, S={args.seq}, H={args.heads}, H_kv={args.kv_heads}, softmax scale 1/sqrt(D). "
             f"RMS of the true output: {rms_out}. The FA3 paper (H100 kernels) reports RMSE "
             f"{PAPER['fp16']:.1e} (FP16), {PAPER['fp8 tensor']:.1e} (FP8 per-tensor) and "
             f"{PAPER['fp8 block+incoherent']:.1e} (FP8, block quantization + incoherent processing).")
    print(table)
    print(f"\n{notes}\n{meta['seconds']} s")
    if args.out_dir:
        write_results(args.out_dir, args.stem, meta, rows, table + "\n\n" + notes)


if __name__ == "__main__":
    main()
