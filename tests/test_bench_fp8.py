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
    assert isinstance(v8, fp8.KMajorV) and v8.shape == v.shape
    assert torch.equal(v8.to_bshd().float(), x.v.float())


# --- the config -------------------------------------------------------------------------------------------

def test_config_takes_fp8_in_dtypes_and_extra_cells():
    from fa3dist.bench.kernel import KernelBenchConfig
    from fa3dist.config import load_config

    cfg = load_config(KernelBenchConfig, None, ["dtypes=[bfloat16, fp8]", "head_dims=[128]", "seq_lens=[16384]",
                                                "extra_cells=[[fp8, 64, 4096, true]]"])
    assert cfg.has_fp8() and ("fp8", 64, 4096, True) in cfg.cells() and ("fp8", 128, 16384, False) in cfg.cells()
    assert not load_config(KernelBenchConfig, None, []).has_fp8()


@pytest.mark.parametrize("overrides,match", [
    (["dtypes=[fp16]"], "key 'dtypes' must be one of .*fp8"),
    (["dtypes=[fp8]", "head_dims=[96]"], "power-of-two head dim"),
    (["extra_cells=[[fp8, 96, 4096, false]]"], "power-of-two head dim"),
    (["extra_cells=[[e4m3, 64, 4096, false]]"], "extra_cells"),
    (["dtypes=[fp8]", "passes=[bwd]"], "forward only"),
])
def test_config_rejects_bad_fp8_settings(overrides, match):
    from fa3dist.bench.kernel import KernelBenchConfig
    from fa3dist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=match):
        load_config(KernelBenchConfig, None, overrides)


def test_the_shipped_fp8_config_has_the_cells_of_the_issue():
    from fa3dist.bench.kernel import KernelBenchConfig
    from fa3dist.config import load_config

    cfg = load_config(KernelBenchConfig, "configs/bench_kernel_fp8_h200.yaml")
    shapes = {(d, s, c) for d in (64, 128, 256) for s in (4096, 16384) for c in (False, True)}
    assert sorted(cfg.cells()) == sorted((dtype, *shape) for dtype in ("bfloat16", "fp8") for shape in shapes)
    assert cfg.passes == ["fwd"] and cfg.impls == ["fa3dist", "fa3", "cudnn"]
    assert (cfg.tokens, cfg.model_dim, cfg.kv_group, cfg.warmup_ms, cfg.rep_ms) == (16384, 2048, 1, 10.0, 40.0)
    assert max(s for _, _, s, _ in cfg.cells()) == 16384


# --- the Markdown --------------------------------------------------------------------------------------------

def _row(impl, dtype, d, s, causal, tflops, **extra):
    return {"impl": impl, "dtype": dtype, "pass": "fwd", "D": d, "S": s, "causal": causal, "tflops": tflops, **extra}


META = {"fp8_gemm_ceiling": {"op": "torch._scaled_mm e4m3 8192^3 bf16 out", "tflops": 1253.98},
        "pytorch_fp8_attention": "RuntimeError: No available kernel. Aborting execution.",
        "pytorch_fp8_attention_quantized": "NotImplementedError: Could not run 'aten::_scaled_dot_product_flash"}


def _table(md, heading):
    """The rows of the table under ``heading``, as lists of cells."""
    part = md.split(heading, 1)[1].split("\n## ", 1)[0]
    lines = [line for line in part.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines]


