"""The Gluon (warp-specialized, FA3-style) backward on an sm_90 GPU, against float64 and cuDNN.

Every test runs each Gluon config explicitly (both dQ ways: the TMA reduction and the deterministic
``tl`` dQ kernel), so any config the tuner might pick is checked. Each of dq, dk, dv must be within
1.5x of cuDNN's error on the same inputs (2e-2 where cuDNN refuses the case); NaN never passes;
every output element is written (buffers are NaN-poisoned where a kernel writes rather than adds).
"""

from __future__ import annotations

import math

import pytest
import torch

from fa3dist.kernels import gluon_bwd
from fa3dist.kernels.common import paths_taken
from fa3dist.kernels.numerics import relative_error
from fa3dist.kernels.reference import reference_bwd, reference_fwd
from fa3dist.kernels.sdpa import cudnn_bwd
from fa3dist.kernels.triton_bwd import flash_bwd, flash_bwd_config

from .grad_checks import check_gradient

SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not SM90, reason="needs an sm_90 GPU")]
FALLBACK_TOL = 2e-2
CONFIGS = {d: [c.candidate(dq) for c in gluon_bwd.GLUON_BWD_CONFIGS[d] for dq in ("tma_reduce", "separate")]
           for d in gluon_bwd.GLUON_BWD_HEAD_DIMS}


def _inputs(batch, seq_q, seq_k, heads, kv_heads, dim, dtype, causal, seed):
    """Random q, k, v, do and out/lse of the float32 reference forward on the same inputs."""
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.float32, generator=gen).to(dtype)

    q, do = randn(batch, seq_q, heads, dim), randn(batch, seq_q, heads, dim)
    k, v = randn(batch, seq_k, kv_heads, dim), randn(batch, seq_k, kv_heads, dim)
    scale = 1 / math.sqrt(dim)
    out, lse = reference_fwd(q.float(), k.float(), v.float(), softmax_scale=scale, causal=causal)
    return do, q, k, v, out.to(dtype), lse, scale


def _check(grads, inputs, causal):
    do, q, k, v, out, lse, scale = inputs
    ref = reference_bwd(*(t.double() for t in (do, q, k, v, out, lse)), softmax_scale=scale, causal=causal)
    try:
        theirs = cudnn_bwd(do, q, k, v, out, lse, softmax_scale=scale, causal=causal)
        bounds = [min(1.5 * relative_error(t, r), FALLBACK_TOL) + 1e-4 for t, r in zip(theirs, ref)]
    except (RuntimeError, ValueError):
        bounds = [FALLBACK_TOL] * 3
    for name, g, r, bound in zip("dq dk dv".split(), grads, ref, bounds):
        check_gradient(name, g, r, bound)


