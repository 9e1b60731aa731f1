#!/usr/bin/env bash
# One device call: install, GPU tests of the kernels, then a config sweep. Results under $OUT.
# Usage (on the device): bash tools/device_kernels.sh "<pytest -k expr>" "<sweep args>"
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.version.cuda, torch.backends.cudnn.version())" | tee -a "$OUT/gpu.txt"
python3 -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | tail -2
if [ -n "${1:-}" ]; then
  timeout "${TEST_TIMEOUT:-300}" python3 -m pytest tests/gpu -q -x -p no:cacheprovider -k "$1" 2>&1 | tail -40 | tee "$OUT/gpu_tests.txt"
fi
if [ -n "${2:-}" ]; then
  timeout "${SWEEP_TIMEOUT:-300}" python3 tools/sweep_configs.py $2 --out "$OUT/sweep.json" 2>&1 | tee "$OUT/sweep.txt" | tail -80
fi
