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
# Masked linear (fastkd.nn.MaskedLinear): y = x (W o M)^T + b over 2-D x (M, K), W/mask (N, K)
#
#   Kernel ops: the reference is registered for every device; csrc/masked_matmul.cu adds CUDA
#   kernels (TORCH_LIBRARY_IMPL(fastkd, CUDA)) that read the packed tile map (see
#   fastkd.reference.masked_linear.MaskTiles) and skip empty weight tiles.
#     masked_mm(x, weight, mask, bias?, tile_map) -> y (M, N)
#     masked_mm_grad_input(grad_out, weight, mask, tile_map) -> dx (M, K)
#     masked_mm_grad_weight(grad_out, x, mask, tile_map) -> dW (N, K), zero where mask is False
#   Public ops (autograd on masked_linear): pick the implementation from the resolved backend
#   string ("cuda" -> the kernel ops above, anything else -> the reference, i.e. dense
#   F.linear / cuBLAS on W o M). A CUDA-key kernel on these ops would shadow the reference for
#   every CUDA tensor, which is why the CUDA kernels live on the separate kernel ops.
# --------------------------------------------------------------------------------------------

torch.library.define(
    "fastkd::masked_mm",
    "(Tensor x, Tensor weight, Tensor mask, Tensor? bias, Tensor tile_map) -> Tensor",
)
torch.library.define(
    "fastkd::masked_mm_grad_input",
    "(Tensor grad_out, Tensor weight, Tensor mask, Tensor tile_map) -> Tensor",
)
torch.library.define(
    "fastkd::masked_mm_grad_weight",
    "(Tensor grad_out, Tensor x, Tensor mask, Tensor tile_map) -> Tensor",
)
torch.library.define(
    "fastkd::masked_linear",
    "(Tensor x, Tensor weight, Tensor mask, Tensor? bias, Tensor? tile_map, str backend) -> Tensor",
)
torch.library.define(
    "fastkd::masked_linear_grad_input",
    "(Tensor grad_out, Tensor weight, Tensor mask, Tensor? tile_map, str backend) -> Tensor",
)
torch.library.define(
    "fastkd::masked_linear_grad_weight",
    "(Tensor grad_out, Tensor x, Tensor mask, Tensor? tile_map, str backend) -> Tensor",
)


@torch.library.register_kernel("fastkd::masked_mm", None)
def _masked_mm_ref(x, weight, mask, bias, tile_map):
    return reference.masked_linear_forward(x, weight, mask, bias)


@torch.library.register_kernel("fastkd::masked_mm_grad_input", None)
def _masked_mm_grad_input_ref(grad_out, weight, mask, tile_map):
    return reference.masked_linear_grad_input(grad_out, weight, mask)


@torch.library.register_kernel("fastkd::masked_mm_grad_weight", None)
def _masked_mm_grad_weight_ref(grad_out, x, mask, tile_map):
    return reference.masked_linear_grad_weight(grad_out, x, mask)


def _need_tile_map(tile_map, op):
    if tile_map is None:
        raise ValueError(f"{op}: backend 'cuda' needs the mask's tile map (build_tile_map)")
    return tile_map


@torch.library.register_kernel("fastkd::masked_linear", None)
def _masked_linear_impl(x, weight, mask, bias, tile_map, backend):
    if backend == "cuda":
        tile_map = _need_tile_map(tile_map, "masked_linear")
        return torch.ops.fastkd.masked_mm(x, weight, mask, bias, tile_map)
    return reference.masked_linear_forward(x, weight, mask, bias)


@torch.library.register_kernel("fastkd::masked_linear_grad_input", None)
def _masked_linear_grad_input_impl(grad_out, weight, mask, tile_map, backend):
    if backend == "cuda":
        tile_map = _need_tile_map(tile_map, "masked_linear_grad_input")
        return torch.ops.fastkd.masked_mm_grad_input(grad_out, weight, mask, tile_map)
    return reference.masked_linear_grad_input(grad_out, weight, mask)


@torch.library.register_kernel("fastkd::masked_linear_grad_weight", None)
def _masked_linear_grad_weight_impl(grad_out, x, mask, tile_map, backend):
    if backend == "cuda":
        tile_map = _need_tile_map(tile_map, "masked_linear_grad_weight")
        return torch.ops.fastkd.masked_mm_grad_weight(grad_out, x, mask, tile_map)
    return reference.masked_linear_grad_weight(grad_out, x, mask)


def _masked_fwd_fake(x, weight, *_args):
    return x.new_empty((x.shape[0], weight.shape[0]))


def _masked_grad_input_fake(grad_out, weight, *_args):
    return grad_out.new_empty((grad_out.shape[0], weight.shape[1]))


def _masked_grad_weight_fake(grad_out, x, *_args):
    return grad_out.new_empty((grad_out.shape[1], x.shape[1]))


for _name, _fake in (
    ("masked_mm", _masked_fwd_fake),
    ("masked_linear", _masked_fwd_fake),
    ("masked_mm_grad_input", _masked_grad_input_fake),
    ("masked_linear_grad_input", _masked_grad_input_fake),
    ("masked_mm_grad_weight", _masked_grad_weight_fake),
    ("masked_linear_grad_weight", _masked_grad_weight_fake),
):
    torch.library.register_fake(f"fastkd::{_name}", _fake)


def _masked_linear_setup_context(ctx, inputs, output):
    x, weight, mask, bias, tile_map, backend = inputs
    ctx.save_for_backward(x, weight, mask, tile_map)
    ctx.backend = backend
    ctx.has_bias = bias is not None


def _masked_linear_autograd_backward(ctx, grad_out):
    x, weight, mask, tile_map = ctx.saved_tensors
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.fastkd.masked_linear_grad_input(
            grad_out, weight, mask, tile_map, ctx.backend
        )
    if ctx.needs_input_grad[1]:
        grad_w = torch.ops.fastkd.masked_linear_grad_weight(
            grad_out, x, mask, tile_map, ctx.backend
        )
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_b = grad_out.sum(0)
    return grad_x, grad_w, None, grad_b, None, None


torch.library.register_autograd(
    "fastkd::masked_linear",
    _masked_linear_autograd_backward,
    setup_context=_masked_linear_setup_context,
)
