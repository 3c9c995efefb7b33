"""Reference knowledge-distillation loss in plain torch.

Rows are processed in chunks so the fp32 temporaries stay bounded (about 16 MiB each) whatever the
vocabulary, and the forward saves only three fp32 statistics per row for the backward.

For one row with student logits s, teacher logits t (length V), temperature T, mixing alpha:
    soft = T^2 * KL(softmax(t/T) || softmax(s/T))
    row  = alpha * soft + (1 - alpha) * CE(s, y)      (with a target y; `soft` alone without)
    d row / d s = c_kl * (softmax(s/T) - softmax(t/T)) + (1 - alpha) * (softmax(s) - onehot(y))
with c_kl = alpha * T (T^2 times the 1/T of the inner derivative), or T without a target.
Rows whose target equals ignore_index give 0 and a zero gradient.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_CHUNK_ELEMENTS = 1 << 22


def _row_chunk(n_rows: int, n_cols: int) -> int:
    return max(1, min(n_rows, _CHUNK_ELEMENTS // max(n_cols, 1)))


def _valid_rows(target: Optional[Tensor], ignore_index: int, r0: int, r1: int, device):
    if target is None:
        return None, None
    tgt = target[r0:r1]
    valid = tgt != ignore_index
    return valid, torch.where(valid, tgt, torch.zeros_like(tgt))


def kd_loss_forward(
    student: Tensor,
    teacher: Tensor,
    target: Optional[Tensor],
    temperature: float,
    alpha: float,
    ignore_index: int,
) -> tuple[Tensor, Tensor]:
    """Per-row loss (N,) fp32 and row statistics (N, 3) fp32.

    student, teacher: (N, V) fp16/bf16/fp32; target: (N,) int64 or None.
    stats[:, 0] = logsumexp(s/T), stats[:, 1] = logsumexp(t/T), stats[:, 2] = logsumexp(s),
    and 0 on ignored rows.
    """
    n_rows, n_cols = student.shape
    loss = torch.zeros(n_rows, dtype=torch.float32, device=student.device)
    stats = torch.zeros(n_rows, 3, dtype=torch.float32, device=student.device)
    inv_t = 1.0 / temperature
    step = _row_chunk(n_rows, n_cols)
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        s = student[r0:r1].float()
        t = teacher[r0:r1].float()
        s_t = s * inv_t
        t_t = t * inv_t
        lse_s = torch.logsumexp(s_t, dim=-1)
        lse_t = torch.logsumexp(t_t, dim=-1)
        log_pt = t_t - lse_t[:, None]
        p_t = log_pt.exp()
        log_ps = s_t - lse_s[:, None]
        # p_t = 0 (a masked or underflowed teacher entry) contributes nothing, even where s = -inf.
        kl_terms = torch.where(p_t > 0, p_t * (log_pt - log_ps), torch.zeros_like(p_t))
        soft = temperature * temperature * kl_terms.sum(dim=-1).clamp_min(0.0)
        lse_1 = lse_s if temperature == 1.0 else torch.logsumexp(s, dim=-1)
        valid, safe = _valid_rows(target, ignore_index, r0, r1, student.device)
        if valid is None:
            row = soft
        else:
            ce = lse_1 - s.gather(1, safe[:, None]).squeeze(1)
            row = torch.where(valid, alpha * soft + (1.0 - alpha) * ce, torch.zeros_like(soft))
            zero = torch.zeros_like(lse_s)
            lse_s, lse_t, lse_1 = (torch.where(valid, x, zero) for x in (lse_s, lse_t, lse_1))
        loss[r0:r1] = row
        stats[r0:r1] = torch.stack([lse_s, lse_t, lse_1], dim=1)
    return loss, stats


def kd_loss_backward(
    grad_rows: Tensor,
    student: Tensor,
    teacher: Tensor,
    target: Optional[Tensor],
    stats: Tensor,
    temperature: float,
    alpha: float,
    ignore_index: int,
) -> Tensor:
    """Gradient of sum_i grad_rows[i] * row_loss[i] with respect to the student logits.

    Returned in the student's dtype, shape (N, V).
    """
    n_rows, n_cols = student.shape
    grad = torch.empty_like(student)
    inv_t = 1.0 / temperature
    c_kl = temperature if target is None else alpha * temperature
    c_ce = 1.0 - alpha
    step = _row_chunk(n_rows, n_cols)
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        s = student[r0:r1].float()
        t = teacher[r0:r1].float()
        st = stats[r0:r1]
        p_s = (s * inv_t - st[:, 0:1]).exp()
        p_t = (t * inv_t - st[:, 1:2]).exp()
        g = c_kl * (p_s - p_t)
        scale = grad_rows[r0:r1].float()
        valid, safe = _valid_rows(target, ignore_index, r0, r1, student.device)
        if valid is not None:
            p_1 = p_s if temperature == 1.0 else (s - st[:, 2:3]).exp()
            g = g + c_ce * p_1
            g.scatter_add_(1, safe[:, None], torch.full_like(g[:, :1], -c_ce))
            scale = torch.where(valid, scale, torch.zeros_like(scale))
            # ignored rows carry zero statistics: force their (possibly inf) terms to 0
            g = torch.where(valid[:, None], g, torch.zeros_like(g))
        grad[r0:r1] = (g * scale[:, None]).to(student.dtype)
    return grad
