"""The fastkd op contract: every ``torch.library`` schema (namespace ``fastkd``), its fake kernel,
its autograd rule, and the device-independent implementation that dispatches on the resolved
backend string.

The ops exist whether or not ``fastkd._C`` was built: C++ only adds CUDA implementations with
``TORCH_LIBRARY_IMPL(fastkd, CUDA, m)``. The Python implementations are registered for every device
("default"), so a CPU tensor or a missing extension falls back to the reference with no special code.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import weakref
from typing import Optional

import torch
from torch import Tensor

from . import reference
from .reference import int8_linear as _int8_reference
from .reference.masked_linear import tile_map_layout

NAMESPACE = "fastkd"


_KERNEL_MODULES: dict = {}


def _kernels(family: str):
    """Import a Triton kernel module lazily (triton is optional on the CPU path), once."""
    module = _KERNEL_MODULES.get(family)
    if module is None:
        import importlib

        module = _KERNEL_MODULES[family] = importlib.import_module(f"fastkd.kernels.{family}")
    return module


# --------------------------------------------------------------------------------------------
# Autograd registration
# --------------------------------------------------------------------------------------------

# One library fragment holds our Autograd-key kernels (torch.library.define keeps its own).
_AUTOGRAD_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")


def _any_requires_grad(args) -> bool:
    return any(isinstance(a, Tensor) and a.requires_grad for a in args)


def register_autograd(qualname: str, backward, setup_context) -> None:
    """``torch.library.register_autograd`` with the same contract and less work per call.

    torch's version rebuilds the argument list from the op's schema on every call that needs a
    gradient (``torch._library.utils.fill_defaults`` walks ``schema.arguments``, which pybind
    rebuilds on each access: ~50 us per call for a 9-argument schema on a 2-core CPU, more than
    the rest of the wrapper). The schema's defaults are read here once instead. The mechanism is
    torch's own: an Autograd-key kernel that runs an ``autograd.Function`` whose forward
    redispatches below autograd, so eager, ``opcheck`` and ``torch.compile`` see the same op.
    ``setup_context(ctx, inputs, [keyword_only_inputs,] output)`` gets every positional input and
    every keyword-only one (defaults filled in, as the dispatcher may drop them);
    ``backward(ctx, *grads)`` returns one gradient per positional input.
    """
    namespace, name = qualname.split("::")
    op = getattr(getattr(torch.ops, namespace), name).default
    arguments = op._schema.arguments
    positional_defaults = tuple(a.default_value for a in arguments if not a.kwarg_only)
    keyword_defaults = {a.name: a.default_value for a in arguments if a.kwarg_only}
    has_keyword_only = bool(keyword_defaults)
    after_autograd = torch._C._after_autograd_keyset

    class _Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            *args, (keyset, kwargs) = args
            with torch._C._AutoDispatchBelowAutograd():
                out = op.redispatch(keyset & after_autograd, *args, **kwargs)
            inputs = (*args, *positional_defaults[len(args):])
            ctx.n_inputs = len(args)
            if has_keyword_only:
                setup_context(ctx, inputs, {**keyword_defaults, **kwargs}, out)
            else:
                setup_context(ctx, inputs, out)
            return out

        @staticmethod
        def backward(ctx, *grads):
            # as the ops themselves: no autocast recasting of the rules' explicit fp32 math (a
            # backward run, or traced by torch.compile, inside torch.autocast computed the
            # shared linear's codebook gradient in bf16)
            if _autocast_on():
                with torch._C._DisableAutocast():
                    grads_in = backward(ctx, *grads)
            else:
                grads_in = backward(ctx, *grads)
            if not isinstance(grads_in, tuple):
                grads_in = (grads_in,)
            return (*grads_in[: ctx.n_inputs], None)  # None: the (keyset, kwargs) slot

    _Function.__name__ = f"{name}_autograd"

    def autograd_kernel(keyset, *args, **kwargs):
        if torch.is_grad_enabled() and _any_requires_grad(args):
            return _Function.apply(*args, (keyset, kwargs))
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & after_autograd, *args, **kwargs)

    _AUTOGRAD_LIB.impl(name, autograd_kernel, "Autograd", with_keyset=True)


def no_double_backward(qualname: str, what: str) -> None:
    """Give a backward-only op an autograd kernel whose own backward raises: without one, a
    gradient taken with ``create_graph=True`` and differentiated again went through torch's
    fallback (one generic warning) and came out wrong (the Triton kernels' as zeros, the
    reference's with its saved statistics held constant). First-order backward with
    ``create_graph=True`` still works; only the second differentiation raises, naming the op."""
    refuse_backward(qualname, (
        f"{what} has no second derivative: differentiating a gradient taken with "
        "create_graph=True (a gradient penalty, Hessian-vector products) is not supported "
        "through it"))


def refuse_backward(qualname: str, message: str) -> None:
    """An autograd kernel for an op that is not differentiated through: it runs as usual, and a
    backward that reaches it raises ``message``. Without one, eager autograd differentiated the
    Python implementation's aten ops (a meaningless gradient) while a compiled call gave none."""
    namespace, name = qualname.split("::")
    op = getattr(getattr(torch.ops, namespace), name).default
    after_autograd = torch._C._after_autograd_keyset

    class _Refuse(torch.autograd.Function):
        @staticmethod
        def forward(ctx, keyset, kwargs, *args):
            with torch._C._AutoDispatchBelowAutograd():
                out = op.redispatch(keyset & after_autograd, *args, **kwargs)
            # a Tensor[] result as a tuple: autograd.Function attaches no graph to a list
            return tuple(out) if isinstance(out, list) else out

        @staticmethod
        def backward(ctx, *grads):
            raise RuntimeError(message)

    _Refuse.__name__ = f"{name}_refuse_backward"

    def autograd_kernel(keyset, *args, **kwargs):
        if torch.is_grad_enabled() and _any_requires_grad(args):
            return _Refuse.apply(keyset, kwargs, *args)
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & after_autograd, *args, **kwargs)

    _AUTOGRAD_LIB.impl(name, autograd_kernel, "Autograd", with_keyset=True)


