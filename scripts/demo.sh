#!/usr/bin/env bash
# Set up, train the tiny GPT-2 on the bundled greentext sample on this CPU (~1.5 min), and sample from it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh
OUT=${DEMO_OUT:-runs/demo}
# Two CPU threads whatever the machine: a float sum's order follows the thread count, and the samples the README shows
# follow from every step's exact loss.
export OMP_NUM_THREADS=${DEMO_THREADS:-2}
"$PY" -m greentext_dist.train \
  --model tiny --dataset greentext_dist/data/demo_greentexts.jsonl \
  --seq-len 128 --global-batch-size 8 --micro-batch-size 8 --max-steps "${DEMO_STEPS:-200}" \
  --lr 4e-3 --min-lr 4e-4 --dropout 0 --precision fp32 --val-fraction 0 --log-every 20 \
  --resume never --overwrite --output-dir "$OUT"
"$PY" -m greentext_dist.generate "$OUT/final" --prompt "be me" --num-samples 3 --max-new-tokens 60 --seed 0
