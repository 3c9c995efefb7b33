"""Student initialisation from the teacher (DistilBERT-style layer selection).

``student_from_teacher(teacher, keep_layers)`` deep-copies the teacher and keeps only the listed
blocks of its layer stack, so distillation starts from the teacher's own weights. The teacher is never
modified.
"""

from __future__ import annotations

import copy
import warnings
from typing import Optional, Sequence

from torch import nn

from . import hf
__all__ = ["student_from_teacher"]

# config attributes that hold the depth of the (single) layer stack, by model family
_DEPTH_ATTRS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
# the same for one side of an encoder-decoder config (T5's num_layers is its encoder's depth,
# BART's num_hidden_layers an alias of encoder_layers)
_SIDE_DEPTH_ATTRS = {"decoder": ("num_decoder_layers", "decoder_layers"),
                     "encoder": ("encoder_layers", "num_layers", "num_hidden_layers")}
# per-layer config lists that must follow the kept layers: one entry per layer (sliding/full
# attention, SmolLM3's RoPE or not, Gemma3n's activation sparsity), and lists of layer indices
# (Qwen-MoE's dense-MLP layers, Mllama's cross-attention layers, Llama 4's MoE layers)
_PER_LAYER_ATTRS = ("layer_types", "mlp_layer_types", "no_rope_layers",
                    "activation_sparsity_pattern")
_LAYER_INDEX_ATTRS = ("mlp_only_layers", "cross_attention_layers", "moe_layers")


def _normalise_keep(keep_layers, n: int) -> list:
    if isinstance(keep_layers, (str, bytes)) or not isinstance(keep_layers, Sequence):
        raise TypeError(f"keep_layers must be a sequence of ints, got {type(keep_layers).__name__}")
    out = []
    for k in keep_layers:
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"keep_layers must hold ints, got {k!r}")
        if not -n <= k < n:
            raise ValueError(f"layer index {k} is out of range for a stack of {n} layers")
        out.append(k % n)
    if not out:
        raise ValueError("keep_layers must keep at least one layer")
    if len(set(out)) != len(out):
        raise ValueError(f"keep_layers has repeated layers: {list(keep_layers)}")
    if out != sorted(out):
        raise ValueError(f"keep_layers must be in increasing order, got {list(keep_layers)}")
    return out


def _find_stack(model: nn.Module, stack: Optional[str]):
    """(parent module, attribute name, ModuleList) of the layer stack."""
    if stack is not None:
        if not isinstance(stack, str):
            raise TypeError(f"stack must be a dotted module path, got {type(stack).__name__}")
        try:
            target = model.get_submodule(stack)
        except AttributeError as e:
            raise ValueError(f"model has no submodule {stack!r}") from e
        if not isinstance(target, (nn.ModuleList, nn.Sequential)):
            raise TypeError(f"{stack!r} is a {type(target).__name__}, not a ModuleList/Sequential")
        parent_name, _, attr = stack.rpartition(".")
        return model.get_submodule(parent_name) if parent_name else model, attr, target
    config = getattr(model, "config", None)
    depth = None
    if config is not None:
        for name in _DEPTH_ATTRS:
            if isinstance(getattr(config, name, None), int):
                depth = getattr(config, name)
                break
    found = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (depth is None or len(mod) == depth):
            # a stack of blocks: as deep as the config says (a hybrid model's blocks are of
            # several classes: Jamba's attention and Mamba layers), else all of one class
            if depth is not None or len({type(m) for m in mod}) == 1:
                found.append((name, mod))
    if len(found) != 1:
        names = [n for n, _ in found]
        raise ValueError(
            f"could not identify a single layer stack (candidates: {names}); pass stack='path'"
        )
    name, mod = found[0]
    parent_name, _, attr = name.rpartition(".")
    return model.get_submodule(parent_name) if parent_name else model, attr, mod


def _pipeline_stacks(seq: nn.Sequential) -> list:
    """Paths of the layer stacks (ModuleLists of two or more blocks of one class) inside an
    nn.Sequential whose entries are of different classes and of which only one holds such a
    stack: a pipeline wrapping one model, not a stack of blocks (each block of a stack may hold
    its own ModuleList, e.g. of experts, and then they all do)."""
    if len({type(m) for m in seq}) < 2:
        return []
    holders = {}
    for child_name, child in seq.named_children():
        for name, mod in child.named_modules(prefix=child_name):
            if (isinstance(mod, nn.ModuleList) and len(mod) > 1
                    and len({type(m) for m in mod}) == 1):
                holders.setdefault(child_name, []).append(name)
    return next(iter(holders.values())) if len(holders) == 1 else []


