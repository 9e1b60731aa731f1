"""The command line: help, the demo end to end over local processes, and error exits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


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