# --------------------------------------------------------------------------------------------
# Eager calls without the dispatcher hop
# --------------------------------------------------------------------------------------------

# The Python implementation of each public op that has no kernel but the one registered here
# for every device (ops with CUDA C++ kernels are never called directly).
_DIRECT: dict = {}


_autocast_on = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def _without_autocast(fn):
    """``fn`` run with autocast off. A custom op's Python implementation sits below the
    dispatcher's autocast layer, but the aten ops it calls would be cast again by an enclosing
    ``torch.autocast``: the int8 reference's exact fp32 products would run in bf16, and outputs
    would change dtype. Each op computes in the dtypes it is given; the public functions apply
    autocast's casts to their inputs first, as ``F.linear`` does."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if _autocast_on():
            with torch._C._DisableAutocast():
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return run


def _kernel(qualname: str):
    """``torch.library.register_kernel(qualname, None)`` (every device), run without autocast."""

    def decorate(fn):
        wrapped = _without_autocast(fn)
        torch.library.register_kernel(qualname, None, wrapped)
        return wrapped

    return decorate


def _impl(name: str):
    """Register `fn` as fastkd::name's implementation on every device and keep it for `call`."""

    def decorate(fn):
        wrapped = _kernel(f"{NAMESPACE}::{name}")(fn)
        _DIRECT[name] = wrapped
        return wrapped

    return decorate


def _probe(name: str):
    fn = getattr(torch._C, name, None)
    return fn if fn is not None else (lambda: True)  # unknown: assume something is active


_dispatch_modes = _probe("_len_torch_dispatch_stack")
_function_modes = _probe("_len_torch_function_stack")
_functorch_active = _probe("_are_functorch_transforms_active")
_PLAIN_TYPES = (Tensor, torch.nn.Parameter)
_jit_tracing = _probe("_get_tracing_state")


def _nothing_intercepts(args) -> bool:
    """True when dispatching a call could do nothing but reach our own implementation: not
    tracing or compiling, no torch function or dispatch mode, no functorch transform, only
    plain tensors (no subclasses: fake, functional, DTensor...), and no gradient to record."""
    if torch.compiler.is_compiling() or _dispatch_modes() or _function_modes():
        return False
    if _jit_tracing():  # torch.jit.trace records dispatcher calls: a Triton launch it would miss
        return False
    if _functorch_active():
        return False
    grad = torch.is_grad_enabled()
    for a in args:
        if isinstance(a, Tensor):
            if type(a) not in _PLAIN_TYPES or (grad and a.requires_grad):
                return False
    return True


def call(name: str, *args):
    """Run fastkd::name on positional `args`.

    Through the dispatcher when anything could observe or transform the call (autograd,
    torch.compile, modes, tensor subclasses); otherwise the registered implementation is called
    directly, which is what the dispatcher would end up doing. On a decode-size layer the Python
    dispatch of a custom op is a large part of the call (~30 us of ~65 on a 2-core CPU, for an
    int8 linear whose kernels take ~10 us on a GPU), and inference calls need none of it.
    """
    if name in _DIRECT and _nothing_intercepts(args):
        return _DIRECT[name](*args)
    return getattr(torch.ops.fastkd, name).default(*args)


# --------------------------------------------------------------------------------------------
# KD loss
#   kd_loss_forward(student (N,V), teacher (N,V), target (N,)?, T, alpha, ignore_index, backend)
#                   *, divergence="kl", beta=0.5)
#     -> (row_loss (N,) fp32, row_stats (N,3) fp32; (N,4) for divergences other than "kl")
#   (student and teacher may also be (B,L,V), rows N = B*L: a sliced batch as a view, not a copy)
#   kd_loss_backward(grad_rows (N,), student, teacher, target?, row_stats, T, alpha,
#                    ignore_index, backend, *, divergence="kl", beta=0.5)
#     -> grad_student, the student's shape, contiguous, in the student dtype
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


# A (B, L, V) batch whose (L, V) blocks hold fewer logits than this is copied to rows for the
# reference instead: a call per block costs ~0.1 ms of Python and small ops, a copy of a small
# block less.
_MIN_REFERENCE_BLOCK = 1 << 20


