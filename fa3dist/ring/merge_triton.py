"""``merge_block_`` as one Triton pass: read out (fp32), out_b (its own dtype) and both LSEs once,
write the merged out and lse once.

One program takes BLOCK_S rows of one (batch, head) and the whole head dim. Every tensor is
addressed through its strides, so row-slice views of out, lse and the destination work; the head
dim must be contiguous (stride 1). Under ``TRITON_INTERPRET=1`` (set before this module is
imported) it runs on CPU tensors, which is how the CPU tests check it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .merge import merge_block_torch_

_BLOCK_ELEMENTS = 4096  # BLOCK_S * BLOCK_D per program


@triton.jit
def _merge_kernel(out_ptr, lse_ptr, blk_ptr, blk_lse_ptr, dst_ptr, seq, heads, head_dim,
                  o_sb, o_ss, o_sh, b_sb, b_ss, b_sh, d_sb, d_ss, d_sh,
                  l_sb, l_sh, l_ss, m_sb, m_sh, m_ss,
                  BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets: a shard of 1M+ tokens passes 2**31 elements
    batch = bh // heads
    head = bh % heads
    rows = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < seq
    lse_at = lse_ptr + batch * l_sb + head * l_sh + rows * l_ss
    lse_a = tl.load(lse_at, mask=row_ok, other=float("-inf"))
    lse_b = tl.load(blk_lse_ptr + batch * m_sb + head * m_sh + rows * m_ss, mask=row_ok, other=float("-inf"))
    # the block's weight sigmoid(lse_b - lse_a), 0 for an empty block row; no -inf - -inf anywhere
    block_empty = lse_b == float("-inf")
    weight = tl.where(block_empty, 0.0, 1.0 / (1.0 + tl.exp(lse_a - tl.where(block_empty, 0.0, lse_b))))
    hi = tl.maximum(lse_a, lse_b)
    both_empty = hi == float("-inf")
    hi_finite = tl.where(both_empty, 0.0, hi)
    merged_lse = tl.where(both_empty, float("-inf"), hi + tl.log(1.0 + tl.exp(tl.minimum(lse_a, lse_b) - hi_finite)))
    mask = row_ok[:, None] & (cols[None, :] < head_dim)
    o = tl.load(out_ptr + batch * o_sb + head * o_sh + rows[:, None] * o_ss + cols[None, :], mask=mask, other=0.0)
    ob = tl.load(blk_ptr + batch * b_sb + head * b_sh + rows[:, None] * b_ss + cols[None, :], mask=mask, other=0.0)
    o = o.to(tl.float32)
    merged = o + weight[:, None] * (ob.to(tl.float32) - o)
    dst = dst_ptr + batch * d_sb + head * d_sh + rows[:, None] * d_ss + cols[None, :]
    tl.store(dst, merged.to(dst_ptr.dtype.element_ty), mask=mask)
    tl.store(lse_at, merged_lse, mask=row_ok)


def merge_block_triton_(out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor, *,
                        into: torch.Tensor | None = None) -> None:
    """``merge_block_`` in one Triton pass; out and lse float32. Falls back to the PyTorch passes
    when a head dim is not contiguous."""
    dst = out if into is None else into
    for name, t in (("out", out), ("out_b", out_b), ("into", dst)):
        if t.shape != out.shape:
            raise ValueError(f"{name} must have out's shape {tuple(out.shape)}, got {tuple(t.shape)}")
    batch, seq, heads, head_dim = out.shape
    if lse.shape != (batch, heads, seq) or lse_b.shape != lse.shape:
        raise ValueError(f"lse and lse_b must have shape {(batch, heads, seq)}, got {tuple(lse.shape)} "
                         f"and {tuple(lse_b.shape)}")
    if out.dtype != torch.float32 or lse.dtype != torch.float32:
        raise TypeError(f"out and lse must be float32, got {out.dtype} and {lse.dtype}")
    if any(t.stride(-1) != 1 for t in (out, out_b, dst)):
        merge_block_torch_(out, lse, out_b, lse_b, into=into)
        return
    if out.numel() == 0:
        return
    block_d = triton.next_power_of_2(head_dim)
    block_s = max(1, min(triton.next_power_of_2(seq), _BLOCK_ELEMENTS // block_d))
    grid = (triton.cdiv(seq, block_s), batch * heads)
    _merge_kernel[grid](out, lse, out_b, lse_b, dst, seq, heads, head_dim,
                        out.stride(0), out.stride(1), out.stride(2), out_b.stride(0), out_b.stride(1),
                        out_b.stride(2), dst.stride(0), dst.stride(1), dst.stride(2),
                        lse.stride(0), lse.stride(1), lse.stride(2), lse_b.stride(0), lse_b.stride(1),
                        lse_b.stride(2), BLOCK_S=block_s, BLOCK_D=block_d, num_warps=4)
