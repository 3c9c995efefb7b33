"""Int8 experts of a Mixture-of-Experts model, as transformers (5 and later) holds them (3-D
stacked weights; see _stacked_experts.py for the layout and the flags it reads)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import _ops
from .. import functional as F
from .._backend import check_backend
from .._validate import check_float_dtype, check_tensor
from ._linear_like import fp32_state, refuse_float_codes
from ._stacked_experts import StackedExperts, _out_in, is_stacked_experts
from .int8_linear import _check_mode

__all__ = ["Int8Experts", "is_stacked_experts"]


def _checked_input(hidden_states: Tensor, features: int) -> Tensor:
    """``hidden_states`` (T, H) as int8_linear would take it: float, H features, in autocast's
    dtype where autocast is on."""
    check_tensor(hidden_states, "hidden_states")
    check_float_dtype(hidden_states, "hidden_states")
    if hidden_states.dim() != 2 or hidden_states.shape[1] != features:
        raise ValueError(f"hidden_states must be (tokens, {features}), got "
                         f"{tuple(hidden_states.shape)}")
    return F._in_autocast_dtype(hidden_states)


class Int8Experts(StackedExperts):
    """Int8 stand-in for a transformers experts module (see the module docstring).

    ``Int8Experts.from_experts(experts, mode="w8a8")``, or ``fastkd.quantize_(model)``, which
    takes every such module. For each projection ``p``: buffer ``p`` ``(E, out, in)`` int8 codes
    (always ``(out, in)`` per expert, whatever the source's layout) and buffer ``p_scale``
    ``(E, out)`` fp32, symmetric per output channel of each expert; biases stay float
    parameters. Each expert hit by a batch runs :func:`fastkd.functional.int8_linear` (``w8a8``:
    activations quantized per token; ``w8a16``: kept in their dtype) for its up (and gate)
    projection and its down projection; the gate, activation and post-expert norm are the source
    class's own. No float copy of a weight is kept or made per call.

    ``to_experts(dtype)`` gives a module of the source class back, holding the dequantized
    weights in the source's layout (``fastkd.decompress_`` does it for a whole model).
    """

    _own_attributes = ("mode", "backend")

    def __init__(self, experts: nn.Module, mode: str = "w8a8", backend: str = "auto",
                 quantize: bool = True):
        super().__init__(experts)
        self.mode = _check_mode(mode)
        check_backend(backend)
        self.backend = backend
        for p in self.projections:
            w = experts._parameters[p]
            n_out, n_in = _out_in(experts, w)
            codes = torch.zeros(w.shape[0], n_out, n_in, dtype=torch.int8, device=w.device)
            scale = torch.ones(w.shape[0], n_out, dtype=torch.float32, device=w.device)
            if quantize:
                if w.is_meta:
                    raise ValueError(
                        "Int8Experts needs the experts' weights, but they are on the meta device")
                for e in range(w.shape[0]):  # an expert at a time: fp32 temporaries of one
                    w_e = w[e].detach()          # matrix (DeepSeek-V3 holds 256 per layer)
                    q, s = F.quantize_weight(w_e.t() if self.is_transposed else w_e)
                    codes[e].copy_(q)
                    scale[e].copy_(s)
            self.register_buffer(p, codes)
            self.register_buffer(f"{p}_scale", scale)
            bias = experts._parameters.get(f"{p}_bias")
            if bias is not None:
                self.register_parameter(f"{p}_bias", nn.Parameter(
                    bias.detach().clone(), requires_grad=bias.requires_grad))
        self.train(experts.training)

    @classmethod
    def from_experts(cls, experts: nn.Module, mode: str = "w8a8", backend: str = "auto"):
        """Quantize ``experts`` (each expert's matrices per output channel)."""
        return cls(experts, mode=mode, backend=backend)

    def widest_input(self) -> int:
        """The largest K of its products (an int32 accumulator bounds it in w8a8)."""
        return max(getattr(self, p).shape[2] for p in self.projections)

    def _forward(self, hidden_states: Tensor, top_k_index: Tensor,
                 top_k_weights: Tensor) -> Tensor:
        up, down = self.projections
        x = _checked_input(hidden_states, getattr(self, up).shape[2])
        out = torch.zeros_like(hidden_states)
        # validated and dispatched once per call, not per expert (at decode the host time is
        # what a call costs)
        if self.mode == "w8a8" and self.widest_input() > F._INT8_MAX_K_W8A8:
            raise ValueError(f"w8a8 accumulates in int32, which can overflow for K > "
                             f"{F._INT8_MAX_K_W8A8}; use mode='w8a16'")
        impl = F.INT8_LINEAR_BACKENDS.select(self.backend, x.device,
                                             F._int8_triton_dtype_reasons(x.dtype))
        name = "int8_linear_w8a8" if self.mode == "w8a8" else "int8_linear_w8a16"
        biases = {p: getattr(self, f"{p}_bias", None) if self.has_bias else None
                  for p in self.projections}

        def linear(h, p, e):
            b = biases[p]
            return _ops.call(name, h, getattr(self, p)[e], getattr(self, f"{p}_scale")[e],
                             None if b is None else b[e], impl)

        # w8a8 without a gradient to carry: every token quantized once for the up projections
        # (per-token quantization does not depend on the expert), then one scaled int8 GEMM per
        # expert; with a gradient, int8_linear's straight-through backward is needed
        quantized = None
        up_bias = biases[up]
        if self.mode == "w8a8" and not (torch.is_grad_enabled() and (
                x.requires_grad or (up_bias is not None and up_bias.requires_grad))):
            quantized = _ops.call("quantize_per_token", x, impl)
        for e, token, slot in self._groups(top_k_index):
            if quantized is None:
                h = linear(x[token], up, e)
            else:
                b = biases[up]
                h = _ops.call("int8_mm_scaled", quantized[0][token], quantized[1][token],
                              getattr(self, up)[e], getattr(self, f"{up}_scale")[e],
                              None if b is None else b[e], x.dtype, impl)
            h = linear(self._activate(h), down, e)
            self._add_expert_output(out, h, token, slot, top_k_weights)
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        codes = {p: torch.int8 for p in self.projections}
        if not refuse_float_codes(self, state_dict, prefix, codes, error_msgs):
            return
        fp32_state(state_dict, prefix, [f"{p}_scale" for p in self.projections])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _apply(self, fn, *args, **kwargs):
        # module.half() / .to(bfloat16) would round the fp32 scales: keep them fp32, move device.
        scales = {p: getattr(self, f"{p}_scale") for p in self.projections}
        super()._apply(fn, *args, **kwargs)
        for p, scale in scales.items():
            moved = getattr(self, f"{p}_scale")
            if moved.dtype != torch.float32:
                setattr(self, f"{p}_scale", scale.to(device=moved.device))
        return self

    def to_experts(self, dtype: Optional[torch.dtype] = None) -> nn.Module:
        """A module of the source class holding the dequantized weights in ``dtype`` (default:
        the biases' dtype, else fp32), in the source's layout."""
        new = self._bare_source()
        biases = [b for b in self.parameters(recurse=False)]
        dtype = dtype or (biases[0].dtype if biases else torch.float32)
        for p in self.projections:
            codes, scale = getattr(self, p), getattr(self, f"{p}_scale")
            e, n_out, n_in = codes.shape
            shape = (e, n_in, n_out) if self.is_transposed else (e, n_out, n_in)
            w = torch.empty(shape, dtype=dtype, device=codes.device)
            for i in range(e):  # an expert at a time: no fp32 copy of all of them
                w_i = codes[i].float() * scale[i][:, None]
                w[i].copy_(w_i.t() if self.is_transposed else w_i)
            new.register_parameter(p, nn.Parameter(w))
            bias = getattr(self, f"{p}_bias", None)
            if bias is not None:
                new.register_parameter(f"{p}_bias", nn.Parameter(bias.detach().to(dtype)))
        new.train(self.training)
        return new

    def dequantized_weight(self, projection: str) -> Tensor:
        """A float copy ``(E, out, in)`` of one projection (for inspection; forward never makes
        it)."""
        if projection not in self.projections:
            raise ValueError(f"projection must be one of {self.projections}, got {projection!r}")
        return getattr(self, projection).float() * getattr(self, f"{projection}_scale")[:, :, None]

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{p}={tuple(getattr(self, p).shape)}" for p in self.projections)
        return (f"{self._source_type.__name__}, num_experts={self.num_experts}, {shapes}, "
                f"mode={self.mode}")
