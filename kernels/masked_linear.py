"""Block-sparse masked linear (Triton): GEMMs that skip the empty 64x64 tiles of a pruned weight.

With x (M, K), weight W and bool mask Mk (N, K), dy (M, N):

    forward      y  = x (W o Mk)^T + b          (M, N)
    grad_input   dx = dy (W o Mk)               (M, K)
    grad_weight  dW = (dy^T x) o Mk             (N, K), exactly zero wherever Mk is False

fp16/bf16 (fp32 too, with IEEE fp32 products) in, fp32 accumulation, result in the input dtype.

The tile map (fastkd.reference.masked_linear.build_tile_map; the offsets of its sections come from
TileMapLayout and are passed in by the caller) describes the mask on a grid of 64x64 weight tiles:
``kind`` (0 empty, 1 partly kept, 2 full) and, for groups of one or two tile-rows (forward) or
tile-columns (grad_input), an ELL list of the group's non-empty reduction tiles, full ones first.

forward / grad_input (one kernel, ``_masked_mm_kernel``): a program owns a BLOCK_M x BLOCK_O block
of the output, BLOCK_O = 64 g (g = 1 or 2 map rows/columns). Its reduction runs only over the
group's non-empty 64-wide tiles, read from the list: first the full ones, where W is loaded as is
(the mask is never read), then the partly kept ones, where the mask tile is loaded and applied in
registers (``where``, so an inf/NaN under a pruned entry cannot leak). Empty tiles are never
loaded. Both loops are plain ``for`` loops over a list, which Triton software-pipelines
(``num_stages``) with ``tl.dot`` on tensor cores (wgmma on Hopper).

grad_weight (``_masked_grad_weight_kernel``): a program owns one 64x64 tile of dW and reduces over
all of M; an empty tile runs zero iterations and stores zeros, a full one stores dy^T x as is, a
partly kept one applies the mask in the epilogue.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

TILE = 64  # the map's tile; must equal fastkd.reference.masked_linear.TILE

# Map tiles per program along the output dimension of the forward and grad_input (1: BLOCK_N or
# BLOCK_K = 64; 2: 128). 2 halves the loads of the other operand and doubles the MMA size, but a
# group of two tiles is non-empty where either is: with random 64x64 block sparsity s the work per
# kept tile grows by (1 - s^2) / (1 - s) (1.75x at s = 0.75). Left at 1 until a GPU run says
# otherwise; bench/bench_masked_linear.py times both.
TILES_PER_PROGRAM = {"forward": 1, "grad_input": 1}

# Programs along M share the same weight tiles: GROUP_M consecutive programs walk down M before
# moving along the output dimension, so a group's weight tiles stay in L2.
GROUP_M = 8


@triton.jit
def _dot(a, b, acc, IEEE_FP32: tl.constexpr):
    if IEEE_FP32:  # fp32 in, fp32 products: tl.dot would otherwise round its inputs to tf32
        return tl.dot(a, b, acc, input_precision="ieee", out_dtype=tl.float32)
    return tl.dot(a, b, acc, out_dtype=tl.float32)


@triton.jit
def _masked_mm_kernel(
    a_ptr, w_ptr, keep_ptr, bias_ptr, out_ptr, map_ptr,
    M, OUT, RED,
    stride_am, stride_ar,
    stride_wo, stride_wr,
    stride_ko, stride_kr,
    stride_om, stride_oo,
    count_off, nfull_off, idx_off, list_width,
    HAS_BIAS: tl.constexpr, IEEE_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, TILE_R: tl.constexpr, GROUP: tl.constexpr,
):
    """out[m, o] = sum_r a[m, r] * (W o Mk)[o, r] (+ bias[o]) over the non-empty tiles only.

    a (M, RED), W and keep (OUT, RED) through their strides, out (M, OUT). Forward: a = x, o = n,
    r = k. grad_input: a = dy, o = k, r = n (W read transposed through its strides). The list at
    count_off / nfull_off / idx_off (width list_width) names, per group of BLOCK_O output columns,
    the non-empty TILE_R-wide reduction tiles, full ones first.
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_o = tl.cdiv(OUT, BLOCK_O)
    per_group = GROUP * num_o
    first_m = (pid // per_group) * GROUP
    group_rows = tl.minimum(num_m - first_m, GROUP)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_o = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    m_ok = offs_m < M
    o_ok = offs_o < OUT
    a_rows = a_ptr + offs_m[:, None].to(tl.int64) * stride_am
    w_cols = w_ptr + offs_o[None, :].to(tl.int64) * stride_wo
    k_cols = keep_ptr + offs_o[None, :].to(tl.int64) * stride_ko

    count = tl.load(map_ptr + count_off + pid_o)
    nfull = tl.load(map_ptr + nfull_off + pid_o)
    tiles = map_ptr + idx_off + pid_o * list_width
    lane_r = tl.arange(0, TILE_R)
    acc = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32)
    # The operand pointers are carried from one listed tile to the next (advanced by the distance
    # to the next tile, read one iteration ahead) instead of recomputed from an index loaded in the
    # same iteration: Triton's pipeliner then prefetches num_stages - 1 tiles ahead as in a dense
    # GEMM, where a load-to-address chain inside the iteration cut it to double buffering (seen in
    # the sm_90 TTGIR).
    # Full tiles: every in-bounds weight is kept, the mask is not read.
    t = tl.load(tiles, mask=nfull > 0, other=0)
    a_ptrs = a_rows + (t * TILE_R + lane_r)[None, :].to(tl.int64) * stride_ar
    w_ptrs = w_cols + (t * TILE_R + lane_r)[:, None].to(tl.int64) * stride_wr
    for i in range(0, nfull):
        r_ok = t * TILE_R + lane_r < RED
        a = tl.load(a_ptrs, mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=r_ok[:, None] & o_ok[None, :], other=0.0)
        acc = _dot(a, w, acc, IEEE_FP32)
        t_next = tl.load(tiles + i + 1, mask=i + 1 < nfull, other=t)
        step = ((t_next - t) * TILE_R).to(tl.int64)
        a_ptrs += step * stride_ar
        w_ptrs += step * stride_wr
        t = t_next
    # Partly kept tiles: the mask tile is loaded too and applied in registers.
    t = tl.load(tiles + nfull, mask=nfull < count, other=0)
    a_ptrs = a_rows + (t * TILE_R + lane_r)[None, :].to(tl.int64) * stride_ar
    w_ptrs = w_cols + (t * TILE_R + lane_r)[:, None].to(tl.int64) * stride_wr
    k_ptrs = k_cols + (t * TILE_R + lane_r)[:, None].to(tl.int64) * stride_kr
    for i in range(nfull, count):
        r_ok = t * TILE_R + lane_r < RED
        w_ok = r_ok[:, None] & o_ok[None, :]
        a = tl.load(a_ptrs, mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=w_ok, other=0.0)
        keep = tl.load(k_ptrs, mask=w_ok, other=0)
        w = tl.where(keep != 0, w, tl.zeros_like(w))
        acc = _dot(a, w, acc, IEEE_FP32)
        t_next = tl.load(tiles + i + 1, mask=i + 1 < count, other=t)
        step = ((t_next - t) * TILE_R).to(tl.int64)
        a_ptrs += step * stride_ar
        w_ptrs += step * stride_wr
        k_ptrs += step * stride_kr
        t = t_next
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_o, mask=o_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om
    tl.store(
        out_ptrs + offs_o[None, :].to(tl.int64) * stride_oo,
        acc.to(out_ptr.dtype.element_ty),
        mask=m_ok[:, None] & o_ok[None, :],
    )


