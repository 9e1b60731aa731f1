"""The Triton attention backward on a GPU at real sizes, in fp16 and bf16.

The oracle is the float64 reference on the GPU, with out/lse from the float32 reference forward on
the same inputs. Each dq/dk/dv error must be within 1.5x of cuDNN's error on the same inputs (or
below 2e-2 where cuDNN refuses the case). All three dQ strategies and every tuning candidate run.
"""

from __future__ import annotations

import math

import pytest
import torch

from fa3dist.kernels.autotune import relative_error
from fa3dist.kernels.common import INTERPRET
from fa3dist.kernels.reference import reference_bwd, reference_fwd
from fa3dist.kernels.sdpa import cudnn_bwd
from fa3dist.kernels.triton_bwd import candidate_configs, flash_bwd, flash_bwd_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET,
                       reason="needs CUDA and the compiled (not interpreted) kernel"),
]

FALLBACK_BOUND = 2e-2  # relative error bound where cuDNN cannot run the case
BATCH, HEADS = 2, 16


def _inputs(seq: int, kv_heads: int, head_dim: int, dtype: torch.dtype, causal: bool, seed: int = 0):
    """Random q, k, v, do and out/lse from the float32 reference forward on the same inputs."""
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float32).to(dtype)

    q, do = randn(BATCH, seq, HEADS, head_dim), randn(BATCH, seq, HEADS, head_dim)
    k, v = randn(BATCH, seq, kv_heads, head_dim), randn(BATCH, seq, kv_heads, head_dim)
    scale = 1.0 / math.sqrt(head_dim)
    out, lse = reference_fwd(q.float(), k.float(), v.float(), softmax_scale=scale, causal=causal)
    return do, q, k, v, out.to(dtype), lse, scale


def _errors(grads, ref) -> list[float]:
    return [relative_error(g, r) for g, r in zip(grads, ref)]


def _bounds(do, q, k, v, out, lse, scale, causal, ref) -> list[float]:
    """1.5x cuDNN's relative errors on the same inputs, or the fallback bound where cuDNN fails."""
    try:
        base = _errors(cudnn_bwd(do, q, k, v, out, lse, softmax_scale=scale, causal=causal), ref)
    except (RuntimeError, ValueError):
        return [FALLBACK_BOUND] * 3
    return [1.5 * e if math.isfinite(e) else FALLBACK_BOUND for e in base]


def _ref64(do, q, k, v, out, lse, scale, causal):
    return reference_bwd(*(t.double() for t in (do, q, k, v, out, lse)), softmax_scale=scale, causal=causal)


def _assert_within(grads, ref, bounds, what: str) -> None:
    for name, err, bound in zip(("dq", "dk", "dv"), _errors(grads, ref), bounds):
        assert err <= bound, f"{what}: {name} relative error {err:.3e} > bound {bound:.3e}"


def _config(head_dim: int, mode: str) -> dict:
    """The first candidate for ``head_dim`` with dQ mode ``mode`` (else the best tile with that mode)."""
    cands = candidate_configs(head_dim, torch.bfloat16)
    return next((c for c in cands if c["dq"] == mode), {**cands[1], "dq": mode})


SHAPES = [pytest.param(1024, 16, torch.bfloat16, id="s1024-mha-bf16"),
          pytest.param(1000, 4, torch.float16, id="s1000-gqa4-fp16")]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [64, 128, 256, 72])
@pytest.mark.parametrize(("seq", "kv_heads", "dtype"), SHAPES)
def test_accuracy_vs_cudnn(seq, kv_heads, dtype, head_dim, causal):
    do, q, k, v, out, lse, scale = _inputs(seq, kv_heads, head_dim, dtype, causal)
    ref = _ref64(do, q, k, v, out, lse, scale, causal)
    bounds = _bounds(do, q, k, v, out, lse, scale, causal, ref)
    got = flash_bwd_config(do, q, k, v, out, lse, softmax_scale=scale, causal=causal,
                           config=_config(head_dim, "tma_reduce"))
    for g, t in zip(got, (q, k, v)):
        assert g.shape == t.shape and g.dtype == t.dtype and g.is_contiguous()
    _assert_within(got, ref, bounds, "tma_reduce")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(("head_dim", "mode"), [(64, "atomic"), (128, "atomic"), (128, "separate"),
                                                (256, "separate"), (72, "separate")])
