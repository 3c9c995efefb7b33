"""Weight-shared linear (Triton): the GEMM dequantizes W through the codebook as it loads it.

    y[m, n] = sum_k x[m, k] * W[n, k] + bias[n],   W[n, k] = cb[(n,) idx[n, k]],  W = 0 where idx = 0

Shapes: x (M, K) fp32/fp16/bf16; indices uint8 (N, ceil(K/2)) with two 4-bit indices per byte (low
nibble = even k) when BITS <= 4, else (N, K); codebook fp32 (C,) per layer or (N, C) per output
channel, C = 2**BITS; bias (N,) or none; y (M, N) in x's dtype, accumulated in fp32.

Variants (``shared_linear_forward(..., variant=)``; the public op always takes the default, "v2"):

v2 (default) picks one of
  v2_fused    ``_shared_linear_fwd_kernel``: one program per BLOCK_M x BLOCK_N tile of y and slice
              of K. Per K step it loads a contiguous (BLOCK_N, BLOCK_K/2) tile of index bytes
              (16-byte vector loads along K; the full-precision W never exists in memory), makes a
              (BLOCK_N, BLOCK_K) tile of W in x's dtype through a small lookup table the program
              built once, and feeds tl.dot. Small M splits K over programs (fp32 partial sums, then
              ``_split_k_reduce_kernel``) so that a decode-sized call still fills every SM.
  v2_dequant  ``_shared_dequant_kernel`` writes W (N, K) in x's dtype once, then cuBLAS multiplies:
              at large M the GEMM is compute-bound and the 4 extra bytes per weight (write W, read
              it back) are cheap next to it, while the fused kernel pays the lookups once per
              BLOCK_M rows and cannot overlap them with wgmma. Costs a transient N x K weight in x's
              dtype. fp16/bf16 only (fp32 keeps the exact fused path); M >= _DEQUANT_MIN_M.
v1          the first kernel, kept for side-by-side timing: (BLOCK_K, BLOCK_N) tiles of W^T loaded
            one byte per element across rows K/2 bytes apart (no vectorisation, each byte loaded
            twice) and a global gather of the fp32 codebook per weight.

Lookup tables (built per program from the fp32 codebook, entry 0 forced to 0, cast to x's dtype):
  PAIR    per-layer codebook, BITS <= 4, fp16/bf16 x: 256 int32 entries, one per index byte, each
          the two 16-bit weights of its nibbles (low half = low nibble = even k). One tl.gather per
          two weights, no nibble arithmetic, no select, no conversion.
  TABLE   the 2**BITS entries (per layer) or the BLOCK_N rows of 2**BITS entries flattened to 1-D
          (per channel, BITS <= 4): one tl.gather per weight (from shared memory: Triton lowers a
          1-D gather that way, while a 2-D gather along the row became several shuffles per weight).
  GLOBAL  per channel with BITS > 4 (up to 256 entries per row): a gather from the fp32 codebook
          in global memory (cache-resident), then the entry-0 select and the cast, as v1 does.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

LOOKUP_GLOBAL = 0
LOOKUP_TABLE = 1
LOOKUP_PAIR = 2

# At or above this many rows a fp16/bf16 call takes v2_dequant (a guess until a GPU run measures the
# crossover: bench/bench_shared_linear.py times both variants at every M; see
# bench/notes_shared_linear.md)
_DEQUANT_MIN_M = 1024


# ------------------------------------------------------------------------------------------------
# v2
# ------------------------------------------------------------------------------------------------


@triton.jit
def _lookup_table(cb_ptr, offs_n, n_ok, stride_cb, DT: tl.constexpr, BITS: tl.constexpr,
                  PER_CHANNEL: tl.constexpr, LOOKUP: tl.constexpr):
    """The table the program looks W up in (see the module docstring); a dummy for GLOBAL."""
    C: tl.constexpr = 1 << BITS
    if LOOKUP == 2:  # PAIR: entry b = (w[b & 15], w[b >> 4]) as two 16-bit halves of an int32
        b = tl.arange(0, 256)
        lo_i = b & 15
        hi_i = b >> 4
        lo = tl.load(cb_ptr + lo_i, mask=lo_i < C, other=0.0)
        hi = tl.load(cb_ptr + hi_i, mask=hi_i < C, other=0.0)
        lo = tl.where(lo_i == 0, 0.0, lo).to(DT).to(tl.int16, bitcast=True).to(tl.int32)
        hi = tl.where(hi_i == 0, 0.0, hi).to(DT).to(tl.int16, bitcast=True).to(tl.int32)
        table = (lo & 0xFFFF) | (hi << 16)
    elif LOOKUP == 1:
        c = tl.arange(0, C)
        if PER_CHANNEL:  # flat (BLOCK_N * C,): a 1-D gather reads it from shared memory, where a
            # (BLOCK_N, C) table gathered along axis 1 becomes warp shuffles, several per weight
            t = tl.load(cb_ptr + offs_n[:, None].to(tl.int64) * stride_cb + c[None, :],
                        mask=n_ok[:, None], other=0.0)
            table = tl.reshape(tl.where(c[None, :] == 0, 0.0, t).to(DT), (offs_n.shape[0] * C,))
        else:
            t = tl.load(cb_ptr + c)
            table = tl.where(c == 0, 0.0, t).to(DT)
    else:
        table = tl.zeros((1,), dtype=DT)
    return table


@triton.jit
def _lookup(table, cb_ptr, offs_n, N, idx, stride_cb, DT: tl.constexpr, PER_CHANNEL: tl.constexpr,
            LOOKUP: tl.constexpr, BLOCK_N: tl.constexpr, WIDTH: tl.constexpr):
    """W for a (BLOCK_N, WIDTH) int32 tile of indices (TABLE or GLOBAL), in DT."""
    if LOOKUP == 1:
        if PER_CHANNEL:  # row r of the tile starts at r * C in the flat table
            C: tl.constexpr = table.shape[0] // BLOCK_N
            idx = tl.arange(0, BLOCK_N)[:, None] * C + idx
        w = tl.reshape(tl.gather(table, tl.reshape(idx, (BLOCK_N * WIDTH,)), 0), (BLOCK_N, WIDTH))
    else:
        # idx < 2**BITS always (masked-off bytes read as 0); rows past N must not be read
        if PER_CHANNEL:
            w = tl.load(cb_ptr + offs_n[:, None].to(tl.int64) * stride_cb + idx,
                        mask=(offs_n < N)[:, None], other=0.0)
        else:
            w = tl.load(cb_ptr + idx)
        w = tl.where(idx == 0, 0.0, w).to(DT)
    return w


@triton.jit
def _weight_tile(idx_ptr, cb_ptr, table, offs_n, n_ok, k0, kb0, N, K, KB, stride_in, stride_cb,
                 DT: tl.constexpr, BITS: tl.constexpr, PER_CHANNEL: tl.constexpr,
                 LOOKUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """W[offs_n, k0 : k0 + BLOCK_K] in DT, zero outside (N, K). kb0 = k0 // 2 (the byte column)."""
    row = offs_n[:, None].to(tl.int64) * stride_in
    if BITS <= 4:
        HALF: tl.constexpr = BLOCK_K // 2
        offs_kb = kb0 + tl.arange(0, HALF)
        byte = tl.load(idx_ptr + row + offs_kb[None, :],
                       mask=n_ok[:, None] & (offs_kb < KB)[None, :], other=0)
        if LOOKUP == 2:
            flat = tl.reshape(byte, (BLOCK_N * HALF,)).to(tl.int32)
            pair = tl.reshape(tl.gather(table, flat, 0), (BLOCK_N, HALF))
            lo = (pair & 0xFFFF).to(tl.int16).to(DT, bitcast=True)
            hi = (pair >> 16).to(tl.int16).to(DT, bitcast=True)
        else:
            b = byte.to(tl.int32)
            lo = _lookup(table, cb_ptr, offs_n, N, b & 15, stride_cb, DT, PER_CHANNEL, LOOKUP,
                         BLOCK_N, HALF)
            hi = _lookup(table, cb_ptr, offs_n, N, b >> 4, stride_cb, DT, PER_CHANNEL, LOOKUP,
                         BLOCK_N, HALF)
        # (BLOCK_N, HALF, 2) -> (BLOCK_N, BLOCK_K): column 2j is byte j's low nibble
        w = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        i = tl.load(idx_ptr + row + offs_k[None, :], mask=n_ok[:, None] & (offs_k < K)[None, :],
                    other=0).to(tl.int32)
        w = _lookup(table, cb_ptr, offs_n, N, i, stride_cb, DT, PER_CHANNEL, LOOKUP, BLOCK_N,
                    BLOCK_K)
    return w


