"""Logit rows that are not one strided run: ``(B, L, V)`` views such as ``logits[:, :-1]``.

Flattening such a view to ``(B * L, V)`` rows copies it (4 GB for 16k rows of a 128k vocabulary in
bf16). The row kernels instead find row ``r`` at ``(r // L) * stride(0) + (r % L) * stride(1)``
(``fastkd._rows.as_row_pair`` makes the views).
"""

from __future__ import annotations

import math

import torch


def n_rows(x: torch.Tensor) -> int:
    """Rows of ``(N, V)`` or ``(B, L, V)`` logits."""
    return math.prod(x.shape[:-1])


def row_strides(*tensors: torch.Tensor) -> tuple[int, ...]:
    """``(rows_inner, outer_0, inner_0, outer_1, inner_1, ...)`` for same-shaped tensors of rank 2
    or 3 with unit column stride: row ``r`` of tensor ``i`` begins at
    ``(r // rows_inner) * outer_i + (r % rows_inner) * inner_i``."""
    shape = tensors[0].shape
    if len(shape) not in (2, 3):
        raise ValueError(f"logit rows must be (N, V) or (B, L, V), got shape {tuple(shape)}")
    out = [max(shape[-2], 1)]
    for x in tensors:
        # (a single class is read at column 0 whatever its stride; .contiguous() keeps it)
        if x.shape != shape or (x.stride(-1) != 1 and shape[-1] != 1):
            raise ValueError("row tensors must share a shape and have unit column stride")
        out += [x.stride(0), x.stride(1)] if x.dim() == 3 else [0, x.stride(0)]
    return tuple(out)
