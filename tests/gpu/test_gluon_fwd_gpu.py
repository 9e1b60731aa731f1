"""The Gluon (warp-specialized, FA3-style) forward on an sm_90 GPU, against float64 and cuDNN.

Every test forces the path with FA3DIST_KERNEL=gluon and runs each candidate config, so a config
the tuner might pick is checked too. Our error must stay within 1.5x of cuDNN's error on the same
inputs (2e-2 where cuDNN refuses the case); NaN never passes; every output element is written.
"""

from __future__ import annotations

import math

import pytest
import torch

from fa3dist.kernels import gluon_fwd
from fa3dist.kernels.numerics import relative_error
from fa3dist.kernels.reference import reference_fwd
from fa3dist.kernels.sdpa import cudnn_fwd
from fa3dist.kernels.triton_fwd import flash_fwd
from fa3dist.ring import merge_block_

SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not SM90, reason="needs an sm_90 GPU")]
FALLBACK_TOL = 2e-2


@pytest.fixture(autouse=True)
def force_gluon(monkeypatch):
    monkeypatch.setenv("FA3DIST_KERNEL", "gluon")


def _qkv(batch, seq_q, seq_k, heads, kv_heads, dim, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(batch, seq_q, heads, dim, device="cuda", dtype=dtype, generator=gen)
    k, v = (torch.randn(batch, seq_k, kv_heads, dim, device="cuda", dtype=dtype, generator=gen) for _ in range(2))
    return q, k, v


def _bound(q, k, v, scale, causal, ref_out):
    try:
        theirs, _ = cudnn_fwd(q, k, v, softmax_scale=scale, causal=causal)
    except (RuntimeError, ValueError):
        return FALLBACK_TOL
    return min(1.5 * relative_error(theirs, ref_out), FALLBACK_TOL) + 1e-4


def _run(q, k, v, scale, causal, cfg, out=None, lse=None, accumulate=False, num_programs=None):
    """One config into NaN-poisoned outputs; ``num_programs`` caps the persistent grid (a few programs
    walk many tiles, which exercises the barrier phases carried from tile to tile)."""
    if out is None:
        out = torch.full_like(q, float("nan"))
        lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("nan"), device="cuda")
    return gluon_fwd.gluon_launch(q, k, v, scale, causal, cfg, out, lse, accumulate, num_programs=num_programs)


def _check(q, k, v, scale, causal, out, lse):
    ref_out, ref_lse = reference_fwd(q.double(), k.double(), v.double(), softmax_scale=scale, causal=causal)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert relative_error(out, ref_out) <= _bound(q, k, v, scale, causal, ref_out)
    assert relative_error(lse, ref_lse) < 1e-3