@triton.jit
def _masked_grad_weight_kernel(
    g_ptr, x_ptr, keep_ptr, out_ptr, map_ptr,
    M, N, K, k_tiles,
    stride_gm, stride_gn,
    stride_xm, stride_xk,
    stride_kn, stride_kk,
    stride_on, stride_ok,
    IEEE_FP32: tl.constexpr, BLOCK_M: tl.constexpr, TILE_N: tl.constexpr, TILE_K: tl.constexpr,
):
    """dW[n, k] = sum_m dy[m, n] x[m, k] on the non-empty tiles, times the mask on partly kept
    ones, zero on empty ones. One program per map tile (row-major over the tile grid)."""
    pid = tl.program_id(0)
    tn = pid // k_tiles
    tk = pid % k_tiles
    kind = tl.load(map_ptr + pid)  # kind is the map's first section, row-major (tn, tk)
    offs_n = tn * TILE_N + tl.arange(0, TILE_N)
    offs_k = tk * TILE_K + tl.arange(0, TILE_K)
    n_ok = offs_n < N
    k_ok = offs_k < K
    g_cols = g_ptr + offs_n[:, None].to(tl.int64) * stride_gn
    x_cols = x_ptr + offs_k[None, :].to(tl.int64) * stride_xk
    acc = tl.zeros((TILE_N, TILE_K), dtype=tl.float32)
    steps = tl.where(kind == 0, 0, tl.cdiv(M, BLOCK_M))  # an empty tile reads nothing
    for s in range(0, steps):
        offs_m = s * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        gt = tl.load(g_cols + offs_m[None, :].to(tl.int64) * stride_gm,
                     mask=n_ok[:, None] & m_ok[None, :], other=0.0)  # (TILE_N, BLOCK_M) = dy^T
        xx = tl.load(x_cols + offs_m[:, None].to(tl.int64) * stride_xm,
                     mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_M, TILE_K)
        acc = _dot(gt, xx, acc, IEEE_FP32)
    out_ok = n_ok[:, None] & k_ok[None, :]
    # Only a partly kept tile reads its mask; full ones keep everything (other=1). (The kind is
    # broadcast to a tensor first: the interpreter rejects a scalar-and-tensor load mask.)
    partial = (tl.full((TILE_N, TILE_K), 0, tl.int32) + kind) == 1
    rows_n = offs_n[:, None].to(tl.int64)
    cols_k = offs_k[None, :].to(tl.int64)
    keep = tl.load(keep_ptr + rows_n * stride_kn + cols_k * stride_kk, mask=out_ok & partial, other=1)
    acc = tl.where(keep != 0, acc, 0.0)
    tl.store(
        out_ptr + rows_n * stride_on + cols_k * stride_ok,
        acc.to(out_ptr.dtype.element_ty),
        mask=out_ok,
    )


