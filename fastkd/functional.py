"""The typed public functions of fastkd. Each validates its arguments, picks a backend and calls
the op through the dispatcher (``torch.ops.fastkd``), so eager, autograd and torch.compile all see
one contract."""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from . import _ops  # noqa: F401  (registers the ops)

__all__ = [
    "kd_loss", "kd_loss_topk", "fused_linear_kd_loss", "masked_linear", "build_tile_map",
    "MaskTiles", "int8_linear", "quantize_per_token", "quantize_weight", "shared_linear",
]
from ._rows import as_row_pair
from .reference import int8_linear as _int8_reference
from ._backend import (
    ENV_VAR,
    TORCH,
    TRITON,
    Backend,
    OpBackends,
    register,
    register_triton_op,
)
from ._validate import (
    check_bits,
    check_class_target,
    check_codes_fit,
    check_float_dtype,
    check_int,
    check_number,
    check_reduction,
    check_same_device,
    check_tensor,
    check_temperature,
    reduce_rows,
)

KD_DIVERGENCES = ("kl", "reverse_kl", "jsd")


def check_divergence(divergence, beta) -> tuple:
    if divergence not in KD_DIVERGENCES:
        raise ValueError(f"divergence must be one of {KD_DIVERGENCES}, got {divergence!r}")
    return divergence, check_number(beta, "beta", low=0.0, high=1.0)


def computed_divergence(divergence: str, beta: float) -> str:
    """The divergence the kernels compute for (divergence, beta): "jsd" at beta = 0 is forward
    KL and at beta = 1 reverse KL, exactly, and is computed as those. The jsd gradient's
    q * n / m term there is p (beta = 0, m = q) or 0 (beta = 1, m = p); evaluated as jsd it is
    0 where q underflows, or 0 * inf = nan where p does."""
    if divergence == "jsd" and beta in (0.0, 1.0):
        return "kl" if beta == 0.0 else "reverse_kl"
    return divergence


KD_LOSS_BACKENDS = register_triton_op("kd_loss")


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
            A row with no distribution (a nan or ``+inf`` logit, or every logit ``-inf``, in the
            student or the teacher) gives nan, in its loss and its gradient, unless ignored.
            A term of weight 0 is left out, not multiplied by 0: at ``alpha = 0`` the teacher
            (even an infinite divergence or an undefined row), at ``alpha = 1`` the CE (even an
            infinite one, a student logit of ``-inf`` at the target).
        target: optional ``(...)`` integer class indices in ``[0, V)`` or ``ignore_index``.
        temperature: ``T`` in ``[1e-4, 1e4]`` (beyond it fp32 statistics do not hold ``T**2``,
            ``logits / T`` or their exponentials). alpha: in ``[0, 1]``; unused without a
            target.
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
            gets the full loss and its shard's gradient. Local work uses the torch reference
            (``backend="triton"`` is refused with a group).

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
        hint = ""
        if student_logits.shape[:-1] == teacher_logits.shape[:-1]:
            hint = (" (vocabularies padded to different sizes? slice both to the classes they "
                    "share, e.g. [..., :V] with V the real vocabulary size)")
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} must have the same shape{hint}"
        )
    check_same_device(student_logits, teacher_logits, "student_logits", "teacher_logits")
    temperature = check_temperature(temperature)
    alpha = check_number(alpha, "alpha", low=0.0, high=1.0)
    ignore_index = check_int(ignore_index, "ignore_index")
    reduction = check_reduction(reduction)
    divergence, beta = check_divergence(divergence, beta)
    divergence = computed_divergence(divergence, beta)

    n_classes = student_logits.shape[-1]
    lead = student_logits.shape[:-1]
    if n_classes == 0 and group is None:
        # (a rank of a vocabulary-parallel group may hold no classes: the others hold them all;
        # refusing there left the other ranks waiting in the collective)
        raise ValueError("logits need at least one class (last dimension is 0)")
    if target is not None:
        # with a group, targets are global ids (checked against the total vocabulary there)
        target = check_class_target(target, lead, student_logits, "student_logits", n_classes,
                                    ignore_index, check_range=group is None)

    impl = KD_LOSS_BACKENDS.select(backend, student_logits.device)
    if group is not None:  # vocabulary-parallel (fastkd/_vocab_parallel.py)
        import torch.distributed as dist

        if not isinstance(group, dist.ProcessGroup):
            raise TypeError(f"group must be a torch.distributed ProcessGroup (dist.group.WORLD, "
                            f"dist.new_group(...)), got {type(group).__name__}")
        if backend not in ("auto", "torch"):
            raise ValueError(
                f"kd_loss(group=...) computes each rank's shard with the torch reference (its "
                f"statistics cross ranks between the passes, which the fused kernel keeps inside "
                f"one); backend must be 'auto' or 'torch', got {backend!r}")
        from ._vocab_parallel import vocab_parallel_kd_rows

        n_rows = lead.numel()  # (reshape(-1, 0) cannot infer the rows of a shard with no classes)
        student = student_logits.reshape(n_rows, n_classes)
        teacher = teacher_logits.detach().reshape(n_rows, n_classes)
        rows = vocab_parallel_kd_rows(
            student, teacher, target, temperature, alpha, ignore_index, divergence, beta, group
        )
    else:
        # (N, V) rows, or (B, L, V) for a sliced batch such as logits[:, :-1]: views, not copies
        student, teacher = as_row_pair(student_logits, teacher_logits.detach())
        rows = _ops.kd_loss_rows(
            student, teacher, target, temperature, alpha, ignore_index, impl, divergence, beta
        )
    return reduce_rows(rows, target, ignore_index, reduction, lead)