def test_dq_strategies(head_dim, mode, causal):
    do, q, k, v, out, lse, scale = _inputs(1000, 4, head_dim, torch.bfloat16, causal, seed=1)
    ref = _ref64(do, q, k, v, out, lse, scale, causal)
    got = flash_bwd_config(do, q, k, v, out, lse, softmax_scale=scale, causal=causal, config=_config(head_dim, mode))
    _assert_within(got, ref, _bounds(do, q, k, v, out, lse, scale, causal, ref), mode)


@pytest.mark.parametrize(("head_dim", "causal"), [(64, False), (128, False), (128, True), (256, True)])
def test_every_candidate_config(head_dim, causal):
    """Every tuning candidate compiles, fits and is as accurate as cuDNN (what pick_config relies on)."""
    do, q, k, v, out, lse, scale = _inputs(1000, 4, head_dim, torch.bfloat16, causal, seed=2)
    ref = _ref64(do, q, k, v, out, lse, scale, causal)
    bounds = _bounds(do, q, k, v, out, lse, scale, causal, ref)
    for cfg in candidate_configs(head_dim, torch.bfloat16):
        got = flash_bwd_config(do, q, k, v, out, lse, softmax_scale=scale, causal=causal, config=cfg)
        _assert_within(got, ref, bounds, str(cfg))


def test_autotuned_path(monkeypatch):
    monkeypatch.setenv("FA3DIST_AUTOTUNE", "1")
    do, q, k, v, out, lse, scale = _inputs(1024, 4, 128, torch.bfloat16, True, seed=3)
    ref = _ref64(do, q, k, v, out, lse, scale, True)
    got = flash_bwd(do, q, k, v, out, lse, softmax_scale=scale, causal=True)
    _assert_within(got, ref, _bounds(do, q, k, v, out, lse, scale, True, ref), "autotuned")


@pytest.mark.parametrize("mode", ["tma_reduce", "atomic", "separate"])
def test_external_out_lse_split_keys_bf16(mode):
    """Key halves with the full out/lse: dk/dv slices and the dq sum match the full float64 gradients."""
    do, q, k, v, out, lse, scale = _inputs(1024, 4, 128, torch.bfloat16, False, seed=4)
    full = _ref64(do, q, k, v, out, lse, scale, False)
    halves = (slice(0, 512), slice(512, None))

    def split(bwd, **kwargs):
        parts = [bwd(do, q, k[:, sl], v[:, sl], out, lse, softmax_scale=scale, causal=False, **kwargs)
                 for sl in halves]
        return (parts[0][0].float() + parts[1][0].float(),
                torch.cat([parts[0][1], parts[1][1]], dim=1), torch.cat([parts[0][2], parts[1][2]], dim=1))

    try:
        bounds = [1.5 * e for e in _errors(split(cudnn_bwd), full)]
    except (RuntimeError, ValueError):
        bounds = [FALLBACK_BOUND] * 3
    _assert_within(split(flash_bwd_config, config=_config(128, mode)), full, bounds, f"split {mode}")


