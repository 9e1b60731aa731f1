"""The command line: help, the demo end to end over local processes, and error exits: every user
error is one line and exit code 2, found before any rank starts (``-v`` adds the traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fa3dist import cli


def fa3dist(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fa3dist.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_help_explains_commands():
    top = fa3dist("--help")
    assert top.returncode == 0 and "demo" in top.stdout
    demo = fa3dist("demo", "--help")
    assert demo.returncode == 0
    for flag in ("--world-size", "--seq-len", "--heads", "--kv-heads", "--head-dim", "--layout", "--causal",
                 "--no-causal", "--backend"):
        assert flag in demo.stdout


def test_demo_runs_a_ring_and_writes_its_result(tmp_path):
    run = fa3dist("demo", "--world-size", "3", "--seq-len", "96", "--heads", "4", "--kv-heads", "1",
                  "--head-dim", "40", "--set", f"out={tmp_path}")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "match: max relative error" in run.stdout
    (result_file,) = tmp_path.glob("demo-*/result.json")
    result = json.loads(result_file.read_text())
    assert result["ok"] and result["world_size"] == 3 and result["max_rel_error"] < 1e-5
    assert sorted(p.name for p in result_file.parent.glob("rank*.log")) == ["rank0.log", "rank1.log", "rank2.log"]


def test_demo_rejects_bad_settings():
    run = fa3dist("demo", "--seq-len", "100", "--world-size", "3")
    assert run.returncode != 0
    assert "does not split into 6 equal chunks" in run.stderr
    bad = fa3dist("demo", "--set", "heads=three")
    assert bad.returncode == 2 and "key 'heads': expected int" in bad.stderr


def refused(capsys, *argv: str) -> str:
    """Run the CLI in this process; it must exit 2 with one line on stderr and start no rank."""
    assert cli.main(list(argv)) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and err.startswith("fa3dist: error: "), err
    return err.strip().removeprefix("fa3dist: error: ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_one_line_not_a_cpu_run(capsys, tmp_path):
    for command in ("demo", "check"):
        assert refused(capsys, command, "--device", "cuda", "--set", f"out={tmp_path}") == (
            "--device cuda: no GPU is visible on this machine (use --device cpu for a CPU run)")
    assert not list(tmp_path.iterdir()), "no run may start"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_the_readme_gpu_scaling_config_is_refused_up_front_on_a_cpu(capsys):
    """It was OOM-killed after a minute, with only "process exited with code -9" to show."""
    assert "no GPU is visible" in refused(capsys, "bench", "scaling", "--config", "configs/scaling_h100x4.yaml")
    line = refused(capsys, "bench", "scaling", "--config", "configs/scaling_h100x4.yaml", "--device", "cpu")
    assert line.startswith("configs/scaling_h100x4.yaml does not fit on cpu: S=262144 on one rank needs about")


def test_bad_arguments_are_refused_by_the_driver(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cases = {("demo", "--heads", "6", "--kv-heads", "4"): "heads (6) must be a multiple of kv_heads (4)",
             ("demo", "--device", "cpu", "--backend", "triton"): "backend 'triton' needs CUDA; on a CPU it runs only "
                                                                 "in Triton's interpreter",
             ("demo", "--device", "cpu", "--backend", "cudnn"): "backend 'cudnn' needs CUDA",
             ("demo", "--device", "cpu", "--world-size", "3", "--seq-len", "100"): "seq_len 100 does not split into 6",
             ("check", "--device", "cpu", "--fail-rank", "5"): "fail_rank 5 is not a rank of this job: it has 2 ranks",
             ("check", "--config", "configs"): "config configs is a folder; give one YAML file",
             ("check", "--ray-address", "auto"): "--ray-address is for --launcher ray"}
    for argv, words in cases.items():
        assert words in refused(capsys, *argv, "--set", f"out={tmp_path}"), argv
    assert not list(tmp_path.iterdir()), "no run may start"


def test_verbose_shows_the_traceback_of_a_user_error(capsys):
    assert cli.main(["check", "--device", "cpu", "--fail-rank", "5"]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert cli.main(["-v", "check", "--device", "cpu", "--fail-rank", "5"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.endswith("fa3dist: error: fail_rank 5 is not a rank of "
                                                                        "this job: it has 2 ranks (0 to 1)\n")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_bench_ring_on_a_cpu_points_to_a_config_that_fits(capsys, tmp_path):
    """It suggested --set device=cpu, which then asked for 2 TB."""
    assert "configs/bench_ring_cpu.yaml" in refused(capsys, "bench", "ring")
    assert "does not fit on cpu" in refused(capsys, "bench", "ring", "--set", "device=cpu")
    run = fa3dist("bench", "ring", "--config", "configs/bench_ring_cpu.yaml", "--out", str(tmp_path))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Ring schedule on one GPU" in run.stdout and list(tmp_path.glob("ring-*.json"))


def test_ray_address_without_a_cluster_names_our_flag():
    from ray._private.services import find_gcs_addresses

    if find_gcs_addresses():
        pytest.skip("a Ray cluster runs on this machine")
    run = subprocess.run([sys.executable, "-m", "fa3dist.cli", "check", "--launcher", "ray", "--ray-address", "auto"],
                         capture_output=True, text=True, timeout=120, env=dict(os.environ, RAY_ADDRESS=""))
    assert run.returncode == 2
    assert run.stderr.splitlines()[-1] == ("fa3dist: error: --ray-address auto: no Ray cluster could be joined there "
                                           "(Could not find any running Ray instance); start one with `ray start "
                                           "--head`, or leave --ray-address out to start a local one"), run.stderr