@pytest.mark.parametrize("head_dim", gluon_bwd.GLUON_BWD_HEAD_DIMS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_every_config_matches_float64(head_dim, causal):
    inputs = _inputs(2, 1000, 1000, 8, 2, head_dim, torch.bfloat16, causal, seed=head_dim + causal)
    for cfg in CONFIGS[head_dim]:
        grads = flash_bwd_config(*inputs[:6], softmax_scale=inputs[6], causal=causal, config=cfg)
        _check(grads, inputs, causal)


@pytest.mark.parametrize("head_dim", gluon_bwd.GLUON_BWD_HEAD_DIMS)
def test_fp16(head_dim):
    for causal in (False, True):
        inputs = _inputs(2, 777, 777, 4, 4, head_dim, torch.float16, causal, seed=head_dim)
        grads = flash_bwd_config(*inputs[:6], softmax_scale=inputs[6], causal=causal, config=CONFIGS[head_dim][0])
        _check(grads, inputs, causal)


# FlashAttention-3's awkward sequence-length grid (Sq, Sk), causal only where Sq == Sk.
SEQ_GRID = [(1, 1), (1, 239), (239, 1), (3, 799), (799, 3), (113, 203), (128, 217), (113, 211), (108, 256),
            (256, 512), (1024, 1024), (1023, 1024), (1024, 1023), (2048, 2048), (4224, 4224)]


@pytest.mark.parametrize("head_dim", [128, 256], ids=["d128-keys-split", "d256-dims-split"])
@pytest.mark.parametrize("seq_q,seq_k", SEQ_GRID)
def test_awkward_lengths(seq_q, seq_k, head_dim):
    for causal in ([False, True] if seq_q == seq_k else [False]):
        inputs = _inputs(2, seq_q, seq_k, 4, 2, head_dim, torch.bfloat16, causal, seed=seq_q * 31 + seq_k)
        grads = flash_bwd_config(*inputs[:6], softmax_scale=inputs[6], causal=causal,
                                 config=CONFIGS[head_dim][0])
        _check(grads, inputs, causal)


@pytest.mark.parametrize("heads,kv_heads", [(16, 16), (16, 4), (16, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gqa_mqa_through_flash_bwd(heads, kv_heads, causal, monkeypatch):
    """The public entry with the path forced: the tuner checks the Gluon configs against tl and picks one."""
    monkeypatch.setenv("FA3DIST_KERNEL", "gluon")
    monkeypatch.setenv("FA3DIST_AUTOTUNE", "1")
    inputs = _inputs(1, 3000, 3000, heads, kv_heads, 128, torch.bfloat16, causal, seed=heads * kv_heads)
    grads = flash_bwd(*inputs[:6], softmax_scale=inputs[6], causal=causal)
    _check(grads, inputs, causal)
    assert "gluon" in paths_taken()["flash_bwd"]


@pytest.mark.parametrize("head_dim", gluon_bwd.GLUON_BWD_HEAD_DIMS)
def test_ring_use_keys_in_halves_into_row_slice_views(head_dim):
    """The ring's case: an out/lse of the whole attention and the keys in two calls. dQ is written by the
    first call and added by the second, in fp32, into a row-slice view; dK/dV go into row slices of
    fp32 buffers, written by the first call (NaN-poisoned before) and added by the second (zeroed)."""
    do, q, k, v, out, lse, scale = inputs = _inputs(2, 1536, 2048, 8, 2, head_dim, torch.bfloat16, False, seed=5)
    halves = (slice(0, 1100), slice(1100, None))
    for cfg in CONFIGS[head_dim]:
        big_dq = torch.full((2, 4096, 8, head_dim), float("nan"), device="cuda")
        dq = big_dq[:, 1000:1000 + 1536]
        dk = torch.full((2, 3000, 2, head_dim), float("nan"), device="cuda")[:, 500:2548]
        dv = torch.full_like(dk, float("nan"))
        dk[:, halves[1]] = 0
        dv[:, halves[1]] = 0
        for i, keys in enumerate(halves):
            flash_bwd_config(do, q, k[:, keys], v[:, keys], out, lse, softmax_scale=scale, causal=False, config=cfg,
                             dq=dq, dk=dk[:, keys], dv=dv[:, keys], accumulate=i > 0)
        _check((dq, dk, dv), inputs, False)
        assert torch.isnan(big_dq[:, :1000]).all() and torch.isnan(big_dq[:, 1000 + 1536:]).all()


@pytest.mark.parametrize("head_dim", gluon_bwd.GLUON_BWD_HEAD_DIMS)
def test_dk_dv_alone_add_into_buffers(head_dim):
    """A call for dK/dV alone (no dQ work) adds into what the buffers hold."""
    inputs = _inputs(1, 2000, 2000, 4, 4, head_dim, torch.bfloat16, True, seed=9)
    do, q, k, v, out, lse, scale = inputs
    ref = reference_bwd(*(t.double() for t in inputs[:6]), softmax_scale=scale, causal=True)
    start_k, start_v = torch.randn(k.shape, device="cuda"), torch.randn(v.shape, device="cuda")
    dk, dv = start_k.clone(), start_v.clone()
    for cfg in CONFIGS[head_dim][:1]:
        flash_bwd_config(*inputs[:6], softmax_scale=scale, causal=True, config=cfg, dk=dk, dv=dv, accumulate=True)
    assert relative_error(dk - start_k, ref[1]) < 1e-2
    assert relative_error(dv - start_v, ref[2]) < 1e-2


def test_deterministic_is_bit_identical(monkeypatch):
    monkeypatch.setenv("FA3DIST_KERNEL", "gluon")
    monkeypatch.setenv("FA3DIST_AUTOTUNE", "1")
    inputs = _inputs(2, 4096, 4096, 16, 4, 128, torch.bfloat16, True, seed=11)
    first = flash_bwd(*inputs[:6], softmax_scale=inputs[6], causal=True, deterministic=True)
    for _ in range(3):
        again = flash_bwd(*inputs[:6], softmax_scale=inputs[6], causal=True, deterministic=True)
        assert all(torch.equal(a, b) for a, b in zip(first, again))
    _check(first, inputs, True)
