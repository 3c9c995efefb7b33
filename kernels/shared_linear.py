"""Weight-shared linear (Triton): the GEMM dequantizes W through the codebook as it loads it.

    y[m, n] = sum_k x[m, k] * W[n, k] + bias[n],   W[n, k] = cb[(n,) idx[n, k]],  W = 0 where idx = 0

Shapes: x (M, K) fp32/fp16/bf16; indices uint8 (N, ceil(K/2)) with two 4-bit indices per byte (low
nibble = even k) when BITS <= 4, else (N, K); codebook fp32 (C,) per layer or (N, C) per output
channel; bias (N,) or none; y (M, N) in x's dtype, accumulated in fp32.

Each program computes a BLOCK_M x BLOCK_N tile of y. Per K step it loads the index bytes of a
BLOCK_N x BLOCK_K tile of W (half a byte per weight at 4 bits instead of two for bf16), gathers the
codebook entries (the codebook is tiny and stays in cache), casts them to x's dtype and feeds tl.dot.
The full-precision W never exists in memory.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _shared_linear_fwd_kernel(
    x_ptr, idx_ptr, cb_ptr, bias_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_in, stride_ym, stride_cb,
    BITS: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(
            x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk,
            mask=m_ok[:, None] & k_ok[None, :], other=0.0,
        )
        # (BLOCK_K, BLOCK_N) tile of W^T: rows k, columns n
        wmask = k_ok[:, None] & n_ok[None, :]
        row = offs_n[None, :].to(tl.int64) * stride_in
        if BITS <= 4:
            byte = tl.load(idx_ptr + row + (offs_k[:, None] // 2), mask=wmask, other=0).to(tl.int32)
            idx = (byte >> ((offs_k[:, None] % 2) * 4)) & 15
        else:
            idx = tl.load(idx_ptr + row + offs_k[:, None], mask=wmask, other=0).to(tl.int32)
        if PER_CHANNEL:
            cb_off = offs_n[None, :].to(tl.int64) * stride_cb + idx
        else:
            cb_off = idx
        w = tl.load(cb_ptr + cb_off, mask=wmask, other=0.0)
        w = tl.where(idx == 0, 0.0, w)
        if IEEE_FP32:  # fp32 in, fp32 math: tl.dot would otherwise round its inputs to tf32 on GPU
            acc += tl.dot(x, w.to(x.dtype), input_precision="ieee", out_dtype=tl.float32)
        else:
            acc += tl.dot(x, w.to(x.dtype), out_dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=m_ok[:, None] & n_ok[None, :],
    )


def _blocks(M: int, N: int, K: int, device_type: str):
    if device_type != "cuda":  # the interpreter: small tiles keep it quick
        return 16, 16, 32, 4, 1
    bm = 16 if M <= 16 else (32 if M <= 32 else (64 if M <= 64 else 128))
    return bm, 128, 64, 4 if bm <= 64 else 8, 3


def shared_linear_forward(
    x: torch.Tensor,
    indices: torch.Tensor,
    codebook: torch.Tensor,
    bias: Optional[torch.Tensor],
    in_features: int,
    bits: int,
) -> torch.Tensor:
    M, K = x.shape
    N = indices.shape[0]
    indices = indices.contiguous()
    codebook = codebook.float().contiguous()
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    bm, bn, bk, warps, stages = _blocks(M, N, K, x.device.type)
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    _shared_linear_fwd_kernel[grid](
        x, indices, codebook, bias if bias is not None else codebook, y,
        M, N, K,
        x.stride(0), x.stride(1), indices.stride(0), y.stride(0),
        codebook.stride(0) if codebook.dim() == 2 else 0,
        BITS=bits, PER_CHANNEL=codebook.dim() == 2, HAS_BIAS=bias is not None,
        IEEE_FP32=x.dtype == torch.float32,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
    )
    return y
