#!/usr/bin/env bash
# Install fastkd (CUDA extension included where a toolkit is present) and run the whole test suite.
# Without a GPU the Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py sets it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" -m pytest "$@"
