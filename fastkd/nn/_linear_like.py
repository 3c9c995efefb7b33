"""Layers that compute a linear map and that fastkd's compressed layers can replace.

``nn.Linear`` itself, and Hugging Face's ``Conv1D`` (GPT-2, DistilGPT-2, GPT-J's ancestors and
their kin use it for every attention and MLP projection): ``y = x @ W + b`` with ``W`` stored
``(in_features, out_features)``, the transpose of ``nn.Linear``'s layout. It is recognised by name
and module so transformers need not be imported.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn


def is_hf_conv1d(module) -> bool:
    """True for ``transformers``' ``Conv1D`` (a linear layer with a transposed weight)."""
    cls = type(module)
    weight = getattr(module, "weight", None)
    return (
        cls.__name__ == "Conv1D"
        and cls.__module__.startswith("transformers")
        and isinstance(getattr(module, "nf", None), int)
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
    )


def is_masked_linear(module) -> bool:
    """True for exactly ``fastkd.nn.MaskedLinear`` (a pruned linear: ``x (W o M)^T + b``); a
    subclass may compute something else, like nn.Linear's."""
    from .masked_linear import MaskedLinear

    return type(module) is MaskedLinear


def is_replaceable_linear(module, pruned: bool = False) -> bool:
    """``nn.Linear``, an nn.Linear subclass that computes the same map (``computes_linear``:
    Falcon's ``FalconLinear``) or a Hugging Face ``Conv1D``; with ``pruned``, also a
    ``MaskedLinear`` (quantize_ and share_weights_ take pruned layers: pruning comes first in the
    usual pipeline)."""
    return (type(module) is nn.Linear or is_hf_conv1d(module) or computes_linear(module)
            or (pruned and is_masked_linear(module)))


# Module state every nn.Module has: not copied onto a rebuilt linear subclass.
_MODULE_STATE = frozenset(vars(nn.Module()))
# max |forward(x) - F.linear(x)| / max |F.linear(x)| of a subclass computing the same product
# another way (Falcon: x @ W.T + b, against F.linear's fused addmm)
_SAME_PRODUCT_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3,
                      torch.bfloat16: 2e-2}


def computes_linear(module) -> bool:
    """True for an ``nn.Linear`` subclass that holds nothing but ``weight`` and ``bias`` and
    computes ``x W^T + b``: its own forward, if it has one, is run on a random input and compared
    with ``F.linear`` (Falcon's ``FalconLinear`` passes; a router returning top-k choices, or a
    layer whose parent reads its weight directly, ``nn.MultiheadAttention``'s ``out_proj``,
    does not). Such a layer can be replaced by a compressed one, which remembers its class
    (``remember_layout``) so that it can come back."""
    if not isinstance(module, nn.Linear) or type(module) is nn.Linear:
        return False
    if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return False  # nn.MultiheadAttention reads out_proj.weight itself
    if set(module._parameters) - {"weight", "bias"} or module._buffers or module._modules:
        return False  # per-feature state of its own that a compressed layer would drop
    if type(module).forward is nn.Linear.forward:
        return True
    w = module.weight
    if not isinstance(w, torch.Tensor) or w.is_meta or w.dim() != 2 or not w.is_floating_point():
        return False  # nothing to run it on: not replaced
    # one run per layer and weight (shrink_ asks about each layer once per pattern it tries)
    seen = _COMPUTES_LINEAR.get(module)
    if seen is not None and seen[0]() is w:
        return seen[1]
    result = _runs_like_f_linear(module, w)
    _COMPUTES_LINEAR[module] = (weakref.ref(w), result)
    return result


_COMPUTES_LINEAR: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _runs_like_f_linear(module: nn.Linear, w: torch.Tensor) -> bool:
    g = torch.Generator(device=w.device).manual_seed(0)
    x = torch.randn(2, module.in_features, generator=g, device=w.device).to(w.dtype)
    try:
        with torch.no_grad():
            out = module(x)
            ref = nn.functional.linear(x, w, module.bias)
    except Exception:
        return False
    if not isinstance(out, torch.Tensor) or out.shape != ref.shape or out.dtype != ref.dtype:
        return False
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    tol = _SAME_PRODUCT_RTOL.get(w.dtype, 1e-5) * scale + 1e-6
    return bool(((out - ref).abs() <= tol).all())