@pytest.mark.parametrize("head_dim", gluon_fwd.GLUON_HEAD_DIMS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_every_config_matches_float64(head_dim, causal):
    q, k, v = _qkv(2, 1000, 1000, 8, 2, head_dim, torch.bfloat16, seed=head_dim + causal)
    scale = 1 / math.sqrt(head_dim)
    for cfg in gluon_fwd.GLUON_CONFIGS[head_dim]:
        for programs in (None, 5):  # 5 programs: many tiles each, and a last round the snake leaves in order
            out, lse = _run(q, k, v, scale, causal, cfg, num_programs=programs)
            _check(q, k, v, scale, causal, out, lse)


@pytest.mark.parametrize("head_dim", gluon_fwd.GLUON_HEAD_DIMS)
def test_fp16(head_dim):
    q, k, v = _qkv(2, 1000, 1000, 8, 2, head_dim, torch.float16, seed=head_dim)
    for causal in (False, True):
        out, lse = _run(q, k, v, 0.1, causal, gluon_fwd.GLUON_CONFIGS[head_dim][0])
        _check(q, k, v, 0.1, causal, out, lse)


# FlashAttention-3's awkward sequence-length grid (Sq, Sk), causal only where Sq == Sk.
SEQ_GRID = [(1, 1), (1, 239), (239, 1), (3, 799), (799, 3), (113, 203), (128, 217), (113, 211), (108, 256),
            (256, 512), (1024, 1024), (1023, 1024), (1024, 1023), (2048, 2048), (4224, 4224)]


# The default 128-row tile at D = 128, and the first 192-row (three consumer) tile at D = 64.
AWKWARD_CONFIGS = [(128, gluon_fwd.GLUON_CONFIGS[128][0]),
                   (64, next(c for c in gluon_fwd.GLUON_CONFIGS[64] if c.consumers == 3))]


@pytest.mark.parametrize("seq_q,seq_k", SEQ_GRID)
@pytest.mark.parametrize("head_dim,cfg", AWKWARD_CONFIGS, ids=[f"D{d}-{c.block_m}rows" for d, c in AWKWARD_CONFIGS])
def test_awkward_lengths(seq_q, seq_k, head_dim, cfg):
    q, k, v = _qkv(2, seq_q, seq_k, 4, 4, head_dim, torch.bfloat16, seed=seq_q * 31 + seq_k)
    scale = 1 / math.sqrt(head_dim)
    for causal in ([False, True] if seq_q == seq_k else [False]):
        out, lse = _run(q, k, v, scale, causal, cfg)
        _check(q, k, v, scale, causal, out, lse)


@pytest.mark.parametrize("heads,kv_heads", [(16, 16), (16, 4), (16, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gqa_mqa_through_flash_fwd(heads, kv_heads, causal):
    q, k, v = _qkv(1, 3000, 3000, heads, kv_heads, 128, torch.bfloat16, seed=heads * kv_heads)
    out, lse = flash_fwd(q, k, v, softmax_scale=0.08, causal=causal)
    _check(q, k, v, 0.08, causal, out, lse)


@pytest.mark.parametrize("head_dim", gluon_fwd.GLUON_HEAD_DIMS)
def test_epilogue_merge_into_row_slice_views(head_dim):
    """The ring's use: keys in two halves merged into fp32 row-slice views of a bigger accumulator."""
    q, k, v = _qkv(2, 1536, 2048, 8, 2, head_dim, torch.bfloat16, seed=7)
    scale = 1 / math.sqrt(head_dim)
    big_out = torch.full((2, 4096, 8, head_dim), float("nan"), device="cuda")
    big_lse = torch.full((2, 8, 4096), float("nan"), device="cuda")
    rows = slice(1000, 1000 + 1536)
    out, lse = big_out[:, rows], big_lse[:, :, rows]
    for i, keys in enumerate((slice(0, 1100), slice(1100, None))):
        _run(q, k[:, keys], v[:, keys], scale, False, gluon_fwd.GLUON_CONFIGS[head_dim][0], out, lse, accumulate=i > 0)
    _check(q, k, v, scale, False, out, lse)
    assert torch.isnan(big_out[:, :1000]).all() and torch.isnan(big_out[:, 1000 + 1536:]).all()
    # the same merge in PyTorch from two separate calls agrees to fp32 rounding
    parts = [_run(q, k[:, s], v[:, s], scale, False, gluon_fwd.GLUON_CONFIGS[head_dim][0])
             for s in (slice(0, 1100), slice(1100, None))]
    ref_out, ref_lse = parts[0][0].float(), parts[0][1].clone()
    merge_block_(ref_out, ref_lse, *parts[1])
    assert relative_error(out, ref_out) < 1e-2


def test_merge_into_an_empty_accumulator():
    """The ring's first merge target may hold rows that saw no key yet (0 / -inf): no NaN, exact result."""
    q, k, v = _qkv(1, 256, 256, 2, 2, 128, torch.bfloat16, seed=3)
    out = torch.zeros(q.shape, device="cuda")
    lse = torch.full((1, 2, 256), float("-inf"), device="cuda")
    _run(q, k, v, 0.1, True, gluon_fwd.GLUON_CONFIGS[128][0], out, lse, accumulate=True)
    _check(q, k, v, 0.1, True, out, lse)


def test_deterministic_and_repeatable():
    q, k, v = _qkv(2, 4096, 4096, 16, 4, 128, torch.bfloat16, seed=11)
    first = _run(q, k, v, 0.09, True, gluon_fwd.GLUON_CONFIGS[128][0])
    for _ in range(3):
        again = _run(q, k, v, 0.09, True, gluon_fwd.GLUON_CONFIGS[128][0])
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@pytest.mark.parametrize("head_dim", [64, 128])
def test_causal_sections_cover_every_tile(monkeypatch, head_dim):
    """More (batch, head) pairs than CTAs: the causal order walks them in L2-sized sections (the last one
    partial here: 21 pairs in sections of 2), and every tile is still computed exactly once."""
    q, k, v = _qkv(3, 1000, 1000, 7, 7, head_dim, torch.bfloat16, seed=21)
    kv_bytes = 2 * k.shape[1] * head_dim * k.element_size()
    monkeypatch.setattr(gluon_fwd, "CAUSAL_SECTION_BYTES", 2 * kv_bytes)
    assert gluon_fwd.causal_section(21, 5, k, 1) == 2 and gluon_fwd.causal_section(21, 32, k, 1) == 21
    for cfg in gluon_fwd.GLUON_CONFIGS[head_dim][:2]:
        out, lse = _run(q, k, v, 0.1, True, cfg, num_programs=5)
        _check(q, k, v, 0.1, True, out, lse)