@triton.jit
def _shared_linear_fwd_kernel(
    x_ptr, idx_ptr, cb_ptr, bias_ptr, y_ptr, part_ptr,
    M, N, K, KB, K_SPLIT, KB_SPLIT,
    stride_xm, stride_in, stride_ym, stride_cb,
    BITS: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE_FP32: tl.constexpr,
    LOOKUP: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y tile (pid_m, pid_n) over K columns [pid_k * K_SPLIT, (pid_k + 1) * K_SPLIT).

    x is row-major with unit column stride; K_SPLIT is a multiple of BLOCK_K, KB_SPLIT = K_SPLIT/2.
    SPLIT: write the fp32 partial sum to part[pid_k] (M, N) for _split_k_reduce_kernel, else add the
    bias and write y in x's dtype.
    """
    DT: tl.constexpr = x_ptr.dtype.element_ty
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % num_m  # consecutive programs share a weight tile: it is read from HBM once
    pid_n = pid // num_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    table = _lookup_table(cb_ptr, offs_n, n_ok, stride_cb, DT, BITS, PER_CHANNEL, LOOKUP)
    x_row = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_begin = pid_k * K_SPLIT
    kb_begin = pid_k * KB_SPLIT
    steps = tl.cdiv(tl.minimum(K_SPLIT, K - k_begin), BLOCK_K)
    for s in range(steps):
        k0 = k_begin + s * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + offs_k[None, :], mask=m_ok[:, None] & (offs_k < K)[None, :], other=0.0)
        w = _weight_tile(idx_ptr, cb_ptr, table, offs_n, n_ok, k0, kb_begin + s * (BLOCK_K // 2),
                         N, K, KB, stride_in, stride_cb, DT, BITS, PER_CHANNEL, LOOKUP, BLOCK_N,
                         BLOCK_K)
        if IEEE_FP32:  # fp32 in, fp32 math: tl.dot would otherwise round its inputs to tf32 on GPU
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    out_mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT:
        part = part_ptr + pid_k.to(tl.int64) * M * N
        tl.store(part + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], acc, mask=out_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :],
                 acc.to(DT), mask=out_mask)


@triton.jit
def _split_k_reduce_kernel(part_ptr, bias_ptr, y_ptr, M, N, SPLITS, stride_ym,
                           HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """y[m, n] = sum_s part[s, m, n] + bias[n], in y's dtype. Grid (M, cdiv(N, BLOCK))."""
    m = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs_n < N
    p = part_ptr + m.to(tl.int64) * N + offs_n
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for _ in range(SPLITS):  # step the pointer: s * M * N could overflow int32
        acc += tl.load(p, mask=ok, other=0.0)
        p += M * N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + m.to(tl.int64) * stride_ym + offs_n, acc.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _shared_dequant_kernel(
    idx_ptr, cb_ptr, w_ptr, N, K, KB, stride_in, stride_cb, stride_wn,
    BITS: tl.constexpr, PER_CHANNEL: tl.constexpr, LOOKUP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """W (N, K) in w's dtype, one (BLOCK_N, BLOCK_K) tile per program; grid (N / BN, K / BK)."""
    DT: tl.constexpr = w_ptr.dtype.element_ty
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    k0 = tl.program_id(1) * BLOCK_K
    table = _lookup_table(cb_ptr, offs_n, n_ok, stride_cb, DT, BITS, PER_CHANNEL, LOOKUP)
    w = _weight_tile(idx_ptr, cb_ptr, table, offs_n, n_ok, k0, tl.program_id(1) * (BLOCK_K // 2),
                     N, K, KB, stride_in, stride_cb, DT, BITS, PER_CHANNEL, LOOKUP, BLOCK_N,
                     BLOCK_K)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :], w,
             mask=n_ok[:, None] & (offs_k < K)[None, :])


# ------------------------------------------------------------------------------------------------
# v1 (kept for side-by-side timing; see the module docstring for why it is slow)
# ------------------------------------------------------------------------------------------------


@triton.jit
def _shared_linear_v1_kernel(
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


def _v1_blocks(M: int, device_type: str):
    if device_type != "cuda":  # the interpreter: small tiles keep it quick
        return 16, 16, 32, 4, 1
    bm = 16 if M <= 16 else (32 if M <= 32 else (64 if M <= 64 else 128))
    return bm, 128, 64, 4 if bm <= 64 else 8, 3


def _forward_v1(x, indices, codebook, bias, y, bits):
    M, K = x.shape
    N = indices.shape[0]
    bm, bn, bk, warps, stages = _v1_blocks(M, x.device.type)
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    _shared_linear_v1_kernel[grid](
        x, indices, codebook, bias if bias is not None else codebook, y,
        M, N, K,
        x.stride(0), x.stride(1), indices.stride(0), y.stride(0),
        codebook.stride(0) if codebook.dim() == 2 else 0,
        BITS=bits, PER_CHANNEL=codebook.dim() == 2, HAS_BIAS=bias is not None,
        IEEE_FP32=x.dtype == torch.float32,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
    )
    return y


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------


def _lookup_kind(bits: int, per_channel: bool, dtype: torch.dtype) -> int:
    if bits <= 4 and not per_channel and dtype != torch.float32:
        return LOOKUP_PAIR
    if not per_channel or bits <= 4:
        return LOOKUP_TABLE
    return LOOKUP_GLOBAL


_SM_COUNT: dict = {}
_CONFIGS: dict = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _SM_COUNT:
        _SM_COUNT[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _SM_COUNT[i]


def fused_config(M: int, N: int, K: int, device: torch.device, dtype: torch.dtype,
                 lookup: int = LOOKUP_PAIR, tiles: Optional[tuple] = None) -> dict:
    """Tiles, warps, stages and the K split of v2_fused for one call (no host sync).

    tiles: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) to use instead of the defaults (the
    benchmark's sweep); the split still follows the rule below.
    The split gives every SM about four programs when the (M, N) tiles alone cannot, but stops
    before the fp32 partial sums (8 * split * M * N bytes written and read back, mostly in L2)
    exceed twice the index bytes (N * K / 2).
    """
    programs_wanted = 4 * _sm_count(device)
    if tiles is not None:
        bm, bn, bk, warps, stages = tiles
    elif device.type != "cuda":  # the interpreter: small tiles keep it quick, and K still splits
        bm, bn, bk, warps, stages = 16, 16, 32, 4, 1
    else:
        if dtype == torch.float32:  # ieee fp32 dot runs on the FMA units: small tiles
            bm = 16 if M <= 16 else (32 if M <= 32 else 64)
            bn, bk, warps, stages = (32 if M <= 16 else 64), 32 if M > 16 else 128, 4, 3
        elif M <= 16:  # decode: bytes and lookups bound it, not the MMA. 120 registers and 40 KB
            # of shared memory (sm_90): 4 programs per SM, 16 warps, ~48 KB of loads in flight
            bm, bn, bk, warps, stages = 16, 64, 128, 4, 4
        elif M <= 64:  # one warpgroup, wgmma 64 x 128
            bm, bn, bk, warps, stages = 64, 128, 64, 4, 4
        else:
            bm, bn, bk, warps, stages = 128, 128, 64, 8, 3
        if lookup == LOOKUP_GLOBAL:  # the pipeliner stages the 4-byte codebook gathers too
            bk, stages = 64, min(stages, 3)
    n_tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    k_steps = max(1, triton.cdiv(K, bk))
    split = max(1, min(k_steps, triton.cdiv(programs_wanted, n_tiles), K // (8 * max(M, 1))))
    k_split = triton.cdiv(k_steps, split) * bk  # columns per program, a multiple of BLOCK_K
    split = max(1, triton.cdiv(K, k_split))
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps,
            "num_stages": stages, "split": split, "k_split": k_split}


def _forward_v2_fused(x, indices, codebook, bias, y, bits, config=None):
    M, K = x.shape
    N = indices.shape[0]
    per_channel = codebook.dim() == 2
    lookup = _lookup_kind(bits, per_channel, x.dtype)
    if config is None:  # cached: at decode sizes the host time of a call is what the user waits on
        key = (M, N, K, x.device, x.dtype, lookup)
        config = _CONFIGS.get(key)
        if config is None:
            if len(_CONFIGS) > 4096:  # variable M (e.g. sequence lengths) must not grow it forever
                _CONFIGS.clear()
            config = _CONFIGS[key] = fused_config(M, N, K, x.device, x.dtype, lookup)
    cfg = dict(config)
    split, k_split = cfg.pop("split"), cfg.pop("k_split")
    assert k_split % cfg["BLOCK_K"] == 0 and split * k_split >= K
    part = (torch.empty((split, M, N), dtype=torch.float32, device=x.device) if split > 1 else y)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]), split)
    _shared_linear_fwd_kernel[grid](
        x, indices, codebook, bias if bias is not None else codebook, y, part,
        M, N, K, indices.shape[1], k_split, k_split // 2,
        x.stride(0), indices.stride(0), y.stride(0), codebook.stride(0) if per_channel else 0,
        BITS=bits, PER_CHANNEL=per_channel, HAS_BIAS=bias is not None,
        IEEE_FP32=x.dtype == torch.float32, LOOKUP=lookup, SPLIT=split > 1, **cfg,
    )
    if split > 1:
        block = min(1024, triton.next_power_of_2(N))
        _split_k_reduce_kernel[(M, triton.cdiv(N, block))](
            part, bias if bias is not None else part, y, M, N, split, y.stride(0),
            HAS_BIAS=bias is not None, BLOCK=block, num_warps=4,
        )
    return y


def dequantize(indices: torch.Tensor, codebook: torch.Tensor, in_features: int, bits: int,
               dtype: torch.dtype) -> torch.Tensor:
    """W (N, in_features) in dtype (fp16/bf16/fp32), entry 0 read as 0."""
    N = indices.shape[0]
    K = in_features
    w = torch.empty((N, K), dtype=dtype, device=indices.device)
    if N == 0 or K == 0:
        return w
    per_channel = codebook.dim() == 2
    bn, bk = (16, 32) if indices.device.type != "cuda" else (32, 256)
    _shared_dequant_kernel[(triton.cdiv(N, bn), triton.cdiv(K, bk))](
        indices, codebook, w, N, K, indices.shape[1], indices.stride(0),
        codebook.stride(0) if per_channel else 0, w.stride(0),
        BITS=bits, PER_CHANNEL=per_channel, LOOKUP=_lookup_kind(bits, per_channel, dtype),
        BLOCK_N=bn, BLOCK_K=bk, num_warps=4,
    )
    return w


def _forward_v2_dequant(x, indices, codebook, bias, in_features, bits):
    w = dequantize(indices, codebook, in_features, bits, x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


VARIANTS = ("v2", "v2_fused", "v2_dequant", "v1")


def resolve_variant(variant: str, M: int, dtype: torch.dtype) -> str:
    """The path "v2" takes for M rows of dtype; any other variant is itself."""
    if variant != "v2":
        return variant
    return "v2_dequant" if M >= _DEQUANT_MIN_M and dtype != torch.float32 else "v2_fused"


def shared_linear_forward(
    x: torch.Tensor,
    indices: torch.Tensor,
    codebook: torch.Tensor,
    bias: Optional[torch.Tensor],
    in_features: int,
    bits: int,
    *,
    variant: str = "v2",
    config: Optional[dict] = None,
) -> torch.Tensor:
    """y = x @ W.T + bias, x (M, K). ``variant`` and ``config`` (v2_fused tiles) are for benchmarks
    and tests; the public op never passes them."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    M, K = x.shape
    N = indices.shape[0]
    if x.stride(1) != 1:
        x = x.contiguous()
    indices = indices.contiguous()
    codebook = codebook.float().contiguous()
    bias = None if bias is None else bias.contiguous()  # read as ptr + n
    variant = resolve_variant(variant, M, x.dtype)
    if variant == "v2_dequant":
        if x.dtype == torch.float32:
            raise ValueError("v2_dequant takes fp16/bf16 x (fp32 stays on the exact fused path)")
        return _forward_v2_dequant(x, indices, codebook, bias, in_features, bits)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    if K == 0:
        return y.copy_(bias.to(x.dtype).expand(M, N)) if bias is not None else y.zero_()
    if variant == "v1":
        return _forward_v1(x, indices, codebook, bias, y, bits)
    return _forward_v2_fused(x, indices, codebook, bias, y, bits, config)
