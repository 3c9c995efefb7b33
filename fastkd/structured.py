"""Structured pruning that makes a model physically smaller.

``structured_mask`` chooses whole output neurons (rows, ``dim=0``) or input channels (columns,
``dim=1``) of a weight by L2 norm. Applying such a mask (``weight.mul_(mask)``, or a masked layer)
leaves zero rows/columns; ``shrink_`` then removes those neurons from pairs of layers it can prove are
connected, so the result is a smaller dense model that computes the same function:

* ``nn.Sequential`` MLPs: ``Linear -> elementwise activations/dropout -> Linear``;
* Hugging Face BERT-style blocks: ``intermediate.dense`` (+ activation) -> ``output.dense``;
* LLaMA-style gated MLPs: ``gate_proj``, ``up_proj`` -> ``down_proj`` (``act(gate) * up``), and
  the same under T5 v1.1's names (``wi_0``, ``wi_1`` -> ``wo``), Phi-3's and GLM's packed
  ``gate_up_proj`` and ModernBERT's packed ``Wi -> Wo``;
* two-layer MLPs under other common names: ``fc1 -> fc2`` (ViT, CLIP, SigLIP; OPT, BART and
  Whisper layers), ``lin1 -> lin2`` (DistilBERT), ``dense_h_to_4h -> dense_4h_to_h`` (GPT-NeoX,
  BLOOM, Falcon), ``fc_in -> fc_out`` (GPT-J), ``wi -> wo`` (T5), ``up_proj -> down_proj``
  without a gate (MPT, Nemotron, Apertus, Arcee). Names are a convention, not a proof, so each
  of these is checked by running the module on a random input before and after (arguments
  beyond the hidden states get None, or zeros: a residual): a module whose output changes is
  put back as it was, with a warning;
* GPT-2-style MLPs of Hugging Face ``Conv1D`` layers: ``c_fc`` (+ activation) -> ``c_proj`` (or
  the ``MaskedLinear`` layers ``sparsify_`` put there);
* GPT-2-style attention heads (``c_attn`` packing q, k and v, then ``c_proj``);
* attention heads: BERT-style self-attention (through the model's own ``prune_heads`` when the
  installed transformers has it, otherwise by slicing query/key/value/output the same way),
  LLaMA-style grouped-query attention (whole key/value groups with their query heads), and
  multi-head attention found by its projections' names (``q_proj``/``k_proj``/``v_proj`` with
  ``o_proj`` or ``out_proj``: ViT, CLIP, SigLIP, OPT, BART; ``q_lin``...``out_lin``: DistilBERT),
  checked by running the module like the name-matched MLPs.

A hidden neuron ``j`` between ``A`` (producing) and ``B`` (consuming) is dead, and may go, when
``B``'s column ``j`` is zero (nothing reaches the output whatever ``j`` computes), or when ``A``'s row
``j`` and bias are zero and the activation maps 0 to 0 (``j`` is always 0, so it contributes 0).
In the MLP pairs (``nn.Sequential`` and BERT-style), a neuron whose row of ``A`` is zero but whose
bias is not (row pruning with a mask, e.g. ``MaskedLinear`` with ``structured_mask(dim=0)``, leaves
biases alone) always holds ``act(bias_j)``: its constant contribution is folded into ``B``'s bias
and it goes too. Nothing else is removed, so the shrunk model's output equals the masked model's
(to rounding). ``MaskedLinear`` layers count as linears: a sliced one keeps the rest of its mask,
or becomes a plain ``nn.Linear`` when none of it is left.

``structured_mask`` is public as ``fastkd.prune.structured_mask``.
"""

from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import Tensor, nn

from . import hf
from .nn._linear_like import (
    as_linear,
    computes_linear,
    in_original_layout,
    is_hf_conv1d,
    is_masked_linear,
    linear_of_class,
    refuse_distributed,
    remember_layout,
    shown,
    torch_pruned,
    unwrapped_model,
)

__all__ = ["structured_mask", "shrink_"]


# ------------------------------------------------------------------------------------------------
# masks
# ------------------------------------------------------------------------------------------------


def structured_mask(weight: Tensor, sparsity: float, dim: int = 0) -> Tensor:
    """Boolean keep-mask (same shape as ``weight``) that zeroes whole slices with the smallest L2 norm.

    Args:
        weight: ``(out_features, in_features)`` floating weight (any leading layout of a 2-D matrix).
        sparsity: fraction of slices to remove, in ``[0, 1)``; ``round(sparsity * n)`` slices go.
        dim: ``0`` removes output neurons (rows), ``1`` removes input channels (columns).

    Ties in norm are broken by index (lower index pruned first), so the mask is deterministic.
    """
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got {weight.dim()}-D")
    if not weight.dtype.is_floating_point:
        raise TypeError(f"weight must be floating point, got {weight.dtype}")
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):  # numpy's too
        raise TypeError(f"sparsity must be a number, got {type(sparsity).__name__}")
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity must lie in [0, 1), got {sparsity}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim not in (0, 1, -1, -2):
        raise ValueError(f"dim must be 0 (output neurons) or 1 (input channels), got {dim}")
    dim = dim % 2
    n = weight.shape[dim]
    n_prune = int(round(float(sparsity) * n))
    norms = weight.detach().float().norm(dim=1 - dim)
    if not torch.isfinite(norms).all():
        raise ValueError("weight contains inf or NaN; cannot rank slices by norm")
    keep = torch.ones(n, dtype=torch.bool, device=weight.device)
    if n_prune > 0:
        # stable sort: equal norms keep index order, so the lowest index among ties goes first
        order = torch.sort(norms, stable=True).indices
        keep[order[:n_prune]] = False
    shape = (n, 1) if dim == 0 else (1, n)
    return keep.reshape(shape).expand_as(weight).clone()


