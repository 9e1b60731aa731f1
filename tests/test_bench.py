"""Benchmark plumbing that runs without a GPU: FLOP counts, tables, configs and the ring bench on CPU."""

from __future__ import annotations

import json

import pytest

from fa3dist.bench.common import attention_flops, gpu_tag
from fa3dist.bench.kernel import KernelBenchConfig, kernel_markdown
from fa3dist.bench.ring import RingBenchConfig, write_ring_results
from fa3dist.config import ConfigError, load_config


def test_flops_follow_the_flashattention_count():
    fwd = attention_flops(2, 16, 4096, 128, False, "fwd")
    assert fwd == 4 * 2 * 16 * 4096 ** 2 * 128
    assert attention_flops(2, 16, 4096, 128, True, "fwd") == fwd / 2
    assert attention_flops(2, 16, 4096, 128, False, "bwd") == 2.5 * fwd
    assert attention_flops(2, 16, 4096, 128, True, "fwd+bwd") == 3.5 * fwd / 2


def test_gpu_tag():
    assert gpu_tag({"gpu": "NVIDIA H100 80GB HBM3"}) == "h100"
    assert gpu_tag({"gpu": "NVIDIA H200"}) == "h200"


def test_shipped_bench_configs_load():
    kernel = load_config(KernelBenchConfig, "configs/bench_kernel.yaml")
    assert len(kernel.cells()) == 3 * 6 * 2 + 2
    ring = load_config(RingBenchConfig, "configs/bench_ring.yaml")
    assert ring.world_sizes == [2, 4, 8] and ring.seq_len == 131072


def test_kernel_config_rejects_bad_cells():
    with pytest.raises(ConfigError, match="does not divide tokens"):
        load_config(KernelBenchConfig, None, ["seq_lens=[3000]"])
    with pytest.raises(ConfigError, match="extra_cells"):
        load_config(KernelBenchConfig, None, ["extra_cells=[[float16, 128]]"])


def test_kernel_markdown_ratio():
    rows = [{"impl": i, "dtype": "bfloat16", "pass": "fwd", "D": 128, "S": 16384, "causal": True, "tflops": t}
            for i, t in (("fa3dist", 600.0), ("cudnn", 500.0), ("flash2", 300.0))]
    md = kernel_markdown(rows)
    assert "| 128 | 16384 | yes | 600 | 500 | 300 | 1.2 |" in md


def test_ring_bench_runs_on_cpu_and_writes_results(tmp_path):
    cfg = load_config(RingBenchConfig, None, ["device=cpu", "backend=reference", "dtype=float32", "seq_len=96",
                                              "heads=4", "kv_heads=2", "head_dim=16", "world_sizes=[2, 3]"])
    paths = write_ring_results(cfg, str(tmp_path), plot=True)
    data = json.loads(open(next(p for p in paths if p.endswith(".json"))).read())
    assert {"gpu", "torch", "triton", "cuda", "nccl", "world_size", "date", "command"} <= set(data["meta"])
    rows = data["rows"]
    assert sorted({(r["world_size"], r["pass"]) for r in rows}) == [
        (1, "fwd"), (1, "fwd+bwd"), (2, "fwd"), (2, "fwd+bwd"), (3, "fwd"), (3, "fwd+bwd")]
    for row in rows:
        assert row["rel_err_vs_monolithic"] < 1e-5 and row["tflops"] > 0
        assert {"impl", "pass", "dtype", "B", "H", "Hkv", "S", "D", "causal", "ms", "tflops"} <= set(row)
    assert any(p.endswith(".png") for p in paths)
    assert "partial" not in data["meta"]


def test_ring_bench_fp8_pass_on_cpu(tmp_path):
    """Pass "fp8": the FP8 ring forward on virtual ranks against the single-device FP8 forward, both
    quantizing the whole sequence alike (reference backend: equal up to float32 rounding, bf16 out)."""
    cfg = load_config(RingBenchConfig, None, ["device=cpu", "backend=reference", "dtype=bfloat16", "seq_len=128",
                                              "heads=4", "kv_heads=2", "head_dim=16", "world_sizes=[2, 4]",
                                              "passes=[fwd, fp8]"])
    paths = write_ring_results(cfg, str(tmp_path), plot=False)
    rows = json.loads(open(next(p for p in paths if p.endswith(".json"))).read())["rows"]
    assert sorted({(r["world_size"], r["pass"]) for r in rows}) == [
        (1, "fp8"), (1, "fwd"), (2, "fp8"), (2, "fwd"), (4, "fp8"), (4, "fwd")]
    for row in rows:
        assert row["rel_err_vs_monolithic"] < 1e-2 and row["tflops"] > 0  # bf16 outputs: one rounding apart


def test_ring_bench_rejects_an_unknown_pass():
    with pytest.raises(ConfigError, match="passes"):
        load_config(RingBenchConfig, None, ["passes=[fp16]"])


def test_a_ring_bench_stopped_part_way_keeps_what_it_measured(tmp_path, monkeypatch):
    """The result files are rewritten after every measurement: a run that dies (here: its sixth
    timing raises; a virtual-rank row takes two, the replayed ranks' and the threads') leaves the
    three rows it measured, marked partial."""
    import fa3dist.bench.ring as ring_bench

    timings = iter([1.0, 2.0, 2.5, 3.0, 3.5])
    monkeypatch.setattr(ring_bench, "time_ms_events", lambda fn: next(timings))
    cfg = load_config(RingBenchConfig, None, ["device=cpu", "backend=reference", "dtype=float32", "seq_len=96",
                                              "heads=4", "kv_heads=2", "head_dim=16", "world_sizes=[2, 3]"])
    with pytest.raises(StopIteration):
        write_ring_results(cfg, str(tmp_path), plot=False)
    (path,) = tmp_path.glob("ring-*.json")
    data = json.loads(path.read_text())
    assert data["meta"]["partial"] == "3 of 6 runs"
    assert [r["ms"] for r in data["rows"]] == [1.0, 2.0, 3.0]
    assert [r["threads_ms"] for r in data["rows"]] == [1.0, 2.5, 3.5]
    assert "Partial run: 3 of 6 runs measured." in path.with_suffix(".md").read_text()
