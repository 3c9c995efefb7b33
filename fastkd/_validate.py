"""Argument checks shared by the public functions: clear errors instead of wrong answers."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
REDUCTIONS = ("mean", "sum", "none")


def check_tensor(x, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def check_float_dtype(x: Tensor, name: str, allowed=LOGIT_DTYPES) -> None:
    if x.dtype not in allowed:
        kinds = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name} must be one of {kinds}; got {str(x.dtype).replace('torch.', '')}")


def check_same_device(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if a.device != b.device:
        raise ValueError(f"{name_a} is on {a.device} but {name_b} is on {b.device}")


def check_number(value, name: str, low=None, high=None, low_open=False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


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


def leading_shape_matches(target: Optional[Tensor], shape) -> bool:
    return target is None or tuple(target.shape) == tuple(shape)
