#!/usr/bin/env bash
# Everything a GPU lease is for, in one run (see the device tool's METHOD.md):
#   1. build fastkd with its CUDA extension for this card
#   2. run the whole test suite with the GPU tests enabled
#   3. compute-sanitizer memcheck over the CUDA-kernel tests
#   4. the hardware ceilings (copy bandwidth, bf16 matmul) and every benchmark, as JSON
# Results go to $OUT (the device tool's folder) or bench/results/, named by date and device, with
# one combined log. Steps continue after a failure; the exit code says whether any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DEST=${OUT:-bench/results}
DATE=$(date -u +%Y-%m-%d)
DEV=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr -c 'A-Za-z0-9\n' '-' | tr -s '-' | sed 's/-$//')
DEV=${DEV:-unknown-gpu}
TAG="$DATE-$DEV"
LOG="$DEST/gpu_check-$TAG.log"
mkdir -p "$DEST"
status=0
step() { echo; echo "=== $* ===" | tee -a "$LOG"; }
run() { "$@" 2>&1 | tee -a "$LOG"; local rc=${PIPESTATUS[0]}; [ "$rc" = 0 ] || { echo "!!! failed ($rc): $*" | tee -a "$LOG"; status=1; }; }

: > "$LOG"
step "environment"
run nvidia-smi
run "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
step "build (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-visible GPU})"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
start=$(date +%s)
run "$PY" -m pip install --no-build-isolation --no-deps -e .
echo "build seconds: $(( $(date +%s) - start ))" | tee -a "$LOG"
run "$PY" -m fastkd info
step "tests (GPU tests enabled)"
run "$PY" -m pytest tests -q -rs
step "compute-sanitizer memcheck on the CUDA-kernel tests"
if command -v compute-sanitizer >/dev/null || [ -x "$CUDA_HOME/bin/compute-sanitizer" ]; then
    CS=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")
    run "$CS" --tool memcheck --error-exitcode 1 "$PY" -m pytest tests/test_masked_linear.py -q -m gpu -x
else
    echo "compute-sanitizer not found" | tee -a "$LOG"; status=1
fi
step "ceilings and benchmarks"
run "$PY" bench/ceilings.py --out "$DEST/ceilings-$TAG.json"
for b in bench/bench_*.py; do
    name=$(basename "$b" .py)
    run "$PY" "$b" --out "$DEST/${name#bench_}-$TAG.json"
done
echo "gpu_check finished with status $status" | tee -a "$LOG"
exit $status
