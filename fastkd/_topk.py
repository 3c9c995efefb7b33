"""Offline distillation from a top-k teacher: ``teacher_topk`` stores, ``kd_loss_topk`` trains.

Exported as ``fastkd.teacher_topk`` and ``fastkd.functional.kd_loss_topk``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._backend import register_triton_op
from ._rows import as_rows
from ._validate import (
    check_class_target,
    check_float_dtype,
    check_int,
    check_number,
    check_reduction,
    check_same_device,
    check_tensor,
    check_temperature,
    reduce_rows,
)

KD_LOSS_TOPK_BACKENDS = register_triton_op("kd_loss_topk")

_TOPK_CHUNK_ELEMENTS = 1 << 22


@torch.no_grad()
def teacher_topk(logits: Tensor, k: int, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """The k most likely classes of a teacher and their log-probabilities at ``temperature``.

    Returns ``(ids, logprobs)``, shapes ``(..., k)``: int64 class ids (most likely first) and fp32
    ``log_softmax(logits / temperature)`` at those ids, computed in fp32 over row chunks (no
    ``N x V`` fp32 copy). Feed them to :func:`fastkd.functional.kd_loss_topk` with the same
    ``temperature``: that loss applies the temperature to the student only.
    """
    check_tensor(logits, "logits")
    check_float_dtype(logits, "logits")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError("logits need a non-empty last (class) dimension")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    n_classes = logits.shape[-1]
    if not 1 <= k <= n_classes:
        raise ValueError(f"k must lie in [1, {n_classes}], got {k}")
    temperature = check_temperature(temperature)
    lead = logits.shape[:-1]
    rows = as_rows(logits)  # a sliced (B, L, V) batch stays a view: its (L, V) blocks are read
    # one op call (fastkd/_ops.py) whatever the row count: its chunk loop, traced, specialised a
    # compiled or exported program on the number of rows
    ids, lps = torch.ops.fastkd.teacher_topk(rows.detach(), k, temperature)
    return ids.reshape(*lead, k), lps.reshape(*lead, k)


def topk_rows(rows: Tensor, k: int, temperature: float) -> tuple[Tensor, Tensor]:
    """The body of ``fastkd::teacher_topk``: ``(ids, logprobs)`` ``(N, k)`` of ``(N, V)`` or
    ``(B, L, V)`` rows, in row chunks (fp32 copies of a chunk at a time)."""
    n_classes = rows.shape[-1]
    n_rows = rows.numel() // n_classes if n_classes else 0
    ids = torch.empty(n_rows, k, dtype=torch.long, device=rows.device)
    lps = torch.empty(n_rows, k, dtype=torch.float32, device=rows.device)
    step = max(1, _TOPK_CHUNK_ELEMENTS // n_classes)
    out = 0
    for block in (rows,) if rows.dim() == 2 else rows.unbind(0):
        for r0 in range(0, block.shape[0], step):
            z = block[r0 : r0 + step].float() / temperature
            top, idx = torch.topk(z, k, dim=-1)
            r1 = out + z.shape[0]
            lps[out:r1] = top - torch.logsumexp(z, dim=-1, keepdim=True)
            ids[out:r1] = idx
            out = r1
    return ids, lps


def kd_loss_topk(
    student_logits: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    target: Optional[Tensor] = None,
    *,
    temperature: float = 1.0,
    alpha: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str = "auto",
) -> Tensor:
    r"""KD loss against a teacher stored as its top-k classes (offline distillation), fused.

    Per row, with ``q = softmax(s / T)`` over all ``V`` classes, teacher probabilities
    ``P_i = exp(teacher_logprobs[i])`` at the ids ``teacher_ids[i]`` and one tail bucket for every
    other class (``P_tail = max(0, 1 - sum_i P_i)`` against the student's mass outside the ids,
    ``Q_tail``)::

        D    = sum_i P_i * (log P_i - log q[id_i]) + P_tail * (log P_tail - log Q_tail)
        soft = T**2 * D
        row  = alpha * soft + (1 - alpha) * cross_entropy(s, target)   # soft alone without target

    **Temperature.** The stored log-probabilities are taken as the teacher distribution as they
    are; ``temperature`` divides the student logits only (and scales by ``T**2``). Produce them with
    ``fastkd.teacher_topk(teacher_logits, k, temperature=T)`` at the ``T`` you train with. With
    ``k = V`` the loss equals ``kd_loss(s, t, temperature=T)`` to rounding. Without a tail
    (``k = V``) there is no tail bucket.

    Args:
        student_logits: ``(..., V)`` fp32, fp16 or bf16. Receives the gradient.
        teacher_ids: ``(..., k)`` integer, distinct class ids per row, ``1 <= k <= V``.
        teacher_logprobs: ``(..., k)`` float log-probabilities (``-inf`` for a padded slot).
        target, temperature, alpha, ignore_index, reduction, backend: as in
            :func:`fastkd.functional.kd_loss`.

    Returns:
        fp32 loss (scalar, or ``(...)`` with ``reduction="none"``). Extra memory: four fp32 per row.
    """
    check_tensor(student_logits, "student_logits")
    check_tensor(teacher_ids, "teacher_ids")
    check_tensor(teacher_logprobs, "teacher_logprobs")
    check_float_dtype(student_logits, "student_logits")
    check_float_dtype(teacher_logprobs, "teacher_logprobs")
    if student_logits.dim() < 1 or student_logits.shape[-1] == 0:
        raise ValueError("student_logits need a non-empty last (class) dimension")
    if teacher_ids.dtype.is_floating_point or teacher_ids.dtype.is_complex or (
        teacher_ids.dtype == torch.bool
    ):
        raise TypeError(f"teacher_ids must hold integer class ids, got {teacher_ids.dtype}")
    n_classes = student_logits.shape[-1]
    lead = student_logits.shape[:-1]
    if teacher_ids.shape != teacher_logprobs.shape:
        raise ValueError(
            f"teacher_ids {tuple(teacher_ids.shape)} and teacher_logprobs "
            f"{tuple(teacher_logprobs.shape)} must have the same shape"
        )
    if teacher_ids.dim() != student_logits.dim() or teacher_ids.shape[:-1] != lead:
        raise ValueError(
            f"teacher_ids {tuple(teacher_ids.shape)} must be (..., k) with the student's leading "
            f"shape {tuple(lead)}"
        )
    k = teacher_ids.shape[-1]
    if not 1 <= k <= n_classes:
        raise ValueError(f"the teacher must give k in [1, {n_classes}] classes per row, got {k}")
    check_same_device(student_logits, teacher_ids, "student_logits", "teacher_ids")
    check_same_device(student_logits, teacher_logprobs, "student_logits", "teacher_logprobs")
    temperature = check_temperature(temperature)
    alpha = check_number(alpha, "alpha", low=0.0, high=1.0)
    ignore_index = check_int(ignore_index, "ignore_index")
    reduction = check_reduction(reduction)

    ids = teacher_ids.reshape(-1, k).long()
    lps = teacher_logprobs.detach().reshape(-1, k).float()
    _check_ids(ids, n_classes)
    _check_logprobs(lps)
    if target is not None:
        target = check_class_target(target, lead, student_logits, "student_logits", n_classes,
                                    ignore_index)

    impl = KD_LOSS_TOPK_BACKENDS.select(backend, student_logits.device)
    student = as_rows(student_logits)  # a sliced (B, L, V) batch stays a view (fastkd/_rows.py)
    rows, _ = torch.ops.fastkd.kd_loss_topk_forward(
        student, ids, lps, target, temperature, alpha, ignore_index, impl
    )
    return reduce_rows(rows, target, ignore_index, reduction, lead)


# how far above 0 a log-probability, or the log of a row's total, may be from rounding (log-
# probabilities stored in bf16 are off by up to ~2^-8 relative each)
_LOGPROB_SLACK = 1e-2


def _check_logprobs(lps: Tensor) -> None:
    """Log-probabilities are <= 0 and a row's k of them sum to at most 1 (up to rounding):
    logits passed by mistake (the top ones are positive) gave a huge loss, silently. A nan
    stays allowed (its row is nan, as kd_loss's). Eager on the CPU, async elsewhere."""
    bad = (lps > _LOGPROB_SLACK).any() | (torch.logsumexp(lps, dim=1) > _LOGPROB_SLACK).any()
    msg = ("teacher_logprobs must be log-probabilities (<= 0, each row's exp summing to at most "
           "1), as fastkd.teacher_topk returns them, not logits")
    if lps.device.type == "cpu" and not torch.compiler.is_compiling():
        if bool(bad):
            raise ValueError(msg)
    else:
        torch._assert_async(~bad, msg)


def _check_ids(ids: Tensor, n_classes: int) -> None:
    """Ids lie in [0, V) and are distinct per row (checked eagerly on the CPU, async elsewhere:
    a repeated id would count its class twice in the student's mass at the ids, silently)."""
    bad = ((ids < 0) | (ids >= n_classes)).any()
    msg = f"teacher_ids must lie in [0, {n_classes})"
    distinct = "teacher_ids must be distinct within each row"
    repeated = None
    if ids.shape[1] > 1:
        repeated = (ids.sort(dim=1).values.diff(dim=1) == 0).any()
    if ids.device.type == "cpu" and not torch.compiler.is_compiling():
        if bool(bad):
            raise ValueError(msg)
        if repeated is not None and bool(repeated):
            raise ValueError(distinct)
    else:
        if repeated is not None:
            bad = bad | repeated
            msg = f"{msg} and be distinct within each row"
        torch._assert_async(~bad, msg)


__all__ = ["kd_loss_topk", "teacher_topk", "KD_LOSS_TOPK_BACKENDS"]