# ------------------------------------------------------------------------------------------------
# proving neurons dead
# ------------------------------------------------------------------------------------------------


def _effective_weight(layer: nn.Module) -> Tensor:
    """The weight a linear-like layer multiplies by (a MaskedLinear: W o M)."""
    return layer.masked_weight() if is_masked_linear(layer) else layer.weight.detach()


def _plain_linear(layer) -> bool:
    # nn.Linear, a subclass computing the same product (Falcon's) and fastkd's MaskedLinear, whose
    # per-weight mask is sliced with it; other subclasses may keep per-feature state of their own
    return type(layer) is nn.Linear or is_masked_linear(layer) or computes_linear(layer)


def _zero_rows(layer: nn.Linear) -> Tensor:
    w = _effective_weight(layer)
    z = (w == 0).all(dim=1)
    if layer.bias is not None:
        z &= layer.bias.detach() == 0
    return z


def _zero_cols(layer: nn.Linear) -> Tensor:
    return (_effective_weight(layer) == 0).all(dim=0)


def _maps_zero_to_zero(fn) -> bool:
    try:
        with torch.no_grad():
            out = fn(torch.zeros(4))
    except Exception:
        return False
    return isinstance(out, Tensor) and out.shape == (4,) and bool((out == 0).all())


# Modules that act elementwise (or are the identity at inference), so hidden neuron j of the layer
# before maps to neuron j of the layer after.
_ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.SELU,
    nn.CELU, nn.Mish, nn.Hardswish, nn.Hardtanh, nn.Hardsigmoid, nn.Softplus, nn.Identity,
    nn.Dropout, nn.AlphaDropout, nn.Tanhshrink, nn.Softsign, nn.PReLU,
)


def _elementwise(m: nn.Module) -> bool:
    if isinstance(m, nn.PReLU):
        return m.weight.numel() == 1  # per-channel PReLU would need slicing too
    return isinstance(m, _ELEMENTWISE)


# ------------------------------------------------------------------------------------------------
# slicing layers
# ------------------------------------------------------------------------------------------------


def _slice_linear(layer: nn.Linear, keep: Tensor, dim: int) -> nn.Linear:
    """A new nn.Linear keeping the rows (dim=0) or columns (dim=1) where `keep` is True. A
    MaskedLinear gives a MaskedLinear with the mask sliced too, or an nn.Linear holding W o M
    when no pruned weight is left (a purely structured mask)."""
    idx = keep.nonzero().squeeze(1).to(layer.weight.device)
    w = _effective_weight(layer).index_select(dim, idx)
    b = None
    if layer.bias is not None:
        b = layer.bias.detach().index_select(0, idx) if dim == 0 else layer.bias.detach()
    mask = layer.mask.index_select(dim, idx) if is_masked_linear(layer) else None
    if mask is not None and not bool(mask.all()):
        from .nn.masked_linear import MaskedLinear

        new = MaskedLinear(w.shape[1], w.shape[0], bias=b is not None, device=w.device,
                           dtype=w.dtype, backend=layer.backend)
        new.pattern = layer.pattern
        with torch.no_grad():
            new.mask.copy_(mask)
    else:  # nn.Linear, or the subclass it was
        new = linear_of_class(layer, w.shape[1], w.shape[0], b is not None, device=w.device,
                              dtype=w.dtype, cls=nn.Linear if is_masked_linear(layer) else None)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    new.weight.requires_grad_(layer.weight.requires_grad)
    if b is not None:  # a frozen bias (a frozen base model, PEFT) stays frozen
        new.bias.requires_grad_(layer.bias.requires_grad)
    new.train(layer.training)
    # a layer made from GPT-2's Conv1D keeps that origin: a Conv1D again once nothing is masked
    if is_masked_linear(new):
        return remember_layout(new, layer)
    return in_original_layout(layer, new)


def _dead_or_constant(a: nn.Module, b: nn.Module, chain, frozen: bool):
    """Neurons between producer ``a`` and consumer ``b`` (``h = chain(a(x))``) that can go, and
    ``b``'s new bias (or None: unchanged). A neuron goes when ``b``'s column for it is zero, or
    when ``a``'s row for it is zero: then it always holds ``c = chain(a's bias)``; if ``c`` is 0
    it contributes nothing, else (``frozen``: no dropout draws around it) its contribution
    ``b.weight[:, j] * c`` is a constant, folded into ``b``'s bias when ``b`` has one."""
    dead = _zero_cols(b)
    rows = (_effective_weight(a) == 0).all(dim=1) & ~dead
    if not bool(rows.any()):
        return dead, None
    bias_a = a.bias.detach() if a.bias is not None else a.weight.new_zeros(a.out_features)
    try:
        with torch.no_grad():
            c = chain(bias_a[None, :].clone())[0]
    except Exception:
        return dead, None
    if c.shape != bias_a.shape or not bool(torch.isfinite(c).all()):
        return dead, None
    dead = dead | (rows & (c == 0))
    fold = rows & (c != 0)
    if not bool(fold.any()) or b.bias is None or not frozen:
        return dead, None
    w_b = _effective_weight(b)
    shift = w_b[:, fold].double() @ c[fold].double()
    return dead | fold, (b.bias.detach().double() + shift).to(b.bias.dtype)


