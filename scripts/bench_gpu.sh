#!/usr/bin/env bash
# One-call GPU benchmark (~8 min on one H100/H200), most important runs first: Small with each engine
# (eager and torch.compile) against the bare loop and the HF Trainer, isolated packing's cost, Medium,
# and XL with FSDP / ZeRO-3 + checkpointing. Runs stop being started after $BUDGET_S seconds.
# Wheels for packages the GPU image lacks (deepspeed and its needs) may be carried in .whl/.
# Results: $OUT/bench.jsonl (one JSON object per run) and $OUT/bench.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-${1:-bench_out}}
BUDGET_S=${BUDGET_S:-480}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
start=$SECONDS
run() {
  if (( SECONDS - start > BUDGET_S )); then echo "skipped (time budget): $*" | tee -a "$OUT/bench.log"; return; fi
  local t0=$SECONDS
  timeout 200 python3 scripts/bench.py --json "$OUT/bench.jsonl" --steps 8 --warmup 3 --rounds 2 "$@" > "$OUT/last.log" 2>&1
  local rc=$?
  { grep -E "^model=" "$OUT/last.log" || { echo "FAILED rc=$rc: $*"; grep -E "Error|error" "$OUT/last.log" | tail -n 3; }; } | tee -a "$OUT/bench.log"
  echo "  ($((SECONDS - t0)) s: $*)" | tee -a "$OUT/bench.log"
}
run --model small --backend ddp --micro-batch-size 16
run --model small --backend fsdp --micro-batch-size 16 --compile --no-baseline
run --model xl --backend fsdp --micro-batch-size 8 --gradient-checkpointing --compile --no-baseline
run --model small --backend ddp --micro-batch-size 16 --compile --no-trainer
run --model small --backend fsdp --micro-batch-size 16 --compile --packing isolated --no-baseline
run --model medium --backend fsdp --micro-batch-size 16 --compile --no-baseline
run --model small --backend zero2 --micro-batch-size 16 --no-baseline
run --model xl --backend zero3 --micro-batch-size 8 --gradient-checkpointing --no-baseline
run --model medium --backend ddp --micro-batch-size 16 --no-trainer
run --model medium --backend zero2 --micro-batch-size 16 --no-baseline
run --model medium --backend zero3 --micro-batch-size 16 --no-baseline
