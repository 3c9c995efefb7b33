"""Distillation as a few lines of user code: :class:`Distiller`.

    distiller = fastkd.Distiller(teacher, student, temperature=4.0, alpha=0.5)
    history = distiller.fit(train_loader, epochs=10, eval_loader=test_loader)
    metrics = distiller.evaluate(test_loader)   # {"loss", "accuracy", "agreement"}

What one training step computes (``s``/``t`` the student's/teacher's outputs, ``y`` the target):

- classification: ``KDLoss(T, alpha)(s, t, y)`` = ``alpha * T^2 * KL(p_t^T || p_s^T) +
  (1 - alpha) * CE(s, y)``, or the KL term alone when the batch carries no target
  (:class:`fastkd.nn.KDLoss`, so the fused kernel runs on a GPU);
- regression: ``alpha * MSE(s, t) + (1 - alpha) * MSE(s, y)``, or ``MSE(s, t)`` without a target;
- plus, with ``hints``, ``hint_weight * sum_i MSE(proj_i(f_s_i), f_t_i)`` (FitNets, Romero et al.
  2015): forward hooks capture the student feature ``f_s_i`` and the teacher feature ``f_t_i``, and
  a learned projection ``proj_i`` (a ``Linear`` on the last dimension, or a 1x1 ``Conv2d`` on
  4-d ``(N, C, H, W)`` features) maps the student's width to the teacher's. The projections are
  built from the first batch's shapes and trained by the same optimizer as the student.
- plus, with ``adversarial_weight > 0``, ``adversarial_weight * mean(-log D(s))``, the
  non-saturating generator loss of :class:`fastkd.nn.AdversarialKDLoss`: a discriminator ``D`` over
  the output's last dimension (logits, or features for regression) learns to tell teacher outputs
  from student outputs. ``D`` is built from the first batch's output width and has its own Adam
  (betas ``(0.5, 0.999)``), never part of the student's optimizer; after each student step it takes
  one step on ``mean(-log D(t)) + mean(-log(1 - D(s.detach())))``.

The teacher runs in eval mode under ``torch.no_grad()`` (and under ``torch.autocast`` with
``teacher_autocast``); its parameters are never updated. The student keeps whatever layers it has:
a pruned student (``fastkd.nn.MaskedLinear``) keeps its mask because that layer gives pruned
weights a zero gradient, and only trainable parameters are optimized.

Batches may be a tensor (inputs only), a tuple/list ``(inputs, target, ...)`` (``inputs`` may
itself be a tuple of positional arguments), or a mapping of keyword arguments with an optional
``"labels"`` entry (Hugging Face style). Model outputs may be a tensor, a tuple (first element),
or an object or mapping with ``logits``. For a Hugging Face decoder-only language model (GPT-2,
LLaMA, ...) the labels follow that library's convention, the token at each position (as a
language-modelling collator makes them): the logits at position ``i`` are paired with the label at
``i + 1`` and the last position is dropped, as the model's own loss does (``shift_labels``). A
mapping batch without labels but with an ``attention_mask`` of the outputs' leading shape (padded
sequences) counts only the positions the mask keeps, in the loss and the metrics; with labels,
``ignore_index`` (-100) marks what does not count, as in Hugging Face.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
import warnings
from collections.abc import Mapping
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from . import functional as fkd_functional
from ._validate import check_number, check_temperature
from .nn._linear_like import shown
from .nn.adversarial import AdversarialKDLoss
from .nn.kd_loss import KDLoss

TASKS = ("classification", "regression")

OptimizerArg = Union[
    None, torch.optim.Optimizer, Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
]


def _get_submodule(model: nn.Module, path: str, which: str) -> nn.Module:
    if not isinstance(path, str) or not path:
        raise TypeError(f"{which} hint path must be a non-empty str, got {path!r}")
    try:
        return model.get_submodule(path)
    except AttributeError:
        pass
    try:  # a path in the model inside a DataParallel / DDP / FSDP wrapper, as its user wrote it
        return _unwrap(model).get_submodule(path)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        raise ValueError(
            f"{which} has no module at path {path!r}; its modules are: "
            f"{shown(names, 20) or '(none)'}"
        ) from None


def _output_tensor(out, who: str) -> Tensor:
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, Mapping) and isinstance(out.get("logits"), Tensor):
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(
        f"{who} returned {type(out).__name__}; expected a tensor, a tuple whose first element is "
        "a tensor, or an object/mapping with a 'logits' tensor"
    )


def _to_device(obj, device: torch.device):
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


TOPK_KEYS = ("teacher_ids", "teacher_logprobs")


class _TopK:
    """An offline teacher's output for one batch: its top-k class ids and log-probabilities,
    ``(..., k)`` each, position by position like the student's logits."""

    def __init__(self, ids: Tensor, logprobs: Tensor):
        self.ids, self.logprobs = ids, logprobs

    def __getitem__(self, index) -> "_TopK":
        return _TopK(self.ids[index], self.logprobs[index])

    @property
    def shape(self):
        return self.ids.shape

    def argmax(self, dim: int = -1) -> Tensor:
        """The teacher's top-1 class per row."""
        best = self.logprobs.argmax(dim=-1, keepdim=True)
        return self.ids.gather(-1, best).squeeze(-1)


def _take_topk(batch):
    """(batch without the stored teacher, _TopK) for offline distillation: a mapping batch's
    ``teacher_ids``/``teacher_logprobs`` entries, or a tuple's third and fourth elements."""
    if isinstance(batch, Mapping):
        missing = [k for k in TOPK_KEYS if k not in batch]
        if missing:
            raise ValueError(f"an offline (teacher=None) batch needs {TOPK_KEYS}; missing "
                             f"{missing}")
        rest = {k: v for k, v in batch.items() if k not in TOPK_KEYS}
        return rest, _TopK(batch["teacher_ids"], batch["teacher_logprobs"])
    if isinstance(batch, (tuple, list)) and len(batch) == 4:
        return (batch[0], batch[1]), _TopK(batch[2], batch[3])
    raise ValueError("an offline (teacher=None) batch is a mapping with 'teacher_ids' and "
                     "'teacher_logprobs', or a tuple (inputs, target, teacher_ids, "
                     "teacher_logprobs)")


def _mapping_call(kwargs: Mapping, labels):
    def call(m):
        return m(**kwargs, **_decoder_inputs(m, kwargs, labels))

    return call, labels, kwargs.get("attention_mask")


def _split_batch(batch):
    """-> (call, target, attention_mask): call(model) runs the model on the batch's inputs; the
    mask is a mapping batch's ``attention_mask`` (None otherwise)."""
    if isinstance(batch, Mapping):
        # "labels", or "label" as torch's default collate leaves a datasets column of that name
        # (transformers' collators rename it): passed to the model, it was swallowed by its
        # **kwargs and the hard-label term silently dropped
        key = "labels" if "labels" in batch or "label" not in batch else "label"
        kwargs = {k: v for k, v in batch.items() if k != key}
        return _mapping_call(kwargs, batch.get(key))
    if isinstance(batch, Tensor):
        return (lambda m: m(batch)), None, None
    if isinstance(batch, (tuple, list)):
        if len(batch) == 0:
            raise ValueError("a batch is an empty tuple/list")
        if len(batch) > 2:
            # (input_ids, attention_mask, labels) from a TensorDataset: the mask was taken for
            # the labels (right shape, values in range) and the labels dropped, silently
            raise ValueError(
                f"a batch tuple is (inputs,) or (inputs, target), got {len(batch)} elements; "
                "pass other model inputs as a mapping ({'input_ids': ..., 'attention_mask': "
                "..., 'labels': ...}) or as a tuple of positional inputs ((ids, mask), labels)")
        inputs = batch[0]
        target = batch[1] if len(batch) > 1 else None
        if isinstance(inputs, Mapping):  # (tokenizer output, labels): keyword inputs
            return _mapping_call(dict(inputs), target)
        if isinstance(inputs, (tuple, list)):
            return (lambda m: m(*inputs)), target, None
        return (lambda m: m(inputs)), target, None
    raise TypeError(
        f"a batch must be a tensor, a tuple/list (inputs, target) or a mapping; got "
        f"{type(batch).__name__}"
    )


def _decoder_inputs(model: nn.Module, kwargs: Mapping, labels) -> dict:
    """``decoder_input_ids`` for a Hugging Face encoder-decoder model (T5, BART, Whisper) given
    labels but no decoder inputs: the model's own right shift of the labels, which it makes
    itself only when it gets the labels (the Distiller keeps them for its loss). Each model
    shifts with its own start token, so teacher and student may differ there."""
    if labels is None or "decoder_input_ids" in kwargs or "decoder_inputs_embeds" in kwargs:
        return {}
    inner = _unwrap(model)
    config = getattr(inner, "config", None)
    if not getattr(config, "is_encoder_decoder", False):
        return {}
    prepare = getattr(inner, "prepare_decoder_input_ids_from_labels", None)
    if callable(prepare):
        return {"decoder_input_ids": prepare(labels=labels)}
    # Whisper, M2M100 / NLLB, Blenderbot: the same right shift, done by the model's forward
    start = getattr(config, "decoder_start_token_id", None)
    pad = getattr(config, "pad_token_id", None)
    if not isinstance(start, int) or not isinstance(pad, int):
        return {}
    shifted = labels.new_full(labels.shape, start)
    shifted[..., 1:] = labels[..., :-1]
    return {"decoder_input_ids": shifted.masked_fill(shifted == -100, pad)}


