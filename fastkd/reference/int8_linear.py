"""Reference int8 linear layers in plain torch: the truth in tests and the CPU path.

Quantization is symmetric everywhere (zero point 0, codes in [-127, 127]):

    per-token activations  x (M, K) float  ->  x_q (M, K) int8, x_s (M,) fp32
        amax_m = max_k |x[m, k]|   (in fp32; an all-zero row uses amax = 1e-30)
        x_s[m] = amax_m / 127
        x_q[m, k] = clamp(round_half_even(x[m, k] / x_s[m]), -127, 127)
    per-output-channel weights  w (N, K) float  ->  w_q (N, K) int8, w_s (N,) fp32 (the same rule
        applied to every row of w)

W8A8 (both operands int8, exact integer accumulation):
    acc[m, n] = sum_k x_q[m, k] * w_q[n, k]                      (int32, exact)
    y[m, n]   = cast((float(acc) * x_s[m]) * w_s[n] + bias[n])   (fp32 epilogue, in this order)

W8A16 (activations stay in their float dtype; the per-channel scale factors out of the sum):
    y[m, n] = cast(w_s[n] * sum_k x[m, k] * w_q[n, k] + bias[n])  (fp32 accumulation)

The Triton kernels compute the same formulas with the same fp32 operation order, so the W8A8
integer accumulators agree exactly and the outputs agree to the last bit in the interpreter.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

QMAX = 127
AMAX_FLOOR = 1e-30  # keeps the scale of an all-zero row positive: its codes are 0 either way
# |acc| <= K * 128 * 128 must fit in int32 (int8 codes from outside may include -128)
MAX_K_W8A8 = (2**31 - 1) // (128 * 128)

# Elements of a dequantized weight chunk the W8A16 reference materialises at once (fp32, 16 MiB).
_CHUNK_ELEMENTS = 1 << 22


def quantize_rows(x: Tensor, smooth: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int8 quantization of a 2-D float tensor (of ``x / smooth``, in fp32,
    with per-column factors ``smooth``): (codes int8, scales fp32)."""
    rows, cols = x.shape
    xf = x.float() if smooth is None else x.float() / smooth
    if cols == 0:
        amax = torch.zeros(rows, dtype=torch.float32, device=x.device)
    else:
        amax = xf.abs().amax(dim=1)
    # A true division by a tensor: on CUDA, torch divides by a Python scalar as a multiplication by
    # its reciprocal, which is up to 1 ulp off and made the reference's scales (and so some codes)
    # depend on the device. Tensor / tensor is IEEE round-to-nearest on every device, like the
    # kernel's tl.math.div_rn.
    scale = amax.clamp_min(AMAX_FLOOR) / torch.full_like(amax, QMAX)
    # int8 codes cannot hold an inf: a row holding one gets a nan scale (as a nan does), so its
    # output row is nan, never an inf of whatever sign the code of inf / inf happened to take
    scale = torch.where(amax == float("inf"), float("nan"), scale)
    q = torch.round(xf / scale[:, None]).clamp_(-QMAX, QMAX).nan_to_num_(0.0).to(torch.int8)
    return q, scale


