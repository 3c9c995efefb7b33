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
# Masked linear
# --------------------------------------------------------------------------------------------

import os  # noqa: E402

from . import _extension  # noqa: E402
from ._backend import ENV_VAR  # noqa: E402
from .reference.masked_linear import MaskTiles, build_tile_map  # noqa: E402

MASKED_MM_OPS = ("masked_mm", "masked_mm_grad_input", "masked_mm_grad_weight")
MASKED_HALF_DTYPES = (torch.float16, torch.bfloat16)

# When `auto` takes the sparse CUDA kernel instead of dense cuBLAS on W o M.
# PROVISIONAL: no GPU measurement exists yet (the kernel was written and compiled on a machine
# without a GPU). Chosen conservatively so `auto` stays on cuBLAS unless the mask is strongly
# block-structured and the GEMM is large; replace with numbers from bench/bench_masked_linear.py
# (and say which run) once measured. The kernel skips whole 64x64 weight tiles only, so what
# matters is the fraction of tiles with a kept entry, not the fraction of kept weights.
AUTO_SPARSE_MAX_TILE_DENSITY = 0.30  # at most 30% of 64x64 weight tiles non-empty
AUTO_SPARSE_MIN_ROWS = 512  # rows of x (M); below it too few CTAs fill an H100


def _masked_cuda_unavailable(device_type: str):
    if device_type != "cuda":
        return f"the masked-matmul CUDA kernels run on CUDA tensors, not on {device_type} tensors"
    if not _extension.loaded():
        return _extension.LOAD_ERROR or "fastkd._C is not loaded"
    missing = [op for op in MASKED_MM_OPS if not _extension.has_cuda_kernel(f"fastkd::{op}")]
    if missing:
        return f"fastkd._C has no CUDA kernel for {', '.join(missing)} (rebuild the extension)"
    return None


MASKED_LINEAR_BACKENDS = register(
    OpBackends(
        "masked_linear",
        [
            Backend("cuda", auto_devices=("cuda",), unavailable=_masked_cuda_unavailable),
            Backend("torch", auto_devices=("cpu", "cuda", "mps", "xpu", "meta")),
        ],
    )
)


def _check_mask_tiles(tile_map, mask: Tensor) -> None:
    if not isinstance(tile_map, MaskTiles):
        raise TypeError(f"tile_map must be a MaskTiles (build_tile_map), got {type(tile_map).__name__}")
    if tuple(tile_map.shape) != tuple(mask.shape) or tile_map.data.device != mask.device:
        raise ValueError(
            f"tile_map was built for a {tile_map.shape} mask on {tile_map.data.device}, "
            f"not this {tuple(mask.shape)} mask on {mask.device}"
        )


def masked_linear(
    x: Tensor,
    weight: Tensor,
    mask: Tensor,
    bias: Optional[Tensor] = None,
    backend: str = "auto",
    *,
    tile_map: Optional[MaskTiles] = None,
) -> Tensor:
    r"""Linear layer with a fixed sparsity mask on the weight: ``y = x (W o M)^T + b``.

    Backward: ``dx = dy (W o M)``, ``dW = (dy^T x) o M`` (exactly zero where the mask is False),
    ``db = dy`` summed over rows. The mask gets no gradient.

    Args:
        x: ``(..., K)`` fp32, fp16 or bf16.
        weight: ``(N, K)``, same dtype and device as ``x``.
        mask: ``(N, K)`` bool, True where the weight is kept.
        bias: optional ``(N,)``, same dtype as ``x``.
        backend: ``"auto"``, ``"torch"`` (dense ``F.linear`` on ``W o M``: cuBLAS on a GPU) or
            ``"cuda"`` (the tile-skipping tensor-core kernel: CUDA tensors, fp16/bf16, fastkd._C
            built). ``auto`` takes ``cuda`` only where it should be faster (see
            ``AUTO_SPARSE_MAX_TILE_DENSITY``, provisional), else ``torch``.
        tile_map: the mask's :class:`MaskTiles`; built here (one device sync) when the CUDA kernel
            runs without one. ``MaskedLinear`` caches it.

    Returns:
        ``(..., N)`` in the dtype of ``x`` (the autocast dtype inside ``torch.autocast``).
    """
    check_tensor(x, "x")
    check_tensor(weight, "weight")
    check_tensor(mask, "mask")
    check_float_dtype(x, "x")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got {tuple(weight.shape)}")
    if torch.is_autocast_enabled(x.device.type) and weight.is_floating_point():
        # Behave like F.linear under autocast: compute in the autocast dtype (custom ops are not
        # cast by autocast themselves). The gradient flows back to the fp32 master weights.
        low = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(low), weight.to(low)
        bias = bias.to(low) if isinstance(bias, Tensor) and bias.is_floating_point() else bias
    if weight.dtype != x.dtype:
        raise TypeError(f"x is {x.dtype} but weight is {weight.dtype}; they must match")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"x's last dimension must equal in_features={weight.shape[1]}, got shape {tuple(x.shape)}"
        )
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    if tuple(mask.shape) != tuple(weight.shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal weight shape {tuple(weight.shape)}")
    check_same_device(x, weight, "x", "weight")
    check_same_device(weight, mask, "weight", "mask")
    if bias is not None:
        check_tensor(bias, "bias")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias is {bias.dtype} but x is {x.dtype}; they must match")
        check_same_device(x, bias, "x", "bias")
    if tile_map is not None:
        _check_mask_tiles(tile_map, mask)

    def extra(name):
        if name == "cuda" and x.dtype not in MASKED_HALF_DTYPES:
            return [f"the CUDA kernel takes float16/bfloat16, got {x.dtype}"]
        return []

    impl = MASKED_LINEAR_BACKENDS.select(backend, x.device, extra)
    chosen_by_auto = backend == "auto" and os.environ.get(ENV_VAR, "auto") in ("", "auto")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, weight.shape[1])
    if impl == "cuda":
        if tile_map is None:
            if torch.compiler.is_compiling():
                if chosen_by_auto:
                    impl = "torch"  # building the map needs a sync; the dense path needs none
                else:
                    raise ValueError(
                        "backend='cuda' under torch.compile needs tile_map= (build_tile_map(mask), "
                        "built outside the compiled region)"
                    )
            else:
                tile_map = build_tile_map(mask)
        if impl == "cuda" and chosen_by_auto:
            if (
                tile_map.tile_density > AUTO_SPARSE_MAX_TILE_DENSITY
                or x2.shape[0] < AUTO_SPARSE_MIN_ROWS
            ):
                impl = "torch"
    tiles = tile_map.data if (impl == "cuda" and tile_map is not None) else None
    y = torch.ops.fastkd.masked_linear(x2, weight, mask, bias, tiles, impl)
    return y.reshape(*lead, weight.shape[0])
