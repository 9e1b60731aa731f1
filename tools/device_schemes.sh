#!/usr/bin/env bash
# Validate the cost model (fa3dist.plan) on 2 GPUs of one host in one call (under 10 minutes):
#   1. Ulysses over NCCL against one GPU (tests/gpu/test_ulysses_nccl_gpu.py, W = 2);
#   2. bench scaling --scheme flat and --scheme ulysses at 8K and 32K tokens per GPU (causal, fwd and
#      fwd+bwd, H=32/8, D=128, bf16); every ring row carries the model's predicted_ms, with this run's
#      one-GPU rows as kernel rates and the send/recv and all-to-all links measured at the start;
#   3. a predicted-against-measured table (schemes-h200x2.md): per point, both schemes' measured and
#      predicted times, and whether the model picks the scheme that measured faster.
# Usage (on the GPU machine, from the repository root): bash tools/device_schemes.sh
# Everything lands in $OUT/bundle.tar.gz (rewritten after every step) and $OUT/results.
set -u
OUT=${OUT:-/tmp/out}; W=$OUT/work; R=$OUT/results; mkdir -p "$W" "$R"
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0,1}
log() { echo "== $(date +%T) $*" | tee -a "$W/steps.txt"; tar czf "$OUT/bundle.tar.gz" -C "$OUT" work results; }
nvidia-smi --query-gpu=name,memory.total --format=csv > "$W/gpu.txt"; nvidia-smi topo -m >> "$W/gpu.txt"
python3 -m pip install -q -e . --no-deps --no-build-isolation > /dev/null 2>&1

log "ulysses over nccl"
timeout 120 python3 -m pytest tests/gpu/test_ulysses_nccl_gpu.py -q -p no:cacheprovider > "$W/nccl_tests.txt" 2>&1
tail -3 "$W/nccl_tests.txt"

for scheme in flat ulysses; do
  log "bench scaling --scheme $scheme"
  timeout 180 python3 -m fa3dist.cli bench scaling --config configs/scaling_h100x4.yaml --launcher torchrun \
    --scheme "$scheme" --out "$R" --set 'world_sizes=[1,2]' --set 'tokens_per_rank=[8192,32768]' \
    --set 'causal=[true]' --set 'passes=[fwd,fwd+bwd]' --set torch_cp=false --set min_iters=3 --set max_iters=8 \
    --set budget_ms=800 --set plan_config=configs/plan_h200x2.yaml --set timeout_s=160 --set "out=$W/runs" \
    > "$W/scaling_$scheme.txt" 2>&1
  tail -12 "$W/scaling_$scheme.txt"
done

log "predicted against measured"
python3 - "$R" > "$R/schemes-h200x2.md" <<'EOF'
import json, pathlib, sys
from fa3dist.bench.common import markdown_table
rows = []
for path in sorted(pathlib.Path(sys.argv[1]).glob("scaling-*x2-*.json")):
    rows += [r for r in json.loads(path.read_text())["rows"] if r["impl"] == "fa3dist" and r["world_size"] == 2]
by_point = {}
for r in rows:
    by_point.setdefault((r["tokens_per_rank"], r["pass"]), {})[r["scheme_used"]] = r
body = []
for (tokens, pass_), schemes in sorted(by_point.items()):
    for name, r in sorted(schemes.items()):
        faster = min(schemes, key=lambda s: schemes[s]["ms"])
        picked = min(schemes, key=lambda s: schemes[s]["predicted_ms"])
        body.append([tokens, pass_, name, r["ms"], r["predicted_ms"], r["predicted_ms"] / r["ms"], r["tflops"],
                     faster, picked, "yes" if faster == picked else "NO"])
print("Predicted (fa3dist.plan) against measured (bench scaling) on 2 GPUs, causal zigzag, H=32/8, D=128, bf16.\n")
print(markdown_table(["tokens/GPU", "pass", "scheme", "measured ms", "predicted ms", "predicted/measured",
                      "TFLOP/s/GPU", "faster (measured)", "model's pick", "agree"], body))
EOF
cat "$R/schemes-h200x2.md"
log "done"
