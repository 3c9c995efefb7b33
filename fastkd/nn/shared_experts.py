"""Weight-shared experts of a Mixture-of-Experts model, as transformers (5 and later) holds them
(3-D stacked weights; see _stacked_experts.py for the layout and the flags it reads)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import functional as F
from .._backend import check_backend
from .._validate import check_bits
from ..reference.shared_linear import shared_dequantize
from ._linear_like import fp32_state
from ._stacked_experts import StackedExperts, _out_in
from .shared_linear import refuse_bad_indices

__all__ = ["SharedExperts"]


class SharedExperts(StackedExperts):
    """A transformers experts module whose matrices are weight-shared, as
    :class:`SharedLinear` does for a linear: each expert's ``(out, in)`` matrix clustered by
    k-means into ``2**bits`` shared values (zero its own fixed cluster, so pruned weights stay
    zero), per expert matrix or, with ``per_channel``, per output channel.

    ``SharedExperts.from_experts(experts, bits=4)``, or ``fastkd.share_weights_(model)``, which
    takes every experts module (pruned ones, MaskedExperts, from ``W o M``). For each projection
    ``p``: buffer ``p_indices`` ``(E, out, ceil(in / 2))`` uint8 (two 4-bit indices a byte for
    ``bits <= 4``, else ``(E, out, in)``) and Parameter ``p_codebook`` fp32 ``(E, 2**bits)`` (or
    ``(E, out, 2**bits)``); biases stay float Parameters. Each expert a batch reaches runs
    :func:`fastkd.functional.shared_linear`, which trains the codebook (a centroid's gradient is
    the sum of its weights' gradients); the gate, activation and post-expert norm are the source
    class's own. ``to_experts(dtype)`` gives the source class back with the looked-up weights.
    """

    _own_attributes = ("bits", "per_channel", "backend")

    def __init__(self, experts: nn.Module, bits: int = 4, per_channel: bool = False,
                 backend: str = "auto", iters: int = 100, cluster: bool = True):
        super().__init__(experts)
        from .shared_linear import SharedLinear

        check_bits(bits)
        check_backend(backend)
        self.bits, self.per_channel, self.backend = bits, bool(per_channel), backend
        self._in_features = {}
        for p in self.projections:
            weight = experts._parameters[p]
            n_experts = weight.shape[0]
            n_out, n_in = _out_in(experts, weight)
            width = (n_in + 1) // 2 if bits <= 4 else n_in
            indices = torch.zeros(n_experts, n_out, width, dtype=torch.uint8, device=weight.device)
            shape = (n_experts, n_out, 2 ** bits) if per_channel else (n_experts, 2 ** bits)
            codebook = torch.zeros(shape, dtype=torch.float32, device=weight.device)
            if cluster:
                for e in range(n_experts):  # an expert at a time: SharedLinear's k-means
                    matrix = weight[e].detach()
                    linear = nn.Linear(n_in, n_out, bias=False, device="meta")
                    linear.weight = nn.Parameter(
                        matrix.t().contiguous() if self.is_transposed else matrix,
                        requires_grad=False)
                    shared = SharedLinear.from_linear(linear, bits=bits, per_channel=per_channel,
                                                      iters=iters)
                    indices[e].copy_(shared.indices)
                    codebook[e].copy_(shared.codebook.detach())
            self.register_buffer(f"{p}_indices", indices)
            self.register_parameter(f"{p}_codebook", nn.Parameter(
                codebook, requires_grad=weight.requires_grad))
            bias = experts._parameters.get(f"{p}_bias")
            if bias is not None:
                self.register_parameter(f"{p}_bias", bias)
            self._in_features[p] = n_in
        self.train(experts.training)

    @classmethod
    def from_experts(cls, experts: nn.Module, bits: int = 4, per_channel: bool = False,
                     iters: int = 100, backend: str = "auto") -> "SharedExperts":
        """Cluster ``experts``' matrices (a transformers experts module)."""
        return cls(experts, bits=bits, per_channel=per_channel, backend=backend, iters=iters)

    def _linear(self, x: Tensor, p: str, e: int) -> Tensor:
        bias = getattr(self, f"{p}_bias") if self.has_bias else None
        return F._shared_linear(x, getattr(self, f"{p}_indices")[e],
                                getattr(self, f"{p}_codebook")[e],
                                None if bias is None else bias[e],
                                in_features=self._in_features[p], bits=self.bits,
                                backend=self.backend, check_codes=False)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        if not refuse_bad_indices(self, state_dict, prefix,
                                  [f"{p}_indices" for p in self.projections], self.bits,
                                  error_msgs):
            return
        fp32_state(state_dict, prefix, [f"{p}_codebook" for p in self.projections])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _apply(self, fn, *args, **kwargs):
        # module.half() / .to(bfloat16) would round the fp32 codebooks, which the op requires:
        # keep them fp32 (with any gradient they hold), and let them follow device moves only
        kept = {p: (getattr(self, f"{p}_codebook").data, getattr(self, f"{p}_codebook").grad)
                for p in self.projections}
        super()._apply(fn, *args, **kwargs)
        for p, (data, grad) in kept.items():
            moved = getattr(self, f"{p}_codebook")
            if moved.dtype != torch.float32:
                moved.data = data.to(device=moved.device)
                moved.grad = None if grad is None else grad.to(device=moved.device)
        return self

    def looked_up_weight(self, projection: str, expert: int) -> Tensor:
        """The fp32 ``(out, in)`` matrix one expert's projection multiplies by."""
        return shared_dequantize(getattr(self, f"{projection}_indices")[expert],
                                 getattr(self, f"{projection}_codebook")[expert].detach(),
                                 self._in_features[projection], self.bits)

    def nbytes(self) -> int:
        """Bytes of the experts' own state (indices, codebooks, biases)."""
        return sum(t.numel() * t.element_size()
                   for t in (*self.parameters(recurse=False), *self.buffers(recurse=False)))

    def to_experts(self, dtype: Optional[torch.dtype] = None) -> nn.Module:
        """A module of the source class holding the looked-up weights in ``dtype`` (default:
        the biases' dtype, else fp32), in the source's layout."""
        new = self._bare_source()
        biases = [getattr(self, f"{p}_bias") for p in self.projections if self.has_bias]
        dtype = dtype or (biases[0].dtype if biases else torch.float32)
        for p in self.projections:
            indices = getattr(self, f"{p}_indices")
            n_out, n_in = indices.shape[1], self._in_features[p]
            shape = (self.num_experts, n_in, n_out) if self.is_transposed else \
                (self.num_experts, n_out, n_in)
            w = torch.empty(shape, dtype=dtype, device=indices.device)
            for e in range(self.num_experts):  # an expert at a time: no fp32 copy of the stack
                w_e = self.looked_up_weight(p, e)
                w[e].copy_(w_e.t() if self.is_transposed else w_e)
            new.register_parameter(p, nn.Parameter(
                w, requires_grad=getattr(self, f"{p}_codebook").requires_grad))
            if self.has_bias:
                bias = getattr(self, f"{p}_bias")
                new.register_parameter(f"{p}_bias", bias if bias.dtype == dtype else nn.Parameter(
                    bias.detach().to(dtype), requires_grad=bias.requires_grad))
        new.train(self.training)
        return new

    def extra_repr(self) -> str:
        return (f"{self._source_type.__name__}, num_experts={self.num_experts}, bits={self.bits}, "
                f"per_channel={self.per_channel}")
