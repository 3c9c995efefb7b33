"""Argument checks shared by the public functions: clear errors instead of wrong answers."""

from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import Tensor

from .reference.shared_linear import highest_code

LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
REDUCTIONS = ("mean", "sum", "none")


def check_tensor(x, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def check_float_dtype(x: Tensor, name: str, allowed=LOGIT_DTYPES) -> None:
    if x.dtype not in allowed:
        kinds = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name} must be one of {kinds}; got {str(x.dtype).replace('torch.', '')}")


def check_compute_dtype(dtype, who: str) -> None:
    """A layer's compute dtype (``None``: torch's default) is one of LOGIT_DTYPES: a float64 (or
    other) layer was made, and then every forward refused its weight or bias (the model already
    swapped, in place)."""
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if dtype not in LOGIT_DTYPES:
        raise TypeError(f"{who} computes in float32, float16 or bfloat16, not {dtype}: convert "
                        "the layer (or model) first, e.g. model.float()")


def check_same_device(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if a.device != b.device:
        raise ValueError(f"{name_a} is on {a.device} but {name_b} is on {b.device}")


def check_number(value, name: str, low=None, high=None, low_open=False) -> float:
    # numbers.Real: numpy's scalars too (a temperature read from a config as np.float32)
    if isinstance(value, bool) or not isinstance(value, (int, float, numbers.Real)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    # x - x == 0 exactly for finite x, and is nan for inf and nan. Unlike math.isfinite it also
    # takes a symbolic float (torch.compile with dynamic=True, or a value that changes between
    # calls) without a graph break.
    if not value - value == 0:
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


# fp32 statistics: outside this range T**2, logits / T or their exponentials leave fp32 (nan at
# T = 2e19 on one backend and a number on the other; already at T = 1e5 the soft term was off by
# 20x from cancellation). Real temperatures lie in [0.1, 100].
TEMPERATURE_RANGE = (1e-4, 1e4)


def check_temperature(value) -> float:
    low, high = TEMPERATURE_RANGE
    value = check_number(value, "temperature", low=0.0, low_open=True)
    if not low <= value <= high:
        raise ValueError(f"temperature must lie in [{low:g}, {high:g}] (fp32 statistics), got "
                         f"{value:g}")
    return value


def check_bits(bits) -> int:
    """A weight-sharing width: an int in [1, 8] (2**bits codebook entries)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in [1, 8], got {bits!r}")
    return bits


def check_reduction(reduction) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def check_class_targets(target: Tensor, n_classes: int, ignore_index: int) -> None:
    """Every target lies in [0, n_classes) or equals ignore_index.

    On the CPU this raises ValueError at once. On an accelerator, or while torch.compile traces,
    reading the data would force a host sync, so a device-side assert checks it asynchronously.
    """
    bad = (target != ignore_index) & ((target < 0) | (target >= n_classes))
    msg = f"target values must lie in [0, {n_classes}) or equal ignore_index={ignore_index}"
    if target.device.type == "cpu" and not torch.compiler.is_compiling():
        if bool(bad.any()):
            first = target[bad][0].item()
            raise ValueError(f"{msg}; found {first}")
    else:
        torch._assert_async(~bad.any(), msg)


def check_codes_fit(indices: Tensor, bits: int) -> None:
    """Every cluster index in ``indices`` (both nibbles of a packed byte when ``bits <= 4``) is
    below ``2**bits``: as check_class_targets, a ValueError on the CPU, a device-side assert on
    an accelerator or while torch.compile traces."""
    top = highest_code(indices, bits)
    msg = f"indices hold a code past the {2 ** bits} entries of a {bits}-bit codebook"
    if indices.device.type == "cpu" and not torch.compiler.is_compiling():
        if int(top) >= 2 ** bits:
            raise ValueError(f"{msg}: {int(top)}")
    else:
        torch._assert_async(top < 2 ** bits, msg)


def leading_shape_matches(target: Optional[Tensor], shape) -> bool:
    return target is None or tuple(target.shape) == tuple(shape)


def check_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value


def check_class_target(
    target: Tensor,
    lead_shape,
    like: Tensor,
    like_name: str,
    n_classes: int,
    ignore_index: int,
    check_range: bool = True,
) -> Tensor:
    """Validate hard-label targets for rows of shape `lead_shape`; return them flat as int64."""
    check_tensor(target, "target")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices, got {target.dtype}")
    if tuple(target.shape) != tuple(lead_shape):
        raise ValueError(
            f"target shape {tuple(target.shape)} must equal the leading shape of {like_name} "
            f"{tuple(lead_shape)}"
        )
    check_same_device(like, target, like_name, "target")
    target = target.reshape(-1).long()
    if check_range:
        check_class_targets(target, n_classes, ignore_index)
    return target


def reduce_rows(rows: Tensor, target: Optional[Tensor], ignore_index: int, reduction: str,
                lead_shape) -> Tensor:
    """Per-row losses -> "none" (leading shape), "sum", or "mean" over counted rows (0 if none)."""
    if reduction == "none":
        return rows.reshape(lead_shape)
    total = rows.sum()
    if reduction == "sum":
        return total
    if target is None:
        return total / max(rows.numel(), 1)
    return total / (target != ignore_index).sum().clamp_min(1)


def refuse_create_graph(what: str, why: str) -> None:
    """In an autograd.Function's backward: raise when a second derivative is coming (the
    backward runs with grad mode on only under create_graph=True), saying why ``what`` has
    none. A backward that is not differentiable would otherwise give a wrong one silently."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{what} has no second derivative: {why}, so a backward with create_graph=True (a "
            "gradient penalty, Hessian-vector products) is not supported")
