"""Int8 linear kernels (Triton): per-token activation quantization and int8-weight GEMMs.

Shapes: activations x (M, K) fp16/bf16/fp32 with any strides, weight codes w (N, K) int8 with any
strides (a transposed view works, which the backward uses), weight scales w_s (N,) fp32, optional
bias (N,) of any float dtype. Outputs are (M, N), contiguous, in the requested dtype. Every M, N, K
is allowed (M = 1, K = 100 ...): tails are masked with zeros, which add nothing to a dot product.

_quantize_per_token_kernel (one program per row; x[m, k] / smooth[k] in place of x with
SmoothQuant factors):
    amax = max_k |x[m, k]|;  x_s[m] = max(amax, 1e-30) / 127
    x_q[m, k] = clamp(rint(x[m, k] / x_s[m]), -127, 127)
  A nan in the row makes amax and x_s nan (a nan-propagating max), so the GEMM's output row is nan.
  Both divisions are IEEE round-to-nearest (tl.math.div_rn, not the approximate GPU division) and
  rint is round-half-to-even through the 1.5 * 2**23 trick, so the codes equal the torch reference's
  bit for bit. A row that fits one block is read once; longer rows are read twice (amax, then codes).

_int8_weight_gemm_kernel (one program per BLOCK_M x BLOCK_N output tile, grouped ordering):
  W8A8 (A_INT8):  acc = sum_k x_q[m, k] * w[n, k]  with int8 x int8 -> int32 tl.dot (exact)
                  y = (float(acc) * x_s[m]) * w_s[n] + bias[n]
  W8A16:          acc = sum_k x[m, k] * float(w[n, k])  with the int8 codes converted in registers
                  to the activation dtype (exact: |code| <= 128 fits fp16/bf16), fp32 accumulate
                  y = acc * w_s[n] + bias[n]
  Then y is cast to the output dtype. The scale is applied once per output, not per weight element,
  because a per-output-channel scale factors out of the sum over k.

The small-M (decode) configurations use BLOCK_M = 16 and long BLOCK_K so each program streams a
narrow strip of int8 weights once; larger M uses square tensor-core tiles. Configurations are
autotuned per M bucket (1-16, 17-64, 65-256, > 256) and per (N, K, dtypes) on CUDA; under
TRITON_INTERPRET=1 one small fixed configuration runs so CPU tests stay fast.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

QMAX = 127.0
AMAX_FLOOR = 1e-30


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _round_half_even(v):
    # For |v| < 2**22 adding 1.5 * 2**23 leaves no fraction bits, so the fp32 add rounds to the
    # nearest integer (ties to even) and the subtraction is exact.
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _max_keep_nan(a, b):
    # max.NaN: a nan activation must make its row's scale nan (so its output row is nan, as in
    # F.linear and the torch reference); the plain GPU max returns the other operand and would
    # quantize the row as if the nan were not there.
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _row_scale(amax):
    # nan for a row holding an inf (as for a nan): int8 cannot hold it, and inf / inf would give
    # the code whatever the clamp makes of a nan (-127 on the GPU): an output inf of either sign
    scale = tl.math.div_rn(_max_keep_nan(amax, 1e-30), 127.0)
    return tl.where(amax == float("inf"), float("nan"), scale)


@triton.jit
def _load_smoothed(x_row, smooth_ptr, cols, stride_xk, mask, HAS_SMOOTH: tl.constexpr):
    """x[m, cols] in fp32, divided by the SmoothQuant factors smooth[cols] (IEEE division, as
    the reference's tensor / tensor) where the layer has them."""
    v = tl.load(x_row + cols * stride_xk, mask=mask, other=0.0).to(tl.float32)
    if HAS_SMOOTH:
        v = tl.math.div_rn(v, tl.load(smooth_ptr + cols, mask=mask, other=1.0))
    return v


@triton.jit
def _quantize_per_token_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    smooth_ptr,
    stride_xm,
    stride_xk,
    stride_qm,
    K,
    BLOCK_K: tl.constexpr,
    ONE_PASS: tl.constexpr,
    HAS_SMOOTH: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm
    cols = tl.arange(0, BLOCK_K)
    if ONE_PASS:
        mask = cols < K
        v = _load_smoothed(x_row, smooth_ptr, cols, stride_xk, mask, HAS_SMOOTH)
        amax = tl.reduce(tl.abs(v), 0, _max_keep_nan)
        scale = _row_scale(amax)
        q = _round_half_even(tl.math.div_rn(v, scale))
        q = tl.where(q == q, q, 0.0)  # a nan (a row with inf or nan) is code 0, as the reference's
        q = tl.minimum(tl.maximum(q, -127.0), 127.0)  # (max and min would make it -127)
        tl.store(q_row + cols, q.to(tl.int8), mask=mask)
    else:
        run = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            mask = k0 + cols < K
            v = _load_smoothed(x_row, smooth_ptr, k0 + cols, stride_xk, mask, HAS_SMOOTH)
            run = _max_keep_nan(run, tl.abs(v))
        amax = tl.reduce(run, 0, _max_keep_nan)
        scale = _row_scale(amax)
        for k0 in range(0, K, BLOCK_K):
            mask = k0 + cols < K
            v = _load_smoothed(x_row, smooth_ptr, k0 + cols, stride_xk, mask, HAS_SMOOTH)
            q = _round_half_even(tl.math.div_rn(v, scale))
            q = tl.where(q == q, q, 0.0)
            q = tl.minimum(tl.maximum(q, -127.0), 127.0)
            tl.store(q_row + k0 + cols, q.to(tl.int8), mask=mask)
    tl.store(s_ptr + row, scale)


@triton.jit
def _epilogue(acc, a_scale, w_scale, bias_ptrs, bias_mask, A_INT8: tl.constexpr,
              HAS_BIAS: tl.constexpr):
    """fp32 result of the int8 GEMM and GEMV: (acc * row scale) * column scale + bias, in this
    order in both kernels (and in the torch reference), so their w8a8 outputs agree bit for bit.
    The scales and the bias pointers come already shaped to broadcast against acc."""
    if A_INT8:
        y = acc.to(tl.float32) * a_scale
        y = y * w_scale
    else:
        y = acc * w_scale
    if HAS_BIAS:
        y = y + tl.load(bias_ptrs, mask=bias_mask, other=0.0).to(tl.float32)
    return y


@triton.jit
def _tile_offsets(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  GROUP_M: tl.constexpr):
    """Row, column and K offsets of this program's output tile, tiles in grouped order
    (neighbouring programs share weight columns, so they hit in L2), and the int64 row/column
    indices to read: rows and columns past the edge read row/column 0 (always valid) and are
    never stored."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    group = pid // width
    first_m = group * GROUP_M
    group_size = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_size
    pid_n = (pid % width) // group_size
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.where(offs_m < M, offs_m, 0).to(tl.int64)
    cols = tl.where(offs_n < N, offs_n, 0).to(tl.int64)
    return offs_m, offs_n, tl.arange(0, BLOCK_K), rows, cols


@triton.jit
def _int8_weight_gemm_kernel(
    a_ptr,
    a_scale_ptr,
    w_ptr,
    w_scale_ptr,
    bias_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_wn,
    stride_wk,
    stride_cm,
    stride_cn,
    A_INT8: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    offs_m, offs_n, offs_k, rows, cols = _tile_offsets(M, N, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + cols[None, :] * stride_wn + offs_k[:, None] * stride_wk

    if A_INT8:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0)
        w = tl.load(w_ptrs, mask=k_ok[:, None], other=0)  # (BLOCK_K, BLOCK_N) int8
        if A_INT8:
            acc = tl.dot(a, w, acc, out_dtype=tl.int32)
        else:
            w = w.to(a.dtype)  # dequantize in registers; the scale comes after the sum
            if IEEE_FP32:
                acc = tl.dot(a, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, w, acc)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    m_ok = offs_m < M
    n_ok = offs_n < N
    w_scale = tl.load(w_scale_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    a_scale = 1.0
    if A_INT8:
        a_scale = tl.load(a_scale_ptr + offs_m, mask=m_ok, other=0.0)[:, None]
    y = _epilogue(acc, a_scale, w_scale, (bias_ptr + offs_n)[None, :], n_ok[None, :],
                  A_INT8, HAS_BIAS)
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _w8a16_gemm_swapped_kernel(
    a_ptr,
    a_scale_ptr,
    w_ptr,
    w_scale_ptr,
    bias_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_wn,
    stride_wk,
    stride_cm,
    stride_cn,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """W8A16 (fp16/bf16 activations) as the transposed product C^T = W_deq @ x^T, the same
    formula and output as _int8_weight_gemm_kernel's W8A16 path.

    Why: wgmma (Hopper) reads its B operand from shared memory only, and in the plain kernel the
    weight tile, converted int8 -> bf16 in registers, is B: each K step stores it back to shared
    memory, then a barrier and a wait on the previous wgmma, so conversion and MMA do not overlap
    (sm_90 SASS: STS.128 + BAR.SYNC per step). With the weight as A, wgmma takes it straight from
    registers. Token rows become wgmma's N dimension (down to 8), which also suits decode sizes.
    Untimed (bench_int8_linear.py `fastkd_w8a16_swapped`; W8A16_SWAPPED picks it)."""
    offs_m, offs_n, offs_k, rows, cols = _tile_offsets(M, N, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    w_ptrs = w_ptr + cols[:, None] * stride_wn + offs_k[None, :] * stride_wk  # (BLOCK_N, BLOCK_K)
    a_ptrs = a_ptr + rows[None, :] * stride_am + offs_k[:, None] * stride_ak  # (BLOCK_K, BLOCK_M)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        w = tl.load(w_ptrs, mask=k_ok[None, :], other=0)
        a = tl.load(a_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(w.to(a.dtype), a, acc)  # exact conversion: |code| <= 128
        w_ptrs += BLOCK_K * stride_wk
        a_ptrs += BLOCK_K * stride_ak
    m_ok = offs_m < M
    n_ok = offs_n < N
    w_scale = tl.load(w_scale_ptr + offs_n, mask=n_ok, other=0.0)[:, None]
    y = _epilogue(acc, 1.0, w_scale, (bias_ptr + offs_n)[:, None], n_ok[:, None], False,
                  HAS_BIAS)
    c_ptrs = c_ptr + offs_m.to(tl.int64)[None, :] * stride_cm + offs_n[:, None] * stride_cn
    tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])


@triton.jit
def _int8_weight_gemv_kernel(
    a_ptr,
    a_scale_ptr,
    w_ptr,
    w_scale_ptr,
    bias_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_wn,
    stride_wk,
    stride_cm,
    stride_cn,
    A_INT8: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Decode-size rows (M <= GEMV_MAX_M): one program per (BLOCK_N outputs, row), no tensor cores.

    A GEMM tile wastes 15 of its 16 rows at M = 1 and, with BLOCK_N >= 32, gives N = 4096 only 128
    programs for 132 SMs. Here each program streams a BLOCK_N x K strip of int8 weights once with
    wide loads and multiplies on the CUDA cores: W8A8 in int32 (exact, like the GEMM), W8A16 in
    fp32. Rows of the same strip run side by side and share it through L2. It ends in the GEMM's
    _epilogue, so W8A8 stays bit-identical to it.
    """
    pid_n = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    cols = tl.where(n_ok, offs_n, 0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    a_row = a_ptr + row * stride_am
    w_ptrs = w_ptr + cols[:, None] * stride_wn + offs_k[None, :] * stride_wk
    if A_INT8:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_row + (k0 + offs_k) * stride_ak, mask=k_ok, other=0)
        w = tl.load(w_ptrs, mask=k_ok[None, :], other=0)
        if A_INT8:
            acc += w.to(tl.int32) * a.to(tl.int32)[None, :]
        else:
            acc += w.to(tl.float32) * a.to(tl.float32)[None, :]
        w_ptrs += BLOCK_K * stride_wk
    total = tl.sum(acc, 1)
    w_scale = tl.load(w_scale_ptr + offs_n, mask=n_ok, other=0.0)
    a_scale = 1.0
    if A_INT8:
        a_scale = tl.load(a_scale_ptr + row)
    y = _epilogue(total, a_scale, w_scale, bias_ptr + offs_n, n_ok, A_INT8, HAS_BIAS)
    tl.store(c_ptr + row * stride_cm + offs_n * stride_cn, y.to(c_ptr.dtype.element_ty), mask=n_ok)


# ---------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------


def _cfg(bm, bn, bk, group_m, warps, stages):
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
        num_warps=warps,
        num_stages=stages,
    )


