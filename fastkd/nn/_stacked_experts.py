"""What fastkd's stand-ins for a transformers experts module share (Int8Experts, MaskedExperts).

transformers (5 and later) keeps a MoE block's experts in one module with 3-D parameters, one
matrix per expert: ``gate_up_proj`` ``(E, 2I, H)`` (or ``up_proj`` ``(E, I, H)`` without a gate)
and ``down_proj`` ``(E, H, I)``, transposed where the class says ``is_transposed`` (gpt-oss),
with optional ``*_bias`` ``(E, out)``. Its ``forward(hidden_states, top_k_index, top_k_weights)``
sends each token to its top-k experts. The class carries the flags that describe that
computation (``has_gate``, ``has_bias``, ``is_transposed``, ``has_post_expert_norm``,
``_apply_gate``): these are what fastkd reads, so it covers Mixtral, Qwen-MoE, DeepSeek-V3,
gpt-oss and the other classes built the same way without knowing them by name.

Llama 4's experts hold the same kind of weights without the flags: ``gate_up_proj`` ``(E, H,
2I)`` (gate, then up) and ``down_proj`` ``(E, I, H)``, a transposed gated layout, and their
``forward(hidden_states)`` takes the tokens already laid out expert by expert: ``E x T`` rows,
each scaled by its router score (zero where the token is not routed to that expert). fastkd
reads that layout from the structure too (``_expert_major``) and runs only the rows that are
not zero.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module_globals
from torch.nn.utils import parametrize

from .. import _ops
from ._linear_like import _MODULE_STATE, bare_module, plain_attributes

__all__ = ["StackedExperts", "is_stacked_experts"]


_FLAGS = ("has_gate", "has_bias", "is_transposed", "has_post_expert_norm")
# What Llama 4's expert-major layout amounts to in those flags (is_concatenated: gate, then up)
_EXPERT_MAJOR_FLAGS = {"has_gate": True, "has_bias": False, "is_transposed": True,
                       "has_post_expert_norm": False, "is_concatenated": True}


def _is_expert_major(module: nn.Module) -> bool:
    """Llama 4's layout (see the module's docstring): no flags, ``gate_up_proj`` and
    ``down_proj`` only, an ``act_fn`` child, and ``forward(hidden_states)``."""
    # the dict checks first: every module of a model scanned for experts comes here
    if (set(module._parameters) != {"gate_up_proj", "down_proj"}
            or set(module._modules) != {"act_fn"} or any(hasattr(module, f) for f in _FLAGS)):
        return False
    try:
        args = list(inspect.signature(type(module).forward).parameters)
    except (TypeError, ValueError):
        return False
    return args[1:] == ["hidden_states"]


def _flags(module: nn.Module):
    """The layout flags of an experts module: its own (transformers' decorator sets them), what
    Llama 4's layout amounts to, or None."""
    if all(isinstance(getattr(module, f, None), bool) for f in _FLAGS):
        return {f: getattr(module, f) for f in _FLAGS}
    return dict(_EXPERT_MAJOR_FLAGS) if _is_expert_major(module) else None


def _projections(experts: nn.Module) -> tuple:
    return ("gate_up_proj" if _flags(experts)["has_gate"] else "up_proj", "down_proj")


def is_stacked_experts(module) -> bool:
    """True for a transformers experts module Int8Experts can stand in for: the flags of
    ``transformers.integrations.moe.use_experts_implementation`` (or Llama 4's layout), 3-D
    floating weights of the shapes they imply, no expert parallelism, nothing else holding
    parameters but a post-expert norm."""
    if not isinstance(module, nn.Module) or isinstance(module, StackedExperts):
        return False
    flags = _flags(module)
    if flags is None:
        return False
    if getattr(module, "_is_expert_parallel", False) or not isinstance(
            getattr(module, "num_experts", None), int):
        return False
    expert_major = _is_expert_major(module)
    if flags["has_gate"] and not expert_major and not callable(
            getattr(module, "_apply_gate", None)):
        return False
    if (not flags["has_gate"] or expert_major) and not callable(getattr(module, "act_fn", None)):
        return False
    expected = set(_projections(module))
    if flags["has_bias"]:
        expected |= {f"{p}_bias" for p in _projections(module)}
    if set(module._parameters) != expected or module._buffers:
        return False
    extra = set(module._modules) - {"act_fn", "post_expert_norm"}
    if extra:
        return False
    e = module.num_experts
    up, down = (module._parameters[p] for p in _projections(module))
    if not all(p is not None and p.dim() == 3 and p.is_floating_point() and p.shape[0] == e
               for p in (up, down)):
        return False
    (n_up, k_up), (n_down, k_down) = (_out_in(module, p) for p in (up, down))
    hidden = k_up
    inner = n_up // 2 if flags["has_gate"] else n_up
    return n_down == hidden and k_down == inner and (not flags["has_gate"] or n_up % 2 == 0)


def _out_in(experts: nn.Module, w: Tensor) -> tuple:
    """(out, in) of one expert's matrix in a stacked weight."""
    transposed = _flags(experts)["is_transposed"]
    return (w.shape[2], w.shape[1]) if transposed else (w.shape[1], w.shape[2])


def _zero_at_zero(act_fn) -> bool:
    """Whether ``act_fn(0) == 0`` (SiLU, GELU, ReLU), checked on a CPU scalar."""
    try:
        with torch.no_grad():
            # on the CPU whatever the default device (from_pretrained builds under meta)
            zero = act_fn(torch.zeros(1, device="cpu"))
        return bool(torch.is_tensor(zero) and (zero == 0).all())
    except Exception:  # an activation that cannot run on a CPU scalar: keep every row
        return False


def _concatenated_gate(experts: nn.Module, h: Tensor) -> Tensor:
    """Llama 4's gate: ``act(gate) * up`` over the two halves of the gate_up projection."""
    gate, up = h.chunk(2, dim=-1)
    return experts.act_fn(gate) * up


class StackedExperts(nn.Module):
    """Base of fastkd's experts modules: the source class's settings, activation / norm
    children and gate, and the routing loop's pieces. Subclasses hold the weights."""

    _own_attributes: tuple = ()  # plain attributes of the subclass, not the source's

    def __init__(self, experts: nn.Module):
        super().__init__()
        if not is_stacked_experts(experts):
            raise TypeError(
                f"{type(self).__name__} takes a transformers experts module with 3-D stacked "
                f"weights (use_experts_implementation), got {type(experts).__name__}")
        # the source's settings and its activation / norm modules, which forward uses as they are
        self.__dict__.update(plain_attributes(experts, self._own_attributes))
        self._expert_major = _is_expert_major(experts)
        self.__dict__.update(_flags(experts))  # Llama 4's: what its layout amounts to
        for name, child in experts.named_children():
            self.add_module(name, child)
        self._zero_skip = self._expert_major and _zero_at_zero(self.act_fn)
        self._source_type = type(experts)
        # its private settings too (transformers' _is_expert_parallel, read by its forward), for
        # the module of its class that to_experts gives back
        self._source_private = {k: v for k, v in vars(experts).items()
                                if k.startswith("_") and k not in _MODULE_STATE}
        self._gate_fn = (None if not self.has_gate else _concatenated_gate if self._expert_major
                         else type(experts)._apply_gate)
        self.projections = _projections(experts)
        _ops.register_live_experts(self)

    def __setstate__(self, state):
        state.setdefault("_expert_major", False)  # pickled before Llama 4's layout was read
        state.setdefault("_zero_skip", False)
        super().__setstate__(state)
        # a copy (copy.deepcopy, pickle) is a module of its own for the compiled op
        _ops.register_live_experts(self)

    def _eager_reason(self):
        """Why torch.compile must not run this module as one opaque op (whose backward re-runs
        ``_forward`` on the module), or None. Where that re-run would differ from the forward
        or miss what the graph must see, Dynamo traces the eager loop instead (a graph break;
        ``fullgraph=True`` raises, with this reason)."""
        if getattr(self, "_is_replica", False):
            return "a DataParallel replica (its parameters are not the module's own)"
        if _module_globals._global_forward_hooks or _module_globals._global_forward_pre_hooks:
            return "global module hooks (they would run inside the op, and again in backward)"
        for m in self.modules():
            if parametrize.is_parametrized(m):
                return ("a parametrized weight (peft's LoRA on the experts applies it during the "
                        "forward call, with adapter parameters the op would not see)")
            if m is not self and (m._forward_hooks or m._forward_pre_hooks):
                return ("hooks on its activation or norm (they would run inside the op on "
                        "detached tensors, and again in backward)")
            if self.training and isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0:
                return "dropout in training (the backward's re-run would draw other masks)"
        return None

    def _groups(self, top_k_index: Tensor):
        """``(expert, token, slot)`` for every expert some (token, slot) pair reaches. The pairs
        are grouped by expert with one sort and one host sync, rather than a search (and a sync)
        per expert; ids outside [0, E) (expert parallelism's "not here" sentinel) sort last and
        are dropped."""
        n_experts, k = self.num_experts, top_k_index.shape[-1]
        flat = top_k_index.reshape(-1)
        flat = torch.where((flat >= 0) & (flat < n_experts), flat, n_experts)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=n_experts + 1)[:n_experts].tolist()
        start = 0
        for e, count in enumerate(counts):
            if count == 0:
                continue
            pairs = order[start:start + count]
            start += count
            yield e, pairs // k, pairs % k

    def _linear(self, x: Tensor, projection: str, expert: int) -> Tensor:
        """One expert's projection of its tokens ``x``: what a subclass computes."""
        raise NotImplementedError

    def forward(self, hidden_states: Tensor, top_k_index=None, top_k_weights=None) -> Tensor:
        """The source class's computation. Eager runs ``_forward``; torch.compile sees it as
        one ``fastkd::stacked_experts`` node (its routing loop has data-dependent sizes), so a
        model holding these layers compiles whole (``fullgraph=True``). Llama 4's experts take
        ``hidden_states`` alone (see ``_expert_major_routing``)."""
        if top_k_index is None and top_k_weights is None and self._expert_major:
            top_k_index, top_k_weights = self._expert_major_routing(hidden_states)
        elif not (isinstance(top_k_index, Tensor) and isinstance(top_k_weights, Tensor)):
            raise TypeError(f"{type(self).__name__} takes hidden_states, top_k_index and "
                            "top_k_weights tensors")
        if torch.jit.is_tracing():
            raise RuntimeError(
                f"{type(self).__name__} cannot be traced with torch.jit.trace: which experts "
                "run, and on how many tokens, depends on the routing, and a trace would replay "
                "this batch's routing on every other one; use torch.compile")
        if torch.compiler.is_compiling():
            reason = self._eager_reason()
            if reason is None:
                return _ops.stacked_experts(self, hidden_states, top_k_index, top_k_weights)
            torch._dynamo.graph_break(
                msg=f"fastkd: {type(self).__name__} runs its eager routing loop (data-dependent "
                    f"sizes) under torch.compile here: {reason}")
        return self._forward(hidden_states, top_k_index, top_k_weights)

    def _expert_major_routing(self, hidden_states: Tensor):
        """Llama 4's input as a routing: row ``r`` of the ``(E x T, H)`` rows goes to expert
        ``r // T`` with weight 1 (the router's score is already in the row). A row of zeros (a
        token the router did not send to that expert) is left out: with no bias its output is
        exactly zero, and so is its input's gradient where ``act(0) = 0`` (SiLU), so it is only
        left out then."""
        n_experts = self.num_experts
        if hidden_states.dim() != 2 or hidden_states.shape[0] % n_experts:
            raise ValueError(
                f"{type(self).__name__} (Llama 4 layout) takes ({n_experts} x tokens, hidden) "
                f"rows laid out expert by expert, got {tuple(hidden_states.shape)}")
        rows = hidden_states.shape[0]
        index = torch.arange(rows, device=hidden_states.device) // max(rows // n_experts, 1)
        if self._zero_skip:
            index = torch.where((hidden_states != 0).any(dim=-1), index, n_experts)
        weights = torch.ones(rows, 1, dtype=hidden_states.dtype, device=hidden_states.device)
        return index[:, None], weights

    def _forward(self, hidden_states: Tensor, top_k_index: Tensor,
                 top_k_weights: Tensor) -> Tensor:
        """The source class's computation, each expert a batch reaches through ``_linear``."""
        up, down = self.projections
        out = torch.zeros_like(hidden_states)
        for e, token, slot in self._groups(top_k_index):
            h = self._linear(self._activate(self._linear(hidden_states[token], up, e)), down, e)
            self._add_expert_output(out, h, token, slot, top_k_weights)
        return out

    def _activate(self, h: Tensor) -> Tensor:
        return self._gate_fn(self, h) if self.has_gate else self.act_fn(h)

    def _add_expert_output(self, out: Tensor, h: Tensor, token: Tensor, slot: Tensor,
                           top_k_weights: Tensor) -> None:
        if self.has_post_expert_norm:
            h = self.post_expert_norm(h)
        out.index_add_(0, token, (h * top_k_weights[token, slot, None]).to(out.dtype))

    def _bare_source(self) -> nn.Module:
        """A module of the source class with its settings and children, no weights yet."""
        synthesized = tuple(_EXPERT_MAJOR_FLAGS) if self._expert_major else ()
        new = bare_module(self._source_type, {
            **plain_attributes(self, self._own_attributes + ("projections",) + synthesized),
            **self._source_private})
        for name, child in self.named_children():
            new.add_module(name, child)
        return new
