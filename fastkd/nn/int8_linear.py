from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import functional as F
from .._backend import check_backend
from .._validate import LOGIT_DTYPES, check_compute_dtype
from ._linear_like import (as_linear, float_linear, fp32_state, refuse_float_codes,
                           remember_layout)


def _check_mode(mode) -> str:
    if mode not in F.INT8_MODES:
        raise ValueError(f"mode must be one of {F.INT8_MODES}, got {mode!r}")
    return mode


class Int8Linear(nn.Module):
    """Drop-in ``nn.Linear`` with symmetric int8 weights; see :func:`fastkd.functional.int8_linear`.

    ``layer = Int8Linear.from_linear(linear, mode="w8a8")`` or ``fastkd.quantize_(model)``.

    State (plain tensors, so ``state_dict``, ``torch.save`` and safetensors round-trip exactly):
        ``weight``: buffer ``(out_features, in_features)`` int8 codes in ``[-127, 127]``.
        ``weight_scale``: buffer ``(out_features,)`` fp32, one symmetric scale per output channel.
            It stays fp32 under ``module.half()`` / ``.to(dtype)``.
        ``bias``: parameter ``(out_features,)`` in the activation dtype, or ``None``.
        ``smooth_scale``: ``None``, or (SmoothQuant, Xiao et al. 2023) a buffer ``(in_features,)``
            fp32 of per-input-channel factors s: the codes hold ``W diag(s)`` and the input is
            divided by s (under w8a8 before it is quantized), so the product is unchanged while
            activation outliers move into the weight (``quantize_(..., smooth=alpha,
            calibration=...)`` or ``from_linear(..., smooth_scale=s)``). Stays fp32, as
            ``weight_scale``. ``Int8Linear(..., smooth=True)`` builds it as ones: a skeleton for
            a smoothed state dict (one without it takes it from the state dict as well).

    Modes: ``"w8a8"`` quantizes activations per token at run time and multiplies int8 x int8 with
    int32 accumulation; ``"w8a16"`` keeps activations in their dtype and dequantizes the weight
    inside the kernel. No float copy of the weight is kept. Input ``(..., in_features)`` in
    fp32/fp16/bf16; output ``(..., out_features)`` in the input's dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        mode: str = "w8a8",
        device=None,
        dtype=None,
        backend: str = "auto",
        smooth: bool = False,
    ):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.mode = _check_mode(mode)
        check_backend(backend)
        self.backend = backend
        dtype = dtype if dtype is not None else torch.get_default_dtype()
        check_compute_dtype(dtype, "Int8Linear")  # (of its bias and activations)
        self.register_buffer(
            "weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer(
            "weight_scale", torch.ones(out_features, dtype=torch.float32, device=device)
        )
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)
        if not isinstance(smooth, bool):
            raise TypeError(f"smooth must be a bool, got {smooth!r}")
        self.register_buffer(
            "smooth_scale",
            torch.ones(in_features, dtype=torch.float32, device=device) if smooth else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str = "w8a8", backend: str = "auto", *,
                    smooth_scale: Optional[Tensor] = None, input_moment: Optional[Tensor] = None,
                    damp: float = 0.1):
        """Quantize ``linear``'s weight per output channel; the bias keeps its values and dtype.
        ``linear`` is an ``nn.Linear`` or a Hugging Face ``Conv1D`` (GPT-2's layers).

        ``smooth_scale`` (optional, ``(in_features,)``, finite and > 0): SmoothQuant factors s;
        the codes quantize ``W diag(s)`` and the layer divides its input by s (see the class
        docstring; :func:`fastkd.quantize_` computes them from calibration inputs).

        ``input_moment`` (optional, ``(in_features, in_features)``): E[x x^T] of the layer's
        inputs x on calibration data (of x itself, not of x / s: with ``smooth_scale`` it is
        rescaled here). The scales stay ``max|w| / 127`` per channel; the codes are then chosen
        for the output error on those inputs rather than rounded one by one (GPTQ, Frantar et
        al. 2023: ``fastkd.sharing.calibrated_assign`` on the int8 grid, damped by ``damp``,
        finite and > 0, relative to the mean input power). Weights at exactly 0 (pruned) stay
        0."""
        original, linear = linear, as_linear(linear, "Int8Linear.from_linear")
        _check_mode(mode)
        w = linear.weight
        check_compute_dtype(w.dtype, "Int8Linear")
        if smooth_scale is not None:
            smooth_scale = check_smooth_scale(smooth_scale, linear.in_features, w.device)
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            mode=mode,
            device=w.device,
            dtype=w.dtype,
            backend=backend,
            smooth=smooth_scale is not None,
        )
        target = w.detach() if smooth_scale is None else w.detach().float() * smooth_scale
        codes, scale = F.quantize_weight(target)
        if smooth_scale is not None:
            layer.smooth_scale.copy_(smooth_scale)
        if input_moment is not None:
            codes = _calibrated_codes(target, scale, input_moment, smooth_scale, damp)
        layer.weight.copy_(codes)
        layer.weight_scale.copy_(scale)
        if linear.bias is not None:
            layer.bias = nn.Parameter(
                linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad
            )
        layer.train(linear.training)
        return remember_layout(layer, original)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"Int8Linear expects a tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"Int8Linear(in_features={self.in_features}) got input of shape "
                f"{tuple(x.shape)}: its last dimension must be {self.in_features}"
            )
        return F.int8_linear(
            x, self.weight, self.weight_scale, self.bias, mode=self.mode, backend=self.backend,
            smooth_scale=self.smooth_scale,
        )

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """A float copy ``weight * weight_scale[:, None]`` (divided by ``smooth_scale`` along the
        input channels when the layer has one): the weight the layer applies to its input. For
        inspection; forward never makes it."""
        w = self.weight.float() * self.weight_scale[:, None]
        if self.smooth_scale is not None:
            w = w / self.smooth_scale
        return w if dtype is None else w.to(dtype)

    def to_linear(self, dtype: Optional[torch.dtype] = None) -> nn.Linear:
        """A plain ``nn.Linear`` holding the dequantized weight ``weight * weight_scale`` (divided
        by ``smooth_scale`` along the inputs when the layer has one; a copy;
        see :func:`fastkd.decompress_` for a whole model), in ``dtype`` (default: the bias's
        dtype, else fp32: pass the model's dtype for a bf16/fp16 model without biases). It
        computes what ``w8a16`` computes, to rounding; ``w8a8`` also quantizes the activations,
        which the float layer does not."""
        return float_linear(self, self.dequantized_weight(), dtype)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        if not refuse_float_codes(self, state_dict, prefix, {"weight": torch.int8},
                                  error_msgs):
            return
        fp32_state(state_dict, prefix, ("weight_scale", "smooth_scale"))
        smooth = state_dict.get(prefix + "smooth_scale")
        if self.smooth_scale is None and isinstance(smooth, Tensor):
            # a layer quantized with SmoothQuant scales, loaded into one built without them
            self.smooth_scale = torch.ones(self.in_features, dtype=torch.float32,
                                           device=self.weight.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _apply(self, fn, *args, **kwargs):
        # module.half() / .to(bfloat16) would round the fp32 scales: keep them fp32, move device.
        kept = {n: getattr(self, n) for n in ("weight_scale", "smooth_scale")
                if getattr(self, n) is not None}
        super()._apply(fn, *args, **kwargs)
        for n, before in kept.items():
            moved = getattr(self, n)
            if moved.dtype != torch.float32:
                setattr(self, n, before.to(device=moved.device))
        if self.bias is not None and self.bias.dtype not in LOGIT_DTYPES:
            # .double(): every later forward failed on the bias ("must be one of float16, ...")
            raise TypeError(f"Int8Linear computes in fp32, fp16 or bf16; its bias cannot become "
                            f"{self.bias.dtype} (model.double() on a quantized model)")
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, mode={self.mode!r}, backend={self.backend!r}"
            + (", smoothed=True" if self.smooth_scale is not None else "")
        )


def _calibrated_codes(weight: Tensor, scale: Tensor, moment: Tensor,
                      smooth_scale: Optional[Tensor], damp: float) -> Tensor:
    """int8 codes of ``weight`` (N, K) on the per-row grids ``scale[n] * {-127..127}`` that
    minimise the output error for inputs of second moment ``moment`` (of the input before any
    smoothing: the layer's int8 product sees x / s, whose moment is H / (s s^T))."""
    from ..sharing import calibrated_assign

    k = weight.shape[1]
    if tuple(moment.shape) != (k, k):
        raise ValueError(f"input_moment must be ({k}, {k}) (E[x x^T] of the layer's inputs), "
                         f"got {tuple(moment.shape)}")
    h = moment.detach().to(device=weight.device, dtype=torch.float64)
    if smooth_scale is not None:
        s = smooth_scale.double()
        h = h / (s[:, None] * s[None, :])
    grid = torch.arange(-127, 128, dtype=torch.float64, device=weight.device)
    live = torch.isfinite(scale) & (scale > 0)  # (a row of zeros keeps codes 0)
    cent = torch.where(live, scale, 1.0).double()[:, None] * grid[None, :]
    idx = calibrated_assign(weight.float(), cent, h, weight != 0, damp=damp)
    codes = torch.where(idx >= 0, idx - 127, 0)
    return torch.where(live[:, None], codes, 0).to(torch.int8)


def check_smooth_scale(smooth_scale, in_features: int, device) -> Tensor:
    """SmoothQuant factors: a float tensor ``(in_features,)``, finite and > 0; returned fp32 on
    ``device``."""
    if not isinstance(smooth_scale, Tensor) or not smooth_scale.is_floating_point():
        raise TypeError(f"smooth_scale must be a float tensor, got {smooth_scale!r}"[:200])
    if tuple(smooth_scale.shape) != (in_features,):
        raise ValueError(f"smooth_scale must have shape ({in_features},) (one factor per input "
                         f"channel), got {tuple(smooth_scale.shape)}")
    s = smooth_scale.detach().to(device=device, dtype=torch.float32)
    if not s.is_meta and not bool((torch.isfinite(s) & (s > 0)).all()):
        raise ValueError("smooth_scale must be finite and > 0 (the input is divided by it)")
    return s


def align_int8_codes(model: nn.Module) -> None:
    """Copy, once, the int8 codes of ``model``'s Int8Linear / Int8Experts layers that lie on
    the CPU off a 64-byte boundary: views into a memory-mapped safetensors file, as
    load_compressed and from_pretrained assign them (its tensors start 8-byte aligned). The
    CPU's fast int8 weight-only kernel needs aligned codes and takes a slower route for others
    (fastkd/reference/int8_linear.py), so a loaded model would decode slower, and round
    differently, than the one that was saved."""
    from ..reference.int8_linear import INT8PACK_ALIGN
    from .int8_experts import Int8Experts

    for m in model.modules():
        if isinstance(m, (Int8Linear, Int8Experts)):
            for name, buf in m._buffers.items():
                if (buf is not None and buf.dtype == torch.int8 and buf.device.type == "cpu"
                        and buf.data_ptr() % INT8PACK_ALIGN):
                    m._buffers[name] = buf.clone()