def linear_of_class(like: nn.Module, in_features: int, out_features: int, bias: bool,
                    device=None, dtype=None, cls=None, attributes=None) -> nn.Linear:
    """A linear layer of ``like``'s class (or ``cls``) with the given widths and empty
    parameters, carrying ``like``'s plain attributes (or ``attributes``) but none of its
    parameters, hooks or submodules. An nn.Linear subclass's own ``__init__`` is not called (its
    arguments are unknown): ``computes_linear`` layers hold nothing it could have set up but the
    weight, the bias and plain attributes."""
    cls = cls or type(like)
    if cls is nn.Linear:
        return nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
    new = bare_module(cls, linear_attributes(like) if attributes is None else attributes)
    new.in_features, new.out_features = in_features, out_features
    new.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
    new.register_parameter("bias", nn.Parameter(torch.empty(out_features, device=device,
                                                            dtype=dtype)) if bias else None)
    return new


def linear_attributes(layer: nn.Module) -> dict:
    """The plain attributes of a linear layer beyond what every module and nn.Linear hold."""
    return plain_attributes(layer, ("in_features", "out_features"))


def plain_attributes(module: nn.Module, exclude=()) -> dict:
    """A module's public plain attributes (settings, config objects) beyond the state every
    nn.Module holds, less ``exclude``."""
    return {k: v for k, v in vars(module).items()
            if k not in _MODULE_STATE and not k.startswith("_") and k not in exclude}


def _wrapper_chain(model: nn.Module):
    """``model``, then each model inside torch.compile's, DataParallel's and
    DistributedDataParallel's wrappers around it, outermost first."""
    while True:
        yield model
        inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if inner is None and isinstance(model, (nn.DataParallel,
                                                nn.parallel.DistributedDataParallel)):
            inner = model.module
        if not isinstance(inner, nn.Module):
            return
        model = inner


def unwrapped_model(model: nn.Module) -> nn.Module:
    """The model inside torch.compile's, DataParallel's and DistributedDataParallel's wrappers
    (the one its user saves)."""
    for model in _wrapper_chain(model):
        pass
    return model


def refuse_distributed(model: nn.Module, who: str, *, replaces: bool = True) -> None:
    """Refuse a model whose weights ``who`` cannot read or replace safely:
    - inside ``DistributedDataParallel`` (``replaces``: the call swaps layers for new ones with
      new parameters): DDP's gradient hooks stay on the old parameters, so after the swap
      gradients were no longer synchronised and the ranks drifted apart without a word (or
      the next backward hit an internal assert in DDP's reducer);
    - sharded: FSDP (a ``FullyShardedDataParallel`` wrapper) or DTensor parameters (FSDP2's
      ``fully_shard``, tensor parallelism): each process holds a part of every weight, and the
      calls failed with DTensor errors, or left a half-sharded model.
    """
    chain = list(_wrapper_chain(model))
    if replaces and any(isinstance(m, nn.parallel.DistributedDataParallel) for m in chain):
        raise ValueError(
            f"{who} replaces layers and their parameters, but this model is inside "
            "DistributedDataParallel, whose gradient synchronisation holds the old ones: "
            "compress model.module (or before wrapping) and wrap the result in a new "
            "DistributedDataParallel")
    try:
        from torch.distributed.tensor import DTensor

        dtensor: tuple = (DTensor,)
    except ImportError:  # torch without distributed
        dtensor = ()
    sharded = any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules()) or (
        any(isinstance(p, dtensor) for p in model.parameters()))
    if sharded:
        raise ValueError(
            f"{who} needs whole weights, but this model's parameters are sharded across "
            "processes (FSDP / fully_shard, or tensor parallel DTensors): compress the model "
            "before sharding it, or load a full (gathered) state into an unsharded copy first")


