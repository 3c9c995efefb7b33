"""Magnitude pruning masks: which weights to keep.

``magnitude_mask(weight, sparsity, pattern)`` returns a bool tensor of the weight's shape, True where
the weight is kept. Patterns:

- ``"unstructured"``: exactly ``round(numel * sparsity)`` entries with the smallest ``|w|`` go
  (ties broken by position, so the result is deterministic).
- ``"N:M"`` (``"2:4"``, ``"1:4"``, ``"4:8"``...): along the input (last) dimension, in every group of
  ``M`` consecutive weights of a row the ``N`` largest ``|w|`` stay. The sparsity is implied
  (``1 - N/M``); pass ``None`` or that value.
- ``(bh, bw)``: the weight (2-D) is cut into ``bh x bw`` blocks and the
  ``round(n_blocks * sparsity)`` blocks with the smallest L2 norm go.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

Pattern = Union[str, Tuple[int, int]]

_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pattern(pattern) -> Tuple[str, object]:
    """Normalise `pattern` to ("unstructured", None), ("nm", (n, m)) or ("block", (bh, bw))."""
    if isinstance(pattern, str):
        if pattern == "unstructured":
            return "unstructured", None
        found = _NM_RE.match(pattern)
        if found:
            n, m = int(found.group(1)), int(found.group(2))
            if m < 1 or n < 1 or n > m:
                raise ValueError(f"N:M pattern needs 1 <= N <= M, got {pattern!r}")
            return "nm", (n, m)
        raise ValueError(
            f"unknown pruning pattern {pattern!r}: use 'unstructured', an 'N:M' string such as "
            "'2:4', or a block shape (bh, bw)"
        )
    if isinstance(pattern, (tuple, list)):
        ok = len(pattern) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pattern
        )
        if not ok:
            raise ValueError(f"a block pattern must be two positive ints (bh, bw), got {pattern!r}")
        return "block", (int(pattern[0]), int(pattern[1]))
    raise ValueError(
        f"unknown pruning pattern {pattern!r}: use 'unstructured', 'N:M' or a block shape (bh, bw)"
    )


def _check_sparsity(sparsity) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):  # numpy's too
        raise ValueError(f"sparsity must be a number in [0, 1], got {sparsity!r}")
    s = float(sparsity)
    if not (0.0 <= s <= 1.0):  # also rejects NaN
        raise ValueError(f"sparsity must lie in [0, 1], got {sparsity}")
    return s


def _prune_smallest(scores: Tensor, n_prune: int) -> Tensor:
    """Bool keep-mask of `scores`' shape with the `n_prune` smallest scores (first by position on
    ties) set False."""
    flat = scores.reshape(-1)
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    if n_prune > 0:
        order = torch.argsort(flat, stable=True)
        keep[order[:n_prune]] = False
    return keep.reshape(scores.shape)


@torch.no_grad()
def magnitude_mask(weight: Tensor, sparsity: Optional[float], pattern: Pattern = "unstructured") -> Tensor:
    """Keep-mask (bool, the weight's shape and device) that prunes the smallest weights.

    Args:
        weight: the weight to prune, floating point; ``(out_features, in_features)`` for N:M and
            block patterns (N:M works along the last dimension of any tensor of dim >= 1).
        sparsity: fraction in ``[0, 1]`` to prune; for N:M, ``None`` or exactly ``1 - N/M``.
        pattern: ``"unstructured"``, ``"N:M"`` or ``(bh, bw)``; see the module docstring.

    Raises:
        ValueError: sparsity outside [0, 1] (or not matching N:M), a dimension not divisible by M or
            by the block, an unknown pattern, a non-finite weight.
        TypeError: weight not a floating-point tensor.
    """
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be floating point, got {weight.dtype}")
    kind, arg = parse_pattern(pattern)
    check_fits(tuple(weight.shape), sparsity, pattern)
    w = weight.detach()
    if w.numel() and not bool(torch.isfinite(w).all()):
        raise ValueError("weight has NaN or infinite entries; magnitudes cannot rank them")
    mag = w.abs().float()

    if kind == "nm":
        n, m = arg
        groups = mag.reshape(-1, m)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        if groups.numel():
            keep.scatter_(1, groups.topk(n, dim=1).indices, True)
        return keep.reshape(w.shape)

    s = _check_sparsity(sparsity)
    if kind == "unstructured":
        return _prune_smallest(mag, round(w.numel() * s))

    bh, bw = arg
    rows, cols = w.shape
    norms = mag.pow(2).reshape(rows // bh, bh, cols // bw, bw).sum(dim=(1, 3)).sqrt()
    keep_blocks = _prune_smallest(norms, round(norms.numel() * s))
    return keep_blocks.repeat_interleave(bh, dim=0).repeat_interleave(bw, dim=1)


def check_fits(shape: tuple, sparsity: Optional[float], pattern: Pattern = "unstructured") -> None:
    """Raise what :func:`magnitude_mask` raises for a weight of ``shape`` before it reads a value
    (a sparsity out of range or not the one an N:M pattern implies, a dimension an N:M group or
    a block does not divide): a model-wide swap checks every layer first and touches none of
    them when one would fail."""
    kind, arg = parse_pattern(pattern)
    if kind == "nm":
        n, m = arg
        implied = 1.0 - n / m
        if sparsity is not None and not math.isclose(
            _check_sparsity(sparsity), implied, rel_tol=0, abs_tol=1e-6
        ):
            raise ValueError(
                f"pattern {pattern!r} implies sparsity {implied:g}; got sparsity={sparsity} "
                "(pass None or the implied value)"
            )
        if len(shape) < 1 or shape[-1] % m != 0:
            raise ValueError(
                f"N:M pruning groups the last dimension by M={m}; weight shape {tuple(shape)} "
                f"has a last dimension not divisible by {m}"
            )
        return
    if sparsity is None:
        raise ValueError(f"pattern {pattern!r} needs a sparsity in [0, 1]")
    _check_sparsity(sparsity)
    if kind == "block":
        bh, bw = arg
        if len(shape) != 2:
            raise ValueError(f"block pruning needs a 2-D weight, got shape {tuple(shape)}")
        if shape[0] % bh or shape[1] % bw:
            raise ValueError(
                f"block shape ({bh}, {bw}) must divide the weight shape {tuple(shape)}"
            )


@torch.no_grad()
def global_magnitude_masks(weights: Sequence[Tensor], sparsity: float,
                           masks: Optional[Sequence[Tensor]] = None) -> List[Tensor]:
    """Keep-masks for several weights pruned together: exactly ``round(total * sparsity)`` of all
    their entries go, the smallest ``|w|`` across every tensor (one threshold for the whole
    model, as in global magnitude pruning), ties broken by tensor order, then position.

    ``masks`` (bool, one per weight) are masks already in force (gradual pruning): their pruned
    entries stay pruned and count toward the total; if they prune more already, nothing else goes.
    The threshold is found by bisection over the float32 magnitudes' bit patterns (32 counting
    passes over the weights), so no concatenated copy of them is made whatever the model's size.
    """
    ws = list(weights)
    if not ws:
        raise ValueError("global_magnitude_masks needs at least one weight")
    for w in ws:
        if not isinstance(w, Tensor) or not w.is_floating_point():
            raise TypeError("weights must be floating-point tensors")
        if w.numel() and not bool(torch.isfinite(w).all()):
            raise ValueError("weight has NaN or infinite entries; magnitudes cannot rank them")
    s = _check_sparsity(sparsity)
    if masks is None:
        keeps = [torch.ones_like(w, dtype=torch.bool) for w in ws]
    else:
        masks = list(masks)
        if len(masks) != len(ws) or any(tuple(m.shape) != tuple(w.shape)
                                         for m, w in zip(masks, ws)):
            raise ValueError("masks must match the weights one for one, shape for shape")
        keeps = [(m.to(w.device) != 0).clone() for m, w in zip(masks, ws)]
    total = sum(w.numel() for w in ws)
    extra = round(total * s) - sum(int((~k).sum()) for k in keeps)
    if extra <= 0:
        return keeps

    def bits(w: Tensor) -> Tensor:  # |w| as int32 bit patterns: ordered as the magnitudes
        return w.detach().abs().float().view(torch.int32)

    def kept_at_most(t: int) -> int:
        return sum(int(((bits(w) <= t) & k).sum()) for w, k in zip(ws, keeps))

    lo, hi = -1, 0x7F800000  # kept_at_most(hi) counts every kept (finite) entry
    while hi - lo > 1:  # smallest t with kept_at_most(t) >= extra
        mid = (lo + hi) // 2
        if kept_at_most(mid) >= extra:
            hi = mid
        else:
            lo = mid
    ties = extra - kept_at_most(hi - 1)  # entries at the threshold that go too, in order
    for w, k in zip(ws, keeps):
        b = bits(w)
        k &= b >= hi
        if ties > 0:
            at = ((b == hi) & k).reshape(-1).nonzero().squeeze(1)[:ties]
            k.view(-1)[at] = False
            ties -= at.numel()
    return keeps


def pattern_name(pattern: Pattern) -> str:
    """A short display name: 'unstructured', '2:4', 'block64x64'."""
    kind, arg = parse_pattern(pattern)
    if kind == "unstructured":
        return "unstructured"
    if kind == "nm":
        return f"{arg[0]}:{arg[1]}"
    return f"block{arg[0]}x{arg[1]}"


def prune_further(weight: Tensor, mask: Tensor, sparsity: Optional[float],
                  pattern: Pattern = "unstructured") -> Tensor:
    """The keep-mask of gradual pruning: ``mask`` (in force) pruned further by ``pattern`` on
    ``|W o M|``, so what is pruned stays pruned and counts toward the pattern. A kept weight
    that is exactly 0 ranks just above the pruned ones (it tied with them: a stable sort could
    keep a pruned zero in its place and drop it, pruning more than asked)."""
    if not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(weight.shape):
        raise ValueError(f"mask must be a tensor of the weight's shape {tuple(weight.shape)}, "
                         f"got {tuple(mask.shape) if isinstance(mask, Tensor) else type(mask)}")
    mask = mask.to(weight.device) != 0
    # in fp32, as magnitude_mask ranks: the smallest fp32 subnormal is above every pruned 0
    scores = torch.where(mask, weight.detach().abs().float(), 0)
    tiny = torch.nextafter(torch.zeros((), device=scores.device),
                           torch.ones((), device=scores.device))
    scores = torch.where(mask & (scores == 0), tiny, scores)
    return mask & magnitude_mask(scores, sparsity, pattern)


def pruned_again(before: Optional[str], pattern) -> str:
    """What a mask pruned further with ``pattern`` was made by: ``"unstructured then 2:4"``
    (the repr said ``'unstructured'`` of a mask that a 2:4 pass had pruned again)."""
    now = pattern_name(pattern)
    if before in (None, now) or before.endswith(f" then {now}"):
        return before or now
    return f"{before} then {now}"


# Structured (row/column) masks live in fastkd/structured.py, which imports only torch, so this
# re-export cannot form an import cycle; issue 6 names it fastkd.prune.structured_mask.
from .structured import structured_mask  # noqa: E402,F401

__all__ = ["magnitude_mask", "global_magnitude_masks", "structured_mask", "prune_further",
           "check_fits", "parse_pattern", "pattern_name"]