def _data_parallel_inner(model: nn.Module) -> Optional[nn.Module]:
    """The module inside a DataParallel / DistributedDataParallel / FSDP (v1) wrapper, or None."""
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    if isinstance(model, wrappers) or type(model).__name__ == "FullyShardedDataParallel":
        return getattr(model, "module", None)
    return None


def _gradient_averaging_group(model: nn.Module):
    """``(group, size)`` of the processes over which the student's gradients are averaged
    (DistributedDataParallel, FSDP, FSDP2's fully_shard), or None: one process's gradients."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if isinstance(model, nn.parallel.DistributedDataParallel) or (
            type(model).__name__ == "FullyShardedDataParallel"):
        group = getattr(model, "process_group", None)
    else:
        if not _fsdp2_modules(model):
            return None
        # FSDP2 averages over its mesh's data-parallel dimension; counting over every process
        # is the same weighting when the others (tensor parallel) see the same batch
        group = None
    return group, dist.get_world_size(group)


def _broadcast_parameters(module: nn.Module, averaging) -> None:
    """Give every process the first one's initial parameters of a module fit builds itself
    (hint projections, the discriminator: each process drew its own)."""
    group = averaging[0]
    src = 0 if group is None else dist.get_global_rank(group, 0)
    for p in module.parameters():
        dist.broadcast(p.data, src=src, group=group)


def _average_gradients(params, averaging) -> None:
    """Average the gradients of ``params`` over the processes, as the student's wrapper does
    for its own (a missing gradient counts as zeros, so every process joins each call)."""
    group, world = averaging
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, group=group)
        p.grad.div_(world)


def _clip_grad_norm(params: list, max_norm: float) -> None:
    """``clip_grad_norm_`` over one total norm, also when FSDP2's DTensor parameters and plain
    ones (hint projections) share the optimizer: torch's refuses the mix, so each kind's norm
    is taken apart and the gradients scaled by the total's coefficient."""
    kinds: dict = {}
    for p in params:
        if p.grad is not None:
            kinds.setdefault(type(p.grad), []).append(p)
    if len(kinds) <= 1:
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        return
    norms = []
    for group in kinds.values():  # max_norm inf: the norm only (a scale by 1)
        n = torch.nn.utils.clip_grad_norm_(group, float("inf"))
        n = n.full_tensor() if hasattr(n, "full_tensor") else n
        norms.append(n.float().cpu())
    # as clip_grad_norm_: a nan or inf total norm turns the gradients nan (the step is then
    # refused or skipped), it does not leave them unclipped
    scale = float((max_norm / (torch.stack(norms).norm() + 1e-6)).clamp(max=1.0))
    for group in kinds.values():
        for p in group:
            p.grad.mul_(scale)


def _sum_across(tensors: list, averaging) -> list:
    """The sums over the processes of a few scalar tallies, in one ``all_reduce``."""
    packed = torch.stack([t.double() for t in tensors])
    dist.all_reduce(packed, group=averaging[0])
    return list(packed.unbind())


def _fsdp2_modules(model: nn.Module) -> list:
    """The submodules of ``model`` that FSDP2's ``fully_shard`` manages."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _reshard_fsdp2(model: nn.Module) -> None:
    """Register FSDP2's sharded parameters (the ones an optimizer must hold) on a student
    under ``fully_shard``: from a forward to its backward, and after a forward without
    gradients until the next one, the module holds unsharded stand-ins, and an optimizer built
    over those trained copies that FSDP throws away."""
    for m in _fsdp2_modules(model):
        m.reshard()


def _wrapped_inner(model: nn.Module) -> Optional[nn.Module]:
    """The module inside a data-parallel wrapper (see _data_parallel_inner) or torch.compile's
    OptimizedModule, or None."""
    inner = _data_parallel_inner(model)
    if inner is None and type(model).__name__ == "OptimizedModule":
        inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else None


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel / FSDP (v1) and torch.compile wrappers."""
    inner = _wrapped_inner(model)
    while inner is not None:
        model, inner = inner, _wrapped_inner(inner)
    return model


def _is_hf_causal_lm(model: nn.Module) -> bool:
    """A Hugging Face decoder-only generative model (its labels are the input tokens, shifted by
    the model's own loss); encoder-decoder models align labels with their decoder's logits."""
    config = getattr(model, "config", None)
    can_generate = getattr(model, "can_generate", None)
    if config is None or not callable(can_generate):
        return False
    try:
        generative = bool(can_generate())
    except Exception:
        return False
    return generative and not getattr(config, "is_encoder_decoder", False)


def _language_model(model: nn.Module) -> nn.Module:
    """The transformers ``*ForCausalLM`` of a model: itself, or the one inside a peft
    ``PeftModel`` (whose ``base_model`` is peft's tuner model around the whole causal LM, not
    the transformer body the fused loss runs)."""
    get = getattr(model, "get_base_model", None)
    if callable(get) and hasattr(model, "peft_config"):
        return get()
    return model


def _body(model: nn.Module):
    """The transformer body whose last hidden state a causal LM's head reads: its
    ``base_model``, or, where that is the model itself, its ``model`` child (Llama 4's causal
    LM names its prefix ``language_model`` but holds its body as ``.model``); None if neither.
    The first batch checks that the head of this body's output gives the model's logits."""
    model = _language_model(model)
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        inner = getattr(model, "model", None)
        base = inner if isinstance(inner, nn.Module) and inner is not model else None
    return base


def _mse(a: Tensor, b: Tensor, reduction: str) -> Tensor:
    """F.mse_loss, whose mean over no elements is 0 rather than nan: an empty batch (a ragged
    last one) has weight 0 in the epoch, and 0 * nan stopped fit with a nan loss."""
    if reduction == "mean":
        return F.mse_loss(a, b, reduction="sum") / max(a.numel(), 1)
    return F.mse_loss(a, b, reduction=reduction)


def _in_dtype(dtype: torch.dtype, *tensors):
    """The tensors (None passes) cast to ``dtype``; a cast stays differentiable."""
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def _in_dtype_or_module(dtype, h, w, b):
    """(h, w, b) in ``dtype`` (default: w's), as _in_dtype; a head module ``w`` stays as it is
    and h takes ``dtype`` (default: its own)."""
    if isinstance(w, nn.Module):
        return _in_dtype(dtype or h.dtype, h)[0], w, b
    return _in_dtype(dtype or w.dtype, h, w, b)


def _lm_head_weight(model: nn.Module, who: str, evaluating: bool = False):
    """(weight (V, H), bias or None) of a Hugging Face model's lm head, as a tensor whose
    gradient is the head's own: an ``nn.Linear``'s weight; a ``MaskedLinear``'s ``W o M``
    (pruned entries get zero gradient); the dequantized weight of a ``w8a16`` ``Int8Linear``
    (no gradient: it has no float weight) or of a ``SharedLinear`` whose codebook is frozen.
    The compressed heads are dequantized to a dense (V, H) copy per step. With ``evaluating``
    (no gradient is taken) a ``SharedLinear`` is dequantized whatever its codebook, and a
    ``w8a8`` ``Int8Linear`` comes back as ``(the head module, None)``: its logits are its own
    forward (it quantizes its input), chunk by chunk."""
    from .nn.int8_linear import Int8Linear
    from .nn.masked_linear import MaskedLinear
    from .nn.shared_linear import SharedLinear

    model = _language_model(model)
    base = _body(model)
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if base is None or head is None:
        raise ValueError(
            f"fused_lm_head needs a Hugging Face language model ({who}): a base_model and an "
            f"output embedding; got {type(model).__name__} with head {type(head).__name__}")
    kind = type(head)
    if kind is nn.Linear:
        return head.weight, head.bias
    if kind is MaskedLinear:
        return torch.where(head.mask, head.weight, 0), head.bias
    dtype = getattr(model, "dtype", None)  # dequantize straight into the model's dtype
    dtype = dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None
    if kind is Int8Linear and head.mode == "w8a16":
        return head.dequantized_weight(dtype), head.bias
    if kind is Int8Linear and evaluating:
        return head, None
    if kind is SharedLinear and (evaluating or not (who == "student"
                                                    and head.codebook.requires_grad)):
        weight = head.dequantized_weight()
        return (weight if dtype is None else weight.to(dtype)), head.bias
    why = {
        Int8Linear: "a w8a8 head quantizes its activations, which the fused loss would not",
        SharedLinear: "the fused loss cannot train its codebook (freeze it with "
                      "lm_head.codebook.requires_grad_(False), or leave lm_head out of "
                      "share_weights_)",
    }.get(kind, "it is not a linear layer fastkd can read a weight from")
    raise ValueError(f"fused_lm_head cannot fuse the {who}'s lm head {kind.__name__}: {why}")


