"""PyTorch's cuDNN and FlashAttention-2 kernels as fa3dist backends, on a GPU."""

from __future__ import annotations

import pytest
import torch

from fa3dist import fa3_attention
from fa3dist.kernels import get_backend
from fa3dist.kernels.numerics import relative_error
from fa3dist.kernels.reference import reference_bwd, reference_fwd

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def inputs(seq_q, seq_k, heads, kv_heads, dim, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, do = (torch.randn(2, seq_q, heads, dim, device="cuda", dtype=dtype, generator=gen) for _ in range(2))
    k, v = (torch.randn(2, seq_k, kv_heads, dim, device="cuda", dtype=dtype, generator=gen) for _ in range(2))
    return q, k, v, do


@pytest.mark.parametrize("name", ["cudnn", "flash2"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [8, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_backend_matches_float64(name, causal, kv_heads, dtype):
    q, k, v, do = inputs(1000, 1000, 8, kv_heads, 128, dtype, seed=kv_heads + causal)
    be = get_backend(name, "cuda")
    out, lse = be.fwd(q, k, v, softmax_scale=0.1, causal=causal)
    assert lse.shape == (2, 8, 1000) and lse.dtype == torch.float32
    ref_out, ref_lse = reference_fwd(q.double(), k.double(), v.double(), softmax_scale=0.1, causal=causal)
    ref = reference_bwd(do.double(), q.double(), k.double(), v.double(), ref_out, ref_lse, softmax_scale=0.1,
                        causal=causal)
    assert relative_error(out, ref_out) < 1e-2
    assert relative_error(lse, ref_lse) < 1e-4
    grads = be.bwd(do, q, k, v, out, lse, softmax_scale=0.1, causal=causal)
    for got, want in zip(grads, ref):
        assert relative_error(got, want) < 2e-2


@pytest.mark.parametrize("name", ["cudnn", "flash2"])
def test_backend_backward_honours_external_lse(name):
    """Keys split in halves with the full out/lse: dK/dV are the full slices and dQ adds up."""
    q, k, v, do = inputs(1024, 2048, 8, 2, 128, torch.bfloat16, seed=5)
    be = get_backend(name, "cuda")
    out, lse = be.fwd(q, k, v, softmax_scale=0.09, causal=False)
    dq, dk, dv = be.bwd(do, q, k, v, out, lse, softmax_scale=0.09, causal=False)
    halves = [be.bwd(do, q, k[:, s], v[:, s], out, lse, softmax_scale=0.09, causal=False)
              for s in (slice(0, 1024), slice(1024, None))]
    assert relative_error(halves[0][0].float() + halves[1][0].float(), dq) < 1e-2
    assert relative_error(torch.cat([halves[0][1], halves[1][1]], 1), dk) < 1e-2
    assert relative_error(torch.cat([halves[0][2], halves[1][2]], 1), dv) < 1e-2


@pytest.mark.parametrize("backend", ["cudnn", "flash2", "auto"])
def test_fa3_attention_autograd_on_gpu(backend):
    q, k, v, do = inputs(512, 512, 8, 2, 64, torch.bfloat16, seed=11)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = fa3_attention(q, k, v, causal=True, backend=backend)
    out.backward(do)
    ref_out, ref_lse = reference_fwd(q.double(), k.double(), v.double(), softmax_scale=64 ** -0.5, causal=True)
    ref = reference_bwd(do.double(), q.double(), k.double(), v.double(), ref_out, ref_lse,
                        softmax_scale=64 ** -0.5, causal=True)
    assert relative_error(out, ref_out) < 1e-2
    for got, want in zip((q.grad, k.grad, v.grad), ref):
        assert relative_error(got, want) < 2e-2
