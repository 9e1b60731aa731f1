"""What the driver checks before any rank starts: devices, ranks per GPU, backends and memory."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fa3dist.bench.ring import RingBenchConfig
from fa3dist.bench.scaling import ScalingConfig
from fa3dist.check import CheckConfig
from fa3dist.config import ConfigError, load_config
from fa3dist.demo import DemoConfig
from fa3dist.launch import worker
from fa3dist.launch.resources import (Attention, check_backend, check_memory, check_resolved, host_memory_bytes,
                                      resolve_launch)


def test_cuda_without_a_gpu_is_refused():
    with pytest.raises(ConfigError, match="--device cuda: no GPU is visible in the Ray cluster"):
        resolve_launch(CheckConfig(device="cuda"), gpus=0, cpu_default=2, where="in the Ray cluster")


@pytest.mark.parametrize("device,world,gpus,want", [
    ("auto", None, 0, ("cpu", 4)), ("auto", None, 1, ("cpu", 4)), ("auto", 1, 1, ("cuda", 1)),
    ("auto", None, 8, ("cuda", 8)), ("cuda", None, 1, ("cuda", 1)), ("cpu", None, 8, ("cpu", 4)),
    ("cuda", 2, 4, ("cuda", 2)),
])
def test_device_and_ranks_follow_the_gpus_the_launcher_can_use(device, world, gpus, want):
    """``gpus`` is this host's count for local/torchrun, and the cluster's for Ray: a CPU head node
    that drives a GPU cluster gets CUDA ranks."""
    cfg = resolve_launch(DemoConfig(device=device, world_size=world), gpus=gpus, cpu_default=4)
    assert (cfg.device, cfg.world_size) == want


def test_two_ranks_on_one_gpu_is_refused(monkeypatch):
    with pytest.raises(ConfigError, match="4 ranks need 4 GPUs; 2 visible"):
        resolve_launch(DemoConfig(world_size=4), gpus=2, cpu_default=4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(RuntimeError, match="LOCAL_RANK 2 has no GPU of its own: 2 visible"):
        worker.pick_device("cuda", 2)
    assert worker.pick_device("auto", 1) == torch.device("cuda", 1)


def test_backends_that_cannot_run_on_the_cpu_are_refused(monkeypatch):
    for backend in ("cudnn", "flash2"):
        with pytest.raises(ConfigError, match=f"backend '{backend}' needs CUDA"):
            check_backend(backend, "cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="TRITON_INTERPRET=1"):
        check_backend("triton", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    check_backend("triton", "cpu")
    check_backend("reference", "cpu")
    check_backend("cudnn", "cuda")


def test_job_checks_that_need_the_number_of_ranks():
    with pytest.raises(ConfigError, match="fail_rank 5 is not a rank of this job: it has 2 ranks"):
        check_resolved(CheckConfig(world_size=2, device="cpu", fail_rank=5), ranks_here=2)
    with pytest.raises(ConfigError, match="seq_len 100 does not split into 6 equal chunks"):
        check_resolved(DemoConfig(world_size=3, device="cpu", seq_len=100), ranks_here=3)
    check_resolved(CheckConfig(world_size=2, device="cpu", fail_rank=1), ranks_here=2)


def test_memory_per_token_matches_the_design_figure():
    """DESIGN.md measured 84.4 KiB per local token for one layer's fwd+bwd at H=32, H_kv=8, D=128,
    bf16; the estimate may be somewhat above that, never below."""
    per_token = Attention(1, 1 << 16, 1 << 16, 32, 8, 128, 2, full_scores=False).peak_bytes() / (1 << 16)
    assert 84.4 * 1024 <= per_token <= 1.3 * 84.4 * 1024


def test_a_problem_that_cannot_fit_is_refused_before_it_starts():
    """The README's 4-GPU scaling config on a CPU would be OOM-killed after a minute."""
    big = dataclasses.replace(load_config(ScalingConfig, "configs/scaling_h100x4.yaml"), device="cpu", world_size=4)
    with pytest.raises(ConfigError, match=r"does not fit on cpu: S=262144 on one rank needs about [\d.]+ TiB"):
        check_memory(big, "cpu", ranks_here=4, source="configs/scaling_h100x4.yaml")
    ring = dataclasses.replace(load_config(RingBenchConfig, "configs/bench_ring.yaml"), device="cpu")
    with pytest.raises(ConfigError, match="configs/bench_ring_cpu.yaml"):
        check_memory(ring, "cpu")
    small = dataclasses.replace(load_config(ScalingConfig, "configs/scaling_cpu.yaml"), world_size=2)
    check_memory(small, "cpu", ranks_here=2)
    check_memory(dataclasses.replace(big, max_context=True, max_context_tokens_per_rank=[64, 128]), "cpu",
                 ranks_here=4)  # --max-context runs its own sizes only
    with pytest.raises(ConfigError, match=r"S=4294967296 over 4 ranks"):
        check_memory(dataclasses.replace(small, world_size=4, max_context=True,
                                         max_context_tokens_per_rank=[64, 1 << 30]), "cpu", ranks_here=4)
    check_memory(load_config(RingBenchConfig, "configs/bench_ring_cpu.yaml"), "cpu")
    check_memory(DemoConfig(world_size=4), "cpu", ranks_here=4)
    assert host_memory_bytes() > 1 << 30
