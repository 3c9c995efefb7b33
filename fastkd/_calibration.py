"""Running a model on calibration inputs and watching what chosen layers receive (shared by
share_weights_'s calibrated assignment and quantize_'s SmoothQuant scales)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import Tensor, nn


def check_calibration(calibration: Any) -> None:
    """A callable taking the model, or an iterable of batches; a bare tensor is refused."""
    if isinstance(calibration, torch.Tensor):
        raise TypeError("calibration: pass a list of batches ([tensor]) or a callable taking "
                        "the model, not a bare tensor (it would be iterated row by row)")
    if isinstance(calibration, Mapping):  # a tokenizer's output, one batch
        raise TypeError("calibration: pass a list of batches ([batch]) or a callable taking the "
                        "model, not one mapping (a tokenizer's output would be iterated over "
                        "its keys)")
    if not (callable(calibration) or hasattr(calibration, "__iter__")):
        raise TypeError("calibration must be a callable taking the model, or an iterable of "
                        f"batches, got {type(calibration).__name__}")


def observe_inputs(model: nn.Module, targets, calibration: Any,
                   observe: Callable[[str, Tensor], None]) -> None:
    """Run ``calibration`` and call ``observe(name, x)`` with the input of every ``(name,
    module)`` of ``targets`` each time it runs, as ``(rows, in_features)`` fp32 (detached).

    ``calibration``: a callable given the model, or an iterable of batches read as the Distiller
    reads them (a tensor: ``model(batch)``; a tuple ``(inputs, target, ...)``: ``model(inputs)``,
    or ``model(*inputs)`` when inputs is a tuple; a mapping (a tokenizer's BatchEncoding too):
    ``model(**batch)`` without ``labels``), moved to the model's device. The model runs in eval
    mode under ``torch.no_grad()``; its train/eval flags are restored."""

    def hook(name):
        def fn(mod, args, kwargs, out):  # the input by position, or by name (lin(input=x))
            x = (args[0] if args else next(iter(kwargs.values()))).detach()
            observe(name, x.reshape(-1, x.shape[-1]).float())
        return fn

    handles = [m.register_forward_hook(hook(n), with_kwargs=True) for n, m in targets]
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            if callable(calibration):
                calibration(model)
            else:
                from .distill import _split_batch, _to_device  # the Distiller's convention

                first = next(iter(model.parameters()), None)
                for batch in calibration:
                    if first is not None:  # a CPU loader for a GPU model, as the Distiller
                        batch = _to_device(batch, first.device)
                    _split_batch(batch)[0](model)
    finally:
        for hd in handles:
            hd.remove()
        for m, t in flags:
            m.training = t


def input_statistics(model: nn.Module, targets, calibration: Any, *, moments: bool = True,
                     amax: bool = False) -> dict:
    """What each target layer received while ``calibration`` ran (observe_inputs), for the
    layers that received at least one row: ``{"moments": name -> E[x x^T] (float64, on the
    layer's device; with ``moments``), "amax": name -> max_rows |x| per input channel (with
    ``amax``), "finite": name -> whether every input was finite}``. The finiteness is read
    after the run: reading it in the hook would break a compiled model's graph."""
    sums: dict = {}
    counts: dict = {}
    peaks: dict = {}
    finite: dict = {}

    def observe(name, x):
        counts[name] = counts.get(name, 0) + x.shape[0]
        finite[name] = finite.get(name, True) & torch.isfinite(x).all()
        if moments:
            h = (x.T @ x).double()
            sums[name] = sums[name] + h if name in sums else h
        if amax and x.shape[0]:
            a = x.abs().amax(0)
            peaks[name] = torch.maximum(peaks[name], a) if name in peaks else a

    observe_inputs(model, targets, calibration, observe)
    ran = [n for n, c in counts.items() if c > 0]
    # divided in place: a copy per layer would hold every moment twice for a moment (an
    # inference tensor, made under torch.inference_mode by a calibration callable such as
    # SentenceTransformer.encode, cannot be changed in place out of it: divided as a copy)
    return {
        "moments": {n: sums[n] / counts[n] if sums[n].is_inference() else sums[n].div_(counts[n])
                    for n in ran if n in sums},
        "amax": {n: peaks[n] for n in ran if n in peaks},
        "finite": {n: bool(finite[n]) for n in ran},
    }
