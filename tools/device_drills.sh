#!/usr/bin/env bash
# Fault drills on a host of 2 GPUs under torchrun and Ray with NCCL (issue 14), in one device call.
# Needs Ray's wheels carried as .whl (build them once with: bash ../shared/tools/device-wheels.sh).
#   run(command="bash tools/device_drills.sh", carry=[".whl"], kind="nvidia-h200-x2")   # all steps, ~8 min
#   bash tools/device_drills.sh matrix rows                                             # some steps
# Steps, each logged under $OUT (and tarred to $OUT/bundle.tar.gz after every step):
#   checks: fa3dist check under torchrun and under Ray: the launchers run an NCCL job to the end; and a
#           CPU head node driving the GPUs: a Ray cluster started with the GPUs, and the driver run
#           with CUDA_VISIBLE_DEVICES="" (it sees no GPU) asking for --device cuda.
#   matrix: the drill matrix (tools/drill_matrix.py): torchrun and Ray x raise, exit, kill, hang x
#           rank 0 and rank 1 of 2, process-group timeout 20 s: the rank named, how, and the seconds
#           from the failure to the error, in $OUT/drills-h200x2.md and .json.
#   rows:   the issue's rows as a user types them: exit code, wall time and the error's first line,
#           in $OUT/issue-rows.md.
set -u
STEPS=${*:-checks matrix rows}
OUT=${OUT:-/tmp/out}; W=$OUT/work; mkdir -p "$W"
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled NCCL_NVLS_ENABLE=0
log() { echo "== $(date +%T) $*" | tee -a "$W/steps.txt"; tar czf "$OUT/bundle.tar.gz" -C "$W" .; }
nvidia-smi --query-gpu=name,memory.total --format=csv > "$W/gpu.txt"
python3 -m pip install -q -e . --no-deps --no-build-isolation > /dev/null 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > /dev/null 2>&1
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
python3 -c "import ray, torch; print('ray', ray.__version__, 'torch', torch.__version__, 'gpus', torch.cuda.device_count())" \
  | tee -a "$W/gpu.txt"

checks() {
for launcher in torchrun ray; do
  timeout 180 python3 -m fa3dist.cli check --launcher "$launcher" --set out="$W/runs" > "$W/check-$launcher.txt" 2>&1
  echo "check --launcher $launcher: exit $?"; tail -2 "$W/check-$launcher.txt"
done | tee -a "$W/steps.txt"
python3 -m ray.scripts.scripts start --head --port 6390 --num-gpus 2 --include-dashboard false \
  --disable-usage-stats > "$W/ray-start.txt" 2>&1
CUDA_VISIBLE_DEVICES="" timeout 180 python3 -m fa3dist.cli check --launcher ray --ray-address 127.0.0.1:6390 \
  --device cuda --set out="$W/runs" > "$W/check-cpu-head.txt" 2>&1
echo "cpu head: exit $?" | tee -a "$W/steps.txt"; tail -2 "$W/check-cpu-head.txt" | tee -a "$W/steps.txt"
python3 -m ray.scripts.scripts stop > /dev/null 2>&1  # this machine runs nothing else
}

matrix() {
timeout 420 python3 tools/drill_matrix.py --device cuda --launchers torchrun ray --ranks 0:2 1:2 --timeout-s 20 \
  --ray-cpus 8 --out "$OUT" --work "$W/runs/drills" --name drills-h200x2 > "$W/drills.txt" 2>&1
echo "drill matrix: exit $?" | tee -a "$W/steps.txt"; tail -25 "$W/drills.txt"
}

row() {  # the command line after "fa3dist"
  local start=$EPOCHREALTIME code first
  timeout 200 python3 -m fa3dist.cli "$@" --set out="$W/runs" > "$W/row.out" 2> "$W/row.err"
  code=$?
  first=$(grep -m1 "^fa3dist: error:" "$W/row.err" || tail -1 "$W/row.out")
  printf '| `fa3dist %s` | %s | %s | %s |\n' "$*" "$code" "$(awk "BEGIN {printf \"%.1f\", $EPOCHREALTIME - $start}")" \
    "$first" >> "$OUT/issue-rows.md"
  cat "$W/row.err" >> "$W/rows-stderr.txt"
}

rows() {
printf '| command | exit | s | first line |\n|---|---|---|---|\n' > "$OUT/issue-rows.md"
row check --launcher torchrun --fail-rank 1 --fail-mode raise
row check --launcher torchrun --fail-rank 1 --fail-mode hang --timeout-s 15
row check --launcher ray --fail-rank 0 --fail-mode hang --timeout-s 20
row check --launcher ray --fail-rank 1 --fail-mode kill --timeout-s 20
row demo --launcher torchrun --world-size 4
cat "$OUT/issue-rows.md"
}

for step in $STEPS; do
  log "$step"
  case $step in
    checks|matrix|rows) $step ;;
    *) echo "unknown step $step" ;;
  esac
done
log "done"