def quantize_per_token(x: Tensor, smooth: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Per-token activation quantization of ``x`` (M, K) (of ``x / smooth`` with SmoothQuant
    factors): ``(x_q (M, K) int8, x_s (M,) fp32)``."""
    return quantize_rows(x, smooth)


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Per-output-channel weight quantization of ``weight`` (N, K): ``(w_q int8, w_s (N,) fp32)``."""
    return quantize_rows(weight.detach())


def _int_mm_allowed(a: Tensor, b: Tensor) -> bool:
    """torch._int_mm on CUDA (cuBLASLt) with its shape rules: K and N multiples of 8, K > 0.
    M > 16 is met by padding rows, which is cheap because it only happens for small M. (The CPU
    has its own rule: _cpu_int_mm_is_fast.)"""
    k, n = a.shape[1], b.shape[0]
    return a.device.type == "cuda" and k > 0 and k % 8 == 0 and n % 8 == 0


# torch._int_mm on the CPU is oneDNN's int8 GEMM on some builds and machines and a plain loop on
# others. Measured on the 2-core CI machine (AMD EPYC, AVX512-VNNI), torch 2.11 and 2.15: 3.7-4.4x
# faster than the fp32 route below for M >= 17 (256 x 1024 x 4096: 2.8 ms against 12 ms), and
# 10x at M = 1; an earlier session measured the loop there, 2.2 s for that product. So it is timed
# once per process on one small product against the fp32 route and used only if it is faster (both
# are exact; the choice changes the speed, never a bit of the result). Never for K < 8: torch
# 2.11's CPU _int_mm returned wrong sums for K = 1.
_CPU_INT_MM_MIN_K = 8
_cpu_int_mm_fast: Optional[bool] = None


def _best_of_three(fn):
    """(shortest of three timed calls of ``fn``, its result): the CPU route probes."""
    import time

    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def _cpu_int_mm_is_fast() -> bool:
    global _cpu_int_mm_fast
    if _cpu_int_mm_fast is None:
        g = torch.Generator().manual_seed(0)
        a = torch.randint(-128, 128, (64, 1024), dtype=torch.int8, generator=g)
        b = torch.randint(-128, 128, (256, 1024), dtype=torch.int8, generator=g)
        try:
            t_int, out_int = _best_of_three(lambda: torch._int_mm(a, b.t()))
        except RuntimeError:  # a build without a CPU kernel
            _cpu_int_mm_fast = False
            return False
        t_fp32, out_fp32 = _best_of_three(lambda: _int8_mm_fp32_slices(a, b))
        _cpu_int_mm_fast = bool(t_int < t_fp32 and torch.equal(out_int, out_fp32))
    return _cpu_int_mm_fast


# Any sum of up to 1024 products of int8 codes (|code| <= 128) is an integer of magnitude
# <= 2**24, which fp32 holds exactly: an fp32 GEMM over K-slices of this length is exact in any
# summation order, as long as the matmul really is fp32 (no bf16/TF32 shortcut).
_EXACT_FP32_K = 1024


def _fp32_matmul_is_ieee() -> bool:
    if torch.get_float32_matmul_precision() != "highest":
        return False
    mkldnn = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    return getattr(mkldnn, "fp32_precision", "none") in ("none", "ieee")


def _int8_mm_fp32_slices(a: Tensor, b: Tensor) -> Tensor:
    """Exact int8 GEMM through fp32 BLAS: K in slices of _EXACT_FP32_K (each slice's fp32 result
    is exact, converted to int32 and summed exactly), the weight converted a bounded chunk of
    rows at a time (no full-size float copy)."""
    m, k = a.shape
    n = b.shape[0]
    out = torch.empty(m, n, dtype=torch.int32, device=a.device)
    af = a.float()
    step = max(1, min(n, _CHUNK_ELEMENTS // min(k, _EXACT_FP32_K)))
    for n0 in range(0, n, step):
        n1 = min(n, n0 + step)
        acc = None
        for k0 in range(0, k, _EXACT_FP32_K):
            k1 = min(k, k0 + _EXACT_FP32_K)
            part = (af[:, k0:k1] @ b[n0:n1, k0:k1].float().t()).to(torch.int32)
            acc = part if acc is None else acc.add_(part)
        out[:, n0:n1] = acc
    return out


def int8_mm(a: Tensor, b: Tensor) -> Tensor:
    """Exact ``a @ b.T`` for int8 ``a`` (M, K) and int8 ``b`` (N, K) with an int32 result (M, N).

    On CUDA, ``torch._int_mm`` where its shape rules allow (M is zero-padded to 17 rows when
    smaller; zero rows add nothing). On the CPU, ``torch._int_mm`` where it is fast (see
    _cpu_int_mm_is_fast), else fp32 BLAS over K-slices short enough to be exact (see
    _EXACT_FP32_K). Otherwise a float64 matmul: every product and partial sum is an integer
    of magnitude < K * 2**14 < 2**53, so float64 represents each exactly and the result is exact
    in any summation order (and unaffected by TF32 or reduced-precision matmul settings).
    """
    m, n = a.shape[0], b.shape[0]
    if m == 0 or n == 0:
        return torch.zeros(m, n, dtype=torch.int32, device=a.device)
    if a.shape[1] == 0:
        return torch.zeros(m, n, dtype=torch.int32, device=a.device)
    if a.device.type == "cpu":
        if a.shape[1] >= _CPU_INT_MM_MIN_K and _cpu_int_mm_is_fast():
            return torch._int_mm(a.contiguous(), b.contiguous().t())
        if _fp32_matmul_is_ieee():
            return _int8_mm_fp32_slices(a, b)
    if _int_mm_allowed(a, b):
        a_c = a.contiguous()
        if m <= 16:
            a_c = torch.cat([a_c, a_c.new_zeros(17 - m, a_c.shape[1])])
        out = torch._int_mm(a_c, b.contiguous().t())
        return out[:m] if m <= 16 else out
    return (a.double() @ b.double().t()).to(torch.int32)


def int8_mm_scaled(
    x_q: Tensor,
    x_scale: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    bias: Optional[Tensor],
    out_dtype: torch.dtype,
) -> Tensor:
    """``cast((float(x_q @ weight.T) * x_scale[:, None]) * weight_scale + bias)`` (M, N)."""
    acc = int8_mm(x_q, weight).float()
    y = acc * x_scale.float()[:, None]
    y = y * weight_scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()[None, :]
    return y.to(out_dtype)


def int8_linear_w8a8(
    x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Optional[Tensor],
    smooth: Optional[Tensor] = None,
) -> Tensor:
    """W8A8 linear of ``x`` (M, K) float (quantized as ``x / smooth`` with SmoothQuant factors)
    with int8 ``weight`` (N, K): (M, N) in ``x.dtype``."""
    x_q, x_s = quantize_per_token(x, smooth)
    return int8_mm_scaled(x_q, x_s, weight, weight_scale, bias, x.dtype)


# W8A16 with bf16 activations on the CPU, two routes faster than converting the codes to fp32
# (the chunked route below), each timed once per process against it on one product and used only
# where faster and agreeing. Same-run figures on the 2-core CI machine (AMD EPYC, torch 2.15):
#  - decode (M <= 16): aten's _weight_int8pack_mm (int8 weight, per-channel scale; the weight-only
#    kernel of gpt-fast and torchao), vectorised for bf16: 4096 x 4096 at M = 1 0.46 ms vs 2.42
#    (5.3x), M = 8 1.80 vs 8.51 (4.7x); slower than the bf16 GEMM route from M ~ 32 on (2048 x
#    2048 at M = 64: 3.6 ms vs 1.9). It reads K in blocks of 16 without a tail: K % 16 != 0
#    crashed the process (segfault, torch 2.15; NaN or segfault on 2.11), so only K % 16 == 0,
#    and only bf16 (2-30x slower than the fp32 route for fp32 / fp16 activations). Its scale is
#    bf16 (the fp32 scale rounded, relative error <= 2^-9) and the bias is added after its bf16
#    result.
#  - M > 16: the codes converted to bf16 (exact: |code| <= 128) a chunk of output channels at a
#    time and one bf16 GEMM per chunk (oneDNN), the channel scale and bias applied in fp32 to
#    its bf16 result: 2048 x 2048 at M = 64 1.9 ms vs 8.7 (fp32 route), 1024 x 1024 at M = 512
#    3.0 vs 7.6; 0.85x a bf16 F.linear on the bf16 weight. At M = 16 it was slower than
#    aten's kernel (11 ms vs 4.2 at 4096 x 4096).
# Both round twice to bf16 where the fp32 route rounds once: a few bf16 roundings of the exact
# product (tested).
_INT8PACK_K_MULTIPLE = 16
_INT8PACK_MAX_M = 16
# It also reads with aligned vector loads: an int8 weight whose data does not start on a 16-byte
# boundary (a view into a memory-mapped safetensors file, as load_compressed / from_pretrained
# give) or an x off a 32-byte one crashed the process (segfault, torch 2.15). A misaligned weight
# takes the other route (no per-call copy of it); a misaligned x (M <= 16 rows) is copied.
INT8PACK_ALIGN = 64
_cpu_int8pack_fast: Optional[bool] = None
_cpu_bf16_gemm_fast: Optional[bool] = None


def _int8pack_applies(x: Tensor, weight: Tensor) -> bool:
    m, k = x.shape
    return (m <= _INT8PACK_MAX_M and k % _INT8PACK_K_MULTIPLE == 0
            and weight.is_contiguous() and weight.data_ptr() % INT8PACK_ALIGN == 0)


def _aten_int8pack_mm(x: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
    return torch.ops.aten._weight_int8pack_mm(x, weight, scale)


def _int8pack(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    x = x.contiguous()
    if x.data_ptr() % INT8PACK_ALIGN:
        x = x.clone()  # a fresh CPU allocation is 64-byte aligned
    y = _aten_int8pack_mm(x, weight, weight_scale.to(torch.bfloat16))
    if bias is not None:
        y = (y.float() + bias.float()[None, :]).to(x.dtype)
    return y


def _probe_case(m: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, 1024, generator=g).to(torch.bfloat16)
    w = torch.randint(-127, 128, (1024, 1024), dtype=torch.int8, generator=g)
    s = torch.rand(1024, generator=g) * 0.01 + 1e-3
    return x, w, s


def _faster_and_agreeing(route, m: int) -> bool:
    x, w, s = _probe_case(m)
    try:
        t_new, y_new = _best_of_three(lambda: route(x, w, s, None))
    except (RuntimeError, AttributeError):  # a build or torch without the kernel
        return False
    t_ref, y_ref = _best_of_three(lambda: _w8a16_chunked(x, w, s, None))
    err = (y_new.float() - y_ref.float()).abs().max()
    return bool(t_new < 0.8 * t_ref and err <= 2 ** -6 * y_ref.float().abs().max())


def _cpu_int8pack_is_fast() -> bool:
    global _cpu_int8pack_fast
    if _cpu_int8pack_fast is None:
        _cpu_int8pack_fast = _faster_and_agreeing(_int8pack, 8)
    return _cpu_int8pack_fast


def _cpu_bf16_gemm_is_fast() -> bool:
    global _cpu_bf16_gemm_fast
    if _cpu_bf16_gemm_fast is None:
        _cpu_bf16_gemm_fast = _faster_and_agreeing(_w8a16_bf16_gemm, 64)
    return _cpu_bf16_gemm_fast


def int8_linear_w8a16(
    x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Optional[Tensor]
) -> Tensor:
    """W8A16 linear of ``x`` (M, K) float with int8 ``weight`` (N, K): (M, N) in ``x.dtype``.

    The int8 codes are converted to fp32 (exact) a chunk of output channels at a time, so no
    full-size float copy of the weight exists; accumulation is fp32 and the channel scale is
    applied to the sum. bf16 activations on the CPU take a faster route where one timed product
    says so (aten's int8 weight-only kernel at M <= 16, bf16 GEMMs on bf16 codes above).
    """
    m, k = x.shape
    if (x.device.type == "cpu" and x.dtype == torch.bfloat16 and weight.dtype == torch.int8
            and m > 0 and k > 0 and weight.shape[0] > 0):
        if _int8pack_applies(x, weight):
            if _cpu_int8pack_is_fast():
                return _int8pack(x, weight, weight_scale, bias)
        elif m > _INT8PACK_MAX_M and _cpu_bf16_gemm_is_fast():
            return _w8a16_bf16_gemm(x, weight, weight_scale, bias)
    return _w8a16_chunked(x, weight, weight_scale, bias)


def _w8a16_bf16_gemm(
    x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Optional[Tensor]
) -> Tensor:
    """The chunked route with bf16 codes and bf16 GEMMs (see above)."""
    return _w8a16_chunked(x, weight, weight_scale, bias, compute=torch.bfloat16)


def _w8a16_chunked(
    x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Optional[Tensor],
    compute: torch.dtype = torch.float32,
) -> Tensor:
    """The codes converted to ``compute`` (exactly: fp32 or bf16) a chunk of output channels at a
    time, one GEMM per chunk, the scale and bias applied in fp32."""
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    xc = x.to(compute)
    step = max(1, min(n, _CHUNK_ELEMENTS // max(k, 1)))
    for n0 in range(0, n, step):
        n1 = min(n, n0 + step)
        y = (xc @ weight[n0:n1].to(compute).t()).float()
        y = y * weight_scale[n0:n1].float()[None, :]
        if bias is not None:
            y = y + bias[n0:n1].float()[None, :]
        out[:, n0:n1] = y.to(x.dtype)
    return out
