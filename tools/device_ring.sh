#!/usr/bin/env bash
# Ring checks and measurements for issue 13 on a host with 2 GPUs. Usage: bash tools/device_ring.sh STEP...
# Steps (each fits one 10-minute call; run them in separate calls when time is short):
#   tests       NCCL ring tests (error vs one GPU), no host-device sync in a ring call
#               (torch.cuda.set_sync_debug_mode), ranks that disagree, the long ring (merge at 32K)
#   timing      tools/profile_ring.py --timing-only at 8K tokens/GPU: with the check, without it, no
#               communication; backends auto (Triton) and cudnn
#   scaling     bench scaling on 1 and 2 GPUs, 8K and 16K tokens/GPU, causal fwd+bwd, with peak_mem_gib;
#               backends auto and cudnn (SCALING_BACKENDS to choose)
#   maxcontext  bench scaling --max-context on 2 GPUs (MC_BACKEND, default auto; MC_FRACTION, default 0.67):
#               peak memory at 32K..256K tokens/GPU, the predicted longest sequence, one confirming run
# Everything lands in $OUT/ring.tar.gz (rewritten after every step) and $OUT/steps.txt.
set -u
OUT=${OUT:-/tmp/out}; W=$OUT/ring; mkdir -p "$W"
export PYTHONUNBUFFERED=1
log() { echo "== $(date +%T) $*" | tee -a "$OUT/steps.txt"; tar czf "$OUT/ring.tar.gz" -C "$W" .; }
nvidia-smi --query-gpu=name,memory.total --format=csv > "$W/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'nccl', torch.cuda.nccl.version())" >> "$W/gpu.txt"
python3 -m pip install -q -e . --no-deps --no-build-isolation > /dev/null 2>&1
scaling() {  # backend
  timeout 280 python3 -m fa3dist.cli bench scaling --config configs/scaling_h100x4.yaml --launcher torchrun \
    --world-size 2 --out "$W/results" --set "world_sizes=[1, 2]" --set "tokens_per_rank=[8192, 16384]" \
    --set "causal=[true]" --set "passes=[fwd+bwd]" --set "backend=$1" --set "out=$W/runs" \
    > "$W/scaling_$1.txt" 2>&1
  tail -12 "$W/scaling_$1.txt"
}
for step in "$@"; do
  log "$step"
  case $step in
    tests) CUDA_VISIBLE_DEVICES=0,1 timeout 500 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_ring_sync_gpu.py \
             tests/gpu/test_ring_nccl_gpu.py tests/gpu/test_ring_long_gpu.py > "$W/tests.txt" 2>&1
           tail -5 "$W/tests.txt" ;;
    timing) for backend in auto cudnn; do
              CUDA_VISIBLE_DEVICES=0,1 timeout 240 torchrun --nproc-per-node 2 tools/profile_ring.py --timing-only \
                --tokens-per-rank 8192 --iters 20 --backend $backend --out "$W/prof" > "$W/timing_$backend.txt" 2>&1
              grep ms_per_iter "$W/timing_$backend.txt" || tail -5 "$W/timing_$backend.txt"
            done ;;
    scaling) for backend in ${SCALING_BACKENDS:-auto cudnn}; do scaling "$backend"; done ;;
    maxcontext) CUDA_VISIBLE_DEVICES=0,1 timeout 580 python3 -m fa3dist.cli bench scaling --max-context \
                  --config configs/scaling_h100x4.yaml --launcher torchrun --world-size 2 --out "$W/results" \
                  --set "backend=${MC_BACKEND:-auto}" --set "causal=[true]" --set timeout_s=1800 \
                  --set "max_context_confirm_fraction=${MC_FRACTION:-0.67}" --set "out=$W/runs" \
                  --set "max_context_tokens_per_rank=[32768, 65536, 131072, 262144]" > "$W/maxcontext.txt" 2>&1
                tail -14 "$W/maxcontext.txt" ;;
    *) echo "unknown step $step" ;;
  esac
done
log "done"