def test_fp8_markdown_ratios_and_missing_peers():
    from fa3dist.bench.kernel import kernel_markdown

    rows = [
        _row("fa3dist", "fp8", 128, 16384, False, 800.0, rmse=2.5e-3, quantize_ms=0.61, ms=2.7),
        _row("fa3dist", "bfloat16", 128, 16384, False, 640.0, rmse=3.1e-4),
        _row("cudnn", "bfloat16", 128, 16384, False, 500.0, rmse=3.0e-4),
        _row("fa3", "bfloat16", 128, 16384, False, 400.0),
        # a cell whose bf16 rows did not run at all, and one where only cuDNN's did
        _row("fa3dist", "fp8", 64, 4096, True, 300.0, rmse=4e-3, quantize_ms=0.2),
        _row("fa3dist", "fp8", 256, 4096, False, 900.0, rmse=3e-3, quantize_ms=0.3),
        _row("cudnn", "bfloat16", 256, 4096, False, 450.0),
        # our fp8 kernel failed here: the cell stays, blank
        _row("fa3dist", "fp8", 256, 16384, True, None, error="boom"),
    ]
    md = kernel_markdown(rows, META)
    table = _table(md, "## fwd, fp8 (TFLOP/s)")
    assert table[0] == ["D", "S", "causal", "fa3dist fp8", "rmse", "quantize ms", "fa3dist bf16", "rmse bf16",
                        "fp8/bf16-ours", "fp8/cudnn (bf16)", "fp8/fa3 (bf16)"]
    body = {tuple(r[:3]): r[3:] for r in table[1:]}
    assert body[("128", "16384", "no")] == ["800", "0.0025", "0.61", "640", "0.00031", "1.25", "1.6", "2"]
    assert body[("64", "4096", "yes")] == ["300", "0.004", "0.2", "", "", "", "", ""]
    assert body[("256", "4096", "no")] == ["900", "0.003", "0.3", "", "", "", "2", ""]
    assert body[("256", "16384", "yes")] == ["", "", "", "", "", "", "", ""]
    assert [r[:3] for r in table[1:]] == [["64", "4096", "yes"], ["128", "16384", "no"], ["256", "4096", "no"],
                                         ["256", "16384", "yes"]]
    notes = md.split("## fwd, fp8 (TFLOP/s)", 1)[1].split("| D |")[0]
    assert "cuBLAS FP8 GEMM (torch._scaled_mm e4m3 8192^3 bf16 out), 1254 TFLOP/s" in notes
    assert "PyTorch FP8 attention here: none ran." in notes
    assert "`F.scaled_dot_product_attention`: RuntimeError: No available kernel" in notes
    # the bf16 table keeps its columns, with our RMSE after them; no fp8 rows in it
    bf16 = _table(md, "## fwd, bfloat16 (TFLOP/s)")
    assert bf16[0] == ["D", "S", "causal", "fa3dist", "fa3", "cudnn", "fa3dist/cudnn", "fa3dist/fa3", "fa3dist rmse"]
    assert bf16[1:] == [["128", "16384", "no", "640", "400", "500", "1.28", "1.6", "0.00031"],
                        ["256", "4096", "no", "", "", "450", "", "", ""]]


def test_fp8_markdown_without_bf16_peers_or_meta_and_with_a_pytorch_fp8_row():
    from fa3dist.bench.kernel import kernel_markdown

    rows = [_row("fa3dist", "fp8", 128, 4096, True, 600.0, rmse=2e-3, quantize_ms=0.1),
            _row("sdpa-fp8", "fp8", 128, 4096, True, 300.0, rmse=5e-2)]
    md = kernel_markdown(rows, {**META, "pytorch_fp8_attention": "ran"})
    table = _table(md, "## fwd, fp8 (TFLOP/s)")
    assert table[0] == ["D", "S", "causal", "fa3dist fp8", "rmse", "quantize ms", "fa3dist bf16", "rmse bf16",
                        "sdpa-fp8", "sdpa-fp8 rmse", "fp8/bf16-ours"]
    assert table[1:] == [["128", "4096", "yes", "600", "0.002", "0.1", "", "", "300", "0.05", ""]]
    assert "PyTorch FP8 attention here: `F.scaled_dot_product_attention` (rows sdpa-fp8) ran." in md
    assert "## fwd, bfloat16" not in md
    assert "Ceiling" not in kernel_markdown(rows)  # no meta (e.g. an old caller): no ceiling line, no error


def test_bf16_markdown_keeps_its_format_without_rmse():
    from fa3dist.bench.kernel import kernel_markdown

    rows = [_row(i, "bfloat16", 128, 16384, True, t) for i, t in (("fa3dist", 600.0), ("cudnn", 500.0))]
    assert kernel_markdown(rows).splitlines()[2:] == [
        "| D | S | causal | fa3dist | cudnn | fa3dist/cudnn |", "|---|---|---|---|---|---|",
        "| 128 | 16384 | yes | 600 | 500 | 1.2 |"]


# --- the plot -------------------------------------------------------------------------------------------------

