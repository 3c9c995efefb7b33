"""Fused knowledge-distillation loss kernels (Triton).

One program per row streams the student and teacher logits in blocks of BLOCK_V with an online
(running max, rescaled sum) softmax, so nothing of size N x V is ever held in fp32.

Forward, per row, in one pass over s and t (base-2 arithmetic: x2 = x * log2(e) / T):
    m_s, d_s : running max and sum of 2^(s2 - m_s)          -> lse_s = ln2 * (m_s + log2 d_s)
    m_t, d_t : the same for the teacher                     -> lse_t
    acc      : sum of 2^(t2 - m_t) * ((t2 - m_t) - (s2 - m_s)), rescaled when m_s or m_t move
    KL(p_t || p_s) = ln2 * (acc / d_t - log2 d_t + log2 d_s)
    CE(s, y) = lse_1 - s[y], lse_1 the log-sum-exp of s at T = 1 (a third running pair if T != 1)
    row = alpha * T^2 * KL + (1 - alpha) * CE   (T^2 * KL without target; 0 on ignored rows)
The forward writes the row loss and (lse_s, lse_t, lse_1) per row.

Backward, per row, a second pass over s and t that writes the student gradient once:
    grad = g_row * (c_kl * (softmax(s/T) - softmax(t/T)) + (1 - alpha) * (softmax(s) - onehot(y)))
with c_kl = alpha * T (T without target) and g_row the incoming gradient of the row loss.

Other divergences (DIVERGENCE constexpr: 0 "kl", 1 "reverse_kl", 2 "jsd"; see
fastkd.reference.kd_loss for the exact definitions). With q = softmax(s/T), p = softmax(t/T):
    reverse_kl: D = KL(q || p)
    jsd:        D = (1 - beta) KL(p || m) + beta KL(q || m), m = beta p + (1 - beta) q
    dD/dz_j = q_j (g_j - sum_i q_i g_i),  z = s/T, g the divergence's derivative in q (per element)
Their terms need the normalisers of both softmaxes, so the forward makes a second pass over the row
after the first has found them, and saves dot = sum_i q_i g_i as a fourth statistic; the backward
then stays a single pass that writes the gradient once.

Saving three floats per row instead of the N x V gradient keeps the whole step at five passes over
N x V elements (read s, t; read s, t, write grad) and its extra memory at the gradient alone.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ._rows import n_rows as rows_of
from ._rows import row_strides

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _max_pair(a0, a1, b0, b1):
    return tl.maximum(a0, b0), tl.maximum(a1, b1)


@triton.jit
def _max_triple(a0, a1, a2, b0, b1, b2):
    return tl.maximum(a0, b0), tl.maximum(a1, b1), tl.maximum(a2, b2)


@triton.jit
def _add_quad(a0, a1, a2, a3, b0, b1, b2, b3):
    return a0 + b0, a1 + b1, a2 + b2, a3 + b3


@triton.jit
def _logaddexp2(a, b):
    mx = tl.maximum(a, b)
    mn = tl.minimum(a, b)
    return tl.where(mx == float("-inf"), float("-inf"), mx + tl.log2(1.0 + tl.exp2(mn - mx)))


@triton.jit
def _divergence_terms(log2p, log2q, beta, lb2, l1b2, DIVERGENCE: tl.constexpr):
    """Per-element terms of D (summing to D) and q_j * g_j, natural units, for DIVERGENCE 1 or 2.

    log2p, log2q: base-2 log-probabilities of teacher and student; lb2 = log2(beta),
    l1b2 = log2(1 - beta) (-inf at the ends)."""
    ln2 = 0.6931471805599453
    p = tl.exp2(log2p)
    q = tl.exp2(log2q)
    if DIVERGENCE == 1:
        qg = tl.where(q > 0, q * (log2q - log2p) * ln2, 0.0)
        terms = qg
    else:
        log2m = _logaddexp2(lb2 + log2p, l1b2 + log2q)
        terms = (1.0 - beta) * tl.where(p > 0, p * (log2p - log2m), 0.0) + beta * tl.where(
            q > 0, q * (log2q - log2m), 0.0
        )
        terms = terms * ln2
        log2n = _logaddexp2(l1b2 + log2p, lb2 + log2q)
        qg = tl.where(
            q > 0,
            beta * q * (log2q - log2m) * ln2 - (1.0 - beta) * tl.exp2(log2q + log2n - log2m),
            0.0,
        )
    return terms, qg


@triton.jit
def _kd_loss_fwd_kernel(
    student_ptr,
    teacher_ptr,
    target_ptr,
    loss_ptr,
    stats_ptr,
    rows_inner,
    stride_s0,
    stride_s1,
    stride_t0,
    stride_t1,
    n_cols,
    scale2,  # log2(e) / T
    temp_sq,
    alpha,
    ignore_index,
    beta,
    lb2,  # log2(beta)
    l1b2,  # log2(1 - beta)
    HAS_TARGET: tl.constexpr,
    SEPARATE_CE: tl.constexpr,
    DIVERGENCE: tl.constexpr,
    N_STATS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    REDUCE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    outer = row // rows_inner
    inner = row - outer * rows_inner
    s_row = student_ptr + outer * stride_s0 + inner * stride_s1
    t_row = teacher_ptr + outer * stride_t0 + inner * stride_t1
    n_loop = n_cols
    if HAS_TARGET:
        tgt = tl.load(target_ptr + row)
        valid = tgt != ignore_index
        n_loop = tl.where(valid, n_cols, 0)  # ignored rows read nothing
    neg_inf = float("-inf")
    # REDUCE picks how a step's 2-3 maxima and 2-4 sums cross the program's warps (each block
    # reduction is a round of shuffles and barriers; see bench/codegen_report.py for the counts):
    #   0: one block reduction per quantity (the version measured on the H200: 14 barriers/step)
    #   1: two tuple reductions, maxima together and sums together (9 barriers, same registers)
    #   2: one tuple reduction of the maxima; the sums stay per lane, rescaled by the scalar shift
    #      change, and are reduced once after the loop (4 barriers, twice the registers)
    m_s = neg_inf
    m_t = neg_inf
    m_1 = neg_inf
    if REDUCE == 2:
        d_s = tl.zeros([BLOCK_V], dtype=tl.float32)
        d_t = tl.zeros([BLOCK_V], dtype=tl.float32)
        d_1 = tl.zeros([BLOCK_V], dtype=tl.float32)
        acc = tl.zeros([BLOCK_V], dtype=tl.float32)
    else:
        d_s = 0.0
        d_t = 0.0
        d_1 = 0.0
        acc = 0.0
    for start in range(0, n_loop, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < n_cols
        s = tl.load(s_row + cols, mask=in_row, other=neg_inf).to(tl.float32)
        t = tl.load(t_row + cols, mask=in_row, other=neg_inf).to(tl.float32)
        s2 = s * scale2
        t2 = t * scale2
        s1 = s * 1.4426950408889634  # student at T = 1 (used only if SEPARATE_CE)
        bm_1 = neg_inf
        if REDUCE == 0:
            bm_s = tl.max(s2, 0)
            bm_t = tl.max(t2, 0)
            if SEPARATE_CE:
                bm_1 = tl.max(s1, 0)
        elif SEPARATE_CE:
            bm_s, bm_t, bm_1 = tl.reduce((s2, t2, s1), 0, _max_triple)
        else:
            bm_s, bm_t = tl.reduce((s2, t2), 0, _max_pair)
        new_m_s = tl.maximum(m_s, bm_s)
        new_m_t = tl.maximum(m_t, bm_t)
        new_m_1 = tl.maximum(m_1, bm_1)
        # While a row has seen only -inf its max stays -inf: shift by 0 then (all terms are 0;
        # the rescale of the zero sums, exp2(-inf - shift), is 0).
        sh_s = tl.where(new_m_s == neg_inf, 0.0, new_m_s)
        sh_t = tl.where(new_m_t == neg_inf, 0.0, new_m_t)
        sh_1 = tl.where(new_m_1 == neg_inf, 0.0, new_m_1)
        # Rescale acc to the new shifts: a' = a - dt, b' = b - ds, so
        # acc' = 2^-dt * (acc + (ds - dt) * d_t) (lane by lane for REDUCE 2). Guarded for d_t = 0
        # (nothing accumulated yet, where the shift change can be infinite) and for keep_t = 0
        # (what was accumulated underflows against the new max and drops out, as its fp32
        # probabilities do in the reference: an infinite term, a -inf student logit under a
        # finite teacher one, was 0 * inf = nan). Each term is folded in as soon as it exists,
        # which keeps the live registers of REDUCE 2 down.
        keep_t = tl.exp2(m_t - sh_t)
        e_t = tl.exp2(t2 - sh_t)
        x_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
        if DIVERGENCE == 0:  # the others take their terms in a second pass
            acc = tl.where(d_t > 0, tl.where(
                keep_t > 0, keep_t * (acc + ((sh_s - m_s) - (sh_t - m_t)) * d_t), 0.0), 0.0)
            x_acc = tl.where(e_t > 0, e_t * ((t2 - sh_t) - (s2 - sh_s)), 0.0)
            if REDUCE == 2:
                acc += x_acc
            elif REDUCE == 0:
                acc += tl.sum(x_acc, 0)
        d_t = d_t * keep_t
        if REDUCE == 2:
            d_t += e_t
        elif REDUCE == 0:
            d_t += tl.sum(e_t, 0)
        e_s = tl.exp2(s2 - sh_s)
        d_s = d_s * tl.exp2(m_s - sh_s)
        if REDUCE == 2:
            d_s += e_s
        elif REDUCE == 0:
            d_s += tl.sum(e_s, 0)
        e_1 = tl.zeros([BLOCK_V], dtype=tl.float32)
        if SEPARATE_CE:
            e_1 = tl.exp2(s1 - sh_1)
            d_1 = d_1 * tl.exp2(m_1 - sh_1)
            if REDUCE == 2:
                d_1 += e_1
            elif REDUCE == 0:
                d_1 += tl.sum(e_1, 0)
        if REDUCE == 1:
            b_t, b_s, b_1, b_acc = tl.reduce((e_t, e_s, e_1, x_acc), 0, _add_quad)
            d_t += b_t
            d_s += b_s
            d_1 += b_1
            acc += b_acc
        # the running max, -inf while the row has seen only -inf: were it the shift (0), a
        # later block with every logit / T far below 0 would underflow against it
        m_s = new_m_s
        m_t = new_m_t
        m_1 = new_m_1
    if REDUCE == 2:
        d_t = tl.sum(d_t, 0)
        d_s = tl.sum(d_s, 0)
        d_1 = tl.sum(d_1, 0)
        acc = tl.sum(acc, 0)

    # A row whose distribution is undefined gives nan: a nan or +inf logit leaves its sum nan
    # (tl.max may drop a nan, its exponential does not), and a row with no mass (every logit
    # -inf) has a zero sum, so lse = -inf, which the backward's exponentials turn into nan too.
    # An ignored row read nothing (zero sums): whatever it computes, the selects below discard.
    undefined = (d_s == 0) | (d_t == 0)
    log2_d_s = tl.log2(d_s)
    log2_d_t = tl.log2(d_t)
    kl = 0.6931471805599453 * (acc / d_t - log2_d_t + log2_d_s)
    lse_s = 0.6931471805599453 * (m_s + log2_d_s)
    lse_t = 0.6931471805599453 * (m_t + log2_d_t)
    dot = 0.0
    if DIVERGENCE != 0:
        # Second pass: the terms need both normalisers (base 2: lse2 = m + log2 d).
        lse_s2 = m_s + log2_d_s
        lse_t2 = m_t + log2_d_t
        div_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
        dot_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
        for start in range(0, n_loop, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            in_row = cols < n_cols
            s = tl.load(s_row + cols, mask=in_row, other=neg_inf).to(tl.float32)
            t = tl.load(t_row + cols, mask=in_row, other=neg_inf).to(tl.float32)
            # (z - m) - log2 d, not z - (m + log2 d): the probable entries have z - m ~ 0 exactly
            # and log2 d is small, where lse2 ~ m is large and its rounding would move every
            # log-probability by ulp(m), an error D ~ log(q/p) multiplies (10x the reference's on
            # confident rows)
            terms, qg = _divergence_terms(
                (t * scale2 - m_t) - log2_d_t, (s * scale2 - m_s) - log2_d_s, beta, lb2, l1b2,
                DIVERGENCE
            )
            div_acc += terms
            dot_acc += qg
        kl = tl.sum(div_acc, 0)
        dot = tl.sum(dot_acc, 0)
        # the terms skip entries of zero probability, which a nan makes of every entry
        undefined = undefined | (lse_s2 != lse_s2) | (lse_t2 != lse_t2)
        dot = tl.where(undefined, float("nan"), dot)
    kl = tl.where(undefined, float("nan"), kl)
    kl = tl.where(kl < 0.0, 0.0, kl)  # rounding can dip below 0; tl.maximum would drop a nan
    if HAS_TARGET:
        if SEPARATE_CE:
            lse_1 = 0.6931471805599453 * (m_1 + tl.log2(d_1))
        else:
            lse_1 = lse_s
        safe_tgt = tl.where(valid, tgt, 0).to(tl.int64)
        s_y = tl.load(s_row + safe_tgt).to(tl.float32)
        # a term of weight 0 adds exactly 0 (never 0 * inf = nan; see reference.mix_rows)
        row_loss = tl.where(alpha == 0.0, 0.0, alpha * temp_sq * kl) + tl.where(
            alpha == 1.0, 0.0, (1.0 - alpha) * (lse_1 - s_y))
        row_loss = tl.where(valid, row_loss, 0.0)
        # Ignored rows keep finite (zero) statistics so the backward's exponentials stay 0.
        lse_s = tl.where(valid, lse_s, 0.0)
        lse_t = tl.where(valid, lse_t, 0.0)
        lse_1 = tl.where(valid, lse_1, 0.0)
        dot = tl.where(valid, dot, 0.0)
    else:
        row_loss = temp_sq * kl
        lse_1 = lse_s
    tl.store(loss_ptr + row, row_loss)
    tl.store(stats_ptr + row * N_STATS + 0, lse_s)
    tl.store(stats_ptr + row * N_STATS + 1, lse_t)
    tl.store(stats_ptr + row * N_STATS + 2, lse_1)
    if N_STATS > 3:
        tl.store(stats_ptr + row * N_STATS + 3, dot)


@triton.jit
def _kd_loss_bwd_kernel(
    grad_rows_ptr,
    stride_g,
    student_ptr,
    teacher_ptr,
    target_ptr,
    stats_ptr,
    grad_ptr,
    rows_inner,
    stride_s0,
    stride_s1,
    stride_t0,
    stride_t1,
    stride_out,
    n_cols,
    scale2,  # log2(e) / T
    c_kl,
    c_ce,
    ignore_index,
    beta,
    lb2,
    l1b2,
    HAS_TARGET: tl.constexpr,
    SEPARATE_CE: tl.constexpr,
    DIVERGENCE: tl.constexpr,
    N_STATS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    outer = row // rows_inner
    inner = row - outer * rows_inner
    s_row = student_ptr + outer * stride_s0 + inner * stride_s1
    t_row = teacher_ptr + outer * stride_t0 + inner * stride_t1
    out_row = grad_ptr + row * stride_out
    g = tl.load(grad_rows_ptr + row * stride_g).to(tl.float32)
    lse_s2 = tl.load(stats_ptr + row * N_STATS + 0) * 1.4426950408889634
    lse_t2 = tl.load(stats_ptr + row * N_STATS + 1) * 1.4426950408889634
    lse_12 = tl.load(stats_ptr + row * N_STATS + 2) * 1.4426950408889634
    dot = 0.0
    if N_STATS > 3:
        dot = tl.load(stats_ptr + row * N_STATS + 3)
    tgt = -1
    n_read = n_cols
    if HAS_TARGET:
        tgt = tl.load(target_ptr + row)
        g = tl.where(tgt != ignore_index, g, 0.0)
        # An ignored row loads nothing: every probability below is 0 and it writes zeros.
        n_read = tl.where(tgt != ignore_index, n_cols, 0)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < n_cols
        load_mask = cols < n_read
        s = tl.load(s_row + cols, mask=load_mask, other=float("-inf")).to(tl.float32)
        t = tl.load(t_row + cols, mask=load_mask, other=float("-inf")).to(tl.float32)
        p_s = tl.exp2(s * scale2 - lse_s2)
        if DIVERGENCE == 0:
            p_t = tl.exp2(t * scale2 - lse_t2)
            grad = c_kl * (p_s - p_t)
        else:
            _, qg = _divergence_terms(
                t * scale2 - lse_t2, s * scale2 - lse_s2, beta, lb2, l1b2, DIVERGENCE
            )
            grad = c_kl * (qg - p_s * dot)
        grad = tl.where(c_kl == 0.0, 0.0, grad)  # alpha = 0: no teacher term, not 0 * inf
        if HAS_TARGET:
            if SEPARATE_CE:
                p_1 = tl.exp2(s * 1.4426950408889634 - lse_12)
            else:
                p_1 = p_s
            grad += c_ce * (p_1 - tl.where(cols == tgt, 1.0, 0.0))
        tl.store(out_row + cols, (grad * g).to(out_row.dtype.element_ty), mask=in_row)


# How the forward's per-step reductions are done (REDUCE in _kd_loss_fwd_kernel). 0 is the version
# measured on the H200 (2026-11-30); 1 and 2 cut the loop's barriers from 14 to 9 and 4 (sm_90
# SASS) and wait for a GPU run to decide: bench/bench_kd_loss.py times all three.
FWD_REDUCE = 0


def _launch_config(n_cols: int) -> tuple[int, int]:
    """BLOCK_V and num_warps for a row of n_cols logits."""
    cap = 8192 if os.environ.get("TRITON_INTERPRET", "0") != "1" else 16384
    block = min(cap, triton.next_power_of_2(max(n_cols, 16)))
    num_warps = 16 if block >= 8192 else 8 if block >= 2048 else 4
    return block, num_warps


_DIVERGENCE_IDS = {"kl": 0, "reverse_kl": 1, "jsd": 2}


def _divergence_args(divergence: str, beta: float) -> tuple[int, int, float, float, float]:
    """(DIVERGENCE id, N_STATS, beta, log2(beta), log2(1 - beta)) for the kernels."""
    if divergence not in _DIVERGENCE_IDS:
        raise ValueError(f"divergence must be one of {tuple(_DIVERGENCE_IDS)}, got {divergence!r}")
    div = _DIVERGENCE_IDS[divergence]
    lb2 = math.log2(beta) if beta > 0 else float("-inf")
    l1b2 = math.log2(1.0 - beta) if beta < 1 else float("-inf")
    return div, (3 if div == 0 else 4), float(beta), lb2, l1b2


def kd_loss_forward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: Optional[torch.Tensor],
    temperature: float,
    alpha: float,
    ignore_index: int,
    divergence: str = "kl",
    beta: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row losses (N,) and row statistics (N, 3 or 4), fp32, for (N, V) or (B, L, V) logits with
    unit column stride (kernels/_rows.py)."""
    n_rows, n_cols = rows_of(student), student.shape[-1]
    div, n_stats, beta, lb2, l1b2 = _divergence_args(divergence, beta)
    loss = torch.empty(n_rows, dtype=torch.float32, device=student.device)
    stats = torch.empty(n_rows, n_stats, dtype=torch.float32, device=student.device)
    if n_rows == 0:
        return loss, stats
    block, num_warps = _launch_config(n_cols)
    has_target = target is not None
    if has_target:  # read as target_ptr + row: a column of a label table has another stride
        target = target.contiguous()
    _kd_loss_fwd_kernel[(n_rows,)](
        student,
        teacher,
        target if has_target else loss,
        loss,
        stats,
        *row_strides(student, teacher),
        n_cols,
        LOG2E / temperature,
        temperature * temperature,
        alpha,
        ignore_index,
        beta,
        lb2,
        l1b2,
        HAS_TARGET=has_target,
        SEPARATE_CE=has_target and temperature != 1.0,
        DIVERGENCE=div,
        N_STATS=n_stats,
        BLOCK_V=block,
        REDUCE=FWD_REDUCE,
        num_warps=num_warps,
    )
    return loss, stats


