"""The FP8 quantization of ``fp8.quantize_qkv`` as two Triton kernels, for GPU tensors.

The PyTorch path materializes the rotated tensor in float32 and makes five more passes over it
(abs, amax, divide, clamp, cast): about 50 bytes of traffic per element. Here the Hadamard rotation
is a ``tl.dot`` with the +-1 matrix diag(s) H inside both kernels, so nothing rotated is stored:

- ``_amax_kernel``: each program rotates a [BLOCK_S, D] tile of one (batch, head) and folds its
  max |x R| into the group's amax (one float per tensor or per (batch, head)) with an atomic max;
- ``_quantize_kernel``: the same tile rotated again, divided by its group's descale (amax / 448, 1
  for an all-zero group), clamped to +-448 and rounded to e4m3.

Between the two the caller may replace the amaxes (the ring's ``share_amax``). The math is that of
the PyTorch path: x R = (x diag(s) H) / sqrt(D) with exact +-1 products and fp32 sums (in another
order, so a value on a rounding boundary may land one e4m3 step away). Reads x twice and writes one
byte per element.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .common import check_device

_BLOCK_S = 64


@triton.jit
def _rotated_tile(x_ptr, r_ptr, batch, head, seq, heads, s_xb, s_xs, s_xh, inv_sqrt_d, pid_s,
                  BLOCK_S: tl.constexpr, DIM: tl.constexpr, ROTATE: tl.constexpr, IEEE: tl.constexpr):
    """A [BLOCK_S, DIM] tile of x[batch, :, head, :] as float32, rotated when ROTATE; and its row mask."""
    rows = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    cols = tl.arange(0, DIM)
    keep = rows[:, None] < seq
    x = tl.load(x_ptr + batch.to(tl.int64) * s_xb + rows[:, None].to(tl.int64) * s_xs + head * s_xh + cols[None, :],
                mask=keep, other=0.0)
    if ROTATE:
        signs_h = tl.load(r_ptr + tl.arange(0, DIM)[:, None] * DIM + cols[None, :])
        if IEEE:
            y = tl.dot(x, signs_h, input_precision="ieee") * inv_sqrt_d
        else:
            y = tl.dot(x, signs_h) * inv_sqrt_d  # 16-bit x and +-1: exact products, fp32 sums
    else:
        y = x.to(tl.float32)
    return y, rows, keep


@triton.jit
def _amax_kernel(x_ptr, r_ptr, amax_ptr, seq, heads, s_xb, s_xs, s_xh, inv_sqrt_d, BLOCK_S: tl.constexpr,
                 DIM: tl.constexpr, ROTATE: tl.constexpr, IEEE: tl.constexpr, PER_HEAD: tl.constexpr):
    pid_s = tl.program_id(0)
    bh = tl.program_id(1)
    batch, head = bh // heads, bh % heads
    y, _, _ = _rotated_tile(x_ptr, r_ptr, batch, head, seq, heads, s_xb, s_xs, s_xh, inv_sqrt_d, pid_s, BLOCK_S, DIM,
                            ROTATE, IEEE)
    group = bh if PER_HEAD else 0
    tl.atomic_max(amax_ptr + group, tl.max(tl.max(tl.abs(y), 1), 0))


@triton.jit
def _quantize_kernel(x_ptr, r_ptr, amax_ptr, out_ptr, seq, heads, s_xb, s_xs, s_xh, inv_sqrt_d,
                     BLOCK_S: tl.constexpr, DIM: tl.constexpr, ROTATE: tl.constexpr, IEEE: tl.constexpr,
                     PER_HEAD: tl.constexpr):
    pid_s = tl.program_id(0)
    bh = tl.program_id(1)
    batch, head = bh // heads, bh % heads
    y, rows, keep = _rotated_tile(x_ptr, r_ptr, batch, head, seq, heads, s_xb, s_xs, s_xh, inv_sqrt_d, pid_s,
                                  BLOCK_S, DIM, ROTATE, IEEE)
    amax = tl.load(amax_ptr + (bh if PER_HEAD else 0))
    descale = tl.where(amax > 0, tl.maximum(amax / 448.0, 1.1754943508222875e-38), 1.0)
    q = tl.minimum(tl.maximum(y / descale, -448.0), 448.0).to(tl.float8e4nv)
    cols = tl.arange(0, DIM)
    # out is (B, S, H, D) contiguous
    offs = ((batch.to(tl.int64) * seq + rows[:, None].to(tl.int64)) * heads + head) * DIM + cols[None, :]
    tl.store(out_ptr + offs, q, mask=keep)


def _launch_args(x: torch.Tensor, signs_h: torch.Tensor | None):
    batch, seq, heads, dim = x.shape
    if x.stride(-1) != 1:
        raise ValueError(f"x must have a unit last stride, got strides {x.stride()}")
    rotation = (signs_h.to(x.dtype) if signs_h is not None
                else torch.empty(1, dtype=x.dtype, device=x.device))  # not read
    grid = (triton.cdiv(seq, _BLOCK_S), batch * heads)
    scalars = (seq, heads, x.stride(0), x.stride(1), x.stride(2), 1.0 / math.sqrt(dim))
    meta = dict(BLOCK_S=_BLOCK_S, DIM=dim, ROTATE=signs_h is not None, IEEE=x.dtype == torch.float32)
    return grid, (x, rotation), scalars, meta


def amax(x: torch.Tensor, granularity: str, signs_h: torch.Tensor | None) -> torch.Tensor:
    """max |x R| per tensor, shape (1,), or per (batch, head), shape (B, H): float32. R = diag(s) H / sqrt(D)
    with ``signs_h`` = diag(s) H (``fp8.signs_times_hadamard``), no rotation when None. x is (B, S, H, D),
    float16/bfloat16/float32, D a power of two in [16, 256]."""
    check_device(x, "fp8 quantization")
    batch, _, heads, _ = x.shape
    out = torch.zeros(batch * heads if granularity == "head" else 1, dtype=torch.float32, device=x.device)
    grid, tensors, scalars, meta = _launch_args(x, signs_h)
    if x.numel():
        _amax_kernel[grid](*tensors, out, *scalars, **meta, PER_HEAD=granularity == "head")
    return out.view(batch, heads) if granularity == "head" else out


def quantize(x: torch.Tensor, group_amax: torch.Tensor,
             signs_h: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 x R, descale) with the descales of ``group_amax`` ((1,) or (B, H), from ``amax``)."""
    check_device(x, "fp8 quantization")
    out = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    grid, tensors, scalars, meta = _launch_args(x, signs_h)
    if x.numel():
        _quantize_kernel[grid](*tensors, group_amax.contiguous(), out, *scalars, **meta,
                               PER_HEAD=group_amax.dim() == 2)
    tiny = torch.finfo(torch.float32).tiny
    descale = torch.where(group_amax > 0, (group_amax / 448.0).clamp_min(tiny), torch.ones_like(group_amax))
    return out, descale
