"""The Triton forward kernel against the float64 reference, in float32.

Without CUDA, tests/conftest.py sets TRITON_INTERPRET=1 before anything imports Triton, so the
kernel runs in the interpreter on CPU tensors; with CUDA the same tests run compiled on the GPU.
"""

from __future__ import annotations

import math

import pytest
import torch

from fa3dist.kernels.tma import tma_addressable
from fa3dist.kernels.autotune import relative_error
from fa3dist.kernels.common import INTERPRET
from fa3dist.kernels.reference import reference_fwd
from fa3dist.kernels.triton_fwd import FWD_CONFIGS, SMALL_CONFIG, _launch, candidate_configs, flash_fwd

DEVICE = "cpu" if INTERPRET else "cuda"
TOL = 1e-5
# triton 3.6's interpreter turns a 1-element array into a loop bound this way; not our code.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def _randn(*shape: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(DEVICE)


def _qkv(batch: int, seq_q: int, seq_k: int, heads: int, kv_heads: int, head_dim: int,
         seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (_randn(batch, seq_q, heads, head_dim, seed=seed),
            _randn(batch, seq_k, kv_heads, head_dim, seed=seed + 1),
            _randn(batch, seq_k, kv_heads, head_dim, seed=seed + 2))


def _assert_matches(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                    lse: torch.Tensor, scale: float, causal: bool) -> None:
    ref_out, ref_lse = reference_fwd(q.double(), k.double(), v.double(), softmax_scale=scale, causal=causal)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == torch.float32
    assert lse.is_contiguous()
    assert relative_error(out, ref_out) < TOL
    assert relative_error(lse, ref_lse) < TOL


CASES = [  # batch, seq_q, seq_k, heads, kv_heads, head_dim, causal
    (2, 37, 37, 4, 2, 40, True),    # GQA, S not a multiple of the block
    (2, 37, 37, 4, 2, 40, False),
    (1, 50, 50, 2, 2, 64, True),
    (1, 64, 64, 2, 2, 64, False),   # S a multiple of the block
    (1, 50, 29, 2, 1, 72, False),   # Sq > Sk, MQA
    (1, 29, 50, 4, 1, 64, False),   # Sq < Sk, MQA
    (1, 33, 33, 1, 1, 8, True),     # smallest head dim
    (1, 21, 21, 2, 1, 256, True),   # largest head dim
    (1, 1, 1, 1, 1, 16, True),      # one token
    (1, 1, 40, 2, 2, 32, False),    # one query
]


@pytest.mark.parametrize("batch, seq_q, seq_k, heads, kv_heads, head_dim, causal", CASES)
def test_matches_reference(batch: int, seq_q: int, seq_k: int, heads: int, kv_heads: int, head_dim: int,
                           causal: bool) -> None:
    q, k, v = _qkv(batch, seq_q, seq_k, heads, kv_heads, head_dim)
    scale = 1.0 / math.sqrt(head_dim)
    out, lse = flash_fwd(q, k, v, softmax_scale=scale, causal=causal)
    _assert_matches(q, k, v, out, lse, scale, causal)


@pytest.mark.parametrize("scale", [0.03, 1.7])
def test_softmax_scale(scale: float) -> None:
    q, k, v = _qkv(2, 45, 45, 2, 1, 48, seed=10)
    out, lse = flash_fwd(q, k, v, softmax_scale=scale, causal=True)
    _assert_matches(q, k, v, out, lse, scale, True)


@pytest.mark.parametrize("causal", [False, True])
def test_views_along_seq_and_transposed(causal: bool) -> None:
    """Slices of a longer sequence and (B, H, S, D) tensors seen as (B, S, H, D) run as they are."""
    seq, head_dim = 40, 24
    q = _randn(2, 2 * seq, 4, head_dim, seed=20)[:, seq:]
    k = _randn(2, 2, 3 * seq, head_dim, seed=21).transpose(1, 2)[:, seq:2 * seq]
    v = _randn(2, seq, 2, head_dim, seed=22)
    assert not q.is_contiguous() and not k.is_contiguous()
    assert tma_addressable(q) and tma_addressable(k)
    out, lse = flash_fwd(q, k, v, softmax_scale=0.2, causal=causal)
    _assert_matches(q, k, v, out, lse, 0.2, causal)


def test_views_that_tma_cannot_address_are_copied() -> None:
    """A non-unit last stride and a base off 16-byte alignment fall back to a contiguous copy."""
    batch, seq, heads, head_dim = 1, 30, 2, 16
    q = _randn(batch, seq, head_dim, heads, seed=30).transpose(2, 3)
    k = _randn(batch * seq * heads * head_dim + 1, seed=31)[1:].view(batch, seq, heads, head_dim)
    v = _randn(batch, seq, heads, head_dim, seed=32)
    assert not tma_addressable(q) and not tma_addressable(k)
    out, lse = flash_fwd(q, k, v, softmax_scale=0.25, causal=False)
    _assert_matches(q, k, v, out, lse, 0.25, False)


def test_size_one_dims_with_odd_strides() -> None:
    """Strides of size-1 dims are irrelevant to addressing and must not block TMA."""
    q = _randn(1, 24, 1, 32, seed=40).as_strided((1, 24, 1, 32), (3, 32, 1, 1))
    k, v = _randn(1, 24, 1, 32, seed=41), _randn(1, 24, 1, 32, seed=42)
    assert tma_addressable(q)
    out, lse = flash_fwd(q, k, v, softmax_scale=0.3, causal=True)
    _assert_matches(q, k, v, out, lse, 0.3, True)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("cfg", [*FWD_CONFIGS, SMALL_CONFIG, {**SMALL_CONFIG, "BLOCK_M": 16, "BLOCK_N": 64},
                                 {**SMALL_CONFIG, "BLOCK_N": 32, "PERSISTENT": True}], ids=str)
def test_every_config(cfg: dict, causal: bool) -> None:
    """Every block shape (BLOCK_N above or below BLOCK_M, persistent or not) gives the same result."""
    if DEVICE == "cuda":
        pytest.skip("the GPU tests check the tuning candidates in fp16/bf16")
    q, k, v = _qkv(1, 150, 150, 2, 1, 24, seed=50)
    out, lse = _launch(q, k, v, 0.3, causal, cfg)
    _assert_matches(q, k, v, out, lse, 0.3, causal)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [8, 64, 72, 128, 256])
