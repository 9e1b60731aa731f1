"""Fused LSE merge of an attention block into a running (out, lse), one pass over memory.

The PyTorch form (``fa3dist.ring.merge``) makes several passes and temporaries over the fp32
output; this kernel reads out, the block's out and both LSEs once and writes out and lse once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _merge_kernel(out_ptr, lse_ptr, blk_ptr, blk_lse_ptr, n_rows, seq, heads, head_dim,
                  so_b, so_s, so_h, sl_b, sl_h, sl_s, sb_b, sb_s, sb_h, sbl_b, sbl_h, sbl_s,
                  BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # flattened (b, s, h)
    valid = rows < n_rows
    h = rows % heads
    s = (rows // heads) % seq
    b = rows // (heads * seq)
    lse = tl.load(lse_ptr + b * sl_b + h * sl_h + s * sl_s, mask=valid, other=float("-inf"))
    lse_b = tl.load(blk_lse_ptr + b * sbl_b + h * sbl_h + s * sbl_s, mask=valid, other=float("-inf")).to(lse.dtype)
    top = tl.maximum(lse, lse_b)
    empty = top == float("-inf")  # neither has seen a key: stay empty, never NaN
    top = tl.where(empty, 0.0, top)
    new = top + tl.log(tl.exp(lse - top) + tl.exp(lse_b - top))
    weight = tl.where(empty, 0.0, tl.exp(lse_b - new))  # = sigmoid(lse_b - lse)
    tl.store(lse_ptr + b * sl_b + h * sl_h + s * sl_s, tl.where(empty, float("-inf"), new), mask=valid)
    cols = tl.arange(0, BLOCK_D)
    mask = valid[:, None] & (cols[None, :] < head_dim)
    o_ptrs = out_ptr + (b * so_b + s * so_s + h * so_h)[:, None] + cols[None, :]
    o = tl.load(o_ptrs, mask=mask, other=0.0)
    blk = tl.load(blk_ptr + (b * sb_b + s * sb_s + h * sb_h)[:, None] + cols[None, :], mask=mask, other=0.0)
    tl.store(o_ptrs, o + weight[:, None] * (blk.to(o.dtype) - o), mask=mask)


def merge_block_fused_(out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> None:
    """In-place merge like ``fa3dist.ring.merge_block_`` in one Triton kernel.

    out, out_b: (B, S, H, D) with unit stride in D; lse, lse_b: (B, H, S).
    """
    batch, seq, heads, head_dim = out.shape
    if out.stride(-1) != 1 or out_b.stride(-1) != 1:
        raise ValueError("merge_block_fused_ needs out and out_b with unit stride in the head dim")
    n_rows = batch * seq * heads
    block_d = triton.next_power_of_2(head_dim)
    block_r = max(1, 4096 // block_d)
    _merge_kernel[(triton.cdiv(n_rows, block_r),)](
        out, lse, out_b, lse_b, n_rows, seq, heads, head_dim,
        out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1), lse.stride(2),
        out_b.stride(0), out_b.stride(1), out_b.stride(2), lse_b.stride(0), lse_b.stride(1), lse_b.stride(2),
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)
