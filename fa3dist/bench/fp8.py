"""The FP8 pieces of ``fa3dist bench kernel``: the cuBLAS FP8 GEMM ceiling, the inputs of an FP8 cell,
PyTorch's own FP8 attention (where it runs), and the accuracy of an output on a sample of query rows.

- ``fp8_gemm_tflops``: TFLOP/s of cuBLAS's e4m3 GEMM (``torch._scaled_mm``, bf16 out) at 8192^3, the
  FP8 forward's ceiling (``tools/gluon_sweep.py --fp8-ceiling`` times the same function).
- ``quantize_inputs``: what an FP8 cell feeds our kernel: bf16 q, k, v quantized per tensor with
  incoherent processing (``fp8.quantize_qkv``) and V made K-major once (``fp8.kmajor_v``).
- ``PYTORCH_FP8`` / ``probe_pytorch_fp8``: PyTorch's FP8 attention entry points, tried once per run.
- ``sampled_reference`` / ``rmse_against``: float64 attention of the last ``RMSE_ROWS`` query rows of
  every (batch, head) against all keys, and the RMSE of an output there; cheap at any cell size.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fa3dist.kernels import fp8

FP8_GEMM_OP = "torch._scaled_mm e4m3 8192^3 bf16 out"
# rel_err_vs_cudnn above which an fp8 row is an error. bf16 rows keep 5e-2; e4m3 inputs and P put an
# FP8 forward near 5e-2 of cuDNN's bf16 out on N(0, 1) inputs (gluon-sweep-h200-2026-12-02-fp8-v1.json).
FP8_TOLERANCE = 0.15
RMSE_ROWS = 128  # query rows per (batch, head) in the accuracy sample


def fp8_gemm_tflops(n: int = 8192, *, warmup_ms: float = 25.0, rep_ms: float = 100.0,
                    device: torch.device | str = "cuda") -> float:
    """TFLOP/s of cuBLAS's e4m3 GEMM (torch._scaled_mm, bf16 out) at n^3: the FP8 forward's ceiling."""
    from .common import time_ms

    a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn).t()  # column-major, as cuBLAS wants it
    one = torch.ones((), device=device)
    ms = time_ms(lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
                 warmup_ms=warmup_ms, rep_ms=rep_ms)
    return 2 * n ** 3 / ms / 1e9


def fp8_gemm_ceiling(*, warmup_ms: float, rep_ms: float, device: torch.device | str = "cuda") -> dict:
    """The meta entry: {"op", "tflops"}, with "tflops" None and an "error" when the GEMM fails."""
    try:
        return {"op": FP8_GEMM_OP, "tflops": fp8_gemm_tflops(warmup_ms=warmup_ms, rep_ms=rep_ms, device=device)}
    except Exception as err:  # the ceiling is context, not a result: say why it is missing
        return {"op": FP8_GEMM_OP, "tflops": None, "error": error_text(err)}


def error_text(err: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line, at most ``limit`` characters."""
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


# --- the inputs of an FP8 cell --------------------------------------------------------------------------

def quantize_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[fp8.FP8QKV, torch.Tensor]:
    """(q, k, v quantized per tensor with incoherent processing, V K-major): our FP8 forward's inputs."""
    x = fp8.quantize_qkv(q, k, v, granularity="tensor", incoherent=True)
    return x, fp8.kmajor_v(x.v)


# --- PyTorch's FP8 attention ------------------------------------------------------------------------------

Forward = tuple[Callable[[], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]


def _bhsd(x: fp8.FP8QKV) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(t.transpose(1, 2).contiguous() for t in (x.q, x.k, x.v))


def _sdpa_fp8(x: fp8.FP8QKV, softmax_scale: float, causal: bool) -> Forward:
    """``F.scaled_dot_product_attention`` on the e4m3 tensors. It takes no descales: the q and k
    descales go into its scale, and the v descale multiplies its output (outside the timed call)."""
    if x.granularity != "tensor":
        raise ValueError("sdpa-fp8 folds per-tensor descales into its scale; got per-head ones")
    q, k, v = _bhsd(x)
    scale = softmax_scale * x.q_descale.item() * x.k_descale.item()
    v_descale = x.v_descale.item()
    gqa = k.shape[1] != q.shape[1]

    def forward() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)

    return forward, lambda out: out.float().transpose(1, 2) * v_descale