# Top-k teachers (offline distillation); the logic lives in fastkd/_topk.py.
from ._topk import KD_LOSS_TOPK_BACKENDS, kd_loss_topk  # noqa: E402,F401

# Fused lm-head + KD loss, chunked over rows; the logic lives in fastkd/_fused_linear_kd.py.
from ._fused_linear_kd import fused_linear_kd_loss  # noqa: E402,F401


# --------------------------------------------------------------------------------------------
# Weight-shared linear (issue 6)
# --------------------------------------------------------------------------------------------

SHARED_LINEAR_BACKENDS = register_triton_op("shared_linear")


def _autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The dtype ``F.linear`` would compute in for ``x`` here: autocast's, when it is on for x's
    device (custom ops are not cast by autocast themselves), else None."""
    dev = x.device.type
    if dev != "meta" and x.is_floating_point() and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


def _in_autocast_dtype(x: Tensor) -> Tensor:
    """``x`` in the dtype ``F.linear`` would compute in here (see _autocast_dtype)."""
    low = _autocast_dtype(x)
    return x if low is None else x.to(low)


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
        in_features: (keyword-only, required) ``K``, which the packed indices do not carry.
        bits: (keyword-only, required) the codebook's width, 1-8: ``2**bits`` entries.

    Returns ``(..., N)`` in x's dtype (the autocast dtype inside ``torch.autocast``, as
    ``F.linear``). Gradients reach x, the codebook (the sum of the weight gradients of each
    cluster) and the bias; the indices are fixed.

    At bit widths whose codes do not fill their storage (1-3 bits in a nibble, 5-7 in a byte)
    each call checks that no index reaches past the codebook: a ``ValueError`` on the CPU, a
    device-side assert on an accelerator or under ``torch.compile`` (no host sync).
    ``SharedLinear`` checks its indices where it makes or loads them instead.
    """
    return _shared_linear(x, indices, codebook, bias, in_features=in_features, bits=bits,
                          backend=backend, check_codes=True)


def _shared_linear(x, indices, codebook, bias, *, in_features, bits, backend, check_codes):
    check_tensor(x, "x")
    check_tensor(indices, "indices")
    check_tensor(codebook, "codebook")
    check_float_dtype(x, "x")
    x = _in_autocast_dtype(x)
    check_bits(bits)
    # an int a compiled caller passed in is a SymInt to Dynamo: the layout depends on it, so
    # specialise (torch 2.11 could not trace the f-strings formatting it)
    bits = int(bits)
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
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x of shape {tuple(x.shape)} must be (..., {in_features}): the layer "
                         f"takes {in_features} features")
    check_same_device(x, indices, "x", "indices")
    check_same_device(x, codebook, "x", "codebook")
    if bias is not None:
        check_tensor(bias, "bias")
        check_float_dtype(bias, "bias")
        check_same_device(x, bias, "x", "bias")
        if bias.shape != (n,):
            raise ValueError(f"bias shape {tuple(bias.shape)} must be ({n},)")
    if check_codes and 2 ** bits < (16 if bits <= 4 else 256) and indices.numel():
        check_codes_fit(indices, bits)
    impl = SHARED_LINEAR_BACKENDS.select(backend, x.device)
    lead = x.shape[:-1]
    if in_features == 0 or n == 0:  # no weights: the bias alone (as F.linear), no reshape by 0
        return torch.nn.functional.linear(
            x, x.new_zeros(n, in_features), None if bias is None else bias.to(x.dtype))
    x2 = x.reshape(-1, in_features)
    if impl == "triton" and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = _ops.call("shared_linear", x2, indices, codebook, bias, in_features, bits, impl)
    return y.reshape(*lead, n)


