"""Reference KD loss against a top-k teacher (offline distillation), plain torch.

The teacher of a row is given as k distinct class ids and their log-probabilities ``lp`` (what
``fastkd.teacher_topk`` stores: ``log_softmax(teacher_logits / T)`` at the k largest entries). With
``z = s / T``, ``q = softmax(z)`` (the student over all V classes) and buckets b = the k ids plus one
tail bucket holding every other class:
    teacher  P_i = exp(lp_i),             P_tail = max(0, 1 - sum_i P_i)  (0 when it is within
             fp32 rounding of 0, 4 k 2^-24, and the student's tail mass Q_tail is 0)
    student  Q_i = q[id_i],               Q_tail = sum over classes not in ids of q
    D        = sum_i P_i (lp_i - log Q_i) + P_tail (log P_tail - log Q_tail)   (= KL(P || Q) over
               the k + 1 buckets; the tail bucket exists only when k < V)
    soft     = T^2 * D,   row = alpha * soft + (1 - alpha) * CE(s, y)   (soft alone without target)
The stored log-probabilities are used as given: the temperature is applied to the student only, so
store them at the temperature you distil at. With k = V this is exactly kd_loss's forward KL.

Gradient (P_sum = sum_b P_b, r = P_tail / Q_tail, 0 when P_tail = 0), with respect to z:
    dD/dz_j = q_j * P_sum - q_j * r   for j not among the ids (tail classes)
    dD/dz_j = q_j * P_sum - P_i       for j = id_i
q_j * r = P_tail * q_j / Q_tail is computed as exp(z_j - lse(z) + log r): r alone overflows fp32
when the student's tail mass is tiny (below ~e^-88 of the teacher's), the product never does.
Row statistics (N, 4) fp32: lse(s/T), lse(s), P_sum, log r (-inf when P_tail = 0; all 0 on
ignored rows).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .kd_loss import _ce_only_backward, _exp_sum, _row_chunk, _valid_rows, mix_rows


def tail_rounding(k: int) -> float:
    """The most ``1 - sum of k fp32 probabilities`` (each exp(lp) and each addition rounding
    by 2^-24 relative) can be when the true tail mass is 0."""
    return 4.0 * k * 2.0 ** -24


def _lse_and_exp(z: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """logsumexp per row of ``z`` (-inf for a row of -inf), its exps left in ``out``."""
    return _exp_sum(z, 1.0, out=out)[0]


def kd_loss_topk_forward(
    student: Tensor,
    ids: Tensor,
    logprobs: Tensor,
    target: Optional[Tensor],
    temperature: float,
    alpha: float,
    ignore_index: int,
) -> tuple[Tensor, Tensor]:
    """Row losses (N,) fp32 and statistics (N, 4) fp32. student (N, V); ids, logprobs (N, k).

    On the CPU the cost is passes over N x V and fresh N x V buffers: z = s / T and one work
    buffer, an exp pass for lse(s/T), one for the tail's own logsumexp (z with the k ids set to
    -inf in place: exact, with its own max, however small the tail) and one for lse(s) if T != 1.
    """
    n_rows, n_cols = student.shape
    has_tail = ids.shape[1] < n_cols
    loss = torch.zeros(n_rows, dtype=torch.float32, device=student.device)
    stats = torch.zeros(n_rows, 4, dtype=torch.float32, device=student.device)
    step = _row_chunk(n_rows, n_cols)
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        s = student[r0:r1]
        idx = ids[r0:r1].long()
        lp = logprobs[r0:r1].float()
        z = s.float() * (1.0 / temperature)
        work = torch.empty_like(z)
        lse_s = _lse_and_exp(z, out=work)
        log_q_top = z.gather(1, idx) - lse_s[:, None]
        p_top = lp.exp()
        zero_k = torch.zeros_like(p_top)
        d = torch.where(p_top > 0, p_top * (lp - log_q_top), zero_k).sum(-1)
        d = torch.where(torch.isnan(lp).any(-1), float("nan"), d)  # the guard above drops a nan
        p_sum = p_top.sum(-1)
        log_ratio = torch.full_like(lse_s, float("-inf"))
        if has_tail:
            p_tail = (1.0 - p_sum).clamp_min(0.0)
            log_q_tail = _lse_and_exp(z.scatter_(1, idx, float("-inf")), out=work) - lse_s
            # against a student with no tail mass, a tail mass at fp32 rounding is none (a
            # padded vocabulary's k real classes sum to 1 - 1e-7, and the row was inf)
            pos = p_tail > torch.where(log_q_tail == float("-inf"), tail_rounding(idx.shape[1]),
                                       0.0)
            p_tail = torch.where(pos, p_tail, torch.zeros_like(p_tail))
            log_p_tail = torch.where(pos, p_tail, torch.ones_like(p_tail)).log()
            d = d + torch.where(pos, p_tail * (log_p_tail - log_q_tail), torch.zeros_like(d))
            log_ratio = torch.where(pos, log_p_tail - log_q_tail, torch.full_like(d, float("-inf")))
            p_sum = p_sum + p_tail
        soft = temperature * temperature * d
        lse_1 = lse_s if temperature == 1.0 else _lse_and_exp(s.float(), out=work)
        cols = [lse_s, lse_1, p_sum, log_ratio]
        valid, safe = _valid_rows(target, ignore_index, r0, r1)
        if valid is None:
            row = soft
        else:
            ce = lse_1 - s.gather(1, safe[:, None]).squeeze(1).float()
            row = torch.where(valid, mix_rows(soft, ce, alpha), torch.zeros_like(soft))
            cols = [torch.where(valid, x, torch.zeros_like(x)) for x in cols]
        loss[r0:r1] = row
        stats[r0:r1] = torch.stack(cols, dim=1)
    return loss, stats


def kd_loss_topk_backward(
    grad_rows: Tensor,
    student: Tensor,
    ids: Tensor,
    logprobs: Tensor,
    target: Optional[Tensor],
    stats: Tensor,
    temperature: float,
    alpha: float,
    ignore_index: int,
) -> Tensor:
    """Gradient of sum_i grad_rows[i] * row_loss[i] w.r.t. the student (N, V), student dtype.

    Per row, g = scale * (c_kl * (q * P_sum - q * r, with q * P_sum - P_i at the k ids)
    + c_ce * (softmax(s) - onehot(y))), built in place on two exp buffers.
    Ignored rows read lse = +inf (probabilities exactly 0) and are zeroed row-wise at the end.
    """
    n_rows, n_cols = student.shape
    c_kl = temperature if target is None else alpha * temperature
    c_ce = 1.0 - alpha
    if c_kl == 0.0:  # alpha = 0: the CE alone, not 0 * an infinite tail ratio
        return _ce_only_backward(grad_rows, student, target, ignore_index)
    grad = torch.empty_like(student)
    inv_t = 1.0 / temperature
    step = _row_chunk(n_rows, n_cols)
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        s = student[r0:r1]
        st = stats[r0:r1]
        idx = ids[r0:r1].long()
        scale = grad_rows[r0:r1].float()
        valid, safe = _valid_rows(target, ignore_index, r0, r1)
        lse = st[:, :2]
        if valid is not None:
            scale = torch.where(valid, scale, torch.zeros_like(scale))
            lse = torch.where(valid[:, None], lse, torch.full_like(lse, float("inf")))
        a = c_kl * scale
        q = torch.add(-lse[:, 0:1], s.float(), alpha=inv_t).exp_()
        q_top = q.gather(1, idx)
        p_sum = st[:, 2:3]
        g = q.mul_(a[:, None] * p_sum)
        # q * r = exp(z - (lse(z) - log r)): -inf - x stays -inf without a tail mass
        q_r = torch.add(st[:, 3:4] - lse[:, 0:1], s.float(), alpha=inv_t).exp_()
        g.addcmul_(q_r, a[:, None], value=-1.0)
        g.scatter_(1, idx, a[:, None] * (q_top * p_sum - logprobs[r0:r1].float().exp()))
        if valid is not None:
            b = (c_ce * scale)[:, None]
            g.addcmul_(torch.add(-lse[:, 1:2], s.float(), out=q_r).exp_(), b)
            g.scatter_add_(1, safe[:, None], -b)
            g.masked_fill_(~valid[:, None], 0.0)  # exactly 0 there, even where a logit is nan
        grad[r0:r1] = g
    return grad
