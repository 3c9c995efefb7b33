"""The typed public functions of fastkd. Each validates its arguments, picks a backend and calls
the op through the dispatcher (``torch.ops.fastkd``), so eager, autograd and torch.compile all see
one contract."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _ops  # noqa: F401  (registers the ops)
from ._backend import (
    Backend,
    OpBackends,
    register,
    triton_unavailable_reason,
)
from ._validate import (
    check_class_targets,
    check_float_dtype,
    check_number,
    check_reduction,
    check_same_device,
    check_tensor,
)

KD_DIVERGENCES = ("kl", "reverse_kl", "jsd")


def check_divergence(divergence, beta) -> tuple:
    if divergence not in KD_DIVERGENCES:
        raise ValueError(f"divergence must be one of {KD_DIVERGENCES}, got {divergence!r}")
    return divergence, check_number(beta, "beta", low=0.0, high=1.0)


KD_LOSS_BACKENDS = register(
    OpBackends(
        "kd_loss",
        [
            Backend("triton", auto_devices=("cuda",), unavailable=triton_unavailable_reason),
            Backend("torch", auto_devices=("cpu", "cuda", "mps", "xpu", "meta")),
        ],
    )
)


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Optional[Tensor] = None,
    *,
    temperature: float = 1.0,
    alpha: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str = "auto",
    divergence: str = "kl",
    beta: float = 0.5,
    group=None,
) -> Tensor:
    r"""Knowledge-distillation loss (Hinton et al., 2015), fused.

    For every row (every index of the leading dimensions) with student logits ``s`` and teacher
    logits ``t`` over ``V`` classes, ``p = softmax(t / T)`` (teacher), ``q = softmax(s / T)``
    (student)::

        soft = T**2 * D(p, q)
        row  = alpha * soft + (1 - alpha) * cross_entropy(s, target)   # with a target
        row  = soft                                                    # without one

    with the divergence ``D`` chosen by ``divergence``:

    - ``"kl"`` (default): forward KL, ``KL(p || q)`` (mass-covering).
    - ``"reverse_kl"``: ``KL(q || p)`` (mode-seeking). It is infinite where the teacher has an
      entry at ``-inf`` that the student does not mask too.
    - ``"jsd"``: generalized Jensen-Shannon with weight ``beta`` in ``[0, 1]``::

          D = (1 - beta) * KL(p || m) + beta * KL(q || m),   m = beta * p + (1 - beta) * q

      ``beta = 0`` gives ``m = q`` and exactly the forward ``KL(p || q)``; ``beta = 1`` gives
      ``m = p`` and exactly the reverse ``KL(q || p)``; ``beta = 0.5`` is the usual symmetric JSD.
      It is finite for any pair of distributions when ``0 < beta < 1``.

    Args:
        student_logits: ``(..., V)`` fp32, fp16 or bf16. Receives the gradient.
        teacher_logits: ``(..., V)``, any of the same dtypes (need not match the student's); a
            constant (no gradient). ``-inf`` entries (a padded vocabulary) have zero probability.
        target: optional ``(...)`` integer class indices in ``[0, V)`` or ``ignore_index``.
        temperature: ``T > 0``. alpha: in ``[0, 1]``; unused without a target.
        ignore_index: rows whose target equals it contribute 0 and leave the mean's denominator.
        reduction: ``"mean"`` (over counted rows; 0 with zero gradient when none count),
            ``"sum"``, or ``"none"`` (per-row loss, shape ``(...)``).
        backend: ``"auto"`` (Triton on CUDA, the torch reference elsewhere; ``FASTKD_BACKEND``
            overrides), ``"torch"`` or ``"triton"``.
        divergence: ``"kl"``, ``"reverse_kl"`` or ``"jsd"`` (above).
        beta: the ``"jsd"`` weight in ``[0, 1]``; ignored by the other divergences.
        group: a ``torch.distributed`` process group over which the classes are sharded
            (vocabulary parallelism): each rank passes its contiguous slice of the classes, in rank
            order, and the global ``target``; only a few floats per row are exchanged and every rank
            gets the full loss and its shard's gradient. Local work uses the torch reference.

    Returns:
        fp32 loss: a scalar, or ``(...)`` with ``reduction="none"``. The student gradient comes back
        in the student's dtype. Statistics are fp32; no ``N x V`` fp32 buffer is created.
    """
    check_tensor(student_logits, "student_logits")
    check_tensor(teacher_logits, "teacher_logits")
    check_float_dtype(student_logits, "student_logits")
    check_float_dtype(teacher_logits, "teacher_logits")
    if student_logits.dim() < 1:
        raise ValueError("student_logits must have at least one dimension (the classes)")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )
    check_same_device(student_logits, teacher_logits, "student_logits", "teacher_logits")
    temperature = check_number(temperature, "temperature", low=0.0, low_open=True)
    alpha = check_number(alpha, "alpha", low=0.0, high=1.0)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    reduction = check_reduction(reduction)
    divergence, beta = check_divergence(divergence, beta)

    n_classes = student_logits.shape[-1]
    lead = student_logits.shape[:-1]
    if n_classes == 0:
        raise ValueError("logits need at least one class (last dimension is 0)")
    if target is not None:
        check_tensor(target, "target")
        if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
            raise TypeError(f"target must hold integer class indices, got {target.dtype}")
        if tuple(target.shape) != tuple(lead):
            raise ValueError(
                f"target shape {tuple(target.shape)} must equal the logits' leading shape "
                f"{tuple(lead)}"
            )
        check_same_device(student_logits, target, "student_logits", "target")
        target = target.reshape(-1).long()
        if group is None:  # with a group, targets are global ids (checked against the total)
            check_class_targets(target, n_classes, ignore_index)

    impl = KD_LOSS_BACKENDS.select(backend, student_logits.device)
    student = student_logits.reshape(-1, n_classes)
    teacher = teacher_logits.detach().reshape(-1, n_classes)
    if group is not None:  # vocabulary-parallel (fastkd/_vocab_parallel.py)
        from ._vocab_parallel import vocab_parallel_kd_rows

        rows = vocab_parallel_kd_rows(
            student, teacher, target, temperature, alpha, ignore_index, divergence, beta, group
        )
    else:
        rows = _ops.kd_loss_rows(
            student, teacher, target, temperature, alpha, ignore_index, impl, divergence, beta
        )
    if reduction == "none":
        return rows.reshape(lead)
    total = rows.sum()
    if reduction == "sum":
        return total
    if target is None:
        return total / max(rows.numel(), 1)
    counted = (target != ignore_index).sum().clamp_min(1)
    return total / counted


# Top-k teachers (offline distillation); the logic lives in fastkd/_topk.py.
from ._topk import KD_LOSS_TOPK_BACKENDS, kd_loss_topk  # noqa: E402,F401

# Fused lm-head + KD loss, chunked over rows; the logic lives in fastkd/_fused_linear_kd.py.
from ._fused_linear_kd import fused_linear_kd_loss  # noqa: E402,F401
