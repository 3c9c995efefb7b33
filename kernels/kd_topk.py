"""Fused KD loss against a top-k teacher (Triton); the math is in fastkd.reference.kd_topk.

Shapes: student (N, V) or (B, L, V) (a sliced batch read in place: kernels/_rows.py)
fp32/fp16/bf16 with unit column stride; ids (N, k) int64 distinct class ids;
logprobs (N, k) fp32 teacher log-probabilities; target (N,) int64 or none.

Forward, one program per row: one streaming pass over the V student logits keeps the online
(max, sum) of 2^(s * log2(e) / T) (and of s at T = 1 for the cross-entropy when T != 1), and the
same sum without the k ids' classes (the tail): the ids, sorted, are walked alongside the column
blocks, so each block masks only the ids that fall in it. Then the k ids are gathered, giving
Q_i = q[id_i], and Q_tail = tail sum / sum. It writes the row loss and
(lse(s/T), lse(s), P_sum, log r), r = P_tail / Q_tail (log r = -inf without a tail mass).

Backward: one streaming pass writes, for every class, the tail-class gradient
    g_row * (c_kl * (q_j * P_sum - 2^(s_j * log2(e) / T - lse2 + log2 r)) + (1 - alpha) * (...))
(q_j * r as one exponential: r alone can pass fp32's range when the student's tail is tiny)
and a second small launch overwrites the k id columns with q_j * P_sum - P_i in place of the tail
term (same-stream launches are ordered, so no barrier is needed).

Precision: Q_tail is summed from the tail classes themselves, as the reference does, so it keeps
its relative precision however small it is. (It used to be 1 - sum_i Q_i, whose absolute error is
~1e-7: for a student confident on the teacher's ids, Q_tail < ~1e-6, it came out 0 or noise, and
r = P_tail / Q_tail, which the tail classes' gradients carry, was off by orders of magnitude.)
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._rows import n_rows as rows_of
from ._rows import row_strides
from .kd_loss import LOG2E, _launch_config


@triton.jit
def _student_row(student_ptr, row, rows_inner, stride_s0, stride_s1):
    outer = row // rows_inner
    return student_ptr + outer * stride_s0 + (row - outer * rows_inner) * stride_s1


@triton.jit
def _ids_in_block(sorted_row, ptr, nid, k_read, start, cols, BLOCK_V: tl.constexpr):
    """Which columns of the block starting at ``start`` are ids: walks the row's sorted ids
    from ``ptr`` (``nid``, the next one) past the block; returns the mask and where it stopped."""
    is_id = cols < 0
    while nid < start + BLOCK_V:
        is_id = is_id | (cols == nid)
        ptr += 1
        nid = tl.load(sorted_row + ptr, mask=ptr < k_read, other=1 << 62)
    return is_id, ptr, nid


@triton.jit
def _kd_topk_fwd_kernel(
    student_ptr,
    ids_ptr,
    sorted_ids_ptr,  # the row's ids in increasing order (read only with HAS_TAIL)
    lp_ptr,
    target_ptr,
    loss_ptr,
    stats_ptr,
    rows_inner,
    stride_s0,
    stride_s1,
    stride_ids,
    stride_sorted,
    stride_lp,
    n_cols,
    k,
    scale2,  # log2(e) / T
    temp_sq,
    alpha,
    ignore_index,
    HAS_TARGET: tl.constexpr,
    SEPARATE_CE: tl.constexpr,
    HAS_TAIL: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    ln2 = 0.6931471805599453
    row = tl.program_id(0).to(tl.int64)
    s_row = _student_row(student_ptr, row, rows_inner, stride_s0, stride_s1)
    n_loop = n_cols
    if HAS_TARGET:
        tgt = tl.load(target_ptr + row)
        valid = tgt != ignore_index
        n_loop = tl.where(valid, n_cols, 0)
    neg_inf = float("-inf")
    m_s = neg_inf
    d_s = 0.0
    d_tail = 0.0
    m_1 = neg_inf
    d_1 = 0.0
    k_read = k
    if HAS_TARGET:
        k_read = tl.where(valid, k, 0)  # ignored rows read nothing
    # the next id (sorted) not yet masked; past the last, a value no column reaches
    sorted_row = sorted_ids_ptr + row * stride_sorted
    ptr = 0
    if HAS_TAIL:
        nid = tl.load(sorted_row, mask=k_read > 0, other=1 << 62)
    for start in range(0, n_loop, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        s = tl.load(s_row + cols, mask=cols < n_cols, other=neg_inf).to(tl.float32)
        s2 = s * scale2
        new_m = tl.maximum(m_s, tl.max(s2, 0))
        sh = tl.where(new_m == neg_inf, 0.0, new_m)
        e_s = tl.exp2(s2 - sh)
        rescale = tl.exp2(m_s - sh)
        d_s = d_s * rescale + tl.sum(e_s, 0)
        if HAS_TAIL:
            # the tail's sum, same shifts: the classes of this block that are not ids (each id
            # is compared against the one block it falls in)
            is_id, ptr, nid = _ids_in_block(sorted_row, ptr, nid, k_read, start, cols, BLOCK_V)
            d_tail = d_tail * rescale + tl.sum(tl.where(is_id, 0.0, e_s), 0)
        m_s = new_m  # the running max (-inf while all -inf), not the shift: see kd_loss
        if SEPARATE_CE:
            s1 = s * 1.4426950408889634
            new_m1 = tl.maximum(m_1, tl.max(s1, 0))
            sh1 = tl.where(new_m1 == neg_inf, 0.0, new_m1)
            d_1 = d_1 * tl.exp2(m_1 - sh1) + tl.sum(tl.exp2(s1 - sh1), 0)
            m_1 = new_m1
    # A nan or +inf logit leaves d_s nan, and so the row (as kd_loss does); a student with no
    # mass (every logit -inf) has d_s = 0 and lse = -inf: its row is made nan below, and the
    # backward's exponentials of it are nan. Ignored rows read nothing; the selects drop them.
    lse_s2 = m_s + tl.log2(d_s)

    kk = tl.arange(0, BLOCK_K)
    k_mask = kk < k_read
    ids = tl.load(ids_ptr + row * stride_ids + kk, mask=k_mask, other=0)
    lp = tl.load(lp_ptr + row * stride_lp + kk, mask=k_mask, other=neg_inf).to(tl.float32)
    s_top = tl.load(s_row + ids, mask=k_mask, other=neg_inf).to(tl.float32)
    log2q = s_top * scale2 - lse_s2
    p = tl.exp(lp)
    d = tl.sum(tl.where(p > 0, p * (lp - log2q * ln2), 0.0), 0)
    d = tl.where(tl.sum(tl.where(lp != lp, 1, 0), 0) > 0, float("nan"), d)  # a nan teacher entry
    p_sum = tl.sum(p, 0)
    log_ratio_out = float("-inf")
    if HAS_TAIL:
        # log2 of the tail's sum under the row's shift. Below ~2^-80 of the row's largest term
        # its terms underflow (and at 0 the loss was inf where the reference's is finite): then
        # a second pass, for this row only, sums the tail under its own max.
        log2_tail = tl.log2(d_tail)
        n_redo = tl.where(d_tail < 1e-24, n_loop, 0)
        m_t = neg_inf
        d_t = 0.0
        ptr = 0
        nid = tl.load(sorted_row, mask=(k_read > 0) & (n_redo > 0), other=1 << 62)
        for start in range(0, n_redo, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            s2 = tl.load(s_row + cols, mask=cols < n_cols, other=neg_inf).to(tl.float32) * scale2
            is_id, ptr, nid = _ids_in_block(sorted_row, ptr, nid, k_read, start, cols, BLOCK_V)
            s2 = tl.where(is_id, neg_inf, s2)
            new_t = tl.maximum(m_t, tl.max(s2, 0))
            sh_t = tl.where(new_t == neg_inf, 0.0, new_t)
            d_t = d_t * tl.exp2(m_t - sh_t) + tl.sum(tl.exp2(s2 - sh_t), 0)
            m_t = new_t
        log2_tail = tl.where(n_redo > 0, m_t - m_s + tl.log2(d_t), log2_tail)
        p_tail = tl.maximum(1.0 - p_sum, 0.0)
        # log Q_tail = log(tail sum / sum): -inf when the student gives the tail no mass (the
        # divergence is then infinite, as the reference's), unless the teacher's tail mass is
        # within fp32 rounding of 0 (reference.kd_topk.tail_rounding)
        no_tail = log2_tail == neg_inf
        pos = p_tail > tl.where(no_tail, 4.0 * k * 5.960464477539063e-08, 0.0)
        p_tail = tl.where(pos, p_tail, 0.0)
        log_ratio = tl.log(tl.where(pos, p_tail, 1.0)) - ln2 * (log2_tail - tl.log2(d_s))
        d += tl.where(pos, p_tail * log_ratio, 0.0)
        log_ratio_out = tl.where(pos, log_ratio, float("-inf"))
        p_sum += p_tail
    d = tl.where(d_s == 0, float("nan"), d)
    lse_s = ln2 * lse_s2
    if HAS_TARGET:
        if SEPARATE_CE:
            lse_1 = ln2 * (m_1 + tl.log2(d_1))
        else:
            lse_1 = lse_s
        safe_tgt = tl.where(valid, tgt, 0).to(tl.int64)
        s_y = tl.load(s_row + safe_tgt).to(tl.float32)
        # a term of weight 0 adds exactly 0 (never 0 * inf = nan; see reference.mix_rows)
        row_loss = tl.where(alpha == 0.0, 0.0, alpha * temp_sq * d) + tl.where(
            alpha == 1.0, 0.0, (1.0 - alpha) * (lse_1 - s_y))
        row_loss = tl.where(valid, row_loss, 0.0)
        lse_s = tl.where(valid, lse_s, 0.0)
        lse_1 = tl.where(valid, lse_1, 0.0)
        p_sum = tl.where(valid, p_sum, 0.0)
        log_ratio_out = tl.where(valid, log_ratio_out, 0.0)
    else:
        row_loss = temp_sq * d
        lse_1 = lse_s
    tl.store(loss_ptr + row, row_loss)
    tl.store(stats_ptr + row * 4 + 0, lse_s)
    tl.store(stats_ptr + row * 4 + 1, lse_1)
    tl.store(stats_ptr + row * 4 + 2, p_sum)
    tl.store(stats_ptr + row * 4 + 3, log_ratio_out)


@triton.jit
def _row_setup(grad_rows_ptr, stride_g, target_ptr, stats_ptr, row, ignore_index,
               HAS_TARGET: tl.constexpr):
    g = tl.load(grad_rows_ptr + row * stride_g).to(tl.float32)
    tgt = -1
    if HAS_TARGET:
        tgt = tl.load(target_ptr + row)
        g = tl.where(tgt != ignore_index, g, 0.0)
    lse_s2 = tl.load(stats_ptr + row * 4 + 0) * 1.4426950408889634
    lse_12 = tl.load(stats_ptr + row * 4 + 1) * 1.4426950408889634
    p_sum = tl.load(stats_ptr + row * 4 + 2)
    log2_ratio = tl.load(stats_ptr + row * 4 + 3) * 1.4426950408889634
    return g, tgt, lse_s2, lse_12, p_sum, log2_ratio


@triton.jit
def _kd_topk_bwd_kernel(
    grad_rows_ptr,
    stride_g,
    student_ptr,
    target_ptr,
    stats_ptr,
    grad_ptr,
    rows_inner,
    stride_s0,
    stride_s1,
    stride_out,
    n_cols,
    scale2,
    c_kl,
    c_ce,
    ignore_index,
    HAS_TARGET: tl.constexpr,
    SEPARATE_CE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = _student_row(student_ptr, row, rows_inner, stride_s0, stride_s1)
    out_row = grad_ptr + row * stride_out
    g, tgt, lse_s2, lse_12, p_sum, log2_ratio = _row_setup(
        grad_rows_ptr, stride_g, target_ptr, stats_ptr, row, ignore_index, HAS_TARGET
    )
    n_read = tl.where(g != 0.0, n_cols, 0)  # ignored (or zero-weight) rows write zeros
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        s = tl.load(s_row + cols, mask=cols < n_read, other=float("-inf")).to(tl.float32)
        s2 = s * scale2
        q = tl.exp2(s2 - lse_s2)
        grad = c_kl * (q * p_sum - tl.exp2(s2 - (lse_s2 - log2_ratio)))
        grad = tl.where(c_kl == 0.0, 0.0, grad)  # alpha = 0: no teacher term, not 0 * inf
        if HAS_TARGET:
            if SEPARATE_CE:
                q1 = tl.exp2(s * 1.4426950408889634 - lse_12)
            else:
                q1 = q
            grad += c_ce * (q1 - tl.where(cols == tgt, 1.0, 0.0))
        tl.store(out_row + cols, (grad * g).to(out_row.dtype.element_ty), mask=cols < n_cols)


@triton.jit
def _kd_topk_bwd_ids_kernel(
    grad_rows_ptr,
    stride_g,
    student_ptr,
    ids_ptr,
    lp_ptr,
    target_ptr,
    stats_ptr,
    grad_ptr,
    rows_inner,
    stride_s0,
    stride_s1,
    stride_ids,
    stride_lp,
    stride_out,
    k,
    scale2,
    c_kl,
    c_ce,
    ignore_index,
    HAS_TARGET: tl.constexpr,
    SEPARATE_CE: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    g, tgt, lse_s2, lse_12, p_sum, log2_ratio = _row_setup(
        grad_rows_ptr, stride_g, target_ptr, stats_ptr, row, ignore_index, HAS_TARGET
    )
    kk = tl.arange(0, BLOCK_K)
    k_mask = kk < k
    ids = tl.load(ids_ptr + row * stride_ids + kk, mask=k_mask, other=0)
    lp = tl.load(lp_ptr + row * stride_lp + kk, mask=k_mask, other=float("-inf")).to(tl.float32)
    read = kk < tl.where(g != 0.0, k, 0)  # ignored (zero-weight) rows read nothing
    s_row = _student_row(student_ptr, row, rows_inner, stride_s0, stride_s1)
    s = tl.load(s_row + ids, mask=read, other=float("-inf")).to(tl.float32)
    q = tl.exp2(s * scale2 - lse_s2)
    grad = c_kl * (q * p_sum - tl.where(read, tl.exp(lp), 0.0))
    grad = tl.where(c_kl == 0.0, 0.0, grad)
    if HAS_TARGET:
        if SEPARATE_CE:
            q1 = tl.exp2(s * 1.4426950408889634 - lse_12)
        else:
            q1 = q
        grad += c_ce * (q1 - tl.where(ids == tgt, 1.0, 0.0))
    out = grad_ptr + row * stride_out + ids
    tl.store(out, (grad * g).to(grad_ptr.dtype.element_ty), mask=k_mask)


def _block_k(k: int) -> int:
    return triton.next_power_of_2(max(k, 2))


def kd_loss_topk_forward(
    student: torch.Tensor,
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    target: Optional[torch.Tensor],
    temperature: float,
    alpha: float,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row losses (N,) and statistics (N, 4), fp32; student (N, V) or (B, L, V) (kernels/_rows.py),
    ids and logprobs (N, k)."""
    n_rows, n_cols = rows_of(student), student.shape[-1]
    k = ids.shape[1]
    loss = torch.empty(n_rows, dtype=torch.float32, device=student.device)
    stats = torch.empty(n_rows, 4, dtype=torch.float32, device=student.device)
    if n_rows == 0:
        return loss, stats
    block, num_warps = _launch_config(n_cols)
    has_target = target is not None
    if has_target:  # read as target_ptr + row: a column of a label table has another stride
        target = target.contiguous()
    has_tail = k < n_cols
    sorted_ids = ids.sort(dim=1).values if has_tail else ids
    _kd_topk_fwd_kernel[(n_rows,)](
        student, ids, sorted_ids, logprobs, target if has_target else loss, loss, stats,
        *row_strides(student), ids.stride(0), sorted_ids.stride(0), logprobs.stride(0),
        n_cols, k, LOG2E / temperature, temperature * temperature, alpha, ignore_index,
        HAS_TARGET=has_target,
        SEPARATE_CE=has_target and temperature != 1.0,
        HAS_TAIL=has_tail,
        BLOCK_V=block,
        BLOCK_K=_block_k(k),
        num_warps=num_warps,
    )
    return loss, stats