# --------------------------------------------------------------------------------------------
# Int8 linear
# --------------------------------------------------------------------------------------------

INT8_MODES = ("w8a8", "w8a16")
_INT8_MAX_K_W8A8 = _int8_reference.MAX_K_W8A8


def _int8_triton_dtype_reasons(dtype):
    def extra(name):
        if name == "triton" and dtype == torch.bfloat16 and _interpreting():
            return ["the Triton interpreter runs on numpy, which has no bfloat16"]
        return []

    return extra


def _interpreting() -> bool:
    from ._backend import triton_interpret

    return triton_interpret()


INT8_LINEAR_BACKENDS = register_triton_op("int8_linear")
QUANTIZE_PER_TOKEN_BACKENDS = register_triton_op("quantize_per_token")


def _check_int8_weight(weight: Tensor, weight_scale: Tensor) -> None:
    check_tensor(weight, "weight")
    check_tensor(weight_scale, "weight_scale")
    if weight.dtype != torch.int8:
        raise TypeError(f"weight must be int8 codes, got {str(weight.dtype).replace('torch.', '')}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got {tuple(weight.shape)}")
    if weight_scale.dtype != torch.float32:
        raise TypeError(
            f"weight_scale must be float32, got {str(weight_scale.dtype).replace('torch.', '')}"
        )
    if tuple(weight_scale.shape) != (weight.shape[0],):
        raise ValueError(
            f"weight_scale must have shape ({weight.shape[0]},) (one per output channel), "
            f"got {tuple(weight_scale.shape)}"
        )
    check_same_device(weight, weight_scale, "weight", "weight_scale")


