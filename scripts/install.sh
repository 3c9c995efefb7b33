#!/usr/bin/env bash
# Install fastkd with everything its tests, benchmarks and demo need.
# The CUDA extension fastkd._C is compiled whenever a CUDA build of torch and a CUDA toolkit are
# present (no GPU needed); FASTKD_SKIP_CUDA_BUILD=1 skips it, FASTKD_FORCE_CUDA=1 demands it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install "torch>=2.11"
fi
"$PY" -m pip install "setuptools>=64" wheel ninja
# torch guesses CUDA_HOME from the nvcc on PATH (/usr/local/bin/nvcc -> /usr/local, where the link
# then fails on -lcudart); name the toolkit directory when there is one.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
    export CUDA_HOME=/usr/local/cuda
fi
# --no-build-isolation: build against the torch installed above instead of fetching another.
"$PY" -m pip install --no-build-isolation -e ".[test]"