M_BUCKETS = (16, 64, 256)  # upper bounds; anything larger is the last bucket


def m_bucket(m: int) -> int:
    for i, bound in enumerate(M_BUCKETS):
        if m <= bound:
            return i
    return len(M_BUCKETS)


# Neighbouring buckets share configurations so the choice cannot jump far at a bucket edge.
# Bucket 0 (decode, M <= 16) also offers BLOCK_N = 16: on the H200 the decode GEMM took 9 us (w8a8)
# and 15 us (w8a16) at M = 1, N = K = 4096, against a 4 us floor for reading 16.8 MB of int8 weights;
# BLOCK_N >= 32 gives such a GEMM <= 128 programs for 132 SMs, 16 gives 256. The autotuner times
# them on the card; none of the candidates spills on sm_90 (bench/codegen_report.py).
_W8A8_CONFIGS = {
    0: [_cfg(16, 64, 256, 1, 4, 4), _cfg(16, 128, 128, 1, 4, 4), _cfg(16, 32, 256, 1, 2, 5),
        _cfg(32, 64, 128, 1, 4, 4), _cfg(16, 16, 256, 1, 4, 4), _cfg(16, 16, 128, 1, 4, 6)],
    1: [_cfg(32, 64, 128, 4, 4, 4), _cfg(64, 64, 128, 4, 4, 4), _cfg(64, 128, 128, 4, 4, 4),
        _cfg(16, 128, 128, 1, 4, 4)],
    2: [_cfg(64, 128, 128, 8, 4, 4), _cfg(128, 128, 128, 8, 8, 3), _cfg(128, 64, 128, 8, 4, 4),
        _cfg(64, 64, 128, 8, 4, 4)],
    3: [_cfg(128, 128, 128, 8, 8, 3), _cfg(128, 256, 128, 8, 8, 3), _cfg(256, 128, 128, 8, 8, 3),
        _cfg(128, 128, 64, 8, 4, 4), _cfg(64, 128, 128, 8, 4, 4)],
}
_W8A16_CONFIGS = {
    0: [_cfg(16, 64, 128, 1, 4, 4), _cfg(16, 32, 256, 1, 4, 4), _cfg(16, 128, 64, 1, 4, 5),
        _cfg(16, 32, 128, 1, 2, 6), _cfg(16, 16, 256, 1, 4, 4), _cfg(16, 16, 128, 1, 4, 6)],
    1: [_cfg(32, 64, 128, 4, 4, 4), _cfg(64, 64, 64, 4, 4, 4), _cfg(64, 128, 64, 4, 4, 4),
        _cfg(16, 64, 128, 1, 4, 4)],
    2: [_cfg(64, 128, 64, 8, 4, 4), _cfg(128, 128, 64, 8, 8, 3), _cfg(64, 64, 64, 8, 4, 4),
        _cfg(128, 64, 64, 8, 4, 4)],
    3: [_cfg(128, 128, 64, 8, 8, 3), _cfg(128, 256, 64, 8, 8, 3), _cfg(256, 128, 64, 8, 8, 3),
        _cfg(128, 128, 32, 8, 4, 4), _cfg(64, 128, 64, 8, 4, 4)],
}
# Decode: which kernel runs rows M <= GEMV_MAX_M on CUDA. "gemm" (the tensor-core GEMM, bucket 0)
# is what was measured on the H200 (2026-11-30); "gemv" (_int8_weight_gemv_kernel) is written and
# tested but not yet timed on a GPU: bench_int8_linear.py times both, and the faster becomes this
# default. Predicted for M = 1, N = K = 4096: ~5-6 us against the GEMM's 9 us (w8a8) and 15 us
# (w8a16), the floor being 4 us for 16.8 MB of int8 weights at 4.2 TB/s.
DECODE_KERNEL = "gemm"
GEMV_MAX_M = 4
_GEMV_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
    for bn, bk, w, st in [(8, 512, 4, 3), (16, 256, 4, 3), (16, 512, 8, 3), (32, 256, 8, 2),
                          (4, 1024, 4, 3)]
]
_GEMV_TUNED = triton.autotune(configs=_GEMV_CONFIGS, key=["N", "K"])(_int8_weight_gemv_kernel)
# W8A16 with fp16/bf16 activations: the plain GEMM (measured on the H200: 0.6x bf16 at M = 2048)
# or _w8a16_gemm_swapped_kernel (False = the measured one until a GPU run times both). BLOCK_N
# (weight rows) is wgmma's M side (64 or 128), BLOCK_M (tokens) its N side (16 upward).
W8A16_SWAPPED = False
_W8A16_SWAPPED_CONFIGS = {
    0: [_cfg(16, 64, 128, 1, 4, 4), _cfg(16, 128, 128, 1, 4, 4), _cfg(16, 64, 256, 1, 4, 3),
        _cfg(16, 128, 64, 1, 4, 5)],
    1: [_cfg(32, 128, 128, 4, 4, 4), _cfg(64, 128, 64, 4, 4, 4), _cfg(64, 64, 128, 4, 4, 4)],
    2: [_cfg(64, 128, 64, 8, 4, 4), _cfg(128, 128, 64, 8, 8, 3), _cfg(128, 64, 64, 8, 4, 4)],
    3: [_cfg(128, 128, 64, 8, 8, 3), _cfg(256, 128, 64, 8, 8, 3), _cfg(128, 256, 64, 8, 8, 3),
        _cfg(128, 128, 128, 8, 8, 3)],
}
_INTERPRET_GEMV_CONFIG = {"BLOCK_N": 8, "BLOCK_K": 64}
# Interpreter: one small configuration that still exercises several tiles and K steps.
_INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2}

