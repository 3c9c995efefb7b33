"""Logits as rows without copying them: ``(N, V)`` when the leading dimensions are one strided run,
``(B, L, V)`` when they are two (a sliced batch such as ``logits[:, :-1]``, which flattening would
copy). The row kernels take both (``fastkd.kernels._rows.row_strides``)."""

from __future__ import annotations

from torch import Tensor


def as_rows(x: Tensor) -> Tensor:
    """``x`` of shape ``(..., V)`` as a view of shape ``(N, V)`` or ``(B, L, V)``; a copy of shape
    ``(N, V)`` only when the classes are strided or the leading dimensions are three strided
    runs or more."""
    v = x.shape[-1]
    if x.stride(-1) != 1 and v > 1:
        return x.reshape(-1, v)
    groups: list[list[int]] = []  # [size, stride] of the merged leading dimensions
    for size, stride in zip(x.shape[:-1], x.stride()[:-1]):
        if size == 1:
            continue
        if groups and groups[-1][1] == stride * size:
            groups[-1] = [groups[-1][0] * size, stride]
        else:
            groups.append([size, stride])
    if len(groups) == 2:
        return x.reshape(groups[0][0], groups[1][0], v)  # a view: each group is one strided run
    return x.reshape(-1, v)  # a view when there is one group, else a copy


def as_row_pair(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Two same-shaped ``(..., V)`` tensors as rows of one shape, ``(N, V)`` or ``(B, L, V)``,
    viewing both where their layouts allow."""
    ra, rb = as_rows(a), as_rows(b)
    if ra.shape == rb.shape:
        return ra, rb
    for shape in (ra.shape, rb.shape):
        if len(shape) == 3:
            try:
                return a.view(shape), b.view(shape)
            except RuntimeError:  # the other one's layout does not split this way
                pass
    v = a.shape[-1]
    return a.reshape(-1, v), b.reshape(-1, v)