def test_fp8_rows_join_the_bf16_forward_plot(tmp_path):
    pytest.importorskip("matplotlib")
    from fa3dist.bench.plot import plot_kernel

    rows = [_row("fa3dist", "bfloat16", 128, s, False, 600.0) for s in (4096, 16384)]
    rows += [_row("fa3dist", "fp8", d, s, False, 800.0) for d in (64, 128) for s in (4096, 16384)]
    rows += [{**_row("fa3dist", "bfloat16", 128, 16384, False, 300.0), "pass": "bwd"}]
    paths = plot_kernel(rows, str(tmp_path), "k")
    assert sorted(p.rsplit("/", 1)[1] for p in paths) == ["k-bwd-bfloat16.png", "k-fwd-bfloat16.png"]
    alone = plot_kernel([r for r in rows if r["dtype"] == "fp8"], str(tmp_path), "only")
    assert [p.rsplit("/", 1)[1] for p in alone] == ["only-fwd-fp8.png"]


# --- the rows of a run (on the CPU: our kernels in the interpreter, timings and cuDNN faked) --------------------

def _fake_run(monkeypatch, pytorch_fp8=None):
    """Fake timings (each timed callable still runs once), a cuDNN peer that is the CPU's SDPA, the GEMM
    ceiling, and optionally ``PYTORCH_FP8``. Returns the list of timed results' types."""
    import torch.nn.functional as F

    import fa3dist.bench.kernel as kernel
    from fa3dist.bench.peers import Prepared
    from fa3dist.kernels.fp8 import FP8QKV

    timed = []

    def fake_time_ms(fn, *, warmup_ms, rep_ms):
        result = fn()
        quantize = isinstance(result, tuple) and isinstance(result[0], FP8QKV)  # bench_fp8.quantize_inputs
        timed.append("quantize" if quantize else type(result).__name__)
        return 2.0 if quantize else 1.0

    real_prepare = kernel.prepare

    def fake_prepare(impl, q, k, v, *, causal):
        if impl != "cudnn":
            return real_prepare(impl, q, k, v, causal=causal)
        ql, kl, vl = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
        return Prepared(ql, kl, vl, lambda: F.scaled_dot_product_attention(ql, kl, vl, is_causal=causal,
                                                                           enable_gqa=kl.shape[1] != ql.shape[1]),
                        lambda t: t.transpose(1, 2))

    monkeypatch.setattr(kernel, "time_ms", fake_time_ms)
    monkeypatch.setattr(kernel, "prepare", fake_prepare)
    monkeypatch.setattr(bench_fp8, "fp8_gemm_tflops", lambda **_: 1254.0)
    if pytorch_fp8 is not None:
        monkeypatch.setattr(bench_fp8, "PYTORCH_FP8", pytorch_fp8)
    return timed


def _small_cfg(*overrides):
    from fa3dist.bench.kernel import KernelBenchConfig
    from fa3dist.config import load_config

    # float32, not bfloat16, beside fp8: Triton's interpreter gets bf16 kernels wrong (fp8 runs dequantized to fp32)
    return load_config(KernelBenchConfig, None, ["tokens=128", "model_dim=256", "kv_group=2", "head_dims=[64]",
                                                 "seq_lens=[128]", "dtypes=[float32, fp8]",
                                                 "impls=[fa3dist, fa3, cudnn]", *overrides])


