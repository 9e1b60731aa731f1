"""The FP8 helpers on the CPU: the Hadamard rotation, e4m3 quantization and its scales, the checks of
an FP8 call, and the float64 emulation (incoherent processing lowers the error on outliers)."""

from __future__ import annotations

import math

import pytest
import torch

from fa3dist.kernels import fp8
from fa3dist.kernels.reference import reference_fwd


def sylvester(dim: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < dim:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).to(dtype)


def outliers(shape, seed, prob=1e-3, std=10.0):
    """The FA3 paper's inputs: N(0, 1) plus N(0, std^2) on a random ``prob`` of the entries, in bf16."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, dtype=torch.float64, generator=gen)
    mask = torch.rand(shape, dtype=torch.float64, generator=gen) < prob
    return (x + mask * std * torch.randn(shape, dtype=torch.float64, generator=gen)).to(torch.bfloat16)


# --- rotation -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dim", [1, 2, 64, 128, 256])
def test_fwht_is_the_orthonormal_sylvester_hadamard(dim):
    x = randn(3, 5, 2, dim)
    assert torch.allclose(fp8.fwht(x), x @ sylvester(dim) / math.sqrt(dim), atol=1e-13)
    assert torch.allclose(fp8.fwht(fp8.fwht(x)), x, atol=1e-13)


@pytest.mark.parametrize("dim", [64, 128, 256])
def test_rotation_is_orthogonal_and_keeps_qk(dim):
    eye = torch.eye(dim, dtype=torch.float64)
    rot = fp8.hadamard_rotate(eye, seed=7)  # the rows of I R: R itself
    assert torch.allclose(rot @ rot.T, eye, atol=1e-13)
    assert torch.allclose(rot, torch.diag(fp8.hadamard_signs(dim, 7, dtype=torch.float64)) @ sylvester(dim)
                          / math.sqrt(dim), atol=1e-15)
    q, k = randn(2, 33, 3, dim, seed=1), randn(2, 40, 3, dim, seed=2)
    qr, kr = fp8.hadamard_rotate(q, seed=7), fp8.hadamard_rotate(k, seed=7)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k)
    assert (torch.einsum("bqhd,bkhd->bhqk", qr, kr) - scores).abs().max() < 1e-12 * scores.abs().max()
    out, lse = reference_fwd(q, k, k, softmax_scale=0.1, causal=False)
    out_r, lse_r = reference_fwd(qr, kr, k, softmax_scale=0.1, causal=False)
    assert torch.allclose(out_r, out, atol=1e-12) and torch.allclose(lse_r, lse, atol=1e-12)


def test_rotation_float32_and_bfloat16_inputs_compute_in_float32():
    x = randn(2, 9, 2, 128, seed=3, dtype=torch.bfloat16)
    rot = fp8.hadamard_rotate(x, seed=1)
    assert rot.dtype == torch.float32
    assert torch.allclose(rot.double(), fp8.hadamard_rotate(x.double(), seed=1), atol=1e-5)


def test_inverse():
    x = randn(2, 11, 3, 128, seed=4)
    rot = fp8.hadamard_rotate(x, seed=5)
    assert torch.allclose(fp8.hadamard_unrotate(rot, seed=5), x, atol=1e-13)
    # the transform is its own inverse; only the signs are applied on the other side
    signs = fp8.hadamard_signs(128, 5, dtype=torch.float64)
    assert torch.allclose(fp8.fwht(rot) * signs, x, atol=1e-13)
    assert not torch.allclose(fp8.hadamard_unrotate(rot, seed=6), x, atol=1e-3)


def test_signs_follow_the_seed():
    a, b = fp8.hadamard_signs(128, 0), fp8.hadamard_signs(128, 0)
    assert torch.equal(a, b) and set(a.tolist()) == {-1.0, 1.0}
    assert not torch.equal(a, fp8.hadamard_signs(128, 1))
    x = randn(1, 4, 1, 128)
    assert torch.equal(fp8.hadamard_rotate(x, seed=3), fp8.hadamard_rotate(x, seed=3))
    assert not torch.allclose(fp8.hadamard_rotate(x, seed=3), fp8.hadamard_rotate(x, seed=4))


@pytest.mark.parametrize("dim", [3, 96, 100, 192])
def test_head_dim_not_a_power_of_two_raises(dim):
    with pytest.raises(ValueError, match="head_dim is"):
        fp8.hadamard_rotate(randn(1, 2, 1, dim), seed=0)
    q = randn(1, 4, 2, dim, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="head_dim is"):
        fp8.quantize_qkv(q, q, q, incoherent=True)
    fp8.quantize_qkv(q, q, q)  # without the rotation any D quantizes


def test_bad_seed_raises():
    with pytest.raises(TypeError, match="seed"):
        fp8.hadamard_signs(64, 1.5)
    with pytest.raises(ValueError, match="seed"):
        fp8.hadamard_signs(64, -1)


# --- quantization -------------------------------------------------------------------------------------

def _within_e4m3_bound(x, x_fp8, descale):
    """|x - dequant| <= 2^-4 |x| for normal values, half the subnormal step (2^-10 descale) below."""
    deq = fp8.dequantize_fp8(x_fp8, descale, dtype=torch.float64)
    bound = torch.maximum(x.double().abs() * 2.0 ** -4, fp8._broadcast(descale, 4).double() * 2.0 ** -10)
    return bool(((deq - x.double()).abs() <= bound * (1 + 1e-6)).all())


@pytest.mark.parametrize("granularity", ["tensor", "head"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_quantize_round_trip(granularity, dtype):
    x = (randn(2, 64, 3, 32, seed=8) * torch.tensor([0.01, 1.0, 30.0], dtype=torch.float64)[:, None]).to(dtype)
    x_fp8, descale = fp8.quantize_fp8(x, granularity=granularity)
    assert x_fp8.dtype == torch.float8_e4m3fn and x_fp8.shape == x.shape
    assert descale.dtype == torch.float32
    assert descale.shape == ((1,) if granularity == "tensor" else (2, 3))
    assert _within_e4m3_bound(x, x_fp8, descale)
    # the largest magnitude of each group lands on 448: the whole e4m3 range is used
    amax = x_fp8.float().abs().amax() if granularity == "tensor" else x_fp8.float().abs().amax(dim=(1, 3))
    assert torch.all(amax == fp8.FP8_MAX)
    err = (fp8.dequantize_fp8(x_fp8, descale, dtype=torch.float64) - x.double()).abs()
    assert err.max() > 0  # not trivially exact


def test_per_head_scales_follow_each_head():
    x = randn(1, 64, 2, 16, seed=9) * torch.tensor([1e-3, 1e3], dtype=torch.float64)[:, None]
    _, per_tensor = fp8.quantize_fp8(x, granularity="tensor")
    _, per_head = fp8.quantize_fp8(x, granularity="head")
    assert torch.allclose(per_head[0].double(), x.abs().amax(dim=(1, 3))[0] / 448, rtol=1e-6)
    assert torch.isclose(per_tensor[0].double(), x.abs().max() / 448, rtol=1e-6)
    # a per-tensor scale sends the small head to subnormals; per head it keeps e4m3's precision
    deq_t = fp8.dequantize_fp8(*fp8.quantize_fp8(x, granularity="tensor"), dtype=torch.float64)
    deq_h = fp8.dequantize_fp8(*fp8.quantize_fp8(x, granularity="head"), dtype=torch.float64)
    small = (slice(None), slice(None), 0)
    rel = lambda d: ((d[small] - x[small]).norm() / x[small].norm()).item()  # noqa: E731
    assert rel(deq_h) < 0.05 < rel(deq_t)


@pytest.mark.parametrize("granularity", ["tensor", "head"])
def test_zero_input_gives_finite_scales(granularity):
    x = torch.zeros(2, 8, 3, 16, dtype=torch.bfloat16)
    x[1, :, 2] = 5.0  # one head not zero
    x_fp8, descale = fp8.quantize_fp8(x, granularity=granularity)
    assert torch.isfinite(descale).all() and (descale > 0).all()
    assert torch.equal(fp8.dequantize_fp8(x_fp8, descale), x.float())
    zero_fp8, zero_descale = fp8.quantize_fp8(torch.zeros(1, 4, 2, 8), granularity=granularity)
    assert torch.equal(zero_descale, torch.ones_like(zero_descale)) and not zero_fp8.float().any()


def test_quantize_qkv_result():
    q = randn(2, 16, 4, 64, seed=10, dtype=torch.bfloat16)
    k, v = randn(2, 24, 2, 64, seed=11, dtype=torch.bfloat16), randn(2, 24, 2, 64, seed=12, dtype=torch.bfloat16)
    plain = fp8.quantize_qkv(q, k, v, granularity="head")
    assert (plain.q_descale.shape, plain.k_descale.shape, plain.v_descale.shape) == ((2, 4), (2, 2), (2, 2))
    assert plain.granularity == "head" and plain.rotation_seed is None and not plain.incoherent
    rot = fp8.quantize_qkv(q, k, v, incoherent=True, seed=3)
    assert rot.rotation_seed == 3 and rot.incoherent and rot.q_descale.shape == (1,)
    assert torch.equal(rot.v, fp8.quantize_qkv(q, k, v).v)  # v is never rotated
    deq_q = fp8.dequantize_fp8(rot.q, rot.q_descale, dtype=torch.float64)
    assert _within_e4m3_bound(fp8.hadamard_rotate(q, seed=3), rot.q, rot.q_descale)
    assert torch.allclose(fp8.hadamard_unrotate(deq_q, seed=3), q.double(), atol=0.07 * q.double().abs().max())
    with pytest.raises(AttributeError):
        rot.q = q  # frozen


def test_quantize_bad_inputs_raise():
    x = randn(1, 8, 2, 16, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="x has dtype torch.int32"):
        fp8.quantize_fp8(x.to(torch.int32))
    with pytest.raises(TypeError, match="x is already torch.float8_e4m3fn"):
        fp8.quantize_fp8(x.to(torch.float8_e4m3fn))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        fp8.quantize_fp8([1.0])
    with pytest.raises(ValueError, match="x must be 4-D"):
        fp8.quantize_fp8(x[0])
    with pytest.raises(ValueError, match="granularity must be one of 'tensor', 'head'; got 'block'"):
        fp8.quantize_fp8(x, granularity="block")
    with pytest.raises(TypeError, match="granularity must be a str"):
        fp8.quantize_fp8(x, granularity=None)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="x has NaN or inf"):
        fp8.quantize_fp8(bad)


def test_quantize_qkv_bad_inputs_raise():
    q = randn(1, 8, 2, 16, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="k is already torch.float8_e4m3fn"):
        fp8.quantize_qkv(q, q.to(torch.float8_e4m3fn), q)
    with pytest.raises(TypeError, match="v has dtype torch.int64"):
        fp8.quantize_qkv(q, q, q.to(torch.int64))
    with pytest.raises(TypeError, match="q, k and v must share one dtype"):
        fp8.quantize_qkv(q, q.float(), q)
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        fp8.quantize_qkv(q, q, q[:, :4])
    with pytest.raises(ValueError, match="head_dim"):
        fp8.quantize_qkv(q, q[..., :8], q[..., :8])
    with pytest.raises(ValueError, match="granularity"):
        fp8.quantize_qkv(q, q, q, granularity="channel")
    with pytest.raises(TypeError, match="incoherent must be a bool"):
        fp8.quantize_qkv(q, q, q, incoherent=1)
    with pytest.raises(TypeError, match="seed must be an int"):
        fp8.quantize_qkv(q, q, q, incoherent=True, seed="0")


# --- the checks of an FP8 call ---------------------------------------------------------------------------

def _fp8_call(granularity="head"):
    q = randn(2, 16, 4, 32, seed=13, dtype=torch.bfloat16)
    k = randn(2, 16, 2, 32, seed=14, dtype=torch.bfloat16)
    return fp8.quantize_qkv(q, k, k, granularity=granularity)


@pytest.mark.parametrize("granularity", ["tensor", "head"])
def test_check_fp8_inputs_returns_per_head_views(granularity):
    r = _fp8_call(granularity)
    qd, kd, vd = fp8.check_fp8_inputs(r.q, r.k, r.v, r.q_descale, r.k_descale, r.v_descale)
    assert (qd.shape, kd.shape, vd.shape) == ((2, 4), (2, 2), (2, 2))
    assert torch.equal(qd, r.q_descale.expand(2, 4))
    if granularity == "tensor":
        assert qd.stride() == (0, 0) and qd.data_ptr() == r.q_descale.data_ptr()
    bf16 = torch.zeros(1, 4, 1, 8, dtype=torch.bfloat16)
    assert fp8.check_fp8_inputs(bf16, bf16, bf16, None, None, None) is None


def test_check_fp8_inputs_bad_inputs_raise():
    r = _fp8_call()
    args = [r.q, r.k, r.v, r.q_descale, r.k_descale, r.v_descale]

    def call(**changes):
        names = ["q", "k", "v", "q_descale", "k_descale", "v_descale"]
        fp8.check_fp8_inputs(*[changes.get(n, a) for n, a in zip(names, args)])

    with pytest.raises(ValueError, match="k_descale is None; float8_e4m3fn k needs its descale"):
        call(k_descale=None)
    with pytest.raises(TypeError, match="q, k and v all float8_e4m3fn; got q torch.float8_e4m3fn, "
                                        "k torch.bfloat16, v torch.float8_e4m3fn"):
        call(k=r.k.to(torch.bfloat16))
    with pytest.raises(TypeError, match="all float8_e4m3fn"):
        call(v=r.v.to(torch.float8_e5m2))
    with pytest.raises(TypeError, match="v_descale must be float32"):
        call(v_descale=r.v_descale.double())
    with pytest.raises(ValueError, match=r"q_descale must have shape \(1,\) or \(B, heads\) = \(2, 4\)"):
        call(q_descale=r.k_descale)
    bf16 = torch.zeros(1, 4, 1, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="q_descale given for torch.bfloat16 inputs"):
        fp8.check_fp8_inputs(bf16, bf16, bf16, torch.ones(1), None, None)
    with pytest.raises(TypeError, match="must be float8_e4m3fn"):
        fp8.fp8_reference_fwd(bf16, bf16, bf16, None, None, None, softmax_scale=1.0, causal=False)


# --- the float64 emulation ----------------------------------------------------------------------------

def test_emulation_with_exact_p_is_float64_attention_of_the_dequantized_inputs():
    r = _fp8_call()
    deq = [fp8.dequantize_fp8(t, d, dtype=torch.float64) for t, d in
           ((r.q, r.q_descale), (r.k, r.k_descale), (r.v, r.v_descale))]
    ref, ref_lse = reference_fwd(*deq, softmax_scale=0.2, causal=True)
    out, lse = fp8.fp8_reference_fwd(r.q, r.k, r.v, r.q_descale, r.k_descale, r.v_descale, softmax_scale=0.2,
                                     causal=True, quantize_p=False)
    assert out.dtype == torch.float64 and torch.allclose(out, ref, atol=1e-14) and torch.equal(lse, ref_lse)
    out_p, lse_p = fp8.fp8_reference_fwd(r.q, r.k, r.v, r.q_descale, r.k_descale, r.v_descale, softmax_scale=0.2,
                                         causal=True)
    assert torch.allclose(lse_p, ref_lse, atol=1e-13)
    assert 0 < (out_p - ref).abs().max() < 0.1 * ref.abs().max()


@pytest.mark.parametrize("block_n", [None, 1, 16, 128])
def test_p_quantization_matches_a_blockwise_loop(block_n):
    """The vectorized emulation against a plain online-softmax loop over key blocks."""
    q, k, v = randn(1, 12, 2, 8, seed=15) * 2, randn(1, 20, 1, 8, seed=16) * 2, randn(1, 20, 1, 8, seed=17)
    out, _ = fp8.attention_p_fp8(q, k, v, softmax_scale=0.5, causal=False, block_n=block_n)
    block = 20 if block_n is None else min(block_n, 20)
    scores = torch.einsum("bqhd,bkd->bhqk", q, k[:, :, 0]) * 0.5
    m = torch.full(scores.shape[:-1], float("-inf"), dtype=torch.float64)
    acc, row_sum = torch.zeros(1, 2, 12, 8, dtype=torch.float64), torch.zeros(scores.shape[:-1], dtype=torch.float64)
    for start in range(0, 20, block):
        s = scores[..., start:start + block]
        m_new = torch.maximum(m, s.amax(-1))
        p = 256 * torch.exp(s - m_new[..., None])
        rescale = torch.exp(m - m_new)
        row_sum = row_sum * rescale + p.sum(-1)
        p8 = p.to(torch.float8_e4m3fn).double()
        acc = acc * rescale[..., None] + p8 @ v[:, start:start + block, 0][:, None]
        m = m_new
    assert torch.allclose(out, (acc / row_sum[..., None]).permute(0, 2, 1, 3), atol=1e-12)


def test_incoherent_processing_lowers_the_error_on_outliers():
    """The FA3 paper's outlier inputs, D = 128, 4 heads x 1024 tokens: the rotation lowers the RMSE to
    about 0.6x (0.56-0.62x over three draws at this size; 0.60-0.71x at half of it); asserted below 0.8x."""
    q, k, v = (outliers((1, 1024, 4, 128), seed) for seed in (20, 21, 22))
    opts = {"softmax_scale": 128 ** -0.5, "causal": False}
    truth, _ = reference_fwd(q.double(), k.double(), v.double(), **opts)
    errors = {}
    for incoherent in (False, True):
        r = fp8.quantize_qkv(q, k, v, incoherent=incoherent, seed=0)
        out, _ = fp8.fp8_reference_fwd(r.q, r.k, r.v, r.q_descale, r.k_descale, r.v_descale, **opts, block_n=128)
        errors[incoherent] = (out - truth).pow(2).mean().sqrt().item()
    assert errors[True] < 0.8 * errors[False]
    assert errors[True] < 0.015  # the paper's 9.1e-3 is at block scales; here per tensor


# --- V in the kernel's layout, and flash_fwd on FP8 inputs (the dequantized path the CPU takes) ----------

def _fp8_v(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(fp8.FP8_DTYPE)


def test_key_order_is_a_permutation_inside_each_group_of_32():
    order = fp8.key_order(70)
    assert order.numel() == 96 and sorted(order.tolist()) == list(range(96))
    assert all(order[g * 32:(g + 1) * 32].div(32, rounding_mode="floor").eq(g).all() for g in range(3))
    assert torch.equal(order[fp8._key_positions(70)], torch.arange(96))
    assert order[:8].tolist() == [0, 1, 8, 9, 2, 3, 10, 11]  # thread 0 of a quad: keys 0-1 and 8-9 first


@pytest.mark.parametrize("seq", [1, 31, 32, 77, 128])
def test_kmajor_v_round_trip_and_padding(seq):
    v = _fp8_v((2, seq, 3, 16), seed=seq)
    kv = fp8.kmajor_v(v)
    padded = -(-seq // 32) * 32
    assert kv.storage.shape == (2, 3, 16, padded) and kv.storage.is_contiguous() and kv.shape == v.shape
    assert torch.equal(kv.to_bshd().view(torch.uint8), v.view(torch.uint8))
    stored_keys = fp8.key_order(seq)
    assert (kv.storage.view(torch.uint8)[..., stored_keys >= seq] == 0).all()  # the padding reads as +0
    assert fp8.kmajor_v(kv) is kv


@pytest.mark.parametrize("rows", [slice(0, 64), slice(32, 100), slice(64, 100), slice(0, 40), slice(8, 50)])
def test_kmajor_keys_match_the_slice_and_are_views_on_group_boundaries(rows):
    v = _fp8_v((1, 100, 2, 16), seed=3)
    kv = fp8.kmajor_v(v)
    part = kv.keys(rows)
    assert torch.equal(part.to_bshd().view(torch.uint8), v[:, rows].view(torch.uint8))
    assert (part.storage.untyped_storage().data_ptr() == kv.storage.untyped_storage().data_ptr()) == (rows.start % 32 == 0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kmajor", [False, True])
def test_flash_fwd_fp8_off_hopper_is_attention_of_the_dequantized_inputs(monkeypatch, causal, kmajor):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from fa3dist.kernels.triton_fwd import flash_fwd

    gen = torch.Generator().manual_seed(7)
    q = torch.randn(1, 40, 4, 32, generator=gen)
    k, v = (torch.randn(1, 40, 2, 32, generator=gen) for _ in range(2))
    x = fp8.quantize_qkv(q, k, v, granularity="head", incoherent=True)
    opts = dict(softmax_scale=0.2, causal=causal, q_descale=x.q_descale, k_descale=x.k_descale, v_descale=x.v_descale)
    out, lse = flash_fwd(x.q, x.k, fp8.kmajor_v(x.v) if kmajor else x.v, **opts)
    ref_out, ref_lse = fp8.fp8_reference_fwd(x.q, x.k, x.v, x.q_descale, x.k_descale, x.v_descale, softmax_scale=0.2,
                                             causal=causal, quantize_p=False)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert ((out.double() - ref_out).norm() / ref_out.norm()).item() < 5e-3  # bf16 output rounding
    assert (lse.double() - ref_lse).abs().max().item() < 1e-4


def test_flash_fwd_fp8_bad_inputs_raise(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from fa3dist.kernels.triton_fwd import flash_fwd

    q, k, v = (_fp8_v((1, 16, 2, 32), seed=i) for i in range(3))
    one = torch.ones(1)
    with pytest.raises(ValueError, match="needs its descale"):
        flash_fwd(q, k, v, softmax_scale=0.1, causal=False, q_descale=one, k_descale=one)
    with pytest.raises(TypeError, match="all float8_e4m3fn"):
        flash_fwd(q, k, v.float(), softmax_scale=0.1, causal=False, q_descale=one, k_descale=one, v_descale=one)
    with pytest.raises(ValueError, match="descale factors go"):
        flash_fwd(q.float(), k.float(), v.float(), softmax_scale=0.1, causal=False, q_descale=one)
    with pytest.raises(ValueError, match="must match k"):
        flash_fwd(q, k, fp8.kmajor_v(v[:, :8]), softmax_scale=0.1, causal=False, q_descale=one, k_descale=one,
                  v_descale=one)
    with pytest.raises(ValueError, match="bfloat16 or float32"):
        flash_fwd(q, k, v, softmax_scale=0.1, causal=False, q_descale=one, k_descale=one, v_descale=one,
                  out=torch.zeros(q.shape, dtype=torch.float16), lse=torch.zeros(1, 2, 16))

