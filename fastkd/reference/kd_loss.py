"""Reference knowledge-distillation loss in plain torch.

Rows are processed in chunks so the fp32 temporaries stay bounded (about 16 MiB each) whatever the
vocabulary, and the forward saves only a few fp32 statistics per row for the backward.

For one row with student logits s, teacher logits t (length V), temperature T, mixing alpha, let
p = softmax(t/T) (teacher), q = softmax(s/T) (student) and D one of the divergences
    "kl"         D = KL(p || q) = sum p (log p - log q)                      (forward KL, default)
    "reverse_kl" D = KL(q || p) = sum q (log q - log p)
    "jsd"        D = (1 - beta) KL(p || m) + beta KL(q || m),  m = beta p + (1 - beta) q
                 (beta = 0: m = q, D = KL(p || q); beta = 1: m = p, D = KL(q || p);
                  beta = 1/2: the usual Jensen-Shannon divergence)
Then
    soft = T^2 * D
    row  = alpha * soft + (1 - alpha) * CE(s, y)      (with a target y; `soft` alone without)
    d row / d s = c_kl * dD/dz + (1 - alpha) * (softmax(s) - onehot(y)),   z = s / T
with c_kl = alpha * T (T^2 times the 1/T of the inner derivative), or T without a target, and
    "kl":  dD/dz_j = q_j - p_j
    else:  dD/dz_j = q_j * (g_j - sum_i q_i g_i),  g = dD/dq (up to a constant), where
           "reverse_kl": g_j = log q_j - log p_j                  (so sum_i q_i g_i = D)
           "jsd":        g_j = beta (log q_j - log m_j) - (1 - beta) ((1 - beta) p_j + beta q_j) / m_j
The row statistics are (lse(s/T), lse(t/T), lse(s)) for "kl", plus sum_i q_i g_i as a fourth column
for the other divergences. Rows whose target equals ignore_index give 0, zero statistics and a zero
gradient.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

_CHUNK_ELEMENTS = 1 << 22

DIVERGENCES = ("kl", "reverse_kl", "jsd")


def n_stats(divergence: str) -> int:
    """Number of fp32 statistics saved per row for `divergence`."""
    return 3 if divergence == "kl" else 4


def _row_chunk(n_rows: int, n_cols: int) -> int:
    return max(1, min(n_rows, _CHUNK_ELEMENTS // max(n_cols, 1)))


def _valid_rows(target: Optional[Tensor], ignore_index: int, r0: int, r1: int, device):
    if target is None:
        return None, None
    tgt = target[r0:r1]
    valid = tgt != ignore_index
    return valid, torch.where(valid, tgt, torch.zeros_like(tgt))


def _log_weight(w: float) -> float:
    return math.log(w) if w > 0 else float("-inf")


def _divergence_terms(log_p: Tensor, log_q: Tensor, divergence: str, beta: float):
    """Per-element divergence terms (summing to D) and q_j * g_j (None for "kl"), fp32."""
    p = log_p.exp()
    zero = torch.zeros_like(p)
    if divergence == "kl":
        # p = 0 (a masked or underflowed teacher entry) contributes nothing, even where q = 0.
        return torch.where(p > 0, p * (log_p - log_q), zero), None
    q = log_q.exp()
    if divergence == "reverse_kl":
        qg = torch.where(q > 0, q * (log_q - log_p), zero)
        return qg, qg
    lb, l1b = _log_weight(beta), _log_weight(1.0 - beta)
    log_m = torch.logaddexp(lb + log_p, l1b + log_q)
    terms = (1.0 - beta) * torch.where(p > 0, p * (log_p - log_m), zero) + beta * torch.where(
        q > 0, q * (log_q - log_m), zero
    )
    log_n = torch.logaddexp(l1b + log_p, lb + log_q)  # log((1 - beta) p + beta q)
    ratio = torch.where(q > 0, (log_q + log_n - log_m).exp(), zero)  # q * n / m, no inf * 0
    qg = torch.where(q > 0, beta * q * (log_q - log_m), zero) - (1.0 - beta) * ratio
    return terms, qg


def _lse_at_row_max(x: Tensor, log_softmax_x: Tensor) -> Tensor:
    """logsumexp(x) per row, read off log_softmax(x) at the row's largest entry (log_softmax is
    increasing in x, so both maxima sit there; amax is much cheaper than argmax + gather)."""
    return x.amax(dim=-1) - log_softmax_x.amax(dim=-1)


def _exp_shifted(x: Tensor, inv_t: float, shift: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """exp(x / T - shift) per row, fp32, in one fresh buffer (or `out`): two passes over x."""
    return torch.add(-shift[:, None], x, alpha=inv_t, out=out).exp_()


def _exp_sum(x: Tensor, inv_t: float, out: Optional[Tensor] = None):
    """(shift, sum of exp(x / T - shift), that exp buffer) per row; shift + log(sum) is the
    logsumexp of x / T. The shift is the row max (T > 0: the max of x / T), or 0 for a row of
    -inf, whose logsumexp is then -inf rather than nan."""
    row_max = x.amax(dim=-1).float() * inv_t
    shift = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    e = _exp_shifted(x, inv_t, shift, out=out)
    return shift, e.sum(dim=-1), e


def _kl_forward_chunk(s: Tensor, t: Tensor, inv_t: float):
    """Forward KL(p || q) per row, lse(s/T), lse(t/T) and lse(s) for one chunk of rows.

    On the CPU this is bound by passes over the chunk and by fresh N x V buffers (each one's
    pages are faulted in anew), not by arithmetic, so it takes the fewest of both: one exp pass
    per normaliser, and two fp32 buffers in all, the teacher's probabilities p and a work buffer
    reused for every student-side pass. With log p - log q = (t - s)/T - lse(t/T) + lse(s/T),
    KL = sum p (log p - log q); an entry with p = 0 (a masked or underflowed teacher logit) adds
    nothing even where q = 0: its 0 * (-inf) or 0 * nan is dropped by nansum. A nan logit makes
    its row nan (checked per row, since nansum would hide it).
    """
    m_t, z_t, p = _exp_sum(t, inv_t)
    p.div_(z_t[:, None])
    lse_t = m_t + z_t.log()
    m_s, z_s, work = _exp_sum(s, inv_t)
    lse_s = m_s + z_s.log()
    if inv_t == 1.0:
        lse_1 = lse_s
    else:
        m_1, z_1, _ = _exp_sum(s, 1.0, out=work)
        lse_1 = m_1 + z_1.log()
    # log p - log q, accumulated in fp32 whatever the logits' dtypes
    log_ratio = torch.add((lse_s - lse_t)[:, None], t, alpha=inv_t, out=work).sub_(s, alpha=inv_t)
    kl = log_ratio.mul_(p).nansum(dim=-1)
    kl = torch.where(torch.isnan(lse_s) | torch.isnan(lse_t), lse_s + lse_t, kl)
    return kl, lse_s, lse_t, lse_1


def kd_loss_forward(
    student: Tensor,
    teacher: Tensor,
    target: Optional[Tensor],
    temperature: float,
    alpha: float,
    ignore_index: int,
    divergence: str = "kl",
    beta: float = 0.5,
) -> tuple[Tensor, Tensor]:
    """Per-row loss (N,) fp32 and row statistics (N, n_stats(divergence)) fp32.

    student, teacher: (N, V) fp16/bf16/fp32; target: (N,) int64 or None.
    stats[:, 0] = logsumexp(s/T), stats[:, 1] = logsumexp(t/T), stats[:, 2] = logsumexp(s),
    stats[:, 3] = sum_i q_i g_i (not "kl"), and 0 on ignored rows.
    """
    n_rows, n_cols = student.shape
    width = n_stats(divergence)
    loss = torch.zeros(n_rows, dtype=torch.float32, device=student.device)
    stats = torch.zeros(n_rows, width, dtype=torch.float32, device=student.device)
    inv_t = 1.0 / temperature
    step = _row_chunk(n_rows, n_cols)
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        s = student[r0:r1]
        t = teacher[r0:r1]
        if divergence == "kl":
            d, lse_s, lse_t, lse_1 = _kl_forward_chunk(s, t, inv_t)
            cols = [lse_s, lse_t, lse_1]
        else:
            s = s.float()
            s_t = s if temperature == 1.0 else s * inv_t
            t_t = t.float() if temperature == 1.0 else t.float() * inv_t
            # torch's fused log_softmax subtracts the row max before the log-sum, which keeps
            # log-probabilities of huge logits accurate
            log_q = torch.log_softmax(s_t, dim=-1)
            log_p = torch.log_softmax(t_t, dim=-1)
            lse_s = _lse_at_row_max(s_t, log_q)
            terms, qg = _divergence_terms(log_p, log_q, divergence, beta)
            lse_t = _lse_at_row_max(t_t, log_p)
            # the terms skip entries of zero probability, which a nan makes of every entry
            row_nan = torch.isnan(lse_s) | torch.isnan(lse_t)
            d = torch.where(row_nan, lse_s + lse_t, terms.sum(dim=-1))
            dot = torch.where(row_nan, lse_s + lse_t, qg.sum(dim=-1))
            lse_1 = lse_s if temperature == 1.0 else torch.logsumexp(s, dim=-1)
            cols = [lse_s, lse_t, lse_1, dot]
        soft = temperature * temperature * torch.where(d < 0, 0.0, d)  # keeps a nan, unlike clamp
        valid, safe = _valid_rows(target, ignore_index, r0, r1, student.device)
        if valid is None:
            row = soft
        else:
            ce = lse_1 - s.gather(1, safe[:, None]).squeeze(1).float()
            row = torch.where(valid, alpha * soft + (1.0 - alpha) * ce, torch.zeros_like(soft))
            zero = torch.zeros_like(lse_s)
            cols = [torch.where(valid, x, zero) for x in cols]
        loss[r0:r1] = row
        stats[r0:r1] = torch.stack(cols, dim=1)
    return loss, stats


def _kl_backward_chunk(out, s, t, st, scale, valid, safe, inv_t, c_kl, c_ce) -> None:
    """Write d(sum_i scale_i row_i)/ds for forward KL into `out`, from the saved statistics.

    g = c_kl (q - p) + c_ce (softmax(s) - onehot(y)), scaled per row, with q, p and softmax(s)
    read off their saved logsumexps: three exp passes (two when T = 1), one scratch buffer, and
    the rest in place, straight into `out` when it is fp32. Ignored rows (zero statistics) get
    lse = +inf, so their probabilities are exactly 0, never inf * 0.
    """
    lse = st[:, :3]
    if valid is not None:
        scale = torch.where(valid, scale, torch.zeros_like(scale))
        lse = torch.where(valid[:, None], lse, torch.full_like(lse, float("inf")))
    a = (c_kl * scale)[:, None]
    b = (c_ce * scale)[:, None] if valid is not None else None
    direct = out.dtype == torch.float32
    g = _exp_shifted(s, inv_t, lse[:, 0], out=out if direct else None)
    same_q = b is not None and inv_t == 1.0  # softmax(s / T) is softmax(s)
    g.mul_(a + b if same_q else a)
    scratch = _exp_shifted(t, inv_t, lse[:, 1])
    g.addcmul_(scratch, a, value=-1.0)
    if b is not None:
        if not same_q:
            g.addcmul_(_exp_shifted(s, 1.0, lse[:, 2], out=scratch), b)
        g.scatter_add_(1, safe[:, None], -b)
        g.masked_fill_(~valid[:, None], 0.0)  # exactly 0 there, even where a logit is nan
    if not direct:
        out.copy_(g)


def kd_loss_backward(
    grad_rows: Tensor,
    student: Tensor,
    teacher: Tensor,
    target: Optional[Tensor],
    stats: Tensor,
    temperature: float,
    alpha: float,
    ignore_index: int,
    divergence: str = "kl",
    beta: float = 0.5,
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
        st = stats[r0:r1]
        scale = grad_rows[r0:r1].float()
        valid, safe = _valid_rows(target, ignore_index, r0, r1, student.device)
        if divergence == "kl":
            _kl_backward_chunk(grad[r0:r1], student[r0:r1], teacher[r0:r1], st, scale, valid,
                               safe, inv_t, c_kl, c_ce)
            continue
        s = student[r0:r1].float()
        t = teacher[r0:r1].float()
        s_t = s if temperature == 1.0 else s * inv_t
        t_t = t if temperature == 1.0 else t * inv_t
        log_q = s_t - st[:, 0:1]
        _, qg = _divergence_terms(t_t - st[:, 1:2], log_q, divergence, beta)
        g = (qg - log_q.exp() * st[:, 3:4]).mul_(c_kl)
        if valid is not None:
            g.add_(torch.softmax(s, dim=-1), alpha=c_ce)
            g.scatter_add_(1, safe[:, None], torch.full_like(g[:, :1], -c_ce))
            scale = torch.where(valid, scale, torch.zeros_like(scale))
            # ignored rows carry zero statistics: force their (possibly inf) terms to 0
            g = torch.where(valid[:, None], g, torch.zeros_like(g))
        grad[r0:r1] = g.mul_(scale[:, None])
    return grad
