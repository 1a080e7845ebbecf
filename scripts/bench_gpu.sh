#!/usr/bin/env bash
# One-call GPU benchmark (~4 min on one H100/H200): every engine on Small, DDP on Medium, XL with ZeRO-3
# and FSDP + checkpointing. Wheels for packages the GPU image lacks (deepspeed and its needs) may be
# carried in .whl/. Results: $OUT/bench.jsonl (one JSON object per run) and $OUT/bench.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-${1:-bench_out}}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
run() { timeout 180 python3 scripts/bench.py --json "$OUT/bench.jsonl" --steps 10 --warmup 3 "$@" 2>&1 | grep -E "^model=|Error|error" | tail -n 3 | tee -a "$OUT/bench.log"; }
run --model small --backend ddp --micro-batch-size 16
run --model small --backend fsdp --micro-batch-size 16 --no-baseline
run --model small --backend zero2 --micro-batch-size 16 --no-baseline
run --model medium --backend ddp --micro-batch-size 16
run --model xl --backend zero3 --micro-batch-size 8 --gradient-checkpointing --no-baseline
run --model xl --backend fsdp --micro-batch-size 8 --gradient-checkpointing --no-baseline
run --model xl --backend ddp --micro-batch-size 8 --no-baseline
