#!/usr/bin/env bash
# Device calls on a 4-GPU host. Usage: bash tools/device_multigpu.sh STEP...
# Steps: nccl (NCCL ring tests), demo (the demo on 2 GPUs, cuDNN, 2x16K tokens), torchrun and ray
# (the scaling bench through each launcher; extra --set flags in $SCALING_SET / $RAY_SET), ring
# (the ring bench on GPU 0). Ray needs the wheels of ../shared/tools/device-wheels.sh carried as .whl.
# Everything lands in $OUT/bundle.tar.gz, rewritten after every step.
set -u
OUT=${OUT:-/tmp/out}; W=$OUT/work; mkdir -p "$W"
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled
log() { echo "== $(date +%T) $*" | tee -a "$W/steps.txt"; tar czf "$OUT/bundle.tar.gz" -C "$W" .; }
nvidia-smi --query-gpu=name,memory.total --format=csv > "$W/gpu.txt"; nvidia-smi topo -m >> "$W/gpu.txt"
python3 -m pip install -q -e . --no-deps --no-build-isolation > /dev/null 2>&1
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > /dev/null 2>&1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
scaling() {  # launcher, timeout, extra flags
  timeout "$2" python3 -m fa3dist.cli bench scaling --config configs/scaling_h100x4.yaml --launcher "$1" \
    --out "$W/results" --plot $3 > "$W/scaling_$1.txt" 2>&1; tail -30 "$W/scaling_$1.txt"
}
for step in "$@"; do
  log "$step"
  case $step in
    nccl) timeout 200 python3 -m pytest tests/gpu/test_ring_nccl_gpu.py -q -p no:cacheprovider > "$W/nccl_tests.txt" 2>&1
          tail -3 "$W/nccl_tests.txt" ;;
    demo) CUDA_VISIBLE_DEVICES=0,1 timeout 120 python3 -m fa3dist.cli demo --backend cudnn --seq-len 32768 --heads 32 \
            --kv-heads 8 --head-dim 128 > "$W/demo_cudnn_2gpu.txt" 2>&1; tail -6 "$W/demo_cudnn_2gpu.txt" ;;
    torchrun) scaling torchrun "${SCALING_TIMEOUT:-330}" "${SCALING_SET:-}" ;;
    ray) scaling ray "${RAY_TIMEOUT:-150}" "${RAY_SET:-}" ;;
    ring) CUDA_VISIBLE_DEVICES=0 timeout "${RING_TIMEOUT:-240}" python3 -m fa3dist.cli bench ring --out "$W/results" \
            --plot > "$W/ring.txt" 2>&1; tail -12 "$W/ring.txt" ;;
    *) echo "unknown step $step" ;;
  esac
done
log "done"
