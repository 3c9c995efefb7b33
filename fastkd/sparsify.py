"""``sparsify_``: prune every ``nn.Linear`` of a model in place, swapping in ``MaskedLinear``;
``fold_masks_``: the way back to plain ``nn.Linear`` layers holding ``W o M``."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from . import hf
from ._validate import check_compute_dtype
from .nn._linear_like import (
    _selected,
    adapter_layers,
    as_linear,
    guard_peft_bases,
    refuse_peft_wrapped_experts,
    is_hf_conv1d,
    is_masked_linear,
    is_replaceable_linear,
    refuse_distributed,
    require_values,
    shown,
    torch_pruned,
    unpack_layers_,
    unwrapped_model,
    warn_compressed_left,
    warn_stacked_weights_left,
)
from .nn.masked_experts import MaskedExperts, check_expert_pattern, is_experts_to_prune
from .nn.masked_linear import MaskedLinear
from .prune import (
    check_fits,
    global_magnitude_masks,
    _check_sparsity,
    parse_pattern,
    prune_further,
    pruned_again,
)


def sparsify_(
    model: nn.Module,
    sparsity: Optional[float] = 0.5,
    pattern="unstructured",
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
    *,
    backend: str = "auto",
    scope: str = "layer",
) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` for which ``filter_fn(module, name)`` is true (all of
    them without a filter) by a :class:`~fastkd.nn.MaskedLinear` holding its weights and a magnitude
    mask (:func:`fastkd.prune.magnitude_mask`, per layer); returns ``model``. Hugging Face
    ``Conv1D`` layers (GPT-2's attention and MLP projections) count as linears too.

    ``scope="global"`` (``"unstructured"`` only) ranks the weights of all those layers together
    instead (:func:`fastkd.prune.global_magnitude_masks`): ``sparsity`` of their entries go in
    all, the smallest magnitudes anywhere, so layers of small weights lose more than others (a
    layer can lose every weight: keep such layers out with ``filter_fn``).

    A layer that is already a ``MaskedLinear`` is pruned further, in place (gradual pruning:
    ``sparsify_(model, 0.3)``, fine-tune, ``sparsify_(model, 0.6)``, ...): its new mask keeps the
    largest ``|W o M|`` of the pattern, within the old mask, so the sparsity reaches the new value
    (or stays where it was if that was higher: pruned weights do not come back). The module and
    its parameters stay the same objects, so an optimizer over them carries on. (Momentum the
    optimizer built up for a newly pruned weight can still move its stored value; the mask keeps
    it out of every output, and quantize_, share_weights_ and shrink_ read ``W o M``.)

    The experts of a Mixture-of-Experts block, which transformers holds in 3-D parameters (the
    modules built with its ``use_experts_implementation``: Mixtral, Qwen-MoE, DeepSeek-V3,
    gpt-oss; and Llama 4's), become :class:`fastkd.nn.MaskedExperts`: each expert's matrices pruned by the same
    pattern (``scope="global"`` ranks them with everything else), pruned further on the next call.

    ``name`` is the module's qualified name (``"encoder.layer.0.attention.self.query"``). For N:M
    patterns pass ``sparsity=None`` or the implied value. Skipped, whatever the filter says: linears
    owned by ``nn.MultiheadAttention`` (it reads ``out_proj.weight`` directly, so a mask would be
    ignored) and linears whose weight is shared with another module (tied embeddings: pruning one
    would silently prune the other; a warning names them).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"sparsify_ takes an nn.Module, got {type(model).__name__}")
    refuse_distributed(model, "sparsify_")
    if unwrapped_model(model) is not model:  # torch.compile / DataParallel: the filter sees the
        sparsify_(unwrapped_model(model), sparsity, pattern, filter_fn,  # model's own names
                  backend=backend, scope=scope)
        return model
    kind, _ = parse_pattern(pattern)  # fail before touching the model
    if sparsity is None and kind != "nm":
        raise ValueError(f"pattern {pattern!r} needs a sparsity in [0, 1] (None is for N:M "
                         "patterns, whose sparsity is implied)")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError("filter_fn must be callable (module, name) -> bool")
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    if scope == "global" and kind != "unstructured":
        raise ValueError(f"scope='global' ranks single weights across layers: it takes the "
                         f"'unstructured' pattern, not {pattern!r}")
    # a Mixture-of-Experts block's experts, held in 3-D parameters by transformers
    experts = [(name, m) for name, m in model.named_modules()
               if name and is_experts_to_prune(m) and _selected(filter_fn, m, name)]
    # (pruned experts under LoRA on their weights prune further in place: the adapters stay)
    refuse_peft_wrapped_experts("sparsify_", model, [n for n, m in experts
                                                     if not isinstance(m, MaskedExperts)])
    for name, m in experts:  # before anything is pruned
        if scope == "layer":
            check_expert_pattern(m, sparsity, pattern)
        elif not all(bool(torch.isfinite(q.detach()).all()) for q in m.parameters()
                     if q.is_floating_point()):
            raise ValueError(f"sparsify_ cannot prune {name!r}: its weights have NaN or "
                             "infinite entries, which no magnitude ranks (nothing was pruned)")
    warn_stacked_weights_left(
        "sparsify_", model,
        lambda m, n: not is_experts_to_prune(m) and (filter_fn is None or filter_fn(m, n)))
    warn_compressed_left("sparsify_", model, filter_fn, ("Int8Linear", "SharedLinear",
                                                         "Int8Experts", "SharedExperts"),
                         "prune before quantize_ / share_weights_, which take MaskedLinear "
                         "layers and keep their pruned weights at zero")
    uses: dict = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    adapters = adapter_layers(model)  # PEFT's LoRA weights: not the model's to prune
    targets, names, tied = [], [], []
    for parent_name, parent in model.named_modules():
        if isinstance(parent, nn.MultiheadAttention):
            continue
        for child_name, child in parent.named_children():
            if not is_replaceable_linear(child, pruned=True):  # subclasses may override forward
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if name in adapters:
                continue
            if filter_fn is not None and not filter_fn(child, name):
                continue
            if uses.get(id(child.weight), 0) > 1:
                tied.append(name)
                continue
            targets.append((parent, child_name, child))
            names.append(name)
    if tied:
        import warnings

        warnings.warn(
            f"sparsify_ leaves {shown(tied)} dense: its weight is shared with another module "
            "(tied embeddings), which pruning it would prune too. Untie it first (a copy of "
            "the weight) to prune it, or leave it out with filter_fn to silence this.",
            stacklevel=2)
    guard_peft_bases("sparsify_", model, names)
    for (_, _, child), name in zip(targets, names):  # before anything is swapped or pruned
        _check_prunable(child, name, sparsity if scope == "layer" else None,
                        pattern if scope == "layer" else None)
    if scope == "global":
        _check_sparsity(sparsity)  # before any layer is swapped
        layers = []
        for parent, child_name, child in targets:
            if not isinstance(child, MaskedLinear):  # all kept, or a torch.nn.utils.prune mask
                child = MaskedLinear.from_linear(child, backend=backend)
                setattr(parent, child_name, child)
            layers.append(child)
        stacks = [_replace(model, name, m if isinstance(m, MaskedExperts) else MaskedExperts(m))
                  for name, m in experts]
        weights = [m.masked_weight() for m in layers]
        masks = [m.mask for m in layers]
        for stack in stacks:  # each expert projection as one more tensor in the ranking
            weights += [stack.masked_weight(p) for p in stack.projections]
            masks += [getattr(stack, f"{p}_mask") for p in stack.projections]
        if weights:
            keeps = iter(global_magnitude_masks(weights, sparsity, masks=masks))
            for layer in layers:
                layer.set_mask_(next(keeps))
            for stack in stacks:
                for p in stack.projections:
                    stack.set_mask_(p, next(keeps))
        hf.record(model)
        return model
    for parent, child_name, child in targets:
        if isinstance(child, MaskedLinear):
            # gradual pruning: prune further in place (the module, and the parameters an
            # optimizer holds, stay); already pruned weights are zeros of W o M, pruned first
            child.set_mask_(prune_further(child.weight, child.mask, sparsity, pattern))
            child.pattern = pruned_again(child.pattern, pattern)
            continue
        masked = MaskedLinear.from_linear(child, sparsity=sparsity, pattern=pattern, backend=backend)
        setattr(parent, child_name, masked)
    for name, m in experts:
        if isinstance(m, MaskedExperts):
            m.prune_(sparsity, pattern)  # gradual pruning, as for MaskedLinear
        else:
            _replace(model, name, MaskedExperts.from_experts(m, sparsity, pattern))
    hf.record(model)
    return model


def _check_prunable(child: nn.Module, name: str, sparsity, pattern) -> None:
    """What pruning ``child`` would raise, raised before any layer of the model is touched: a
    shape the pattern does not divide, weights without values or with non-finite ones (which
    no magnitude ranks). ``pattern`` None: the global ranking's checks only."""
    if isinstance(child, MaskedLinear):
        weight = child.weight
    else:
        weight = child.weight_orig if torch_pruned(child) else child.weight
        if is_hf_conv1d(child):
            weight = weight.t()
    try:
        check_compute_dtype(weight.dtype, "MaskedLinear")
        if pattern is not None:
            check_fits(tuple(weight.shape), sparsity, pattern)
        require_values(weight, "sparsify_")
        if weight.numel() and not bool(torch.isfinite(weight.detach()).all()):
            raise ValueError("its weight has NaN or infinite entries, which no magnitude ranks")
    except (ValueError, TypeError) as e:
        raise type(e)(f"sparsify_ cannot prune {name!r}: {e} (nothing was pruned)") from None