def _pow2_at_least(v: int, low: int) -> int:
    p = low
    while p < v:
        p *= 2
    return p


def _mm_config(M: int, dtype: torch.dtype, tiles_per_program: int, device_type: str):
    """(BLOCK_M, BLOCK_O, num_warps, num_stages) for the forward / grad_input kernel.

    Sizes checked by compiling for sm_90 without a GPU (Triton 3.6 and 3.9, ptxas -v): bf16/fp16
    128x64 with 4 warps and 4 stages: wgmma, 4-deep cp.async buffers, 108 KiB shared memory (two
    CTAs per SM), 166-170 registers, no spills; 128x128 with 8 warps and 3 stages: 112 KiB, 151
    registers. fp32 (IEEE, so FMA rather than tensor cores) 64x64 with 8 warps: a few hundred
    bytes of spills at any size tried; it is there for correctness, not speed.
    """
    block_o = TILE * tiles_per_program
    if device_type != "cuda":  # the interpreter: small M blocks keep it quick
        return 16, block_o, 4, 1
    if dtype == torch.float32:
        return min(64, _pow2_at_least(M, 16)), block_o, 8, 3
    block_m = min(128, _pow2_at_least(M, 16))
    wide = block_m * block_o >= 128 * 128
    return block_m, block_o, 8 if wide else 4, 3 if wide else 4


def _grad_weight_config(M: int, dtype: torch.dtype, device_type: str):
    """(BLOCK_M, num_warps, num_stages) for the grad_weight kernel (BLOCK_M is its reduction).
    bf16/fp16: 3 stages of 2 x 128x64 operands = 96 KiB shared memory, two CTAs per SM."""
    if device_type != "cuda":
        return 16, 4, 1
    if dtype == torch.float32:
        return min(64, _pow2_at_least(M, 16)), 4, 3
    return min(128, _pow2_at_least(M, 16)), 4, 3


def _mask_bytes(mask: torch.Tensor) -> torch.Tensor:
    return mask.view(torch.uint8)  # bool is one byte; loaded as a byte and compared with 0


