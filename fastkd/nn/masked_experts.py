"""Pruned experts of a Mixture-of-Experts model, as transformers (5 and later) holds them (3-D
stacked weights; see _stacked_experts.py for the layout and the flags it reads)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as TF

from ..prune import magnitude_mask, prune_further, pruned_again
from ._stacked_experts import StackedExperts, _flags, _projections, is_stacked_experts

__all__ = ["MaskedExperts"]


class MaskedExperts(StackedExperts):
    """A transformers experts module with a fixed bool sparsity mask per weight: every expert
    computes with ``W o M``, as :class:`MaskedLinear` does for a linear.

    ``MaskedExperts.from_experts(experts, sparsity=0.5, pattern="unstructured")``, or
    ``fastkd.sparsify_(model)``, which takes every experts module. For each projection ``p`` it
    keeps the source's Parameter ``p`` (same object, same layout and state_dict key, so an
    optimizer over it carries on) and adds the bool buffer ``p_mask`` of its shape. The pattern
    applies to each expert's ``(out, in)`` matrix (N:M groups along its input dimension). Pruned
    weights are zeroed and get exactly zero gradient, so they stay zero under SGD, momentum,
    Adam and AdamW with weight decay. The gate, activation and post-expert norm are the source
    class's own; each expert a batch reaches runs ``F.linear`` on its masked matrices.

    ``to_experts()`` gives the source class back holding ``W o M`` (``fastkd.fold_masks_`` and
    ``fastkd.decompress_`` do it for a whole model); ``fastkd.quantize_`` takes the folded
    weights into :class:`Int8Experts`.
    """

    _own_attributes = ("pattern",)

    def __init__(self, experts: nn.Module):
        super().__init__(experts)
        self.pattern: Optional[str] = None  # how the masks were made, for repr only
        for p in self.projections:
            weight = experts._parameters[p]
            self.register_parameter(p, weight)
            self.register_buffer(f"{p}_mask", torch.ones(weight.shape, dtype=torch.bool,
                                                         device=weight.device))
            bias = experts._parameters.get(f"{p}_bias")
            if bias is not None:
                self.register_parameter(f"{p}_bias", bias)
        self.train(experts.training)

    @classmethod
    def from_experts(cls, experts: nn.Module, sparsity: Optional[float] = 0.5,
                     pattern="unstructured") -> "MaskedExperts":
        """Prune ``experts`` by magnitude: each expert's matrices with
        :func:`fastkd.prune.magnitude_mask` (``sparsity`` of each matrix, or the N:M or block
        pattern)."""
        masked = cls(experts)
        masked.prune_(sparsity, pattern)
        return masked

    def _matrix(self, t: Tensor) -> Tensor:
        """One expert's (out, in) view of a stacked tensor in the source's layout."""
        return t.t() if self.is_transposed else t

    @torch.no_grad()
    def prune_(self, sparsity: Optional[float], pattern="unstructured") -> "MaskedExperts":
        """Prune further, within the masks in force: each expert matrix keeps the largest
        ``|W o M|`` of the pattern (gradual pruning; pruned weights do not come back)."""
        masks = []
        for p in self.projections:
            weight, mask = getattr(self, p), getattr(self, f"{p}_mask")
            new = torch.empty_like(mask)
            for e in range(weight.shape[0]):  # an expert at a time: no fp32 copy of the stack
                keep = prune_further(self._matrix(weight[e]), self._matrix(mask[e]), sparsity,
                                     pattern)
                new[e] = self._matrix(keep)
            masks.append(new)
        for p, mask in zip(self.projections, masks):
            self.set_mask_(p, mask)
        self.pattern = pruned_again(self.pattern, pattern)
        return self

    @torch.no_grad()
    def set_mask_(self, projection: str, mask: Tensor) -> "MaskedExperts":
        """Replace one projection's mask (bool or 0/1, the weight's shape) and zero the newly
        pruned weights."""
        if projection not in self.projections:
            raise ValueError(f"projection must be one of {self.projections}, got {projection!r}")
        weight, buf = getattr(self, projection), getattr(self, f"{projection}_mask")
        if not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(f"mask must be a tensor of shape {tuple(weight.shape)}")
        buf.copy_(mask.to(buf.device) != 0)
        weight.masked_fill_(~buf, 0)
        return self

    def masked_weight(self, projection: str) -> Tensor:
        """``W o M`` of one projection (detached, the source's layout)."""
        if projection not in self.projections:
            raise ValueError(f"projection must be one of {self.projections}, got {projection!r}")
        weight = getattr(self, projection).detach()
        return torch.where(getattr(self, f"{projection}_mask"), weight, 0)

    @property
    def density(self) -> float:
        """Fraction of the experts' weights kept (reads the masks: one device sync each)."""
        kept = sum(int(getattr(self, f"{p}_mask").sum()) for p in self.projections)
        total = sum(getattr(self, f"{p}_mask").numel() for p in self.projections)
        return kept / total if total else 1.0

    def _linear(self, x: Tensor, p: str, e: int) -> Tensor:
        weight = torch.where(getattr(self, f"{p}_mask")[e], getattr(self, p)[e], 0)
        bias = getattr(self, f"{p}_bias") if self.has_bias else None
        return TF.linear(x, self._matrix(weight), None if bias is None else bias[e])

    def to_experts(self) -> nn.Module:
        """A module of the source class holding ``W o M`` (new Parameters) and the biases."""
        new = self._bare_source()
        for p in self.projections:
            new.register_parameter(p, nn.Parameter(self.masked_weight(p),
                                                    requires_grad=getattr(self, p).requires_grad))
            bias = getattr(self, f"{p}_bias", None)
            if bias is not None:
                new.register_parameter(f"{p}_bias", bias)
        new.train(self.training)
        return new

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{p}={tuple(getattr(self, p).shape)}" for p in self.projections)
        return (f"{self._source_type.__name__}, num_experts={self.num_experts}, {shapes}, "
                f"pattern={self.pattern}")


def check_expert_pattern(experts: nn.Module, sparsity: Optional[float],
                         pattern="unstructured") -> None:
    """Raise what :func:`magnitude_mask` raises for the matrices of ``experts`` (a transformers
    experts module or a MaskedExperts: a dimension an N:M group or a block does not divide, a
    bad sparsity), touching nothing: it prunes a copy of the first expert's (they share
    shapes)."""
    transposed = _flags(experts)["is_transposed"]
    for p in _projections(experts):
        w = experts._parameters[p][0].detach()
        magnitude_mask(w.t() if transposed else w, sparsity, pattern)


def is_experts_to_prune(module) -> bool:
    """Experts sparsify_ takes: a transformers experts module, or a MaskedExperts (pruned
    further)."""
    return isinstance(module, MaskedExperts) or is_stacked_experts(module)
