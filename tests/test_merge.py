"""The LSE merge: exact combination of blocks, and rows that have seen no key."""

from __future__ import annotations

import pytest
import torch

from fa3dist.kernels.numerics import relative_error
from fa3dist.kernels.reference import reference_fwd
from fa3dist.kernels.merge import merge_block_fused_
from fa3dist.ring import merge_block_


def test_merging_key_blocks_gives_full_attention():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 10, 4, 16, dtype=torch.float64, generator=gen)
    k, v = (torch.randn(2, 30, 2, 16, dtype=torch.float64, generator=gen) for _ in range(2))
    ref_out, ref_lse = reference_fwd(q, k, v, softmax_scale=0.25, causal=False)
    out = torch.zeros_like(q)
    lse = torch.full(ref_lse.shape, float("-inf"), dtype=torch.float64)
    for block in (slice(0, 7), slice(7, 19), slice(19, 30)):
        merge_block_(out, lse, *reference_fwd(q, k[:, block], v[:, block], softmax_scale=0.25, causal=False))
    assert relative_error(out, ref_out) < 1e-14
    assert relative_error(lse, ref_lse) < 1e-14


def test_rows_without_keys_stay_empty_and_never_nan():
    out = torch.zeros(1, 3, 2, 4)
    lse = torch.full((1, 2, 3), float("-inf"))
    empty_out, empty_lse = torch.zeros(1, 3, 2, 4), torch.full((1, 2, 3), float("-inf"))
    merge_block_(out, lse, empty_out, empty_lse)  # empty into empty
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()

    block_out = torch.randn(1, 3, 2, 4)
    block_lse = torch.tensor([[[0.5, float("-inf"), 2.0], [1.0, -3.0, float("-inf")]]])
    merge_block_(out, lse, block_out, block_lse)  # a block with some empty rows
    seen = torch.isfinite(block_lse).transpose(1, 2)  # (B, S, H)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(out[seen], block_out[seen])
    assert torch.equal(out[~seen], torch.zeros_like(out[~seen]))
    assert torch.equal(lse, block_lse)

    before = out.clone()
    merge_block_(out, lse, torch.randn(1, 3, 2, 4), torch.full((1, 2, 3), float("-inf")))  # empty into full
    assert torch.equal(out, before) and torch.equal(lse, block_lse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("head_dim", [40, 64])
def test_fused_merge_matches_pytorch_merge(dtype, head_dim):
    """The Triton merge (interpreter on CPU) against the PyTorch merge, on strided row slices,
    blocks in bf16 with the layout SDPA returns, and rows that have seen no key."""
    gen = torch.Generator().manual_seed(head_dim)
    out = torch.randn(2, 12, 3, head_dim, dtype=dtype, generator=gen)
    lse = torch.randn(2, 3, 12, dtype=dtype, generator=gen)
    lse[0, 1, :4] = float("-inf")
    out_b = torch.randn(2, 3, 6, head_dim, generator=gen).to(torch.bfloat16).transpose(1, 2)  # (B, S, H, D) view
    lse_b = torch.randn(2, 3, 6, generator=gen)
    lse_b[0, 1, :2] = float("-inf")  # with lse = -inf above: rows that stay empty
    lse_b[1, 0, 3] = float("-inf")
    rows = slice(0, 6)  # the first half of the local rows, as a strided view
    want_out, want_lse = out.clone(), lse.clone()
    merge_block_(want_out[:, rows], want_lse[:, :, rows], out_b, lse_b)
    merge_block_fused_(out[:, rows], lse[:, :, rows], out_b, lse_b)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.allclose(out, want_out, rtol=1e-6, atol=1e-6)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse))
    finite = torch.isfinite(want_lse)
    assert torch.allclose(lse[finite], want_lse[finite], rtol=1e-6, atol=1e-6)