def bare_module(cls: type, attributes: dict) -> nn.Module:
    """A module of class ``cls`` holding ``attributes`` and nothing else yet, made without the
    class's own ``__init__`` (whose arguments are unknown: a layer rebuilt from a record)."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    new.__dict__.update(attributes)
    return new


def torch_pruned(module) -> bool:
    """Whether ``torch.nn.utils.prune`` pruned ``module``'s weight (it then holds the dense
    weight as ``weight_orig`` and the mask as ``weight_mask``)."""
    return hasattr(module, "weight_orig") and hasattr(module, "weight_mask")


def as_linear(module, who: str) -> nn.Linear:
    """``module`` as an ``nn.Linear`` computing the same map: ``nn.Linear`` (or a subclass) as it
    is; a ``MaskedLinear`` as a new ``nn.Linear`` with weight ``W o M``; a Hugging Face
    ``Conv1D`` as a new ``nn.Linear`` holding a transposed copy of its weight
    (and its bias, and the transposed ``weight_orig``/``weight_mask`` of
    ``torch.nn.utils.prune``, if pruned that way). Anything else is a TypeError naming ``who``."""
    if isinstance(module, nn.Linear):
        return module
    if is_masked_linear(module):
        # the pruned weights are exact zeros of the new weight (0 in int8 codes, and the fixed
        # cluster 0 of a codebook)
        linear = nn.Linear(module.in_features, module.out_features,
                           bias=module.bias is not None, device="meta")
        linear.weight = nn.Parameter(module.masked_weight(),
                                     requires_grad=module.weight.requires_grad)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.detach(),
                                       requires_grad=module.bias.requires_grad)
        linear.train(module.training)
        return linear
    if not is_hf_conv1d(module):
        raise TypeError(
            f"{who} takes an nn.Linear, a Hugging Face Conv1D or a fastkd MaskedLinear, got "
            f"{type(module).__name__}"
        )
    pruned = torch_pruned(module)
    orig = module.weight_orig if pruned else module.weight
    n_in, n_out = orig.shape
    linear = nn.Linear(n_in, n_out, bias=module.bias is not None, device="meta")
    weight = orig.detach().t().contiguous()
    if pruned:
        # as torch.nn.utils.prune leaves an nn.Linear: ``weight`` is the pruned weight (what the
        # layer computes with, which Int8Linear / SharedLinear quantize), ``weight_orig`` the
        # dense one and ``weight_mask`` the mask (which MaskedLinear takes)
        mask = module.weight_mask.detach().t().contiguous()
        linear.weight_orig = nn.Parameter(weight, requires_grad=orig.requires_grad)
        linear.register_buffer("weight_mask", mask)
        weight = weight * mask
    linear.weight = nn.Parameter(weight, requires_grad=orig.requires_grad)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.detach(), requires_grad=module.bias.requires_grad)
    linear.train(module.training)
    return linear


def float_linear(module, weight: torch.Tensor, dtype) -> nn.Linear:
    """A new ``nn.Linear`` with ``module``'s features, training mode and bias (copied), holding
    ``weight``, both in ``dtype`` (default: the bias's dtype, else fp32): the float layer an
    ``Int8Linear`` or ``SharedLinear`` computes like."""
    bias = module.bias
    dtype = dtype or (bias.dtype if bias is not None else torch.float32)
    linear = nn.Linear(module.in_features, module.out_features, bias=bias is not None,
                       device="meta")
    linear.weight = nn.Parameter(weight.to(dtype))
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().to(dtype, copy=True))
    linear.train(module.training)
    return linear


def remember_layout(layer: nn.Module, original: nn.Module) -> nn.Module:
    """Record on a fastkd ``layer`` made from ``original`` whether that was a Hugging Face
    ``Conv1D`` or an nn.Linear subclass (its class; or a fastkd layer made from one), so that
    turning it back into a plain layer (``fold_masks_``, ``decompress_``) gives the
    architecture's own layer type and state_dict layout; returns ``layer``."""
    layer._hf_conv1d_type = (type(original) if is_hf_conv1d(original)
                             else getattr(original, "_hf_conv1d_type", None))  # passed along
    if isinstance(original, nn.Linear) and type(original) is not nn.Linear:
        layer._linear_type = (type(original), linear_attributes(original))
    else:
        layer._linear_type = getattr(original, "_linear_type", None)
    return layer


def in_original_layout(layer: nn.Module, linear: nn.Linear) -> nn.Module:
    """``linear`` (what ``layer`` computes) as the layer type ``layer`` was made from: a new
    Hugging Face ``Conv1D`` holding the transposed weight when it came from one (a GPT-2 model's
    state_dict keeps its shapes: a square projection loaded from an nn.Linear layout would be
    silently transposed), a layer of the nn.Linear subclass it came from (Falcon's
    ``FalconLinear``), else ``linear`` itself."""
    cls = getattr(layer, "_hf_conv1d_type", None)
    subclass = getattr(layer, "_linear_type", None)
    if cls is None and subclass is not None:
        w = linear.weight
        new = linear_of_class(linear, linear.in_features, linear.out_features,
                              linear.bias is not None, device="meta", cls=subclass[0],
                              attributes=subclass[1])
        new.weight = nn.Parameter(w.detach(), requires_grad=w.requires_grad)
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.detach(), requires_grad=linear.bias.requires_grad)
        new.train(linear.training)
        return new
    if cls is None:
        return linear
    with torch.device("meta"):
        conv = cls(linear.out_features, linear.in_features)  # Conv1D(nf, nx)
    w = linear.weight
    conv.weight = nn.Parameter(w.detach().t().contiguous(), requires_grad=w.requires_grad)
    bias = linear.bias if linear.bias is not None else torch.zeros(
        linear.out_features, dtype=w.dtype, device=w.device)
    conv.bias = nn.Parameter(bias.detach(), requires_grad=w.requires_grad)
    conv.train(linear.training)
    return conv


