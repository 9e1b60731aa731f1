"""The LSE merge: exact combination of blocks, rows that have seen no key, and the one-pass Triton merge
(in the interpreter on CPU: tests/conftest.py sets TRITON_INTERPRET=1 first)."""

from __future__ import annotations

import pytest
import torch

from fa3dist.kernels.numerics import relative_error
from fa3dist.kernels.reference import reference_fwd
from fa3dist.ring import merge_block_
from fa3dist.ring.merge import merge_block_torch_


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



def _merge_inputs(seed: int, block_dtype: torch.dtype):
    """Running (out, lse) over 12 rows and a block for rows 3..10, with empty rows on either side and on both."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.randn(2, 12, 3, 40, generator=gen)
    lse = torch.randn(2, 3, 12, generator=gen) * 4
    out_b = torch.randn(2, 8, 3, 40, generator=gen).to(block_dtype)
    lse_b = torch.randn(2, 3, 8, generator=gen) * 4
    lse[:, 0, 3:5] = float("-inf")  # rows nothing has reached yet ...
    out[:, 3:5, 0] = 0.0
    lse_b[:, 0, 0] = float("-inf")  # ... one of which the block leaves empty too
    lse_b[:, 1, 2:4] = float("-inf")  # block rows without a key
    return out, lse, out_b, lse_b


@pytest.mark.parametrize("block_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("into_dtype", [None, torch.bfloat16, torch.float32])
def test_triton_merge_matches_pytorch_merge(block_dtype, into_dtype):
    """The one-pass Triton merge (interpreted on CPU) on row-slice views, with and without ``into``."""
    from fa3dist.ring.merge_triton import merge_block_triton_

    results = []
    for merge in (merge_block_torch_, merge_block_triton_):
        out, lse, out_b, lse_b = _merge_inputs(0, block_dtype)
        into = None if into_dtype is None else torch.full(out.shape, 7.0, dtype=into_dtype)
        rows = slice(3, 11)
        merge(out[:, rows], lse[:, :, rows], out_b, lse_b, into=None if into is None else into[:, rows])
        results.append((out if into is None else into, lse))
    (ref_out, ref_lse), (tri_out, tri_lse) = results
    assert not torch.isnan(tri_out).any() and not torch.isnan(tri_lse).any()
    assert torch.equal(torch.isneginf(tri_lse), torch.isneginf(ref_lse))
    assert torch.isneginf(tri_lse[:, 0, 3]).all() and torch.equal(tri_out[:, 3, 0], torch.zeros_like(tri_out[:, 3, 0]))
    finite = torch.isfinite(ref_lse)
    assert relative_error(tri_lse[finite], ref_lse[finite]) < 1e-6
    assert relative_error(tri_out.float(), ref_out.float()) < (1e-6 if tri_out.dtype == torch.float32 else 1e-2)
    untouched = tri_out[:, [0, 1, 2, 11]]  # rows outside the view keep what they held
    assert torch.equal(untouched, ref_out[:, [0, 1, 2, 11]])