def int8_linear(
    x: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    bias: Optional[Tensor] = None,
    *,
    mode: str = "w8a8",
    backend: str = "auto",
    smooth_scale: Optional[Tensor] = None,
) -> Tensor:
    r"""Linear layer with symmetric int8 weights: ``y = x @ (weight * weight_scale[:, None]).T + bias``.

    Modes:
        ``"w8a8"``: ``x`` is quantized per token (row) to int8 with an fp32 scale
        (``amax / 127``, round half to even); the product is int8 x int8 with exact int32
        accumulation, then ``y = acc * x_scale[m] * weight_scale[n] + bias[n]`` in fp32.
        ``"w8a16"``: ``x`` stays in its dtype; the int8 codes are converted in registers, the
        product accumulates in fp32, then ``y = acc * weight_scale[n] + bias[n]``.

    Args:
        x: ``(..., K)`` fp32, fp16 or bf16.
        weight: ``(N, K)`` int8 codes (see :func:`quantize_weight`).
        weight_scale: ``(N,)`` fp32 per-output-channel scales.
        bias: optional ``(N,)`` in fp32, fp16 or bf16 (added in fp32).
        mode: ``"w8a8"`` or ``"w8a16"``.
        backend: ``"auto"`` (Triton on CUDA, the torch reference elsewhere; ``FASTKD_BACKEND``
            overrides), ``"torch"`` or ``"triton"``.
        smooth_scale: optional ``(K,)`` fp32 SmoothQuant factors s (``Int8Linear.smooth_scale``),
            finite and > 0 (not checked here: that would read the device per call;
            ``Int8Linear.from_linear`` checks them): the layer computes on ``x / s`` (its weight
            codes hold ``W diag(s)``). Under ``"w8a8"`` the division is done in fp32 inside the
            quantization pass; under ``"w8a16"`` it is one elementwise pass first.

    Returns:
        ``(..., N)`` in ``x.dtype`` (the autocast dtype inside ``torch.autocast``, as ``F.linear``).

    Gradients: ``x`` receives ``dY @ (weight * weight_scale[:, None])`` (divided by s with
    ``smooth_scale``) (for ``"w8a8"`` this is the
    straight-through estimator of the activation rounding) and ``bias`` the sum of ``dY``; the
    int8 weight and its scale receive none.
    """
    check_tensor(x, "x")
    check_float_dtype(x, "x")
    x = _in_autocast_dtype(x)
    if mode not in INT8_MODES:
        raise ValueError(f"mode must be one of {INT8_MODES}, got {mode!r}")
    _check_int8_weight(weight, weight_scale)
    n_out, k = weight.shape
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (the features)")
    if x.shape[-1] != k:
        raise ValueError(
            f"x has {x.shape[-1]} features in its last dimension but weight expects {k} "
            f"(weight shape {tuple(weight.shape)})"
        )
    check_same_device(x, weight, "x", "weight")
    if bias is not None:
        check_tensor(bias, "bias")
        check_float_dtype(bias, "bias")
        if tuple(bias.shape) != (n_out,):
            raise ValueError(f"bias must have shape ({n_out},), got {tuple(bias.shape)}")
        check_same_device(x, bias, "x", "bias")
    if smooth_scale is not None:
        check_tensor(smooth_scale, "smooth_scale")
        if smooth_scale.dtype != torch.float32 or tuple(smooth_scale.shape) != (k,):
            raise ValueError(f"smooth_scale must be float32 of shape ({k},), got "
                             f"{str(smooth_scale.dtype).replace('torch.', '')} "
                             f"{tuple(smooth_scale.shape)}")
        check_same_device(x, smooth_scale, "x", "smooth_scale")
    if mode == "w8a8" and k > _INT8_MAX_K_W8A8:
        raise ValueError(
            f"w8a8 accumulates in int32, which can overflow for K = {k} > {_INT8_MAX_K_W8A8}; "
            "use mode='w8a16'"
        )
    impl = INT8_LINEAR_BACKENDS.select(backend, x.device, _int8_triton_dtype_reasons(x.dtype))
    lead = x.shape[:-1]
    # -1, not lead.numel(): numel() of a symbolic shape specializes it (torch.compile/export with
    # dynamic batch or sequence sizes would recompile per size); K = 0 cannot be inferred from -1
    x2 = x.reshape(-1, k) if k else x.reshape(lead.numel(), 0)
    if mode == "w8a8":
        smooth = () if smooth_scale is None else (smooth_scale,)
        y = _ops.call("int8_linear_w8a8", x2, weight, weight_scale, bias, impl, *smooth)
    else:
        if smooth_scale is not None:
            x2 = (x2 / smooth_scale).to(x2.dtype)
        y = _ops.call("int8_linear_w8a16", x2, weight, weight_scale, bias, impl)
    return y.reshape(*lead, n_out)


def quantize_per_token(x: Tensor, *, backend: str = "auto") -> tuple:
    """Symmetric per-token int8 quantization of ``x`` ``(..., K)`` (fp32/fp16/bf16).

    Returns ``(x_q, x_scale)``: ``x_q`` ``(..., K)`` int8 in ``[-127, 127]`` and ``x_scale``
    ``(...)`` fp32 with ``x ~= x_q * x_scale[..., None]``, ``x_scale = max|x_row| / 127``.
    """
    check_tensor(x, "x")
    check_float_dtype(x, "x")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (the features)")
    impl = QUANTIZE_PER_TOKEN_BACKENDS.select(
        backend, x.device, _int8_triton_dtype_reasons(x.dtype)
    )
    k = x.shape[-1]
    x2 = x.detach().reshape(-1, k) if k else x.detach().reshape(x.shape[:-1].numel(), 0)
    q, s = _ops.call("quantize_per_token", x2, impl)
    return q.reshape(x.shape), s.reshape(x.shape[:-1])


def quantize_weight(weight: Tensor) -> tuple:
    """Symmetric per-output-channel int8 quantization of a float ``weight`` ``(N, K)``.

    Returns ``(codes (N, K) int8 in [-127, 127], scale (N,) fp32)`` with
    ``scale[n] = max_k |weight[n, k]| / 127`` (computed in fp32, round half to even), so that
    ``weight ~= codes * scale[:, None]``.
    """
    check_tensor(weight, "weight")
    check_float_dtype(weight, "weight")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got {tuple(weight.shape)}")
    if not weight.is_meta:
        msg = ("weight contains inf or NaN: its channel's scale would be inf/NaN and every weight "
               "of that output channel would be lost; clean the weight first")
        finite = torch.isfinite(weight).all()
        if torch.compiler.is_compiling():  # reading the flag would break the graph
            torch._assert_async(finite, msg)
        elif not bool(finite):  # a one-time weight transform: a host sync is fine here
            raise ValueError(msg)
    from .reference.int8_linear import quantize_weight as _quantize_weight

    return _quantize_weight(weight)