def _sdpa_fp8_quantized(x: fp8.FP8QKV, softmax_scale: float, causal: bool) -> Forward:
    """torch.nn.attention.experimental's FP8 SDPA with (B, H_kv) descales (it needs PyTorch's FA3
    backend activated; the bench does not activate it, since that would change the flash2 peer)."""
    from torch.nn.attention.experimental._scaled_dot_product_attention_quantized import (
        _scaled_dot_product_attention_quantized as sdpa_quantized)

    q, k, v = _bhsd(x)
    per_head = (k.shape[0], k.shape[1])  # all three descales are (B, H_kv) there, q's too
    qd, kd, vd = (d.expand(per_head).contiguous() if d.numel() == 1 else d
                  for d in (x.q_descale, x.k_descale, x.v_descale))

    def forward() -> torch.Tensor:
        return sdpa_quantized(q, k, v, is_causal=causal, scale=softmax_scale, q_descale=qd, k_descale=kd,
                              v_descale=vd)

    return forward, lambda out: out.float().transpose(1, 2)


# impl -> (meta key, what was called, builder(fp8 inputs, softmax_scale, causal) -> (forward, to (B, S, H, D)))
PYTORCH_FP8: dict[str, tuple[str, str, Callable[[fp8.FP8QKV, float, bool], Forward]]] = {
    "sdpa-fp8": ("pytorch_fp8_attention", "F.scaled_dot_product_attention", _sdpa_fp8),
    "sdpa-fp8-quantized": ("pytorch_fp8_attention_quantized",
                           "torch.nn.attention.experimental._scaled_dot_product_attention_quantized",
                           _sdpa_fp8_quantized),
}


def probe_pytorch_fp8(device: torch.device | str) -> dict[str, str]:
    """For every ``PYTORCH_FP8`` entry: "ran" when it ran on float8_e4m3fn (B, H, S, D) inputs here
    (1 x 2 heads x 128 x 64, causal), else its error (truncated)."""
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, 128, 2, 64, device=device, dtype=torch.bfloat16, generator=gen) for _ in range(3))
    x = fp8.quantize_qkv(q, k, v, granularity="tensor")
    found = {}
    for impl, (_, _, build) in PYTORCH_FP8.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                forward, to_bshd = build(x, 0.125, True)
                to_bshd(forward())
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            found[impl] = "ran"
        except Exception as err:
            found[impl] = error_text(err)
    return found


# --- accuracy on sampled query rows --------------------------------------------------------------------------

def sampled_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, softmax_scale: float, causal: bool,
                      rows: int = RMSE_ROWS) -> torch.Tensor:
    """float64 attention out of the last ``rows`` query rows: (B, r, H, D), r = min(rows, Sq).

    q is (B, Sq, H, D), k and v (B, Sk, H_kv, D) (GQA: query head h reads key head h // (H / H_kv)).
    The causal mask is the top-left one of the kernels: query position i sees keys 0..i; the sampled
    rows sit at positions Sq - r .. Sq - 1 of the full problem. The scores take B r H Sk float64s.
    """
    batch, seq_q, heads, dim = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    r = min(rows, seq_q)
    qs = q[:, seq_q - r:].to(torch.float64).reshape(batch, r, kv_heads, heads // kv_heads, dim)
    scores = torch.einsum("bqhgd,bkhd->bhgqk", qs, k.to(torch.float64)) * softmax_scale
    if causal:
        positions = torch.arange(seq_q - r, seq_q, device=q.device)
        hidden = torch.arange(seq_k, device=q.device)[None, :] > positions[:, None]
        scores = scores.masked_fill(hidden, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhgqk,bkhd->bqhgd", p, v.to(torch.float64))
    return out.reshape(batch, r, heads, dim)


def rmse_against(out: torch.Tensor, truth: torch.Tensor) -> float:
    """sqrt(mean((out - truth)^2)) over the rows of ``truth`` ((B, r, H, D), the last r of ``out``'s),
    in float64; inf when ``out`` has a NaN or inf there."""
    sample = out[:, out.shape[1] - truth.shape[1]:].detach().to(torch.float64)
    if not torch.isfinite(sample).all():
        return float("inf")
    return math.sqrt(torch.mean((sample - truth) ** 2).item())


def sampled_rmse(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, softmax_scale: float,
                 causal: bool, rows: int = RMSE_ROWS) -> float:
    """The RMSE of ``out`` (B, Sq, H, D) against float64 attention of q, k, v on the last ``rows`` rows."""
    return rmse_against(out, sampled_reference(q, k, v, softmax_scale=softmax_scale, causal=causal, rows=rows))