def _shrink_pair(producers: list, consumer: nn.Linear, dead: Tensor, consumer_bias=None):
    keep = ~dead
    new_consumer = _slice_linear(consumer, keep, 1)
    if consumer_bias is not None:
        with torch.no_grad():
            new_consumer.bias.copy_(consumer_bias)
    return [_slice_linear(p, keep, 0) for p in producers], new_consumer


def _check_keep(n_kept: int, where: str) -> bool:
    # Removing every neuron would leave a 0-width layer: leave such a pair as it is.
    return n_kept > 0


# ------------------------------------------------------------------------------------------------
# the patterns
# ------------------------------------------------------------------------------------------------


def _shrink_sequential(seq: nn.Sequential, report: list, prefix: str) -> None:
    names = list(seq._modules)
    i = 0
    while i < len(names):
        # read the modules afresh: the previous pair may have replaced this one
        mods = list(seq._modules.items())
        name_a, a = mods[i]
        if not _plain_linear(a):
            i += 1
            continue
        j = i + 1
        between = []
        while j < len(mods) and _elementwise(mods[j][1]):
            between.append(mods[j][1])
            j += 1
        if j >= len(mods) or not _plain_linear(mods[j][1]):
            i = j
            continue
        name_b, b = mods[j]
        if a.out_features != b.in_features:
            i = j
            continue

        def chain(x, _between=between):
            for m in _between:
                x = m(x) if not isinstance(m, (nn.Dropout, nn.AlphaDropout)) else x
            return x

        frozen = not any(isinstance(m, (nn.Dropout, nn.AlphaDropout)) and m.training and m.p > 0
                         for m in between)
        dead, bias_b = _dead_or_constant(a, b, chain, frozen)
        n_dead = int(dead.sum())
        if n_dead and _check_keep(a.out_features - n_dead, prefix + name_a):
            (new_a,), new_b = _shrink_pair([a], b, dead, bias_b)
            setattr(seq, name_a, new_a)
            setattr(seq, name_b, new_b)
            report.append((f"{prefix}{name_a}->{name_b}", a.out_features, new_a.out_features))
        i = j  # b may be the producer of the next pair


def _shrink_bert_mlp(layer: nn.Module, report: list, prefix: str) -> bool:
    inter, out = getattr(layer, "intermediate", None), getattr(layer, "output", None)
    a, b = getattr(inter, "dense", None), getattr(out, "dense", None)
    if not (_plain_linear(a) and _plain_linear(b)) or a.out_features != b.in_features:
        return False
    act = getattr(inter, "intermediate_act_fn", None)
    if act is None:
        dead, bias_b = _zero_cols(b), None
    else:
        # constants are folded only in eval mode: a dropout after the activation (Timesformer's)
        # would drop them in training
        dead, bias_b = _dead_or_constant(a, b, act, frozen=not layer.training)
    n_dead = int(dead.sum())
    if n_dead and _check_keep(a.out_features - n_dead, prefix):
        (new_a,), new_b = _shrink_pair([a], b, dead, bias_b)
        inter.dense, out.dense = new_a, new_b
        report.append((f"{prefix}intermediate/output", a.out_features, new_a.out_features))
    return True


def _shrink_gated_mlp(mlp: nn.Module, report: list, prefix: str) -> bool:
    for names in _GATED_NAMES:
        gate, up, down = (getattr(mlp, n, None) for n in names)
        if all(_plain_linear(x) for x in (gate, up, down)):
            break
    else:
        return False
    if not (gate.out_features == up.out_features == down.in_features):
        return False
    # down(act(gate(x)) * up(x)): neuron j is 0 when up's row is 0, or gate's row is 0 and act(0)=0
    dead = _zero_cols(down) | _zero_rows(up)
    act = _activation(mlp)
    if act is not None and _maps_zero_to_zero(act):
        dead |= _zero_rows(gate)
    n_dead = int(dead.sum())
    if n_dead and _check_keep(gate.out_features - n_dead, prefix):
        (new_gate, new_up), new_down = _shrink_pair([gate, up], down, dead)
        layers = dict(zip(names, (new_gate, new_up, new_down)))
        if isinstance(getattr(mlp, "intermediate_size", None), int):
            layers["intermediate_size"] = new_gate.out_features

        # checked by running it like the MLPs of other names: LLaMA's names are used by MLPs
        # that do more (Gemma3n's activation sparsity: a cut-off from the statistics of all
        # the neurons; BitNet's norm over the intermediate width)
        if not _keep_if_same(mlp, gate, lambda: _set(mlp, **layers),
                             f"{prefix}{'/'.join(names)}"):
            return True
        label = "gate/up/down" if names[0] == "gate_proj" else "/".join(names)
        report.append((f"{prefix}{label}", gate.out_features, new_gate.out_features))
    return True


# ------------------------------------------------------------------------------------------------
# MLPs named by other conventions, each shrink checked by running the module
# ------------------------------------------------------------------------------------------------