def _row_blocks(*tensors: Tensor):
    """(first row, the (rows, V) block of each tensor) over same-shaped (N, V) or (B, L, V)
    logits: one block, or one (L, V) view per batch entry. The reference takes a sliced batch
    this way instead of copying it to rows (unless its blocks are small)."""
    x = tensors[0]
    if x.dim() == 2:
        yield 0, tensors
        return
    if x.shape[1] * x.shape[2] < _MIN_REFERENCE_BLOCK:
        yield 0, tuple(t.reshape(-1, t.shape[-1]) for t in tensors)
        return
    for b in range(x.shape[0]):
        yield b * x.shape[1], tuple(t[b] for t in tensors)


def _slice(t: Optional[Tensor], r0: int, r1: int) -> Optional[Tensor]:
    return None if t is None else t[r0:r1]


def _reference_forward(fn, logits: tuple, per_row: tuple, *settings, **kw):
    """``fn`` (a reference forward over (N, V) rows returning (row losses, row stats)) on the
    blocks of (N, V) or (B, L, V) ``logits``; ``per_row`` tensors (or None) hold one entry per
    row."""
    blocks = list(_row_blocks(*logits))
    if len(blocks) == 1:
        return fn(*(_unit_stride(x) for x in blocks[0][1]), *per_row, *settings, **kw)
    if not blocks:  # B = 0: no rows
        flat = tuple(x.reshape(-1, x.shape[-1]) for x in logits)
        return fn(*flat, *per_row, *settings, **kw)
    outs = [fn(*(_unit_stride(x) for x in blk), *(_slice(t, r0, r0 + blk[0].shape[0])
                                                   for t in per_row), *settings, **kw)
            for r0, blk in blocks]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def _reference_backward(fn, grad_rows, logits: tuple, per_row: tuple, *settings, **kw):
    """``fn`` (a reference backward over (N, V) rows) on the blocks of the logits: the student
    gradient, contiguous, of the student's shape."""
    student = logits[0]
    blocks = list(_row_blocks(*logits))
    if len(blocks) == 1:  # (N, V) rows (of a batch copied to rows, perhaps)
        return fn(grad_rows, *(_unit_stride(x) for x in blocks[0][1]), *per_row, *settings,
                  **kw).view(student.shape)
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    for b, (r0, blk) in enumerate(blocks):
        r1 = r0 + blk[0].shape[0]
        grad[b] = fn(
            grad_rows[r0:r1], *(_unit_stride(x) for x in blk),
            *(_slice(t, r0, r1) for t in per_row), *settings, **kw)
    return grad


def _n_rows(x: Tensor):
    n = 1
    for d in x.shape[:-1]:
        n = n * d
    return n


@_kernel("fastkd::kd_loss_forward")
def _kd_loss_forward(
    student, teacher, target, temperature, alpha, ignore_index, backend, *, divergence="kl", beta=0.5
):
    if backend != "triton":
        return _reference_forward(reference.kd_loss_forward, (student, teacher), (target,),
                                  temperature, alpha, ignore_index, divergence=divergence,
                                  beta=beta)
    return _kernels("kd_loss").kd_loss_forward(
        _unit_stride(student),
        _unit_stride(teacher),
        target,
        temperature,
        alpha,
        ignore_index,
        divergence=divergence,
        beta=beta,
    )


@_kernel("fastkd::kd_loss_backward")
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
    if backend == "triton":
        return _kernels("kd_loss").kd_loss_backward(
            grad_rows, _unit_stride(student), _unit_stride(teacher), target, row_stats,
            temperature, alpha, ignore_index, divergence=divergence, beta=beta,
        )
    # the stats are per row too: they travel with the target
    return _reference_backward(
        reference.kd_loss_backward, grad_rows, (student, teacher), (target, row_stats),
        temperature, alpha, ignore_index, divergence=divergence, beta=beta,
    )


@torch.library.register_fake("fastkd::kd_loss_forward")
def _kd_loss_forward_fake(
    student, teacher, target, temperature, alpha, ignore_index, backend, *, divergence="kl", beta=0.5
):
    n = _n_rows(student)
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


register_autograd(
    "fastkd::kd_loss_forward", _kd_loss_autograd_backward, setup_context=_kd_loss_setup_context
)
no_double_backward("fastkd::kd_loss_backward", "fastkd's KD loss (kd_loss, KDLoss)")


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
#   (student may also be (B,L,V), rows N = B*L, as for kd_loss_forward)
#   kd_loss_topk_backward(grad_rows (N,), student, ids, logprobs, target?, row_stats, T, alpha,
#                         ignore_index, backend) -> grad_student, the student's shape, contiguous
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


@_kernel("fastkd::kd_loss_topk_forward")
def _kd_loss_topk_forward(student, ids, logprobs, target, temperature, alpha, ignore_index, backend):
    if backend != "triton":
        return _reference_forward(reference.kd_loss_topk_forward, (student,),
                                  (_unit_stride(ids), _unit_stride(logprobs), target),
                                  temperature, alpha, ignore_index)
    return _kernels("kd_topk").kd_loss_topk_forward(
        _unit_stride(student), _unit_stride(ids), _unit_stride(logprobs), target, temperature,
        alpha, ignore_index,
    )


