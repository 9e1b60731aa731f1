"""The LSE merge: exact combination of blocks, and rows that have seen no key."""

from __future__ import annotations

import torch

from fa3dist.kernels.numerics import relative_error
from fa3dist.kernels.reference import reference_fwd
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

