"""The fastkd op contract: every ``torch.library`` schema (namespace ``fastkd``), its fake kernel,
its autograd rule, and the device-independent implementation that dispatches on the resolved
backend string.

The ops exist whether or not ``fastkd._C`` was built: C++ only adds CUDA implementations with
``TORCH_LIBRARY_IMPL(fastkd, CUDA, m)``. The Python implementations are registered for every device
("default"), so a CPU tensor or a missing extension falls back to the reference with no special code.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import reference

NAMESPACE = "fastkd"


def _kernels(family: str):
    """Import a Triton kernel module lazily: triton is optional on the CPU path."""
    import importlib

    return importlib.import_module(f"fastkd.kernels.{family}")


# --------------------------------------------------------------------------------------------
# KD loss
#   kd_loss_forward(student (N,V), teacher (N,V), target (N,)?, T, alpha, ignore_index, backend)
#     -> (row_loss (N,) fp32, row_stats (N,3) fp32)
#   kd_loss_backward(grad_rows (N,), student, teacher, target?, row_stats, T, alpha,
#                    ignore_index, backend) -> grad_student (N,V) in the student dtype
# --------------------------------------------------------------------------------------------

torch.library.define(
    "fastkd::kd_loss_forward",
    "(Tensor student, Tensor teacher, Tensor? target, float temperature, float alpha, "
    "int ignore_index, str backend) -> (Tensor, Tensor)",
)
torch.library.define(
    "fastkd::kd_loss_backward",
    "(Tensor grad_rows, Tensor student, Tensor teacher, Tensor? target, Tensor row_stats, "
    "float temperature, float alpha, int ignore_index, str backend) -> Tensor",
)


def _unit_stride(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


@torch.library.register_kernel("fastkd::kd_loss_forward", None)
def _kd_loss_forward(student, teacher, target, temperature, alpha, ignore_index, backend):
    impl = _kernels("kd_loss") if backend == "triton" else reference
    return impl.kd_loss_forward(
        _unit_stride(student), _unit_stride(teacher), target, temperature, alpha, ignore_index
    )


@torch.library.register_kernel("fastkd::kd_loss_backward", None)
def _kd_loss_backward(
    grad_rows, student, teacher, target, row_stats, temperature, alpha, ignore_index, backend
):
    impl = _kernels("kd_loss") if backend == "triton" else reference
    return impl.kd_loss_backward(
        grad_rows,
        _unit_stride(student),
        _unit_stride(teacher),
        target,
        row_stats,
        temperature,
        alpha,
        ignore_index,
    )


@torch.library.register_fake("fastkd::kd_loss_forward")
def _kd_loss_forward_fake(student, teacher, target, temperature, alpha, ignore_index, backend):
    n = student.shape[0]
    return (
        student.new_empty((n,), dtype=torch.float32),
        student.new_empty((n, 3), dtype=torch.float32),
    )


@torch.library.register_fake("fastkd::kd_loss_backward")
def _kd_loss_backward_fake(
    grad_rows, student, teacher, target, row_stats, temperature, alpha, ignore_index, backend
):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


def _kd_loss_setup_context(ctx, inputs, output):
    student, teacher, target, temperature, alpha, ignore_index, backend = inputs
    _, row_stats = output
    ctx.save_for_backward(student, teacher, target, row_stats)
    ctx.args = (temperature, alpha, ignore_index, backend)


def _kd_loss_autograd_backward(ctx, grad_rows, _grad_stats):
    student, teacher, target, row_stats = ctx.saved_tensors
    grad_student = None
    if ctx.needs_input_grad[0]:
        grad_student = torch.ops.fastkd.kd_loss_backward(
            grad_rows, student, teacher, target, row_stats, *ctx.args
        )
    return grad_student, None, None, None, None, None, None


torch.library.register_autograd(
    "fastkd::kd_loss_forward", _kd_loss_autograd_backward, setup_context=_kd_loss_setup_context
)


def kd_loss_rows(
    student: Tensor,
    teacher: Tensor,
    target: Optional[Tensor],
    temperature: float,
    alpha: float,
    ignore_index: int,
    backend: str,
) -> Tensor:
    """Per-row KD loss through the dispatcher (autograd reaches the student only)."""
    rows, _ = torch.ops.fastkd.kd_loss_forward(
        student, teacher, target, temperature, alpha, ignore_index, backend
    )
    return rows


# --------------------------------------------------------------------------------------------
# Weight-shared linear (issue 6)
#   shared_linear(x (M,K), indices uint8 (N,ceil(K/2)) | (N,K), codebook fp32 (C,) | (N,C),
#                 bias (N,)?, in_features, bits, backend) -> y (M,N) in x's dtype
#   Backward: grad_x = grad_y @ W; grad_codebook[c] = sum of grad_W over the cluster c (entry 0,
#   the pruned weights, gets none); grad_bias = sum over rows. Indices are fixed (no gradient).
# --------------------------------------------------------------------------------------------

torch.library.define(
    "fastkd::shared_linear",
    "(Tensor x, Tensor indices, Tensor codebook, Tensor? bias, int in_features, int bits, "
    "str backend) -> Tensor",
)


@torch.library.register_kernel("fastkd::shared_linear", None)
def _shared_linear(x, indices, codebook, bias, in_features, bits, backend):
    if backend == "triton":
        return _kernels("shared_linear").shared_linear_forward(
            x, indices, codebook, bias, in_features, bits
        )
    return reference.shared_linear_forward(x, indices, codebook, bias, in_features, bits)


@torch.library.register_fake("fastkd::shared_linear")
def _shared_linear_fake(x, indices, codebook, bias, in_features, bits, backend):
    return x.new_empty((x.shape[0], indices.shape[0]))


def _shared_linear_setup_context(ctx, inputs, output):
    x, indices, codebook, bias, in_features, bits, backend = inputs
    ctx.save_for_backward(x, indices, codebook)
    ctx.args = (in_features, bits)
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _shared_linear_backward(ctx, grad_y):
    x, indices, codebook = ctx.saved_tensors
    in_features, bits = ctx.args
    grad_x = grad_cb = grad_bias = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[2]:
        w = reference.shared_dequantize(indices, codebook, in_features, bits)
    if ctx.needs_input_grad[0]:
        grad_x = (grad_y @ w.to(grad_y.dtype)).to(x.dtype)
    if ctx.needs_input_grad[2]:
        grad_w = grad_y.float().t() @ x.float()
        grad_cb = reference.shared_codebook_grad(grad_w, indices, codebook, in_features, bits)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_bias = grad_y.float().sum(0).to(ctx.bias_dtype)
    return grad_x, None, grad_cb, grad_bias, None, None, None


torch.library.register_autograd(
    "fastkd::shared_linear", _shared_linear_backward, setup_context=_shared_linear_setup_context
)