# --------------------------------------------------------------------------------------------
# Masked linear
# --------------------------------------------------------------------------------------------

import os  # noqa: E402

from . import _extension  # noqa: E402
from .reference.masked_linear import TILE as MASK_TILE, MaskTiles, build_tile_map  # noqa: E402

MASKED_MM_OPS = ("masked_mm", "masked_mm_grad_input", "masked_mm_grad_weight")
MASKED_HALF_DTYPES = (torch.float16, torch.bfloat16)
# The backends that skip empty weight tiles and read the mask's tile map.
MASKED_SPARSE_BACKENDS = ("cuda", "triton")

# Whether `auto` may take the sparse CUDA kernel instead of dense cuBLAS on W o M.
# MEASURED NO (bench/results/masked_linear-2026-11-30-NVIDIA-H200.json, H200, torch 2.11, bf16,
# K = N = 4096): the WMMA kernel ran at 0.04x-0.17x of dense F.linear at every point of the sweep
# (M 16 and 2048; 64x64 blocks at 75 % sparsity, 2:4, unstructured 50 %), so `auto` stays on the
# dense path until a kernel version beats cuBLAS there; backend="cuda" still runs it on request.
# That version copied its tiles element by element; the one in csrc/ since 2026-12-02 (16-byte
# cp.async copies, double-buffered) has not run on a GPU yet.
# When it does, the thresholds below decide (64x64 weight tiles are what the kernel skips, so the
# fraction of tiles with a kept entry is what matters, not the fraction of kept weights).
AUTO_PICKS_SPARSE_KERNEL = False
# Whether `auto` may take the block-sparse Triton kernels (kernels/masked_linear.py).
# NOT MEASURED YET: written without a GPU; bench/bench_masked_linear.py times it next to the CUDA
# kernel and dense cuBLAS. Turn on (the same thresholds then decide) only where that run shows it
# ahead of dense; see bench/notes_masked_linear.md for what it is expected to do.
AUTO_PICKS_TRITON_KERNEL = False
AUTO_SPARSE_MAX_TILE_DENSITY = 0.30  # at most 30% of 64x64 weight tiles non-empty
AUTO_SPARSE_MIN_ROWS = 512  # rows of x (M); below it too few CTAs fill the GPU


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
            Backend("cuda", auto_devices=("cuda",) if AUTO_PICKS_SPARSE_KERNEL else (),
                    unavailable=_masked_cuda_unavailable),
            Backend("triton", auto_devices=("cuda",) if AUTO_PICKS_TRITON_KERNEL else (),
                    unavailable=TRITON.unavailable),
            TORCH,
        ],
    )
)


@functools.lru_cache(maxsize=None)
def _masked_cuda_arch_reason(device_index: int):
    """Why the masked-matmul kernels cannot run on CUDA device ``device_index`` (once per
    device): bf16 WMMA needs compute capability 8.0, and fastkd._C must hold code for it."""
    capability = torch.cuda.get_device_capability(device_index)
    if capability < (8, 0):
        return (f"the masked-matmul CUDA kernels need compute capability 8.0 or later, this GPU "
                f"has {capability[0]}.{capability[1]}")
    return _extension.arch_unavailable_reason(capability)


def masked_linear_reasons(dtype: torch.dtype, device: Optional[torch.device] = None):
    """`extra` for MASKED_LINEAR_BACKENDS.select: why a backend cannot take inputs of `dtype`
    (on `device`: the CUDA kernels need machine code or PTX for its architecture)."""

    def extra(name):
        if name == "cuda" and dtype not in MASKED_HALF_DTYPES:
            return [f"the CUDA kernel takes float16/bfloat16, got {dtype}"]
        if (name == "cuda" and device is not None and device.type == "cuda"
                and _extension.loaded() and not torch.compiler.is_compiling()):
            index = device.index if device.index is not None else torch.cuda.current_device()
            why = _masked_cuda_arch_reason(index)
            if why:
                return [why]
        if name == "triton" and dtype == torch.bfloat16 and _interpreting():
            return ["the Triton interpreter runs on numpy, which has no bfloat16"]
        return []

    return extra


