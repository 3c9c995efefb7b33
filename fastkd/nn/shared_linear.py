"""``SharedLinear``: a linear layer whose weights are indices into a small trainable codebook."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import functional as F
from .._validate import check_bits, check_compute_dtype
from ..reference.shared_linear import highest_code, pack_indices, shared_dequantize
from ._linear_like import (
    as_linear,
    float_linear,
    fp32_state,
    refuse_float_codes,
    remember_layout,
    require_values,
)


def refuse_bad_indices(module: nn.Module, state_dict, prefix: str, names, bits: int,
                       error_msgs: list) -> bool:
    """For ``_load_from_state_dict`` of a weight-shared layer: indices must be uint8 codes below
    ``2**bits`` (both nibbles of a packed byte when ``bits <= 4``). Anything else was loaded
    without a word: int64 values wrapped modulo 256, floats truncated, and a code past the
    codebook read the next channel's table (or a padding zero). Record a clear error and return
    False: load nothing into the layer."""
    if not refuse_float_codes(module, state_dict, prefix, dict.fromkeys(names, torch.uint8),
                              error_msgs):
        return False
    ok = True
    for name in names:
        value = state_dict.get(prefix + name)
        if not isinstance(value, Tensor) or not value.numel() or bits >= 8:
            continue
        top = int(highest_code(value, bits))
        if top >= 2 ** bits:
            error_msgs.append(f"{type(module).__name__}: {prefix}{name} in the state_dict holds "
                              f"code {top}, past the {2 ** bits} entries of a {bits}-bit "
                              "codebook")
            ok = False
    return ok


class SharedLinear(nn.Module):
    """Drop-in for ``nn.Linear`` with ``2**bits`` shared weight values (per layer or per channel).

    Holds plain tensors: ``indices`` (uint8 buffer; two 4-bit indices per byte when ``bits <= 4``),
    ``codebook`` (fp32 parameter, ``(2**bits,)`` or ``(out_features, 2**bits)``; entry 0 is the
    pruned-weight cluster and always reads as 0) and ``bias`` (parameter or None). Training updates
    the codebook (each centroid gets the summed gradient of its weights) and the bias; the cluster
    assignment stays fixed. The codebook stays fp32 under ``module.half()`` / ``.to(dtype)`` (the
    bias follows), so a model converted to bf16 runs on bf16 inputs.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        bits: int = 4,
        per_channel: bool = False,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        check_bits(bits)
        check_compute_dtype(dtype, "SharedLinear")
        if not isinstance(per_channel, bool):  # "no" would have meant True
            raise TypeError(f"per_channel must be a bool, got {per_channel!r}")
        F.SHARED_LINEAR_BACKENDS.check(backend)
        for v, nm in ((in_features, "in_features"), (out_features, "out_features")):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{nm} must be a non-negative int, got {v!r}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.per_channel, self.backend = bits, bool(per_channel), backend
        width = (in_features + 1) // 2 if bits <= 4 else in_features
        self.register_buffer(
            "indices", torch.zeros(out_features, width, dtype=torch.uint8, device=device)
        )
        cb_shape = (out_features, 2**bits) if per_channel else (2**bits,)
        self.codebook = nn.Parameter(torch.zeros(cb_shape, dtype=torch.float32, device=device))
        self.bias = (
            nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        )

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, bits: int = 4, per_channel: bool = False, iters: int = 100,
        backend: str = "auto", input_moment=None, damp: float = 1.0,
    ) -> "SharedLinear":
        """Cluster ``linear``'s weights with k-means (zeros kept as the fixed cluster 0).
        ``linear`` is an ``nn.Linear`` or a Hugging Face ``Conv1D`` (GPT-2's layers).

        ``input_moment`` (optional, ``(in_features, in_features)``): E[x x^T] of the layer's
        inputs on calibration data; the indices are then chosen for output error rather than
        weight error (``fastkd.sharing.calibrated_assign``, damped by ``damp``)."""
        from ..sharing import calibrated_assign, kmeans_1d

        original, linear = linear, as_linear(linear, "SharedLinear.from_linear")
        w = linear.weight.detach()
        # its forward computes in the bias's (and the input's) dtype
        check_compute_dtype(w.dtype if linear.bias is None else linear.bias.dtype, "SharedLinear")
        require_values(w, "SharedLinear.from_linear (k-means over the weights)")
        if not torch.isfinite(w).all():
            raise ValueError("the weight contains inf or NaN; cannot cluster it")
        out = cls(
            linear.in_features, linear.out_features, linear.bias is not None, bits, per_channel,
            backend, device=w.device,
        )
        k = 2**bits - 1
        rows = w.float() if per_channel else w.float().reshape(1, -1)
        nonzero = rows != 0
        cent, assign = kmeans_1d(rows, k, valid=nonzero, iters=iters)
        if input_moment is None:
            idx = torch.where(nonzero, assign + 1, torch.zeros_like(assign)).reshape(w.shape)
        else:
            idx = calibrated_assign(w, cent, input_moment.to(w.device), w != 0, damp=damp) + 1
        cb = torch.cat([torch.zeros_like(cent[:, :1]), cent], dim=1)
        with torch.no_grad():
            out.codebook.copy_(cb if per_channel else cb[0])
            out.indices.copy_(pack_indices(idx.to(torch.uint8), bits))
            if linear.bias is not None:
                out.bias = nn.Parameter(linear.bias.detach().clone(),
                                        requires_grad=linear.bias.requires_grad)
        # a frozen layer (the base model under PEFT, a frozen encoder) stays frozen: the
        # codebook trains where the weight did
        out.codebook.requires_grad_(linear.weight.requires_grad)
        out.train(linear.training)
        return remember_layout(out, original)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        if not refuse_bad_indices(self, state_dict, prefix, ("indices",), self.bits, error_msgs):
            return
        fp32_state(state_dict, prefix, ("codebook",))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _apply(self, fn, *args, **kwargs):
        # module.half() / .to(bfloat16) would round the fp32 codebook, which the op requires:
        # keep it (and a gradient it holds) fp32, and let it follow device moves only.
        grad = self.codebook.grad
        data, grad = self.codebook.data, grad.data if grad is not None else None  # old storage
        super()._apply(fn, *args, **kwargs)
        moved = self.codebook
        if moved.dtype != torch.float32:
            moved.data = data.to(device=moved.device)
            moved.grad = grad.to(device=moved.device) if grad is not None else None
        return self

    @property
    def weight(self) -> Tensor:
        """The fp32 weight this layer multiplies by, looked up afresh at each access (the layer
        holds no float weight). For code written against ``nn.Linear`` that reads
        ``layer.weight``: T5's MLP reads ``wo.weight.dtype`` in every forward and failed on a
        SharedLinear without it. Assigning to it is an error: the layer's values are the
        codebook and the indices."""
        return self.dequantized_weight()

    def dequantized_weight(self) -> Tensor:
        """The fp32 (out_features, in_features) weight this layer multiplies by."""
        return shared_dequantize(self.indices, self.codebook, self.in_features, self.bits)

    def to_linear(self, dtype: Optional[torch.dtype] = None) -> nn.Linear:
        """A plain ``nn.Linear`` holding the weight looked up in the codebook (a copy; see
        :func:`fastkd.decompress_` for a whole model), in ``dtype`` (default: the bias's dtype,
        else fp32). Same outputs, to the rounding of ``dtype``, at dense speed and with dense
        size: for running a model shipped compressed."""
        return float_linear(self, self.dequantized_weight(), dtype)

    def nbytes(self) -> int:
        """Bytes of the layer's state: packed indices, codebook and bias."""
        tensors = [self.indices, self.codebook] + ([self.bias] if self.bias is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def forward(self, x: Tensor) -> Tensor:
        # its indices were checked where they came from (clustering, a checked load)
        return F._shared_linear(
            x, self.indices, self.codebook, self.bias, in_features=self.in_features,
            bits=self.bits, backend=self.backend, check_codes=False,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, bits={self.bits}, per_channel={self.per_channel}"
        )
