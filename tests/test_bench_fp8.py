"""The FP8 plumbing of ``fa3dist bench kernel`` on the CPU: the sampled-rows RMSE against the full float64
reference, the GEMM ceiling and PyTorch probe plumbing, the config, the Markdown and the rows of a run
(our kernels in Triton's interpreter, the timings and the cuDNN peer faked)."""

from __future__ import annotations

import math

import pytest
import torch

from fa3dist.bench import fp8 as bench_fp8
from fa3dist.kernels.reference import reference_fwd


def randn(*shape, seed):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# --- sampled rows against the full reference ---------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
@pytest.mark.parametrize("seq,rows", [(200, 128), (96, 128), (64, 16)])
def test_sampled_reference_is_the_full_reference_on_the_last_rows(causal, heads, kv_heads, seq, rows):
    q, k, v = randn(2, seq, heads, 32, seed=1), randn(2, seq, kv_heads, 32, seed=2), randn(2, seq, kv_heads, 32, seed=3)
    full, _ = reference_fwd(q, k, v, softmax_scale=0.3, causal=causal)
    got = bench_fp8.sampled_reference(q, k, v, softmax_scale=0.3, causal=causal, rows=rows)
    r = min(rows, seq)
    assert got.shape == (2, r, heads, 32) and got.dtype == torch.float64
    assert torch.allclose(got, full[:, seq - r:], rtol=0, atol=1e-12)


def test_sampled_reference_reads_the_causal_offset():
    """The last rows of a causal problem see (nearly) every key; the first sampled row does not see the
    last keys: change only those and its output must not move, while the last row's does."""
    q, k, v = randn(1, 300, 2, 16, seed=4), randn(1, 300, 2, 16, seed=5), randn(1, 300, 2, 16, seed=6)
    before = bench_fp8.sampled_reference(q, k, v, softmax_scale=0.25, causal=True, rows=128)
    v2 = v.clone()
    v2[:, 250:] += 10.0  # keys 250.. are hidden from query 172 (the first of the sample) but not from 299
    after = bench_fp8.sampled_reference(q, k, v2, softmax_scale=0.25, causal=True, rows=128)
    assert torch.equal(after[:, 0], before[:, 0])
    assert (after[:, -1] - before[:, -1]).abs().max() > 0.1


@pytest.mark.parametrize("causal", [False, True])
def test_sampled_rmse_matches_the_rmse_of_the_full_output_on_those_rows(causal):
    q, k, v = (randn(2, 160, 4, 32, seed=s).to(torch.bfloat16) for s in (7, 8, 9))
    full, _ = reference_fwd(q.double(), k.double(), v.double(), softmax_scale=32 ** -0.5, causal=causal)
    noise = 1e-2 * randn(*full.shape, seed=10)
    out = (full + noise).to(torch.bfloat16)
    want = math.sqrt(((out.double() - full)[:, -128:] ** 2).mean().item())
    got = bench_fp8.sampled_rmse(out, q, k, v, softmax_scale=32 ** -0.5, causal=causal)
    assert got == pytest.approx(want, rel=1e-9)
    assert 5e-3 < got < 2e-2  # the noise's scale, not the bf16 rounding alone
    exact = bench_fp8.sampled_rmse(full, q, k, v, softmax_scale=32 ** -0.5, causal=causal)
    assert exact < 1e-12


def test_rmse_is_inf_for_a_non_finite_output():
    truth = torch.zeros(1, 4, 2, 8, dtype=torch.float64)
    out = torch.zeros(1, 10, 2, 8)
    assert bench_fp8.rmse_against(out, truth) == 0.0
    out[0, 9, 1, 3] = float("nan")
    assert bench_fp8.rmse_against(out, truth) == float("inf")
    out[0, 9, 1, 3] = 0.0
    out[0, 0, 0, 0] = float("nan")  # outside the sampled rows
    assert bench_fp8.rmse_against(out, truth) == 0.0


# --- ceiling, probe, inputs ------------------------------------------------------------------------------

