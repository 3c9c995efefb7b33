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
) -> Tensor:
    r"""Knowledge-distillation loss (Hinton et al., 2015), fused.

    For every row (every index of the leading dimensions) with student logits ``s`` and teacher
    logits ``t`` over ``V`` classes::

        soft = T**2 * KL(softmax(t / T) || softmax(s / T))
        row  = alpha * soft + (1 - alpha) * cross_entropy(s, target)   # with a target
        row  = soft                                                    # without one

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
        check_class_targets(target, n_classes, ignore_index)

    impl = KD_LOSS_BACKENDS.select(backend, student_logits.device)
    student = student_logits.reshape(-1, n_classes)
    teacher = teacher_logits.detach().reshape(-1, n_classes)
    rows = _ops.kd_loss_rows(student, teacher, target, temperature, alpha, ignore_index, impl)
    if reduction == "none":
        return rows.reshape(lead)
    total = rows.sum()
    if reduction == "sum":
        return total
    if target is None:
        return total / max(rows.numel(), 1)
    counted = (target != ignore_index).sum().clamp_min(1)
    return total / counted


# --------------------------------------------------------------------------------------------
# Weight-shared linear (issue 6)
# --------------------------------------------------------------------------------------------

SHARED_LINEAR_BACKENDS = register(
    OpBackends(
        "shared_linear",
        [
            Backend("triton", auto_devices=("cuda",), unavailable=triton_unavailable_reason),
            Backend("torch", auto_devices=("cpu", "cuda", "mps", "xpu", "meta")),
        ],
    )
)


def shared_linear(
    x: Tensor,
    indices: Tensor,
    codebook: Tensor,
    bias: Optional[Tensor] = None,
    *,
    in_features: int,
    bits: int,
    backend: str = "auto",
) -> Tensor:
    """Linear layer whose weight is looked up in a codebook: ``y = x @ W.T + bias``.

    ``W[n, k] = codebook[(n,) idx[n, k]]`` and 0 where ``idx == 0`` (the pruned cluster).

    Args:
        x: ``(..., in_features)`` fp32, fp16 or bf16.
        indices: uint8 ``(N, ceil(in_features / 2))`` (two 4-bit indices per byte, low nibble first)
            when ``bits <= 4``, else ``(N, in_features)``.
        codebook: fp32 ``(2**bits,)`` (per layer) or ``(N, 2**bits)`` (per output channel).
        bias: optional ``(N,)``.
        backend: ``"auto"`` (Triton on CUDA, torch elsewhere), ``"torch"`` or ``"triton"``.

    Returns ``(..., N)`` in x's dtype. Gradients reach x, the codebook (the sum of the weight
    gradients of each cluster) and the bias; the indices are fixed.
    """
    check_tensor(x, "x")
    check_tensor(indices, "indices")
    check_tensor(codebook, "codebook")
    check_float_dtype(x, "x")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in [1, 8], got {bits!r}")
    if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 0:
        raise ValueError(f"in_features must be a non-negative int, got {in_features!r}")
    if indices.dtype != torch.uint8 or indices.dim() != 2:
        raise TypeError(f"indices must be a 2-D uint8 tensor, got {indices.dim()}-D {indices.dtype}")
    width = (in_features + 1) // 2 if bits <= 4 else in_features
    if indices.shape[1] != width:
        raise ValueError(
            f"indices have {indices.shape[1]} columns; {width} expected for in_features="
            f"{in_features} at {bits} bits"
        )
    n = indices.shape[0]
    if codebook.dtype != torch.float32:
        raise TypeError(f"codebook must be float32, got {codebook.dtype}")
    if codebook.shape not in ((2**bits,), (n, 2**bits)):
        raise ValueError(
            f"codebook shape {tuple(codebook.shape)} must be ({2**bits},) or ({n}, {2**bits})"
        )
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the layer takes {in_features}")
    check_same_device(x, indices, "x", "indices")
    check_same_device(x, codebook, "x", "codebook")
    if bias is not None:
        check_tensor(bias, "bias")
        check_same_device(x, bias, "x", "bias")
        if bias.shape != (n,):
            raise ValueError(f"bias shape {tuple(bias.shape)} must be ({n},)")
    impl = SHARED_LINEAR_BACKENDS.select(backend, x.device)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    if impl == "triton" and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.ops.fastkd.shared_linear(x2, indices, codebook, bias, in_features, bits, impl)
    return y.reshape(*lead, n)
