#!/usr/bin/env bash
# The whole test suite again on the oldest torch and Triton fastkd supports (torch 2.11, Triton 3.6:
# what the lent GPU machines run), in a virtual environment of its own, with the CUDA extension
# compiled against that torch's headers where a toolkit is present. The main job (scripts/test.sh)
# runs on the newest torch the package index gives.
#
#   bash scripts/test_compat.sh [pytest args]
#
# FASTKD_COMPAT_DIR (default /tmp/fastkd-compat) holds the environment (reused when present) and a
# copy of this working tree (tracked and untracked files, not ignored ones such as a built _C.so,
# which belongs to the main environment's torch). Needs PyPI: torch 2.11 is about 3 GB with its
# CUDA libraries.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DIR=${FASTKD_COMPAT_DIR:-/tmp/fastkd-compat}
TORCH_PIN=${FASTKD_COMPAT_TORCH:-torch==2.11.0}
TRITON_PIN=${FASTKD_COMPAT_TRITON:-triton==3.6.0}
# Triton 3.6's interpreter (how the Triton kernels are tested on the CPU) breaks on numpy 2.4
# (loop bounds read from tensors); numpy 2.3 is the newest it runs with.
NUMPY_PIN=${FASTKD_COMPAT_NUMPY:-numpy<2.4}

if [ ! -x "$DIR/venv/bin/python" ]; then
    "$PY" -m venv "$DIR/venv"
fi
VPY="$DIR/venv/bin/python"
"$VPY" -m pip install -q "$TORCH_PIN" "$TRITON_PIN" "$NUMPY_PIN" "setuptools>=64" wheel ninja

rm -rf "$DIR/src"
mkdir -p "$DIR/src"
git ls-files -z --cached --others --exclude-standard \
    | tar --null -T - --ignore-failed-read -cf - 2>/dev/null | tar -xf - -C "$DIR/src"

cd "$DIR/src"
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
    export CUDA_HOME=/usr/local/cuda
fi
"$VPY" -m pip install -q --no-build-isolation -e ".[test]" "$TORCH_PIN" "$TRITON_PIN" "$NUMPY_PIN"
"$VPY" -c "import torch, triton, fastkd; print('compat job: torch', torch.__version__, '| triton', \
triton.__version__, '| fastkd._C loaded:', fastkd.info()['cuda_extension'])"
exec "$VPY" -m pytest "$@"