def test_fp8_gemm_tflops_times_scaled_mm_and_counts_2n3(monkeypatch):
    import fa3dist.bench.common as common

    called = []

    def fake_time_ms(fn, *, warmup_ms, rep_ms):
        out = fn()
        called.append((out.dtype, tuple(out.shape), warmup_ms, rep_ms))
        return 2.0

    monkeypatch.setattr(common, "time_ms", fake_time_ms)
    assert bench_fp8.fp8_gemm_tflops(64, warmup_ms=3, rep_ms=4, device="cpu") == 2 * 64 ** 3 / 2.0 / 1e9
    assert called == [(torch.bfloat16, (64, 64), 3, 4)]


def test_the_ceiling_says_why_it_is_missing(monkeypatch):
    def broken(**_):
        raise RuntimeError("no\ncuBLASLt here " + "x" * 500)

    monkeypatch.setattr(bench_fp8, "fp8_gemm_tflops", broken)
    got = bench_fp8.fp8_gemm_ceiling(warmup_ms=1, rep_ms=1, device="cpu")
    assert got["op"] == "torch._scaled_mm e4m3 8192^3 bf16 out" and got["tflops"] is None
    assert got["error"].startswith("RuntimeError: no cuBLASLt here") and len(got["error"]) == 300


def test_probe_records_ran_or_the_error(monkeypatch):
    def fine(x, scale, causal):
        return (lambda: x.q.float()), (lambda out: out)

    def broken(x, scale, causal):
        raise NotImplementedError('"mul_cpu_reduced_float" not implemented for \'Float8_e4m3fn\'')

    monkeypatch.setattr(bench_fp8, "PYTORCH_FP8", {"a": ("ka", "A", fine), "b": ("kb", "B", broken)})
    assert bench_fp8.probe_pytorch_fp8("cpu") == {
        "a": "ran", "b": 'NotImplementedError: "mul_cpu_reduced_float" not implemented for \'Float8_e4m3fn\''}


def test_probe_tries_pytorch_on_this_machine():
    """On the CPU neither entry runs (they are CUDA kernels); each gives its error, not an exception."""
    found = bench_fp8.probe_pytorch_fp8("cpu")
    assert set(found) == {"sdpa-fp8", "sdpa-fp8-quantized"}
    assert all(status != "ran" and ":" in status for status in found.values())


def test_sdpa_fp8_folds_the_descales_in(monkeypatch):
    """The sdpa-fp8 wrapper's arithmetic, with SDPA run on the e4m3 values upcast to float64 (the CPU's
    SDPA takes no fp8): its output must be the attention of the dequantized inputs."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    seen = []

    def upcasting_sdpa(q, k, v, **kwargs):
        seen.append((q.dtype, tuple(q.shape), q.is_contiguous(), kwargs["is_causal"], kwargs["enable_gqa"]))
        return sdpa(q.double(), k.double(), v.double(), **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", upcasting_sdpa)
    q = randn(1, 64, 4, 64, seed=11).to(torch.bfloat16) * 3
    k, v = (randn(1, 64, 2, 64, seed=s).to(torch.bfloat16) * 3 for s in (12, 13))
    x, _ = bench_fp8.quantize_inputs(q, k, v)
    forward, to_bshd = bench_fp8._sdpa_fp8(x, 0.125, True)
    got = to_bshd(forward())
    assert seen == [(torch.float8_e4m3fn, (1, 4, 64, 64), True, True, True)]
    deq = [t.double() * d.double() for t, d in ((x.q, x.q_descale), (x.k, x.k_descale), (x.v, x.v_descale))]
    want, _ = reference_fwd(*deq, softmax_scale=0.125, causal=True)
    assert got.shape == q.shape and torch.allclose(got.double(), want, atol=1e-5)


def test_quantize_inputs_are_per_tensor_incoherent_and_kmajor():
    from fa3dist.kernels import fp8

    q, k, v = (randn(2, 48, 4, 64, seed=s).to(torch.bfloat16) for s in (14, 15, 16))
    x, v8 = bench_fp8.quantize_inputs(q, k, v)
    assert x.granularity == "tensor" and x.incoherent and x.q_descale.shape == (1,)
    assert v8.shape == v.shape and fp8.is_kmajor(v8) and not fp8.is_kmajor(x.v)
    assert torch.equal(v8.float(), x.v.float())