def student_from_teacher(
    teacher: nn.Module, keep_layers: Sequence[int], *, stack: Optional[str] = None
) -> nn.Module:
    """A copy of ``teacher`` keeping only the blocks ``keep_layers`` of its layer stack.

    Args:
        teacher: an ``nn.Sequential`` of blocks, or a model holding one stack of blocks in an
            ``nn.ModuleList`` (Hugging Face encoders such as BERT, decoders such as LLaMA/GPT-2).
        keep_layers: increasing block indices to keep (negative indices count from the end), e.g.
            ``range(0, 12, 2)`` for every other layer.
        stack: dotted path of the stack (e.g. ``"encoder.layer"``) when it cannot be found
            unambiguously (encoder-decoder models: call once per stack).

    The student's ``config`` (if any) gets the new depth (``num_hidden_layers``/``n_layer``/...;
    on an encoder-decoder model the depth of the stack's own side), per-layer config lists are
    subset to match (``layer_types``, ``no_rope_layers``, ...), lists and rules of layer indices
    are renumbered (MoE models' dense layers: ``mlp_only_layers``, ``decoder_sparse_step``,
    ``first_k_dense_replace``), and blocks that know their index (``layer_idx``, used by
    key/value caches) are renumbered. A transformers student is then built again from its
    config on the meta device and compared layer by layer: where the config would build
    another model (a per-layer scheme fastkd does not know), a warning says where, since
    ``save_pretrained`` / ``from_pretrained`` would load that other model. The teacher is not
    modified.
    """
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
    if isinstance(teacher, nn.Sequential) and stack is None:
        inner = _pipeline_stacks(teacher)
        if inner:
            raise ValueError(
                f"teacher is an nn.Sequential of different modules, one of which holds a layer "
                f"stack ({', '.join(inner)}): a pipeline (a SentenceTransformer's transformer, "
                f"pooling and normalisation), not a stack of blocks; keeping its entries would "
                f"drop pipeline stages and keep every layer. Pass stack={inner[0]!r}")
        keep = _normalise_keep(keep_layers, len(teacher))
        names = list(teacher._modules)
        student = copy.deepcopy(teacher)
        for i, name in enumerate(names):
            if i not in keep:
                del student._modules[name]
        return student

    student = copy.deepcopy(teacher)
    parent, attr, layers = _find_stack(student, stack)
    n = len(layers)
    keep = _normalise_keep(keep_layers, n)
    kept = [layers[i] for i in keep]
    if kept and keep[0] != 0:
        _move_position_bias(layers[0], kept[0])
    new_stack = type(layers)(kept) if isinstance(layers, nn.ModuleList) else nn.Sequential(*kept)
    setattr(parent, attr, new_stack)
    for key, value in list(vars(parent).items()):
        # the stack owner's own copy of the depth (DistilBERT's Transformer.n_layers)
        if (type(value) is int and value == n and "layer" in key.lower()
                and not key.startswith("_")):
            setattr(parent, key, len(keep))
    for new_idx, block in enumerate(kept):
        for mod in block.modules():
            if isinstance(getattr(mod, "layer_idx", None), int):
                mod.layer_idx = new_idx

    path = stack if stack is not None else next(
        name for name, m in student.named_modules() if m is new_stack)
    _update_configs(student, parent, path, n, keep)
    _warn_if_config_builds_another_model(student, path)
    hf.record(student)  # a compressed teacher's layers, at their new paths
    return student


def _move_position_bias(first: nn.Module, new_first: nn.Module) -> None:
    """T5-style stacks hold their relative position bias in block 0 alone (attention modules
    with ``has_relative_attention_bias``), and every later block reuses what block 0 computed.
    A student without block 0 had no position information at all, and a reload gave its new
    block 0 a random bias: the table moves to the block that is first now."""
    for name, mod in first.named_modules():
        if getattr(mod, "has_relative_attention_bias", False) is not True:
            continue
        try:
            target = new_first.get_submodule(name)
        except AttributeError:
            continue
        if getattr(target, "has_relative_attention_bias", None) is False:
            target.relative_attention_bias = copy.deepcopy(mod.relative_attention_bias)
            target.has_relative_attention_bias = True


def _is_config(obj) -> bool:
    return hasattr(obj, "to_dict") and hasattr(obj, "model_type")


