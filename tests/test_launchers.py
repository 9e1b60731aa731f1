"""Launchers on the CPU: local processes, torchrun and Ray run the same worker, and a rank that
raises, exits, is killed or hangs is named as the rank that failed, with how, within the timeout
plus 10 s, while every other rank is stopped.

The drills of one launcher run concurrently (a module fixture), then one test per combination
checks its verdict.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import ray

from fa3dist.check import CheckConfig
from fa3dist.config import load_config
from fa3dist.launch import torchrun
from fa3dist.launch.drill import LAUNCHERS, DrillResult, run_drill
from fa3dist.launch.local import launch_local

TIMEOUT_S = 5.0
KIND = {"raise": "raised", "exit": "exited", "kill": "killed", "hang": "hung"}
FIRST_LINE = {"raise": "raised InjectedFailure: rank {rank} failed on purpose at round 5",
              "exit": "exited with code 17", "kill": "was killed by SIGKILL (likely an out-of-memory kill)",
              "hang": "hung: no progress for"}
# (how the rank fails, which rank, of how many): rank 0 of 2, and the middle rank of 3
DRILLS = [(mode, rank, world) for mode in KIND for rank, world in ((0, 2), (1, 3))]


def _drill_matrix(launcher: str, base: Path, **settings) -> dict[tuple[str, int], DrillResult]:
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {(mode, rank): pool.submit(run_drill, launcher, mode, rank, world, out=base / f"{mode}-{rank}",
                                             timeout_s=TIMEOUT_S, rounds=8, round_s=0.02, **settings)
                   for mode, rank, world in DRILLS}
    return {key: future.result() for key, future in futures.items()}


@pytest.fixture(scope="module")
def ray_cluster():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def local_drills(tmp_path_factory):
    return _drill_matrix("local", tmp_path_factory.mktemp("local"))


@pytest.fixture(scope="module")
def torchrun_drills(tmp_path_factory):
    return _drill_matrix("torchrun", tmp_path_factory.mktemp("torchrun"))


@pytest.fixture(scope="module")
def ray_drills(ray_cluster, tmp_path_factory):
    # 20 ranks at once on the 2-CPU test cluster: each reserves a tenth of a CPU
    return _drill_matrix("ray", tmp_path_factory.mktemp("ray"), cpus_per_rank=0.1)


@pytest.mark.parametrize("mode,rank,world", DRILLS)
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_the_failing_rank_is_named_with_how_it_failed(request, launcher, mode, rank, world):
    """Covers the issue's rows: torchrun named rank 0 for rank 1's error and for rank 1's hang;
    Ray named the rank that timed out waiting on hung rank 0; and a SIGKILL (what the OOM killer
    sends) said only "exited with code -9"."""
    result = request.getfixturevalue(f"{launcher}_drills")[(mode, rank)]
    assert (result.named_rank, result.kind) == (rank, KIND[mode]), result
    assert result.first_line.startswith(f"rank {rank} " + FIRST_LINE[mode].format(rank=rank)), result
    assert result.after_failure_s is not None, result  # the seconds are reported by tools/drill_matrix.py, not asserted


def check_config(tmp_path: Path, **values) -> CheckConfig:
    return load_config(CheckConfig, None, [f"out={tmp_path}", "device=cpu", "rounds=6", "round_s=0.02"], **values)


def test_local_launcher_runs_every_rank(tmp_path):
    result = launch_local(check_config(tmp_path), 3)
    assert result["ok"] and result["world_size"] == 3
    assert json.loads((tmp_path / "result.json").read_text())["rounds"] == 6
    assert sorted(p.name for p in tmp_path.glob("rank*.log")) == ["rank0.log", "rank1.log", "rank2.log"]
    status = json.loads((tmp_path / "status" / "rank2.json").read_text())
    assert status["state"] == "done" and status["marks"] == 7  # the process group, then one mark per round


def _cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fa3dist.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_torchrun_launcher_from_the_cli(tmp_path):
    """The issue's rows: torchrun named rank 0 for rank 1's error, and for rank 1's hang."""
    run = _cli("check", "--launcher", "torchrun", "--world-size", "2", "--device", "cpu", "--set", f"out={tmp_path}",
               "--set", "rounds=4")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "ok: 4 rounds" in run.stdout
    bad = _cli("check", "--launcher", "torchrun", "--world-size", "3", "--device", "cpu", "--set", f"out={tmp_path}",
               "--fail-rank", "1")
    assert bad.returncode == 3
    assert bad.stderr.startswith("fa3dist: error: rank 1 raised InjectedFailure: rank 1 failed on purpose"), bad.stderr
    hang = _cli("check", "--launcher", "torchrun", "--device", "cpu", "--set", f"out={tmp_path}", "--fail-rank", "1",
                "--fail-mode", "hang", "--timeout-s", "5")
    assert hang.returncode == 3
    assert hang.stderr.startswith("fa3dist: error: rank 1 hung: no progress for"), hang.stderr
    assert "then: rank 0 timed out waiting for a peer." in hang.stderr