def test_candidates_fit_and_start_with_the_reference(head_dim: int, dtype: torch.dtype) -> None:
    configs = candidate_configs(head_dim, dtype)
    assert configs[0] is FWD_CONFIGS[0]
    row_bytes = max(16, 1 << (head_dim - 1).bit_length()) * dtype.itemsize
    for cfg in configs:
        assert (cfg["BLOCK_M"] + 2 * cfg["num_stages"] * cfg["BLOCK_N"]) * row_bytes <= 227 * 1024


@pytest.mark.parametrize("out_dtype", [torch.float32, None])
def test_accumulate_merges_key_blocks_into_given_buffers(out_dtype) -> None:
    """Blocks of keys merged in the epilogue, into row-slice views of larger buffers, give full attention."""
    q, k, v = _qkv(2, 30, 70, 4, 2, 40, seed=80)
    out_all = torch.full((2, 50, 4, 40), 7.0, device=DEVICE, dtype=out_dtype or q.dtype)
    lse_all = torch.full((2, 4, 50), 7.0, device=DEVICE)
    out, lse = out_all[:, 20:], lse_all[:, :, 20:]  # views, as the ring's second query half
    for index, keys in enumerate((slice(0, 33), slice(33, 40), slice(40, 70))):
        got = flash_fwd(q, k[:, keys], v[:, keys], softmax_scale=0.3, causal=False, out=out, lse=lse,
                        accumulate=index > 0)
        assert got[0] is out and got[1] is lse
    ref_out, ref_lse = reference_fwd(q.double(), k.double(), v.double(), softmax_scale=0.3, causal=False)
    assert relative_error(out, ref_out) < TOL and relative_error(lse, ref_lse) < TOL
    assert torch.all(out_all[:, :20] == 7.0) and torch.all(lse_all[:, :, :20] == 7.0)  # untouched rows


def test_accumulate_keeps_empty_rows_empty() -> None:
    """An empty accumulator (out 0, lse -inf) takes a block as it is; empty rows on both sides stay 0/-inf."""
    q, k, v = _qkv(1, 24, 24, 2, 1, 16, seed=81)
    out = torch.zeros(q.shape, device=DEVICE)
    lse = torch.full((1, 2, 24), float("-inf"), device=DEVICE)
    flash_fwd(q, k, v, softmax_scale=0.4, causal=True, out=out, lse=lse, accumulate=True)
    _assert_matches(q, k, v, out, lse, 0.4, True)
    out_empty = torch.zeros(q.shape, device=DEVICE)
    lse_empty = torch.full((1, 2, 24), float("-inf"), device=DEVICE)
    flash_fwd(q, k[:, :0], v[:, :0], softmax_scale=0.4, causal=False, out=out_empty, lse=lse_empty,
              accumulate=True)  # no key on either side
    assert torch.all(out_empty == 0) and torch.all(lse_empty == float("-inf"))
    flash_fwd(q, k[:, :0], v[:, :0], softmax_scale=0.4, causal=False, out=out, lse=lse, accumulate=True)
    _assert_matches(q, k, v, out, lse, 0.4, True)  # an empty block changes nothing


