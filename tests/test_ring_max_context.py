"""``fa3dist bench scaling --max-context`` end to end on the CPU at tiny sizes (gloo, reference backend).

The reference backend's memory grows with S^2, so the prediction means nothing here; the test checks
the measurement, the fit and prediction arithmetic, and the confirming run.
"""

from __future__ import annotations

import json
import subprocess
import sys


def test_max_context_measures_fits_predicts_and_confirms(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "fa3dist.cli", "bench", "scaling", "--config", "configs/scaling_cpu.yaml",
         "--max-context", "--out", str(tmp_path), "--set", f"out={tmp_path / 'runs'}",
         "--set", "max_context_tokens_per_rank=[16, 32, 64]", "--set", "max_context_memory_gib=0.002"],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    (result,) = tmp_path.glob("maxcontext-cpux2-*-local.json")
    rows = json.loads(result.read_text())["rows"]
    measured = [r for r in rows if r["kind"] == "measured"]
    (predicted,) = [r for r in rows if r["kind"] == "predicted"]
    (confirmed,) = [r for r in rows if r["kind"] == "confirmed"]
    assert [r["tokens_per_rank"] for r in measured] == [16, 32, 64]
    peaks = [r["peak_mem_gib"] for r in measured]
    assert 0 < peaks[0] < peaks[1] < peaks[2]
    assert all(r["world_size"] == 2 and r["S"] == 2 * r["tokens_per_rank"] for r in rows)
    assert predicted["capacity_gib"] == 0.002
    per_token = predicted["fit_kib_per_token"] * 1024 / 2**30
    room = (predicted["capacity_gib"] - predicted["fit_base_gib"]) / per_token
    assert predicted["tokens_per_rank"] <= room < predicted["tokens_per_rank"] + 2  # rounded down to even
    assert confirmed["tokens_per_rank"] == int(predicted["tokens_per_rank"] * 0.67) // 2 * 2
    assert confirmed["peak_mem_gib"] > peaks[2] and confirmed["ms"] > 0
    assert confirmed["fits"] == (confirmed["peak_mem_gib"] <= 0.002)
    assert "longest sequence that fits is S = " in run.stdout