def test_the_torchrun_entry_prints_the_demo_table_and_verdict(tmp_path):
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "fa3dist.launch.torchrun", "demo", "--run-dir", str(tmp_path), "--set", "seq_len=64",
                          "--set", "heads=2", "--set", "kv_heads=1", "--set", "head_dim=16", "--set", "device=cpu"],
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "world_size" in run.stdout and "err dq" in run.stdout and "match: max relative error" in run.stdout


def test_torchrun_itself_names_the_rank_that_raised(tmp_path):
    """Run by torchrun directly, a rank that only lost its connection exits later, so that
    torchrun's own report names the rank that failed first."""
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3",
                          "-m", "fa3dist.launch.torchrun", "check", "--run-dir", str(tmp_path), "--set", "device=cpu",
                          "--set", "fail_rank=1", "--set", "rounds=8", "--set", "round_s=0.02"],
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 1
    root_cause = run.stderr[run.stderr.index("Root Cause"):]
    assert "rank      : 1 (local_rank: 1)" in root_cause and "InjectedFailure" in root_cause, run.stderr


def test_the_torchrun_entry_exits_1_on_a_mismatch(tmp_path, monkeypatch, capsys):
    result = {"world_size": 2, "layout": "zigzag", "causal": True, "dtype": "float32", "max_rel_error": 0.5,
              "errors": {"out": 0.5, "dq": 0.1, "dk": 0.1, "dv": 0.1}, "ring_s": 0.1, "single_s": 0.1,
              "tolerance": 1e-5, "ok": False}
    monkeypatch.setattr(torchrun, "_run_rank", lambda cfg: result)
    assert torchrun.main(["demo", "--run-dir", str(tmp_path), "--set", "device=cpu"]) == 1
    assert "MISMATCH: max relative error 0.5" in capsys.readouterr().out


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


def test_ray_placement_that_cannot_be_satisfied_is_refused_at_once(ray_cluster, tmp_path):
    """The demo's 4 CPU ranks on a 2-CPU cluster waited 60 s, then printed a 20-line traceback."""
    run = _cli("demo", "--launcher", "ray", "--ray-address", ray_cluster, "--set", f"out={tmp_path}")
    assert run.returncode == 2
    assert run.stderr.splitlines() == ["fa3dist: error: the Ray cluster cannot place 4 ranks of {'CPU': 1.0}: its 1 "
                                       "node(s) have 2 CPU, 0 GPU, room for 2 such rank(s); lower --world-size, or "
                                       "--set cpus_per_rank=<fewer>"], run.stderr
    gpu = _cli("check", "--launcher", "ray", "--ray-address", ray_cluster, "--device", "cuda")
    assert gpu.returncode == 2
    assert gpu.stderr.splitlines()[-1] == ("fa3dist: error: --device cuda: no GPU is visible in the Ray cluster "
                                           "(use --device cpu for a CPU run)")