def module_paths(model: nn.Module) -> dict:
    """``id(module) -> [every path it is registered under]`` (a module shared by two blocks has
    two; ``named_modules()`` alone names only the first)."""
    paths: dict = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if name:
            paths.setdefault(id(m), []).append(name)
    return paths


def one_answer_per_layer(who: str, model: nn.Module, filter_fn):
    """``filter_fn`` asked once per layer rather than once per name: a layer registered under
    several names (a block reused, ALBERT-style) is selected only when ``filter_fn`` accepts it
    under every one. A filter accepting one name and rejecting another cannot be followed (it
    is one layer); such a layer stays as it is, with a warning (``quantize_`` had split it into
    an int8 and a float copy, untied; ``share_weights_`` asked under its first name only)."""
    if filter_fn is None:
        return None
    paths = module_paths(model)
    verdicts: dict = {}

    def selected(module, name) -> bool:
        key = id(module)
        if key not in verdicts:
            names = paths.get(key) or [name]
            answers = [bool(filter_fn(module, n)) for n in names]
            verdicts[key] = all(answers)
            if any(answers) and not all(answers):
                import warnings

                kept = [n for n, a in zip(names, answers) if not a]
                warnings.warn(
                    f"{who} leaves {type(module).__name__} {names[0]!r} as it is: it is one "
                    f"layer registered under {names}, and filter_fn rejects it as {kept}; "
                    "accept or reject every name to change it", UserWarning, stacklevel=3)
        return verdicts[key]

    return selected