@_kernel("fastkd::kd_loss_topk_backward")
def _kd_loss_topk_backward(
    grad_rows, student, ids, logprobs, target, row_stats, temperature, alpha, ignore_index, backend
):
    if backend != "triton":
        return _reference_backward(
            reference.kd_loss_topk_backward, grad_rows, (student,),
            (_unit_stride(ids), _unit_stride(logprobs), target, row_stats), temperature, alpha,
            ignore_index,
        )
    return _kernels("kd_topk").kd_loss_topk_backward(
        grad_rows, _unit_stride(student), _unit_stride(ids), _unit_stride(logprobs), target,
        row_stats, temperature, alpha, ignore_index,
    )


@torch.library.register_fake("fastkd::kd_loss_topk_forward")
def _kd_loss_topk_forward_fake(
    student, ids, logprobs, target, temperature, alpha, ignore_index, backend
):
    n = _n_rows(student)
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


register_autograd(
    "fastkd::kd_loss_topk_forward",
    _kd_loss_topk_autograd_backward,
    setup_context=_kd_loss_topk_setup_context,
)
no_double_backward("fastkd::kd_loss_topk_backward", "fastkd's top-k KD loss (kd_loss_topk)")


# --------------------------------------------------------------------------------------------
# Top-k teacher (the offline store; fastkd/_topk.py holds the body)
#   teacher_topk(rows (N,V) or (B,L,V), k, temperature) -> (ids (N,k) int64, logprobs (N,k) fp32)
# One call whatever N: the chunk loop inside, traced, specialised compiled programs on N.
# --------------------------------------------------------------------------------------------

torch.library.define(
    "fastkd::teacher_topk", "(Tensor rows, int k, float temperature) -> (Tensor, Tensor)"
)


@_kernel("fastkd::teacher_topk")
def _teacher_topk(rows, k, temperature):
    from ._topk import topk_rows

    return topk_rows(rows, k, temperature)


@torch.library.register_fake("fastkd::teacher_topk")
def _teacher_topk_fake(rows, k, temperature):
    n = _n_rows(rows)
    return rows.new_empty((n, k), dtype=torch.long), rows.new_empty((n, k), dtype=torch.float32)


refuse_backward("fastkd::teacher_topk",
                "fastkd::teacher_topk has no derivative (it stores a teacher: top-k ids and "
                "their log-probabilities, computed without a gradient)")


# --------------------------------------------------------------------------------------------
# Fused linear KD: the chunk loops (bodies in fastkd/_fused_linear_kd.py; autograd there, in
# FusedLinearKDFunction, which calls these ops with requires-grad off)
#   fused_linear_kd_forward(sh (N,Hs), sw (V,Hs), sb (V,)?, th (N,Ht), tw (V,Ht), tb (V,)?,
#       target (N,)?, row_scale (1,)?, T, alpha, ignore_index, backend, divergence, beta,
#       chunk_rows (0: default), grad_h, grad_w, grad_b)
#     -> (rows (N,) fp32, d sum(row_scale * rows)/d sh (N,Hs), d/d sw (V,Hs) fp32 for fp32
#         weights else sw's dtype, d/d sb (V,) fp32); a gradient not asked for is an empty (0,)
#         tensor; no row_scale is 1 (the scale goes in before the sum: a mean's gradient summed
#         over N rows unscaled overflows an fp16 weight gradient)
#   fused_linear_kd_backward(grad_rows (N,), sh, sw, sb?, th, tw, tb?, target?, <the same
#       settings>) -> d sum(grad_rows * rows) / d (sh, sw in sw's dtype, sb fp32), empty if unasked
# One call whatever N, so a compiled step with a dynamic row count is not specialised on it.
# --------------------------------------------------------------------------------------------

_FLKD_SETTINGS = (
    "float temperature, float alpha, int ignore_index, str backend, str divergence, float beta, "
    "int chunk_rows, bool grad_h, bool grad_w, bool grad_b"
)
_FLKD_TENSORS = "Tensor sh, Tensor sw, Tensor? sb, Tensor th, Tensor tw, Tensor? tb, Tensor? target"
torch.library.define(
    "fastkd::fused_linear_kd_forward",
    f"({_FLKD_TENSORS}, Tensor? row_scale, {_FLKD_SETTINGS}) -> (Tensor, Tensor, Tensor, Tensor)",
)
torch.library.define(
    "fastkd::fused_linear_kd_backward",
    f"(Tensor grad_rows, {_FLKD_TENSORS}, {_FLKD_SETTINGS}) -> (Tensor, Tensor, Tensor)",
)


@_kernel("fastkd::fused_linear_kd_forward")
def _fused_linear_kd_forward(*args):
    from ._fused_linear_kd import forward_chunks

    return forward_chunks(*args)


@_kernel("fastkd::fused_linear_kd_backward")
def _fused_linear_kd_backward(*args):
    from ._fused_linear_kd import backward_chunks

    return backward_chunks(*args)


def _flkd_grad_fakes(sh, sw, grad_h, grad_w, grad_b, w_dtype):
    return (
        sh.new_empty(sh.shape if grad_h else 0),
        sw.new_empty(sw.shape if grad_w else 0, dtype=w_dtype),
        sw.new_empty(sw.shape[0] if grad_b else 0, dtype=torch.float32),
    )


@torch.library.register_fake("fastkd::fused_linear_kd_forward")
def _fused_linear_kd_forward_fake(sh, sw, sb, th, tw, tb, target, row_scale, temperature, alpha,
                                  ignore_index, backend, divergence, beta, chunk_rows, grad_h,
                                  grad_w, grad_b):
    w_dtype = torch.float32 if sw.dtype == torch.float32 else sw.dtype
    return (sh.new_empty(sh.shape[0], dtype=torch.float32),
            *_flkd_grad_fakes(sh, sw, grad_h, grad_w, grad_b, w_dtype))


