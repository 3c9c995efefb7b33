from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .. import functional as F
from .._backend import check_backend
from .._validate import check_compute_dtype
from ._linear_like import as_linear, remember_layout, require_values, torch_pruned
from ..prune import magnitude_mask, pattern_name, prune_further
from ..reference.masked_linear import MaskTiles, build_tile_map


class MaskedLinear(nn.Module):
    """``nn.Linear`` with a fixed bool sparsity mask: ``y = x (W o M)^T + b``.

    ``weight`` is a Parameter, ``bias`` an optional Parameter and ``mask`` a bool buffer (saved in
    the state_dict). Pruned weights get exactly zero gradient, and ``from_linear`` zeroes them, so
    they stay exactly zero under SGD, momentum, Adam and AdamW with weight decay.

    Where a sparse kernel runs (backend "cuda" or "triton", or "auto" where it picks one), the tile
    map of the mask (which 64x64 weight tiles hold a kept entry) is built once, cached and passed
    to it; it is rebuilt when the mask changes (an in-place edit, ``load_state_dict``, ``.to()``),
    or explicitly with :meth:`set_mask_`. The change is seen through the mask tensor's version
    counter, which writes through ``mask.data`` or a numpy view bypass: edit the mask itself
    (``layer.mask[i, j] = False`` under ``torch.no_grad()``) or call ``set_mask_``; otherwise the
    kernel may read a tile it still thinks fully kept without its mask. Under ``torch.compile``
    the cached map is used as it is: call ``set_mask_`` (which builds the new map at once) after
    changing the mask.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        backend: str = "auto",
    ):
        super().__init__()
        check_backend(backend)
        check_compute_dtype(dtype, "MaskedLinear")
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.backend = backend
        self.pattern: Optional[str] = None  # how the mask was made, for repr only
        self.weight = nn.Parameter(torch.empty((out_features, in_features), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.register_buffer(
            "mask", torch.ones((out_features, in_features), dtype=torch.bool, device=device)
        )
        self._tiles: Optional[MaskTiles] = None
        self._tiles_key = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise as ``nn.Linear`` does (the mask is left as it is)."""
        # nn.Linear's initialisation, so a fresh MaskedLinear with a full mask is an nn.Linear.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.in_features
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)
        with torch.no_grad():
            self.weight.masked_fill_(~self.mask, 0)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        mask: Optional[Tensor] = None,
        *,
        sparsity: Optional[float] = None,
        pattern="unstructured",
        backend: str = "auto",
    ) -> "MaskedLinear":
        """A MaskedLinear with ``linear``'s weight and bias (copied) and a mask that is, in order:
        ``mask`` if given; else ``magnitude_mask(weight, sparsity, pattern)`` if a sparsity is
        given or the pattern is N:M (on a module pruned with ``torch.nn.utils.prune``: of its
        pruned weight, so what its ``weight_mask`` pruned stays pruned, ranked first); else the
        ``weight_mask`` of such a module (its ``weight_orig`` is used); else all True. Pruned weights are
        set to zero. ``linear`` is an ``nn.Linear`` or a Hugging Face ``Conv1D`` (GPT-2's layers;
        a ``mask`` for it is given in the ``(out_features, in_features)`` layout)."""
        original, linear = linear, as_linear(linear, "MaskedLinear.from_linear")
        if mask is not None and sparsity is not None:
            raise ValueError("pass either mask or sparsity, not both")
        pruned_by_torch = torch_pruned(linear)
        weight = linear.weight_orig if pruned_by_torch else linear.weight
        weight = weight.detach()
        is_nm = isinstance(pattern, str) and ":" in pattern
        made_by = None
        if mask is not None:
            if not isinstance(mask, Tensor):
                raise TypeError(f"mask must be a tensor, got {type(mask).__name__}")
            if tuple(mask.shape) != tuple(weight.shape):
                raise ValueError(
                    f"mask shape {tuple(mask.shape)} must equal weight shape {tuple(weight.shape)}"
                )
            if mask.dtype != torch.bool:
                if mask.is_floating_point() and not bool(((mask == 0) | (mask == 1)).all()):
                    raise ValueError("a non-bool mask may hold only 0 and 1")
                mask = mask != 0
            made_by = "given"
        elif sparsity is not None or is_nm:
            require_values(weight, "MaskedLinear.from_linear with a sparsity (a magnitude mask)")
            if pruned_by_torch:  # pruned further: what torch.nn.utils.prune pruned stays pruned
                mask = prune_further(weight, linear.weight_mask.detach(), sparsity, pattern)
            else:
                mask = magnitude_mask(weight, sparsity, pattern)
            made_by = pattern_name(pattern)
        elif pruned_by_torch:
            mask = linear.weight_mask.detach() != 0
            made_by = "torch.nn.utils.prune"
        else:
            mask = torch.ones_like(weight, dtype=torch.bool)
        module = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
            backend=backend,
        )
        with torch.no_grad():
            module.mask.copy_(mask.to(weight.device))
            module.weight.copy_(weight.masked_fill(~module.mask, 0))
            if linear.bias is not None:
                module.bias.copy_(linear.bias.detach())
        module.pattern = made_by
        # a frozen layer (the base model under PEFT, a frozen encoder) stays frozen
        module.weight.requires_grad_(linear.weight.requires_grad)
        if linear.bias is not None:
            module.bias.requires_grad_(linear.bias.requires_grad)
        module.train(linear.training)
        return remember_layout(module, original)

    @torch.no_grad()
    def set_mask_(self, mask: Tensor) -> "MaskedLinear":
        """Replace the mask (bool or 0/1, the weight's shape), zero the newly pruned weights and
        rebuild the tile map (where a sparse kernel will read one)."""
        if not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(self.weight.shape):
            raise ValueError(f"mask must be a tensor of shape {tuple(self.weight.shape)}")
        self.mask.copy_(mask.to(self.mask.device) != 0)
        self.weight.masked_fill_(~self.mask, 0)
        had_map = self._tiles is not None
        self._tiles = None
        self._tiles_key = None
        if (had_map or self._tiles_wanted()) and self.mask.numel():
            self.tile_map()  # now, not on next use: a compiled call cannot build it
        return self

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing the same map, its weight ``W o M`` (a copy; see
        :func:`fastkd.fold_masks_` for a whole model)."""
        return as_linear(self, "MaskedLinear.to_linear")

    def masked_weight(self) -> Tensor:
        """``W o M`` (detached): the weight this layer multiplies by, pruned entries exact zeros
        whatever the stored weight holds there."""
        from ..reference.masked_linear import zero_pruned

        return zero_pruned(self.weight.detach(), self.mask.to(self.weight.device))

    @property
    def density(self) -> float:
        """Fraction of weights kept (reads the mask: one device sync); nan on the meta device."""
        n = self.mask.numel()
        if self.mask.is_meta:
            return math.nan
        return float(self.mask.sum().item()) / n if n else 1.0

    def tile_map(self) -> MaskTiles:
        """The cached tile map of the mask, rebuilt when the mask changed."""
        mask = self.mask
        # An inference tensor (a layer built or moved under torch.inference_mode) has no version
        # counter: its map is keyed on storage alone, so edit such a mask through set_mask_.
        version = None if mask.is_inference() else mask._version
        key = (version, mask.data_ptr(), mask.device)
        if self._tiles is None or self._tiles_key != key:
            self._tiles = build_tile_map(self.mask)
            self._tiles_key = key
        return self._tiles

    def _sparse_kernel_for(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether masked_linear would run a sparse kernel (which reads the tile map) here."""
        if device.type == "meta" or self.mask.numel() == 0:
            return False  # meta shapes, or masked_linear's empty-weight shortcut: no map
        try:
            impl = F.MASKED_LINEAR_BACKENDS.select(
                self.backend, device, F.masked_linear_reasons(dtype, device)
            )
        except RuntimeError:
            return False  # masked_linear raises with the reason
        return impl in F.MASKED_SPARSE_BACKENDS

    def _tiles_wanted(self) -> bool:
        """Whether a forward on the module's own device and dtype would read the tile map."""
        return self._sparse_kernel_for(self.weight.device, self.weight.dtype)

    def _tiles_for(self, x: Tensor) -> Optional[MaskTiles]:
        # Only the sparse kernels (cuda, triton) read the map; the dense path never pays for it.
        if not isinstance(x, Tensor) or x.device.type == "meta":
            return None  # masked_linear says what is wrong with x, or runs the meta shapes
        dtype = x.dtype
        if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
            dtype = torch.get_autocast_dtype(x.device.type)  # what masked_linear will compute in
        if not self._sparse_kernel_for(x.device, dtype):
            return None
        if torch.compiler.is_compiling():
            return self._tiles
        return self.tile_map()

    def forward(self, x: Tensor) -> Tensor:
        return F.masked_linear(
            x, self.weight, self.mask, self.bias, self.backend, tile_map=self._tiles_for(x)
        )

    def extra_repr(self) -> str:
        parts = [
            f"in_features={self.in_features}",
            f"out_features={self.out_features}",
            f"bias={self.bias is not None}",
            f"density={self.density:.4f}",
        ]
        if self.pattern:
            parts.append(f"pattern={self.pattern!r}")
        if self.backend != "auto":
            parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)
