#!/usr/bin/env bash
# Install greentext_dist and its test tools into the current Python environment.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch first, pinned: an unpinned torch (or one pulled in by another package) can be a multi-GB CUDA build.
# On a CPU-only machine this resolves to the CPU wheel; on a GPU machine to PyPI's CUDA wheel.
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q -e ".[test]"
"$PY" -c "import torch, transformers, deepspeed, datasets; print(f'torch {torch.__version__}, transformers {transformers.__version__}, deepspeed {deepspeed.__version__}, datasets {datasets.__version__}')" 2>/dev/null | tail -n 1