def kd_loss_topk_backward(
    grad_rows: torch.Tensor,
    student: torch.Tensor,
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    target: Optional[torch.Tensor],
    stats: torch.Tensor,
    temperature: float,
    alpha: float,
    ignore_index: int,
) -> torch.Tensor:
    """Student gradient, contiguous, of the student's shape and dtype; grad_rows may be a stride-0
    broadcast."""
    n_rows, n_cols = rows_of(student), student.shape[-1]
    k = ids.shape[1]
    grad = torch.empty_like(student, memory_format=torch.contiguous_format)
    if n_rows == 0:
        return grad
    block, num_warps = _launch_config(n_cols)
    has_target = target is not None
    if has_target:  # read as target_ptr + row: a column of a label table has another stride
        target = target.contiguous()
    stats = stats.contiguous()
    c_kl = alpha * temperature if has_target else temperature
    common = dict(HAS_TARGET=has_target, SEPARATE_CE=has_target and temperature != 1.0)
    _kd_topk_bwd_kernel[(n_rows,)](
        grad_rows, grad_rows.stride(0), student, target if has_target else stats, stats, grad,
        *row_strides(student), n_cols, n_cols, LOG2E / temperature, c_kl, 1.0 - alpha,
        ignore_index, BLOCK_V=block, num_warps=num_warps, **common,
    )
    _kd_topk_bwd_ids_kernel[(n_rows,)](
        grad_rows, grad_rows.stride(0), student, ids, logprobs, target if has_target else stats,
        stats, grad, *row_strides(student), ids.stride(0), logprobs.stride(0), n_cols, k,
        LOG2E / temperature, c_kl, 1.0 - alpha, ignore_index, BLOCK_K=_block_k(k), num_warps=4,
        **common,
    )
    return grad
