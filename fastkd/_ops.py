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
#                   *, divergence="kl", beta=0.5)
#     -> (row_loss (N,) fp32, row_stats (N,3) fp32; (N,4) for divergences other than "kl")
#   kd_loss_backward(grad_rows (N,), student, teacher, target?, row_stats, T, alpha,
#                    ignore_index, backend, *, divergence="kl", beta=0.5)
#     -> grad_student (N,V) in the student dtype
# --------------------------------------------------------------------------------------------

torch.library.define(
    "fastkd::kd_loss_forward",
    "(Tensor student, Tensor teacher, Tensor? target, float temperature, float alpha, "
    "int ignore_index, str backend, *, str divergence=\"kl\", float beta=0.5) -> (Tensor, Tensor)",
)
torch.library.define(
    "fastkd::kd_loss_backward",
    "(Tensor grad_rows, Tensor student, Tensor teacher, Tensor? target, Tensor row_stats, "
    "float temperature, float alpha, int ignore_index, str backend, *, str divergence=\"kl\", "
    "float beta=0.5) -> Tensor",
)


def _unit_stride(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


@torch.library.register_kernel("fastkd::kd_loss_forward", None)
def _kd_loss_forward(
    student, teacher, target, temperature, alpha, ignore_index, backend, *, divergence="kl", beta=0.5
):
    impl = _kernels("kd_loss") if backend == "triton" else reference
    return impl.kd_loss_forward(
        _unit_stride(student),
        _unit_stride(teacher),
        target,
        temperature,
        alpha,
        ignore_index,
        divergence=divergence,
        beta=beta,
    )


@torch.library.register_kernel("fastkd::kd_loss_backward", None)
def _kd_loss_backward(
    grad_rows,
    student,
    teacher,
    target,
    row_stats,
    temperature,
    alpha,
    ignore_index,
    backend,
    *,
    divergence="kl",
    beta=0.5,
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
        divergence=divergence,
        beta=beta,
    )


@torch.library.register_fake("fastkd::kd_loss_forward")
def _kd_loss_forward_fake(
    student, teacher, target, temperature, alpha, ignore_index, backend, *, divergence="kl", beta=0.5
):
    n = student.shape[0]
    return (
        student.new_empty((n,), dtype=torch.float32),
        student.new_empty((n, reference.kd_loss_n_stats(divergence)), dtype=torch.float32),
    )


@torch.library.register_fake("fastkd::kd_loss_backward")
def _kd_loss_backward_fake(
    grad_rows,
    student,
    teacher,
    target,
    row_stats,
    temperature,
    alpha,
    ignore_index,
    backend,
    *,
    divergence="kl",
    beta=0.5,
):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


def _kd_loss_setup_context(ctx, inputs, keyword_only_inputs, output):
    student, teacher, target, temperature, alpha, ignore_index, backend = inputs
    _, row_stats = output
    ctx.save_for_backward(student, teacher, target, row_stats)
    ctx.args = (temperature, alpha, ignore_index, backend)
    ctx.kwargs = {
        "divergence": keyword_only_inputs.get("divergence", "kl"),
        "beta": keyword_only_inputs.get("beta", 0.5),
    }


def _kd_loss_autograd_backward(ctx, grad_rows, _grad_stats):
    student, teacher, target, row_stats = ctx.saved_tensors
    grad_student = None
    if ctx.needs_input_grad[0]:
        grad_student = torch.ops.fastkd.kd_loss_backward(
            grad_rows, student, teacher, target, row_stats, *ctx.args, **ctx.kwargs
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
    divergence: str = "kl",
    beta: float = 0.5,
) -> Tensor:
    """Per-row KD loss through the dispatcher (autograd reaches the student only)."""
    if divergence == "kl":  # the original call, unchanged
        rows, _ = torch.ops.fastkd.kd_loss_forward(
            student, teacher, target, temperature, alpha, ignore_index, backend
        )
        return rows
    rows, _ = torch.ops.fastkd.kd_loss_forward(
        student,
        teacher,
        target,
        temperature,
        alpha,
        ignore_index,
        backend,
        divergence=divergence,
        beta=beta,
    )
    return rows


# --------------------------------------------------------------------------------------------
# KD loss against a top-k teacher
#   kd_loss_topk_forward(student (N,V), ids (N,k) int64, logprobs (N,k) fp32, target (N,)?, T,
#                        alpha, ignore_index, backend) -> (row_loss (N,) fp32, row_stats (N,4) fp32)
#   kd_loss_topk_backward(grad_rows (N,), student, ids, logprobs, target?, row_stats, T, alpha,
#                         ignore_index, backend) -> grad_student (N,V) in the student dtype
# --------------------------------------------------------------------------------------------

torch.library.define(
    "fastkd::kd_loss_topk_forward",
    "(Tensor student, Tensor ids, Tensor logprobs, Tensor? target, float temperature, "
    "float alpha, int ignore_index, str backend) -> (Tensor, Tensor)",
)
torch.library.define(
    "fastkd::kd_loss_topk_backward",
    "(Tensor grad_rows, Tensor student, Tensor ids, Tensor logprobs, Tensor? target, "
    "Tensor row_stats, float temperature, float alpha, int ignore_index, str backend) -> Tensor",
)


@torch.library.register_kernel("fastkd::kd_loss_topk_forward", None)
def _kd_loss_topk_forward(student, ids, logprobs, target, temperature, alpha, ignore_index, backend):
    impl = _kernels("kd_topk") if backend == "triton" else reference
    return impl.kd_loss_topk_forward(
        _unit_stride(student), _unit_stride(ids), _unit_stride(logprobs), target, temperature,
        alpha, ignore_index,
    )


@torch.library.register_kernel("fastkd::kd_loss_topk_backward", None)
def _kd_loss_topk_backward(
    grad_rows, student, ids, logprobs, target, row_stats, temperature, alpha, ignore_index, backend
):
    impl = _kernels("kd_topk") if backend == "triton" else reference
    return impl.kd_loss_topk_backward(
        grad_rows, _unit_stride(student), _unit_stride(ids), _unit_stride(logprobs), target,
        row_stats, temperature, alpha, ignore_index,
    )


@torch.library.register_fake("fastkd::kd_loss_topk_forward")
def _kd_loss_topk_forward_fake(
    student, ids, logprobs, target, temperature, alpha, ignore_index, backend
):
    n = student.shape[0]
    return (
        student.new_empty((n,), dtype=torch.float32),
        student.new_empty((n, 4), dtype=torch.float32),
    )


@torch.library.register_fake("fastkd::kd_loss_topk_backward")
def _kd_loss_topk_backward_fake(
    grad_rows, student, ids, logprobs, target, row_stats, temperature, alpha, ignore_index, backend
):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


def _kd_loss_topk_setup_context(ctx, inputs, output):
    student, ids, logprobs, target, temperature, alpha, ignore_index, backend = inputs
    ctx.save_for_backward(student, ids, logprobs, target, output[1])
    ctx.args = (temperature, alpha, ignore_index, backend)


def _kd_loss_topk_autograd_backward(ctx, grad_rows, _grad_stats):
    student, ids, logprobs, target, row_stats = ctx.saved_tensors
    grad_student = None
    if ctx.needs_input_grad[0]:
        grad_student = torch.ops.fastkd.kd_loss_topk_backward(
            grad_rows, student, ids, logprobs, target, row_stats, *ctx.args
        )
    return grad_student, None, None, None, None, None, None, None


torch.library.register_autograd(
    "fastkd::kd_loss_topk_forward",
    _kd_loss_topk_autograd_backward,
    setup_context=_kd_loss_topk_setup_context,
)
