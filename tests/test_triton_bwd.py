"""The Triton attention backward against float64 references, in float32.

Without CUDA, tests/conftest.py sets TRITON_INTERPRET=1 before Triton is imported, so the kernels run
in the interpreter on CPU tensors; with CUDA the same tests run compiled on the GPU.
"""

from __future__ import annotations

import logging

import math

import pytest
import torch

from fa3dist.kernels import triton_bwd
from fa3dist.kernels.autotune import relative_error
from fa3dist.kernels.common import INTERPRET
from fa3dist.kernels.reference import reference_bwd, reference_fwd
from fa3dist.kernels.triton_bwd import BWD_CONFIGS, SMALL_CONFIG, candidate_configs, flash_bwd, flash_bwd_config

DEVICE = "cpu" if INTERPRET else "cuda"
# triton 3.6's interpreter turns a 1-element array into a loop bound this way; not our code.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
TOL = 1e-5
# The interpreter has no descriptor reductions, so "tma_reduce" runs only compiled.
MODES = ("atomic", "separate") if INTERPRET else triton_bwd.DQ_MODES


def _randn(*shape: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(DEVICE)


def _make(batch: int, seq_q: int, seq_k: int, heads: int, kv_heads: int, head_dim: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = _randn(batch, seq_q, heads, head_dim, gen=gen)
    k = _randn(batch, seq_k, kv_heads, head_dim, gen=gen)
    v = _randn(batch, seq_k, kv_heads, head_dim, gen=gen)
    do = _randn(batch, seq_q, heads, head_dim, gen=gen)
    return q, k, v, do


def _fwd64(q, k, v, scale, causal):
    """out (float32) and lse (float32) from the float64 reference forward."""
    out, lse = reference_fwd(q.double(), k.double(), v.double(), softmax_scale=scale, causal=causal)
    return out.float(), lse.float()


def _ref64(do, q, k, v, out, lse, scale, causal):
    return reference_bwd(do.double(), q.double(), k.double(), v.double(), out.double(), lse.double(),
                         softmax_scale=scale, causal=causal)


def _assert_close(got, ref, tol=TOL):
    for name, g, r in zip(("dq", "dk", "dv"), got, ref):
        assert g.shape == r.shape, name
        err = relative_error(g, r)
        assert err < tol, f"{name}: relative error {err:.3e}"


CASES = [  # batch, seq_q, seq_k, heads, kv_heads, head_dim, causal, softmax_scale
    pytest.param(2, 37, 37, 4, 2, 40, True, None, id="gqa-causal-d40-s37-b2"),
    pytest.param(1, 50, 37, 2, 2, 64, False, 0.37, id="sq-ne-sk-d64"),
    pytest.param(1, 37, 50, 4, 1, 72, False, None, id="mqa-d72-sk50"),
    pytest.param(1, 50, 50, 4, 1, 72, True, 0.2, id="mqa-causal-d72-s50"),
    pytest.param(1, 64, 64, 2, 2, 64, True, None, id="causal-even-d64"),
    pytest.param(1, 20, 19, 2, 1, 256, False, None, id="d256"),
    pytest.param(2, 33, 33, 2, 2, 8, True, 1.5, id="causal-d8"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("batch", "seq_q", "seq_k", "heads", "kv_heads", "head_dim", "causal", "scale"), CASES)
def test_matches_float64_reference(batch, seq_q, seq_k, heads, kv_heads, head_dim, causal, scale, mode):
    q, k, v, do = _make(batch, seq_q, seq_k, heads, kv_heads, head_dim, seed=seq_q + head_dim)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    out, lse = _fwd64(q, k, v, scale, causal)
    got = flash_bwd_config(do, q, k, v, out, lse, softmax_scale=scale, causal=causal,
                           config=dict(SMALL_CONFIG, dq=mode))
    _assert_close(got, _ref64(do, q, k, v, out, lse, scale, causal))


def test_default_path_matches_autograd():
    """flash_bwd against torch.autograd on plain float64 softmax(QK^T * scale) V with repeated K/V."""
    q, k, v, do = _make(2, 45, 45, 4, 2, 40, seed=7)
    scale, causal = 0.29, True
    out, lse = _fwd64(q, k, v, scale, causal)
    dq, dk, dv = flash_bwd(do, q, k, v, out, lse, softmax_scale=scale, causal=causal)
    for t in (dq, dk, dv):
        assert t.is_contiguous() and t.dtype == torch.float32

    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    kr, vr = (t.repeat_interleave(2, dim=2).transpose(1, 2) for t in (k64, v64))
    scores = q64.transpose(1, 2) @ kr.transpose(-1, -2) * scale
    scores = scores.masked_fill(torch.ones(45, 45, dtype=torch.bool, device=DEVICE).triu(1), float("-inf"))
    o = (scores.softmax(-1) @ vr).transpose(1, 2)
    ref = torch.autograd.grad(o, (q64, k64, v64), do.double())
    _assert_close((dq, dk, dv), ref)


def test_deterministic_uses_no_atomics_and_repeats_its_bits(caplog):
    """deterministic=True: the dQ kernel's way (no atomic adds in a run-dependent order), same bits twice."""
    q, k, v, do = _make(1, 70, 70, 4, 2, 32, seed=3)
    out, lse = _fwd64(q, k, v, 0.2, True)
    with caplog.at_level(logging.DEBUG, logger="fa3dist.kernels"):
        first = flash_bwd(do, q, k, v, out, lse, softmax_scale=0.2, causal=True, deterministic=True)
    assert any("deterministic=True" in r.getMessage() and "'dq': 'separate'" in r.getMessage() for r in caplog.records)
    again = flash_bwd(do, q, k, v, out, lse, softmax_scale=0.2, causal=True, deterministic=True)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    _assert_close(first, _ref64(do, q, k, v, out, lse, 0.2, True))
    with pytest.raises(TypeError, match="deterministic must be a bool"):
        flash_bwd(do, q, k, v, out, lse, softmax_scale=0.2, causal=True, deterministic=1)


@pytest.mark.parametrize("mode", MODES)
def test_external_out_lse_split_keys(mode):
    """Each key half with the full out/lse gives that half's dk/dv; the halves' dq sum to the full dq."""
    q, k, v, do = _make(2, 41, 50, 4, 2, 40, seed=3)
    scale, half = 0.31, 25
    out, lse = _fwd64(q, k, v, scale, False)
    full = _ref64(do, q, k, v, out, lse, scale, False)
    cfg = dict(SMALL_CONFIG, dq=mode)
    parts = [flash_bwd_config(do, q, k[:, sl], v[:, sl], out, lse, softmax_scale=scale, causal=False, config=cfg)
             for sl in (slice(0, half), slice(half, None))]
    assert relative_error(parts[0][0] + parts[1][0], full[0]) < TOL
    for i in (1, 2):
        assert relative_error(torch.cat([parts[0][i], parts[1][i]], dim=1), full[i]) < TOL


@pytest.mark.parametrize("mode", MODES)
def test_rows_with_minus_inf_lse_contribute_nothing(mode):
    q, k, v, do = _make(1, 30, 30, 2, 1, 16, seed=5)
    scale = 0.25
    out, lse = _fwd64(q, k, v, scale, False)
    dead = torch.zeros(30, dtype=torch.bool, device=DEVICE)
    dead[[0, 7, 29]] = True
    lse[:, :, dead] = float("-inf")
    got = flash_bwd_config(do, q, k, v, out, lse, softmax_scale=scale, causal=False,
                           config=dict(SMALL_CONFIG, dq=mode))
    # Same as a reference in which those rows carry no gradient at all.
    live = (~dead).float()[None, :, None, None]
    ref = _ref64(do * live, q, k, v, out * live, lse.nan_to_num(neginf=0.0), scale, False)
    _assert_close(got, ref)
    assert got[0][:, dead].abs().max() == 0


# exp2 overflows where the result is masked afterwards, and (mode "separate") in padded key rows
# whose dK/dV rows are never stored; the interpreter's numpy reports both.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("mode", MODES)
def test_very_negative_scores_with_partial_key_block(mode):
    """lse << 0: the zero-padded keys past Sk would give exp2(-lse2) = inf; they must stay masked."""
    gen = torch.Generator().manual_seed(9)
    batch, seq_q, seq_k, heads, head_dim = 1, 20, 37, 2, 16
    direction = torch.nn.functional.normalize(_randn(head_dim, gen=gen), dim=0)
    q = 10.0 * direction + 0.1 * _randn(batch, seq_q, heads, head_dim, gen=gen)
    k = -10.0 * direction + 0.1 * _randn(batch, seq_k, 1, head_dim, gen=gen)
    v, do = _randn(batch, seq_k, 1, head_dim, gen=gen), _randn(batch, seq_q, heads, head_dim, gen=gen)
    out, lse = _fwd64(q, k, v, 1.0, False)
    assert lse.max() < -90
    got = flash_bwd_config(do, q, k, v, out, lse, softmax_scale=1.0, causal=False,
                           config=dict(SMALL_CONFIG, dq=mode))
    # |S| ~ 100 costs fp32 precision (~2e-4 here); the point is no inf/NaN from the padded keys.
    _assert_close(got, _ref64(do, q, k, v, out, lse, 1.0, False), tol=1e-3)


@pytest.mark.parametrize("mode", MODES)
def test_non_contiguous_views(mode):
    """Views with last-dim stride 1 (slices, a packed K/V buffer, an lse slice, a misaligned base)."""
    gen = torch.Generator().manual_seed(11)
    batch, seq, heads, kv_heads, head_dim, half = 2, 40, 4, 2, 24, 16
    q_big = _randn(batch, seq + half, heads, head_dim, gen=gen)
    kv = _randn(batch, seq, 2, kv_heads, head_dim, gen=gen)
    flat = _randn(batch * seq * heads * head_dim + 1, gen=gen)
    q, k, v = q_big[:, half:], kv[:, :, 0], kv[:, :, 1]
    do = flat[1:].view(batch, seq, heads, head_dim)  # base not 16-byte aligned: must be copied
    scale = 0.4
    out, lse = _fwd64(q, k, v, scale, True)
    lse_big = torch.cat([_randn(batch, heads, half, gen=gen), lse], dim=2)
    out_big = torch.cat([_randn(batch, half, heads, head_dim, gen=gen), out], dim=1)
    got = flash_bwd_config(do, q, k, v, out_big[:, half:], lse_big[..., half:], softmax_scale=scale, causal=True,
                           config=dict(SMALL_CONFIG, dq=mode))
    assert all(t.is_contiguous() for t in got)
    _assert_close(got, _ref64(do, q, k, v, out, lse, scale, True))


@pytest.mark.parametrize(("seq_q", "seq_k"), [(0, 20), (20, 0), (0, 0)])
def test_empty_sequences_give_zero_gradients(seq_q, seq_k):
    q, k, v, do = _make(1, seq_q, seq_k, 2, 1, 16)
    out, lse = _fwd64(q, k, v, 0.3, False)
    dq, dk, dv = flash_bwd(do, q, k, v, out, lse, softmax_scale=0.3, causal=False)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert all(t.abs().sum() == 0 for t in (dq, dk, dv))


def test_lse_float64_accepted():
    q, k, v, do = _make(1, 20, 20, 2, 2, 16, seed=2)
    out, lse = _fwd64(q, k, v, 0.3, False)
    got = flash_bwd(do, q, k, v, out, lse.double(), softmax_scale=0.3, causal=False)
    _assert_close(got, _ref64(do, q, k, v, out, lse, 0.3, False))


def _valid():
    q, k, v, do = _make(1, 16, 16, 2, 1, 16, seed=1)
    out, lse = _fwd64(q, k, v, 0.25, False)
    return {"do": do, "q": q, "k": k, "v": v, "out": out, "lse": lse}


def _qkv_do_out(head_dim: int) -> dict:
    return {name: torch.randn(1, 16, heads, head_dim, device=DEVICE)
            for name, heads in (("q", 2), ("do", 2), ("out", 2), ("k", 1), ("v", 1))}


@pytest.mark.parametrize(("change", "error"), [
    (lambda: {"lse": torch.zeros(1, 2, 15, device=DEVICE)}, ValueError),
    (lambda: {"lse": torch.zeros(1, 16, 2, device=DEVICE)}, ValueError),
    (lambda: {"lse": torch.zeros(1, 2, 16, dtype=torch.float16, device=DEVICE)}, TypeError),
    (lambda: {"do": torch.randn(1, 16, 2, 8, device=DEVICE)}, ValueError),
    (lambda: {"do": torch.randn(1, 16, 2, 16, dtype=torch.float64, device=DEVICE)}, TypeError),
    (lambda: {"out": torch.randn(1, 15, 2, 16, device=DEVICE)}, ValueError),
    (lambda: {"q": torch.randn(1, 16, 3, 16, device=DEVICE)}, ValueError),
    (lambda: _qkv_do_out(12), ValueError),
    (lambda: _qkv_do_out(264), ValueError),
    (lambda: {"q": torch.randn(1, 16, 2, 16, dtype=torch.float64, device=DEVICE)}, TypeError),
    (lambda: {"k": torch.randn(1, 17, 1, 16, device=DEVICE)}, ValueError),
    (lambda: {"lse": "not a tensor"}, TypeError),
], ids=["lse-short", "lse-transposed", "lse-fp16", "do-shape", "do-dtype", "out-shape", "heads", "d12", "d264",
        "q-fp64", "k-len", "lse-type"])
def test_bad_inputs_raise(change, error):
    args = {**_valid(), **change()}
    with pytest.raises(error):
        flash_bwd(args["do"], args["q"], args["k"], args["v"], args["out"], args["lse"],
                  softmax_scale=0.25, causal=False)


def test_causal_needs_equal_lengths():
    q, k, v, do = _make(1, 16, 20, 2, 1, 16, seed=4)
    out, lse = _fwd64(q, k, v, 0.25, False)
    with pytest.raises(ValueError, match="causal"):
        flash_bwd(do, q, k, v, out, lse, softmax_scale=0.25, causal=True)


@pytest.mark.parametrize(("scale", "error"), [(-1.0, ValueError), (0.0, ValueError), (math.inf, ValueError),
                                              (None, TypeError), (True, TypeError), ("0.5", TypeError)])
def test_bad_softmax_scale_raises(scale, error):
    args = _valid()
    with pytest.raises(error):
        flash_bwd(args["do"], args["q"], args["k"], args["v"], args["out"], args["lse"],
                  softmax_scale=scale, causal=False)


BAD_CONFIGS = [{"BLOCK_N": 48}, {"BLOCK_M": 8}, {"BLOCK_N": 256}, {"BLOCK_N": 16, "BLOCK_M": 32}, {"dq": "nope"}]


@pytest.mark.parametrize("change", BAD_CONFIGS + [{"dq": "tma_reduce"}] * INTERPRET)
def test_bad_config_raises(change):
    args = _valid()
    with pytest.raises(ValueError):
        flash_bwd_config(args["do"], args["q"], args["k"], args["v"], args["out"], args["lse"],
                         softmax_scale=0.25, causal=False, config={**SMALL_CONFIG, **change})


@pytest.mark.parametrize(("head_dim", "block_d"), [(8, 64), (64, 64), (72, 128), (128, 128), (136, 256), (256, 256)])
def test_candidate_configs(head_dim, block_d):
    configs = candidate_configs(head_dim, torch.bfloat16)
    assert configs is BWD_CONFIGS[block_d]
    assert configs[0]["dq"] == "separate"
    assert {"separate", "tma_reduce"} <= {c["dq"] for c in configs} <= set(triton_bwd.DQ_MODES)
    for cfg in configs:
        triton_bwd._check_config({**cfg, "dq": "atomic"})  # tma_reduce is refused in the interpreter


def _filled(*shape: int, seed: int) -> torch.Tensor:
    """A float32 buffer holding random values: accumulation must add to them, not overwrite."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def _bwd_into(block: tuple, scale: float, causal: bool, cfg: dict, dq, dk, dv, accumulate: bool, split: bool):
    """One backward call into the buffers, or (``split``) two asking for subsets: dK/dV, then dQ."""
    opts = dict(softmax_scale=scale, causal=causal, config=cfg, accumulate=accumulate)
    if not split:
        got = flash_bwd_config(*block, dq=dq, dk=dk, dv=dv, **opts)
        assert got[0] is dq and got[1] is dk and got[2] is dv
        return
    assert flash_bwd_config(*block, dk=dk, dv=dv, **opts) == (None, dk, dv)
    assert flash_bwd_config(*block, dq=dq, **opts) == (dq, None, None)


@pytest.mark.parametrize("split", [False, True], ids=["one-call", "split"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 2), (3, 1)], ids=["gqa", "mqa"])
def test_accumulate_key_halves_into_views(heads, kv_heads, mode, split):
    """Two key halves (Sq != Sk) accumulated into row-slice views of larger buffers (dk/dv a stacked
    pair, as the ring's) equal what the buffers held plus the full float64 gradients."""
    batch, seq_q, seq_k, head_dim, half, pad = 2, 29, 41, 24, 18, 5
    q, k, v, do = _make(batch, seq_q, seq_k, heads, kv_heads, head_dim, seed=heads + 20)
    scale = 0.3
    out, lse = _fwd64(q, k, v, scale, False)
    full = _ref64(do, q, k, v, out, lse, scale, False)
    dq_all = _filled(batch, seq_q + pad, heads, head_dim, seed=1)
    dkv_all = _filled(2, batch, seq_k + pad, kv_heads, head_dim, seed=2)
    before = (dq_all.clone(), dkv_all.clone())
    dq, dk, dv = dq_all[:, pad:], dkv_all[0][:, pad:], dkv_all[1][:, pad:]
    for keys in (slice(0, half), slice(half, None)):
        _bwd_into((do, q, k[:, keys], v[:, keys], out, lse), scale, False, dict(SMALL_CONFIG, dq=mode),
                  dq, dk[:, keys], dv[:, keys], True, split)
    expected = (before[0][:, pad:] + full[0], before[1][0][:, pad:] + full[1], before[1][1][:, pad:] + full[2])
    _assert_close((dq, dk, dv), expected)
    assert torch.equal(dq_all[:, :pad], before[0][:, :pad]) and torch.equal(dkv_all[:, :, :pad], before[1][:, :, :pad])


@pytest.mark.parametrize("split", [False, True], ids=["one-call", "split"])
@pytest.mark.parametrize("mode", MODES)
def test_accumulate_causal_blocks_as_the_ring_does(mode, split):
    """Causal attention over 2n tokens as the ring splits it: two causal diagonal blocks and the
    non-causal block of the second query half against the first key half: the diagonal blocks
    write into NaN-filled buffers, the last block adds."""
    batch, n, heads, kv_heads, head_dim = 1, 21, 4, 1, 16
    q, k, v, do = _make(batch, 2 * n, 2 * n, heads, kv_heads, head_dim, seed=31)
    scale = 0.35
    out, lse = _fwd64(q, k, v, scale, True)
    full = _ref64(do, q, k, v, out, lse, scale, True)
    dq = torch.full(q.shape, math.nan, device=DEVICE)  # every row is written before it is added to
    dkv = torch.full((2, *k.shape), math.nan, device=DEVICE)
    cfg = dict(SMALL_CONFIG, dq=mode)
    first, second = slice(0, n), slice(n, 2 * n)
    for rows, keys, causal, accumulate in ((first, first, True, False), (second, second, True, False),
                                           (second, first, False, True)):
        block = (do[:, rows], q[:, rows], k[:, keys], v[:, keys], out[:, rows], lse[:, :, rows])
        _bwd_into(block, scale, causal, cfg, dq[:, rows], dkv[0][:, keys], dkv[1][:, keys], accumulate, split)
    _assert_close((dq, dkv[0], dkv[1]), full)


@pytest.mark.parametrize("mode", MODES)
def test_buffers_without_accumulate_are_overwritten(mode):
    q, k, v, do = _make(1, 33, 33, 2, 1, 40, seed=12)
    out, lse = _fwd64(q, k, v, 0.3, True)
    buffers = [_filled(*t.shape, seed=i) for i, t in enumerate((q, k, v))]
    got = flash_bwd_config(do, q, k, v, out, lse, softmax_scale=0.3, causal=True, config=dict(SMALL_CONFIG, dq=mode),
                           dq=buffers[0], dk=buffers[1], dv=buffers[2])
    assert all(g is b for g, b in zip(got, buffers))
    _assert_close(got, _ref64(do, q, k, v, out, lse, 0.3, True))


def test_default_path_with_buffers():
    """flash_bwd (not the explicit-config entry) takes the buffers too."""
    q, k, v, do = _make(1, 20, 20, 2, 2, 16, seed=13)
    out, lse = _fwd64(q, k, v, 0.25, False)
    start = [_filled(*t.shape, seed=i) for i, t in enumerate((q, k, v))]
    buffers = [t.clone() for t in start]
    got = flash_bwd(do, q, k, v, out, lse, softmax_scale=0.25, causal=False, dq=buffers[0], dk=buffers[1],
                    dv=buffers[2], accumulate=True)
    ref = _ref64(do, q, k, v, out, lse, 0.25, False)
    _assert_close(got, [s + r for s, r in zip(start, ref)])


@pytest.mark.parametrize(("seq_q", "seq_k"), [(0, 20), (20, 0)])
def test_empty_sequences_with_buffers(seq_q, seq_k):
    q, k, v, do = _make(1, seq_q, seq_k, 2, 1, 16)
    out, lse = _fwd64(q, k, v, 0.3, False)
    start = [_filled(*t.shape, seed=i) for i, t in enumerate((q, k, v))]
    kept = flash_bwd(do, q, k, v, out, lse, softmax_scale=0.3, causal=False, dq=start[0].clone(),
                     dk=start[1].clone(), dv=start[2].clone(), accumulate=True)
    assert all(torch.equal(a, b) for a, b in zip(kept, start))
    zeroed = flash_bwd(do, q, k, v, out, lse, softmax_scale=0.3, causal=False, dq=start[0].clone(),
                       dk=start[1].clone(), dv=start[2].clone())
    assert all(t.abs().sum() == 0 for t in zeroed)


def _buffers(**change) -> dict:
    args = _valid()
    grads = {name: torch.zeros(args[like].shape, device=DEVICE) for name, like in (("dq", "q"), ("dk", "k"), ("dv", "v"))}
    return {**grads, **change}


@pytest.mark.parametrize(("buffers", "error", "match"), [
    (lambda: {"accumulate": True}, ValueError, "needs gradient buffers"),
    (lambda: _buffers(accumulate=1), TypeError, "accumulate must be a bool"),
    (lambda: _buffers(dv=None), ValueError, "dk and dv must be given together"),
    (lambda: _buffers(dq=None, dk=None), ValueError, "dk and dv must be given together"),
    (lambda: _buffers(dk="buffer"), TypeError, "dk must be a torch.Tensor"),
    (lambda: _buffers(dq=torch.zeros(1, 16, 2, 16, device=DEVICE, dtype=torch.float64)), TypeError, "dq must be float32"),
    (lambda: _buffers(dk=torch.zeros(1, 16, 1, 16, device=DEVICE, dtype=torch.bfloat16)), TypeError, "float32"),
    (lambda: _buffers(dq=torch.zeros(1, 15, 2, 16, device=DEVICE)), ValueError, "dq must have shape"),
    (lambda: _buffers(dv=torch.zeros(1, 16, 2, 16, device=DEVICE)), ValueError, "dv must have shape"),
    (lambda: _buffers(dk=torch.zeros(1, 16, 1, 16, device="meta")), ValueError, "dk must have shape .* on"),
    (lambda: _buffers(dq=torch.zeros(1, 16, 16, 2, device=DEVICE).transpose(2, 3)), ValueError, "TMA"),
    (lambda: _buffers(dv=torch.zeros(1 * 16 * 16 + 1, device=DEVICE)[1:].view(1, 16, 1, 16)), ValueError, "TMA"),
], ids=["accumulate-alone", "accumulate-int", "dk-without-dv", "dv-alone", "not-tensor", "float64", "bf16", "dq-shape",
        "dv-shape", "device", "last-stride", "misaligned"])
def test_bad_buffers_raise(buffers, error, match):
    args = _valid()
    with pytest.raises(error, match=match):
        flash_bwd(args["do"], args["q"], args["k"], args["v"], args["out"], args["lse"], softmax_scale=0.25,
                  causal=False, **buffers())