def _replace(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    return new


def fold_masks_(
    model: nn.Module, filter_fn: Optional[Callable[[nn.Module, str], bool]] = None
) -> nn.Module:
    """Replace every :class:`~fastkd.nn.MaskedLinear` of ``model`` (for which
    ``filter_fn(module, name)`` is true) by a plain ``nn.Linear`` holding ``W o M`` (pruned
    weights exact zeros; a Hugging Face ``Conv1D`` where the layer was made from one, so GPT-2's
    state_dict layout stays), and every :class:`~fastkd.nn.MaskedExperts` by the transformers
    experts module it came from holding ``W o M``, in place; returns ``model``.

    For shipping a pruned model when its training is over: the result needs nothing of fastkd,
    and runs at dense ``F.linear`` speed, where a ``MaskedLinear`` applies its mask on every call
    (two 1024 x 1024 layers at batch 1 on the 2-core CI CPU: 0.64 ms masked, 0.17 ms folded). A
    folded MaskedLinear gives the same bits; folded experts agree to rounding (their products
    are grouped differently). Nothing keeps pruned weights at zero any more: fine-tune the
    masked model, fold after. (``quantize_`` and ``share_weights_`` take ``MaskedLinear`` layers
    as they are.)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold_masks_ takes an nn.Module, got {type(model).__name__}")
    refuse_distributed(model, "fold_masks_")
    if unwrapped_model(model) is not model:
        fold_masks_(unwrapped_model(model), filter_fn)
        return model
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError("filter_fn must be callable (module, name) -> bool")
    if is_masked_linear(model):
        raise ValueError("fold_masks_ replaces submodules in place and cannot replace the model "
                         "itself; use MaskedLinear.to_linear()")
    unpack_layers_(
        model, lambda m, name: ((is_masked_linear(m) or isinstance(m, MaskedExperts))
                                and (filter_fn is None or filter_fn(m, name))),
        lambda masked: (masked.to_experts() if isinstance(masked, MaskedExperts)
                        else as_linear(masked, "fold_masks_")))
    hf.record(model)
    return model