def _update_configs(student: nn.Module, parent: nn.Module, path: str, n: int, keep: list):
    """Write the new depth and the kept layers' entries into the config(s) describing the
    stack: the one its owner was built from (a multimodal model's text config), and, on an
    encoder-decoder model, the side's depth in the model's own config."""
    top = getattr(student, "config", None)
    own = getattr(parent, "config", None)
    configs = []
    if _is_config(top) and getattr(top, "is_encoder_decoder", False):
        parts = path.split(".")
        side = next((sd for sd in ("decoder", "encoder") if any(sd in p for p in parts)), None)
        if side is None:
            raise ValueError(f"cannot tell whether the stack {path!r} is the encoder's or the "
                             "decoder's of this encoder-decoder model")
        for name in _SIDE_DEPTH_ATTRS[side]:
            if getattr(top, name, None) == n:
                setattr(top, name, len(keep))
                break
        if _is_config(own) and own is not top:  # T5's stacks: a copy of their own
            configs.append(own)
    else:
        configs.append(own if _is_config(own) else top)
    for config in configs:
        if config is None:
            continue
        for name in _DEPTH_ATTRS:
            if getattr(config, name, None) == n:
                setattr(config, name, len(keep))
                break
        _dense_layers_by_index(config, n, keep)
        for name in _PER_LAYER_ATTRS:
            per_layer = getattr(config, name, None)
            if isinstance(per_layer, (list, tuple)) and len(per_layer) == n:
                setattr(config, name, type(per_layer)(per_layer[i] for i in keep))
        for name in _LAYER_INDEX_ATTRS:
            indices = getattr(config, name, None)
            if isinstance(indices, (list, tuple)):
                setattr(config, name, type(indices)(
                    new for new, old in enumerate(keep) if old in set(indices)))


def _dense_layers_by_index(config, n: int, keep: list) -> None:
    """MoE configs that say which layers are dense by a rule on the layer index: Qwen-MoE's
    ``decoder_sparse_step`` (every step-th layer is MoE) becomes the list ``mlp_only_layers``
    that the index renumbering then follows; DeepSeek's ``first_k_dense_replace`` (and
    ``moe_layer_freq``) is set again when the student's dense layers still come first."""
    step, only = getattr(config, "decoder_sparse_step", None), getattr(config, "mlp_only_layers", None)
    if isinstance(step, int) and step > 1 and isinstance(only, (list, tuple)):
        dense = set(only) | {i for i in range(n) if (i + 1) % step}
        config.mlp_only_layers, config.decoder_sparse_step = sorted(dense), 1
    k, freq = getattr(config, "first_k_dense_replace", None), getattr(config, "moe_layer_freq", 1)
    if isinstance(k, int) and isinstance(freq, int) and freq >= 1:
        dense = [new for new, old in enumerate(keep) if old < k or old % freq]
        if dense == list(range(len(dense))):
            config.first_k_dense_replace = len(dense)
            if hasattr(config, "moe_layer_freq"):
                config.moe_layer_freq = 1


def _warn_if_config_builds_another_model(student: nn.Module, stack: str) -> None:
    """Build the student's architecture from its config (on the meta device) and compare: a
    config setting the copy does not follow (a per-layer scheme fastkd does not know: DeepSeek's
    first dense layers, interleaved MoE steps) makes ``from_pretrained`` build another model,
    with other layer kinds or flags, than the student in memory. Layer kinds are compared
    everywhere, settings within the layer stack (outside it, a module may derive a setting it
    never uses from the new layer list: Gemma 3's rotary scaling for full-attention layers when
    only sliding ones were kept)."""
    if not hf._is_transformers_model(student):
        return
    import torch

    from .checkpoint import _SHRUNK_ATTRIBUTES, _compressed_layers

    # widths shrink_ changes: a student of a shrunk teacher differs there on purpose
    widths = {"in_features", "out_features", "nf", *_SHRUNK_ATTRIBUTES}
    compressed = tuple(f"{name}." for name in _compressed_layers(student))
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fresh = type(student)(copy.deepcopy(student.config))
    except Exception:  # an architecture that cannot be built on the meta device: no check
        return
    rebuilt = dict(fresh.named_modules())
    differ = []
    for name, mod in student.named_modules():
        if f"{name}.".startswith(compressed):  # fastkd's layers and what they hold
            continue
        other = rebuilt.get(name)
        if other is None or type(other) is not type(mod):
            differ.append(f"{name}: {type(mod).__name__} vs "
                          f"{type(other).__name__ if other is not None else 'nothing'}")
            continue
        if not f"{name}.".startswith(f"{stack}."):
            continue
        for key, value in vars(mod).items():
            if (key.startswith("_") or key in widths or key == "training"
                    or not isinstance(value, (bool, int, float, str))):
                continue
            if getattr(other, key, None) != value:
                differ.append(f"{name}.{key}: {value!r} vs {getattr(other, key, None)!r}")
    if differ:
        warnings.warn(
            "student_from_teacher: the student's config does not describe the layers it kept "
            f"(in memory vs built from the config: {'; '.join(differ[:4])}"
            f"{'; ...' if len(differ) > 4 else ''}); save_pretrained/from_pretrained would "
            "build another model. Fix the config by hand, or ship the student with "
            "fastkd.save_compressed / torch.save", UserWarning, stacklevel=3)