def test_inputs_are_not_modified() -> None:
    q, k, v = _qkv(1, 20, 20, 2, 2, 16, seed=60)
    copies = [t.clone() for t in (q, k, v)]
    flash_fwd(q, k, v, softmax_scale=0.5, causal=True)
    assert all(torch.equal(t, c) for t, c in zip((q, k, v), copies))


def _bad(**changes: object) -> dict:
    q, k, v = _qkv(1, 8, 8, 2, 2, 16, seed=70)
    args = {"q": q, "k": k, "v": v, "softmax_scale": 0.25, "causal": False}
    args.update(changes)
    return args


@pytest.mark.parametrize("args, error, match", [
    (lambda: _bad(q=_randn(8, 2, 16, seed=1)), ValueError, "4-D"),
    (lambda: _bad(k=_randn(1, 8, 2, 16, seed=1).double()), TypeError, "dtype"),
    (lambda: _bad(q=_randn(1, 8, 2, 16, seed=1).double(), k=_randn(1, 8, 2, 16, seed=2).double(),
                  v=_randn(1, 8, 2, 16, seed=3).double()), TypeError, "dtype"),
    (lambda: _bad(q=_randn(1, 8, 3, 16, seed=1)), ValueError, "multiple of k/v's heads"),
    (lambda: _bad(q=_randn(1, 9, 2, 16, seed=1), causal=True), ValueError, "causal"),
    (lambda: _bad(q=_randn(1, 8, 2, 12, seed=1), k=_randn(1, 8, 2, 12, seed=2), v=_randn(1, 8, 2, 12, seed=3)),
     ValueError, "multiple of 8"),
    (lambda: _bad(q=_randn(1, 4, 1, 264, seed=1), k=_randn(1, 4, 1, 264, seed=2), v=_randn(1, 4, 1, 264, seed=3)),
     ValueError, "at most 256"),
    (lambda: _bad(softmax_scale=None), TypeError, "softmax_scale"),
    (lambda: _bad(softmax_scale="0.5"), TypeError, "softmax_scale"),
    (lambda: _bad(softmax_scale=True), TypeError, "softmax_scale"),
    (lambda: _bad(softmax_scale=-0.5), ValueError, "softmax_scale"),
    (lambda: _bad(softmax_scale=0.0), ValueError, "softmax_scale"),
    (lambda: _bad(softmax_scale=float("nan")), ValueError, "softmax_scale"),
    (lambda: _bad(causal=1), TypeError, "causal"),
    (lambda: _bad(accumulate=True), ValueError, "running out and lse"),
    (lambda: _bad(out=torch.zeros(1, 8, 2, 16, device=DEVICE)), ValueError, "together"),
    (lambda: _bad(out=torch.zeros(1, 8, 2, 8, device=DEVICE), lse=torch.zeros(1, 2, 8, device=DEVICE)),
     ValueError, "out must be shaped like q"),
    (lambda: _bad(out=torch.zeros(1, 8, 2, 16, device=DEVICE).double(), lse=torch.zeros(1, 2, 8, device=DEVICE)),
     ValueError, "out must be shaped like q"),
    (lambda: _bad(out=torch.zeros(1, 8, 16, 2, device=DEVICE).transpose(2, 3),
                  lse=torch.zeros(1, 2, 8, device=DEVICE)), ValueError, "TMA"),
    (lambda: _bad(out=torch.zeros(1, 8, 2, 16, device=DEVICE), lse=torch.zeros(1, 8, 2, device=DEVICE)),
     ValueError, "lse must be float32"),
    (lambda: _bad(out=torch.zeros(1, 8, 2, 16, device=DEVICE), lse=torch.zeros(1, 2, 8, device=DEVICE),
                  accumulate=1), TypeError, "accumulate"),
], ids=["ndim", "kv-dtype", "float64", "heads", "causal-lengths", "head-dim-8", "head-dim-256",
        "scale-none", "scale-str", "scale-bool", "scale-negative", "scale-zero", "scale-nan", "causal-int",
        "accumulate-alone", "out-alone", "out-shape", "out-dtype", "out-strides", "lse-shape", "accumulate-int"])
def test_bad_inputs(args, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        flash_fwd(**args())
