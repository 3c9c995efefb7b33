"""Whole-model int8 quantization: swap ``nn.Linear`` layers for :class:`fastkd.nn.Int8Linear`."""

from __future__ import annotations

import numbers
import warnings
from typing import Any, Callable, Optional

import torch
from torch import nn

from . import functional as F
from . import hf
from ._calibration import check_calibration, input_statistics
from .nn._linear_like import (
    _selected,
    adapter_layers,
    as_linear,
    shown,
    guard_peft_bases,
    one_answer_per_layer,
    refuse_peft_wrapped_experts,
    is_replaceable_linear,
    refuse_distributed,
    tied_elsewhere,
    unwrapped_model,
    warn_compressed_left,
    warn_stacked_weights_left,
    warn_untied,
)
from .nn.int8_experts import Int8Experts
from .nn.masked_experts import MaskedExperts, is_experts_to_prune
from .nn.int8_linear import Int8Linear, _check_mode

FilterFn = Callable[[nn.Module, str], bool]


def quantize_(
    model: nn.Module,
    mode: str = "w8a8",
    filter_fn: Optional[FilterFn] = None,
    *,
    backend: str = "auto",
    smooth: Optional[float] = None,
    calibration: Any = None,
    damp: float = 0.1,
    calibrate_codes: bool = True,
) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` in ``model`` for which ``filter_fn(module, name)``
    is true (all of them without a filter) by ``Int8Linear.from_linear(module, mode)``. Hugging
    Face ``Conv1D`` layers (GPT-2's attention and MLP projections) count as linears too, and so do
    pruned ``fastkd.nn.MaskedLinear`` layers (their ``W o M`` is quantized; pruned weights are
    int8 zeros). ``Int8Linear`` / ``Int8Experts`` layers of the other mode switch to ``mode``:
    the weight codes are the same in both, the mode is how activations are taken.

    A linear whose weight another module holds too (an lm_head tied to the input embedding) is
    quantized as well, which unties it: the embedding keeps its float weight, so the model holds
    both (a warning says which); ``filter_fn`` can leave it out to keep the tie.

    The experts of a Mixture-of-Experts block, which transformers holds in 3-D parameters
    (Mixtral, Qwen-MoE, DeepSeek-V3, gpt-oss: a module built with
    ``use_experts_implementation``; Llama 4's experts), become :class:`fastkd.nn.Int8Experts` (int8 codes per
    expert and output channel; the filter sees the experts module, and one that fails on it,
    written for linears, does not leave it out). Routers stay float.

    ``calibration`` (optional): representative inputs, as ``share_weights_`` takes them (a
    callable that runs the model, or an iterable of batches in the Distiller's convention). The
    float model runs them once; then each selected linear's codes are chosen for its output error
    on those inputs instead of being rounded one by one (GPTQ, Frantar et al. 2023: the same
    per-channel scales, the rounding error of each column pushed onto the columns not yet
    quantized through E[x x^T], damped by ``damp`` relative to the mean input power, and a Python
    loop over the input columns). On all-MiniLM-L6-v2 with six calibration sentences, held-out
    inputs of one to three words went from cosine 0.9965 to 0.9989 (w8a16;
    tests/test_int8_linear.py); ``damp`` (finite, > 0; default 0.1, where share_weights_ has
    1.0) from 0.01 to 1 all did about as well. Memory: the second
    moments of every selected layer are held at once, in_features^2 x 8 bytes each on the layer's
    device (summed over the layers: ~79 GB for all linears of an 8B Llama); quantize a large
    model in several calls with ``filter_fn`` (a block or a few at a time: later calls then
    calibrate on the already quantized earlier layers, as GPTQ does), or pass
    ``calibrate_codes=False`` to round to nearest and use the calibration for ``smooth`` alone
    (a few floats per input channel).

    ``smooth`` (``"w8a8"`` only; with ``calibration``): SmoothQuant (Xiao et al. 2023) with
    migration strength ``smooth`` = alpha in ``(0, 1]``. Per input channel k of each selected
    linear, ``s_k = max|x_k|^alpha / max_n |W_nk|^(1 - alpha)`` over the calibration inputs;
    the codes quantize ``W diag(s)`` and the layer divides its input by s (in fp32, inside the
    activation quantization pass; the product is the same). Outlier channels of the
    activations, which set each token's int8 scale, shrink towards the weight's range: on
    all-MiniLM-L6-v2 with short inputs (where the special tokens dominate) the embedding cosine
    went from 0.975 to 0.994 at alpha = 0.5. A layer the calibration never runs keeps plain rounding and no smoothing;
    layers that were already ``Int8Linear`` (their float weights are gone) and
    Mixture-of-Experts experts (their inputs are routed per token) are not calibrated either: a
    warning names each of these.

    ``name`` is the module's qualified name in ``model`` (``"encoder.layer.0.attention.self.query"``).
    ``model`` itself may be an ``nn.Linear``; then it cannot be replaced in place and a
    ``ValueError`` says to use ``Int8Linear.from_linear``. Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_ expects an nn.Module, got {type(model).__name__}")
    refuse_distributed(model, "quantize_")
    if unwrapped_model(model) is not model:  # torch.compile / DataParallel: the filter sees the
        quantize_(unwrapped_model(model), mode, filter_fn, backend=backend,  # model's own names
                  smooth=smooth, calibration=calibration, damp=damp,
                  calibrate_codes=calibrate_codes)
        return model
    _check_mode(mode)
    _check_calibration_args(mode, smooth, calibration, damp, calibrate_codes)
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError("filter_fn must be callable as filter_fn(module, name) -> bool")
    filter_fn = one_answer_per_layer("quantize_", model, filter_fn)
    if is_replaceable_linear(model, pruned=True):
        raise ValueError(
            "quantize_ replaces submodules in place and cannot replace the model itself; "
            "use fastkd.nn.Int8Linear.from_linear(linear) for a bare nn.Linear"
        )
    # Collect first, then swap: replacing while iterating named_modules() would mutate the tree
    # under the iterator.
    # nn.Linear, Hugging Face Conv1D and subclasses computing the same product (is_replaceable_
    # linear): nn.MultiheadAttention's out_proj, whose weight its parent reads, is not one.
    adapters = adapter_layers(model)  # PEFT's LoRA weights stay float and trainable
    targets = [
        (name, module)
        for name, module in model.named_modules(remove_duplicate=False)
        if is_replaceable_linear(module, pruned=True) and name and name not in adapters
        and (filter_fn is None or filter_fn(module, name))
    ]
    # a Mixture-of-Experts block's experts, held in 3-D parameters by transformers
    # (pruned ones, MaskedExperts, quantized from W o M: their pruned weights become code 0)
    experts = [(name, module) for name, module in model.named_modules(remove_duplicate=False)
               if name and is_experts_to_prune(module) and _selected(filter_fn, module, name)]
    refuse_peft_wrapped_experts("quantize_", model, [name for name, _ in experts])
    warn_untied("quantize_", tied_elsewhere(model, targets))
    guard_peft_bases("quantize_", model, [name for name, _ in targets])
    warn_stacked_weights_left(
        "quantize_", model,
        lambda m, n: not is_experts_to_prune(m) and (filter_fn is None or filter_fn(m, n)))
    warn_compressed_left("quantize_", model, filter_fn, ("SharedLinear", "SharedExperts"),
                         "a weight-shared layer is not quantized again (its codebook is already "
                         "the compressed form)")
    # layers quantize_ made before, in the other mode: the weight codes are the same in both
    # modes (the mode is how activations are taken), so they switch; they were left silently
    switch = [m for name, m in model.named_modules()
              if isinstance(m, (Int8Linear, Int8Experts)) and m.mode != mode
              and _selected(filter_fn, m, name)]
    factors, moments = ({}, {}) if calibration is None else \
        _calibrate(model, targets, smooth, calibration, calibrate_codes)
    if calibration is not None:
        left = [n for n, m in model.named_modules() if isinstance(m, (Int8Linear, Int8Experts))
                and _selected(filter_fn, m, n)] + [n for n, _ in experts]
        if left:  # (the calibration ran, and changed nothing for these)
            warnings.warn(f"quantize_: {len(left)} layer(s) are not calibrated ({shown(left)}): "
                          "Mixture-of-Experts experts and layers already int8 keep plain "
                          "rounding and no smoothing", stacklevel=2)
    swapped: dict = {}  # a linear shared under several names becomes one shared Int8Linear
    for name, module in targets:  # every layer first: a bad one leaves the model untouched
        if id(module) not in swapped:
            swapped[id(module)] = Int8Linear.from_linear(
                module, mode=mode, backend=backend, smooth_scale=factors.get(name),
                input_moment=moments.get(name), damp=damp)
    for _, module in experts:
        if id(module) not in swapped:
            dense = module.to_experts() if isinstance(module, MaskedExperts) else module
            swapped[id(module)] = Int8Experts.from_experts(dense, mode=mode, backend=backend)
    if mode == "w8a8":  # here, not at the first forward of a model already swapped
        too_wide = [m for m in [*swapped.values(), *switch]
                    if (m.in_features if isinstance(m, Int8Linear) else m.widest_input())
                    > F._INT8_MAX_K_W8A8]
        if too_wide:
            raise ValueError(f"w8a8 accumulates in int32, which can overflow for K > "
                             f"{F._INT8_MAX_K_W8A8}: {len(too_wide)} layer(s) are that wide; "
                             "quantize them with mode='w8a16', or leave them out with filter_fn "
                             "(nothing was changed)")
    for name, module in targets + experts:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, swapped[id(module)])
    for m in switch:
        m.mode = mode
    hf.record(model)
    return model


def _check_calibration_args(mode: str, smooth, calibration, damp, calibrate_codes) -> None:
    if not isinstance(calibrate_codes, bool):
        raise TypeError(f"calibrate_codes must be a bool, got {calibrate_codes!r}")
    if calibration is not None and smooth is None and not calibrate_codes:
        raise ValueError("calibration with calibrate_codes=False and no smooth would run the model "
                         "for nothing: pass smooth=alpha, or leave calibration out")
    if calibration is not None:
        check_calibration(calibration)
        if isinstance(damp, bool) or not isinstance(damp, numbers.Real) \
                or not 0.0 < float(damp) < float("inf"):
            raise ValueError(f"damp must be a finite number > 0, got {damp!r}")
    if smooth is None:
        return
    if mode != "w8a8":
        raise ValueError(f"smooth (SmoothQuant) applies to mode='w8a8': it eases the activations' "
                         f"quantization, and mode={mode!r} keeps activations float")
    if isinstance(smooth, bool) or not isinstance(smooth, numbers.Real) \
            or not 0.0 < float(smooth) <= 1.0:
        raise ValueError(f"smooth (the migration strength alpha) must be a number in (0, 1], "
                         f"got {smooth!r}")
    if calibration is None:
        raise ValueError("smooth needs calibration: representative inputs (a callable taking "
                         "the model, or an iterable of batches) to measure each layer's "
                         "activation range")


def _calibrate(model: nn.Module, targets, alpha, calibration, with_moments: bool) -> tuple:
    """One run of ``calibration`` on the float model: (name -> SmoothQuant factors s, fp32
    (in_features,), when ``alpha`` is not None; name -> E[x x^T], float64, when
    ``with_moments``) for the targets it ran. s_k = max|x_k|^alpha / max_n |W_nk|^(1 - alpha),
    1 where a channel's input was always 0."""
    stats = input_statistics(model, targets, calibration, moments=with_moments,
                             amax=alpha is not None)
    bad = [n for n, ok in stats["finite"].items() if not ok]
    if bad:
        raise ValueError(f"the calibration inputs of {shown(bad)} are not finite (inf/NaN "
                         "activations): they cannot set scales or weigh errors (nothing was "
                         "changed)")
    ran = stats["finite"].keys()  # (every layer that received a row has a finiteness flag)
    moments, amax = stats["moments"], stats["amax"]
    factors = {}
    for name, module in targets:
        if alpha is None or name not in ran:
            continue
        w = as_linear(module, "quantize_").weight.detach().float()
        w_max = w.abs().amax(0).clamp_min(1e-5)
        a = amax[name].to(w.device)
        s = a.clamp_min(1e-5).pow(float(alpha)) / w_max.pow(1.0 - float(alpha))
        factors[name] = torch.where(a > 0, s, torch.ones_like(s))
    missed = [n for n, _ in targets if n not in ran]
    if missed:
        warnings.warn(f"quantize_: the calibration never ran {len(missed)} layer(s) "
                      f"({shown(missed)}); they keep plain rounding"
                      + (" and no smoothing" if alpha is not None else ""), stacklevel=3)
    return factors, moments
