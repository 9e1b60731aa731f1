#!/usr/bin/env bash
# The GPU runs of one session on a 2-GPU H200 host, in steps that fit 10-minute device calls.
# Usage (on the device, from the repo root): bash tools/device_session.sh STEP...
#   stash       keep the first half of the fa3 wheels in $FA3_STASH (the wheels: the team's device-fa3-wheels.sh
#               tool builds .fa3a and .fa3b; carry .fa3a)
#   fa3         install the fa3 wheels (carry .fa3b, right after `stash` on the same warm machine)
#   timing      tools/profile_ring.py --timing-only at 8K tokens/GPU: with the rank check, without, no comm
#   ringtests   NCCL ring tests on 2 GPUs (every installed backend), no host sync, the long ring
#   gputests    one-GPU tests of the fa3 backend and the Gluon forward (GPU 0)
#   kernel      fa3dist bench kernel with configs/bench_kernel_h200.yaml (GPU 0)
#   ring        fa3dist bench ring, S = 64K, W = 4 and 8, backends fa3 and triton (GPU 1)
#   scaling     fa3dist bench scaling (configs/scaling_h200x2.yaml) under torchrun, backends fa3 and cudnn
# `kernel` and `ring` run side by side when both are asked for (one on each GPU).
# Results go to $OUT/results (JSON, Markdown, PNG), logs to $OUT/logs; $OUT/steps.txt has the timeline.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/results" "$OUT/logs"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
STASH=${FA3_STASH:-$HOME/fa3stash}  # where the first half of the fa3 wheels waits for the second
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:${PYTHONPATH:-}
log() { echo "== $(date +%T) $*" | tee -a "$OUT/steps.txt"; }
python3 -m pip install -q -e . --no-deps --no-build-isolation > /dev/null 2>&1
run() {  # name, timeout, command...
  local name=$1 limit=$2; shift 2
  log "$name"
  timeout -s KILL "$limit" "$@" > "$OUT/logs/$name.txt" 2>&1; echo "$name rc $?" | tee -a "$OUT/steps.txt"
  tail -${TAIL:-8} "$OUT/logs/$name.txt"
}
steps=" $* "
for step in "$@"; do
  case $step in
    stash) mkdir -p "$STASH" && cp .fa3a/* "$STASH"/ && log "stashed" ;;
    fa3) cat "$STASH/part_aa" .fa3b/part_ab \
           > "$STASH/nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl" \
         && rm -f "$STASH/part_aa" \
         && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$STASH"/*.whl \
         && export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:${PYTHONPATH:-} \
         && python3 -c "from fa3dist.kernels.fa3 import unavailable_reason as r; print('fa3:', r() or 'ok')" ;;
    timing) for backend in auto cudnn; do
              run "timing_$backend" 150 torchrun --nproc-per-node 2 tools/profile_ring.py --timing-only \
                --tokens-per-rank 8192 --iters 20 --backend "$backend" --out "$OUT/logs/prof_$backend"
            done ;;
    ringtests) run ringtests 330 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_ring_sync_gpu.py \
                 tests/gpu/test_ring_nccl_gpu.py tests/gpu/test_ring_long_gpu.py ;;
    gputests) CUDA_VISIBLE_DEVICES=0 run gputests 240 python3 -m pytest -q -x -p no:cacheprovider \
                tests/gpu/test_fa3_gpu.py tests/gpu/test_gluon_fwd_gpu.py ;;
    kernel) if [[ $steps == *" ring "* ]]; then  # the ring bench on GPU 1 meanwhile
              (CUDA_VISIBLE_DEVICES=1 bash tools/device_session.sh ring_only > "$OUT/logs/ring_side.txt" 2>&1) &
            fi
            CUDA_VISIBLE_DEVICES=0 run kernel 420 python3 -m fa3dist.cli bench kernel \
              --config configs/bench_kernel_h200.yaml --out "$OUT/results" --plot
            wait ;;
    ring) [[ $steps == *" kernel "* ]] || bash tools/device_session.sh ring_only ;;
    ring_only) for backend in fa3 triton; do
                 run "ring_$backend" 200 python3 -m fa3dist.cli bench ring --out "$OUT/results" --plot \
                   --set seq_len=65536 --set "world_sizes=[4, 8]" --set "backend=$backend"
               done ;;
    scaling) for backend in fa3 cudnn; do
               run "scaling_$backend" 240 python3 -m fa3dist.cli bench scaling --config configs/scaling_h200x2.yaml \
                 --launcher torchrun --world-size 2 --out "$OUT/results" --plot --set "backend=$backend" \
                 --set "out=$OUT/logs/runs"
             done ;;
    *) echo "unknown step $step" ;;
  esac
done
log done
tar czf "$OUT/bundle.tgz" -C "$OUT" results logs steps.txt && rm -rf "$OUT/results" "$OUT/logs"
