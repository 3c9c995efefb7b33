"""Compressed checkpoints: one safetensors file whose metadata holds a small JSON of the compressed
layers (type and settings per module path), rebuilt into an uncompressed skeleton on load.

Adding a compressed layer type is one ``register_compressed_layer`` call: how to read its settings,
and how to build an empty one (to be filled by the state dict) from the skeleton's ``nn.Linear``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import nn

from . import hf
from .nn._linear_like import (
    is_hf_conv1d,
    linear_of_class,
    module_paths,
    refuse_distributed,
    remember_layout,
    replace_everywhere,
    unpack_layers_,
    unwrapped_model,
)

__all__ = ["register_compressed_layer", "save_compressed", "load_compressed", "size_report",
           "decompress_"]

FORMAT = "fastkd.compressed/1"
_META_KEY = "fastkd"


@dataclass(frozen=True)
class _LayerSpec:
    cls: type
    settings: Callable[[nn.Module], dict]  # JSON-able settings of a compressed layer
    build: Callable[[dict, nn.Module], nn.Module]  # (settings, skeleton layer) -> empty layer


LAYER_REGISTRY: dict = {}


def register_compressed_layer(cls: type, settings: Callable, build: Callable) -> None:
    """Teach save/load_compressed a layer type (keyed by class name)."""
    LAYER_REGISTRY[cls.__name__] = _LayerSpec(cls, settings, build)


def _shared_linear_spec():
    from .nn.shared_linear import SharedLinear

    def settings(m):
        return {
            "in_features": m.in_features, "out_features": m.out_features,
            "bias": m.bias is not None, "bits": m.bits, "per_channel": m.per_channel,
            "backend": m.backend, "dtype": _dtype_name(m.bias),
        }

    def build(s, skeleton):
        return SharedLinear(
            s["in_features"], s["out_features"], bias=s["bias"], bits=s["bits"],
            per_channel=s["per_channel"], backend=s.get("backend", "auto"),
            device=_device_of(skeleton), dtype=getattr(torch, s.get("dtype", "float32")),
        )

    register_compressed_layer(SharedLinear, settings, build)


def _int8_linear_spec():
    from .nn.int8_linear import Int8Linear

    def settings(m):
        return {
            "in_features": m.in_features, "out_features": m.out_features,
            "bias": m.bias is not None, "mode": m.mode, "backend": m.backend,
            "dtype": _dtype_name(m.bias), "smooth": m.smooth_scale is not None,
        }

    def build(s, skeleton):
        return Int8Linear(
            s["in_features"], s["out_features"], bias=s["bias"], mode=s["mode"],
            backend=s.get("backend", "auto"), dtype=getattr(torch, s["dtype"]),
            device=_device_of(skeleton), smooth=bool(s.get("smooth", False)),
        )

    register_compressed_layer(Int8Linear, settings, build)


def _masked_linear_spec():
    from .nn.masked_linear import MaskedLinear

    def settings(m):
        return {
            "in_features": m.in_features, "out_features": m.out_features,
            "bias": m.bias is not None, "backend": m.backend,
            "dtype": str(m.weight.dtype).replace("torch.", ""),
        }

    def build(s, skeleton):
        return MaskedLinear(
            s["in_features"], s["out_features"], bias=s["bias"],
            backend=s.get("backend", "auto"), dtype=getattr(torch, s["dtype"]),
            device=_device_of(skeleton),
        )

    register_compressed_layer(MaskedLinear, settings, build)


def _int8_experts_spec():
    from .nn.int8_experts import Int8Experts

    def settings(m):
        return {"mode": m.mode, "backend": m.backend}

    def build(s, skeleton):
        # the skeleton's own experts module (meta weights are fine): shapes, flags, gate
        return Int8Experts(skeleton, mode=s["mode"], backend=s.get("backend", "auto"),
                           quantize=False)

    register_compressed_layer(Int8Experts, settings, build)


def _masked_experts_spec():
    from .nn.masked_experts import MaskedExperts

    def settings(m):
        return {"pattern": m.pattern}

    def build(s, skeleton):
        # the skeleton's own experts module (meta weights are fine): shapes, flags, gate
        masked = MaskedExperts(skeleton)
        masked.pattern = s.get("pattern")
        return masked

    register_compressed_layer(MaskedExperts, settings, build)


def _shared_experts_spec():
    from .nn.shared_experts import SharedExperts

    def settings(m):
        return {"bits": m.bits, "per_channel": m.per_channel, "backend": m.backend}

    def build(s, skeleton):
        # the skeleton's own experts module (meta weights are fine): shapes, flags, gate
        return SharedExperts(skeleton, bits=s["bits"], per_channel=s["per_channel"],
                             backend=s.get("backend", "auto"), cluster=False)

    register_compressed_layer(SharedExperts, settings, build)


_BUILTIN_SPECS = {
    "SharedLinear": _shared_linear_spec,
    "Int8Linear": _int8_linear_spec,
    "MaskedLinear": _masked_linear_spec,
    "Int8Experts": _int8_experts_spec,
    "MaskedExperts": _masked_experts_spec,
    "SharedExperts": _shared_experts_spec,
}


def _dtype_name(bias) -> str:  # a bias's dtype is the layer's float dtype; fp32 without one
    return str(bias.dtype if bias is not None else torch.float32).replace("torch.", "")


def _device_of(module: nn.Module):
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return None


def _ensure_builtin():
    for name, spec in _BUILTIN_SPECS.items():
        if name not in LAYER_REGISTRY:
            spec()


def _compressed_layers(model: nn.Module) -> dict:
    _ensure_builtin()
    out = {}
    for name, mod in model.named_modules():
        spec = LAYER_REGISTRY.get(type(mod).__name__)
        if spec is not None and type(mod) is spec.cls:
            out[name] = {"type": type(mod).__name__, "settings": spec.settings(mod)}
    return out


# Widths that fastkd.shrink_ changes on attention modules (BERT-style, grouped-query, GPT-2,
# DistilBERT) and gated MLPs.
_SHRUNK_ATTRIBUTES = ("num_attention_heads", "all_head_size", "num_heads", "num_key_value_heads",
                      "split_size", "n_heads", "intermediate_size")


def _shapes(model: nn.Module) -> dict:
    """The widths a skeleton needs to take this model's tensors: every plain ``nn.Linear``'s
    (in_features, out_features, bias), every Hugging Face ``Conv1D``'s weight shape (in, out) and
    the head counts of attention modules, so a model made
    smaller by ``fastkd.shrink_`` (widths that differ per layer, which no config describes)
    loads into a full-size skeleton."""
    linear, conv1d, attributes = {}, {}, {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):  # subclasses too: shrink_ slices Falcon's
            linear[name] = [mod.in_features, mod.out_features, mod.bias is not None]
        elif is_hf_conv1d(mod):
            conv1d[name] = list(mod.weight.shape)  # (in, out)
        found = {}
        for attr in _SHRUNK_ATTRIBUTES:
            value = getattr(mod, attr, None)
            if isinstance(value, int) and not isinstance(value, bool):
                found[attr] = value
        pruned = getattr(mod, "pruned_heads", None)  # transformers' own head pruning
        if isinstance(pruned, (set, frozenset)) and pruned:
            found["pruned_heads"] = sorted(pruned)
        if found:
            attributes[name] = found
    return {"linear": linear, "conv1d": conv1d, "attributes": attributes}


def _apply_shapes(skeleton: nn.Module, shapes: dict) -> bool:
    """Resize the skeleton's plain linears and head counts to the recorded ones (only where they
    differ: a layer left as it is keeps its identity, and so any weight tying); returns whether
    any differed."""
    resized = False
    for name, (fan_in, fan_out, has_bias) in shapes.get("linear", {}).items():
        old = _submodule(skeleton, name)
        if not isinstance(old, nn.Linear):
            continue  # a compressed layer replaces it anyway, with its own recorded shape
        if (old.in_features, old.out_features, old.bias is not None) == (fan_in, fan_out,
                                                                          has_bias):
            continue
        if not name:
            raise ValueError("the skeleton itself is a Linear of another shape; build it at "
                             f"({fan_in}, {fan_out}) instead")
        new = linear_of_class(old, fan_in, fan_out, has_bias, device=old.weight.device,
                              dtype=old.weight.dtype)
        _replace(skeleton, name, new)
        resized = True
    for name, (fan_in, fan_out) in shapes.get("conv1d", {}).items():
        old = _submodule(skeleton, name)
        if not is_hf_conv1d(old) or tuple(old.weight.shape) == (fan_in, fan_out):
            continue  # a compressed layer replaces it anyway, or it already fits
        new = type(old)(fan_out, fan_in).to(device=old.weight.device, dtype=old.weight.dtype)
        _replace(skeleton, name, new)
        resized = True
    for name, found in shapes.get("attributes", {}).items():
        mod = _submodule(skeleton, name)
        for attr, value in found.items():
            value = set(value) if attr == "pruned_heads" else value
            resized |= getattr(mod, attr, None) != value
            setattr(mod, attr, value)
    return resized


def _submodule(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as e:
        raise ValueError(f"skeleton has no module {name!r} to rebuild") from e


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, attr = _owner(model, name)
    setattr(parent, attr, new)


def compressed_header(model: nn.Module) -> dict:
    """What a skeleton needs to take ``model``'s tensors: ``{"format", "layers": {path: {"type",
    "settings"}}, "shapes": {"linear": {path: [in, out, bias]}, "conv1d": {path: [in, out]},
    "attributes": {path: {name: value}}}}``."""
    return {"format": FORMAT, "layers": _compressed_layers(model), "shapes": _shapes(model)}


def rebuild_compressed(skeleton: nn.Module, header: dict,
                       dtype: Optional[torch.dtype] = None) -> bool:
    """Give ``skeleton`` (uncompressed, possibly on the meta device) the widths and the empty
    compressed layers that ``header`` records, ready to take the state_dict; float tensors of the
    rebuilt layers in ``dtype`` where given (scales and codebooks keep their own). Returns
    whether any width differed from the skeleton's."""
    _ensure_builtin()
    resized = _apply_shapes(skeleton, header.get("shapes", {}))  # absent in older files
    paths = module_paths(skeleton)  # a layer the skeleton shares under several names
    for name, entry in header["layers"].items():
        spec = LAYER_REGISTRY.get(entry["type"])
        if spec is None:
            raise ValueError(
                f"checkpoint layer {name!r} has type {entry['type']!r}, which this fastkd cannot "
                f"rebuild (known: {sorted(LAYER_REGISTRY)})"
            )
        if not name:
            raise ValueError("the root module itself is compressed; load it directly instead")
        old = _submodule(skeleton, name)
        new = spec.build(entry["settings"], old)
        if dtype is not None:
            new = new.to(dtype)
        new = remember_layout(new, old)
        _replace(skeleton, name, new)
        replace_everywhere(skeleton, paths, old, new)  # stays one layer under each name
    return resized


