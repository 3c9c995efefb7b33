"""Plain-torch weight-shared linear: indices into a codebook, looked up then multiplied.

Layout (shared with kernels/shared_linear.py and fastkd.nn.SharedLinear):
    indices  uint8. bits <= 4: (N, ceil(K / 2)), column k in byte k // 2, low nibble for even k,
             high nibble for odd k. bits > 4: (N, K), one index per byte.
    codebook fp32. (C,) one codebook for the layer, or (N, C) one per output channel; C = 2**bits.
             Entry 0 is the pruned-weight cluster and always reads as exactly 0.
    W[n, k] = codebook[(n,) idx[n, k]]
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def pack_indices(idx: Tensor, bits: int) -> Tensor:
    """(N, K) uint8 indices < 2**bits -> the stored layout above."""
    if bits > 4:
        return idx.to(torch.uint8).contiguous()
    n, k = idx.shape
    if k % 2:
        idx = torch.cat([idx, idx.new_zeros(n, 1)], dim=1)
    lo = idx[:, 0::2].to(torch.uint8)
    hi = idx[:, 1::2].to(torch.uint8)
    return (lo | (hi << 4)).contiguous()


def highest_code(indices: Tensor, bits: int) -> Tensor:
    """The largest cluster index non-empty ``indices`` hold (both nibbles of a packed byte
    when ``bits <= 4``), a 0-d int32 tensor on their device."""
    v = indices.to(torch.int32)
    return torch.maximum(v & 15, v >> 4).max() if bits <= 4 else v.max()


def unpack_indices(packed: Tensor, in_features: int, bits: int) -> Tensor:
    """The stored layout -> (N, K) int64 indices."""
    if bits > 4:
        return packed.long()
    lo = packed & 0xF
    hi = packed >> 4
    return torch.stack([lo, hi], dim=2).reshape(packed.shape[0], -1)[:, :in_features].long()


def shared_dequantize(indices: Tensor, codebook: Tensor, in_features: int, bits: int) -> Tensor:
    """The fp32 (N, K) weight the indices and codebook stand for.

    One table lookup per stored byte, with nothing unpacked: for bits <= 4 the table has an entry
    for each of the 256 byte values, the pair (codebook[lo nibble], codebook[hi nibble]) as the
    two fp32 bit patterns of one int64 (little-endian: the low half is the even column), so a
    lookup writes two weights. Entry 0 is zeroed in the table rather than in the result. On the
    2-core CI CPU this is 6-9x faster than unpacking to int64 indices, gathering and masking.
    """
    n = indices.shape[0]
    cb = codebook.float().clone()
    cb[..., 0] = 0.0  # the pruned-weight cluster reads as exactly 0
    if bits <= 4 and cb.requires_grad:
        # a weight to differentiate (layer.weight in a regulariser): the table below holds the
        # entries' bit patterns, which carry no gradient, so gather the unpacked indices (the
        # ops run without grad mode and keep the table)
        idx = unpack_indices(indices, in_features, bits)
        return cb[idx] if cb.dim() == 1 else cb.gather(1, idx)
    if bits <= 4:
        cb = F.pad(cb, (0, 16 - cb.shape[-1]))  # fewer than 4 bits: nibbles still index 16
        pattern = cb.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        # table[..., hi, lo] for the byte lo | hi << 4
        table = (pattern.unsqueeze(-2) | (pattern.unsqueeze(-1) << 32)).reshape(*cb.shape[:-1], 256)
    else:
        table = cb
    idx = indices.long()
    if table.dim() == 2:  # one table per output channel, laid end to end
        idx.add_(torch.arange(n, device=idx.device)[:, None] * table.shape[1])
    w = torch.index_select(table.reshape(-1), 0, idx.reshape(-1))
    if bits <= 4:
        w = w.view(torch.float32)
    return w.reshape(n, -1)[:, :in_features]


def shared_linear_forward(
    x: Tensor, indices: Tensor, codebook: Tensor, bias: Optional[Tensor], in_features: int, bits: int
) -> Tensor:
    """y = x @ W.T + bias in x's dtype, W looked up from the codebook. x: (M, K) -> (M, N)."""
    w = shared_dequantize(indices, codebook, in_features, bits).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def shared_codebook_grad(
    grad_w: Tensor, indices: Tensor, codebook: Tensor, in_features: int, bits: int
) -> Tensor:
    """d loss / d codebook: the sum of the weight gradients of each cluster (0 for entry 0)."""
    idx = unpack_indices(indices, in_features, bits)
    g = grad_w.float()
    if codebook.dim() == 1:
        out = torch.zeros(codebook.shape[0], dtype=torch.float32, device=g.device)
        out.index_add_(0, idx.reshape(-1), g.reshape(-1))
        out[0] = 0.0
    else:
        out = torch.zeros(codebook.shape, dtype=torch.float32, device=g.device)
        out.scatter_add_(1, idx, g)
        out[:, 0] = 0.0
    return out.to(codebook.dtype)