def _check_mask_tiles(tile_map, mask: Tensor) -> None:
    if not isinstance(tile_map, MaskTiles):
        raise TypeError(f"tile_map must be a MaskTiles (build_tile_map), got {type(tile_map).__name__}")
    if tuple(tile_map.shape) != tuple(mask.shape) or tile_map.data.device != mask.device:
        raise ValueError(
            f"tile_map was built for a {tile_map.shape} mask on {tile_map.data.device}, "
            f"not this {tuple(mask.shape)} mask on {mask.device}"
        )
    grid = tuple(-(-d // MASK_TILE) for d in mask.shape)
    if (tile_map.n_tiles, tile_map.k_tiles) != grid or tile_map.data.numel() != tile_map.layout.size:
        # the kernels read a map of 64 x 64 tiles; another tile size's map is longer, and the
        # CUDA kernels would walk it with the wrong offsets
        raise ValueError(
            f"tile_map has a {tile_map.n_tiles} x {tile_map.k_tiles} tile grid, the kernels "
            f"need {grid[0]} x {grid[1]} tiles of {MASK_TILE} x {MASK_TILE}: build it with "
            "build_tile_map(mask) (the default tile)"
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
        backend: ``"auto"``, ``"torch"`` (dense ``F.linear`` on ``W o M``: cuBLAS on a GPU),
            ``"cuda"`` (the tile-skipping WMMA kernel: CUDA tensors, fp16/bf16, fastkd._C built)
            or ``"triton"`` (the block-sparse Triton kernels: CUDA tensors, or CPU tensors under
            ``TRITON_INTERPRET=1``; fp16/bf16/fp32, fp32 with IEEE fp32 products). ``auto`` takes a
            sparse kernel only where one was measured faster (``AUTO_PICKS_SPARSE_KERNEL``,
            ``AUTO_PICKS_TRITON_KERNEL``, ``AUTO_SPARSE_MAX_TILE_DENSITY``), else ``torch``.
        tile_map: the mask's :class:`MaskTiles`; built here (one device sync) when a sparse kernel
            runs without one (under ``torch.compile`` it must be given). ``MaskedLinear`` caches it.

    Non-finite inputs: the sparse kernels never read a weight tile with no kept entry, so a nan
    or inf in ``x`` (or, in the backward, in the output gradient) that meets only such tiles
    does not reach the result, where the dense ``torch`` path gives nan (``0 * nan``). Inside a
    partly kept tile it does, as on the dense path.

    Returns:
        ``(..., N)`` in the dtype of ``x`` (the autocast dtype inside ``torch.autocast``).
    """
    check_tensor(x, "x")
    check_tensor(weight, "weight")
    check_tensor(mask, "mask")
    check_float_dtype(x, "x")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got {tuple(weight.shape)}")
    low = _autocast_dtype(x)
    if low is not None and weight.is_floating_point():
        # Behave like F.linear under autocast; the gradient flows back to the fp32 master weights.
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

    impl = MASKED_LINEAR_BACKENDS.select(
        backend, x.device, masked_linear_reasons(x.dtype, x.device)
    )
    chosen_by_auto = backend == "auto" and os.environ.get(ENV_VAR, "auto") in ("", "auto")
    lead = x.shape[:-1]
    if weight.numel() == 0:  # no weights: the bias alone (as F.linear), no reshape by 0
        return torch.nn.functional.linear(x, weight, bias)
    x2 = x.reshape(-1, weight.shape[1])
    if impl in MASKED_SPARSE_BACKENDS:
        if tile_map is None:
            if torch.compiler.is_compiling():
                if chosen_by_auto:
                    impl = "torch"  # building the map needs a sync; the dense path needs none
                else:
                    raise ValueError(
                        f"backend={impl!r} under torch.compile needs tile_map= (build_tile_map(mask), "
                        "built outside the compiled region)"
                    )
            else:
                tile_map = build_tile_map(mask)
        if impl != "torch" and chosen_by_auto:
            if (
                tile_map.tile_density > AUTO_SPARSE_MAX_TILE_DENSITY
                or x2.shape[0] < AUTO_SPARSE_MIN_ROWS
            ):
                impl = "torch"
    tiles = tile_map.data if (impl in MASKED_SPARSE_BACKENDS and tile_map is not None) else None
    y = _ops.call("masked_linear", x2, weight, mask, bias, tiles, impl)
    return y.reshape(*lead, weight.shape[0])