# (producer, consumer) attribute names of two-layer MLPs whose forward is
# consumer(act(producer(x))), with at most dropout in between: ViT/CLIP/SigLIP ``fc1``/``fc2``
# (and OPT/BART decoder layers, which hold them directly), DistilBERT ``lin1``/``lin2``,
# GPT-NeoX/Falcon ``dense_h_to_4h``/``dense_4h_to_h``, GPT-J ``fc_in``/``fc_out``, T5 ``wi``/``wo``.
_MLP_PAIRS = (
    ("fc1", "fc2"), ("lin1", "lin2"), ("dense_h_to_4h", "dense_4h_to_h"), ("fc_in", "fc_out"),
    ("wi", "wo"), ("up_proj", "down_proj"),
)
# where those modules keep their activation (BLOOM: gelu_impl)
_ACT_NAMES = ("activation_fn", "activation", "act", "act_fn", "gelu_impl")
# (packed, consumer) names of MLPs computing consumer(act(first half) * second half) of
# packed(x): Phi-3 / GLM's gate_up_proj -> down_proj, ModernBERT's Wi -> Wo
_PACKED_GATED_NAMES = (("gate_up_proj", "down_proj"), ("Wi", "Wo"))
# (gate, up, down) of gated MLPs down(act(gate(x)) * up(x)) besides LLaMA's names: T5 v1.1's.
_GATED_NAMES = (("gate_proj", "up_proj", "down_proj"), ("wi_0", "wi_1", "wo"))


def _activation(module: nn.Module):
    for name in _ACT_NAMES:
        act = getattr(module, name, None)
        if callable(act):
            return act
    return None