def replace_everywhere(model: nn.Module, paths: dict, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` at every path of ``old`` (``paths`` from :func:`module_paths`), so a layer
    shared under several names stays one shared layer."""
    for name in paths.get(id(old), ()):
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


def unpack_layers_(model: nn.Module, select, convert) -> nn.Module:
    """Replace, in place, every submodule of ``model`` (not the model itself) for which
    ``select(module, name)`` is true by ``in_original_layout(module, convert(module))``, under
    each name it has: the common loop of ``fold_masks_`` and ``decompress_``; returns
    ``model``."""
    paths = module_paths(model)
    targets = [m for name, m in model.named_modules() if name and select(m, name)]
    for layer in targets:
        replace_everywhere(model, paths, layer, in_original_layout(layer, convert(layer)))
    return model


def _is_tuner_layer(module) -> bool:
    # PEFT's adapter-holding layers (LoRA, IA3, ...) derive from peft's BaseTunerLayer; found by
    # name so that peft need not be imported
    return any(c.__name__ == "BaseTunerLayer" and c.__module__.startswith("peft")
               for c in type(module).__mro__)


def adapter_layers(model: nn.Module) -> set:
    """Names of the modules of ``model`` that belong to PEFT adapters (LoRA's ``lora_A`` /
    ``lora_B`` and the like): everything under a peft tuner layer but its ``base_layer``. The
    swaps leave them alone: adapters are the float weights being trained (an int8 ``lora_A``
    froze the adapter and broke peft's forward), and pruning them is not pruning the model."""
    owned = set()
    for name, module in model.named_modules(remove_duplicate=False):
        if _is_tuner_layer(module):
            prefix = f"{name}." if name else ""
            for sub, _ in module.named_modules(remove_duplicate=False):
                if sub and sub != "base_layer" and not sub.startswith("base_layer."):
                    owned.add(prefix + sub)
    return owned


def fp32_state(state_dict, prefix: str, names) -> None:
    """For ``_load_from_state_dict``: the fp32 state (int8 scales, codebooks) arrives fp32 even
    from a checkpoint saved after ``.half()`` elsewhere. A copy into the layer casts anyway, but
    ``load_state_dict(assign=True)`` installs the tensor as it is, and every later forward
    refused its fp16 scales. (``state_dict`` is load_state_dict's own shallow copy: the
    caller's dict is not changed.)"""
    for name in names:
        value = state_dict.get(prefix + name)
        if (isinstance(value, torch.Tensor) and value.is_floating_point()
                and value.dtype != torch.float32):
            state_dict[prefix + name] = value.float()


def refuse_float_codes(module: nn.Module, state_dict, prefix: str, codes: dict,
                       error_msgs: list) -> bool:
    """For ``_load_from_state_dict`` of a layer holding integer codes (``codes``: name -> dtype):
    a float tensor under a code's name is a float checkpoint meeting a compressed layer, and
    copying it would truncate weights into codes without a word (with ``strict=False`` nothing
    else complains). Record a clear error instead, and return False: load nothing into the
    layer."""
    ok = True
    for name, dtype in codes.items():
        value = state_dict.get(prefix + name)
        if isinstance(value, torch.Tensor) and value.dtype != dtype:
            error_msgs.append(
                f"{type(module).__name__}: {prefix}{name} in the state_dict is "
                f"{str(value.dtype).replace('torch.', '')}, not "
                f"{str(dtype).replace('torch.', '')} codes: a float checkpoint loads into the "
                "float model, which quantize_ then compresses (or into "
                "fastkd.load_compressed's skeleton, for a compressed one)")
            ok = False
    return ok


def guard_peft_bases(who: str, model: nn.Module, names) -> None:
    """Before ``who`` compresses the ``base_layer`` of PEFT tuner layers (LoRA on a model that
    is then compressed): peft's ``merge_and_unload`` / ``merge_adapter`` add the adapter's delta
    into ``base_layer.weight``, which a compressed layer does not hold as a plain float weight
    (an Int8Linear's int8 codes refuse it, a MaskedLinear masks part of it away, a SharedLinear's
    looked-up weight is a copy: a merge that does nothing). peft's LoRA ``Linear`` wrappers
    become :class:`fastkd.lora.LoraCompressedLinear` (same state, a merge into a compressed base
    raises and says what to do); other tuner layers get a warning."""
    lora, others = [], []
    for name in names:
        parent, _, attr = name.rpartition(".")
        if attr != "base_layer" or not _is_tuner_layer(model.get_submodule(parent)):
            continue
        wrapper = model.get_submodule(parent)
        cls = type(wrapper)
        if cls.__name__ == "Linear" and cls.__module__ == "peft.tuners.lora.layer":
            lora.append(wrapper)
        elif cls.__name__ != "LoraCompressedLinear":
            others.append(parent)
    if lora:
        from ..lora import LoraCompressedLinear

        for wrapper in lora:
            wrapper.__class__ = LoraCompressedLinear  # a subclass adding no state
    if others:
        import warnings

        warnings.warn(
            f"{who} compresses the base layer of {len(others)} PEFT adapter layer(s) "
            f"({shown(others)}). Keep the adapters unmerged, or call fastkd.decompress_ (and "
            "fastkd.fold_masks_) before peft's merge_and_unload / merge_adapter: peft adds the "
            "adapter into base_layer.weight, which these layers do not hold as a float weight, "
            "so a merge into them fails or is silently wrong.", stacklevel=3)


def refuse_peft_wrapped_experts(who: str, model: nn.Module, names) -> None:
    """Raise before ``who`` replaces MoE experts that a PEFT tuner layer wraps as its
    ``base_layer`` (LoRA on the experts' own 3-D weights: peft's ``target_parameters``). peft
    re-parametrizes the base's weight by name at every forward; a stand-in holds int8 codes in
    another layout or a codebook under that name (the forward fails or computes the delta on the
    codes), or masks the delta away. Nothing has been changed when it raises."""
    wrapped = []
    for name in names:
        parent, _, attr = name.rpartition(".")
        if attr == "base_layer" and _is_tuner_layer(model.get_submodule(parent)):
            wrapped.append(name)
    if wrapped:
        raise ValueError(
            f"{who} cannot replace {len(wrapped)} Mixture-of-Experts experts module(s) wrapped "
            f"by PEFT adapters on their own weights ({shown(wrapped)}; peft's "
            "target_parameters): the adapters re-parametrize the float weights, which the "
            "compressed experts do not hold. Compress before adding such adapters (LoRA on "
            "pruned experts works: sparsify_ keeps their weights as Parameters), or leave these "
            "experts out with filter_fn. Nothing was changed.")


def shown(names: list, limit: int = 3) -> str:
    """The first ``limit`` names, comma-separated, with ", ..." when there are more: for
    warnings that name layers."""
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def require_values(weight: torch.Tensor, who: str) -> None:
    """A clear error where a weight's values are needed and it has none (the meta device)."""
    if weight.is_meta:
        raise ValueError(
            f"{who} needs the weight's values, but it is on the meta device: load the weights "
            "first (e.g. load_state_dict or to_empty + initialisation)"
        )


def tied_elsewhere(model: nn.Module, targets) -> list:
    """The names, among ``targets`` ((name, linear) pairs), of linears whose weight another module
    of ``model`` holds too (an lm_head tied to the input embedding). Replacing such a linear
    unties it: the other module keeps the float weight, and the model then holds both."""
    owners: dict = {}
    for mod_name, mod in model.named_modules():
        for p in mod.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(mod_name)
    return [name for name, lin in targets
            if len(owners.get(id(getattr(lin, "weight", None)), ())) > 1]


def warn_untied(who: str, names: list) -> None:
    if names:
        import warnings

        warnings.warn(
            f"{who}: {shown(names)} share(s) its weight with another module (tied embeddings); "
            "replacing it unties them, and that module keeps the float weight, so the model now "
            "holds both. To keep the tie, leave it out with filter_fn.", stacklevel=3)


def warn_compressed_left(who: str, model: nn.Module, filter_fn, kinds: tuple,
                         advice: str) -> None:
    """Warn when ``model`` holds fastkd layers of ``kinds`` (class names) that ``who`` leaves as
    they are (for example ``sparsify_`` after ``quantize_``): the step silently did nothing to
    them otherwise."""
    left = [name for name, m in model.named_modules()
            if type(m).__name__ in kinds and type(m).__module__.startswith("fastkd.")
            and (filter_fn is None or filter_fn(m, name))]
    if left:
        import warnings

        warnings.warn(f"{who} leaves {len(left)} {'/'.join(kinds)} layer(s) as they are "
                      f"({shown(left)}): "
                      f"{advice}", stacklevel=3)


def _selected(filter_fn, module: nn.Module, name: str) -> bool:
    """``filter_fn(module, name)`` for a module that is not a linear: a filter written for
    linears may read attributes it lacks, and then it has not left the module out."""
    if filter_fn is None:
        return True
    try:
        return bool(filter_fn(module, name))
    except Exception:
        return True


def warn_stacked_weights_left(who: str, model: nn.Module, filter_fn) -> None:
    """Warn when ``model`` keeps weight matrices stacked in 3-D (or higher) parameters outside
    convolutions: the experts of a Mixture-of-Experts model as transformers 5 holds them
    (Mixtral, Qwen-MoE, DeepSeek-V3, gpt-oss: ``experts.gate_up_proj`` ``(E, 2I, H)``). fastkd's
    layers replace 2-D linears only, so ``who`` leaves them float, and they are most of such a
    model's weights: without a word, the user would believe the whole model was compressed."""
    left, numel, total = [], 0, 0
    for name, m in model.named_modules():
        own = [(pn, p) for pn, p in m.named_parameters(recurse=False)]
        total += sum(p.numel() for _, p in own)
        if isinstance(m, nn.modules.conv._ConvNd):
            continue
        # a stack of matrices: several along the first dimension (ViT's cls_token (1, 1, H) and
        # position_embeddings (1, T, H) are single tables, not experts)
        stacked = [(pn, p) for pn, p in own if p.dim() >= 3 and p.is_floating_point()
                   and p.shape[0] > 1 and min(p.shape[-2:]) > 1]
        if stacked and _selected(filter_fn, m, name):
            left.append(f"{name or type(m).__name__} ({', '.join(pn for pn, _ in stacked)})")
            numel += sum(p.numel() for _, p in stacked)
    if left:
        import warnings

        kinds = {"quantize_": "Int8Experts", "sparsify_": "MaskedExperts",
                 "share_weights_": "SharedExperts"}
        why = ("not experts modules built with transformers' use_experts_implementation, the "
               f"kind it turns into fastkd.nn.{kinds[who]}" if who in kinds else
               f"{who}'s layers replace 2-D linear layers")
        warnings.warn(
            f"{who} leaves {len(left)} module(s) with weights stacked in 3-D parameters as they "
            f"are, in floating point: {shown(left, 2)}; {numel / max(total, 1):.0%} of the model's "
            f"parameters (a Mixture-of-Experts model's experts, say: {why}). Leave them out with "
            "filter_fn to silence this.", stacklevel=3)
