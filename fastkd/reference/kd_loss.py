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
gradient. A counted row whose student or teacher distribution is undefined (a nan or +inf logit, or
every logit -inf) gives a nan loss and gradient, as torch's own losses do; the Triton kernels agree.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

_CHUNK_ELEMENTS = 1 << 22
# Chunks of at most this many logits take the small-input path of "kl" (fused log_softmax and
# softmax passes, fewer ops; their time is per-op overhead, not memory traffic).
_SMALL_ELEMENTS = 1 << 14

DIVERGENCES = ("kl", "reverse_kl", "jsd")


def n_stats(divergence: str) -> int:
    """Number of fp32 statistics saved per row for `divergence`."""
    return 3 if divergence == "kl" else 4


def _row_chunk(n_rows: int, n_cols: int) -> int:
    return max(1, min(n_rows, _CHUNK_ELEMENTS // max(n_cols, 1)))


def _valid_rows(target: Optional[Tensor], ignore_index: int, r0: int, r1: int):
    """(counted-row mask, targets with ignored rows sent to class 0) for rows r0:r1."""
    if target is None:
        return None, None
    tgt = target[r0:r1]
    valid = tgt != ignore_index
    return valid, tgt * valid


def _log_weight(w: float) -> float:
    return math.log(w) if w > 0 else float("-inf")


def _divergence_terms(log_p: Tensor, log_q: Tensor, divergence: str, beta: float):
    """Per-element divergence terms (summing to D) and q_j * g_j (None for "kl"), fp32."""
    p = log_p.exp()
    zero = 0.0
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


def _exp_shifted(x: Tensor, inv_t: float, neg_shift: Tensor,
                 out: Optional[Tensor] = None) -> Tensor:
    """exp(x / T + neg_shift) per row, fp32, in one fresh buffer (or `out`): two passes over x."""
    return torch.add(neg_shift[:, None], x, alpha=inv_t, out=out).exp_()


def _exp_sum(x: Tensor, inv_t: float, out: Optional[Tensor] = None):
    """(logsumexp of x / T, sum of exp(x / T - shift), that exp buffer) per row.

    The shift is the row max (T > 0: the max of x / T), or 0 for a row without a finite max: a row
    of -inf then has logsumexp -inf rather than nan, and a +inf logit gives +inf; a nan stays nan.
    """
    neg_shift = x.amax(dim=-1).float().mul_(-inv_t)  # amax returns a fresh tensor
    neg_shift.nan_to_num_(nan=math.nan, posinf=0.0, neginf=0.0)
    e = _exp_shifted(x, inv_t, neg_shift, out=out)
    total = e.sum(dim=-1)
    return total.log().sub_(neg_shift), total, e


def _undefined_to_nan(x: Tensor, lse_s: Tensor, lse_t: Tensor) -> Tensor:
    """x, with nan on rows where either distribution is undefined: a nan or +inf logit, or no
    mass at all (every logit -inf). Their logsumexps are then not finite, and u - u with
    u = lse_s + lse_t is 0 exactly when u is finite and nan otherwise (short of overflow at
    |logit / T| ~ 1e38); the masking that drops zero-probability entries would otherwise return
    a finite value for such rows."""
    u = lse_s + lse_t
    return x + (u - u)


def _kl_forward_chunk(s: Tensor, t: Tensor, inv_t: float):
    """Forward KL(p || q) per row, lse(s/T), lse(t/T) and lse(s) for one chunk of rows.

    On the CPU this is bound by passes over the chunk and by fresh N x V buffers (each one's
    pages are faulted in anew), not by arithmetic, so it takes the fewest of both: one exp pass
    per normaliser, and two fp32 buffers in all, the teacher's probabilities p and a work buffer
    reused for every student-side pass. With log p - log q = (t - s)/T - lse(t/T) + lse(s/T),
    KL = sum p (log p - log q); an entry with p = 0 (a masked or underflowed teacher logit) adds
    nothing even where q = 0: its 0 * (-inf) or 0 * nan is dropped by nansum. A row with an
    undefined distribution is nan (checked per row, since nansum would hide it).
    """
    lse_t, z_t, p = _exp_sum(t, inv_t)
    p.div_(z_t[:, None])
    lse_s, _, work = _exp_sum(s, inv_t)
    lse_1 = lse_s if inv_t == 1.0 else _exp_sum(s, 1.0, out=work)[0]
    # log p - log q, accumulated in fp32 whatever the logits' dtypes
    log_ratio = torch.add((lse_s - lse_t)[:, None], t, alpha=inv_t, out=work).sub_(s, alpha=inv_t)
    kl = log_ratio.mul_(p).nansum(dim=-1)
    return _undefined_to_nan(kl, lse_s, lse_t), lse_s, lse_t, lse_1


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
    step = _row_chunk(n_rows, n_cols)
    if step >= n_rows:  # one chunk (the common case below ~4M logits): no copies into buffers
        return _forward_chunk(student, teacher, target, 0, n_rows, temperature, alpha,
                              ignore_index, divergence, beta)
    loss = torch.empty(n_rows, dtype=torch.float32, device=student.device)
    stats = torch.empty(n_rows, n_stats(divergence), dtype=torch.float32, device=student.device)
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        loss[r0:r1], stats[r0:r1] = _forward_chunk(student[r0:r1], teacher[r0:r1], target, r0,
                                                   r1, temperature, alpha, ignore_index,
                                                   divergence, beta)
    return loss, stats


def _forward_chunk(s, t, target, r0, r1, temperature, alpha, ignore_index, divergence, beta):
    """(row losses, row statistics) of rows r0:r1, whose logits are s and t."""
    inv_t = 1.0 / temperature
    if divergence == "kl" and s.numel() > _SMALL_ELEMENTS:
        d, lse_s, lse_t, lse_1 = _kl_forward_chunk(s, t, inv_t)
        cols = [lse_s, lse_t, lse_1]
    else:
        # Fewer, fused passes (log_softmax), at the cost of more fresh buffers: what small
        # chunks of "kl" want (their time is per-op overhead), and what the other divergences'
        # terms need anyway. torch's log_softmax subtracts the row max before the log-sum, which
        # keeps log-probabilities of huge logits accurate.
        s = s.float()
        s_t = s if temperature == 1.0 else s * inv_t
        t_t = t.float() if temperature == 1.0 else t.float() * inv_t
        log_q = torch.log_softmax(s_t, dim=-1)
        log_p = torch.log_softmax(t_t, dim=-1)
        lse_s = _lse_at_row_max(s_t, log_q)
        lse_t = _lse_at_row_max(t_t, log_p)
        terms, qg = _divergence_terms(log_p, log_q, divergence, beta)
        d = _undefined_to_nan(terms.sum(dim=-1), lse_s, lse_t)
        if temperature == 1.0:
            lse_1 = lse_s
        else:
            lse_1 = _lse_at_row_max(s, torch.log_softmax(s, dim=-1))
        cols = [lse_s, lse_t, lse_1]
        if qg is not None:
            cols.append(_undefined_to_nan(qg.sum(dim=-1), lse_s, lse_t))
    soft = d.clamp_min_(0.0).mul_(temperature * temperature)  # rounding can dip below 0; keeps nan
    stats = torch.stack(cols, dim=1)
    valid, safe = _valid_rows(target, ignore_index, r0, r1)
    if valid is None:
        return soft, stats
    ce = lse_1 - s.gather(1, safe[:, None]).squeeze(1)  # fp32, as lse_1 is
    return torch.where(valid, mix_rows(soft, ce, alpha), 0.0), torch.where(valid[:, None], stats,
                                                                            0.0)


def mix_rows(soft: Tensor, ce: Tensor, alpha: float) -> Tensor:
    """``alpha * soft + (1 - alpha) * ce``, where a term of weight 0 adds exactly 0: an infinite
    CE (a student logit of -inf at the target) at ``alpha = 1``, or an infinite divergence (a
    reverse KL against a masked teacher entry) or an undefined teacher row at ``alpha = 0``,
    would otherwise make 0 * inf = nan."""
    if alpha == 1.0:
        return soft
    if alpha == 0.0:
        return ce
    return torch.add(soft * alpha, ce, alpha=1.0 - alpha)


def _ce_only_backward(grad_rows: Tensor, student: Tensor, target: Tensor,
                      ignore_index: int) -> Tensor:
    """d(sum_i grad_rows[i] CE_i)/ds: the whole gradient at ``alpha = 0``, where the teacher's
    term has weight 0 and must not bring its infinities or nans in as 0 * inf."""
    n_rows, n_cols = student.shape
    grad = torch.empty_like(student)
    step = _row_chunk(n_rows, n_cols)
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        valid, safe = _valid_rows(target, ignore_index, r0, r1)
        g = torch.softmax(student[r0:r1].float(), dim=-1)
        g.scatter_add_(1, safe[:, None], torch.full_like(g[:, :1], -1.0))
        g.mul_(torch.where(valid, grad_rows[r0:r1].float(), 0.0)[:, None])
        grad[r0:r1] = g.masked_fill_(~valid[:, None], 0.0)
    return grad


def _kl_backward_chunk(out, s, t, st, scale, valid, safe, inv_t, c_kl, c_ce) -> None:
    """Write d(sum_i scale_i row_i)/ds for forward KL into `out`, from the saved statistics.

    g = c_kl (q - p) + c_ce (softmax(s) - onehot(y)), scaled per row, with q, p and softmax(s)
    read off their saved logsumexps: three exp passes (two when T = 1), one scratch buffer, and
    the rest in place, straight into `out` when it is fp32. Ignored rows (zero statistics) are
    shifted by -inf, so their probabilities are exactly 0, never inf * 0.
    """
    neg_lse = st[:, :3].neg()
    if valid is not None:
        scale = torch.where(valid, scale, 0.0)
        neg_lse.masked_fill_(~valid[:, None], float("-inf"))
    a = (c_kl * scale)[:, None]
    nb = (-c_ce * scale)[:, None] if valid is not None else None  # minus the CE coefficient
    direct = out.dtype == torch.float32
    g = _exp_shifted(s, inv_t, neg_lse[:, 0], out=out if direct else None)
    same_q = nb is not None and inv_t == 1.0  # softmax(s / T) is softmax(s)
    g.mul_(a - nb if same_q else a)
    scratch = _exp_shifted(t, inv_t, neg_lse[:, 1])
    g.addcmul_(scratch, a, value=-1.0)
    if nb is not None:
        if not same_q:
            g.addcmul_(_exp_shifted(s, 1.0, neg_lse[:, 2], out=scratch), nb, value=-1.0)
        g.scatter_add_(1, safe[:, None], nb)
        g.masked_fill_(~valid[:, None], 0.0)  # exactly 0 there, even where a logit is nan
    if not direct:
        out.copy_(g)


def _kl_backward_small(s, t, scale, valid, safe, temperature, c_kl, c_ce) -> Tensor:
    """d(sum_i scale_i row_i)/ds for forward KL, fp32, on the small-input path: the softmaxes
    recomputed by torch's fused kernel (which matches exp(z - lse) of the saved statistics to
    rounding, and is nan on the same undefined rows) in fewer ops than from the statistics."""
    s = s.float()
    s_t = s if temperature == 1.0 else s * (1.0 / temperature)
    t_t = t.float() if temperature == 1.0 else t.float() * (1.0 / temperature)
    q = torch.softmax(s_t, dim=-1)
    g = q - torch.softmax(t_t, dim=-1)
    if valid is None:
        return g.mul_((c_kl * scale)[:, None])
    g.mul_(c_kl).add_(q if temperature == 1.0 else torch.softmax(s, dim=-1), alpha=c_ce)
    g.scatter_add_(1, safe[:, None], torch.full_like(g[:, :1], -c_ce))
    g.mul_(torch.where(valid, scale, 0.0)[:, None])
    return g.masked_fill_(~valid[:, None], 0.0)  # exactly 0 there, even where a logit is nan


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
    inv_t = 1.0 / temperature
    c_kl = temperature if target is None else alpha * temperature
    c_ce = 1.0 - alpha
    if c_kl == 0.0:
        return _ce_only_backward(grad_rows, student, target, ignore_index)
    step = _row_chunk(n_rows, n_cols)
    if divergence == "kl" and step >= n_rows and n_rows * n_cols <= _SMALL_ELEMENTS:
        # one small chunk: its fp32 gradient is the answer, no (N, V) buffer to fill
        valid, safe = _valid_rows(target, ignore_index, 0, n_rows)
        g = _kl_backward_small(student, teacher, grad_rows.float(), valid, safe, temperature,
                               c_kl, c_ce)
        return g.to(student.dtype)
    grad = torch.empty_like(student)
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        st = stats[r0:r1]
        scale = grad_rows[r0:r1].float()
        valid, safe = _valid_rows(target, ignore_index, r0, r1)
        if divergence == "kl" and (r1 - r0) * n_cols > _SMALL_ELEMENTS:
            _kl_backward_chunk(grad[r0:r1], student[r0:r1], teacher[r0:r1], st, scale, valid,
                               safe, inv_t, c_kl, c_ce)
            continue
        if divergence == "kl":
            grad[r0:r1] = _kl_backward_small(student[r0:r1], teacher[r0:r1], scale, valid, safe,
                                             temperature, c_kl, c_ce)
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
            scale = torch.where(valid, scale, 0.0)
            # ignored rows carry zero statistics: force their (possibly inf) terms to 0
            g = torch.where(valid[:, None], g, 0.0)
        grad[r0:r1] = g.mul_(scale[:, None])
    return grad
