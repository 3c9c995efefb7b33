#!/usr/bin/env bash
# Everything a GPU lease is for, in one run (see the device tool's METHOD.md), in priority order
# under one deadline, because a lease is short (15 minutes of device time, start-up included):
#   1. build fastkd with its CUDA extension for this card
#   2. the GPU tests (-m gpu; compute-sanitizer memcheck of the CUDA kernels is one of them)
#   3. the hardware ceilings (copy bandwidth, bf16 matmul), then every benchmark as JSON
#      (--quick sweeps unless GPU_CHECK_FULL=1), the headline products first
#   4. a host-vs-device profile of small calls, then the rest of the test suite with CUDA
#      visible, if time is left
# Each step gets min(its cap, time left before the deadline); a step that runs out is killed and
# the run goes on. Benchmarks print every point as they go, so a killed one still leaves figures in
# the log. Results go to $OUT (the device tool's folder) or bench/results/, named by date and device.
#
#   GPU_CHECK_BUDGET_S   seconds for the whole run (default 520)
#   GPU_CHECK_FULL=1     full benchmark sweeps instead of --quick
#   GPU_CHECK_FULL_BENCHES="kd_loss ..."   full sweeps for these benchmarks only
#   WHEELS=DIR           pip-install peer wheels (liger-kernel, torchao, bitsandbytes) from DIR first
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
T0=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-520}
PY=${PYTHON:-python3}
DEST=${OUT:-bench/results}
DATE=$(date -u +%Y-%m-%d)
DEV=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr -c 'A-Za-z0-9\n' '-' | tr -s '-' | sed 's/-$//')
DEV=${DEV:-unknown-gpu}
TAG="$DATE-$DEV"
LOG="$DEST/gpu_check-$TAG.log"
QUICK=--quick
[ "${GPU_CHECK_FULL:-0}" = 1 ] && QUICK=
mkdir -p "$DEST"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$PATH:$CUDA_HOME/bin"
status=0
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
step() { echo; echo "=== [t+$(( $(date +%s) - T0 ))s] $* ===" | tee -a "$LOG"; }
# run CAP_SECONDS cmd...: at most CAP seconds and never past the deadline
run() {
    local cap=$1; shift
    local t; t=$(left); [ "$cap" -lt "$t" ] && t=$cap
    if [ "$t" -le 5 ]; then echo "!!! skipped (deadline): $*" | tee -a "$LOG"; status=1; return; fi
    timeout -k 5 "$t" "$@" 2>&1 | tee -a "$LOG"; local rc=${PIPESTATUS[0]}
    local why=$rc; [ "$rc" = 124 ] && why="124: timed out after ${t}s"
    [ "$rc" = 0 ] || { echo "!!! failed ($why): $*" | tee -a "$LOG"; status=1; }
}

: > "$LOG"
step "environment"
run 20 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
if [ -n "${WHEELS:-}" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    run 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/peer-site "$WHEELS"/*.whl
    export PYTHONPATH=/tmp/peer-site${PYTHONPATH:+:$PYTHONPATH}
fi
run 30 "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
step "build (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-visible GPU})"
start=$(date +%s)
run 240 "$PY" -m pip install --no-build-isolation --no-deps -e .
echo "build seconds: $(( $(date +%s) - start ))" | tee -a "$LOG"
run 30 "$PY" -m fastkd info
step "GPU tests"
run 200 "$PY" -m pytest tests -m gpu -q -rs -n 8 -p no:cacheprovider
step "ceilings and benchmarks ($([ -n "$QUICK" ] && echo quick || echo full))"
run 40 "$PY" bench/ceilings.py --out "$DEST/ceilings-$TAG.json"
for name in kd_loss masked_linear int8_linear fused_linear_kd kd_topk int8_experts shared_linear; do
    q=$QUICK cap=100
    # int8 autotunes two W8A16 GEMM variants per M bucket; its JSON is written after each shape
    [ "$name" = int8_linear ] && cap=150
    # top-k: one N (quick), three implementations; prices the forward's tail sum (2026-12-01)
    [ "$name" = kd_topk ] && cap=60
    # MoE experts (Mixtral-8x7B's shapes), int8 against bf16 loop and grouped GEMM (2026-12-01)
    [ "$name" = int8_experts ] && cap=60
    case " ${GPU_CHECK_FULL_BENCHES:-} " in *" $name "*) q= ;; esac
    [ -z "$q" ] && cap=300
    run $cap "$PY" "bench/bench_$name.py" $q --out "$DEST/$name-$TAG.json"
done
# host time vs device time of small calls (the eager figures at small shapes are host-bound)
run 60 "$PY" bench/profile_small.py --out "$DEST/profile_small-$TAG.json"
step "rest of the test suite (CUDA visible)"
run 300 "$PY" -m pytest tests -m "not gpu" -q -n 8 -p no:cacheprovider
echo "gpu_check finished with status $status after $(( $(date +%s) - T0 ))s" | tee -a "$LOG"
exit $status