def _safetensors():
    """The safetensors package (an optional dependency: the ``demo`` extra installs it)."""
    try:
        import safetensors
        import safetensors.torch  # noqa: F401
    except ImportError as e:
        raise ImportError("fastkd's compressed checkpoints are safetensors files: pip install "
                          "safetensors (or 'fastkd[demo]')") from e
    return safetensors


def save_compressed(model: nn.Module, path: Union[str, os.PathLike]) -> dict:
    """Write ``model``'s state (compressed layers as they are) to a safetensors file.

    The file's metadata holds ``{"format", "layers": {path: {"type", "settings"}}, "shapes":
    {"linear": {path: [in, out, bias]}, "conv1d": {path: [in, out]}, "attributes": {path:
    {name: value}}}}``; returns it.
    ``shapes`` lets a full-size skeleton take a model shrunk by :func:`fastkd.shrink_`.
    """
    save_model = _safetensors().torch.save_model

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    refuse_distributed(model, "save_compressed", replaces=False)
    # the model inside a torch.compile / DataParallel / DDP wrapper: its own names, which a
    # skeleton of the architecture has (not the wrapper's "module." or "_orig_mod." prefix)
    model = unwrapped_model(model)
    header = compressed_header(model)
    save_model(model, os.fspath(path), metadata={_META_KEY: json.dumps(header)})
    return header