_TUNED: dict = {}


def _tuned_kernel(a_int8: bool, bucket: int, swapped: bool = False):
    key = (a_int8, bucket, swapped)
    if key not in _TUNED:
        if swapped:
            configs, kernel = _W8A16_SWAPPED_CONFIGS[bucket], _w8a16_gemm_swapped_kernel
        else:
            configs = (_W8A8_CONFIGS if a_int8 else _W8A16_CONFIGS)[bucket]
            kernel = _int8_weight_gemm_kernel
        # Separate autotuners per bucket: each picks among its own few configs, keyed by the
        # problem's N, K (dtypes are part of Triton's key) so M only matters through its bucket.
        _TUNED[key] = triton.autotune(configs=configs, key=["N", "K"])(kernel)
    return _TUNED[key]


def _launch_gemm(a, a_scale, w, w_scale, bias, out, a_int8: bool) -> None:
    m, k = a.shape
    n = w.shape[0]
    # the kernels read the per-row / per-channel vectors as ptr + index: unit stride (a column
    # of a packed tensor would be read wrongly)
    a_scale, w_scale, bias = (None if v is None else v.contiguous() for v in (a_scale, w_scale, bias))
    args = (
        a,
        a_scale if a_scale is not None else w_scale,  # unused placeholder in W8A16
        w,
        w_scale,
        bias if bias is not None else w_scale,  # unused placeholder without bias
        out,
        m,
        n,
        k,
        a.stride(0),
        a.stride(1),
        w.stride(0),
        w.stride(1),
        out.stride(0),
        out.stride(1),
    )
    interp = _interpret() or a.device.type != "cuda"
    if DECODE_KERNEL == "gemv" and m <= GEMV_MAX_M and (a_int8 or a.dtype != torch.float32):
        flags = dict(A_INT8=a_int8, HAS_BIAS=bias is not None)

        def gemv_grid(meta):
            return (triton.cdiv(n, meta["BLOCK_N"]), m)

        if interp:
            _int8_weight_gemv_kernel[gemv_grid](*args, **flags, **_INTERPRET_GEMV_CONFIG)
        else:
            _GEMV_TUNED[gemv_grid](*args, **flags)
        return

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    if W8A16_SWAPPED and not a_int8 and a.dtype != torch.float32:
        if interp:
            _w8a16_gemm_swapped_kernel[grid](*args, HAS_BIAS=bias is not None,
                                             **_INTERPRET_CONFIG)
        else:
            _tuned_kernel(False, m_bucket(m), swapped=True)[grid](*args, HAS_BIAS=bias is not None)
        return
    flags = dict(
        A_INT8=a_int8,
        HAS_BIAS=bias is not None,
        IEEE_FP32=(not a_int8) and a.dtype == torch.float32,
    )
    if interp:
        _int8_weight_gemm_kernel[grid](*args, **flags, **_INTERPRET_CONFIG)
    else:
        _tuned_kernel(a_int8, m_bucket(m))[grid](*args, **flags)