@torch.library.register_fake("fastkd::fused_linear_kd_backward")
def _fused_linear_kd_backward_fake(grad_rows, sh, sw, sb, th, tw, tb, target, temperature, alpha,
                                   ignore_index, backend, divergence, beta, chunk_rows, grad_h,
                                   grad_w, grad_b):
    return _flkd_grad_fakes(sh, sw, grad_h, grad_w, grad_b, sw.dtype)


for _name in ("fused_linear_kd_forward", "fused_linear_kd_backward"):
    refuse_backward(f"fastkd::{_name}",
                    f"fastkd::{_name} computes gradients itself and is not differentiated "
                    "through: call fastkd.functional.fused_linear_kd_loss, whose autograd runs it")


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


@_impl("shared_linear")
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


register_autograd(
    "fastkd::shared_linear", _shared_linear_backward, setup_context=_shared_linear_setup_context
)


# --------------------------------------------------------------------------------------------
# Int8 linear (symmetric int8 weights with fp32 per-output-channel scales)
#   quantize_per_token(x (M,K) float, backend) -> (x_q (M,K) int8, x_scale (M,) fp32)
#   int8_mm_scaled(x_q (M,K) int8, x_scale (M,), weight (N,K) int8, weight_scale (N,), bias (N,)?,
#                  out_dtype, backend) -> (M,N) out_dtype, exact int32 accumulation
#   int8_linear_w8a8 / int8_linear_w8a16(x (M,K) float, weight (N,K) int8, weight_scale (N,) fp32,
#                  bias (N,)?, backend) -> (M,N) in x.dtype; w8a8 takes smooth (K,) fp32? too
#                  (SmoothQuant: x / smooth is what gets quantized, inside the quantization pass)
# Autograd (both linears): dX = (dY * weight_scale) @ float(weight), computed by the W8A16 op on the
# transposed int8 weight (no float weight copy; the scales normalised by their largest, which the
# op applies to the fp32 sum); for W8A8 this is the straight-through estimator of
# the activation rounding. d bias = sum of dY. The int8 weight and its scale get no gradient.
# --------------------------------------------------------------------------------------------

torch.library.define(
    "fastkd::quantize_per_token", "(Tensor x, str backend) -> (Tensor, Tensor)"
)
torch.library.define(
    "fastkd::int8_mm_scaled",
    "(Tensor x_q, Tensor x_scale, Tensor weight, Tensor weight_scale, Tensor? bias, "
    "ScalarType out_dtype, str backend) -> Tensor",
)
torch.library.define(
    "fastkd::int8_linear_w8a8",
    "(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias, str backend, "
    "Tensor? smooth=None) -> Tensor",
)
torch.library.define(
    "fastkd::int8_linear_w8a16",
    "(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias, str backend) -> Tensor",
)


def _int8_impl(backend: str):
    return _kernels("int8_linear") if backend == "triton" else _int8_reference


@_impl("quantize_per_token")
def _quantize_per_token(x, backend):
    return _int8_impl(backend).quantize_per_token(x)


@_kernel("fastkd::int8_mm_scaled")
def _int8_mm_scaled(x_q, x_scale, weight, weight_scale, bias, out_dtype, backend):
    return _int8_impl(backend).int8_mm_scaled(x_q, x_scale, weight, weight_scale, bias, out_dtype)


@_impl("int8_linear_w8a8")
def _int8_linear_w8a8(x, weight, weight_scale, bias, backend, smooth=None):
    return _int8_impl(backend).int8_linear_w8a8(x, weight, weight_scale, bias, smooth)


@_impl("int8_linear_w8a16")
def _int8_linear_w8a16(x, weight, weight_scale, bias, backend):
    return _int8_impl(backend).int8_linear_w8a16(x, weight, weight_scale, bias)


@torch.library.register_fake("fastkd::quantize_per_token")
def _quantize_per_token_fake(x, backend):
    m, k = x.shape
    return x.new_empty((m, k), dtype=torch.int8), x.new_empty((m,), dtype=torch.float32)


refuse_backward("fastkd::quantize_per_token",
                "fastkd::quantize_per_token has no derivative (it rounds to int8); the int8 "
                "linear ops carry the gradient of a quantized layer (int8_linear, Int8Linear)")


@torch.library.register_fake("fastkd::int8_mm_scaled")
def _int8_mm_scaled_fake(x_q, x_scale, weight, weight_scale, bias, out_dtype, backend):
    return x_q.new_empty((x_q.shape[0], weight.shape[0]), dtype=out_dtype)


@torch.library.register_fake("fastkd::int8_linear_w8a8")
def _int8_linear_w8a8_fake(x, weight, weight_scale, bias, backend, smooth=None):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.register_fake("fastkd::int8_linear_w8a16")
def _int8_linear_w8a16_fake(x, weight, weight_scale, bias, backend):
    return x.new_empty((x.shape[0], weight.shape[0]))