def _check(tile_map: torch.Tensor, size: int, device) -> None:
    if tile_map.dtype != torch.int32 or tile_map.dim() != 1 or not tile_map.is_contiguous():
        raise ValueError(
            "tile_map must be a contiguous 1-D int32 tensor (build_tile_map(mask).data)"
        )
    if tile_map.numel() != size or tile_map.device != device:
        raise ValueError(
            f"tile_map has {tile_map.numel()} entries on {tile_map.device}, a tile map of this "
            f"mask has {size} on {device}; rebuild it with "
            "fastkd.reference.masked_linear.build_tile_map"
        )


def _masked_mm(a, w, w_strides, mask, m_strides, bias, out, tile_map, tile_list, tiles_per_program):
    M, red = a.shape
    n_out = out.shape[1]
    if M == 0 or n_out == 0:
        return out
    block_m, block_o, warps, stages = _mm_config(M, a.dtype, tiles_per_program, a.device.type)
    grid = (triton.cdiv(M, block_m) * triton.cdiv(n_out, block_o),)
    bias = None if bias is None else bias.contiguous()  # read as ptr + n
    _masked_mm_kernel[grid](
        a, w, mask, bias if bias is not None else out, out, tile_map,
        M, n_out, red,
        a.stride(0), a.stride(1),
        w_strides[0], w_strides[1],
        m_strides[0], m_strides[1],
        out.stride(0), out.stride(1),
        tile_list.count, tile_list.nfull, tile_list.idx, tile_list.width,
        HAS_BIAS=bias is not None, IEEE_FP32=a.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_O=block_o, TILE_R=TILE, GROUP=GROUP_M,
        num_warps=warps, num_stages=stages,
    )
    return out


def masked_linear_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: Optional[torch.Tensor],
    tile_map: torch.Tensor,
    layout,
    tiles_per_program: Optional[int] = None,
) -> torch.Tensor:
    """y (M, N) = x (M, K) (W o Mk)^T + b. ``layout``: the map's TileMapLayout."""
    g = tiles_per_program or TILES_PER_PROGRAM["forward"]
    _check(tile_map, layout.size, x.device)
    M = x.shape[0]
    N = weight.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    keep = _mask_bytes(mask)
    return _masked_mm(
        x, weight, (weight.stride(0), weight.stride(1)), keep, (keep.stride(0), keep.stride(1)),
        bias, y, tile_map, layout.lists()[f"rows{g}"], g,
    )


def masked_linear_grad_input(
    grad_out: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    tile_map: torch.Tensor,
    layout,
    tiles_per_program: Optional[int] = None,
) -> torch.Tensor:
    """dx (M, K) = dy (M, N) (W o Mk)."""
    g = tiles_per_program or TILES_PER_PROGRAM["grad_input"]
    _check(tile_map, layout.size, grad_out.device)
    M = grad_out.shape[0]
    K = weight.shape[1]
    dx = torch.empty((M, K), dtype=grad_out.dtype, device=grad_out.device)
    keep = _mask_bytes(mask)
    # output column o = k, reduction r = n: W and the mask are read transposed through strides
    w_strides = (weight.stride(1), weight.stride(0))
    k_strides = (keep.stride(1), keep.stride(0))
    return _masked_mm(
        grad_out, weight, w_strides, keep, k_strides, None, dx, tile_map,
        layout.lists()[f"cols{g}"], g,
    )


def masked_linear_grad_weight(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    mask: torch.Tensor,
    tile_map: torch.Tensor,
    layout,
) -> torch.Tensor:
    """dW (N, K) = (dy^T x) o Mk, with dy (M, N) and x (M, K)."""
    _check(tile_map, layout.size, x.device)
    M = x.shape[0]
    N, K = mask.shape
    dw = torch.empty((N, K), dtype=x.dtype, device=x.device)
    if N == 0 or K == 0:
        return dw
    block_m, warps, stages = _grad_weight_config(M, x.dtype, x.device.type)
    keep = _mask_bytes(mask)
    grid = (layout.n_tiles * layout.k_tiles,)
    _masked_grad_weight_kernel[grid](
        grad_out, x, keep, dw, tile_map,
        M, N, K, layout.k_tiles,
        grad_out.stride(0), grad_out.stride(1),
        x.stride(0), x.stride(1),
        keep.stride(0), keep.stride(1),
        dw.stride(0), dw.stride(1),
        IEEE_FP32=x.dtype == torch.float32, BLOCK_M=block_m, TILE_N=TILE, TILE_K=TILE,
        num_warps=warps, num_stages=stages,
    )
    return dw
