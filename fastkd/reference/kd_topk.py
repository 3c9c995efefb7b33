"""Reference KD loss against a top-k teacher (offline distillation), plain torch.

The teacher of a row is given as k distinct class ids and their log-probabilities ``lp`` (what
``fastkd.teacher_topk`` stores: ``log_softmax(teacher_logits / T)`` at the k largest entries). With
``z = s / T``, ``q = softmax(z)`` (the student over all V classes) and buckets b = the k ids plus one
tail bucket holding every other class:
    teacher  P_i = exp(lp_i),             P_tail = max(0, 1 - sum_i P_i)
    student  Q_i = q[id_i],               Q_tail = sum over classes not in ids of q
    D        = sum_i P_i (lp_i - log Q_i) + P_tail (log P_tail - log Q_tail)   (= KL(P || Q) over
               the k + 1 buckets; the tail bucket exists only when k < V)
    soft     = T^2 * D,   row = alpha * soft + (1 - alpha) * CE(s, y)   (soft alone without target)
The stored log-probabilities are used as given: the temperature is applied to the student only, so
store them at the temperature you distil at. With k = V this is exactly kd_loss's forward KL.

Gradient (P_sum = sum_b P_b, r = P_tail / Q_tail, 0 when P_tail = 0), with respect to z:
    dD/dz_j = q_j * (P_sum - r)       for j not among the ids (tail classes)
    dD/dz_j = q_j * P_sum - P_i       for j = id_i
Row statistics (N, 4) fp32: lse(s/T), lse(s), P_sum, r (0 on ignored rows).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .kd_loss import _row_chunk, _valid_rows


def _tail_mask(ids: Tensor, n_cols: int) -> Tensor:
    mask = torch.ones(ids.shape[0], n_cols, dtype=torch.bool, device=ids.device)
    return mask.scatter_(1, ids, False)


def kd_loss_topk_forward(
    student: Tensor,
    ids: Tensor,
    logprobs: Tensor,
    target: Optional[Tensor],
    temperature: float,
    alpha: float,
    ignore_index: int,
) -> tuple[Tensor, Tensor]:
    """Row losses (N,) fp32 and statistics (N, 4) fp32. student (N, V); ids, logprobs (N, k)."""
    n_rows, n_cols = student.shape
    has_tail = ids.shape[1] < n_cols
    loss = torch.zeros(n_rows, dtype=torch.float32, device=student.device)
    stats = torch.zeros(n_rows, 4, dtype=torch.float32, device=student.device)
    step = _row_chunk(n_rows, n_cols)
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        s = student[r0:r1].float()
        idx = ids[r0:r1].long()
        lp = logprobs[r0:r1].float()
        z = s / temperature
        lse_s = torch.logsumexp(z, dim=-1)
        log_q_top = z.gather(1, idx) - lse_s[:, None]
        p_top = lp.exp()
        zero_k = torch.zeros_like(p_top)
        d = torch.where(p_top > 0, p_top * (lp - log_q_top), zero_k).sum(-1)
        p_sum = p_top.sum(-1)
        ratio = torch.zeros_like(lse_s)
        if has_tail:
            p_tail = (1.0 - p_sum).clamp_min(0.0)
            tail_z = torch.where(_tail_mask(idx, n_cols), z, torch.full_like(z, float("-inf")))
            log_q_tail = torch.logsumexp(tail_z, dim=-1) - lse_s
            pos = p_tail > 0
            log_p_tail = torch.where(pos, p_tail, torch.ones_like(p_tail)).log()
            d = d + torch.where(pos, p_tail * (log_p_tail - log_q_tail), torch.zeros_like(d))
            ratio = torch.where(pos, (log_p_tail - log_q_tail).exp(), torch.zeros_like(d))
            p_sum = p_sum + p_tail
        soft = temperature * temperature * d
        lse_1 = lse_s if temperature == 1.0 else torch.logsumexp(s, dim=-1)
        cols = [lse_s, lse_1, p_sum, ratio]
        valid, safe = _valid_rows(target, ignore_index, r0, r1, student.device)
        if valid is None:
            row = soft
        else:
            ce = lse_1 - s.gather(1, safe[:, None]).squeeze(1)
            row = torch.where(valid, alpha * soft + (1.0 - alpha) * ce, torch.zeros_like(soft))
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
    """Gradient of sum_i grad_rows[i] * row_loss[i] w.r.t. the student (N, V), student dtype."""
    n_rows, n_cols = student.shape
    grad = torch.empty_like(student)
    c_kl = temperature if target is None else alpha * temperature
    c_ce = 1.0 - alpha
    step = _row_chunk(n_rows, n_cols)
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        s = student[r0:r1].float()
        st = stats[r0:r1]
        idx = ids[r0:r1].long()
        q = (s / temperature - st[:, 0:1]).exp()
        p_sum = st[:, 2:3]
        g = q * (p_sum - st[:, 3:4])
        g.scatter_(1, idx, q.gather(1, idx) * p_sum - logprobs[r0:r1].float().exp())
        g = c_kl * g
        scale = grad_rows[r0:r1].float()
        valid, safe = _valid_rows(target, ignore_index, r0, r1, student.device)
        if valid is not None:
            p_1 = q if temperature == 1.0 else (s - st[:, 1:2]).exp()
            g = g + c_ce * p_1
            g.scatter_add_(1, safe[:, None], torch.full_like(g[:, :1], -c_ce))
            scale = torch.where(valid, scale, torch.zeros_like(scale))
            g = torch.where(valid[:, None], g, torch.zeros_like(g))
        grad[r0:r1] = (g * scale[:, None]).to(student.dtype)
    return grad
