"""The Triton forward kernel on a GPU at real sizes, in fp16 and bf16.

The oracle is the float64 reference computed on the GPU. Our error must be within 1.5x of cuDNN's
error on the same inputs (or below 2e-2 where cuDNN refuses the case). The first call of each
(dtype, D, causal, size bucket) autotunes, so the first run of this file takes a few minutes.
"""

from __future__ import annotations

import math

import pytest
import torch
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources

from fa3dist.kernels.tma import tma_addressable
from fa3dist.kernels.autotune import relative_error
from fa3dist.kernels.common import INTERPRET
from fa3dist.kernels.reference import reference_fwd
from fa3dist.kernels.sdpa import cudnn_fwd
from fa3dist.kernels.triton_fwd import _launch, candidate_configs, flash_fwd

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET,
                       reason="needs CUDA and the compiled (not interpreted) kernel"),
]

LSE_TOL = 1e-3
FALLBACK_TOL = 2e-2


def _qkv(batch: int, seq_q: int, seq_k: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
         seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device="cuda", dtype=dtype)

    return (randn(batch, seq_q, heads, head_dim), randn(batch, seq_k, kv_heads, head_dim),
            randn(batch, seq_k, kv_heads, head_dim))


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return reference_fwd(q.double(), k.double(), v.double(), softmax_scale=scale, causal=causal)


def _error_bound(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
                 ref_out: torch.Tensor) -> float:
    """1.5x cuDNN's output error on these inputs, or FALLBACK_TOL where cuDNN refuses (or fails) them."""
    try:
        cudnn_out, _ = cudnn_fwd(q, k, v, softmax_scale=scale, causal=causal)
    except (RuntimeError, ValueError):
        return FALLBACK_TOL
    error = relative_error(cudnn_out, ref_out)
    return 1.5 * error if error < FALLBACK_TOL else FALLBACK_TOL


def _poison_allocator(*shapes_dtypes: tuple[tuple[int, ...], torch.dtype]) -> None:
    """Leave NaN-filled blocks in the caching allocator, so an unwritten output would show NaN."""
    for shape, dtype in shapes_dtypes:
        torch.full(shape, float("nan"), device="cuda", dtype=dtype)


