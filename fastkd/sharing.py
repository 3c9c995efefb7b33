"""Weight sharing (Deep Compression, Han et al. 2016): k-means over each linear's weights.

Each row (``per_channel=True``) or the whole layer is clustered in 1-D into ``2**bits - 1`` shared
values; exact zeros (pruned weights) form their own fixed cluster, index 0, so they stay zero.

Clustering: 1-D k-means, Lloyd iterations until no cluster boundary moves (at most ``iters``).
Init: the centroids start at evenly spaced quantiles of a density proportional to p(x)^(1/3), the
asymptotically MSE-optimal point density of a scalar quantizer (Panter & Dite); plain quantiles of
p(x) crowd the centre and leave the tails to a few wide clusters, so Lloyd stalls in a worse optimum
(10-20% more squared error on all-MiniLM-L6-v2's weights at 4 bits per channel).
In 1-D a cluster is a contiguous run of the sorted values, so each row is sorted once and every
Lloyd step is a ``searchsorted`` of the centroid midpoints plus prefix-sum differences: all rows of a
layer at once, without a (weights x clusters) distance matrix, cheap enough to run to convergence.

Calibrated assignment (``share_weights_(..., calibration=...)``): with the codebook from k-means,
the indices are chosen column by column as in GPTQ (Frantar et al. 2023; GPTVQ applies it to
codebooks): each input column is rounded to its nearest centroid and the rounding error, weighted
by the inverse of the input second moment H = E[x x^T] over calibration inputs, is pushed onto the
columns not yet rounded, so that the layer's output error on such inputs shrinks rather than its
weight error. Columns go in decreasing order of E[x_i^2]. H is damped by ``damp`` times its mean
diagonal; ``damp`` -> infinity gives back plain nearest-centroid rounding.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from . import hf
from ._calibration import check_calibration, input_statistics
from ._validate import check_bits, check_int

__all__ = ["kmeans_1d", "calibrated_assign", "share_weights_"]


def kmeans_1d(
    values: Tensor, k: int, valid: Optional[Tensor] = None, iters: int = 100,
    weight: Optional[Tensor] = None,
):
    """Row-wise 1-D k-means. values (R, L) -> (centroids (R, k) sorted, assignment (R, L) int64).

    ``valid`` (R, L) bool excludes entries from the fit (their assignment is still computed).
    Rows with fewer than k distinct valid values get repeated centroids; that is harmless.
    ``iters`` caps the Lloyd iterations; the loop stops early once no cluster boundary moves.
    ``weight`` (R, L), non-negative, optional: per-entry weights of the fit (weighted centroids).

    In 1-D every cluster is a contiguous run of the sorted values, so each row is sorted once and a
    float64 prefix sum makes a Lloyd step cost O(k log L) per row (a ``searchsorted`` of the k - 1
    midpoints into the sorted row, then differences of the prefix sums) instead of O(L).
    """
    if check_int(iters, "iters") < 1:
        raise ValueError(f"iters must be at least 1, got {iters}")
    if check_int(k, "k") < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    v = values.detach().float()
    r, n = v.shape
    dev = v.device
    if n == 0:  # a layer without inputs: nothing to cluster (the codebook is never read)
        return (torch.zeros(r, k, device=dev), torch.zeros(r, 0, dtype=torch.int64, device=dev))
    if not bool(torch.isfinite(v if valid is None else v[valid.bool()]).all()):
        raise ValueError("values has NaN or infinite entries (where valid); k-means cannot "
                         "place centroids among them")
    if valid is None:
        valid = torch.ones_like(v, dtype=torch.bool)
    if weight is not None and weight.shape != v.shape:
        raise ValueError(f"weight must have the shape of values {tuple(v.shape)}, got {tuple(weight.shape)}")
    # sort each row's valid entries; invalid ones are pushed to +inf, past the valid count
    srt, order = torch.where(valid, v, torch.full_like(v, float("inf"))).sort(dim=1)
    cnt = valid.sum(1, keepdim=True)  # (R, 1)
    inrow = cnt > torch.arange(n, device=dev)
    wsrt = inrow.double() if weight is None else weight.detach().double().gather(1, order) * inrow
    zcol = torch.zeros(r, 1, dtype=torch.float64, device=dev)
    # prefix sums over the sorted row: wsum[:, j] / csum[:, j] = weight / weighted sum of the j smallest
    wsum = torch.cat([zcol, wsrt.cumsum(1)], dim=1)
    csum = torch.cat([zcol, (torch.where(inrow, srt, 0.0).double() * wsrt).cumsum(1)], dim=1)
    # init (see module docstring): centroid i at the (i + 0.5) / k quantile of the distribution
    # with density proportional to p(x)^(1/3). Each sorted value carries weight p^(-2/3), p estimated
    # from the spread of its h neighbours on each side.
    last = (cnt - 1).clamp_min(0)
    h = max(1, int(round(n ** 0.5)))
    idx = torch.arange(n, device=dev)[None, :]
    spread = (srt.gather(1, torch.minimum(idx + h, last)) - srt.gather(1, (idx - h).clamp_min(0)))
    spread = torch.where(inrow, spread, 0.0).double()
    dens_w = torch.where(inrow, spread.clamp_min(1e-30) ** (2.0 / 3.0), 0.0).cumsum(1)
    q = (torch.arange(k, device=dev, dtype=torch.float64) + 0.5) / k
    pos = torch.searchsorted(dens_w.contiguous(), (q[None, :] * dens_w[:, -1:]).contiguous())
    pos = torch.minimum(pos, last)
    cent = torch.gather(srt, 1, pos)
    cent = torch.where(torch.isfinite(cent), cent, torch.zeros_like(cent)).double()
    # A row with at most k distinct values gets exactly those (padded with its largest): the
    # density init above piles several centroids onto a tied value (its spread is 0), an empty
    # one never moves, and values it had room for were merged (re-sharing int8-dequantized or
    # ternary weights).
    first = inrow.clone()
    first[:, 1:] &= srt[:, 1:] != srt[:, :-1]
    n_distinct = first.sum(1)
    exact = (n_distinct <= k) & (n_distinct > 0)
    if bool(exact.any()):
        rank = first.long().cumsum(1) - 1
        # column k takes the rest: repeats, and the values of rows with more than k (not used)
        rank = torch.where(first & (rank < k), rank, k)
        table = torch.zeros(r, k + 1, dtype=torch.float64, device=dev)
        table.scatter_(1, rank, torch.where(first, srt, 0.0).double())
        table = table[:, :k]
        largest = table.gather(1, (n_distinct - 1).clamp(0, k - 1)[:, None])
        table = torch.where(torch.arange(k, device=dev)[None, :] < n_distinct[:, None], table,
                            largest)
        cent = torch.where(exact[:, None], table, cent)
    zero = torch.zeros(r, 1, dtype=torch.long, device=dev)
    bounds = None
    for _ in range(iters):
        cent = cent.sort(dim=1).values
        mids = ((cent[:, 1:] + cent[:, :-1]) * 0.5).float()
        # cluster j holds the sorted values in [b[j], b[j+1]): those <= mids[j] go left, as in _assign
        b = torch.searchsorted(srt, mids.contiguous(), right=True)
        b = torch.cat([zero, torch.minimum(b, cnt), cnt], dim=1)  # (R, k + 1)
        if bounds is not None and torch.equal(b, bounds):
            break
        bounds = b
        counts = wsum.gather(1, b[:, 1:]) - wsum.gather(1, b[:, :-1])
        sums = csum.gather(1, b[:, 1:]) - csum.gather(1, b[:, :-1])
        cent = torch.where(counts > 0, sums / counts.clamp_min(1e-300), cent)
    cent = cent.float().sort(dim=1).values
    return cent, _assign(v, cent)


def _assign(v: Tensor, cent: Tensor) -> Tensor:
    mids = (cent[:, 1:] + cent[:, :-1]) * 0.5
    return torch.searchsorted(mids.contiguous(), v.contiguous())


def _check_damp(damp) -> None:
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 < damp < float("inf"):
        raise ValueError(f"damp must be a positive finite number, got {damp!r}")


def calibrated_assign(
    weight: Tensor, cent: Tensor, moment: Tensor, keep: Tensor, damp: float = 1.0,
    block: int = 128,
) -> Tensor:
    """Indices into ``cent`` for ``weight`` that minimise the output error on calibration inputs.

    weight (N, K); cent (R, k) sorted centroids with R = N (per row) or 1 (shared by all rows);
    moment (K, K) = E[x x^T] of the layer's inputs; keep (N, K) bool, False where the weight is
    pruned. Returns (N, K) int64 in [0, k), or -1 where ``keep`` is False (those weights stay 0:
    their value still counts as rounding error, spread over the columns after them). See the
    module docstring; the columns are processed in blocks of ``block`` with one rank-``block``
    update of the remaining columns per block.
    """
    n, kdim = weight.shape
    if cent.dim() != 2 or cent.shape[0] not in (1, n):
        raise ValueError(f"cent must be (1, k) or ({n}, k), got {tuple(cent.shape)}")
    if moment.shape != (kdim, kdim):
        raise ValueError(f"moment must be ({kdim}, {kdim}), got {tuple(moment.shape)}")
    _check_damp(damp)
    h = moment.detach().double().clone()
    if not torch.isfinite(h).all():
        raise ValueError("the calibration inputs' second moment is not finite "
                         "(inf/NaN activations)")
    w = weight.detach().double().clone()
    keep = keep.to(w.device)
    diag = h.diagonal()
    dead = diag <= 0  # inputs that were always 0: no error can reach the output through them
    live_mean = diag[~dead].mean() if bool((~dead).any()) else torch.ones((), dtype=h.dtype)
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    diag[dead] = live_mean
    order = torch.argsort(diag, descending=True, stable=True)
    w, keep = w[:, order], keep[:, order]
    h = h[order][:, order]
    h.diagonal().add_(damp * live_mean)
    # upper Cholesky factor of H^-1: row j holds the updates that column j's error causes
    try:
        u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError as err:  # (a singular moment: fewer tokens than inputs)
        raise ValueError(
            f"the calibration inputs' second moment, damped by damp={damp}, is not positive "
            "definite (too few calibration tokens for this layer's inputs, or too small a damp); "
            "raise damp or calibrate on more inputs") from err
    cent = cent.detach().double()
    mids = ((cent[:, 1:] + cent[:, :-1]) * 0.5).contiguous()
    idx = torch.empty(n, kdim, dtype=torch.long, device=w.device)
    for b0 in range(0, kdim, block):
        b1 = min(b0 + block, kdim)
        err = torch.empty(n, b1 - b0, dtype=w.dtype, device=w.device)
        for j in range(b0, b1):
            col = w[:, j]
            if cent.shape[0] == 1:
                i = torch.searchsorted(mids[0], col.contiguous())
                q = cent[0][i]
            else:
                i = torch.searchsorted(mids, col[:, None].contiguous())[:, 0]
                q = cent.gather(1, i[:, None])[:, 0]
            q = torch.where(keep[:, j], q, 0.0)
            idx[:, j] = torch.where(keep[:, j], i, -1)
            e = (col - q) / u[j, j]
            w[:, j + 1:b1] -= e[:, None] * u[j, j + 1:b1][None, :]
            err[:, j - b0] = e
        w[:, b1:] -= err @ u[b0:b1, b1:]
    return idx[:, torch.argsort(order)]


def share_weights_(
    model: nn.Module,
    bits: int = 4,
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
    per_channel: bool = False,
    iters: int = 100,
    calibration: Any = None,
    damp: float = 1.0,
) -> dict:
    """Replace every ``nn.Linear`` (or those ``filter_fn(module, name)`` accepts, as in
    ``quantize_`` and ``sparsify_``) by a
    ``fastkd.nn.SharedLinear`` with ``2**bits`` shared weights, in place. Hugging Face ``Conv1D``
    layers (GPT-2's attention and MLP projections) count as linears too, and so do pruned
    ``fastkd.nn.MaskedLinear`` layers (Deep Compression's order: prune, then share): their
    pruned weights become the fixed zero cluster.

    The experts of a Mixture-of-Experts block, which transformers holds in 3-D parameters (its
    ``use_experts_implementation`` modules: Mixtral, Qwen-MoE, DeepSeek-V3, gpt-oss; and Llama 4's), become
    :class:`fastkd.nn.SharedExperts` (each expert's matrix clustered the same way; they keep
    nearest-centroid rounding under ``calibration``, and are listed as uncalibrated).

    Returns ``{"bytes_before", "bytes_after", "layers": {name: (before, after)}}`` counting weight,
    bias, index and codebook bytes of the replaced layers. A weight tied to another module (an
    lm_head tied to the embedding) counts 0 before: replacing its layer unties it and frees
    nothing, as a warning says (leave it out with ``filter_fn`` to keep the tie).

    ``calibration`` (optional): representative inputs, as a callable that runs the model (e.g.
    ``lambda m: m.encode(sentences)``) or an iterable of batches in the Distiller's convention, so
    a training DataLoader serves as it is (tensor -> ``model(b)``; ``(inputs, target, ...)`` ->
    ``model(inputs)``; mapping -> ``model(**b)`` without ``labels``). The codebooks are still
    k-means over the weights; the indices are then chosen to minimise each layer's output error
    on those inputs (GPTQ-style, see the module docstring), with ``damp`` (> 0, relative to the
    mean of E[x_i^2]) regularising towards plain rounding: 1.0 was best on held-out sentences
    with 16 to 256 calibration sentences (bench/notes_shared_linear.md); use less with much more
    data. All layers' statistics come from one pass of the float model and take
    in_features^2 x 8 bytes per layer; to bound that memory, or to calibrate later layers on the
    already-shared earlier ones, call share_weights_ several times with filters. A layer the
    calibration never runs keeps plain rounding and is listed under ``"uncalibrated"`` (with a
    warning).
    """
    from .nn._linear_like import (
        _selected,
        adapter_layers,
        is_replaceable_linear,
        module_paths,
        one_answer_per_layer,
        refuse_distributed,
        replace_everywhere,
        shown,
        tied_elsewhere,
        unwrapped_model,
        warn_compressed_left,
        guard_peft_bases,
        refuse_peft_wrapped_experts,
        warn_stacked_weights_left,
        warn_untied,
    )
    from .nn.masked_experts import MaskedExperts, is_experts_to_prune
    from .nn.shared_experts import SharedExperts
    from .nn.shared_linear import SharedLinear

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(per_channel, bool):  # "no" would have meant True
        raise TypeError(f"per_channel must be a bool, got {per_channel!r}")
    if check_int(iters, "iters") < 1:  # -1 ran no Lloyd step at all
        raise ValueError(f"iters must be at least 1, got {iters}")
    check_bits(bits)  # before calibrating
    refuse_distributed(model, "share_weights_")
    if unwrapped_model(model) is not model:  # torch.compile / DataParallel: the filter sees the
        return share_weights_(unwrapped_model(model), bits, filter_fn,  # model's own names
                              per_channel, iters, calibration, damp)
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError("filter_fn must be callable as filter_fn(module, name) -> bool")
    filter_fn = one_answer_per_layer("share_weights_", model, filter_fn)
    # nn.Linear, Hugging Face Conv1D and subclasses computing the same product, whatever the
    # filter: nn.MultiheadAttention's out_proj is read by its parent as a float weight.
    adapters = adapter_layers(model)  # PEFT's LoRA weights stay float and trainable
    targets = [(n, m) for n, m in model.named_modules()
               if is_replaceable_linear(m, pruned=True) and n not in adapters
               and (filter_fn is None or filter_fn(m, n))]
    # a Mixture-of-Experts block's experts, held in 3-D parameters by transformers (pruned ones,
    # MaskedExperts, clustered from W o M)
    experts = [(n, m) for n, m in model.named_modules()
               if n and is_experts_to_prune(m) and _selected(filter_fn, m, n)]
    refuse_peft_wrapped_experts("share_weights_", model, [n for n, _ in experts])
    warn_stacked_weights_left(
        "share_weights_", model,
        lambda m, n: not is_experts_to_prune(m) and (filter_fn is None or filter_fn(m, n)))
    guard_peft_bases("share_weights_", model, [n for n, _ in targets])
    warn_compressed_left("share_weights_", model, filter_fn, ("Int8Linear",),
                         "cluster the float (or masked) weights before quantize_, not int8 codes")
    other = [n for n, m in model.named_modules()
             if isinstance(m, (SharedLinear, SharedExperts)) and _selected(filter_fn, m, n)
             and (m.bits, m.per_channel) != (bits, bool(per_channel))]
    if other:  # they were left as they are, silently, and the report counted nothing
        warnings.warn(
            f"share_weights_ leaves {len(other)} layer(s) shared before at other settings as "
            f"they are ({shown(other)}): their codebooks are all that is left of the weights. "
            f"fastkd.decompress_ them and share again for bits={bits}, "
            f"per_channel={bool(per_channel)}", UserWarning, stacklevel=2)
    if is_replaceable_linear(model, pruned=True) and any(n == "" for n, _ in targets):
        raise ValueError("share_weights_ replaces submodules; wrap a bare nn.Linear in a module")
    moments, uncalibrated = {}, []
    if calibration is not None:
        _check_damp(damp)
        check_calibration(calibration)
        moments = input_statistics(model, targets, calibration)["moments"]
        for n, h in moments.items():  # before any layer is replaced
            if not torch.isfinite(h).all():
                raise ValueError(f"the calibration inputs of {n!r} are not finite (inf/NaN "
                                 "activations); their second moment cannot weigh the error")
        # the experts keep nearest-centroid rounding: their inputs are routed per token
        uncalibrated = [n for n, _ in targets if n not in moments] + [n for n, _ in experts]
        if uncalibrated:
            warnings.warn(f"share_weights_: the calibration never ran {len(uncalibrated)} "
                          f"layer(s) ({shown(uncalibrated)}); they keep nearest-centroid "
                          "rounding", stacklevel=2)
    tied = set(tied_elsewhere(model, targets))
    warn_untied("share_weights_", sorted(tied))
    # every layer is clustered before any is replaced: one that fails (NaN weights) leaves the
    # model as it was, not half shared with the float weights of the other half gone
    built = []
    for name, lin in targets:
        shared = SharedLinear.from_linear(lin, bits=bits, per_channel=per_channel, iters=iters,
                                          input_moment=moments.get(name), damp=damp)
        # a tied weight stays in the model (its other module keeps it): nothing freed there
        before = sum(p.numel() * p.element_size() for pn, p in lin.named_parameters()
                     if not (name in tied and pn == "weight"))
        built.append((name, lin, shared, before))
    for name, module in experts:
        before = sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
        dense = module.to_experts() if isinstance(module, MaskedExperts) else module
        shared = SharedExperts.from_experts(dense, bits=bits, per_channel=per_channel,
                                            iters=iters)
        built.append((name, module, shared, before))
    layers = {}
    paths = module_paths(model)  # a layer shared under several names stays one shared layer
    for name, old, shared, before in built:
        replace_everywhere(model, paths, old, shared)
        layers[name] = (before, shared.nbytes())
    hf.record(model)
    return {
        "bytes_before": sum(b for b, _ in layers.values()),
        "bytes_after": sum(a for _, a in layers.values()),
        "layers": layers,
        **({"uncalibrated": uncalibrated} if calibration is not None else {}),
    }