def _int8_linear_setup_context(ctx, inputs, output):
    x, weight, weight_scale, bias, backend, *smooth = inputs  # (w8a8 has the smoothing factors)
    ctx.n_inputs = len(inputs)
    ctx.save_for_backward(weight, weight_scale, smooth[0] if smooth else None)
    ctx.x_dtype = x.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.backend = backend


def _int8_linear_autograd_backward(ctx, grad_out):
    weight, weight_scale, smooth = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        # dX[m, k] = s_max * sum_n (dY[m, n] * s[n] / s_max) * q[n, k]: a W8A16 product with the
        # transposed codes (a strided view, not a copy), its per-column scale s_max applied to
        # the fp32 sum. The channel scales go in divided by their largest, so the product stays
        # at dY's magnitude in x's dtype: dY * s itself (s ~ amax|W| / 127, ~1e-3) fell below
        # fp16's normal range and lost most of its bits (grad_x 100x less accurate than an
        # fp16 F.linear's).
        scale = weight_scale.float()
        s_max = scale.abs().amax().clamp_min(torch.finfo(torch.float32).tiny) if scale.numel() \
            else torch.ones((), device=scale.device)
        g = (grad_out.float() * (scale / s_max)).to(ctx.x_dtype)
        columns = s_max.reshape(1).expand(weight.shape[1]).contiguous()
        grad_x = torch.ops.fastkd.int8_linear_w8a16(g, weight.t(), columns, None, ctx.backend)
        if smooth is not None:  # the product saw x / s
            grad_x = (grad_x.float() / smooth).to(ctx.x_dtype)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:
        grad_bias = grad_out.float().sum(0).to(ctx.bias_dtype)
    return (grad_x, None, None, grad_bias, None) + (None,) * (ctx.n_inputs - 5)


for _name in ("fastkd::int8_linear_w8a8", "fastkd::int8_linear_w8a16"):
    register_autograd(
        _name, _int8_linear_autograd_backward, setup_context=_int8_linear_setup_context
    )


def _int8_mm_scaled_setup_context(ctx, inputs, output):
    x_q, x_scale, weight, weight_scale, bias, out_dtype, backend = inputs
    ctx.bias_dtype = None if bias is None else bias.dtype


def _int8_mm_scaled_backward(ctx, grad_out):
    # the codes and scales are quantization results (no gradient through them); the bias
    # (a trainable expert bias) gets its own
    grad_bias = None
    if ctx.bias_dtype is not None and ctx.needs_input_grad[4]:
        grad_bias = grad_out.float().sum(0).to(ctx.bias_dtype)
    return None, None, None, None, grad_bias, None, None


register_autograd("fastkd::int8_mm_scaled", _int8_mm_scaled_backward,
                  setup_context=_int8_mm_scaled_setup_context)


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
#   string ("cuda" -> the kernel ops above, "triton" -> the block-sparse Triton kernels of
#   kernels/masked_linear.py, anything else -> the reference, i.e. dense F.linear / cuBLAS on
#   W o M). A CUDA-key kernel on these ops would shadow the reference for every CUDA tensor, which
#   is why the CUDA kernels live on the separate kernel ops.
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


@_kernel("fastkd::masked_mm")
def _masked_mm_ref(x, weight, mask, bias, tile_map):
    return reference.masked_linear_forward(x, weight, mask, bias)


@_kernel("fastkd::masked_mm_grad_input")
def _masked_mm_grad_input_ref(grad_out, weight, mask, tile_map):
    return reference.masked_linear_grad_input(grad_out, weight, mask)


@_kernel("fastkd::masked_mm_grad_weight")
def _masked_mm_grad_weight_ref(grad_out, x, mask, tile_map):
    return reference.masked_linear_grad_weight(grad_out, x, mask)


def _need_tile_map(tile_map, op, backend):
    if tile_map is None:
        raise ValueError(f"{op}: backend {backend!r} needs the mask's tile map (build_tile_map)")
    return tile_map


def _masked_triton(tile_map, mask, op):
    """The Triton kernels and the layout of this mask's tile map."""
    tile_map = _need_tile_map(tile_map, op, "triton")
    return _kernels("masked_linear"), tile_map, tile_map_layout(*mask.shape)


@_impl("masked_linear")
def _masked_linear_impl(x, weight, mask, bias, tile_map, backend):
    if backend == "cuda":
        tile_map = _need_tile_map(tile_map, "masked_linear", backend)
        return torch.ops.fastkd.masked_mm(x, weight, mask, bias, tile_map)
    if backend == "triton":
        kern, tile_map, layout = _masked_triton(tile_map, mask, "masked_linear")
        return kern.masked_linear_forward(x, weight, mask, bias, tile_map, layout)
    return reference.masked_linear_forward(x, weight, mask, bias)


@_kernel("fastkd::masked_linear_grad_input")
def _masked_linear_grad_input_impl(grad_out, weight, mask, tile_map, backend):
    if backend == "cuda":
        tile_map = _need_tile_map(tile_map, "masked_linear_grad_input", backend)
        return torch.ops.fastkd.masked_mm_grad_input(grad_out, weight, mask, tile_map)
    if backend == "triton":
        kern, tile_map, layout = _masked_triton(tile_map, mask, "masked_linear_grad_input")
        return kern.masked_linear_grad_input(grad_out, weight, mask, tile_map, layout)
    return reference.masked_linear_grad_input(grad_out, weight, mask)