def kd_loss_backward(
    grad_rows: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: Optional[torch.Tensor],
    stats: torch.Tensor,
    temperature: float,
    alpha: float,
    ignore_index: int,
    divergence: str = "kl",
    beta: float = 0.5,
) -> torch.Tensor:
    """Student gradient, contiguous, of the student's shape and dtype; grad_rows may be a stride-0
    broadcast."""
    n_rows, n_cols = rows_of(student), student.shape[-1]
    div, n_stats, beta, lb2, l1b2 = _divergence_args(divergence, beta)
    grad = torch.empty_like(student, memory_format=torch.contiguous_format)
    if n_rows == 0:
        return grad
    block, num_warps = _launch_config(n_cols)
    has_target = target is not None
    if has_target:  # read as target_ptr + row: a column of a label table has another stride
        target = target.contiguous()
    stats = stats.contiguous()
    _kd_loss_bwd_kernel[(n_rows,)](
        grad_rows,
        grad_rows.stride(0),
        student,
        teacher,
        target if has_target else stats,
        stats,
        grad,
        *row_strides(student, teacher),
        n_cols,  # the gradient's rows are contiguous
        n_cols,
        LOG2E / temperature,
        alpha * temperature if has_target else temperature,
        1.0 - alpha,
        ignore_index,
        beta,
        lb2,
        l1b2,
        HAS_TARGET=has_target,
        SEPARATE_CE=has_target and temperature != 1.0,
        DIVERGENCE=div,
        N_STATS=n_stats,
        BLOCK_V=block,
        num_warps=num_warps,
    )
    return grad