def _last_hidden(out) -> Tensor:
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None and isinstance(out, Mapping):
        hidden = out.get("last_hidden_state")
    if not isinstance(hidden, Tensor):
        raise TypeError(f"the base model returned {type(out).__name__} without last_hidden_state")
    return hidden


def _first_tensor(out) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"a hinted module returned {type(out).__name__}, not a tensor")


def _autocast_dtype(device: torch.device, setting, name: str) -> Optional[torch.dtype]:
    if setting is None or setting is False:
        return None
    if isinstance(setting, torch.dtype):
        if setting not in (torch.bfloat16, torch.float16):
            raise ValueError(f"{name} must be bfloat16 or float16, got {setting}")
        return setting
    if setting is True:
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16
    raise TypeError(f"{name} must be None, a bool or a torch.dtype, got {setting!r}")


def _nonempty(loader, name: str) -> None:
    if loader is None:
        raise ValueError(f"{name} is None")
    if isinstance(loader, Tensor):  # iterated, it gives one unbatched, unlabelled row a step
        raise TypeError(f"{name} is a bare tensor, which would be iterated row by row: pass a "
                        "DataLoader or a list of batches")
    try:
        n = len(loader)
    except TypeError:
        return  # an iterable without len: checked after iterating
    if n == 0:
        raise ValueError(f"{name} is empty (len 0): there is nothing to train or evaluate on")


class _HintCapture:
    """Forward hooks that store the latest output of each hinted module, installed only while a
    Distiller method runs (so a later module swap, e.g. sparsify_, never leaves stale hooks)."""

    def __init__(self, modules: Sequence[nn.Module]):
        self.values: list[Optional[Tensor]] = [None] * len(modules)
        self._handles = []
        for i, m in enumerate(modules):
            self._handles.append(m.register_forward_hook(self._hook(i)))

    def _hook(self, i):
        def hook(_module, _inputs, output):
            self.values[i] = _first_tensor(output)

        return hook

    def take(self) -> list[Tensor]:
        vals = list(self.values)
        self.values = [None] * len(vals)
        for i, v in enumerate(vals):
            if v is None:
                raise RuntimeError(
                    f"hinted module {i} did not run in the forward pass, or its forward hook was "
                    "not called: a torch.compile'd model that ran before the Distiller installed "
                    "its hint hooks keeps its compiled code, which skips hooks added later "
                    "(torch._dynamo.config.skip_nnmodule_hook_guards); compile the model after "
                    "creating the Distiller, or call torch._dynamo.reset() before fit/evaluate"
                )
        return vals

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


# Hugging Face config entries by which a causal LM's forward changes its logits after the head
# (name, the value that means "no change"): Gemma 2/3's tanh softcap, Cohere's and Granite's scales.
_LOGIT_POSTPROCESSING = (("final_logit_softcapping", None), ("logit_scale", 1.0),
                         ("logits_scaling", 1.0))