@_kernel("fastkd::masked_linear_grad_weight")
def _masked_linear_grad_weight_impl(grad_out, x, mask, tile_map, backend):
    if backend == "cuda":
        tile_map = _need_tile_map(tile_map, "masked_linear_grad_weight", backend)
        return torch.ops.fastkd.masked_mm_grad_weight(grad_out, x, mask, tile_map)
    if backend == "triton":
        kern, tile_map, layout = _masked_triton(tile_map, mask, "masked_linear_grad_weight")
        return kern.masked_linear_grad_weight(grad_out, x, mask, tile_map, layout)
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


register_autograd(
    "fastkd::masked_linear",
    _masked_linear_autograd_backward,
    setup_context=_masked_linear_setup_context,
)
for _name in ("masked_linear_grad_input", "masked_linear_grad_weight"):
    no_double_backward(f"fastkd::{_name}", "fastkd's masked linear (MaskedLinear)")


# --------------------------------------------------------------------------------------------
# MoE experts under torch.compile (Int8Experts, MaskedExperts, SharedExperts)
#   stacked_experts(hidden (T,H), top_k_index (T,k), top_k_weights (T,k), state Tensor[],
#                   module (0-d int64, CPU), autocast_dtype ScalarType?) -> (T,H) contiguous,
#                   in hidden's dtype
#   stacked_experts_backward(grad_out (T,H), hidden, top_k_index, top_k_weights, state, module,
#                   autocast_dtype, needs bool[]) -> the gradients of hidden, top_k_weights and
#                   each state tensor, in that order, for those `needs` marks
# Eager runs an experts module's routing as a Python loop over the experts a batch reaches, with
# group sizes read on the host (bincount().tolist()): a graph cannot hold that, and Dynamo broke
# the graph there (fullgraph=True failed). Under torch.compile the module calls this op instead:
# one opaque node whose implementation runs that eager loop on the live module (`module` holds
# its key in _LIVE_EXPERTS: a tensor, not an int, so Dynamo does not specialise the graph on it
# and one graph serves every layer of a model compiled layer by layer) with its parameters and
# buffers taken from `state`, so the graph sees every tensor the experts read. Keys count up and
# are never reused within a process. `autocast_dtype` is the autocast in force where the module was
# called (None: off), reapplied inside. Backward recomputes the experts' forward with autograd
# recording and differentiates it (what activation checkpointing does): compiled training runs
# the experts' forward twice, eager training once.
# --------------------------------------------------------------------------------------------

torch.library.define(
    "fastkd::stacked_experts",
    "(Tensor hidden_states, Tensor top_k_index, Tensor top_k_weights, Tensor[] state, "
    "Tensor module, ScalarType? autocast_dtype) -> Tensor",
)
torch.library.define(
    "fastkd::stacked_experts_backward",
    "(Tensor grad_out, Tensor hidden_states, Tensor top_k_index, Tensor top_k_weights, "
    "Tensor[] state, Tensor module, ScalarType? autocast_dtype, bool[] needs) -> Tensor[]",
)

_LIVE_EXPERTS: "weakref.WeakValueDictionary[int, torch.nn.Module]" = weakref.WeakValueDictionary()
# from a random start, so a key an exported program carries from another process matches no
# module here (it raises instead of running another model's experts)
_NEXT_KEY = itertools.count(int.from_bytes(os.urandom(5), "little") << 16)


def register_live_experts(module: torch.nn.Module) -> None:
    """Make ``module`` reachable from the stacked_experts op under a new key, kept on it as
    ``_live_key`` (an int) and ``_live_token`` (the same as a 0-d CPU tensor: a plain
    attribute, not a buffer, so it stays on the CPU and out of the state_dict)."""
    key = next(_NEXT_KEY)
    _LIVE_EXPERTS[key] = module
    module._live_key = key
    module._live_token = torch.tensor(key, dtype=torch.int64)


def _live_experts(token: Tensor) -> torch.nn.Module:
    module = _LIVE_EXPERTS.get(int(token))
    if module is None:
        raise RuntimeError(
            "fastkd::stacked_experts: the experts module this graph was traced from no longer "
            "exists in this process (a compiled graph runs fastkd's MoE experts through the live "
            "module, so it cannot be saved and run elsewhere)")
    return module


def _named_state(module: torch.nn.Module) -> list:
    """``(name, tensor)`` of the module's parameters, then its buffers."""
    return [*module.named_parameters(), *module.named_buffers()]


def experts_state(module: torch.nn.Module) -> list:
    """What the op passes as ``state``: the module's parameters, then its buffers."""
    return [t for _, t in _named_state(module)]


@contextlib.contextmanager
def _substituted(module: torch.nn.Module, state: list):
    """``module`` reading ``state`` in place of its own parameters and buffers (no hooks run,
    unlike torch.func.functional_call: the compiled graph ran them where the module was
    called)."""
    names = [n for n, _ in _named_state(module)]
    if len(names) != len(state):
        raise RuntimeError(
            f"fastkd::stacked_experts: the module holds {len(names)} parameters and buffers, the "
            f"graph passed {len(state)} (it changed since it was traced)")
    saved = []
    try:
        for name, t in zip(names, state):
            owner_name, _, attr = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            slots = owner._parameters if attr in owner._parameters else owner._buffers
            if slots[attr] is not None and slots[attr].shape != t.shape:
                raise RuntimeError(
                    f"fastkd::stacked_experts: the module's {name} is {tuple(slots[attr].shape)}, "
                    f"the graph passed {tuple(t.shape)} (it changed since it was traced)")
            saved.append((slots, attr, slots[attr]))
            slots[attr] = t
        yield module
    finally:
        for slots, attr, old in reversed(saved):
            slots[attr] = old