def _into_buffers(do, q, k, v, out, lse, scale, halves, split: bool, **kwargs):
    """Gradients of key blocks ``halves`` accumulated in fp32 inside the kernels, dK/dV into views of
    one stacked buffer as the ring's; ``split`` makes two calls per block (dK/dV, dQ)."""
    dq = torch.zeros(q.shape, device="cuda")
    dkv = torch.zeros(2, *k.shape, device="cuda")
    for sl in halves:
        block = (do, q, k[:, sl], v[:, sl], out, lse)
        opts = dict(softmax_scale=scale, causal=False, accumulate=True, **kwargs)
        if split:
            flash_bwd_config(*block, dk=dkv[0][:, sl], dv=dkv[1][:, sl], **opts)
            flash_bwd_config(*block, dq=dq, **opts)
        else:
            got = flash_bwd_config(*block, dq=dq, dk=dkv[0][:, sl], dv=dkv[1][:, sl], **opts)
            assert got[0] is dq
    return dq, dkv[0], dkv[1]


@pytest.mark.parametrize("split", [False, True], ids=["one-call", "split"])
@pytest.mark.parametrize(("head_dim", "mode"), [(128, "tma_reduce"), (128, "atomic"), (128, "separate"),
                                                (64, "separate"), (256, "tma_reduce")])
def test_accumulate_into_fp32_buffers(head_dim, mode, split):
    """bf16 inputs, key halves accumulated into fp32 buffers in the kernels: within 1.1x of one full
    bf16 call's error (issue 12's target for the ring) and within 1.5x of cuDNN on the same split."""
    do, q, k, v, out, lse, scale = _inputs(1024, 4, head_dim, torch.bfloat16, False, seed=5)
    full = _ref64(do, q, k, v, out, lse, scale, False)
    halves = (slice(0, 384), slice(384, None))
    single = flash_bwd_config(do, q, k, v, out, lse, softmax_scale=scale, causal=False,
                              config=_config(head_dim, mode))
    got = _into_buffers(do, q, k, v, out, lse, scale, halves, split, config=_config(head_dim, mode))
    for name, err, base in zip(("dq", "dk", "dv"), _errors(got, full), _errors(single, full)):
        assert err <= 1.1 * base, f"{mode}: {name} accumulated error {err:.3e} > 1.1 x one call's {base:.3e}"
    try:
        parts = [cudnn_bwd(do, q, k[:, sl], v[:, sl], out, lse, softmax_scale=scale, causal=False) for sl in halves]
        split_ref = (parts[0][0].float() + parts[1][0].float(), torch.cat([parts[0][1], parts[1][1]], dim=1),
                     torch.cat([parts[0][2], parts[1][2]], dim=1))
        bounds = [1.5 * e for e in _errors(split_ref, full)]
    except (RuntimeError, ValueError):
        bounds = [FALLBACK_BOUND] * 3
    _assert_within(got, full, bounds, f"accumulated {mode}")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_accumulate_with_tuning_adds_once(causal, monkeypatch, tmp_path):
    """The tuner runs every candidate on copies: the caller's buffers get the gradients exactly once,
    and the choice lands in the on-disk cache."""
    monkeypatch.setenv("FA3DIST_AUTOTUNE", "1")
    monkeypatch.setenv("FA3DIST_CACHE_DIR", str(tmp_path))
    do, q, k, v, out, lse, scale = _inputs(1024, 4, 128, torch.bfloat16, causal, seed=6)
    full = _ref64(do, q, k, v, out, lse, scale, causal)
    gen = torch.Generator(device="cuda").manual_seed(7)
    start = [torch.randn(t.shape, device="cuda", generator=gen) for t in (q, k, v)]
    buffers = [t.clone() for t in start]
    got = flash_bwd(do, q, k, v, out, lse, softmax_scale=scale, causal=causal, dq=buffers[0], dk=buffers[1],
                    dv=buffers[2], accumulate=True)
    assert all(g is b for g, b in zip(got, buffers))
    single = flash_bwd(do, q, k, v, out, lse, softmax_scale=scale, causal=causal)
    added = [b - s for b, s in zip(buffers, start)]
    for name, err, base in zip(("dq", "dk", "dv"), _errors(added, full), _errors(single, full)):
        assert err <= 1.5 * base, f"{name}: accumulated error {err:.3e} against one call's {base:.3e}"
    assert list((tmp_path / "autotune").glob("*.json"))
