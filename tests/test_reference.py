"""The float64 oracle itself, checked against autograd on plain softmax attention."""

from __future__ import annotations

import pytest
import torch

from fa3dist.kernels.numerics import relative_error
from fa3dist.kernels.reference import reference_bwd, reference_fwd


def naive_attention(q, k, v, scale, causal):
    """Plain math with K/V repeated to every query head: (B, S, H, D) in and out."""
    group = q.shape[2] // k.shape[2]
    k, v = (t.repeat_interleave(group, dim=2) for t in (k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v), torch.logsumexp(scores, -1)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_reference_matches_autograd(causal, heads, kv_heads):
    gen = torch.Generator().manual_seed(heads * 10 + kv_heads + causal)
    q = torch.randn(2, 23, heads, 24, dtype=torch.float64, generator=gen, requires_grad=True)
    k = torch.randn(2, 23, kv_heads, 24, dtype=torch.float64, generator=gen, requires_grad=True)
    v = torch.randn(2, 23, kv_heads, 24, dtype=torch.float64, generator=gen, requires_grad=True)
    do = torch.randn(2, 23, heads, 24, dtype=torch.float64, generator=gen)
    out, lse = naive_attention(q, k, v, 0.3, causal)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref_out, ref_lse = reference_fwd(q.detach(), k.detach(), v.detach(), softmax_scale=0.3, causal=causal)
    ref_grads = reference_bwd(do, q.detach(), k.detach(), v.detach(), ref_out, ref_lse, softmax_scale=0.3,
                              causal=causal)
    assert relative_error(ref_out, out) < 1e-13
    assert relative_error(ref_lse, lse) < 1e-13
    for mine, theirs in zip(ref_grads, grads):
        assert relative_error(mine, theirs) < 1e-12


def test_reference_backward_with_external_lse_splits_keys():
    """With the full out/lse given, each key half's dk/dv is the full one's slice and dq adds up."""
    gen = torch.Generator().manual_seed(3)
    q, do = (torch.randn(1, 16, 4, 8, dtype=torch.float64, generator=gen) for _ in range(2))
    k, v = (torch.randn(1, 20, 2, 8, dtype=torch.float64, generator=gen) for _ in range(2))
    out, lse = reference_fwd(q, k, v, softmax_scale=0.5, causal=False)
    dq, dk, dv = reference_bwd(do, q, k, v, out, lse, softmax_scale=0.5, causal=False)
    halves = [reference_bwd(do, q, k[:, s], v[:, s], out, lse, softmax_scale=0.5, causal=False)
              for s in (slice(0, 12), slice(12, None))]
    assert relative_error(halves[0][0] + halves[1][0], dq) < 1e-13
    assert relative_error(torch.cat([halves[0][1], halves[1][1]], 1), dk) < 1e-13
    assert relative_error(torch.cat([halves[0][2], halves[1][2]], 1), dv) < 1e-13


def test_reference_keeps_dtypes():
    q = torch.randn(1, 8, 2, 8, dtype=torch.bfloat16)
    out, lse = reference_fwd(q, q, q, softmax_scale=0.3, causal=True)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    out64, lse64 = reference_fwd(q.double(), q.double(), q.double(), softmax_scale=0.3, causal=True)
    assert lse64.dtype == torch.float64


def test_backward_into_buffers_adds_or_writes_only_what_is_asked():
    """``dq=``/``dk=``/``dv=`` buffers (float32 row-slice views here) get the gradients added
    (``accumulate=True``) or written; a gradient without a buffer is not computed."""
    gen = torch.Generator().manual_seed(5)
    q, do = (torch.randn(1, 6, 4, 8, generator=gen) for _ in range(2))
    k, v = (torch.randn(1, 10, 2, 8, generator=gen) for _ in range(2))
    out, lse = reference_fwd(q, k, v, softmax_scale=0.3, causal=False)
    want = reference_bwd(do, q, k, v, out, lse, softmax_scale=0.3, causal=False)
    dq_full, dk_full, dv_full = torch.ones(1, 9, 4, 8), torch.ones(1, 12, 2, 8), torch.ones(1, 12, 2, 8)
    dq, dk, dv = dq_full[:, 2:8], dk_full[:, 1:11], dv_full[:, 1:11]
    got = reference_bwd(do, q, k, v, out, lse, softmax_scale=0.3, causal=False, dk=dk, dv=dv, accumulate=True)
    assert got[0] is None and got[1] is dk and got[2] is dv
    assert torch.equal(dq_full, torch.ones_like(dq_full))  # not asked for: untouched
    assert torch.allclose(dk, want[1] + 1) and torch.allclose(dv, want[2] + 1)
    assert torch.equal(dk_full[:, [0, 11]], torch.ones(1, 2, 2, 8))  # rows outside the view untouched
    got = reference_bwd(do, q, k, v, out, lse, softmax_scale=0.3, causal=False, dq=dq, accumulate=False)
    assert got[1] is None and got[2] is None and torch.allclose(dq, want[0])
    with pytest.raises(ValueError, match="dk and dv must be given together"):
        reference_bwd(do, q, k, v, out, lse, softmax_scale=0.3, causal=False, dk=dk)
    with pytest.raises(TypeError, match="dq must be float32 or float64"):
        reference_bwd(do, q, k, v, out, lse, softmax_scale=0.3, causal=False, dq=dq.half())
