"""Launchers on the CPU: local processes, torchrun and Ray run the same worker, and a failing or
dying rank stops the whole job with an error that names it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray

from fa3dist.check import CheckConfig
from fa3dist.config import load_config
from fa3dist.launch.errors import RankFailedError
from fa3dist.launch.local import launch_local


def check_config(tmp_path: Path, **values) -> CheckConfig:
    return load_config(CheckConfig, None, [f"out={tmp_path}", "device=cpu", "rounds=6", "round_s=0.02"], **values)


def test_local_launcher_runs_every_rank(tmp_path):
    result = launch_local(check_config(tmp_path), 3)
    assert result["ok"] and result["world_size"] == 3
    assert json.loads((tmp_path / "result.json").read_text())["rounds"] == 6
    assert sorted(p.name for p in tmp_path.glob("rank*.log")) == ["rank0.log", "rank1.log", "rank2.log"]


@pytest.mark.parametrize("mode", ["raise", "exit", "hang"])
def test_local_launcher_fails_fast_and_names_the_rank(tmp_path, mode):
    cfg = check_config(tmp_path, fail_rank=1, fail_mode=mode, timeout_s=5.0, rounds=50)
    start = time.monotonic()
    with pytest.raises(RankFailedError) as info:
        launch_local(cfg, 3)
    assert info.value.rank == 1
    assert time.monotonic() - start < 60
    if mode == "raise":
        assert "InjectedFailure" in info.value.detail
    if mode == "exit":
        assert "exited with code 17" in info.value.detail


def _cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fa3dist.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_torchrun_launcher(tmp_path):
    run = _cli("check", "--launcher", "torchrun", "--world-size", "2", "--device", "cpu", "--set", f"out={tmp_path}",
               "--set", "rounds=4")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "ok: 4 rounds" in run.stdout
    bad = _cli("check", "--launcher", "torchrun", "--world-size", "2", "--device", "cpu", "--set", f"out={tmp_path}",
               "--fail-rank", "1")
    assert bad.returncode == 3
    assert "InjectedFailure" in bad.stdout + bad.stderr


def test_scaling_bench_on_cpu_with_the_local_launcher(tmp_path):
    run = _cli("bench", "scaling", "--config", "configs/scaling_cpu.yaml", "--out", str(tmp_path), "--plot",
               "--set", f"out={tmp_path / 'runs'}")
    assert run.returncode == 0, run.stdout + run.stderr
    (result,) = tmp_path.glob("scaling-*-local-*.json")
    rows = json.loads(result.read_text())["rows"]
    ring_rows = [r for r in rows if r["world_size"] == 2]
    assert ring_rows and all(r["overlap_efficiency"] > 0 and r["efficiency_vs_one_gpu"] > 0 for r in ring_rows)
    assert {r["tokens_per_rank"] for r in ring_rows} == {128, 256}
    assert len(list(tmp_path.glob("scaling-*-local-*.png"))) == 2


@pytest.fixture(scope="module")
def ray_cluster():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_launcher_runs_the_check(ray_cluster, tmp_path):
    from fa3dist.launch.ray_launcher import launch_ray

    result = launch_ray(check_config(tmp_path), 2)
    assert result["ok"] and result["world_size"] == 2
    assert (tmp_path / "result.json").exists()


def test_ray_launcher_runs_the_scaling_bench(ray_cluster, tmp_path):
    from fa3dist.bench.scaling import ScalingConfig
    from fa3dist.launch.ray_launcher import launch_ray

    cfg = load_config(ScalingConfig, "configs/scaling_cpu.yaml",
                      [f"out={tmp_path}", f"results_dir={tmp_path}", "launcher=ray", "causal=[true]",
                       "tokens_per_rank=[128]", "strong_seq_lens=[]"], world_size=2)
    result = launch_ray(cfg, 2)
    assert {r["world_size"] for r in result["rows"]} == {1, 2}
    assert list(tmp_path.glob("scaling-*-ray-*.json"))


def test_ray_launcher_fails_fast_when_a_rank_raises(ray_cluster, tmp_path):
    from fa3dist.launch.ray_launcher import launch_ray

    with pytest.raises(RankFailedError) as info:
        launch_ray(check_config(tmp_path, fail_rank=1, fail_mode="raise", rounds=50), 2)
    assert info.value.rank == 1 and "InjectedFailure" in info.value.detail


def test_ray_launcher_fails_fast_when_an_actor_is_killed(ray_cluster, tmp_path):
    """Kill rank 1's actor process from outside while the job runs."""
    from fa3dist.launch.ray_launcher import launch_ray

    cfg = check_config(tmp_path, rounds=3000, timeout_s=30.0)
    killed: list[int] = []

    def kill_rank1() -> None:
        log = tmp_path / "rank1.log"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            text = log.read_text() if log.exists() else ""
            found = re.search(r"check running in pid (\d+)", text)
            if found and "round 3 ok" in text:
                os.kill(int(found.group(1)), signal.SIGKILL)
                killed.append(int(found.group(1)))
            time.sleep(0.05)

    killer = threading.Thread(target=kill_rank1)
    killer.start()
    start = time.monotonic()
    try:
        with pytest.raises(RankFailedError) as info:
            launch_ray(cfg, 2)
    finally:
        killer.join()
    assert killed, "the test never found rank 1's pid in its log"
    assert info.value.rank == 1
    assert time.monotonic() - start < 120
