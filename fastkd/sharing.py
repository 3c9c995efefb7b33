"""Weight sharing (Deep Compression, Han et al. 2016): k-means over each linear's weights.

Each row (``per_channel=True``) or the whole layer is clustered in 1-D into ``2**bits - 1`` shared
values; exact zeros (pruned weights) form their own fixed cluster, index 0, so they stay zero.

Clustering: 1-D k-means initialised at the quantiles of the weights (in 1-D that puts the centroids
where the mass is, close to the optimum; plain random/linear init wastes clusters on the tails), then
Lloyd iterations. Assignment in 1-D is a ``bucketize`` against the midpoints of sorted centroids, so
every row of a layer is clustered at once, without a (weights x clusters) distance matrix.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

__all__ = ["kmeans_1d", "share_weights_"]


def kmeans_1d(values: Tensor, k: int, valid: Optional[Tensor] = None, iters: int = 25):
    """Row-wise 1-D k-means. values (R, L) -> (centroids (R, k) sorted, assignment (R, L) int64).

    ``valid`` (R, L) bool excludes entries from the fit (their assignment is still computed).
    Rows with fewer than k distinct valid values get repeated centroids; that is harmless.
    """
    v = values.detach().float()
    r, n = v.shape
    if valid is None:
        valid = torch.ones_like(v, dtype=torch.bool)
    wts = valid.float()
    # quantile init over the valid entries of each row: sort with invalid entries pushed to +inf
    keyed = torch.where(valid, v, torch.full_like(v, float("inf")))
    srt = keyed.sort(dim=1).values
    cnt = valid.sum(1).clamp_min(1)
    q = (torch.arange(k, device=v.device, dtype=torch.float32) + 0.5) / k  # (k,)
    pos = (q[None, :] * cnt[:, None].float()).long().clamp_max(n - 1)
    pos = torch.minimum(pos, (cnt[:, None] - 1))
    cent = torch.gather(srt, 1, pos)
    cent = torch.where(torch.isfinite(cent), cent, torch.zeros_like(cent))
    for _ in range(iters):
        cent = cent.sort(dim=1).values
        assign = _assign(v, cent)
        sums = torch.zeros(r, k, device=v.device).scatter_add_(1, assign, v * wts)
        counts = torch.zeros(r, k, device=v.device).scatter_add_(1, assign, wts)
        new = torch.where(counts > 0, sums / counts.clamp_min(1e-12), cent)
        if torch.equal(new, cent):
            break
        cent = new
    cent = cent.sort(dim=1).values
    return cent, _assign(v, cent)


def _assign(v: Tensor, cent: Tensor) -> Tensor:
    mids = (cent[:, 1:] + cent[:, :-1]) * 0.5
    return torch.searchsorted(mids.contiguous(), v.contiguous())


def _default_filter(module: nn.Module, name: str) -> bool:
    return type(module) is nn.Linear


def share_weights_(
    model: nn.Module,
    bits: int = 4,
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
    per_channel: bool = False,
    iters: int = 25,
) -> dict:
    """Replace every ``nn.Linear`` (or those ``filter_fn(module, name)`` accepts, as in
    ``quantize_`` and ``sparsify_``) by a
    ``fastkd.nn.SharedLinear`` with ``2**bits`` shared weights, in place.

    Returns ``{"bytes_before", "bytes_after", "layers": {name: (before, after)}}`` counting weight,
    bias, index and codebook bytes of the replaced layers.
    """
    from .nn.shared_linear import SharedLinear

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    fn = filter_fn or _default_filter
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and fn(m, n)]
    if isinstance(model, nn.Linear) and any(n == "" for n, _ in targets):
        raise ValueError("share_weights_ replaces submodules; wrap a bare nn.Linear in a module")
    layers = {}
    for name, lin in targets:
        shared = SharedLinear.from_linear(lin, bits=bits, per_channel=per_channel, iters=iters)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, shared)
        before = sum(p.numel() * p.element_size() for p in lin.parameters())
        layers[name] = (before, shared.nbytes())
    return {
        "bytes_before": sum(b for b, _ in layers.values()),
        "bytes_after": sum(a for _, a in layers.values()),
        "layers": layers,
    }
