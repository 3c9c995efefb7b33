#!/usr/bin/env bash
# Everything a GPU lease is for, in one run (see the device tool's METHOD.md), in priority order
# under one deadline, because a lease is short (15 minutes of device time, start-up included):
#   1. build fastkd with its CUDA extension for this card (Triton-only if that build fails)
#   2. the GPU tests (-m gpu; compute-sanitizer memcheck, racecheck and synccheck of the CUDA
#      kernels are one of them)
#   3. the hardware ceilings, then the benchmarks as JSON (--quick sweeps unless
#      GPU_CHECK_FULL=1), in the order GPU_CHECK_BENCHES gives: what waits longest first
#   4. with GPU_CHECK_EXTRA=1 and time left: a host-vs-device profile of small calls and the
#      rest of the test suite with CUDA visible
# Each step gets min(its cap, time left before the deadline); a step that runs out is killed and
# the run goes on. Benchmarks print every point as they go, so a killed one still leaves figures
# in the log. With $OUT set (the device tool's folder, which brings back few files) the run leaves
# two there: the log, and results-<tag>.tgz with every JSON, packed again after each step (a run
# cut off keeps what finished). Without $OUT the JSONs go to bench/results/.
#
#   GPU_CHECK_BUDGET_S   seconds for the whole run (default 500)
#   GPU_CHECK_BENCHES="kd_loss int8_linear ..."   which benchmarks, in this order
#   GPU_CHECK_FULL=1     full benchmark sweeps instead of --quick
#   GPU_CHECK_FULL_BENCHES="kd_loss ..."   full sweeps for these benchmarks only
#   GPU_CHECK_EXTRA=1    also the small-call profile and the non-GPU tests, if time is left
#   WHEELS=DIR           pip-install peer wheels (liger-kernel, torchao, bitsandbytes) from DIR first
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
T0=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-500}
PY=${PYTHON:-python3}
LOGDIR=${OUT:-bench/results}
# the JSONs: straight into bench/results/, or into a work folder packed into $OUT after each step
DEST=bench/results
[ -n "${OUT:-}" ] && DEST=$(mktemp -d /tmp/gpu_check.XXXXXX)
DATE=$(date -u +%Y-%m-%d)
DEV=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr -c 'A-Za-z0-9\n' '-' | tr -s '-' | sed 's/-$//')
DEV=${DEV:-unknown-gpu}
TAG="$DATE-$DEV"
LOG="$LOGDIR/gpu_check-$TAG.log"
QUICK=--quick
[ "${GPU_CHECK_FULL:-0}" = 1 ] && QUICK=
mkdir -p "$DEST" "$LOGDIR"
pack() {  # the JSONs so far into one file of $OUT, replaced whole (never half-written)
    [ -n "${OUT:-}" ] || return 0
    tar czf "$OUT/.results.tgz.tmp" -C "$DEST" --exclude='*.tmp' . \
        && mv "$OUT/.results.tgz.tmp" "$OUT/results-$TAG.tgz"
}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$PATH:$CUDA_HOME/bin"
status=0
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
step() { echo; echo "=== [t+$(( $(date +%s) - T0 ))s] $* ===" | tee -a "$LOG"; }
# run CAP_SECONDS cmd...: at most CAP seconds and never past the deadline; returns the command's
# status. RUN_SIGNAL=INT stops it the way Ctrl-C would (pytest then still prints its summary of
# failures; killed by TERM it leaves only its progress dots).
run() {
    local cap=$1; shift
    local t; t=$(left); [ "$cap" -lt "$t" ] && t=$cap
    if [ "$t" -le 5 ]; then echo "!!! skipped (deadline): $*" | tee -a "$LOG"; status=1; return 1; fi
    timeout -s "${RUN_SIGNAL:-TERM}" -k 15 "$t" "$@" 2>&1 | tee -a "$LOG"; local rc=${PIPESTATUS[0]}
    local why=$rc; [ "$rc" = 124 ] && why="124: timed out after ${t}s"
    [ "$rc" = 0 ] || { echo "!!! failed ($why): $*" | tee -a "$LOG"; status=1; }
    return "$rc"
}

