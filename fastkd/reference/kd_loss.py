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


def _lse_from_log_softmax(x: Tensor, log_p: Tensor) -> Tensor:
    """logsumexp(x) per row, read off log_softmax at the row's largest entry (exact there)."""
    idx = x.argmax(dim=-1, keepdim=True)
    return (x.gather(1, idx) - log_p.gather(1, idx)).squeeze(1)


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
        s_t = s if temperature == 1.0 else s * inv_t
        t_t = t if temperature == 1.0 else t * inv_t
        log_ps = torch.log_softmax(s_t, dim=-1)
        log_pt = torch.log_softmax(t_t, dim=-1)
        p_t = log_pt.exp()
        # p_t = 0 (a masked or underflowed teacher entry) contributes nothing, even where s = -inf.
        kl_terms = torch.where(p_t > 0, p_t * (log_pt - log_ps), 0.0)
        soft = temperature * temperature * kl_terms.sum(dim=-1).clamp_min(0.0)
        lse_s = _lse_from_log_softmax(s_t, log_ps)
        lse_t = _lse_from_log_softmax(t_t, log_pt)
        valid, safe = _valid_rows(target, ignore_index, r0, r1, student.device)
        if valid is None:
            row, lse_1 = soft, lse_s
        else:
            log_p1 = log_ps if temperature == 1.0 else torch.log_softmax(s, dim=-1)
            ce = -log_p1.gather(1, safe[:, None]).squeeze(1)
            lse_1 = lse_s if temperature == 1.0 else _lse_from_log_softmax(s, log_p1)
            row = torch.where(valid, alpha * soft + (1.0 - alpha) * ce, 0.0)
            lse_s, lse_t, lse_1 = (torch.where(valid, x, 0.0) for x in (lse_s, lse_t, lse_1))
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

    Returned in the student's dtype, shape (N, V). The reference recomputes the softmaxes with
    torch's fused kernels rather than reading `stats` (which the Triton backward uses).
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
        s_t = s if temperature == 1.0 else s * inv_t
        t_t = t if temperature == 1.0 else t * inv_t
        p_s = torch.softmax(s_t, dim=-1)
        g = p_s.sub_(torch.softmax(t_t, dim=-1)).mul_(c_kl)
        scale = grad_rows[r0:r1].float()
        valid, safe = _valid_rows(target, ignore_index, r0, r1, student.device)
        if valid is not None:
            g.add_(torch.softmax(s, dim=-1), alpha=c_ce)
            g.scatter_add_(1, safe[:, None], torch.full_like(g[:, :1], -c_ce))
            scale = torch.where(valid, scale, 0.0)
        grad[r0:r1] = g.mul_(scale[:, None])
    return grad
