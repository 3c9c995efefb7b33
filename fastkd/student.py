"""Student initialisation from the teacher (DistilBERT-style layer selection).

``student_from_teacher(teacher, keep_layers)`` deep-copies the teacher and keeps only the listed
blocks of its layer stack, so distillation starts from the teacher's own weights. The teacher is never
modified.
"""

from __future__ import annotations

import copy
from typing import Optional, Sequence

from torch import nn

from . import hf
__all__ = ["student_from_teacher"]

# config attributes that hold the depth of the (single) layer stack, by model family
_DEPTH_ATTRS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
# per-layer config lists that must follow the kept layers (e.g. sliding/full attention per layer)
_PER_LAYER_ATTRS = ("layer_types",)


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
            # a stack of blocks: every element the same class
            if len({type(m) for m in mod}) == 1:
                found.append((name, mod))
    if len(found) != 1:
        names = [n for n, _ in found]
        raise ValueError(
            f"could not identify a single layer stack (candidates: {names}); pass stack='path'"
        )
    name, mod = found[0]
    parent_name, _, attr = name.rpartition(".")
    return model.get_submodule(parent_name) if parent_name else model, attr, mod


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

    The student's ``config`` (if any) gets the new depth (``num_hidden_layers``/``n_layer``/...),
    per-layer config lists are subset to match, and blocks that know their index (``layer_idx``,
    used by key/value caches) are renumbered. The teacher is not modified.
    """
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
    if isinstance(teacher, nn.Sequential) and stack is None:
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
    new_stack = type(layers)(kept) if isinstance(layers, nn.ModuleList) else nn.Sequential(*kept)
    setattr(parent, attr, new_stack)
    for new_idx, block in enumerate(kept):
        for mod in block.modules():
            if isinstance(getattr(mod, "layer_idx", None), int):
                mod.layer_idx = new_idx

    config = getattr(student, "config", None)
    if config is not None:
        for name in _DEPTH_ATTRS:
            if getattr(config, name, None) == n:
                setattr(config, name, len(keep))
                break
        for name in _PER_LAYER_ATTRS:
            per_layer = getattr(config, name, None)
            if isinstance(per_layer, (list, tuple)) and len(per_layer) == n:
                setattr(config, name, type(per_layer)(per_layer[i] for i in keep))
    hf.record(student)  # a compressed teacher's layers, at their new paths
    return student