def test_a_run_with_fp8_cells_writes_fp8_rows_meta_markdown_and_plot(tmp_path, monkeypatch):
    import json

    from fa3dist.bench.kernel import write_kernel_results

    timed = _fake_run(monkeypatch)
    paths = write_kernel_results(_small_cfg(), str(tmp_path), plot=True, device="cpu")
    names = sorted(p.rsplit("/", 1)[1] for p in paths)
    stem = next(n for n in names if n.endswith(".json"))[:-len(".json")]
    assert stem.startswith("kernel-cpu-") and stem.endswith("-fp8")  # not the bf16 run's kernel-<gpu>-<date>
    assert [n[len(stem):] for n in names] == ["-bwd-float32.png", "-fwd-float32.png", "-fwd-fp8.png", ".json", ".md"]
    data = json.loads(open(next(p for p in paths if p.endswith(".json"))).read())
    meta, rows = data["meta"], data["rows"]
    assert meta["fp8_gemm_ceiling"] == {"op": "torch._scaled_mm e4m3 8192^3 bf16 out", "tflops": 1254.0}
    assert meta["pytorch_fp8_attention"] != "ran" and meta["pytorch_fp8_attention_quantized"] != "ran"
    assert "fa3" in meta["skipped_peers"] and "partial" not in meta

    got = {(r["impl"], r["dtype"], r["pass"], r["causal"]) for r in rows}
    want = {(i, "float32", p, c) for i in ("fa3dist", "cudnn") for p in ("fwd", "bwd") for c in (False, True)}
    assert got == want | {("fa3dist", "fp8", "fwd", c) for c in (False, True)}  # fp8: forward only, ours only
    assert not any(r.get("error") for r in rows)
    for r in rows:
        assert (r["B"], r["H"], r["Hkv"], r["S"], r["D"]) == (1, 4, 2, 128, 64)
        assert ("rmse" in r) == (r["pass"] == "fwd") and ("quantize_ms" in r) == (r["dtype"] == "fp8")
        assert ("rel_err_vs_cudnn" in r) == (r["impl"] == "fa3dist")
    fp8_rows = {r["causal"]: r for r in rows if r["dtype"] == "fp8"}
    bf16_rows = {r["causal"]: r for r in rows if r["dtype"] == "float32" and r["impl"] == "fa3dist" and r["pass"] == "fwd"}
    for causal in (False, True):
        fp8_row, bf16_row = fp8_rows[causal], bf16_rows[causal]
        assert fp8_row["ms"] == 1.0 and fp8_row["quantize_ms"] == 2.0
        assert fp8_row["tflops"] == pytest.approx(4 * 4 * 128 ** 2 * 64 / (2 if causal else 1) / 1e9)
        # e4m3's 3 mantissa bits against float32 (bf16 on a GPU: 7 bits)
        assert 100 * bf16_row["rmse"] < fp8_row["rmse"] < 0.1
        assert 5e-3 < fp8_row["rel_err_vs_cudnn"] < bench_fp8.FP8_TOLERANCE
        assert bf16_row["rel_err_vs_cudnn"] < 1e-5
    assert timed.count("quantize") == 2  # quantize_inputs timed once per fp8 cell

    md = open(next(p for p in paths if p.endswith(".md"))).read()
    assert "## fwd, fp8 (TFLOP/s)" in md and "1254 TFLOP/s" in md and "none ran" in md
    fp8_table = _table(md, "## fwd, fp8 (TFLOP/s)")
    assert fp8_table[0][-1] == "fp8/bf16-ours" and len(fp8_table) == 3  # no bf16 rows: no bf16 peers
    assert "## fwd, float32 (TFLOP/s)" in md and "## bwd, float32 (TFLOP/s)" in md


def test_bf16_cells_of_a_forward_only_run_run_no_backward(tmp_path, monkeypatch):
    import fa3dist.bench.kernel as kernel

    _fake_run(monkeypatch)

    def no_grad(*args, **kwargs):
        raise AssertionError("a forward-only run computed gradients")

    monkeypatch.setattr(torch.autograd, "grad", no_grad)
    meta, rows = kernel.run_kernel_bench(_small_cfg("passes=[fwd]", "causal=[true]"), device="cpu")
    assert sorted((r["impl"], r["dtype"], r["pass"]) for r in rows) == [
        ("cudnn", "float32", "fwd"), ("fa3dist", "float32", "fwd"), ("fa3dist", "fp8", "fwd")]
    assert not any(r.get("error") for r in rows)


def _pytorch_fp8_fakes():
    """Fake PyTorch FP8 entries that run on the CPU: one good (the dequantized attention), one that is 10%
    off (fine for fp8, not for bf16), one that is wrong."""
    from fa3dist.kernels.reference import reference_fwd

    def dequantized(x, scale, causal, noise=0.0):
        deq = [t.float() * d for t, d in ((x.q, x.q_descale), (x.k, x.k_descale), (x.v, x.v_descale))]

        def forward():
            out = reference_fwd(*deq, softmax_scale=scale, causal=causal)[0]
            return out + noise * out.std() * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))

        return forward, lambda out: out

    def wrong(x, scale, causal):
        return (lambda: torch.zeros(x.q.shape)), (lambda out: out)

    return {"good": ("k_good", "good()", dequantized),
            "noisy": ("k_noisy", "noisy()", lambda x, s, c: dequantized(x, s, c, noise=0.1)),
            "wrong": ("k_wrong", "wrong()", wrong)}


