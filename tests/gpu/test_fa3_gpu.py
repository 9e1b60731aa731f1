"""Backend "fa3" (FlashAttention's own Hopper kernels) against float64, on an sm90 GPU with flash-attn-4."""

from __future__ import annotations

import pytest
import torch

from fa3dist import fa3_attention
from fa3dist.kernels import get_backend
from fa3dist.kernels.fa3 import unavailable_reason
from fa3dist.kernels.numerics import relative_error
from fa3dist.kernels.reference import reference_bwd, reference_fwd
from fa3dist.kernels.registry import auto_backend_name
from fa3dist.ring import merge_block_

from .grad_checks import check_gradient

REASON = unavailable_reason() if torch.cuda.is_available() else "needs CUDA"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(REASON is not None, reason=str(REASON))]
# ||fa3 - float64|| may exceed cuDNN's by this factor (plus a floor for tiny, noisy cases)
FACTOR, FLOOR = 1.5, 2e-3


def inputs(seq_q, seq_k, heads, kv_heads, dim, dtype, seed, batch=2):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, do = (torch.randn(batch, seq_q, heads, dim, device="cuda", dtype=dtype, generator=gen) for _ in range(2))
    k, v = (torch.randn(batch, seq_k, kv_heads, dim, device="cuda", dtype=dtype, generator=gen) for _ in range(2))
    return q, k, v, do


def float64_truth(q, k, v, do, scale, causal):
    out, lse = reference_fwd(q.double(), k.double(), v.double(), softmax_scale=scale, causal=causal)
    return out, lse, reference_bwd(do.double(), q.double(), k.double(), v.double(), out, lse, softmax_scale=scale,
                                   causal=causal)


def run(backend, q, k, v, do, scale, causal):
    out, lse = backend.fwd(q, k, v, softmax_scale=scale, causal=causal)
    return out, lse, backend.bwd(do, q, k, v, out, lse, softmax_scale=scale, causal=causal)


def errors(backend, q, k, v, do, scale, causal, truth):
    out, lse, grads = run(backend, q, k, v, do, scale, causal)
    return [relative_error(got, want) for got, want in zip((out, *grads), (truth[0], *truth[2]))], lse


def cudnn_errors(q, k, v, do, scale, causal, truth):
    """cuDNN's errors on the same inputs, or a fixed 1e-2 each where cuDNN refuses the shape (e.g. S = 1)."""
    try:
        return errors(get_backend("cudnn", "cuda"), q, k, v, do, scale, causal, truth)[0]
    except RuntimeError:
        return [1e-2 / FACTOR] * 4


SHAPES = [(1000, 1000), (1, 1), (1, 700), (700, 1), (799, 3), (3, 799), (113, 203), (128, 217), (4224, 4224)]


@pytest.mark.parametrize("seq_q,seq_k", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (8, 2), (8, 1)])
def test_fa3_matches_float64_like_cudnn(seq_q, seq_k, causal, heads, kv_heads):
    if causal and seq_q != seq_k:
        pytest.skip("causal needs Sq == Sk")
    q, k, v, do = inputs(seq_q, seq_k, heads, kv_heads, 128, torch.bfloat16, seed=seq_q * 7 + seq_k + heads * kv_heads)
    scale = 128 ** -0.5
    truth = float64_truth(q, k, v, do, scale, causal)
    out, lse, grads = run(get_backend("fa3", "cuda"), q, k, v, do, scale, causal)
    theirs = cudnn_errors(q, k, v, do, scale, causal, truth)
    assert lse.shape == (2, heads, seq_q) and lse.dtype == torch.float32
    assert relative_error(lse, truth[1]) < 1e-4
    for name, got, want, peer in zip(("out", "dq", "dk", "dv"), (out, *grads), (truth[0], *truth[2]), theirs):
        check_gradient(name, got, want, FACTOR * peer + FLOOR)


@pytest.mark.parametrize("dim", [64, 96, 128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fa3_head_dims_and_dtypes(dim, dtype):
    q, k, v, do = inputs(1024, 1024, 4, 2, dim, dtype, seed=dim)
    scale = dim ** -0.5
    truth = float64_truth(q, k, v, do, scale, True)
    ours, _ = errors(get_backend("fa3", "cuda"), q, k, v, do, scale, True, truth)
    theirs = cudnn_errors(q, k, v, do, scale, True, truth)
    for mine, peer in zip(ours, theirs):
        assert mine <= FACTOR * peer + FLOOR


def test_fa3_backward_with_out_lse_merged_from_key_halves():
    """The ring's case: each key half's gradients use the merged out/lse, and they add up to the whole."""
    q, k, v, do = inputs(1024, 2048, 8, 2, 128, torch.bfloat16, seed=5)
    be, scale = get_backend("fa3", "cuda"), 0.09
    halves = (slice(0, 1024), slice(1024, None))
    out = torch.empty(q.shape, device="cuda", dtype=torch.float32)
    lse = torch.empty(2, 8, 1024, device="cuda", dtype=torch.float32)
    for i, s in enumerate(halves):
        out_b, lse_b = be.fwd(q, k[:, s], v[:, s], softmax_scale=scale, causal=False)
        if i == 0:
            out.copy_(out_b)
            lse.copy_(lse_b)
        else:
            merge_block_(out, lse, out_b, lse_b)
    truth = float64_truth(q, k, v, do, scale, False)
    assert relative_error(out, truth[0]) < 1e-2
    out_bf16 = out.to(q.dtype)
    parts = [be.bwd(do, q, k[:, s], v[:, s], out_bf16, lse, softmax_scale=scale, causal=False) for s in halves]
    dq = parts[0][0].float() + parts[1][0].float()
    dk = torch.cat([parts[0][1], parts[1][1]], 1)
    dv = torch.cat([parts[0][2], parts[1][2]], 1)
    whole = cudnn_errors(q, k, v, do, scale, False, truth)
    for name, got, want, peer in zip(("dq", "dk", "dv"), (dq, dk, dv), truth[2], whole[1:]):
        assert relative_error(got, want) <= FACTOR * peer + FLOOR, name


def test_auto_picks_fa3_and_autograd_works():
    assert auto_backend_name("cuda", torch.bfloat16) == "fa3"
    q, k, v, do = inputs(512, 512, 8, 2, 64, torch.bfloat16, seed=11)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = fa3_attention(q, k, v, causal=True, backend="auto")
    out.backward(do)
    truth = float64_truth(q, k, v, do, 64 ** -0.5, True)
    assert relative_error(out, truth[0]) < 1e-2
    for got, want in zip((q.grad, k.grad, v.grad), truth[2]):
        assert relative_error(got, want) < 2e-2
