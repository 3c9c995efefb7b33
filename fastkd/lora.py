"""LoRA (peft) adapters on fastkd's compressed layers: train float adapters on an int8, pruned or
weight-shared base, as QLoRA does on 4-bit bases.

peft wraps only the layer types it knows; ``register_lora_layers(config)`` teaches a
``peft.LoraConfig`` fastkd's ``Int8Linear``, ``MaskedLinear`` and ``SharedLinear`` (peft's
custom-module API), so ``get_peft_model`` takes a model loaded compressed (``from_pretrained``
of a fastkd checkpoint, ``load_compressed``). The wrapper is peft's own LoRA ``Linear``: the
base layer's output plus ``B(A(dropout(x))) * scale``, adapters in their own dtype. What it
refuses: merging into a compressed base (int8 codes, a mask or a codebook cannot absorb a dense
update: ``fastkd.decompress_`` the model first, merge, compress again) and the LoRA variants that
read the base's float weight (DoRA and the like).
"""

from __future__ import annotations

import warnings

from peft.tuners.lora.layer import Linear as _PeftLoraLinear

__all__ = ["register_lora_layers", "LoraCompressedLinear"]


def _layer_types() -> tuple:
    from .nn.int8_linear import Int8Linear
    from .nn.masked_linear import MaskedLinear
    from .nn.shared_linear import SharedLinear

    return Int8Linear, MaskedLinear, SharedLinear


def _compressed(module) -> bool:
    return isinstance(module, _layer_types())


def _variants_asked(config, kwargs) -> list:
    """Names of LoRA variants a config (or older peft's keyword arguments) turns on."""
    flags = {"use_dora"}
    table = getattr(_PeftLoraLinear, "lora_variants", None)
    if isinstance(table, property):
        flags |= {name for key in table.fget(None) for name in key}
    return [f for f in sorted(flags) if kwargs.get(f) or getattr(config, f, None)]


class LoraCompressedLinear(_PeftLoraLinear):
    """peft's LoRA ``Linear`` around a fastkd layer; refuses merges into it and variants that
    need its float weight."""

    def __init__(self, base_layer, adapter_name, *args, **kwargs):
        with warnings.catch_warnings():  # peft: "Unsupported layer type ...": it is supported
            warnings.filterwarnings("ignore", message="Unsupported layer type")
            super().__init__(base_layer, adapter_name, *args, **kwargs)

    def update_layer(self, adapter_name, *args, **kwargs):
        asked = _variants_asked(kwargs.get("config"), kwargs)
        if asked and _compressed(self.get_base_layer()):
            raise ValueError(
                f"LoRA variant(s) {asked} read the base layer's float weight, which fastkd's "
                f"{type(self.get_base_layer()).__name__} holds compressed; use plain LoRA, or "
                "fastkd.decompress_ the model first")
        return super().update_layer(adapter_name, *args, **kwargs)

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        base = self.get_base_layer()
        if _compressed(base):
            raise ValueError(
                f"cannot merge a LoRA adapter into fastkd's {type(base).__name__}: its weight is "
                "held compressed (int8 codes, a mask, a codebook) and a dense update does not "
                "fit it. Keep the adapter unmerged, or call fastkd.decompress_(model) first "
                "(plain float layers), merge, and compress the merged model again")
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)


def register_lora_layers(config, model=None):
    """Let ``config`` (a ``peft.LoraConfig``) put LoRA adapters on fastkd's ``Int8Linear``,
    ``MaskedLinear`` and ``SharedLinear`` layers; returns ``config``. Pass it to
    ``get_peft_model``, or as ``config=`` to ``PeftModel.from_pretrained`` (peft does not save
    the registration with the adapter).

    ``target_modules="all-linear"`` needs ``model``: peft expands that shorthand to ``nn.Linear``
    and ``Conv1D`` layers only, which skipped every compressed layer (the adapters went to the
    few float linears left, a MoE router, or nowhere). With ``model`` it is expanded here to
    every linear layer, fastkd's included, leaving out the output embeddings (the lm head), as
    peft does."""
    register = getattr(config, "_register_custom_module", None)
    if register is None:
        raise TypeError("register_lora_layers takes a peft.LoraConfig of a peft with custom "
                        f"LoRA modules (peft >= 0.14), got {type(config).__name__}")
    if model is not None and not hasattr(model, "named_modules"):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    target = getattr(config, "target_modules", None)
    if isinstance(target, str) and target.lower() == "all-linear":
        if model is None:
            raise ValueError(
                "target_modules='all-linear' takes the model here: peft expands it to nn.Linear "
                "and Conv1D layers only, which leaves out fastkd's compressed layers; call "
                "register_lora_layers(config, model), or list the module names")
        config.target_modules = _all_linear_names(model)
    register({cls: LoraCompressedLinear for cls in _layer_types()})
    return config


def _all_linear_names(model) -> set:
    """Names of the linear layers of ``model`` (nn.Linear, transformers' Conv1D, fastkd's
    compressed layers) without its output embeddings."""
    import torch.nn as nn

    from .nn._linear_like import _is_tuner_layer, is_replaceable_linear

    head = getattr(model, "get_output_embeddings", lambda: None)()
    # no adapters on adapters: what sits inside peft's tuner layers stays out
    tuners = [name for name, m in model.named_modules() if name and _is_tuner_layer(m)]
    names = {name for name, m in model.named_modules()
             if name and m is not head and not any(name.startswith(t + ".") for t in tuners)
             and (isinstance(m, (nn.Linear, *_layer_types())) or is_replaceable_linear(m))}
    if not names:
        raise ValueError("target_modules='all-linear': the model has no linear layers")
    return names