def _outputs_on(module: nn.Module, x: Tensor, given: Optional[dict] = None):
    """The tensors ``module`` returns for hidden states ``x`` in eval mode, or None when it cannot
    be called with hidden states alone: other required arguments get None, or, when that fails,
    zeros shaped like ``x`` (BLOOM's and MPT's MLPs add a ``residual``). ``given`` fixes the
    value of some arguments (an attention module's rotary ``position_embeddings``)."""
    import inspect

    given = given or {}

    try:
        params = list(inspect.signature(module.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        params = []
    required = [p.name for p in params if p.default is inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    names = {p.name for p in params}
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    out = None
    try:
        for fill in (None, torch.zeros_like(x)):
            try:
                with torch.no_grad():
                    args = {name: fill for name in required}
                    args.update((k, v) for k, v in given.items() if k in names)
                    out = module(x, **args)
                break
            except Exception:
                if not required:
                    break
    finally:
        for m, flag in flags:
            m.train(flag)
    if out is None:
        return None
    out = out if isinstance(out, (tuple, list)) else (out,)
    return [t.detach().clone() for t in out if isinstance(t, Tensor)]


# max |after - before| allowed, relative to max |before|: rounding (fewer terms in a sum, a folded
# bias) stays far below it; a neuron wrongly taken for dead or a mis-paired one gives O(1).
_CHECK_RTOL = {torch.float32: 1e-4, torch.float64: 1e-9, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _keep_if_same(module: nn.Module, like: nn.Module, change, where: str,
                  what: str = "an MLP's layers", first_only: bool = False,
                  givens=({},)) -> bool:
    """Apply ``change()`` (which returns a function undoing it) to ``module`` and keep it only if
    the module's output on a random input is unchanged (only its first output with
    ``first_only``: an attention module's weights lose the removed heads). Attribute names are a
    convention, not a proof that layers are connected the way a pattern assumes; running the
    module is. ``givens``: argument values to try in turn (see ``_outputs_on``)."""
    import warnings

    w = like.weight
    g = torch.Generator(device=w.device).manual_seed(0)
    x = torch.randn(2, 3, like.in_features, generator=g, device=w.device).to(w.dtype)
    before = given = None
    for given in givens:
        before = _outputs_on(module, x, given)
        if before:
            break
    if not before:
        warnings.warn(f"shrink_: {where} look like {what} with something dead in them, but the "
                      "module cannot be run on hidden states alone to check a shrink; left as "
                      "they were", stacklevel=4)
        return False
    undo = change()
    after = _outputs_on(module, x, given)
    if first_only and after:
        before, after = before[:1], after[:1]
    ok = after is not None and len(after) == len(before)
    if ok:
        tol = _CHECK_RTOL.get(w.dtype, 1e-4)
        for b, a in zip(before, after):
            scale = float(b.abs().max()) if b.numel() else 0.0
            if a.shape != b.shape or not bool(((a - b).abs() <= tol * scale + 1e-6).all()):
                ok = False
    if not ok:
        undo()
        warnings.warn(f"shrink_: {where} look like {what} but removing what is dead in them "
                      "changed the module's output; left as they were", stacklevel=4)
    return ok


def _set(module: nn.Module, **layers):
    """Set attributes of ``module``; return a function putting the old ones back."""
    old = {name: getattr(module, name) for name in layers}
    for name, layer in layers.items():
        setattr(module, name, layer)
    return lambda: [setattr(module, name, layer) for name, layer in old.items()]


def _shrink_named_mlp(mod: nn.Module, report: list, prefix: str) -> bool:
    for name_a, name_b in _MLP_PAIRS:
        a, b = getattr(mod, name_a, None), getattr(mod, name_b, None)
        if _plain_linear(a) and _plain_linear(b) and a.out_features == b.in_features:
            break
    else:
        return False
    act = _activation(mod)
    if act is None:
        dead, bias_b = _zero_cols(b), None
    else:
        # constants are folded only in eval mode: a dropout between the layers may be a function
        # call no module list shows (BART's activation_dropout), and would drop them in training
        dead, bias_b = _dead_or_constant(a, b, act, frozen=not mod.training)
    n_dead = int(dead.sum())
    if n_dead and _check_keep(a.out_features - n_dead, prefix):
        (new_a,), new_b = _shrink_pair([a], b, dead, bias_b)
        where = f"{prefix}{name_a}/{name_b}"
        layers = {name_a: new_a, name_b: new_b}
        if isinstance(getattr(mod, "intermediate_size", None), int):  # Nemotron keeps one
            layers["intermediate_size"] = new_a.out_features
        if _keep_if_same(mod, a, lambda: _set(mod, **layers), where):
            report.append((where, a.out_features, new_a.out_features))
    return True


def _shrink_packed_gated_mlp(mlp: nn.Module, report: list, prefix: str) -> bool:
    """Phi-3's MLP: ``gate, up = gate_up_proj(x).chunk(2)``; ``down_proj(up * act(gate))``
    (ModernBERT's: ``Wi``, ``Wo``)."""
    for names in _PACKED_GATED_NAMES:
        gate_up, down = (getattr(mlp, n, None) for n in names)
        if _plain_linear(gate_up) and _plain_linear(down):
            break
    else:
        return False
    n = down.in_features
    if gate_up.out_features != 2 * n:
        return False
    rows_zero = _zero_rows(gate_up)
    dead = _zero_cols(down) | rows_zero[n:]
    act = _activation(mlp)
    if act is not None and _maps_zero_to_zero(act):
        dead |= rows_zero[:n]
    n_dead = int(dead.sum())
    if n_dead and _check_keep(n - n_dead, prefix):
        keep = ~dead
        new_gate_up = _slice_linear(gate_up, torch.cat([keep, keep]), 0)
        new_down = _slice_linear(down, keep, 1)
        where = f"{prefix}gate_up/down" if names[0] == "gate_up_proj" else f"{prefix}Wi/Wo"
        layers = dict(zip(names, (new_gate_up, new_down)))
        if isinstance(getattr(mlp, "intermediate_size", None), int):
            layers["intermediate_size"] = n - n_dead
        if _keep_if_same(mlp, gate_up, lambda: _set(mlp, **layers), where):
            report.append((where, n, n - n_dead))
    return True


def _slice_conv1d(layer: nn.Module, keep: Tensor, dim: int) -> nn.Module:
    """A new Hugging Face Conv1D keeping the output features (dim=0) or input features (dim=1)
    where `keep` is True. Conv1D stores its weight (in, out), the transpose of nn.Linear."""
    idx = keep.nonzero().squeeze(1).to(layer.weight.device)
    w = layer.weight.detach().index_select(1 - dim, idx)
    b = layer.bias.detach().index_select(0, idx) if dim == 0 else layer.bias.detach()
    new = type(layer)(w.shape[1], w.shape[0]).to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        new.bias.copy_(b)
    new.weight.requires_grad_(layer.weight.requires_grad)
    new.bias.requires_grad_(layer.bias.requires_grad)
    new.train(layer.training)
    return new


def _shrink_conv1d_mlp(mlp: nn.Module, report: list, prefix: str) -> bool:
    a, b = getattr(mlp, "c_fc", None), getattr(mlp, "c_proj", None)
    act = getattr(mlp, "act", None)
    # one side pruned (a MaskedLinear made from its Conv1D), the other still a Conv1D: the Conv1D
    # takes part as the nn.Linear it computes and gets its own layout back after
    conv = {side: layer for side, layer in (("a", a), ("b", b))
            if is_hf_conv1d(layer) and not torch_pruned(layer)}
    if len(conv) == 1 and all(_plain_linear(x) or is_hf_conv1d(x) for x in (a, b)):
        a, b = (as_linear(x, "shrink_") if is_hf_conv1d(x) else x for x in (a, b))
    else:
        conv = {}
    if _plain_linear(a) and _plain_linear(b) and a.out_features == b.in_features and act:
        # GPT-2's MLP after sparsify_ (its Conv1D layers became MaskedLinear)
        dead, bias_b = _dead_or_constant(a, b, act, frozen=True)
        n_dead = int(dead.sum())
        if n_dead and _check_keep(a.out_features - n_dead, prefix):
            (new_a,), new_b = _shrink_pair([a], b, dead, bias_b)
            if "a" in conv:
                new_a = in_original_layout(remember_layout(new_a, conv["a"]), new_a)
            if "b" in conv:
                new_b = in_original_layout(remember_layout(new_b, conv["b"]), new_b)
            mlp.c_fc, mlp.c_proj = new_a, new_b
            report.append((f"{prefix}c_fc/c_proj", a.out_features, a.out_features - n_dead))
        return True
    if not (is_hf_conv1d(a) and is_hf_conv1d(b)) or a.weight.shape[1] != b.weight.shape[0]:
        return False
    if a.bias is None or b.bias is None:
        return False
    # c_proj(act(c_fc(x))): neuron j adds nothing when c_proj's input row j is zero, and is 0
    # when c_fc's output column j and bias are zero and act(0) = 0.
    dead = (b.weight.detach() == 0).all(dim=1)
    if act is not None and _maps_zero_to_zero(act):
        dead |= (a.weight.detach() == 0).all(dim=0) & (a.bias.detach() == 0)
    n = a.weight.shape[1]
    n_dead = int(dead.sum())
    if n_dead and _check_keep(n - n_dead, prefix):
        mlp.c_fc, mlp.c_proj = _slice_conv1d(a, ~dead, 0), _slice_conv1d(b, ~dead, 1)
        report.append((f"{prefix}c_fc/c_proj", n, n - n_dead))
    return True


def _shrink_conv1d_attention(attn: nn.Module, report: list, prefix: str) -> bool:
    """GPT-2-style self-attention: one Conv1D ``c_attn`` packing q, k and v (``split_size``
    columns each, ``num_heads`` heads of ``head_dim``), and ``c_proj``."""
    qkv, proj = getattr(attn, "c_attn", None), getattr(attn, "c_proj", None)
    if not (is_hf_conv1d(qkv) and is_hf_conv1d(proj)) or getattr(attn, "is_cross_attention", False):
        return False
    n_heads, hd = getattr(attn, "num_heads", None), getattr(attn, "head_dim", None)
    split = getattr(attn, "split_size", None)
    if not all(isinstance(v, int) and v > 0 for v in (n_heads, hd, split)) or n_heads * hd != split:
        return False
    if qkv.weight.shape[1] != 3 * split or proj.weight.shape[0] != split or qkv.bias is None:
        return False
    # A head adds nothing when its value columns (and bias) are zero, or when c_proj's input rows
    # for it are zero; its query and key columns go with it.
    w, b = qkv.weight.detach(), qkv.bias.detach()
    v_zero = (w[:, 2 * split:] == 0).all(dim=0) & (b[2 * split:] == 0)
    keep = _head_keep(n_heads, hd, v_zero, (proj.weight.detach() == 0).all(dim=1))
    n_keep = int(keep.sum())
    if n_keep in (0, n_heads):
        return True
    keep_feat = keep.repeat_interleave(hd)
    attn.c_attn = _slice_conv1d(qkv, keep_feat.repeat(3), 0)
    attn.c_proj = _slice_conv1d(proj, keep_feat, 1)
    attn.num_heads, attn.split_size = n_keep, n_keep * hd
    report.append((f"{prefix}heads", n_heads, n_keep))
    return True


def _head_keep(n_heads: int, head_dim: int, rows_zero: Tensor, cols_zero: Tensor) -> Tensor:
    dead = rows_zero.reshape(n_heads, head_dim).all(1) | cols_zero.reshape(n_heads, head_dim).all(1)
    return ~dead


def _shrink_bert_attention(attn: nn.Module, report: list, prefix: str) -> bool:
    sa, out = getattr(attn, "self", None), getattr(attn, "output", None)
    q, k, v = (getattr(sa, n, None) for n in ("query", "key", "value"))
    o = getattr(out, "dense", None)
    if not all(_plain_linear(x) for x in (q, k, v, o)):
        return False
    n_heads, hd = getattr(sa, "num_attention_heads", None), getattr(sa, "attention_head_size", None)
    if not isinstance(n_heads, int) or not isinstance(hd, int) or n_heads * hd != v.out_features:
        return False
    if q.out_features != v.out_features or k.out_features != v.out_features:
        return False
    # A head's context is softmax(...) @ V_h: zero when its value rows are zero; and it adds
    # nothing when the output projection's columns for it are zero.
    keep = _head_keep(n_heads, hd, _zero_rows(v), _zero_cols(o))
    dead_heads = (~keep).nonzero().squeeze(1).tolist()
    if not dead_heads or len(dead_heads) == n_heads:
        return True
    where = f"{prefix}self.query/key/value/output.dense"
    outside = _per_head_arguments(attn)
    if outside:  # LayoutLMv3's relative position biases: made per head outside this module
        import warnings

        warnings.warn(f"shrink_: {where} look like BERT's attention with dead heads, but it "
                      f"takes per-head inputs made elsewhere ({', '.join(outside)}) that "
                      "would keep every head; left as they were", stacklevel=4)
        return True
    keep_feat = keep.repeat_interleave(hd)
    layers = dict(query=_slice_linear(q, keep_feat, 0), key=_slice_linear(k, keep_feat, 0),
                  value=_slice_linear(v, keep_feat, 0))
    counts = dict(num_attention_heads=n_heads - len(dead_heads),
                  all_head_size=(n_heads - len(dead_heads)) * hd)
    dense = _slice_linear(o, keep_feat, 1)

    def change():
        undo = (_set(sa, **layers), _set(sa, **counts), _set(out, dense=dense))
        return lambda: [u() for u in undo]

    # run it to check: Swin-v2's logit scale and position-bias MLP, Nystromformer's grouped
    # convolution hold per-head state these projections do not
    if not _keep_if_same(attn, q, change, where, "attention projections", first_only=True):
        return True
    if callable(getattr(attn, "prune_heads", None)) and not any(
            is_masked_linear(x) for x in (q, k, v, o)):  # it would rebuild them as plain, unmasked
        _set(sa, query=q, key=k, value=v, num_attention_heads=n_heads, all_head_size=n_heads * hd)
        out.dense = o
        attn.prune_heads(dead_heads)  # the model's own head pruning (transformers < 5)
    report.append((f"{prefix}heads", n_heads, n_heads - len(dead_heads)))
    return True


# arguments through which an attention module gets per-head tensors computed outside it
_PER_HEAD_ARGUMENTS = ("rel_pos", "rel_2d_pos", "position_bias", "relative_position_bias")


def _per_head_arguments(attn: nn.Module) -> list:
    import inspect

    try:
        names = set(inspect.signature(attn.forward).parameters)
    except (TypeError, ValueError):
        return []
    return [n for n in _PER_HEAD_ARGUMENTS if n in names]


# (query, key, value, output) projection names of multi-head attention modules that hold a head
# size but no key/value grouping: ViT, CLIP/SigLIP, OPT, BART/Whisper, DistilBERT.
_MHA_NAMES = (("q_proj", "k_proj", "v_proj", "o_proj"), ("q_proj", "k_proj", "v_proj", "out_proj"),
              ("q_lin", "k_lin", "v_lin", "out_lin"))
_HEAD_DIM_NAMES = ("head_dim", "attention_head_size", "head_size")
_HEAD_COUNT_NAMES = ("num_heads", "num_attention_heads", "n_heads")


def _shrink_mha_heads(attn: nn.Module, report: list, prefix: str) -> bool:
    """Dead heads of a multi-head attention module found by its projections' names; the result is
    checked by running the module (a module that reshapes by a width it keeps elsewhere, say,
    would change its output) and undone if it differs."""
    for names in _MHA_NAMES:
        q, k, v, o = (getattr(attn, n, None) for n in names)
        if all(_plain_linear(x) for x in (q, k, v, o)):
            break
    else:
        return False
    if getattr(attn, "num_key_value_groups", 1) != 1:
        return False
    hd = next((getattr(attn, n) for n in _HEAD_DIM_NAMES
               if isinstance(getattr(attn, n, None), int)), None)
    if not hd or hd <= 0 or v.out_features % hd:
        return False
    n_heads = v.out_features // hd
    if q.out_features != v.out_features or k.out_features != v.out_features:
        return False
    if o.in_features != v.out_features:
        return False
    keep = _head_keep(n_heads, hd, _zero_rows(v), _zero_cols(o))
    n_keep = int(keep.sum())
    if n_keep in (0, n_heads):
        return True
    feat = keep.repeat_interleave(hd)
    layers = dict(zip(names, (_slice_linear(q, feat, 0), _slice_linear(k, feat, 0),
                              _slice_linear(v, feat, 0), _slice_linear(o, feat, 1))))
    counts = {n: n_keep for n in _HEAD_COUNT_NAMES if getattr(attn, n, None) == n_heads}

    def change():
        undo_layers, undo_counts = _set(attn, **layers), _set(attn, **counts)
        return lambda: (undo_layers(), undo_counts())

    where = f"{prefix}{'/'.join(names)}"
    if _keep_if_same(attn, q, change, where, "attention projections", first_only=True):
        report.append((f"{prefix}heads", n_heads, n_keep))
    return True


def _shrink_gqa_attention(attn: nn.Module, report: list, prefix: str) -> bool:
    q, k, v, o = (getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    if not all(_plain_linear(x) for x in (q, k, v, o)):
        return False
    hd, groups = getattr(attn, "head_dim", None), getattr(attn, "num_key_value_groups", None)
    if not isinstance(hd, int) or not isinstance(groups, int) or hd <= 0 or groups <= 0:
        return False
    n_kv = v.out_features // hd
    if n_kv * hd != v.out_features or k.out_features != v.out_features:
        return False
    if q.out_features != n_kv * groups * hd or o.in_features != q.out_features:
        return False
    # A key/value group (with its `groups` query heads) goes when its value rows are zero, or
    # when the output columns of all its query heads are zero; the group ratio stays the same.
    v_dead = _zero_rows(v).reshape(n_kv, hd).all(1)
    o_dead = _zero_cols(o).reshape(n_kv, groups * hd).all(1)
    keep_kv = ~(v_dead | o_dead)
    n_keep = int(keep_kv.sum())
    if n_keep == n_kv or n_keep == 0:
        return True
    kv_feat = keep_kv.repeat_interleave(hd)
    q_feat = keep_kv.repeat_interleave(groups * hd)
    layers = dict(q_proj=_slice_linear(q, q_feat, 0), k_proj=_slice_linear(k, kv_feat, 0),
                  v_proj=_slice_linear(v, kv_feat, 0), o_proj=_slice_linear(o, q_feat, 1))
    counts = {name: val for name, val in (("num_heads", n_keep * groups),
                                          ("num_key_value_heads", n_keep))
              if hasattr(attn, name)}

    def change():
        undo_layers, undo_counts = _set(attn, **layers), _set(attn, **counts)
        return lambda: (undo_layers(), undo_counts())

    # Run it to check: q/k norms over the full width (OLMo-2), per-head norms or sinks (Cohere,
    # gpt-oss) and other per-head state do not shrink with the projections.
    if _keep_if_same(attn, q, change, f"{prefix}q_proj/k_proj/v_proj/o_proj",
                     "grouped-query attention", first_only=True,
                     givens=_rotary_givens(attn, hd, q.weight)):
        report.append((f"{prefix}kv_groups", n_kv, n_keep))
    return True


def _rotary_givens(attn: nn.Module, head_dim: int, like: Tensor) -> list:
    """Values for transformers attention's ``position_embeddings`` argument, (cos, sin) of a
    random rotation, at each rotary width the module may use (all of a head, half of it as
    gpt-oss's, or the part of it partial rotary embeddings turn)."""
    dims = [head_dim, head_dim // 2]
    for name in ("rotary_ndims", "rotary_dim", "rotary_emb_dim"):
        if isinstance(getattr(attn, name, None), int):
            dims.append(getattr(attn, name))
    factor = getattr(getattr(attn, "config", None), "partial_rotary_factor", None)
    if isinstance(factor, (int, float)) and 0 < factor < 1:
        dims.append(int(head_dim * factor))
    g = torch.Generator(device=like.device).manual_seed(1)
    givens = []
    for d in dict.fromkeys(dims):
        angle = torch.randn(2, 3, d, generator=g, device=like.device)
        givens.append({"position_embeddings": (angle.cos().to(like.dtype),
                                               angle.sin().to(like.dtype))})
    return givens + [{}]


_PATTERNS: list = [
    _shrink_bert_attention,
    _shrink_gqa_attention,
    _shrink_gated_mlp,
    _shrink_bert_mlp,
    _shrink_conv1d_mlp,
    _shrink_conv1d_attention,
    _shrink_packed_gated_mlp,
    _shrink_named_mlp,
    _shrink_mha_heads,
]


def shrink_(model: nn.Module, *, verbose: bool = False) -> list:
    """Physically remove pruned (all-zero) neurons and attention heads, in place.

    Walks ``model`` and, for every pattern it recognises (see the module docstring), replaces the
    connected ``nn.Linear`` layers by smaller ones without the dead neurons. Layers it cannot prove
    connected are left alone. Returns a list of ``(where, before, after)`` widths.

    The model's ``config`` (if any) is not changed: widths may now differ per layer, which no
    config describes. ``fastkd.save_compressed`` records them, and ``fastkd.load_compressed``
    loads the file into a full-size model of the same architecture.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    refuse_distributed(model, "shrink_")
    model = unwrapped_model(model)  # report names as the model's own (no wrapper prefix)
    report: list = []
    for name, mod in list(model.named_modules()):
        prefix = f"{name}." if name else ""
        if isinstance(mod, nn.Sequential):
            _shrink_sequential(mod, report, prefix)
            continue
        for pattern in _PATTERNS:
            if pattern(mod, report, prefix):
                break
    _warn_if_dead_left(model, removed=bool(report))
    hf.record(model, shrunk=bool(report))
    if verbose:
        for where, before, after in report:
            print(f"shrink_: {where}: {before} -> {after}")
    return report


def _warn_if_dead_left(model: nn.Module, removed: bool = False) -> None:
    """Say so when, after shrink_, some layer still has dead neurons it could not remove (all of
    them when it removed nothing), rather than leave the user to find out from the parameter
    count."""
    import warnings

    def pruned(m) -> bool:  # whole weight rows (biases aside) or columns at zero
        w = _effective_weight(m) == 0
        return bool(w.all(dim=1).any()) or bool(w.all(dim=0).any())

    dead = [name for name, m in model.named_modules()
            if (isinstance(m, nn.Linear) or is_masked_linear(m)) and pruned(m)]
    if dead:
        warnings.warn(
            f"shrink_ removed {'some, not all' if removed else 'nothing'}: {len(dead)} linear "
            f"layer(s) still have all-zero weight rows or columns ({shown(dead)}), which shrink_ "
            "could not prove removable "
            "(fastkd.structured lists the patterns it knows; nn.Linear subclasses are sliced only "
            "where they compute x W^T + b and hold nothing else)", stacklevel=3)
    compressed = _compressed_with_dead_neurons(model)
    if compressed:
        warnings.warn(
            f"shrink_ removes neurons from float and pruned (MaskedLinear) layers only: "
            f"{len(compressed)} quantized or weight-shared layer(s) have all-zero weight rows "
            f"or columns ({shown(compressed)}), left as they are. Call shrink_ before "
            "quantize_ / share_weights_ (or decompress_ first)", stacklevel=3)
    experts = _experts_with_dead_neurons(model)
    if experts:
        warnings.warn(
            f"shrink_ does not shrink Mixture-of-Experts experts: {len(experts)} experts "
            f"module(s) have all-zero rows or columns in an expert's matrices "
            f"({shown(experts)}), left as they are (their width is one for all the experts)",
            stacklevel=3)


def _compressed_with_dead_neurons(model: nn.Module) -> list:
    """Names of Int8Linear / SharedLinear layers (which shrink_ does not slice) whose weight
    has a whole row or column at zero: int8 codes, or the looked-up weights."""
    from .nn.int8_linear import Int8Linear
    from .nn.shared_linear import SharedLinear

    found = []
    for name, m in model.named_modules():
        if isinstance(m, Int8Linear):
            w = m.weight
        elif isinstance(m, SharedLinear):
            w = m.dequantized_weight()
        else:
            continue
        if w.is_meta or not w.numel():
            continue
        zero = w == 0
        if bool(zero.all(dim=1).any()) or bool(zero.all(dim=0).any()):
            found.append(name)
    return found


def _experts_with_dead_neurons(model: nn.Module) -> list:
    """Names of transformers experts modules (and MaskedExperts) whose stacked (E, a, b)
    matrices have, for some expert, a whole row or column at zero (``W o M`` for pruned ones)."""
    from .nn._stacked_experts import _projections, is_stacked_experts
    from .nn.masked_experts import MaskedExperts

    found = []
    for name, m in model.named_modules():
        masked = isinstance(m, MaskedExperts)
        if not (masked or is_stacked_experts(m)):
            continue
        for p in _projections(m):
            w = getattr(m, p).detach()
            if masked:
                w = torch.where(getattr(m, f"{p}_mask"), w, 0)
            if w.is_meta:
                continue
            zero = w == 0
            if bool(zero.all(dim=2).any()) or bool(zero.all(dim=1).any()):
                found.append(name)
                break
    return found