: > "$LOG"
step "environment"
run 20 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
if [ -n "${WHEELS:-}" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    run 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/peer-site "$WHEELS"/*.whl
    export PYTHONPATH=/tmp/peer-site${PYTHONPATH:+:$PYTHONPATH}
else
    echo "!!! no peer wheels (WHEELS=${WHEELS:-unset}): Liger, torchao and bitsandbytes baselines will be missing" | tee -a "$LOG"
fi
run 30 "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
step "build (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-visible GPU})"
start=$(date +%s)
# Checked from outside the repository: from its root `import fastkd` finds ./fastkd uninstalled,
# but fastkd.kernels (kernels/) exists only through the install.
installed() { (cd / && "$PY" -c "import fastkd, fastkd.kernels") >/dev/null 2>&1; }
if ! run 240 "$PY" -m pip install --no-build-isolation --no-deps -e . || ! installed; then
    # the Triton kernels need no extension
    echo "!!! the CUDA build failed: installing without fastkd._C" | tee -a "$LOG"
    FASTKD_SKIP_CUDA_BUILD=1 run 120 "$PY" -m pip install --no-build-isolation --no-deps -e .
fi
echo "build seconds: $(( $(date +%s) - start ))" | tee -a "$LOG"
run 30 "$PY" -m fastkd info
step "GPU tests"
# 326 GPU tests took 125 s with 8 workers on the H200 (2026-11-30); there are ~670 now, most of
# them compiling Triton kernels (CPU work: 16 cores there). A hung test must not take the step,
# and a step cut short must still say which tests failed (SIGINT, --tb=short).
# The compute-sanitizer test (the only one marked both gpu and slow: memcheck, racecheck and
# synccheck of the masked kernels, a minute or two) starts first, beside the others: queued
# behind them it would start near the step's end and be cut off.
SAN_LOG=$(mktemp /tmp/gpu_check_sanitizer.XXXXXX)
san_cap=190; [ "$(left)" -lt "$san_cap" ] && san_cap=$(left)
if [ "$san_cap" -gt 5 ]; then  # (timeout 0 would mean no limit)
    timeout -s INT -k 15 "$san_cap" "$PY" -m pytest tests -m "gpu and slow" -q -rs --tb=short \
        -p no:cacheprovider >"$SAN_LOG" 2>&1 &
    san_pid=$!
else
    echo "!!! skipped (deadline): the compute-sanitizer test" >"$SAN_LOG"; (exit 1) & san_pid=$!
fi
PYTEST_PAR=()
"$PY" -c "import xdist, pytest_timeout" >/dev/null 2>&1 && PYTEST_PAR=(-n 13 --timeout=150)
RUN_SIGNAL=INT run 200 "$PY" -m pytest tests -m "gpu and not slow" -q -rs --tb=short \
    ${PYTEST_PAR[@]+"${PYTEST_PAR[@]}"} -p no:cacheprovider --durations=15
wait "$san_pid"; san_rc=$?
echo "--- compute-sanitizer test (tests -m 'gpu and slow'):" | tee -a "$LOG"
tee -a "$LOG" <"$SAN_LOG"
[ "$san_rc" = 0 ] || { echo "!!! failed ($san_rc): the compute-sanitizer test" | tee -a "$LOG"; status=1; }
step "ceilings and benchmarks ($([ -n "$QUICK" ] && echo quick || echo full))"
run 30 "$PY" bench/ceilings.py --out "$DEST/ceilings-$TAG.json"
pack
# default order: what has waited longest for a first or a corrected figure (the masked CUDA
# kernel's second version and its Triton backend, shared v2 with its int8 rows), then the
# products' headline figures and the variants that wait for a GPU to be chosen (KD forward
# reduce, int8 decode GEMV / swapped W8A16), then the rest. About 200 s are left for
# benchmarks in a 500 s run: two to four of them.
BENCHES=${GPU_CHECK_BENCHES:-masked_linear shared_linear kd_loss int8_linear fused_linear_kd kd_topk int8_experts}
for name in $BENCHES; do
    q=$QUICK cap=100
    # int8 autotunes two W8A16 GEMM variants per M bucket; its JSON is written after each shape
    [ "$name" = int8_linear ] && cap=120
    # top-k: one N (quick), three implementations; MoE experts at Mixtral-8x7B's shapes
    [ "$name" = kd_topk ] && cap=60
    [ "$name" = int8_experts ] && cap=60
    case " ${GPU_CHECK_FULL_BENCHES:-} " in *" $name "*) q= ;; esac
    [ -z "$q" ] && cap=300
    run $cap "$PY" "bench/bench_$name.py" $q --out "$DEST/$name-$TAG.json"
    pack
done
if [ "${GPU_CHECK_EXTRA:-0}" = 1 ]; then
    # host time vs device time of small calls (the eager figures at small shapes are host-bound)
    run 60 "$PY" bench/profile_small.py --out "$DEST/profile_small-$TAG.json"
    pack
    step "rest of the test suite (CUDA visible)"
    RUN_SIGNAL=INT run 300 "$PY" -m pytest tests -m "not gpu" -q --tb=short ${PYTEST_PAR[@]+"${PYTEST_PAR[@]}"} \
        -p no:cacheprovider
fi
echo "gpu_check finished with status $status after $(( $(date +%s) - T0 ))s" | tee -a "$LOG"
exit $status