def test_pytorch_fp8_rows_that_ran_in_the_probe(tmp_path, monkeypatch):
    import fa3dist.bench.kernel as kernel

    _fake_run(monkeypatch, _pytorch_fp8_fakes())
    fp8_meta = kernel.fp8_run_meta(_small_cfg(), "cpu")
    assert {k: fp8_meta[k] for k in ("k_good", "k_noisy", "k_wrong")} == {"k_good": "ran", "k_noisy": "ran",
                                                                            "k_wrong": "ran"}
    meta, rows = kernel.run_kernel_bench(_small_cfg("passes=[fwd]", "causal=[false]", "dtypes=[fp8]"),
                                         fp8_meta=fp8_meta, device="cpu")
    found = {r["impl"]: r for r in rows}
    assert sorted(found) == ["fa3dist", "good", "noisy", "wrong"]  # cudnn's bf16 out is used, not timed
    assert {r["dtype"] for r in rows} == {"fp8"}
    # the good one is the same attention as our fp8 kernel's tl fallback (dequantized, P unrounded)
    assert found["good"]["rmse"] == pytest.approx(found["fa3dist"]["rmse"], rel=0.05)
    assert "quantize_ms" not in found["good"]
    assert 5e-2 < found["noisy"]["rel_err_vs_cudnn"] < bench_fp8.FP8_TOLERANCE and not found["noisy"].get("error")
    assert found["wrong"]["tflops"] is None and "disagrees with cudnn" in found["wrong"]["error"]
    kernel.check_own_rows(rows)  # a failing PyTorch row does not fail the run


def test_our_fp8_kernel_failing_fails_the_run_after_writing(tmp_path, monkeypatch):
    import fa3dist.bench.kernel as kernel
    from fa3dist.kernels import triton_fwd

    _fake_run(monkeypatch)
    real = triton_fwd.flash_fwd

    def broken_fp8(q, k, v, **kwargs):
        out, lse = real(q, k, v, **kwargs)
        return (out * 1.5 if kwargs.get("q_descale") is not None else out), lse

    monkeypatch.setattr(triton_fwd, "flash_fwd", broken_fp8)
    with pytest.raises(RuntimeError, match=r"(?s)fa3dist failed.*fp8 D=64 S=128 causal=True.*disagrees.*results "
                                           r"written to"):
        kernel.write_kernel_results(_small_cfg("passes=[fwd]", "causal=[true]"), str(tmp_path), plot=False,
                                    device="cpu")
    assert len(list(tmp_path.glob("kernel-*-fp8.json"))) == 1


def test_the_cells_of_one_shape_draw_the_same_inputs_in_every_dtype(monkeypatch):
    """fp8 and bf16 rows of one (D, S, causal) are measured on the same values; other shapes get others."""
    import fa3dist.bench.kernel as kernel

    _fake_run(monkeypatch)
    drawn = []
    real = bench_fp8.sampled_reference

    def recording(q, k, v, **kwargs):  # called once per cell, with the cell's inputs
        drawn.append(torch.cat([t.flatten() for t in (q, k, v)]))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(bench_fp8, "sampled_reference", recording)
    cfg = _small_cfg("passes=[fwd]", "dtypes=[bfloat16, fp8]", "impls=[cudnn]", "seq_lens=[64, 128]")
    kernel.run_kernel_bench(cfg, device="cpu")
    inputs = dict(zip(cfg.cells(), drawn))
    assert len(inputs) == 8 and len(drawn) == 8
    for s in (64, 128):
        for causal in (False, True):
            assert torch.equal(inputs[("bfloat16", 64, s, causal)], inputs[("fp8", 64, s, causal)])
    firsts = [inputs[("bfloat16", 64, s, c)][:1000] for s in (64, 128) for c in (False, True)]
    assert all(not torch.equal(a, b) for i, a in enumerate(firsts) for b in firsts[i + 1:])