def read_compressed_header(path: Union[str, os.PathLike]) -> dict:
    safe_open = _safetensors().safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        meta = f.metadata() or {}
    if _META_KEY not in meta:
        raise ValueError(f"{os.fspath(path)} is not a fastkd compressed checkpoint (no metadata)")
    header = json.loads(meta[_META_KEY])
    if header.get("format") != FORMAT:
        raise ValueError(f"unsupported checkpoint format {header.get('format')!r}; want {FORMAT}")
    return header


def load_compressed(skeleton: nn.Module, path: Union[str, os.PathLike], *,
                    device: Union[str, torch.device, None] = None) -> nn.Module:
    """Rebuild the compressed layers recorded in ``path`` into ``skeleton`` (an uncompressed model
    of the same architecture, at its original widths even if the saved model was shrunk), load
    every tensor exactly, and return the skeleton.

    The skeleton may hold its parameters on the meta device (built under
    ``accelerate.init_empty_weights()``, say): nothing is then allocated for the float weights
    the compressed layers replace, and the loaded tensors are placed on ``device`` (default
    CPU). Weights tied under several names stay tied. Its non-persistent buffers (rotary
    frequencies, position ids), which no checkpoint holds, must be real tensors already.
    """
    load_model = _safetensors().torch.load_model

    if not isinstance(skeleton, nn.Module):
        raise TypeError(f"skeleton must be an nn.Module, got {type(skeleton).__name__}")
    unsaved = _meta_nonpersistent_buffers(skeleton)
    if unsaved:
        raise ValueError(
            f"load_compressed: {len(unsaved)} non-persistent buffer(s) of the skeleton are on the "
            f"meta device ({', '.join(unsaved[:3])}{', ...' if len(unsaved) > 3 else ''}), and "
            "no checkpoint holds them: build the skeleton with real buffers (meta parameters are "
            "fine, e.g. accelerate.init_empty_weights(include_buffers=False))")
    if callable(getattr(skeleton, "tie_weights", None)) and any(
            p.is_meta for p in skeleton.parameters()):
        # a transformers model built under accelerate.init_empty_weights() comes untied (its
        # lm_head and embedding two meta tensors): the checkpoint holds the tied weight once
        skeleton.tie_weights()
    resized = rebuild_compressed(skeleton, read_compressed_header(path))
    if any(t.is_meta for t in (*skeleton.parameters(), *skeleton.buffers())):
        _load_assigning(skeleton, path, torch.device(device or "cpu"))
    else:
        load_model(skeleton, os.fspath(path), strict=True)
        if device is not None:
            skeleton.to(device)
    hf.record(skeleton, shrunk=resized)
    return skeleton