def _logit_postprocessing(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    found = []
    for name, neutral in _LOGIT_POSTPROCESSING:
        value = getattr(config, name, neutral)
        if value is not None and value != neutral:
            found.append(f"{name}={value}")
    return ", ".join(found)


class Distiller:
    """Train ``student`` to match ``teacher``; see the module docstring for the objective.

    Args:
        teacher, student: ``nn.Module``s with outputs of the same shape (``(..., classes)`` for
            classification). Both are moved to ``device``. ``teacher=None``: offline
            distillation from a stored teacher: each batch carries the teacher's top-k class ids
            and log-probabilities (``fastkd.teacher_topk(teacher_logits, k, temperature=T)``,
            shapes ``(..., k)`` matching the student's logits), as ``teacher_ids`` and
            ``teacher_logprobs`` entries of a mapping batch or as the third and fourth elements
            of a tuple ``(inputs, target, ids, logprobs)``; the loss is
            :func:`fastkd.functional.kd_loss_topk` and ``agreement`` counts the teacher's top-1.
        temperature: softening temperature ``T > 0`` (classification).
        divergence, beta: the soft term's divergence, ``"kl"`` (forward KL, Hinton et al.),
            ``"reverse_kl"`` or ``"jsd"`` (generalized Jensen-Shannon with weight ``beta``), as in
            :func:`fastkd.functional.kd_loss`.
        alpha: weight of the teacher term in ``[0, 1]``; ``1 - alpha`` weighs the hard target.
            ``alpha=0`` trains on hard labels only (the teacher is still run for the metrics).
        optimizer: ``None`` (Adam with ``lr``), an optimizer over the student's parameters (the
            hint projections are added to it as a new parameter group), or a callable that takes
            an iterable of parameters and returns an optimizer.
        lr: learning rate of the default Adam, and of the projections' group in a given optimizer.
        device: where to train; default: the student's device (CPU for a parameterless student).
        task: ``"classification"`` (KD loss) or ``"regression"`` (MSE).
        hints: ``[(student_path, teacher_path), ...]`` module paths (as in ``named_modules()``)
            for FitNets feature distillation.
        hint_weight: weight of the hint term (>= 0).
        autocast: mixed precision for the student: ``None``/``False`` (off), ``True`` (bf16, or
            fp16 on a GPU without bf16) or a dtype. The student's forward and the losses run under
            ``torch.autocast`` (parameters and optimizer state stay in their own dtype); with fp16
            the gradients go through a ``torch.amp.GradScaler``.
        teacher_autocast: ``None`` (as ``autocast``), ``False`` (off, even when the student
            uses autocast), ``True`` or a dtype: run the teacher under ``torch.autocast``.
        max_grad_norm: clip the total gradient norm of the optimized parameters to this value
            before each optimizer step (``None``: no clipping).
        scheduler: ``None``, or a callable taking the optimizer and returning a learning-rate
            scheduler (``lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, ...)``); it is
            built with the optimizer and stepped after every optimizer step.
        grad_accum_steps: optimizer steps come every this many batches, and after the last
            batch of an epoch. The step is the one of the joined batches: each batch's loss
            weighs as the rows it counts (targets not ``ignore_index``, positions an
            ``attention_mask`` keeps; every element for regression), so batches with
            uneven padding, and a short last window, take the step one batch would.
        backend: the KD loss backend (``"auto"``, ``"torch"``, ``"triton"``).
        progress: show a tqdm progress bar with the running loss during ``fit``.
        adversarial_weight: weight (>= 0, finite) of the adversarial generator term; ``0`` (the
            default) turns adversarial distillation off. The discriminator is then available as
            ``self.discriminator`` (an :class:`fastkd.nn.AdversarialKDLoss`, built on the first
            training batch) with its optimizer ``self.discriminator_optimizer``.
        adversarial_hidden: hidden width of the discriminator (positive int).
        adversarial_lr: learning rate of the discriminator's Adam; ``None`` uses ``lr``.
        shift_labels: pair the outputs at position ``i`` of the second-to-last dimension with the
            target at ``i + 1`` (next-token prediction; the last position has no target and is
            dropped from the loss and the metrics). ``None`` (default): on when the student is a
            Hugging Face decoder-only generative model, whose batches carry unshifted labels;
            pass ``False`` if your labels are already aligned with the logits.
        fused_lm_head: for Hugging Face causal language models (student and teacher): train
            without materialising either model's logits. Each step runs the models' bodies
            (``base_model``) and hands the last hidden states and the lm-head weights to
            :func:`fastkd.functional.fused_linear_kd_loss`, which computes the logits chunk by
            chunk; the loss equals the unfused one to rounding. Checked on the first batch:
            the models' logits must be exactly ``lm_head(last hidden state)`` (no softcapping or
            scaling). Not with ``adversarial_weight`` (which needs logits). :meth:`evaluate`
            computes the logits a bounded chunk of rows at a time for its metrics.
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        *,
        temperature: float = 4.0,
        alpha: float = 0.5,
        optimizer: OptimizerArg = None,
        lr: float = 1e-3,
        device=None,
        task: str = "classification",
        hints: Optional[Sequence[tuple[str, str]]] = None,
        hint_weight: float = 1.0,
        autocast=None,
        teacher_autocast=None,
        max_grad_norm: Optional[float] = None,
        scheduler=None,
        grad_accum_steps: int = 1,
        backend: str = "auto",
        progress: bool = True,
        adversarial_weight: float = 0.0,
        adversarial_hidden: int = 256,
        adversarial_lr: Optional[float] = None,
        shift_labels: Optional[bool] = None,
        fused_lm_head: bool = False,
        divergence: str = "kl",
        beta: float = 0.5,
    ):
        self.offline = teacher is None
        if not (self.offline or isinstance(teacher, nn.Module)) or not isinstance(student,
                                                                                   nn.Module):
            raise TypeError("teacher and student must be torch.nn.Module instances (teacher "
                            "None: offline distillation from stored top-k)")
        if teacher is student:
            raise ValueError("teacher and student must be different modules")
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        self.temperature = check_temperature(temperature)
        self.alpha = check_number(alpha, "alpha", low=0.0, high=1.0)
        self.lr = check_number(lr, "lr", low=0.0, low_open=True)
        self.hint_weight = check_number(hint_weight, "hint_weight", low=0.0)
        self.adversarial_weight = check_number(adversarial_weight, "adversarial_weight", low=0.0)
        if (
            isinstance(adversarial_hidden, bool)
            or not isinstance(adversarial_hidden, int)
            or adversarial_hidden <= 0
        ):
            raise ValueError(
                f"adversarial_hidden must be a positive int, got {adversarial_hidden!r}"
            )
        self.adversarial_hidden = adversarial_hidden
        self.adversarial_lr = (
            self.lr
            if adversarial_lr is None
            else check_number(adversarial_lr, "adversarial_lr", low=0.0, low_open=True)
        )
        # Built from the first training batch's output width (see _ensure_discriminator).
        self.discriminator: Optional[AdversarialKDLoss] = None
        self.discriminator_optimizer: Optional[torch.optim.Optimizer] = None
        self.task = task
        self.backend = backend
        if not isinstance(progress, bool):  # "no" would have meant True
            raise TypeError(f"progress must be a bool, got {progress!r}")
        self.progress = progress
        if shift_labels is not None and not isinstance(shift_labels, bool):
            raise TypeError(f"shift_labels must be None or a bool, got {shift_labels!r}")
        # a data-parallel wrapper hides the model's config (and so its label convention)
        self.shift_labels = (_is_hf_causal_lm(_unwrap(student)) if shift_labels is None
                             else shift_labels)
        if (shift_labels is None and not self.shift_labels and teacher is not None
                and _is_hf_causal_lm(_unwrap(teacher))):
            # a student of the user's around a causal LM (a wrapper, a custom head): its
            # label convention cannot be read off it, the teacher's can
            warnings.warn(
                "the teacher is a Hugging Face causal language model, but the student is not "
                "recognised as one, so labels are not shifted (shift_labels=False). If your "
                "batches carry unshifted labels (the input tokens, as transformers' own loss "
                "takes them), pass shift_labels=True; pass shift_labels=False to silence this",
                UserWarning, stacklevel=2)
        if not isinstance(fused_lm_head, bool):
            raise TypeError(f"fused_lm_head must be a bool, got {fused_lm_head!r}")
        self.fused_lm_head = fused_lm_head
        self._fused_checked = False
        if self.offline and (task != "classification" or self.adversarial_weight > 0 or hints
                             or fused_lm_head or divergence != "kl"):
            raise ValueError("offline distillation (teacher=None, stored top-k) is for "
                             "classification with forward KL, without hints, adversarial term or "
                             "fused_lm_head (they need the teacher model)")
        if fused_lm_head:
            if task != "classification" or self.adversarial_weight > 0:
                raise ValueError("fused_lm_head needs task='classification' and no adversarial "
                                 "term (the discriminator reads logits)")
            for model, who in ((student, "student"), (teacher, "teacher")):
                if _data_parallel_inner(model) is not None:
                    raise ValueError(
                        f"fused_lm_head runs the {who}'s base_model directly, which would bypass "
                        f"its {type(model).__name__} wrapper (and its gradient synchronisation); "
                        "use the unfused loss, or a sharding that keeps the model's own forward "
                        "(FSDP2 fully_shard)")
                _lm_head_weight(model, who)  # raises if the model has no usable lm head
                post = _logit_postprocessing(model)
                if post:
                    # The first batch's numeric check cannot see a softcap on small logits (a
                    # freshly initialised student's, which grow in training): the config can.
                    raise ValueError(
                        f"fused_lm_head: the {who}'s config post-processes its logits ({post}), "
                        "which fused_linear_kd_loss does not do; use fused_lm_head=False")

        if device is None:
            first = next(iter(student.parameters()), None)
            if first is None:
                first = next(iter(student.buffers()), None)
            device = first.device if first is not None else torch.device("cpu")
        self.device = torch.device(device)
        if self.device.type == "meta":  # .to("meta") would drop both models' weights
            raise ValueError("Distiller trains on real weights: device='meta' (or a student on "
                             "the meta device) holds none; load the weights first")
        self.teacher = None if self.offline else teacher.to(self.device)
        self.student = student.to(self.device)
        self._student_autocast = _autocast_dtype(self.device, autocast, "autocast")
        self._autocast_dtype = (
            self._student_autocast if teacher_autocast is None
            else _autocast_dtype(self.device, teacher_autocast, "teacher_autocast")
        )
        self.max_grad_norm = (
            None if max_grad_norm is None
            else check_number(max_grad_norm, "max_grad_norm", low=0.0, low_open=True)
        )
        if scheduler is not None and not callable(scheduler):
            raise TypeError("scheduler must be None or a callable taking the optimizer and "
                            f"returning an LR scheduler, got {type(scheduler).__name__}")
        self._scheduler_arg = scheduler
        self.scheduler = None
        if isinstance(grad_accum_steps, bool) or not isinstance(grad_accum_steps, int) \
                or grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be an int >= 1, got {grad_accum_steps!r}")
        self.grad_accum_steps = grad_accum_steps
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=self._student_autocast == torch.float16
        )

        self.hints = [tuple(h) for h in (hints or [])]
        for h in self.hints:
            if len(h) != 2:
                raise ValueError(f"each hint is a (student_path, teacher_path) pair, got {h!r}")
            _get_submodule(self.student, h[0], "student")
            _get_submodule(self.teacher, h[1], "teacher")
        # Built from the first batch's feature shapes (see _build_projections).
        self.hint_projections: Optional[nn.ModuleList] = None
        # (group, size) of the processes a DDP / FSDP student averages over, during fit
        self._averaging = None

        self.loss_fn = KDLoss(temperature=self.temperature, alpha=self.alpha, backend=backend,
                              divergence=divergence, beta=beta)
        if optimizer is not None and not (
            isinstance(optimizer, torch.optim.Optimizer) or callable(optimizer)
        ):
            raise TypeError(
                "optimizer must be None, a torch.optim.Optimizer, or a callable returning one"
            )
        self._optimizer_arg = optimizer
        self.optimizer: Optional[torch.optim.Optimizer] = (
            optimizer if isinstance(optimizer, torch.optim.Optimizer) else None
        )
        self.history: list[dict] = []

    # ------------------------------------------------------------------ pieces of a step

    def _student_context(self):
        """torch.autocast for the student's forward and the losses, when ``autocast`` is on."""
        if self._student_autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self._student_autocast)

    def _teacher_forward(self, call, raw: bool = False):
        """call(teacher) without gradients (under autocast with teacher_autocast): its output
        tensor, or with ``raw`` whatever call returns."""
        if self._autocast_dtype is not None:
            ctx = torch.autocast(device_type=self.device.type, dtype=self._autocast_dtype)
        elif self._student_autocast is not None:  # teacher_autocast=False inside the student's
            ctx = torch.autocast(device_type=self.device.type, enabled=False)
        else:
            ctx = contextlib.nullcontext()
        with torch.no_grad(), ctx:
            out = call(self.teacher)
            return out if raw else _output_tensor(out, "teacher")

    def _align(self, s: Tensor, t: Tensor, target: Optional[Tensor], slice_outputs=False):
        """With shift_labels and a target: the output at position i against the target at i + 1
        (the second-to-last output dimension is the sequence); the last position has none.

        For classification the targets move and the last position gets ``ignore_index``: the
        same rows count as when the outputs are sliced to [0, L-1), but the logits stay as they
        are. A (B, L-1, V) slice of them is not a view the loss can take as rows: it would copy
        each model's logits (N x V) and scatter the gradient back through another. With
        ``slice_outputs`` (hidden states, small) or for regression the outputs are sliced. ``t``
        may be a stored top-k teacher (_TopK)."""
        if not self.shift_labels or target is None:
            return s, t, target
        if s.dim() < 3 or target.shape != s.shape[:-1]:
            raise ValueError(
                f"shift_labels pairs (batch, sequence, classes) outputs with (batch, sequence) "
                f"targets; got outputs {tuple(s.shape)} and targets {tuple(target.shape)}"
            )
        if self.task == "classification" and not slice_outputs:
            shifted = torch.full_like(target, self.loss_fn.ignore_index)
            shifted[..., :-1] = target[..., 1:]
            return s, t, shifted
        return s[..., :-1, :], t[..., :-1, :], target[..., 1:]

    def _soft_rows(self, s: Tensor, target: Optional[Tensor], attention_mask) -> Optional[Tensor]:
        """Which output rows count when a classification batch has no target: those its
        attention_mask keeps, when the mask is per output row (a sequence model's padding);
        None (every row) otherwise. With a target, ignore_index marks the rows instead."""
        if (self.task != "classification" or target is not None
                or not isinstance(attention_mask, Tensor)
                or attention_mask.shape != s.shape[:-1]):
            return None
        return attention_mask != 0

    def _check_fused_heads(self, batch) -> None:
        """Once: the models' logits must be lm_head(last hidden state) (no softcapping or
        scaling in their forward), checked on the first sequence of the first batch."""
        one = {k: (v[:1] if isinstance(v, Tensor) and v.dim() > 0 else v)
               for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            for model, who in ((self.student, "student"), (self.teacher, "teacher")):
                head = _language_model(model).get_output_embeddings()
                was_training = model.training
                model.eval()  # the same function twice: no dropout
                try:
                    logits = _output_tensor(model(**one), who).float()
                    hidden = _last_hidden(_body(model)(**one))
                finally:
                    model.train(was_training)
                if type(head) is nn.Linear:
                    fused = F.linear(hidden.to(head.weight.dtype), head.weight, head.bias)
                else:  # a compressed head: its own forward, which the dequantized weight matches
                    fused = head(hidden)
                fused = fused.float()
                tol = 1e-3 * max(logits.abs().max().item(), 1.0)
                if logits.shape != fused.shape or (logits - fused).abs().max().item() > tol:
                    raise ValueError(
                        f"fused_lm_head: the {who}'s logits are not lm_head(last hidden state) "
                        "(its forward post-processes them, e.g. softcapping or scaling); train "
                        "it with fused_lm_head=False"
                    )
        self._fused_checked = True

    def _outputs(self, call, target, attention_mask, topk=None):
        """Both models' outputs for one batch, paired with the targets (shift_labels) and the
        rows that count: (student output, teacher output, target, rows mask or None). Offline,
        ``topk`` is the stored teacher (a _TopK) and stands for the teacher's output."""
        t_out = self._teacher_forward(call) if topk is None else topk
        s_out = _output_tensor(call(self.student), "student")
        self._check_outputs(s_out, t_out)
        s_out, t_out, target = self._align(s_out, t_out, target)
        return s_out, t_out, target, self._soft_rows(s_out, target, attention_mask)

    def _fused_inputs(self, batch, target, attention_mask, evaluating: bool = False):
        """What fused_linear_kd_loss takes for one batch: (student hidden, weight, bias, teacher
        hidden, weight, bias, target, rows to count or None), shifted as in the unfused path.
        With ``evaluating``, a weight may be the head module itself (see _lm_head_weight)."""
        if not isinstance(batch, Mapping):
            raise TypeError("fused_lm_head needs mapping batches (Hugging Face style)")
        if not self._fused_checked:
            self._check_fused_heads(batch)
        kwargs = {k: v for k, v in batch.items() if k != "labels"}
        w_s, b_s = _lm_head_weight(self.student, "student", evaluating)
        w_t, b_t = _lm_head_weight(self.teacher, "teacher", evaluating)
        h_t = self._teacher_forward(
            lambda m: _last_hidden(_body(m)(**kwargs)), raw=True)
        h_s = _last_hidden(_body(self.student)(**kwargs))
        # Each head computes in the dtype its model's own forward would: the autocast dtype of
        # that model (autocast / teacher_autocast), else its weight's. The caller runs the fused
        # loss with autocast off, so a teacher_autocast=False head stays in fp32 inside a bf16
        # student's autocast, as it does unfused.
        # (a head module computes in its input's dtype: the autocast dtype, else the body's)
        h_s, w_s, b_s = _in_dtype_or_module(self._student_autocast, h_s, w_s, b_s)
        h_t, w_t, b_t = _in_dtype_or_module(self._autocast_dtype, h_t, w_t, b_t)
        # hidden states pair with targets and masks position by position, as logits do
        h_s, h_t, target = self._align(h_s, h_t, target, slice_outputs=True)
        keep = self._soft_rows(h_s, target, attention_mask)
        b_t = None if b_t is None else b_t.detach()
        w_t = w_t if isinstance(w_t, nn.Module) else w_t.detach()
        return h_s, w_s, b_s, h_t.detach(), w_t, b_t, target, keep

    def _fused_step_loss(self, batch, target, attention_mask):
        """The output loss of one batch through fused_linear_kd_loss (no N x V logits), and
        the rows that count in it (see _counted)."""
        h_s, w_s, b_s, h_t, w_t, b_t, target, keep = self._fused_inputs(batch, target,
                                                                         attention_mask)
        with torch.autocast(self.device.type, enabled=False):  # dtypes set by _fused_inputs
            loss = fkd_functional.fused_linear_kd_loss(
                h_s, w_s, h_t, w_t, target, student_bias=b_s, teacher_bias=b_t,
                temperature=self.temperature, alpha=self.alpha,
                ignore_index=self.loss_fn.ignore_index,
                reduction="mean" if keep is None else "none", backend=self.backend,
                divergence=self.loss_fn.divergence, beta=self.loss_fn.beta,
            )
        if keep is not None:
            loss = torch.where(keep, loss, 0.0).sum() / keep.sum().clamp_min(1)
        return loss, self._counted(h_s, target, keep)

    def _fused_eval_chunks(self, batch, target, attention_mask):
        """Evaluation in fused mode: (student logits, teacher logits, target, keep) for bounded
        chunks of rows, so no batch-sized N x V tensor exists at once."""
        from ._fused_linear_kd import default_chunk_rows

        h_s, w_s, b_s, h_t, w_t, b_t, target, keep = self._fused_inputs(
            batch, target, attention_mask, evaluating=True)
        h_s, h_t = h_s.reshape(-1, h_s.shape[-1]), h_t.reshape(-1, h_t.shape[-1])
        target = None if target is None else target.reshape(-1)
        keep = None if keep is None else keep.reshape(-1)
        n_rows = h_s.shape[0]
        vocab = w_s.out_features if isinstance(w_s, nn.Module) else w_s.shape[0]
        step = default_chunk_rows(n_rows, vocab)

        def logits(h, w, b):  # a head module (w8a8 int8) runs its own forward
            return w(h) if isinstance(w, nn.Module) else F.linear(h, w, b)

        for r0 in range(0, n_rows, step):
            r1 = min(n_rows, r0 + step)
            with torch.autocast(self.device.type, enabled=False):  # dtypes set by _fused_inputs
                s_logits, t_logits = logits(h_s[r0:r1], w_s, b_s), logits(h_t[r0:r1], w_t, b_t)
            yield (s_logits, t_logits,
                   None if target is None else target[r0:r1],
                   None if keep is None else keep[r0:r1])

    def _check_outputs(self, s: Tensor, t: Tensor) -> None:
        if isinstance(t, _TopK):
            if t.ids.shape != t.logprobs.shape or t.shape[:-1] != s.shape[:-1]:
                raise ValueError(
                    f"stored teacher_ids {tuple(t.ids.shape)} and teacher_logprobs "
                    f"{tuple(t.logprobs.shape)} must share the student output's leading shape "
                    f"{tuple(s.shape[:-1])} (then k)")
            return
        if s.shape != t.shape:
            raise ValueError(
                f"student output shape {tuple(s.shape)} does not match teacher output shape "
                f"{tuple(t.shape)}; the student must predict the same "
                + ("classes" if self.task == "classification" else "targets")
            )

    def _output_loss(self, s: Tensor, t: Tensor, target: Optional[Tensor], reduction="mean",
                     rows_mask: Optional[Tensor] = None):
        """Returns (loss, count): the mean (or the sum with reduction="sum") and its row count.
        ``rows_mask`` (classification without a target): only the rows it keeps count."""
        if self.task == "classification" and isinstance(t, _TopK):
            rows = fkd_functional.kd_loss_topk(
                s, t.ids, t.logprobs, target, temperature=self.temperature, alpha=self.alpha,
                ignore_index=self.loss_fn.ignore_index, reduction="none", backend=self.backend)
            return self._reduce_rows(rows, target, reduction, rows_mask)
        if self.task == "classification":
            if reduction == "mean" and rows_mask is None:
                return self.loss_fn(s, t, target), None
            rows = fkd_functional.kd_loss(
                s,
                t,
                target,
                temperature=self.temperature,
                alpha=self.alpha,
                reduction="none",
                backend=self.backend,
                divergence=self.loss_fn.divergence,
                beta=self.loss_fn.beta,
            )
            return self._reduce_rows(rows, target, reduction, rows_mask)
        t = t.to(s.dtype)
        teacher_term = _mse(s, t, reduction)
        if target is None or self.alpha == 1.0:
            loss = teacher_term
        else:
            target = target.to(s.dtype)
            if target.shape != s.shape:
                raise ValueError(
                    f"regression target shape {tuple(target.shape)} does not match the output "
                    f"shape {tuple(s.shape)}"
                )
            loss = self.alpha * teacher_term + (1 - self.alpha) * _mse(s, target, reduction)
        return loss, (s.numel() if reduction == "sum" else None)

    def _counted(self, s: Tensor, target: Optional[Tensor], keep: Optional[Tensor]):
        """(rows mask or None for all, count) of the outputs ``s`` that the batch's mean loss
        is over: for classification the rows ``keep`` (an attention mask) or the target keeps,
        for regression every element. The count weighs the batch in an accumulation window
        (one step on the joined batches) and in the epoch's train_loss."""
        if self.task != "classification":
            return None, torch.tensor(float(s.numel()), device=s.device)
        if keep is None and target is not None:
            keep = target != self.loss_fn.ignore_index
        if keep is None:
            return None, torch.tensor(float(s[..., 0].numel()), device=s.device)
        return keep, keep.sum().float()

    def _reduce_rows(self, rows: Tensor, target, reduction: str, rows_mask):
        """(loss, count) from per-row KD losses (ignored rows are 0): see _output_loss."""
        if rows_mask is not None:
            total, count = torch.where(rows_mask, rows, 0.0).sum(), rows_mask.sum()
        elif target is None:
            total, count = rows.sum(), torch.tensor(rows.numel(), device=rows.device)
        else:
            total, count = rows.sum(), (target != self.loss_fn.ignore_index).sum()
        if reduction == "mean":
            return total / count.clamp_min(1), None
        return total, count

    def _build_projections(self, s_feats: list[Tensor], t_feats: list[Tensor]) -> None:
        projs = []
        for (s_path, t_path), fs, ft in zip(self.hints, s_feats, t_feats):
            if fs.dim() == 4 and ft.dim() == 4:
                if fs.shape[0] != ft.shape[0] or fs.shape[2:] != ft.shape[2:]:
                    raise ValueError(
                        f"hint {s_path!r} -> {t_path!r}: feature maps {tuple(fs.shape)} and "
                        f"{tuple(ft.shape)} must agree in batch and spatial size"
                    )
                proj = nn.Conv2d(fs.shape[1], ft.shape[1], kernel_size=1)
            else:
                if fs.dim() < 1 or fs.shape[:-1] != ft.shape[:-1]:
                    raise ValueError(
                        f"hint {s_path!r} -> {t_path!r}: features {tuple(fs.shape)} and "
                        f"{tuple(ft.shape)} must agree in all but the last dimension"
                    )
                proj = nn.Linear(fs.shape[-1], ft.shape[-1])
            projs.append(proj)
        self.hint_projections = nn.ModuleList(projs).to(self.device)

    def _hint_loss(self, s_feats: list[Tensor], t_feats: list[Tensor],
                   attention_mask=None) -> Tensor:
        """Mean squared error of each projected student feature against the teacher's, over
        the positions an ``attention_mask`` keeps when the features are per position (a
        sequence batch's padding counts for nothing), else over every element."""
        total = None
        for proj, fs, ft in zip(self.hint_projections, s_feats, t_feats):
            err = (proj(fs.float()) - ft.detach().float()).square()
            if (isinstance(attention_mask, Tensor) and fs.dim() >= 2
                    and tuple(attention_mask.shape) == tuple(fs.shape[:-1])):
                keep = (attention_mask != 0)[..., None]
                term = (torch.where(keep, err, 0.0).sum()
                        / (keep.sum() * err.shape[-1]).clamp_min(1))
            else:  # a batch of no rows is 0 (its weight is 0), not the nan of an empty mean
                term = err.sum() / max(err.numel(), 1)
            total = term if total is None else total + term
        return total

    def _trainable(self) -> list:
        _reshard_fsdp2(self.student)
        return [p for p in self.student.parameters() if p.requires_grad]

    def _ensure_optimizer(self, trainable: Optional[list] = None) -> None:
        """The optimizer over the student's ``trainable`` parameters (default: _trainable();
        fit passes those it read before the epoch's first forward, see _reshard_fsdp2) and the
        hint projections'."""
        if trainable is None:
            trainable = self._trainable()
        proj_params = list(self.hint_projections.parameters()) if self.hint_projections else []
        if self.optimizer is None:
            params = trainable + proj_params
            if not params:
                raise ValueError("the student has no trainable parameters (requires_grad=True)")
            if callable(self._optimizer_arg):
                self.optimizer = self._optimizer_arg(params)
                if not isinstance(self.optimizer, torch.optim.Optimizer):
                    raise TypeError("the optimizer callable must return a torch.optim.Optimizer")
            else:
                self.optimizer = torch.optim.Adam(params, lr=self.lr)
            self._ensure_scheduler()
            return
        have = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        if self._student_layers_replaced(have, trainable, proj_params):
            if isinstance(self._optimizer_arg, torch.optim.Optimizer):
                raise ValueError(
                    "the student's layers were replaced since its optimizer was made (sparsify_, "
                    "quantize_, share_weights_ or shrink_ build new parameters): the given "
                    "optimizer holds the old ones, so training would not change the model. Pass "
                    "a new optimizer over student.parameters(), or a callable that makes one")
            warnings.warn(
                "the student's layers were replaced since its optimizer was made (sparsify_, "
                "quantize_, share_weights_ or shrink_ build new parameters): a new optimizer "
                "(and scheduler) is built over them; their state starts over", stacklevel=3)
            self.optimizer = self.scheduler = None
            self._ensure_optimizer(trainable)
            return
        new_student = [p for p in trainable if id(p) not in have]
        if new_student:  # unfrozen or added since the optimizer was made: never trained else
            lr = self.optimizer.param_groups[0]["lr"] if self.optimizer.param_groups else self.lr
            warnings.warn(
                f"{len(new_student)} trainable parameter(s) of the student are not in its "
                "optimizer (unfrozen or added since it was made): they join it as a new "
                f"parameter group at lr={lr:g} (a scheduler made before does not drive it)",
                stacklevel=3)
            self.optimizer.add_param_group({"params": new_student, "lr": lr})
            have |= {id(p) for p in new_student}
        missing = [p for p in proj_params if id(p) not in have]
        if missing:
            self.optimizer.add_param_group({"params": missing, "lr": self.lr})
        if not have and not missing:
            raise ValueError("the given optimizer has no parameters")
        self._ensure_scheduler()

    def _student_layers_replaced(self, have: set, current: list, proj_params: list) -> bool:
        """True when the optimizer holds parameters that are neither the student's (``current``,
        its trainable ones) nor the hint projections' any more, and misses trainable ones the
        student has now: its layers were swapped for new modules (a frozen subset, or extra
        groups, are not that)."""
        known = {id(p) for p in current} | {id(p) for p in proj_params}
        absent = any(id(p) not in have for p in current)
        stale = any(id(p) not in known for g in self.optimizer.param_groups for p in g["params"])
        return absent and stale

    def _ensure_scheduler(self) -> None:
        if self._scheduler_arg is None or self.scheduler is not None:
            return
        self.scheduler = self._scheduler_arg(self.optimizer)
        if not callable(getattr(self.scheduler, "step", None)):
            raise TypeError("the scheduler callable must return an object with a step() method")
        try:
            needs = [q.name for q in inspect.signature(self.scheduler.step).parameters.values()
                     if q.default is inspect.Parameter.empty
                     and q.kind in (q.POSITIONAL_ONLY, q.POSITIONAL_OR_KEYWORD)]
        except (TypeError, ValueError):
            needs = []
        if needs:  # ReduceLROnPlateau: fit failed on it after the first step changed the model
            self.scheduler = None
            raise TypeError(
                f"the scheduler's step() needs {needs} (a metric): Distiller steps its scheduler "
                "after every optimizer step with no arguments. Use a per-step schedule, or step "
                "this one yourself from the history's eval metrics between fit() calls")

    def _checked_optimizer_step(self, finite: Tensor, epoch: int, batch: int) -> None:
        """The optimizer step, unless a loss since the last one was nan or inf: then raise before
        it, so the student keeps the weights of its last finite step (the check at the end of
        the epoch came after the nan updates). With fp16's GradScaler the step is its to skip.
        One host sync per optimizer step. Under DDP / FSDP a nan on any process stops every
        one (a process raising alone would leave the others waiting in a collective)."""
        if self._averaging is not None and not self.scaler.is_enabled():
            finite = finite.to(torch.int32)
            dist.all_reduce(finite, op=dist.ReduceOp.MIN, group=self._averaging[0])
        if not self.scaler.is_enabled() and not bool(finite):
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(
                f"the loss became nan or inf in epoch {epoch}, by its batch {batch} (counting "
                "from 1); the student is left as it was before that optimizer step. Check that "
                "the batch's inputs and the teacher's outputs are finite, then lower the lr")
        self._optimizer_step()

    def _optimizer_step(self) -> None:
        """Unscale (fp16), clip, step, update the scale, step the scheduler, clear gradients."""
        if self._averaging is not None and self.hint_projections is not None:
            _average_gradients(self.hint_projections.parameters(), self._averaging)
        if self.max_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            _clip_grad_norm(params, self.max_grad_norm)
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        # an fp16 step with inf/nan gradients is skipped (the scale drops): so is the
        # scheduler's, or warmup and one-cycle schedules drift ahead of the optimizer
        skipped = scale is not None and self.scaler.get_scale() < scale
        if self.scheduler is not None and not skipped:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _per_sample(self, out: Tensor) -> Tensor:
        """Outputs as the discriminator scores them, one row per sample: a regression model's
        (N,) outputs are N samples of width 1 (read as one sample of width N, the discriminator
        mixed the batch, and a short last batch changed its width)."""
        if self.task != "classification" and out.dim() == 1:
            return out[:, None]
        return out

    def _ensure_discriminator(self, s: Tensor) -> None:
        if s.dim() < 1 or s.shape[-1] < 1:
            raise ValueError(
                f"adversarial distillation needs outputs with a non-empty last dimension, got "
                f"shape {tuple(s.shape)}"
            )
        dim = s.shape[-1]
        if self.discriminator is None:
            self.discriminator = AdversarialKDLoss(dim, hidden=self.adversarial_hidden).to(
                self.device
            )
            # Its own optimizer: the student's never holds the discriminator's parameters.
            self.discriminator_optimizer = torch.optim.Adam(
                self.discriminator.parameters(), lr=self.adversarial_lr, betas=(0.5, 0.999)
            )
        elif self.discriminator.dim != dim:
            raise ValueError(
                f"output width changed from {self.discriminator.dim} to {dim}; the "
                "discriminator was built for the first batch's width"
            )

    def _discriminator_step(self, s: Tensor, t: Tensor, rows: Optional[Tensor],
                            weight=None) -> Tensor:
        """One step of the discriminator on this batch. ``weight`` (under DDP / FSDP: this
        process's counted rows times the processes, over all their counted rows) makes the
        averaged gradient that of the loss over every process's rows, not a mean of means (a
        process whose rows are all ignored halved the step of two)."""
        # The student's backward through the generator loss left gradients on the
        # discriminator's parameters: drop them before its own step.
        self.discriminator_optimizer.zero_grad(set_to_none=True)
        d_loss = self.discriminator.discriminator_loss(s.detach(), t.detach().to(s.dtype),
                                                       mask=rows)
        (d_loss if weight is None else d_loss * weight).backward()
        if self._averaging is not None:
            _average_gradients(self.discriminator.parameters(), self._averaging)
        self.discriminator_optimizer.step()
        return d_loss.detach()

    def _hooks(self):
        if not self.hints:
            return None, None
        s_mods = [_get_submodule(self.student, s, "student") for s, _ in self.hints]
        t_mods = [_get_submodule(self.teacher, t, "teacher") for _, t in self.hints]
        return _HintCapture(s_mods), _HintCapture(t_mods)

    # ------------------------------------------------------------------ public API: checkpoints

    def state_dict(self) -> dict:
        """Everything a resumed run needs, for ``torch.save``: the student's state, the optimizer,
        scheduler and grad-scaler states, the hint projections and the discriminator (with the
        shapes they were built for, since they are built from the first batch) and its optimizer,
        and the history. Restore with :meth:`load_state_dict` on a Distiller made with the same
        arguments; training then continues as if it had not stopped."""
        state: dict = {
            "format": 1,
            # the model inside a DDP / DataParallel / torch.compile wrapper: a checkpoint saved
            # with one process loads with several, a compiled student's into a plain one, and back
            "student": _unwrap(self.student).state_dict(),
            "history": [dict(h) for h in self.history],
            "scaler": self.scaler.state_dict(),
        }
        if self.hint_projections is not None:
            shapes = [("conv" if isinstance(p, nn.Conv2d) else "linear",
                       p.in_channels if isinstance(p, nn.Conv2d) else p.in_features,
                       p.out_channels if isinstance(p, nn.Conv2d) else p.out_features)
                      for p in self.hint_projections]
            state["hint_projections"] = {"shapes": shapes,
                                         "state": self.hint_projections.state_dict()}
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        if self.discriminator is not None:
            state["discriminator"] = {"dim": self.discriminator.dim,
                                      "state": self.discriminator.state_dict()}
            state["discriminator_optimizer"] = self.discriminator_optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` saved (see there)."""
        if not isinstance(state, Mapping) or state.get("format") != 1:
            raise ValueError("not a Distiller state (from Distiller.state_dict())")
        student = _unwrap(self.student)
        student_state = dict(state["student"])
        own = student.state_dict()
        for prefix in ("module.", "_orig_mod.", "module."):
            if (student_state and all(k.startswith(prefix) for k in student_state)
                    and not any(k.startswith(prefix) for k in own)):
                # saved from the wrapper itself (DDP's module., torch.compile's _orig_mod.),
                # before the prefixes were left out
                student_state = {k[len(prefix):]: v for k, v in student_state.items()}
        student.load_state_dict(student_state)
        if "hint_projections" in state:
            shapes = [tuple(s) for s in state["hint_projections"]["shapes"]]
            if len(shapes) != len(self.hints):
                raise ValueError(f"the state has {len(shapes)} hint projections; this Distiller "
                                 f"has {len(self.hints)} hints")
            projs = [nn.Conv2d(i, o, kernel_size=1) if kind == "conv" else nn.Linear(i, o)
                     for kind, i, o in shapes]
            self.hint_projections = nn.ModuleList(projs).to(self.device)
            self.hint_projections.load_state_dict(state["hint_projections"]["state"])
        if "discriminator" in state:
            if self.adversarial_weight == 0:
                raise ValueError("the state has a discriminator; this Distiller has "
                                 "adversarial_weight=0")
            self.discriminator = None
            self._ensure_discriminator(
                torch.empty(0, state["discriminator"]["dim"], device=self.device))
            self.discriminator.load_state_dict(state["discriminator"]["state"])
            self.discriminator_optimizer.load_state_dict(state["discriminator_optimizer"])
        if "optimizer" in state:
            self._ensure_optimizer()
            self.optimizer.load_state_dict(state["optimizer"])
            if "scheduler" in state:
                if self.scheduler is None:
                    raise ValueError("the state has a scheduler; this Distiller has none")
                self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"] or self.scaler.is_enabled():  # a disabled scaler saves {}
            self.scaler.load_state_dict(state["scaler"])
        self.history = [dict(h) for h in state["history"]]

    # ------------------------------------------------------------------ public API: training

    def fit(self, train_loader, epochs: int = 1, eval_loader=None) -> list[dict]:
        """Train the student for ``epochs`` passes over ``train_loader``.

        Returns the history: one dict per epoch with ``epoch``, ``train_loss`` (the mean of the
        whole objective over the epoch's counted rows, as ``evaluate``'s loss), ``train_hint_loss``
        with hints, ``train_adv_generator_loss`` and ``train_adv_discriminator_loss`` (epoch
        means, weighted the same way) with ``adversarial_weight > 0``,
        ``seconds``, and ``eval_<metric>`` for
        every metric of :meth:`evaluate` when ``eval_loader`` is given. The list is also appended
        to ``self.history``.
        """
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
        _nonempty(train_loader, "train_loader")
        if eval_loader is not None:
            _nonempty(eval_loader, "eval_loader")
        from tqdm.auto import tqdm

        if self.teacher is not None:
            self.teacher.eval()
        s_cap, t_cap = self._hooks()
        out: list[dict] = []
        try:
            for epoch in range(1, epochs + 1):
                self.student.train()
                if self.hint_projections is not None:
                    self.hint_projections.train()
                if self.discriminator is not None:
                    self.discriminator.train()
                t0 = time.perf_counter()
                loss_sum = torch.zeros((), device=self.device)
                hint_sum = torch.zeros((), device=self.device)
                gen_sum = torch.zeros((), device=self.device)
                disc_sum = torch.zeros((), device=self.device)
                finite = torch.ones((), dtype=torch.bool, device=self.device)
                counted = torch.zeros((), device=self.device)  # rows the losses were over
                window = torch.zeros((), device=self.device)  # ... in this accumulation
                steps = 0
                bar = tqdm(
                    train_loader,
                    desc=f"epoch {epoch}/{epochs}",
                    disable=not self.progress,
                    leave=False,
                    dynamic_ncols=True,
                )
                pending = 0  # batches whose gradients wait for an optimizer step
                averaging = self._averaging = _gradient_averaging_group(self.student)
                trainable = self._trainable()  # before a forward: see _ensure_optimizer
                for batch in bar:
                    batch = _to_device(batch, self.device)
                    batch, topk = _take_topk(batch) if self.offline else (batch, None)
                    call, target, attention_mask = _split_batch(batch)
                    adversarial = self.adversarial_weight > 0
                    with self._student_context():
                        if self.fused_lm_head:
                            loss, (rows, count) = self._fused_step_loss(batch, target,
                                                                        attention_mask)
                        else:
                            s_out, t_out, target, keep = self._outputs(call, target,
                                                                       attention_mask, topk)
                            loss, _ = self._output_loss(s_out, t_out, target, rows_mask=keep)
                            rows, count = self._counted(s_out, target, keep)
                        if s_cap is not None:
                            s_feats, t_feats = s_cap.take(), t_cap.take()
                            if self.hint_projections is None:
                                self._build_projections(s_feats, t_feats)
                                if averaging is not None:
                                    _broadcast_parameters(self.hint_projections, averaging)
                            hint = self._hint_loss(s_feats, t_feats, attention_mask)
                            hint_sum += hint.detach() * count
                            loss = loss + self.hint_weight * hint
                        if adversarial:  # over the rows that count, as the KD term
                            fresh = self.discriminator is None
                            self._ensure_discriminator(self._per_sample(s_out))
                            if fresh and averaging is not None:
                                _broadcast_parameters(self.discriminator, averaging)
                            gen = self.discriminator.generator_loss(self._per_sample(s_out),
                                                                    mask=rows)
                            gen_sum += gen.detach() * count
                            loss = loss + self.adversarial_weight * gen
                    if self.optimizer is None or steps == 0:
                        self._ensure_optimizer(trainable)
                        if pending == 0:
                            self.optimizer.zero_grad(set_to_none=True)
                    # The step of an accumulation window is the one of its joined batches:
                    # each batch's mean weighs as its counted rows (a padded batch of few
                    # tokens no more than they), and so does a short last window. The
                    # gradients so far are rescaled to the window's new total first. Under
                    # DDP / FSDP the window joins every process's batches: counts are summed
                    # across them (one scalar all_reduce), so each process rescales its
                    # (already averaged) gradients alike, and the average of the processes'
                    # weighted means is the mean over all their counted rows.
                    joined = count
                    if averaging is not None:
                        joined = count.detach().float().clone()
                        dist.all_reduce(joined, group=averaging[0])
                    total = window + joined
                    if pending:
                        ratio = window / total.clamp_min(1)
                        # by device (a model spread over devices: device_map) and by tensor
                        # type (FSDP2's DTensor gradients and the hint projections' plain
                        # ones do not mix in one foreach call)
                        by_device: dict = {}
                        for g in self.optimizer.param_groups:
                            for q in g["params"]:
                                if q.grad is not None:
                                    key = (q.grad.device, type(q.grad))
                                    by_device.setdefault(key, []).append(q.grad)
                        for (dev, _), grads in by_device.items():
                            torch._foreach_mul_(grads, ratio.to(dev))
                    weight = count * (averaging[1] if averaging else 1) / total.clamp_min(1)
                    window = total
                    self.scaler.scale(loss * weight).backward()
                    finite = finite & torch.isfinite(loss.detach())
                    pending += 1
                    if pending == self.grad_accum_steps:
                        self._checked_optimizer_step(finite, epoch, steps + 1)
                        pending, window = 0, torch.zeros((), device=self.device)
                    if adversarial:
                        d_weight = (None if averaging is None
                                    else count * averaging[1] / joined.clamp_min(1))
                        disc_sum += self._discriminator_step(self._per_sample(s_out),
                                                             self._per_sample(t_out), rows,
                                                             d_weight) * count
                    loss_sum += loss.detach().float() * count
                    counted += count
                    steps += 1
                    # .item() syncs the device; do it only now and then, for the bar.
                    if self.progress and (steps % 10 == 1):
                        bar.set_postfix(loss=f"{(loss_sum / counted.clamp_min(1)).item():.4f}")
                bar.close()
                if steps == 0:
                    raise ValueError("train_loader produced no batches")
                if pending:  # the epoch's last, partial accumulation
                    self._checked_optimizer_step(finite, epoch, steps)
                here_finite = bool(torch.isfinite(loss_sum))
                if self._averaging is not None:
                    # the epoch's figures over every process's counted rows; a nan on one
                    # makes them nan on all, so every process raises below (one raising alone
                    # would leave the others waiting in a collective)
                    loss_sum, counted, hint_sum, gen_sum, disc_sum = _sum_across(
                        [loss_sum, counted, hint_sum, gen_sum, disc_sum], self._averaging)
                counted = counted.clamp_min(1)
                train_loss = (loss_sum / counted).item()
                if not math.isfinite(train_loss):
                    where = "" if not here_finite else " on another process"
                    raise FloatingPointError(
                        f"training loss became {train_loss}{where} in epoch {epoch}; lower "
                        "the lr"
                    )
                record = {"epoch": len(self.history) + 1, "train_loss": train_loss}
                if self.hints:
                    record["train_hint_loss"] = (hint_sum / counted).item()
                if self.adversarial_weight > 0:
                    record["train_adv_generator_loss"] = (gen_sum / counted).item()
                    record["train_adv_discriminator_loss"] = (disc_sum / counted).item()
                if eval_loader is not None:
                    if s_cap is not None:
                        s_cap.remove()
                        t_cap.remove()
                        s_cap = t_cap = None
                    for k, v in self.evaluate(eval_loader).items():
                        record[f"eval_{k}"] = v
                    s_cap, t_cap = self._hooks()
                record["seconds"] = time.perf_counter() - t0
                if self.progress:
                    shown = ", ".join(
                        f"{k}={v:.4f}" for k, v in record.items() if k not in ("epoch", "seconds")
                    )
                    tqdm.write(f"epoch {epoch}/{epochs}: {shown}")
                self.history.append(record)
                out.append(record)
        finally:
            self._averaging = None
            if s_cap is not None:
                s_cap.remove()
                t_cap.remove()
        return out

    @torch.no_grad()
    def evaluate(self, loader) -> dict:
        """Metrics of the student on ``loader``: ``loss`` (the output objective, without hints),
        and for classification ``agreement`` (fraction of rows whose arg-max matches the
        teacher's) and ``accuracy`` (when batches carry targets); rows marked ``ignore_index``
        (or left out by an ``attention_mask``) count in neither, and a metric no row counts in
        is absent (but ``loss``, which is then 0, as ``kd_loss``'s mean over no counted rows).
        With hints and built projections, ``hint_loss`` too, weighted by counted rows as the
        loss is. The student's
        train/eval mode is restored afterwards. With a DDP / FSDP student every process calls it
        on its own loader, and each gets the metrics over all of their rows."""
        _nonempty(loader, "loader")
        was_training = self.student.training
        self.student.eval()
        if self.teacher is not None:
            self.teacher.eval()
        s_cap, t_cap = self._hooks() if self.hint_projections is not None else (None, None)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        count = torch.zeros((), dtype=torch.float64, device=self.device)
        hint_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.float64, device=self.device)
        labelled = torch.zeros((), dtype=torch.float64, device=self.device)
        agree = torch.zeros((), dtype=torch.float64, device=self.device)
        rows = torch.zeros((), dtype=torch.float64, device=self.device)
        batches = 0
        averaging = _gradient_averaging_group(self.student)
        try:
            for batch in loader:
                with self._student_context():
                    batch = _to_device(batch, self.device)
                    batch, topk = _take_topk(batch) if self.offline else (batch, None)
                    call, target, attention_mask = _split_batch(batch)
                    if self.fused_lm_head:
                        pieces = self._fused_eval_chunks(batch, target, attention_mask)
                    else:
                        pieces = [self._outputs(call, target, attention_mask, topk)]
                    counted_before = count.clone()
                    for s_out, t_out, target, keep in pieces:
                        total, n = self._output_loss(s_out, t_out, target, reduction="sum",
                                                     rows_mask=keep)
                        loss_sum += total.double()
                        count += n
                        if self.task == "classification":
                            pred = s_out.argmax(-1)
                            same = pred == t_out.argmax(-1)
                            if target is not None:
                                # ignore_index rows (padding) count for nothing: not in the
                                # loss, not in the accuracy, not in the agreement
                                valid = target != self.loss_fn.ignore_index
                                correct += ((pred == target) & valid).sum()
                                labelled += valid.sum()
                                keep = valid if keep is None else keep & valid
                            agree += (same & keep).sum() if keep is not None else same.sum()
                            rows += keep.sum() if keep is not None else pred.numel()
                    if s_cap is not None:  # weighted by the batch's counted rows, as fit's
                        hint_sum += (self._hint_loss(s_cap.take(), t_cap.take(), attention_mask)
                                     .double() * (count - counted_before))
                batches += 1
        finally:
            if s_cap is not None:
                s_cap.remove()
                t_cap.remove()
            self.student.train(was_training)
        if averaging is not None:  # the metrics over every process's rows (one all_reduce)
            loss_sum, count, hint_sum, correct, labelled, agree, rows, batches = _sum_across(
                [loss_sum, count, hint_sum, correct, labelled, agree, rows,
                 torch.tensor(float(batches), device=self.device)], averaging)
            batches = int(batches)
        if batches == 0:
            raise ValueError("loader produced no batches")
        metrics = {"loss": (loss_sum / count.clamp_min(1)).item()}
        if self.task == "classification":
            if labelled.item() > 0:
                metrics["accuracy"] = (correct / labelled).item()
            if rows.item() > 0:  # as accuracy: absent, rather than 0, when no row counted
                metrics["agreement"] = (agree / rows).item()
        if s_cap is not None and count.item() > 0:
            metrics["hint_loss"] = (hint_sum / count).item()
        return metrics
