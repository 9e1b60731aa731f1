"""Every bad input to the public API gets a clear error that names the argument."""

from __future__ import annotations

import pytest
import torch

from fa3dist import fa3_attention, ring_fa3_attention
from fa3dist.kernels import get_backend
from fa3dist.kernels.reference import reference_bwd


def qkv(seq=8, heads=4, kv_heads=2, dim=16, dtype=torch.float32, kv_seq=None):
    q = torch.randn(1, seq, heads, dim, dtype=dtype)
    k = torch.randn(1, kv_seq or seq, kv_heads, dim, dtype=dtype)
    return q, k, k.clone()


BAD_CALLS = [
    ("q not a tensor", lambda q, k, v: ([1.0], k, v, {}), TypeError, "q must be a torch.Tensor"),
    ("q 3-D", lambda q, k, v: (q[0], k, v, {}), ValueError, "q must be 4-D"),
    ("k dtype", lambda q, k, v: (q, k.double(), v, {}), TypeError, "share one dtype"),
    ("int dtype", lambda q, k, v: (q.int(), k.int(), v.int(), {}), TypeError, "q has dtype torch.int32"),
    ("k, v shapes", lambda q, k, v: (q, k, v[:, :4], {}), ValueError, "k and v must have the same shape"),
    ("batch", lambda q, k, v: (q, k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), {}), ValueError, "batch size"),
    ("head_dim", lambda q, k, v: (q, k[..., :8], v[..., :8], {}), ValueError, "head_dim 8"),
    ("heads not divisible", lambda q, k, v: (q[:, :, :3], k, v, {}), ValueError, "multiple of k/v's heads"),
    ("causal type", lambda q, k, v: (q, k, v, {"causal": 1}), TypeError, "causal must be a bool"),
    ("scale type", lambda q, k, v: (q, k, v, {"softmax_scale": "0.1"}), TypeError, "softmax_scale must be"),
    ("scale value", lambda q, k, v: (q, k, v, {"softmax_scale": -1.0}), ValueError, "positive finite"),
    ("backend", lambda q, k, v: (q, k, v, {"backend": "xformers"}), ValueError, "backend must be one of"),
    ("return_lse", lambda q, k, v: (q, k, v, {"return_lse": "yes"}), TypeError, "return_lse must be a bool"),
]


@pytest.mark.parametrize("fn", [fa3_attention, ring_fa3_attention], ids=["fa3_attention", "ring_fa3_attention"])
@pytest.mark.parametrize("name,make,error,match", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises(fn, name, make, error, match):
    q, k, v, kwargs = make(*qkv())
    with pytest.raises(error, match=match):
        fn(q, k, v, **kwargs)


def test_causal_needs_equal_lengths():
    q, k, v = qkv(seq=8, kv_seq=12)
    fa3_attention(q, k, v)  # fine without the mask
    with pytest.raises(ValueError, match="causal attention needs equal query and key lengths"):
        fa3_attention(q, k, v, causal=True)


def test_ring_needs_matching_local_lengths_and_known_layout():
    q, k, v = qkv(seq=8, kv_seq=12)
    with pytest.raises(ValueError, match="sharded alike"):
        ring_fa3_attention(q, k, v)
    q, k, v = qkv()
    with pytest.raises(ValueError, match="layout must be one of"):
        ring_fa3_attention(q, k, v, layout="striped")


def test_cuda_only_backend_on_cpu_is_refused():
    q, k, v = qkv(dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="backend 'cudnn' needs CUDA tensors"):
        fa3_attention(q, k, v, backend="cudnn")
    with pytest.raises(ValueError, match="needs CUDA"):
        get_backend("flash2", "cpu")


def test_backward_inputs_are_checked():
    q, k, v = qkv()
    lse = torch.zeros(1, 4, 8)
    with pytest.raises(ValueError, match="lse must have shape"):
        reference_bwd(q, q, k, v, q, lse[:, :2], softmax_scale=0.1, causal=False)
    with pytest.raises(TypeError, match="lse must be float32"):
        reference_bwd(q, q, k, v, q, lse.half(), softmax_scale=0.1, causal=False)
    with pytest.raises(ValueError, match="do must have q's shape"):
        reference_bwd(q[:, :4], q, k, v, q, lse, softmax_scale=0.1, causal=False)


def test_single_process_ring_is_the_local_kernel():
    q, k, v = qkv(dtype=torch.float64)
    out, lse = ring_fa3_attention(q, k, v, causal=True, return_lse=True)
    ref_out, ref_lse = fa3_attention(q, k, v, causal=True, return_lse=True)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    assert not lse.requires_grad