# ---------------------------------------------------------------------------------------------
# Entry points (called by fastkd._ops with validated 2-D inputs)
# ---------------------------------------------------------------------------------------------


def quantize_per_token(x: torch.Tensor, smooth: Optional[torch.Tensor] = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric int8 quantization of ``x`` (M, K) (of ``x / smooth`` with SmoothQuant
    factors ``smooth`` (K,) fp32): ``(x_q (M, K) int8, x_s (M,) fp32)``."""
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.int8, device=x.device)
    s = torch.empty(m, dtype=torch.float32, device=x.device)
    if m == 0:
        return q, s
    cap = 4096 if not _interpret() else 256
    block = min(cap, triton.next_power_of_2(max(k, 16)))
    num_warps = 8 if block >= 4096 else 4 if block >= 1024 else 2
    _quantize_per_token_kernel[(m,)](
        x,
        q,
        s,
        smooth.contiguous() if smooth is not None else s,  # (never read without HAS_SMOOTH)
        x.stride(0),
        x.stride(1),
        q.stride(0),
        k,
        BLOCK_K=block,
        ONE_PASS=k <= block,
        HAS_SMOOTH=smooth is not None,
        num_warps=num_warps,
    )
    return q, s


def int8_mm_scaled(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``cast((float(x_q @ weight.T) * x_scale[:, None]) * weight_scale + bias)``, shape (M, N)."""
    m, n = x_q.shape[0], weight.shape[0]
    out = torch.empty(m, n, dtype=out_dtype, device=x_q.device)
    if m and n:
        _launch_gemm(x_q, x_scale, weight, weight_scale, bias, out, a_int8=True)
    return out


def int8_linear_w8a8(x, weight, weight_scale, bias, smooth=None):
    """W8A8: quantize x (x / smooth with SmoothQuant factors) per token (one light pass), then
    the int8 GEMM with the fused epilogue."""
    x_q, x_s = quantize_per_token(x, smooth)
    return int8_mm_scaled(x_q, x_s, weight, weight_scale, bias, x.dtype)


def int8_linear_w8a16(x, weight, weight_scale, bias):
    """W8A16: ``cast(weight_scale * (x @ float(weight).T) + bias)`` with weights read as int8."""
    m, n = x.shape[0], weight.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m and n:
        _launch_gemm(x, None, weight, weight_scale, bias, out, a_int8=False)
    return out