_AUTOGRAD_KEYS = tuple(getattr(torch._C.DispatchKey, k) for k in (
    "AutogradFunctionality", "AutogradOther", "AutogradNestedTensor", "ADInplaceOrView")
    if hasattr(torch._C.DispatchKey, k))


@contextlib.contextmanager
def _autograd_recording():
    """Gradient recording on inside an op's implementation: grad mode, and the autograd dispatch
    keys that an enclosing autograd kernel's redispatch (``_AutoDispatchBelowAutograd``) turned
    off for everything below it."""
    excluded = [k for k in _AUTOGRAD_KEYS if torch._C._dispatch_tls_is_dispatch_key_excluded(k)]
    for k in excluded:
        torch._C._dispatch_tls_set_dispatch_key_excluded(k, False)
    try:
        with torch.enable_grad():
            yield
    finally:
        for k in excluded:
            torch._C._dispatch_tls_set_dispatch_key_excluded(k, True)


def _run_experts(module, hidden, top_k_index, top_k_weights, state, autocast_dtype):
    device = hidden.device.type
    autocast = (torch.autocast(device, dtype=autocast_dtype) if autocast_dtype is not None
                else torch.autocast(device, enabled=False))
    with _substituted(module, state), autocast:
        return module._forward(hidden, top_k_index, top_k_weights)


@torch.library.register_kernel("fastkd::stacked_experts", None)
def _stacked_experts(hidden, top_k_index, top_k_weights, state, module, autocast_dtype):
    return _run_experts(_live_experts(module), hidden, top_k_index, top_k_weights, state,
                        autocast_dtype).contiguous()


@torch.library.register_kernel("fastkd::stacked_experts_backward", None)
def _stacked_experts_backward(grad_out, hidden, top_k_index, top_k_weights, state, module,
                              autocast_dtype, needs):
    experts = _live_experts(module)
    inputs = [hidden, top_k_weights, *state]
    leaves = [t.detach().requires_grad_() if need else t for t, need in zip(inputs, needs)]
    wanted = [t for t, need in zip(leaves, needs) if need]
    with _autograd_recording():
        out = _run_experts(experts, leaves[0], top_k_index, leaves[1], leaves[2:],
                           autocast_dtype)
        grads = (torch.autograd.grad(out, wanted, grad_out, allow_unused=True)
                 if wanted and out.requires_grad else [None] * len(wanted))
    # contiguous, as the fake kernel says (autograd may hand back other strides)
    return [torch.zeros(t.shape, dtype=t.dtype, device=t.device) if g is None else g.contiguous()
            for t, g in zip(wanted, grads)]


@torch.library.register_fake("fastkd::stacked_experts")
def _stacked_experts_fake(hidden, top_k_index, top_k_weights, state, module, autocast_dtype):
    return hidden.new_empty(hidden.shape)


@torch.library.register_fake("fastkd::stacked_experts_backward")
def _stacked_experts_backward_fake(grad_out, hidden, top_k_index, top_k_weights, state, module,
                                   autocast_dtype, needs):
    inputs = [hidden, top_k_weights, *state]
    return [t.new_empty(t.shape) for t, need in zip(inputs, needs) if need]


def _stacked_experts_setup_context(ctx, inputs, output):
    hidden, top_k_index, top_k_weights, state, module, autocast_dtype = inputs
    ctx.save_for_backward(hidden, top_k_index, top_k_weights, *state)
    ctx.settings = (module, autocast_dtype)


def _stacked_experts_autograd_backward(ctx, grad_out):
    hidden, top_k_index, top_k_weights, *state = ctx.saved_tensors
    need_hidden, _, need_weights, need_state = ctx.needs_input_grad[:4]  # one per state
    needs = [bool(need_hidden), bool(need_weights), *(bool(n) for n in need_state)]
    grads = iter(torch.ops.fastkd.stacked_experts_backward(
        grad_out, hidden, top_k_index, top_k_weights, state, *ctx.settings, needs))
    got = [next(grads) if need else None for need in needs]
    return got[0], None, got[1], got[2:], None, None


torch.library.register_autograd(
    "fastkd::stacked_experts", _stacked_experts_autograd_backward,
    setup_context=_stacked_experts_setup_context)
no_double_backward("fastkd::stacked_experts_backward", "fastkd's MoE experts under torch.compile")


def stacked_experts(module, hidden_states: Tensor, top_k_index: Tensor,
                    top_k_weights: Tensor) -> Tensor:
    """``module._forward(...)`` as one fastkd::stacked_experts node (see above)."""
    device = hidden_states.device.type
    autocast_dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                      else None)
    return torch.ops.fastkd.stacked_experts(hidden_states, top_k_index, top_k_weights,
                                            experts_state(module), module._live_token,
                                            autocast_dtype)
