"""transformers' ``save_pretrained`` / ``from_pretrained`` for models that fastkd changed.

A Hugging Face model that ``quantize_``, ``sparsify_``, ``share_weights_``, ``shrink_``,
``load_compressed`` or ``decompress_`` changed gets a ``config.quantization_config`` with
``quant_method="fastkd"`` (its compressed layers and widths: the header ``save_compressed``
writes) and an ``hf_quantizer`` that records them again when the model is saved, so a layer
swapped by hand after the last fastkd call is saved as it is. ``from_pretrained`` then finds
fastkd's quantizer, rebuilds those layers in the empty model and loads the int8 codes, masks and
codebooks into them, instead of reading int8 codes as float weights.

Nothing here imports transformers at ``import fastkd``: the quantizer is registered when
transformers loads its quantizer registry (an import hook on that one module) or when fastkd
changes a transformers model, whichever comes first. Without fastkd imported, transformers logs
"Unknown quantization type, got fastkd" and loads float layers: import fastkd first.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import warnings

from torch import nn

from .nn._linear_like import unwrapped_model

QUANT_METHOD = "fastkd"
_REGISTRY_MODULE = "transformers.quantizers.auto"
_registered = False


def supported() -> bool:
    """Whether the installed transformers is one fastkd's quantizer was built against (5.x:
    its loading API, its tied-weights map)."""
    import transformers

    return int(transformers.__version__.split(".")[0]) >= 5


def register() -> None:
    """Register fastkd's quantization config and quantizer with transformers (imports it)."""
    global _registered
    if _registered:
        return
    if not supported():
        raise RuntimeError("fastkd's transformers quantizer needs transformers >= 5")
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
        register_quantization_config,
        register_quantizer,
    )

    from ._hf_quantizer import FastkdConfig, FastkdHfQuantizer

    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) not in (None, FastkdConfig):
        raise RuntimeError(f"another package registered transformers quantization method "
                           f"{QUANT_METHOD!r}")
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(FastkdConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(FastkdHfQuantizer)
    _registered = True


_failure: list = []  # why registering failed, once known


def _register_quietly(warn: bool) -> bool:
    """Register; on failure remember why and, with ``warn``, say it once per process."""
    if _registered:
        return True
    if not _failure:
        try:
            register()
            return True
        except Exception as e:  # an older or newer transformers than this fastkd knows
            _failure.append(repr(e))
    if warn and len(_failure) == 1:
        _failure.append("warned")
        warnings.warn(
            f"fastkd cannot register its transformers quantizer ({_failure[0]}): "
            "save_pretrained/from_pretrained will read fastkd's layers as float layers; "
            "ship with fastkd.save_compressed / load_compressed", RuntimeWarning, stacklevel=4)
    return False


class _RegisterWhenImported(importlib.abc.MetaPathFinder):
    """Runs ``register`` right after transformers executes its quantizer registry module."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _REGISTRY_MODULE:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)  # once
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register_quietly(warn=False)  # said when fastkd changes a model, if it matters

        spec.loader.exec_module = exec_then_register  # this module's own loader instance
        return spec


def install() -> None:
    """Called by ``import fastkd``: register now if transformers has its registry loaded,
    else when it loads it."""
    if _REGISTRY_MODULE in sys.modules:
        _register_quietly(warn=False)
    elif not any(isinstance(f, _RegisterWhenImported) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterWhenImported())


def status() -> str:
    """For ``fastkd.info()``: whether ``from_pretrained`` rebuilds fastkd's layers."""
    if _registered:
        return "registered"
    if _failure:
        return f"not registered: {_failure[0]}"
    return "registers when transformers loads its quantizers"


def _is_transformers_model(model: nn.Module) -> bool:
    transformers = sys.modules.get("transformers")
    modeling = sys.modules.get("transformers.modeling_utils")
    if transformers is None or modeling is None:
        return False  # a model of transformers' would have imported both
    return isinstance(model, modeling.PreTrainedModel)


def _ours(quantizer) -> bool:
    return type(quantizer).__name__ == "FastkdHfQuantizer"


def record(model: nn.Module, *, shrunk: bool = False) -> None:
    """After fastkd changed ``model``: if it is a transformers model (or wraps one), (re)write
    what ``from_pretrained`` needs to rebuild it, or remove it once nothing is left to
    rebuild."""
    model = unwrapped_model(model)
    if not _is_transformers_model(model):
        inner = _outermost_transformers_models(model)
        for m in inner:  # a model of the user's that holds transformers models
            record(m, shrunk=shrunk)
        if not inner:
            _warn_if_part_of_one(model)
        return
    current = getattr(model, "hf_quantizer", None)
    if current is not None and not _ours(current):
        warnings.warn(
            f"this model was loaded with transformers' {type(current).__name__}; fastkd leaves "
            "its quantization_config as it is, so save_pretrained/from_pretrained will not "
            "rebuild fastkd's layers: use fastkd.save_compressed / load_compressed",
            UserWarning, stacklevel=3)
        return
    if not _register_quietly(warn=True):
        return
    from ._hf_quantizer import FastkdConfig, FastkdHfQuantizer
    from .checkpoint import compressed_header

    was_shrunk = current is not None and current.quantization_config.shrunk
    header = compressed_header(model)
    if not header["layers"] and not (shrunk or was_shrunk):
        if current is not None:
            forget(model)
        return
    config = FastkdConfig(**header, shrunk=shrunk or was_shrunk)
    model.config.quantization_config = config
    # A composite model's towers load alone from the same checkpoint (CLIPVisionModel from a
    # CLIPModel's), reading only their own sub-config: without the header there, transformers
    # never called the quantizer and read int8 codes as float weights. The paths stay the
    # composite's; the quantizer renames them as transformers renames the weights.
    for sub in _sub_configs(model.config):
        sub.quantization_config = config
    model.hf_quantizer = FastkdHfQuantizer(config, pre_quantized=True)


def _sub_configs(config) -> list:
    """The nested configs of a composite model's config (``text_config``, ``vision_config``)."""
    names = getattr(config, "sub_configs", None)
    if not isinstance(names, dict):
        return []
    subs = [getattr(config, name, None) for name in names]
    return [s for s in subs if s is not None and hasattr(s, "to_dict") and s is not config]


def _outermost_transformers_models(model: nn.Module) -> list:
    if sys.modules.get("transformers.modeling_utils") is None:
        return []
    found = []
    for name, m in model.named_modules():
        if _is_transformers_model(m) and not any(name.startswith(p + ".") for p, _ in found):
            found.append((name, m))
    return [m for _, m in found]


def _warn_if_part_of_one(part: nn.Module) -> None:
    """A swap on a submodule of a transformers model (``quantize_(model.model.layers[0])``)
    cannot reach the model that ``save_pretrained`` runs on, so nothing records the layers it
    made there: say so, unless that model already carries fastkd's record (whose quantizer
    records the layers again when it is saved)."""
    configuration = sys.modules.get("transformers.configuration_utils")
    if configuration is None:
        return
    config = next((m.config for m in part.modules()
                   if isinstance(getattr(m, "config", None), configuration.PretrainedConfig)),
                  None)
    if config is None:
        return
    qc = getattr(config, "quantization_config", None)
    if getattr(qc, "quant_method", None) == QUANT_METHOD:
        return
    from .checkpoint import _compressed_layers

    if not _compressed_layers(part):  # the layers alone: not the widths the header adds
        return
    warnings.warn(
        f"fastkd changed layers inside a {type(part).__name__}, a part of a transformers "
        "model: save_pretrained of the whole model will not know them, and from_pretrained "
        "would read their int8 codes, masks or codebooks as float weights. Run the swap on the "
        "whole model (filter_fn picks the layers), or ship with fastkd.save_compressed",
        UserWarning, stacklevel=4)


def forget(model: nn.Module) -> None:
    """Drop fastkd's quantization_config and quantizer from a transformers model."""
    if _ours(getattr(model, "hf_quantizer", None)):
        del model.hf_quantizer
    config = getattr(model, "config", None)
    for c in ([config] + _sub_configs(config)) if config is not None else []:
        qc = getattr(c, "quantization_config", None)
        # a loaded sub-config keeps it as the JSON's dict
        method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
        if method == QUANT_METHOD:
            del c.quantization_config
