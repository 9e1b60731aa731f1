#!/usr/bin/env bash
# One device call on a 4-GPU host: NCCL ring tests, the demo on 2 GPUs (cuDNN), the ring bench,
# and the scaling bench through torchrun and Ray. Everything lands in $OUT/bundle.tar.gz.
set -u
OUT=${OUT:-/tmp/out}; W=$OUT/work; mkdir -p "$W"
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled
log() { echo "== $(date +%T) $*" | tee -a "$W/steps.txt"; tar czf "$OUT/bundle.tar.gz" -C "$W" .; }
nvidia-smi --query-gpu=name,memory.total --format=csv > "$W/gpu.txt"; nvidia-smi topo -m >> "$W/gpu.txt"
python3 -m pip install -q -e . --no-deps --no-build-isolation > /dev/null 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > /dev/null 2>&1
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
log "nccl ring tests"; timeout 200 python3 -m pytest tests/gpu/test_ring_nccl_gpu.py -q -p no:cacheprovider > "$W/nccl_tests.txt" 2>&1; tail -3 "$W/nccl_tests.txt"
log "demo 2 GPUs cudnn"; CUDA_VISIBLE_DEVICES=0,1 timeout 120 python3 -m fa3dist.cli demo --backend cudnn --seq-len 32768 --heads 32 --kv-heads 8 --head-dim 128 > "$W/demo_cudnn_2gpu.txt" 2>&1; tail -4 "$W/demo_cudnn_2gpu.txt"
log "scaling torchrun"; timeout "${SCALING_TIMEOUT:-330}" python3 -m fa3dist.cli bench scaling --config configs/scaling_h100x4.yaml --launcher torchrun --out "$W/results" --plot $SCALING_SET > "$W/scaling_torchrun.txt" 2>&1; tail -25 "$W/scaling_torchrun.txt"
log "scaling ray"; timeout "${RAY_TIMEOUT:-120}" python3 -m fa3dist.cli bench scaling --config configs/scaling_h100x4.yaml --launcher ray --out "$W/results" --plot $RAY_SET > "$W/scaling_ray.txt" 2>&1; tail -12 "$W/scaling_ray.txt"
log "ring bench"; CUDA_VISIBLE_DEVICES=0 timeout "${RING_TIMEOUT:-100}" python3 -m fa3dist.cli bench ring --out "$W/results" --plot $RING_SET > "$W/ring.txt" 2>&1; tail -12 "$W/ring.txt"
log "done"
