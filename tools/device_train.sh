#!/usr/bin/env bash
# fa3dist train at 256K tokens of context on 2 H200s (configs/train_h200x2.yaml, torchrun, NCCL).
# Usage: bash tools/device_train.sh MODE...   with MODE eager or compile (torch.compile, fullgraph);
# one mode per device call keeps each call under 10 minutes. TRAIN_STEPS (default 100) sets the
# steps, TRAIN_TIMEOUT (default 540 s) bounds each run. For each mode it writes to $OUT/train-<mode>/:
# train_log.jsonl, loss.png, result.json, summary.md (tokens/s, MFU, peak memory per GPU), the rank
# logs and the console output. Checkpoints stay under /tmp (1.7 GB), out of $OUT.
set -u
OUT=${OUT:-/tmp/out}; RUNS=/tmp/fa3dist-train; mkdir -p "$OUT" "$RUNS"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0} \
  TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1} NVSHMEM_DISABLE_NVLS=${NVSHMEM_DISABLE_NVLS:-1}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt"
python3 -m pip install -q -e . --no-deps --no-build-isolation > /dev/null 2>&1
for mode in "$@"; do
  case $mode in
    eager) flags="" ;;
    compile) flags="--compile" ;;
    *) echo "unknown mode $mode (eager or compile)"; continue ;;
  esac
  run=$RUNS/$mode; dest=$OUT/train-$mode; rm -rf "$run"; mkdir -p "$dest"
  echo "== $(date +%T) $mode: ${TRAIN_STEPS:-100} steps"
  timeout "${TRAIN_TIMEOUT:-540}" python3 -m fa3dist.cli train --config configs/train_h200x2.yaml --launcher torchrun \
    --out "$run" --set steps="${TRAIN_STEPS:-100}" --plot $flags > "$dest/console.txt" 2>&1
  echo "exit code $?" >> "$dest/console.txt"
  tail -5 "$dest/console.txt"
  cp "$run"/train_log.jsonl "$run"/loss.png "$run"/result.json "$run"/rank*.log "$dest"/ 2>/dev/null
  python3 -c "import sys; from fa3dist.train.metrics import summarize_run; print(summarize_run(sys.argv[1], sys.argv[2]))" \
    "$run" "configs/train_h200x2.yaml ($mode)" | tee "$dest/summary.md"
done