@pytest.mark.parametrize("seq, kv_heads", [(2048, 16), (1000, 4)], ids=["S2048-mha", "S1000-gqa"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [64, 128, 256, 72])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_matches_float64_within_cudnn_error(dtype: torch.dtype, head_dim: int, causal: bool, seq: int,
                                           kv_heads: int) -> None:
    batch, heads = 2, 16
    q, k, v = _qkv(batch, seq, seq, heads, kv_heads, head_dim, dtype)
    scale = 1.0 / math.sqrt(head_dim)
    flash_fwd(q, k, v, softmax_scale=scale, causal=causal)  # tune first, so the checked call is plain
    _poison_allocator(((batch, seq, heads, head_dim), dtype), ((batch, heads, seq), torch.float32))
    out, lse = flash_fwd(q, k, v, softmax_scale=scale, causal=causal)
    ref_out, ref_lse = _reference(q, k, v, scale, causal)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    assert lse.shape == (batch, heads, seq) and lse.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert relative_error(out, ref_out) <= _error_bound(q, k, v, scale, causal, ref_out)
    assert relative_error(lse, ref_lse) < LSE_TOL


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_views_and_fallback_copies(causal: bool) -> None:
    """Slices along S and (B, H, S, D) tensors transposed run through TMA as they are; others are copied."""
    batch, seq, heads, head_dim, dtype = 2, 777, 8, 128, torch.bfloat16
    q = torch.randn(batch, 2 * seq, heads, head_dim, device="cuda", dtype=dtype)[:, seq:]
    k = torch.randn(batch, 2, seq, head_dim, device="cuda", dtype=dtype).transpose(1, 2)
    v = torch.randn(batch * seq * 2 * head_dim + 1, device="cuda", dtype=dtype)[1:].view(batch, seq, 2, head_dim)
    assert tma_addressable(q) and tma_addressable(k) and not tma_addressable(v)
    out, lse = flash_fwd(q, k, v, softmax_scale=0.1, causal=causal)
    ref_out, ref_lse = _reference(q, k, v, 0.1, causal)
    assert relative_error(out, ref_out) <= _error_bound(q, k, v.contiguous(), 0.1, causal, ref_out)
    assert relative_error(lse, ref_lse) < LSE_TOL


def test_float32() -> None:
    q, k, v = _qkv(1, 300, 300, 4, 2, 72, torch.float32, seed=2)
    out, lse = flash_fwd(q, k, v, softmax_scale=0.2, causal=True)
    ref_out, ref_lse = _reference(q, k, v, 0.2, True)
    assert relative_error(out, ref_out) < 1e-5
    assert relative_error(lse, ref_lse) < 1e-5


def _built(launch):
    """``launch()``'s result, or None when the config does not compile or fit on this GPU."""
    try:
        return launch()
    except (CompilationError, OutOfResources):
        return None
    except RuntimeError as err:  # a failed compiler pass; a CUDA error is a real failure
        if "CUDA" in str(err):
            raise
        return None


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_every_candidate_is_right_or_fails_to_build(dtype: torch.dtype, head_dim: int, causal: bool) -> None:
    """The tuner may pick any candidate that runs; each one that runs must be right."""
    q, k, v = _qkv(1, 1000, 1000, 4, 2, head_dim, dtype, seed=3)
    scale = 1.0 / math.sqrt(head_dim)
    ref_out, ref_lse = _reference(q, k, v, scale, causal)
    bound = _error_bound(q, k, v, scale, causal, ref_out)
    ran = 0
    for cfg in candidate_configs(head_dim, dtype):
        result = _built(lambda: _launch(q, k, v, scale, causal, cfg))
        if result is None:
            continue
        ran += 1
        assert relative_error(result[0], ref_out) <= bound, cfg
        assert relative_error(result[1], ref_lse) < LSE_TOL, cfg
    assert ran > 0


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_every_candidate_merges_right_in_the_epilogue(head_dim: int) -> None:
    """Key blocks merged into an fp32 accumulator (the ring's path), with every candidate, at 16K rows."""
    seq_q, seq_k = 16384, 4096
    q, k, v = _qkv(1, seq_q, seq_k, 8, 2, head_dim, torch.bfloat16, seed=4)
    scale = 1.0 / math.sqrt(head_dim)
    ref_out, _ = _reference(q[:, :2048], k, v, scale, False)  # float64 on the first rows only
    one_call, one_lse = flash_fwd(q, k, v, softmax_scale=scale, causal=False)
    bound = 1.5 * relative_error(one_call[:, :2048], ref_out) + 1e-4
    ran = 0
    for cfg in candidate_configs(head_dim, q.dtype):
        out = torch.empty(q.shape, device="cuda")
        lse = torch.empty(1, 8, seq_q, device="cuda")
        parts = (slice(0, 1000), slice(1000, 3000), slice(3000, seq_k))
        if _built(lambda: _launch(q, k[:, parts[0]], v[:, parts[0]], scale, False, cfg, out, lse)) is None:
            continue
        for keys in parts[1:]:
            _launch(q, k[:, keys], v[:, keys], scale, False, cfg, out, lse, accumulate=True)
        ran += 1
        assert torch.isfinite(out).all() and torch.isfinite(lse).all(), cfg
        assert relative_error(out[:, :2048], ref_out) <= bound, cfg
        assert relative_error(out, one_call) < 1e-2 and relative_error(lse, one_lse) < LSE_TOL, cfg
    assert ran > 0


def test_autotuned_forward(monkeypatch) -> None:
    """The tuner's choice (over every candidate) is as accurate as cuDNN."""
    monkeypatch.setenv("FA3DIST_AUTOTUNE", "1")
    q, k, v = _qkv(2, 2048, 2048, 16, 4, 128, torch.bfloat16)
    scale = 1.0 / math.sqrt(128)
    out, lse = flash_fwd(q, k, v, softmax_scale=scale, causal=True)
    ref_out, ref_lse = _reference(q, k, v, scale, True)
    assert relative_error(out, ref_out) <= _error_bound(q, k, v, scale, True, ref_out)
    assert relative_error(lse, ref_lse) < LSE_TOL
