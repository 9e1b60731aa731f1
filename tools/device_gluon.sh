#!/usr/bin/env bash
# One device call for the Gluon forward on an H200: a smoke launch (killed if it hangs), the GPU
# tests, then the config sweep against cuDNN / tl / fa3. Results and logs under $OUT.
# Usage: bash tools/device_gluon.sh [TEST_TIMEOUT] [SWEEP_TIMEOUT] [SWEEP_ARGS...]
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
TEST_TIMEOUT=${1:-240}; SWEEP_TIMEOUT=${2:-200}; shift 2 2>/dev/null
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -m pip install -q -e . --no-deps --no-build-isolation > /dev/null 2>&1
timeout -s KILL 120 python3 - <<'PY' 2>&1 | tee "$OUT/smoke.txt"
import torch
from fa3dist.kernels import gluon_fwd as gf
from fa3dist.kernels.numerics import relative_error
from fa3dist.kernels.reference import reference_fwd
for d in gf.GLUON_HEAD_DIMS:
    for causal in (False, True):
        q, k, v = (torch.randn(1, 700, 4, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        out = torch.full_like(q, float("nan")); lse = torch.empty(1, 4, 700, device="cuda")
        gf.gluon_launch(q, k, v, d ** -0.5, causal, gf.GLUON_CONFIGS[d][0], out, lse, False)
        torch.cuda.synchronize()
        ref, ref_lse = reference_fwd(q.double(), k.double(), v.double(), softmax_scale=d ** -0.5, causal=causal)
        print(f"smoke D={d} causal={causal}: out err {relative_error(out, ref):.3g}, lse err {relative_error(lse, ref_lse):.3g}")
PY
rc=${PIPESTATUS[0]}
if [ "$rc" != 0 ]; then echo "smoke failed or hung (rc $rc): stopping"; exit 1; fi
timeout -s KILL "$TEST_TIMEOUT" python3 -m pytest tests/gpu/test_gluon_fwd_gpu.py -q -x -p no:cacheprovider \
  > "$OUT/gluon_tests.txt" 2>&1; echo "tests rc $?"; tail -25 "$OUT/gluon_tests.txt"
timeout -s KILL "$SWEEP_TIMEOUT" python3 tools/gluon_sweep.py --out "$OUT/gluon_sweep.json" "$@" \
  > "$OUT/gluon_sweep.txt" 2>&1; echo "sweep rc $?"; grep "^D=" "$OUT/gluon_sweep.txt" || tail -20 "$OUT/gluon_sweep.txt"
