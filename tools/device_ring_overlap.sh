#!/usr/bin/env bash
# Does NCCL's channel/CTA use change the contention between the attention kernels and the ring's
# transfers? And does NCCL's copy-engine path for P2P help? On 2 GPUs, time one ring fwd+bwd at 8K
# tokens/GPU (tools/profile_ring.py --timing-only: with the check, without it, without communication)
# under each setting below. NCCL stays the default transport; unknown variables are ignored by older
# NCCL versions (the NCCL version is recorded). Usage: bash tools/device_ring_overlap.sh [BACKEND...]
# (default: auto cudnn). Results: one JSON line per (setting, backend) in $OUT/overlap.jsonl.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q -e . --no-deps --no-build-isolation > /dev/null 2>&1
python3 -c "import torch; print('torch', torch.__version__, 'nccl', torch.cuda.nccl.version())" | tee "$OUT/overlap_env.txt"
SETTINGS=(
  "default|"
  "max_nchannels_2|NCCL_MAX_NCHANNELS=2"
  "max_nchannels_4|NCCL_MAX_NCHANNELS=4"
  "max_nchannels_8|NCCL_MAX_NCHANNELS=8"
  "max_p2p_nchannels_2|NCCL_MAX_P2P_NCHANNELS=2"
  "max_p2p_nchannels_8|NCCL_MAX_P2P_NCHANNELS=8"
  "max_ctas_4|NCCL_MAX_CTAS=4"
  "cta_policy_efficiency|NCCL_CTA_POLICY=1"
  "copy_engine_p2p|NCCL_P2P_USE_CUDA_MEMCPY=1"
  "high_priority_streams|"
)
for backend in ${@:-auto cudnn}; do
  for setting in "${SETTINGS[@]}"; do
    name=${setting%%|*}; vars=${setting#*|}
    flags=""; [ "$name" = high_priority_streams ] && flags=--high-priority
    line=$(env $vars CUDA_VISIBLE_DEVICES=0,1 timeout 150 torchrun --nproc-per-node 2 tools/profile_ring.py --timing-only \
             --tokens-per-rank 8192 --iters 20 --backend "$backend" $flags --out /tmp/prof 2> "$OUT/overlap_${name}_$backend.err" \
           | grep ms_per_iter)
    echo "{\"setting\": \"$name\", \"env\": \"$vars\", \"result\": ${line:-null}}" | tee -a "$OUT/overlap.jsonl"
  done
done
