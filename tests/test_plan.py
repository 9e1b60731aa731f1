"""The cost model (fa3dist.plan), ``fa3dist plan`` and ``bench scaling --scheme`` on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fa3dist.config import ConfigError, load_config
from fa3dist.plan import (DEFAULT_TFLOPS, PROJECTION_LABEL, KernelRates, Machine, PlanConfig, Problem, bytes_per_token,
                          choose_scheme, machine_from_env, predict, predict_all)


def _fa3dist(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fa3dist.cli", *args], capture_output=True, text=True, timeout=300)


def test_kernel_rates_interpolate_and_derive_the_backward():
    rows = [{"impl": "fa3dist", "dtype": "bfloat16", "pass": "fwd", "D": 128, "S": 1024, "causal": True, "tflops": 100},
            {"impl": "fa3dist", "dtype": "bfloat16", "pass": "fwd", "D": 128, "S": 4096, "causal": True, "tflops": 300},
            # bench scaling's one-GPU rows: fwd and fwd+bwd; the backward at 1024 takes 2.5 / 50 per forward FLOP
            {"impl": "fa3dist", "dtype": "bfloat16", "pass": "fwd+bwd", "D": 128, "S": 1024, "causal": True,
             "tflops": 3.5 / (1 / 100 + 2.5 / 50), "world_size": 1},
            {"impl": "fa3dist", "dtype": "bfloat16", "pass": "fwd", "D": 128, "S": 1024, "causal": True, "tflops": 9,
             "world_size": 2},  # a ring row: not the kernel's rate
            {"impl": "cudnn", "dtype": "bfloat16", "pass": "fwd", "D": 128, "S": 1024, "causal": True, "tflops": 9},
            {"impl": "fa3dist", "dtype": "float16", "pass": "fwd", "D": 128, "S": 1024, "causal": True, "tflops": 9}]
    rates = KernelRates.from_rows(rows, impl="fa3dist", dtype="bfloat16", source="test")
    assert rates.tflops("fwd", True, 128, 1024) == 100
    assert rates.tflops("fwd", True, 128, 2048) == pytest.approx(200)  # halfway in log S
    assert rates.tflops("fwd", True, 64, 512) == 100 and rates.tflops("fwd", True, 128, 65536) == 300
    assert rates.tflops("bwd", True, 128, 1024) == pytest.approx(50)
    ratio = DEFAULT_TFLOPS[("fwd", False)] / DEFAULT_TFLOPS[("fwd", True)]
    assert rates.tflops("fwd", False, 128, 4096) == pytest.approx(300 * ratio)  # only the causal rate measured
    assert KernelRates().tflops("bwd", False, 128, 1024) == DEFAULT_TFLOPS[("bwd", False)]
    with pytest.raises(ValueError, match="test: no fa3dist rows in float32"):
        KernelRates.from_rows(rows, impl="fa3dist", dtype="float32", source="test")


def test_link_fit_is_latency_plus_bytes_over_bandwidth():
    from fa3dist.bench.links import _fit

    gbps, latency_us = _fit([(1e6, 0.2 + 1e6 / 50e9 * 1e3), (1e8, 0.2 + 1e8 / 50e9 * 1e3)])  # (bytes, ms)
    assert gbps == pytest.approx(50) and latency_us == pytest.approx(200)


def _machine(**changes) -> Machine:
    """Nodes of 2, one kernel rate (500 TFLOP/s unmasked forward), 100 GB/s inside a node, no overheads."""
    base = Machine(gpus_per_node=2, kernel=KernelRates((("fwd", False, 128, 1024, 500.0),), "test"),
                   intra_node_gbps=100.0, intra_node_all_to_all_gbps=100.0, inter_node_gbps=10.0, latency_us=0.0,
                   step_overhead_us=0.0, call_overhead_us=0.0, overlap=1.0)
    return Machine(**{**vars(base), **changes})


def test_predictions_follow_the_model_by_hand():
    """2 ranks, S = 2^20, H = H_kv = 8, D = 128, bf16, forward, not causal."""
    problem = Problem(batch=1, seq_len=2**20, heads=8, kv_heads=8, head_dim=128, causal=False, backward=False)
    half = 2**19
    block_ms = 4 * 8 * half * half * 128 / 500e12 * 1e3  # one L x L block on 8 heads
    kv_ms = 2 * half * 8 * 128 * 2 / 100e9 * 1e3  # one step's K and V
    flat = predict(problem, 2, "flat", _machine())
    assert flat.ms == pytest.approx(2 * block_ms) and flat.ring_exposed_ms == 0
    assert flat.ring_transfer_ms == pytest.approx(kv_ms)
    assert predict(problem, 2, "flat", _machine(overlap=0.0)).ms == pytest.approx(2 * block_ms + kv_ms)
    slow = predict(problem, 2, "flat", _machine(intra_node_gbps=0.01))
    assert slow.ms == pytest.approx(block_ms + kv_ms * 1e4)  # the transfer outlasts the kernel
    # Ulysses: the whole S on 4 heads per rank; each rank sends half of q, k, v and out to the other
    ulysses = predict(problem, 2, "ulysses", _machine())
    a2a_ms = half * 128 * 2 * (2 * 8 + 2 * 8) / 2 / 100e9 * 1e3
    assert ulysses.all_to_all_ms == pytest.approx(a2a_ms) and ulysses.ring_transfer_ms == 0
    assert ulysses.ms == pytest.approx(2 * block_ms + a2a_ms)
    assert flat.efficiency == pytest.approx(1.0) and flat.tflops_per_gpu == pytest.approx(500)
    assert choose_scheme(problem, 2, _machine()) == "flat"
    assert flat.kib_per_token is None  # the memory model covers forward and backward
    # forward and backward: the backward's last step sends the fp32 dK/dV accumulator home after its
    # kernel, where nothing hides it; every other transfer hides behind a kernel
    both = Problem(batch=1, seq_len=2**20, heads=8, kv_heads=8, head_dim=128, causal=False, backward=True)
    rates = KernelRates((("fwd", False, 128, 1024, 500.0), ("bwd", False, 128, 1024, 400.0)), "test")
    train = predict(both, 2, "flat", _machine(kernel=rates))
    home_ms = 2 * half * 8 * 128 * 4 / 100e9 * 1e3
    assert train.ring_exposed_ms == pytest.approx(home_ms)
    assert train.ms == pytest.approx(2 * block_ms + 2 * 2.5 * block_ms * 500 / 400 + home_ms)


def test_the_choice_follows_the_links_and_the_heads():
    problem = Problem(batch=1, seq_len=16 * 8192, heads=32, kv_heads=8, head_dim=128)
    slow_network = Machine(gpus_per_node=8, inter_node_gbps=1.0)
    fast_network = Machine(gpus_per_node=8, inter_node_gbps=1000.0, intra_node_gbps=1000.0,
                           intra_node_all_to_all_gbps=1000.0, latency_us=0.0)
    assert set(predict_all(problem, 16, slow_network)) == {"flat", "ulysses", "hierarchical"}
    assert choose_scheme(problem, 16, slow_network) == "hierarchical"
    assert choose_scheme(problem, 16, fast_network) == "flat"
    # 32 heads do not split over 64 ranks: no Ulysses; hierarchical splits them over a node of 8
    wide = Problem(batch=1, seq_len=64 * 8192, heads=32, kv_heads=8, head_dim=128)
    assert predict(wide, 64, "ulysses", slow_network) is None
    assert set(predict_all(wide, 64, slow_network)) == {"flat", "hierarchical"}
    # one node: hierarchical would be Ulysses
    assert set(predict_all(problem, 8, Machine(gpus_per_node=8))) == {"flat", "ulysses"}
    with pytest.raises(ValueError, match="scheme must be one of"):
        predict(problem, 16, "striped", slow_network)


def test_memory_model_is_the_ring_docstring_for_the_flat_ring():
    problem = Problem(batch=1, seq_len=1024, heads=32, kv_heads=8, head_dim=128)
    # 64.25 and 68.25 KiB before the backward's fp32 dK/dV scratch: 2 * 8 heads * 128 * 4 B = 8 KiB
    assert bytes_per_token(problem, 1, 2) / 1024 == 72.25
    assert bytes_per_token(problem, 1, 3) / 1024 == bytes_per_token(problem, 1, 8) / 1024 == 76.25
    # MQA on a head group of 4: each rank gets one K/V head, so 4 K/V heads travel in all
    mqa = Problem(batch=1, seq_len=1024, heads=32, kv_heads=1, head_dim=128)
    split = Problem(batch=1, seq_len=1024, heads=32, kv_heads=4, head_dim=128)
    caller_difference = 2 * 3 * 128 * 2  # the caller's k and v: 1 head against 4
    assert bytes_per_token(split, 4, 2) - bytes_per_token(mqa, 4, 2) == caller_difference


def test_auto_plans_with_the_machine_of_FA3DIST_PLAN(tmp_path, monkeypatch):
    monkeypatch.delenv("FA3DIST_PLAN", raising=False)
    assert machine_from_env(4) == Machine(gpus_per_node=4)
    config = tmp_path / "plan.yaml"
    config.write_text("inter_node_gbps: 12.5\noverlap: 0.25\n")
    monkeypatch.setenv("FA3DIST_PLAN", str(config))
    machine = machine_from_env(4)
    assert (machine.inter_node_gbps, machine.overlap, machine.gpus_per_node) == (12.5, 0.25, 4)


def test_plan_configs_load_and_bad_ones_are_refused():
    for path in ("configs/plan_h100_cluster.yaml", "configs/plan_h200x2.yaml"):
        load_config(PlanConfig, path).machine()
    with pytest.raises(ConfigError, match="key 'inter_node_gbps' must be positive"):
        load_config(PlanConfig, None, ["inter_node_gbps=0"])
    with pytest.raises(ConfigError, match="key 'heads' \\(30\\) must be a multiple of its kv_heads \\(8\\)"):
        load_config(PlanConfig, None, ["heads=30"])
    with pytest.raises(ValueError, match="cannot read its rows"):
        load_config(PlanConfig, None, ["kernel_results=[no/such/file.json]"]).machine()


def test_plan_command_prints_predictions_and_writes_the_labelled_projection(tmp_path):
    run = _fa3dist("plan", "--config", "configs/plan_h100_cluster.yaml", "--set", "world_size=16")
    assert run.returncode == 0, run.stderr
    assert "| flat | 1 | 16 |" in run.stdout and "| hierarchical | 8 | 2 |" in run.stdout
    assert "choice: " in run.stdout
    project = _fa3dist("plan", "--config", "configs/plan_h100_cluster.yaml", "--project", "--out", str(tmp_path),
                       "--plot", "--set", "project_world_sizes=[16, 64]", "--set", "project_tokens_per_gpu=[8192]")
    assert project.returncode == 0, project.stderr
    (result,) = tmp_path.glob("plan-h100x8nodes-projection-*.json")
    data = json.loads(result.read_text())
    assert data["meta"]["label"] == PROJECTION_LABEL and data["meta"]["gpu"] == "none (model output)"
    rows = data["rows"]
    assert {(r["world_size"], r["scheme"]) for r in rows if r["kind"] == "projection (model)"} == {
        (16, "flat"), (16, "ulysses"), (16, "hierarchical"), (64, "flat"), (64, "hierarchical")}
    (published,) = [r for r in rows if r["kind"] == "published"]
    assert (published["seconds"], published["efficiency"], published["world_size"]) == (77.0, 0.93, 128)
    assert all("model" in r["kind"] for r in rows if r is not published)
    markdown = next(tmp_path.glob("plan-*.md")).read_text()
    assert PROJECTION_LABEL in markdown and "published" in markdown
    assert len(list(tmp_path.glob("plan-*.png"))) == 2


def test_scaling_bench_runs_a_scheme_and_predicts_it(tmp_path):
    run = _fa3dist("bench", "scaling", "--config", "configs/scaling_cpu.yaml", "--scheme", "ulysses", "--out",
                   str(tmp_path), "--set", f"out={tmp_path / 'runs'}", "--set", "causal=[true]",
                   "--set", "tokens_per_rank=[64]", "--set", "strong_seq_lens=[]", "--set", "passes=[fwd+bwd]")
    assert run.returncode == 0, run.stdout + run.stderr
    (result,) = tmp_path.glob("scaling-*-local-*-ulysses.json")
    rows = [r for r in json.loads(result.read_text())["rows"] if r["world_size"] == 2]
    assert rows and all(r["scheme"] == r["scheme_used"] == "ulysses" and r["head_group_size"] == 2 for r in rows)
    assert all(r["predicted_ms"] > 0 and r["ms"] > 0 for r in rows)
