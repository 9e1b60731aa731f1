#!/usr/bin/env bash
# Device calls for the kernel layer (issue 11 item 5, issue 12 item 2). Usage: bash tools/device_kernel_layer.sh STEP...
# Steps: tests (the Triton GPU tests, incl. the fp32 accumulation into buffers), demo (fa3dist demo on
# 2 GPUs twice: cold, then with the tuned configs from the on-disk cache), times (tools/kernel_times.py:
# per-kernel times of bwd against bwd into fp32 buffers, one call and the ring's two calls).
# Each step fits one 10-minute call. Everything lands in $OUT.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt"
python3 -m pip install -q -e . --no-deps --no-build-isolation > /dev/null 2>&1
for step in "$@"; do
  echo "== $(date +%T) $step" | tee -a "$OUT/steps.txt"
  case $step in
    tests) FA3DIST_CACHE_DIR="$OUT/cache-tests" timeout "${TEST_TIMEOUT:-560}" python3 -m pytest -q -p no:cacheprovider \
             tests/gpu/test_triton_bwd_gpu.py tests/gpu/test_triton_fwd_gpu.py > "$OUT/gpu_tests.txt" 2>&1
           tail -30 "$OUT/gpu_tests.txt" ;;
    demo) for run in cold warm; do  # the same fresh cache dir: the second run reads what the first tuned
            start=$SECONDS
            CUDA_VISIBLE_DEVICES=0,1 FA3DIST_CACHE_DIR="$OUT/cache-demo" timeout 250 python3 -m fa3dist.cli demo \
              > "$OUT/demo_$run.txt" 2>&1
            rc=$?
            echo "demo $run: rc $rc in $((SECONDS - start)) s" | tee -a "$OUT/demo_times.txt"
            tail -4 "$OUT/demo_$run.txt"
          done
          ls "$OUT/cache-demo/autotune" | wc -l | sed 's/^/cached choices: /' | tee -a "$OUT/demo_times.txt" ;;
    times) CUDA_VISIBLE_DEVICES=0 FA3DIST_CACHE_DIR="$OUT/cache-times" timeout "${TIMES_TIMEOUT:-560}" \
             python3 tools/kernel_times.py --out "$OUT/kernel_times.json" > "$OUT/kernel_times.txt" 2>&1
           tail -20 "$OUT/kernel_times.txt" ;;
    *) echo "unknown step $step (tests, demo, times)" ;;
  esac
done