def _meta_nonpersistent_buffers(model: nn.Module) -> list:
    out = []
    for mod_name, mod in model.named_modules():
        for name in getattr(mod, "_non_persistent_buffers_set", ()):
            buf = mod._buffers.get(name)
            if buf is not None and buf.is_meta:
                out.append(f"{mod_name}.{name}" if mod_name else name)
    return out


def _load_assigning(skeleton: nn.Module, path, device: torch.device) -> None:
    """Load ``path`` into a skeleton with meta tensors by assigning the file's tensors (on
    ``device``) instead of copying into the skeleton's. A tensor tied under several names is
    stored under one (safetensors keeps one name per shared tensor): every name gets it, and
    the names stay one Parameter."""
    from .nn.int8_linear import align_int8_codes

    load_file = _safetensors().torch.load_file

    state = load_file(os.fspath(path), device=str(device))
    expected = skeleton.state_dict(keep_vars=True)
    tied: dict = {}
    for key, value in expected.items():
        tied.setdefault(id(value), []).append(key)
    for names in tied.values():
        saved = [n for n in names if n in state]
        for n in names:
            if saved and n not in state:
                state[n] = state[saved[0]]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint and skeleton do not match: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    skeleton.load_state_dict(state, strict=True, assign=True)
    align_int8_codes(skeleton)  # the file's tensors are views at 8-byte offsets
    for names in tied.values():  # assign made one Parameter per name: tie them again
        first_mod, first_attr = _owner(skeleton, names[0])
        for n in names[1:]:
            mod, attr = _owner(skeleton, n)
            if attr in mod._parameters:
                mod._parameters[attr] = first_mod._parameters[first_attr]
            else:
                mod._buffers[attr] = first_mod._buffers[first_attr]
    left = [n for n, t in (*skeleton.named_parameters(), *skeleton.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"load_compressed: {left[:3]} stayed on the meta device")


def _owner(model: nn.Module, name: str):
    """(the module holding ``name``, the attribute name there), for a dotted path."""
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def decompress_(model: nn.Module, filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
                *, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Replace every fastkd layer of ``model`` (``MaskedLinear``, ``Int8Linear``,
    ``SharedLinear``, for which ``filter_fn(module, name)`` is true) by a plain ``nn.Linear``
    holding the weight it computes with (a Hugging Face ``Conv1D`` where the layer was made from
    one, or loaded into a skeleton that had one: GPT-2's state_dict layout; the nn.Linear
    subclass it came from), and every ``Int8Experts`` / ``MaskedExperts`` / ``SharedExperts`` by
    the transformers experts module it came from, holding the weights it computes with, in
    place; returns ``model``.

    For running a model that was shipped compressed (``save_compressed`` / ``load_compressed``)
    where fastkd is not installed or its layers are slower than dense ones (a ``SharedLinear``
    looks its weight up on every call). The result has a plain model's state_dict keys and its
    dense size. ``MaskedLinear`` layers fold to ``W o M`` in their weight's dtype (as
    :func:`fastkd.fold_masks_`, same outputs bit for bit); ``Int8Linear`` and ``SharedLinear`` get
    their dequantized weight in ``dtype`` (default: each layer's bias dtype, else fp32; pass the
    model's dtype for a bf16/fp16 model without biases). A ``w8a8`` layer's float replacement
    no longer quantizes activations, so outputs move by that quantization error.
    """
    from .nn._linear_like import adapter_layers, is_masked_linear
    from .nn.int8_experts import Int8Experts
    from .nn.int8_linear import Int8Linear
    from .nn.masked_experts import MaskedExperts
    from .nn.shared_experts import SharedExperts
    from .nn.shared_linear import SharedLinear

    if not isinstance(model, nn.Module):
        raise TypeError(f"decompress_ takes an nn.Module, got {type(model).__name__}")
    refuse_distributed(model, "decompress_")
    if unwrapped_model(model) is not model:
        decompress_(unwrapped_model(model), filter_fn, dtype=dtype)
        return model
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError("filter_fn must be callable (module, name) -> bool")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")

    def kind(m):
        return is_masked_linear(m) or isinstance(m, (Int8Linear, SharedLinear, Int8Experts,
                                                     MaskedExperts, SharedExperts))

    def convert(layer):
        if isinstance(layer, (Int8Experts, SharedExperts)):
            return layer.to_experts(dtype)  # the transformers experts class it came from
        if isinstance(layer, MaskedExperts):
            return layer.to_experts()  # W o M, in the weights' own dtype
        return layer.to_linear() if is_masked_linear(layer) else layer.to_linear(dtype)

    if kind(model):
        raise ValueError("decompress_ replaces submodules in place and cannot replace the model "
                         "itself; use the layer's to_linear()")
    # a layer holding no parameter (int8 codes, no bias) follows the model: trainable where
    # something outside PEFT's adapters is (peft freezes all of that)
    adapters = tuple(f"{name}." for name in adapter_layers(model))
    model_trainable = any(p.requires_grad for name, p in model.named_parameters()
                          if not name.startswith(adapters))

    def convert_keeping_frozen(layer):
        """The float layer, each parameter as trainable as the one it replaces: a parameter of
        the same name keeps its flag; a weight that was int8 codes or a codebook's lookup is
        trainable where the layer had something trainable (where the model has, for a layer
        without parameters). They were all made trainable: decompress_ on a frozen base
        (before merging LoRA adapters) silently trained it with them."""
        own = dict(layer.named_parameters())
        trainable = any(p.requires_grad for p in own.values()) if own else model_trainable
        new = convert(layer)
        for name, p in new.named_parameters():
            p.requires_grad_(own[name].requires_grad if name in own else trainable)
        return new

    unpack_layers_(  # GPT-2's Conv1D layers come back as Conv1D
        model, lambda m, name: kind(m) and (filter_fn is None or filter_fn(m, name)),
        convert_keeping_frozen)
    hf.record(model)
    return model


def size_report(model: nn.Module) -> dict:
    """Bytes of parameters and buffers per module type (each tensor counted once, at its owner).

    Returns ``{"total_bytes": int, "by_type": {type name: {"modules": n, "bytes": b}}}``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    seen = set()
    by_type: dict = {}
    for mod in model.modules():
        own = list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False))
        nbytes = 0
        for t in own:
            # tied weights: one storage (meta tensors have none, all at address 0: the tensor)
            key = ("meta", id(t)) if t.is_meta else (t.data_ptr(), t.numel(), t.dtype)
            if key in seen:
                continue
            seen.add(key)
            nbytes += t.numel() * t.element_size()
        if not own:
            continue
        entry = by_type.setdefault(type(mod).__name__, {"modules": 0, "bytes": 0})
        entry["modules"] += 1
        entry["bytes"] += nbytes
    return {"total_bytes": sum(e["bytes"] for e in by_type.values()), "by_type": by_type}
