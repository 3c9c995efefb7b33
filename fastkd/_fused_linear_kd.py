"""Fused linear KD: lm-head matmuls + KD loss, chunked over rows, never holding N x V logits.

Exported as ``fastkd.functional.fused_linear_kd_loss`` and (through fastkd.nn)
``fastkd.nn.FusedLinearKDLoss``.

Design. For each chunk of ``chunk_rows`` rows: the student and teacher logits of the chunk are two
matmuls; the fused KD kernel (``fastkd::kd_loss_forward``) gives the per-row losses and statistics and
``fastkd::kd_loss_backward`` the logit gradient of the chunk, which is turned at once into the
chunk's hidden-state gradient (``dlogits @ W``) and accumulated into the weight and bias gradients
(``W_grad += dlogits^T @ h``). The chunk's logits are then dropped, so the extra memory is
three ``chunk_rows x V`` buffers plus the gradients themselves.

For ``reduction="mean"``/``"sum"`` the gradients are computed during the forward (the loss is a
scalar, so the backward only rescales them by the incoming gradient): one pass, no recomputation.
For ``reduction="none"`` the per-row weights arrive only in the backward, which recomputes the
chunk logits (two extra matmuls per chunk).

The weight gradient is accumulated in fp32 for fp32 weights; for fp16/bf16 weights it is
accumulated in place in the weight's dtype (``addmm_``, fp32 inside each matmul) so that no fp32
``V x H`` buffer is added to the peak.

torch.compile: the chunk loops are the bodies of two custom ops, ``fastkd::fused_linear_kd_forward``
and ``fastkd::fused_linear_kd_backward`` (fastkd/_ops.py), under a ``torch.autograd.Function``, so
``torch.compile(fullgraph=True)`` traces one opaque call without a graph break, and a step with a
dynamic row count compiles once for every N. (The loop used to be unrolled at trace time, which
specialised the compiled step on N: one compilation per distinct batch length.)
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from ._validate import (
    check_class_target,
    check_float_dtype,
    check_int,
    check_number,
    check_reduction,
    check_same_device,
    check_tensor,
    check_temperature,
    refuse_create_graph,
)

# Logits per chunk: 128M (256 MiB per bf16 buffer; 1046 rows of a 128256 vocabulary). Each chunk
# reads and writes the whole V x H weight gradient once (addmm_ into it), so small chunks cost
# bandwidth: at 32M (261 rows) the fused step took 1.48x its matmuls on the H200 (N = 4096,
# H = 4096, V = 128256), 16 read-modify-writes of a 1 GB gradient; 4 at this size.
_CHUNK_ELEMENTS = 1 << 27


def default_chunk_rows(n_rows: int, n_classes: int) -> int:
    return max(1, min(n_rows, _CHUNK_ELEMENTS // max(n_classes, 1)))


def _logits(h: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    return h @ w.t() if b is None else torch.addmm(b, h, w.t())


def _chunk(sh, sw, sb, th, tw, tb, target, r0, r1):
    """Rows r0:r1: (student hidden, student logits, teacher logits, target or None)."""
    h = sh[r0:r1]
    tgt = None if target is None else target[r0:r1]
    return h, _logits(h, sw, sb), _logits(th[r0:r1], tw, tb), tgt


def _accumulate(dlog, h, sw, r0, r1, grad_h, grad_w, grad_b, need_h, need_w, need_b):
    """Turn a chunk's logit gradient into the hidden-state gradient of its rows and add it to
    the weight and bias gradients (in place: addmm_ where the dtypes agree)."""
    if need_h:
        grad_h[r0:r1] = dlog @ sw
    if need_w:
        if grad_w.dtype == dlog.dtype:
            grad_w.addmm_(dlog.t(), h)
        else:
            grad_w.add_(dlog.t().float() @ h.float())
    if need_b:
        grad_b.add_(dlog.float().sum(0))


def forward_chunks(sh, sw, sb, th, tw, tb, target, row_scale, temperature, alpha, ignore_index,
                   backend, divergence, beta, chunk, need_h, need_w, need_b):
    """Row losses (N,) and, for the flags set, the gradients of their sum weighted by
    ``row_scale`` ((1,) fp32, or None for 1): d/d student_hidden (N, H), d/d student_weight (V,
    H, in the weight's dtype) and d/d student_bias (V,) fp32; an unset flag's gradient is an
    empty tensor. The body of ``fastkd::fused_linear_kd_forward`` (registered in
    fastkd/_ops.py). The weight goes in per row, before the sum: a mean's gradient summed
    unscaled over N rows and divided afterwards overflowed an fp16 weight gradient."""
    n_rows = sh.shape[0]
    chunk = chunk or default_chunk_rows(n_rows, sw.shape[0])
    kw = {"divergence": divergence, "beta": beta}
    grads = (sh.new_empty(sh.shape) if need_h else sh.new_empty(0),  # contiguous, as the fake
             torch.zeros(sw.shape if need_w else 0, dtype=sw.dtype, device=sw.device),
             torch.zeros(sw.shape[0] if need_b else 0, dtype=torch.float32, device=sw.device))
    rows_out = torch.empty(n_rows, dtype=torch.float32, device=sh.device)
    for r0 in range(0, n_rows, chunk):
        r1 = min(n_rows, r0 + chunk)
        h, s_log, t_log, tgt = _chunk(sh, sw, sb, th, tw, tb, target, r0, r1)
        rows, stats = torch.ops.fastkd.kd_loss_forward(
            s_log, t_log, tgt, temperature, alpha, ignore_index, backend, **kw
        )
        rows_out[r0:r1] = rows
        if need_h or need_w or need_b:
            # gradients of sum(row_scale * rows); the backward multiplies by the upstream one
            g_rows = (torch.ones(1, dtype=torch.float32, device=sh.device) if row_scale is None
                      else row_scale.float().reshape(1)).expand(r1 - r0)
            dlog = torch.ops.fastkd.kd_loss_backward(
                g_rows, s_log, t_log, tgt, stats, temperature, alpha, ignore_index, backend, **kw,
            )
            del s_log, t_log
            _accumulate(dlog, h, sw, r0, r1, *grads, need_h, need_w, need_b)
    return (rows_out, *grads)


def backward_chunks(grad_rows, sh, sw, sb, th, tw, tb, target, temperature, alpha, ignore_index,
                    backend, divergence, beta, chunk, need_h, need_w, need_b):
    """Gradients of ``sum(grad_rows * rows)`` for per-row weights (``reduction="none"``): the
    chunk logits are computed again. (N, H), (V, H) in the weight's dtype (accumulated in it, as
    the forward does, so no fp32 V x H buffer), (V,) fp32; empty where a flag is unset. The body
    of ``fastkd::fused_linear_kd_backward``."""
    n_rows = sh.shape[0]
    chunk = chunk or default_chunk_rows(n_rows, sw.shape[0])
    kw = {"divergence": divergence, "beta": beta}
    grads = (sh.new_empty(sh.shape) if need_h else sh.new_empty(0),  # contiguous, as the fake
             torch.zeros(sw.shape if need_w else 0, dtype=sw.dtype, device=sw.device),
             torch.zeros(sw.shape[0] if need_b else 0, dtype=torch.float32, device=sw.device))
    for r0 in range(0, n_rows, chunk):
        r1 = min(n_rows, r0 + chunk)
        h, s_log, t_log, tgt = _chunk(sh, sw, sb, th, tw, tb, target, r0, r1)
        _, stats = torch.ops.fastkd.kd_loss_forward(
            s_log, t_log, tgt, temperature, alpha, ignore_index, backend, **kw
        )
        dlog = torch.ops.fastkd.kd_loss_backward(
            grad_rows[r0:r1], s_log, t_log, tgt, stats, temperature, alpha, ignore_index,
            backend, **kw,
        )
        _accumulate(dlog, h, sw, r0, r1, *grads, need_h, need_w, need_b)
    return grads


class FusedLinearKDFunction(torch.autograd.Function):
    """Autograd around the two chunked ops. The chunk loops run inside the ops, so a compiled
    step sees one opaque call whatever N is (no unrolled loop to specialise on it)."""

    @staticmethod
    def forward(ctx, sh, sw, sb, th, tw, tb, target, row_scale, cfg):
        # cfg: (temperature, alpha, ignore_index, backend, divergence, beta, chunk, precompute)
        # With precompute, the rows come back weighted by row_scale (their sum is the loss) and
        # the forward computes the gradients of that sum; the backward scales them by the
        # upstream gradient, which is then the same for every row.
        precompute = cfg[-1]
        op_args = (*cfg[:-1],)
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                sb is not None and ctx.needs_input_grad[2])
        grads = need if precompute else (False, False, False)
        rows, grad_sh, grad_sw, grad_sb = torch.ops.fastkd.fused_linear_kd_forward(
            sh, sw, sb, th, tw, tb, target, row_scale if precompute else None, *op_args, *grads
        )
        if precompute:
            rows = rows * row_scale
        ctx.cfg = cfg
        ctx.need = need
        ctx.w_dtype = sw.dtype
        ctx.b_dtype = None if sb is None else sb.dtype
        if precompute:
            ctx.save_for_backward(grad_sh, grad_sw, grad_sb)
        else:
            ctx.save_for_backward(sh, sw, sb, th, tw, tb, target)
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        refuse_create_graph("fused_linear_kd_loss", "its gradients come from the chunk loops "
                            "(compute such a term from the lm-head products with a plain torch "
                            "loss)")
        precompute = ctx.cfg[-1]
        need_h, need_w, need_b = ctx.need
        if precompute:
            # The loss is the sum of the rows (weighted by row_scale in the forward, as the
            # precomputed gradients are): every row's incoming gradient is equal.
            # They are scaled in place and handed over: a scaled copy of the V x H weight gradient
            # was the largest buffer of the whole step (1 GB for a 128k x 4096 head, measured on
            # the H200 as twice the unfused path's extra memory at N = 1024). The price: a second
            # backward through the same graph cannot reuse them.
            if getattr(ctx, "grads_handed_over", False):
                raise RuntimeError(
                    "fused_linear_kd_loss computes its gradients in the forward and hands them over "
                    "in the first backward; a second backward through the same graph "
                    "(retain_graph=True) is not supported: compute the loss again"
                )
            ctx.grads_handed_over = True
            grad_sh, grad_sw, grad_sb = ctx.saved_tensors
            g = grad_rows[0] if grad_rows.numel() else grad_rows.sum()
            out_h = grad_sh.mul_(g.to(grad_sh.dtype)) if need_h else None
            out_w = grad_sw.mul_(g).to(ctx.w_dtype) if need_w else None
            out_b = grad_sb.mul_(g) if need_b else None
        else:
            sh, sw, sb, th, tw, tb, target = ctx.saved_tensors
            out_h, out_w, out_b = torch.ops.fastkd.fused_linear_kd_backward(
                grad_rows, sh, sw, sb, th, tw, tb, target, *ctx.cfg[:-1], *ctx.need
            )
            out_h = out_h if need_h else None
            out_w = out_w if need_w else None
            out_b = out_b if need_b else None
        if out_b is not None:
            out_b = out_b.to(ctx.b_dtype)
        return out_h, out_w, out_b, None, None, None, None, None, None


def fused_linear_kd_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    target: Optional[Tensor] = None,
    *,
    student_bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    alpha: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "mean",
    divergence: str = "kl",
    beta: float = 0.5,
    chunk_rows: Optional[int] = None,
    backend: str = "auto",
) -> Tensor:
    r"""``kd_loss(student_hidden @ student_weight.T + student_bias,
    teacher_hidden @ teacher_weight.T + teacher_bias, target, ...)`` without the ``N x V`` logits.

    Args:
        student_hidden: ``(..., H_s)`` fp32/fp16/bf16; receives a gradient.
        student_weight: ``(V, H_s)`` (an lm-head ``nn.Linear.weight``); receives a gradient.
        teacher_hidden: ``(..., H_t)`` with the student's leading shape; ``H_t`` may differ.
        teacher_weight: ``(V, H_t)``. Teacher tensors are constants (detached).
        target: optional ``(...)`` class indices or ``ignore_index``.
        student_bias, teacher_bias: optional ``(V,)``.
        temperature, alpha, ignore_index, reduction, divergence, beta, backend: as in
            :func:`fastkd.functional.kd_loss`.
        chunk_rows: rows per chunk (default: about 128M logits per chunk). Extra memory is about
            three ``chunk_rows x V`` buffers in the logits' dtype.

    Returns:
        fp32 loss (scalar, or ``(...)`` with ``reduction="none"``), equal within rounding to the
        unfused lm-head + ``kd_loss``. The logits are computed in the hidden states' dtype; inside
        ``torch.autocast`` hidden states, weights and biases are cast to the autocast dtype first,
        as the lm-head ``F.linear`` would be (gradients reach fp32 weights in fp32).
    """
    from .functional import (KD_LOSS_BACKENDS, _autocast_dtype, check_divergence,
                             computed_divergence)

    for x, name in ((student_hidden, "student_hidden"), (student_weight, "student_weight"),
                    (teacher_hidden, "teacher_hidden"), (teacher_weight, "teacher_weight")):
        check_tensor(x, name)
        check_float_dtype(x, name)
        check_same_device(student_hidden, x, "student_hidden", name)
    low = _autocast_dtype(student_hidden)
    if low is not None:
        student_hidden, student_weight = student_hidden.to(low), student_weight.to(low)
        teacher_hidden, teacher_weight = teacher_hidden.to(low), teacher_weight.to(low)
        student_bias, teacher_bias = (
            b.to(low) if isinstance(b, Tensor) and b.is_floating_point() else b
            for b in (student_bias, teacher_bias)
        )
    if student_hidden.dim() < 1 or teacher_hidden.dim() < 1:
        raise ValueError("hidden states need at least one dimension (the features)")
    if student_weight.dim() != 2 or teacher_weight.dim() != 2:
        raise ValueError("student_weight and teacher_weight must be (V, H) matrices")
    n_classes = student_weight.shape[0]
    if teacher_weight.shape[0] != n_classes:
        raise ValueError(
            f"student_weight has {n_classes} classes but teacher_weight {teacher_weight.shape[0]}"
        )
    if n_classes == 0:
        raise ValueError("the lm-head weights need at least one class")
    if student_hidden.shape[-1] != student_weight.shape[1]:
        raise ValueError(
            f"student_hidden features {student_hidden.shape[-1]} != student_weight "
            f"{tuple(student_weight.shape)}[1]"
        )
    if teacher_hidden.shape[-1] != teacher_weight.shape[1]:
        raise ValueError(
            f"teacher_hidden features {teacher_hidden.shape[-1]} != teacher_weight "
            f"{tuple(teacher_weight.shape)}[1]"
        )
    lead = student_hidden.shape[:-1]
    if teacher_hidden.shape[:-1] != lead:
        raise ValueError(
            f"teacher_hidden {tuple(teacher_hidden.shape)} must have the student's leading shape "
            f"{tuple(lead)}"
        )
    if student_hidden.dtype != student_weight.dtype or teacher_hidden.dtype != teacher_weight.dtype:
        raise TypeError("each hidden state must have the dtype of its weight (one matmul dtype)")
    for b, name, w in ((student_bias, "student_bias", student_weight),
                       (teacher_bias, "teacher_bias", teacher_weight)):
        if b is not None:
            check_tensor(b, name)
            if tuple(b.shape) != (n_classes,):
                raise ValueError(f"{name} must have shape ({n_classes},), got {tuple(b.shape)}")
            if b.dtype != w.dtype:
                raise TypeError(f"{name} must have its weight's dtype {w.dtype}, got {b.dtype}")
            check_same_device(student_hidden, b, "student_hidden", name)
    temperature = check_temperature(temperature)
    alpha = check_number(alpha, "alpha", low=0.0, high=1.0)
    ignore_index = check_int(ignore_index, "ignore_index")
    reduction = check_reduction(reduction)
    divergence, beta = check_divergence(divergence, beta)
    divergence = computed_divergence(divergence, beta)
    sh = student_hidden.reshape(-1, student_hidden.shape[-1])
    th = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    n_rows = sh.shape[0]
    if chunk_rows is None:
        chunk_rows = 0  # the ops pick default_chunk_rows(N, V) from the concrete N
    elif isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
    if target is not None:
        target = check_class_target(target, lead, student_hidden, "student_hidden", n_classes,
                                    ignore_index)
    impl = KD_LOSS_BACKENDS.select(backend, student_hidden.device)

    if reduction == "mean":
        if target is None:
            scale = torch.full((1,), 1.0 / max(n_rows, 1), device=sh.device)
        else:
            scale = 1.0 / (target != ignore_index).sum().clamp_min(1).float().reshape(1)
    else:
        scale = torch.ones(1, device=sh.device)
    precompute = reduction != "none"
    cfg = (temperature, alpha, ignore_index, impl, divergence, beta, chunk_rows, precompute)
    # Inputs are in their compute dtype now (cast above under autocast): nothing inside is recast.
    # (Entered only under autocast: an unconditional autocast region left a node strict
    # torch.export could not save.)
    with (torch.autocast(sh.device.type, enabled=False)
          if torch.is_autocast_enabled(sh.device.type) else contextlib.nullcontext()):
        rows = FusedLinearKDFunction.apply(
            sh, student_weight, student_bias, th, teacher_weight.detach(),
            None if teacher_bias is None else teacher_bias.detach(), target, scale, cfg,
        )
    if reduction == "none":
        return rows.reshape(lead)
    # The Function weighted the rows by scale and precomputed the gradients of their sum.
    return rows.sum()


__all__ = ["fused_linear_kd_loss", "FusedLinearKDFunction"]
