#!/usr/bin/env bash
# One device call for the Gluon kernels on an H200: the steps named, in order, each under a timeout.
# Usage (on the device, from the repo root): bash tools/device_gluon.sh STEP...
#   smoke       tools/gluon_smoke.py: one small launch of each Gluon kernel (a hang stops the call here)
#   tests       the Gluon GPU tests (tests/gpu/test_gluon_{fwd,bwd}_gpu.py)
#   sweep-fwd   tools/gluon_sweep.py --pass fwd $SWEEP_ARGS
#   sweep-bwd   tools/gluon_sweep.py --pass bwd $SWEEP_ARGS
#   sweep-fp8   tools/gluon_sweep.py --pass fp8 $SWEEP_ARGS --fp8-ceiling $FP8_SWEEP_ARGS (its flags win)
# With fa3's wheels installed (tools/device_session.sh fa3) the sweeps time fa3 too.
# Logs and sweep JSON go to $OUT (bundle.tgz); the sweep tables are printed last.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/logs"
export PYTHONUNBUFFERED=1
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/logs/gpu.txt"
python3 -m pip install -q -e . --no-deps --no-build-isolation > /dev/null 2>&1
run() {  # name, timeout, command...
  local name=$1 limit=$2; shift 2
  echo "== $(date +%T) $name" | tee -a "$OUT/logs/steps.txt"
  timeout -s KILL "$limit" "$@" > "$OUT/logs/$name.txt" 2>&1; local rc=$?
  echo "$name rc $rc" | tee -a "$OUT/logs/steps.txt"; tail -${TAIL:-6} "$OUT/logs/$name.txt"
  return $rc
}
for step in "$@"; do
  case $step in
    smoke) TAIL=12 run smoke "${SMOKE_TIMEOUT:-150}" python3 tools/gluon_smoke.py || { echo "smoke failed: stopping"; break; } ;;
    tests) run tests "${TEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider --maxfail=5 \
             ${TEST_FILES:-tests/gpu/test_gluon_bwd_gpu.py tests/gpu/test_gluon_fwd_gpu.py} ;;
    sweep-fwd|sweep-bwd|sweep-fp8) pass=${step#sweep-}
             TAIL=0 run "$step" "${SWEEP_TIMEOUT:-240}" python3 tools/gluon_sweep.py --pass "$pass" \
               --out "$OUT/logs/gluon_sweep_$pass.json" ${SWEEP_ARGS:-} \
               $([ "$pass" = fp8 ] && echo --fp8-ceiling ${FP8_SWEEP_ARGS:-}) ;;
    *) echo "unknown step $step" ;;
  esac
done
grep -h "^fwd D=\|^bwd D=\|^fp8 D=\|^cuBLAS" "$OUT"/logs/sweep-*.txt 2>/dev/null
tar czf "$OUT/bundle.tgz" -C "$OUT" logs && rm -rf "$OUT/logs"
