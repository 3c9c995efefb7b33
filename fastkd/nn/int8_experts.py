"""Int8 experts of a Mixture-of-Experts model, as transformers (5 and later) holds them.

transformers keeps a MoE block's experts in one module with 3-D parameters, one matrix per
expert: ``gate_up_proj`` ``(E, 2I, H)`` (or ``up_proj`` ``(E, I, H)`` without a gate) and
``down_proj`` ``(E, H, I)``, transposed where the class says ``is_transposed`` (gpt-oss), with
optional ``*_bias`` ``(E, out)``. Its ``forward(hidden_states, top_k_index, top_k_weights)`` sends
each token to its top-k experts. The class carries the flags that describe that computation
(``has_gate``, ``has_bias``, ``is_transposed``, ``has_post_expert_norm``, ``_apply_gate``): these
are what :class:`Int8Experts` reads, so it covers Mixtral, Qwen-MoE, DeepSeek-V3, gpt-oss and
the other classes built the same way without knowing them by name.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import _ops
from .. import functional as F
from .._backend import check_backend
from .._validate import check_float_dtype, check_tensor
from ._linear_like import bare_module, plain_attributes, refuse_float_codes
from .int8_linear import _check_mode

__all__ = ["Int8Experts", "is_stacked_experts"]

def _projections(experts: nn.Module) -> tuple:
    return ("gate_up_proj" if experts.has_gate else "up_proj", "down_proj")


def is_stacked_experts(module) -> bool:
    """True for a transformers experts module Int8Experts can stand in for: the flags of
    ``transformers.integrations.moe.use_experts_implementation``, 3-D floating weights of the
    shapes they imply, no expert parallelism, nothing else holding parameters but a post-expert
    norm."""
    if not isinstance(module, nn.Module) or isinstance(module, Int8Experts):
        return False
    flags = ("has_gate", "has_bias", "is_transposed", "has_post_expert_norm")
    if not all(isinstance(getattr(module, f, None), bool) for f in flags):
        return False
    if getattr(module, "_is_expert_parallel", False) or not isinstance(
            getattr(module, "num_experts", None), int):
        return False
    if module.has_gate and not callable(getattr(module, "_apply_gate", None)):
        return False
    if not module.has_gate and not callable(getattr(module, "act_fn", None)):
        return False
    expected = set(_projections(module))
    if module.has_bias:
        expected |= {f"{p}_bias" for p in _projections(module)}
    if set(module._parameters) != expected or module._buffers:
        return False
    extra = set(module._modules) - {"act_fn", "post_expert_norm"}
    if extra:
        return False
    e = module.num_experts
    up, down = (module._parameters[p] for p in _projections(module))
    if not all(p is not None and p.dim() == 3 and p.is_floating_point() and p.shape[0] == e
               for p in (up, down)):
        return False
    (n_up, k_up), (n_down, k_down) = (_out_in(module, p) for p in (up, down))
    hidden = k_up
    inner = n_up // 2 if module.has_gate else n_up
    return n_down == hidden and k_down == inner and (not module.has_gate or n_up % 2 == 0)


def _checked_input(hidden_states: Tensor, features: int) -> Tensor:
    """``hidden_states`` (T, H) as int8_linear would take it: float, H features, in autocast's
    dtype where autocast is on."""
    check_tensor(hidden_states, "hidden_states")
    check_float_dtype(hidden_states, "hidden_states")
    if hidden_states.dim() != 2 or hidden_states.shape[1] != features:
        raise ValueError(f"hidden_states must be (tokens, {features}), got "
                         f"{tuple(hidden_states.shape)}")
    low = F._autocast_dtype(hidden_states)
    return hidden_states if low is None else hidden_states.to(low)


def _out_in(experts: nn.Module, w: Tensor) -> tuple:
    """(out, in) of one expert's matrix in a stacked weight."""
    return (w.shape[2], w.shape[1]) if experts.is_transposed else (w.shape[1], w.shape[2])


class Int8Experts(nn.Module):
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

    def __init__(self, experts: nn.Module, mode: str = "w8a8", backend: str = "auto",
                 quantize: bool = True):
        super().__init__()
        if not is_stacked_experts(experts):
            raise TypeError(
                f"Int8Experts takes a transformers experts module with 3-D stacked weights "
                f"(use_experts_implementation), got {type(experts).__name__}")
        self.mode = _check_mode(mode)
        check_backend(backend)
        self.backend = backend
        # the source's settings and its activation / norm modules, which forward uses as they are
        self.__dict__.update(plain_attributes(experts, ("mode", "backend")))
        for name, child in experts.named_children():
            self.add_module(name, child)
        self._source_type = type(experts)
        self._gate_fn = type(experts)._apply_gate if experts.has_gate else None
        self.projections = _projections(experts)
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
                    q, s = F.quantize_weight(w_e.t() if experts.is_transposed else w_e)
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

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        up, down = self.projections
        x = _checked_input(hidden_states, getattr(self, up).shape[2])
        out = torch.zeros_like(hidden_states)
        n_experts, k = self.num_experts, top_k_index.shape[-1]
        # validated and dispatched once per call, not per expert (at decode the host time is
        # what a call costs)
        if self.mode == "w8a8" and max(getattr(self, p).shape[2] for p in self.projections) \
                > F._INT8_MAX_K_W8A8:
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
        if self.mode == "w8a8" and not (torch.is_grad_enabled() and x.requires_grad):
            quantized = _ops.call("quantize_per_token", x, impl)
        # (token, slot) pairs grouped by expert with one sort and one host sync, rather than a
        # search (and a sync) per expert; ids outside [0, E) (expert parallelism's "not here"
        # sentinel) sort last and are dropped
        flat = top_k_index.reshape(-1)
        flat = torch.where((flat >= 0) & (flat < n_experts), flat, n_experts)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=n_experts + 1)[:n_experts].tolist()
        start = 0
        for e, count in enumerate(counts):
            if count == 0:
                continue
            pairs = order[start:start + count]
            start += count
            token, slot = pairs // k, pairs % k
            if quantized is None:
                h = linear(x[token], up, e)
            else:
                b = biases[up]
                h = _ops.call("int8_mm_scaled", quantized[0][token], quantized[1][token],
                              getattr(self, up)[e], getattr(self, f"{up}_scale")[e],
                              None if b is None else b[e], x.dtype, impl)
            h = self._gate_fn(self, h) if self.has_gate else self.act_fn(h)
            h = linear(h, down, e)
            if self.has_post_expert_norm:
                h = self.post_expert_norm(h)
            h = h * top_k_weights[token, slot, None]
            out.index_add_(0, token, h.to(out.dtype))
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        codes = {p: torch.int8 for p in self.projections}
        if not refuse_float_codes(self, state_dict, prefix, codes, error_msgs):
            return
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
        new = bare_module(self._source_type,
                          plain_attributes(self, ("mode", "backend", "projections")))
        for name, child in self.named_children():
            new.add_module(name, child)
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
