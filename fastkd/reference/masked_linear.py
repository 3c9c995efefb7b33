"""Reference masked linear layer in plain torch, and the tile map the CUDA kernels read.

With x (M, K), weight W and bool mask Mk (N, K), bias b (N,):
    y  = x (W o Mk)^T + b
    dx = dy (W o Mk)
    dW = (dy^T x) o Mk          (pruned weights get exactly zero gradient)
    db = sum over rows of dy
The pruned weights are removed with ``masked_fill`` rather than a multiply, so an inf/NaN in a pruned
position cannot leak into the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

TILE = 64  # must equal TILE in csrc/masked_matmul.cu
TILE_EMPTY, TILE_PARTIAL, TILE_FULL = 0, 1, 2


def _masked_weight(weight: Tensor, mask: Tensor) -> Tensor:
    return weight.masked_fill(~mask, 0)


def masked_linear_forward(x: Tensor, weight: Tensor, mask: Tensor, bias: Optional[Tensor]) -> Tensor:
    """(M, K) x (N, K) -> (M, N)."""
    return torch.nn.functional.linear(x, _masked_weight(weight, mask), bias)


def masked_linear_grad_input(grad_out: Tensor, weight: Tensor, mask: Tensor) -> Tensor:
    """(M, N), (N, K) -> (M, K)."""
    return grad_out.matmul(_masked_weight(weight, mask))


def masked_linear_grad_weight(grad_out: Tensor, x: Tensor, mask: Tensor) -> Tensor:
    """(M, N), (M, K) -> (N, K), zero wherever the mask is False."""
    return grad_out.t().matmul(x).masked_fill(~mask, 0)


@dataclass(frozen=True)
class MaskTiles:
    """The tile map of a (N, K) mask on a grid of TILE x TILE tiles, packed in one int32 tensor
    ``data`` on the mask's device (layout documented in csrc/masked_matmul.cu):

        [kind: n_tiles*k_tiles][row_ptr: n_tiles+1][col_ptr: k_tiles+1][row_idx: nnz][col_idx: nnz]

    kind is 0 (no kept entry), 1 (partly kept) or 2 (every in-bounds entry kept); row_ptr/row_idx
    list the non-empty tiles of each tile-row (CSR, for the forward) and col_ptr/col_idx those of
    each tile-column (CSC, the transposed map, for dX). The counts are Python ints so backend
    choice needs no device sync.
    """

    data: Tensor
    shape: tuple
    n_tiles: int
    k_tiles: int
    nonempty: int
    full: int

    @property
    def tile_density(self) -> float:
        """Fraction of weight tiles with at least one kept entry (what the kernel cannot skip)."""
        total = self.n_tiles * self.k_tiles
        return self.nonempty / total if total else 0.0


@torch.no_grad()
def build_tile_map(mask: Tensor, tile: int = TILE) -> MaskTiles:
    """Build the tile map of a bool (N, K) mask. Syncs with the device once (nonzero counts);
    build it once per mask and cache it (fastkd.nn.MaskedLinear does)."""
    if mask.dtype != torch.bool or mask.dim() != 2:
        raise ValueError(f"mask must be a 2-D bool tensor, got {mask.dtype} of dim {mask.dim()}")
    n, k = mask.shape
    nt, kt = -(-n // tile), -(-k // tile)
    padded = torch.zeros((nt * tile, kt * tile), dtype=torch.bool, device=mask.device)
    padded[:n, :k] = mask
    kept = padded.reshape(nt, tile, kt, tile).sum(dim=(1, 3), dtype=torch.int32)
    # In-bounds size of every tile (the last tile-row/column may be short).
    rows_in = (n - torch.arange(nt, device=mask.device) * tile).clamp(max=tile)
    cols_in = (k - torch.arange(kt, device=mask.device) * tile).clamp(max=tile)
    size = (rows_in[:, None] * cols_in[None, :]).to(torch.int32)
    kind = torch.full_like(kept, TILE_PARTIAL)
    kind[kept == 0] = TILE_EMPTY
    kind[kept == size] = TILE_FULL
    nonempty = kind != TILE_EMPTY
    # CSR by tile-row: nonzero() lists (row, col) in row-major order.
    rc = nonempty.nonzero()
    row_ptr = torch.zeros(nt + 1, dtype=torch.int32, device=mask.device)
    row_ptr[1:] = nonempty.sum(dim=1).cumsum(0)
    # CSC by tile-column: the same on the transpose.
    cr = nonempty.t().nonzero()
    col_ptr = torch.zeros(kt + 1, dtype=torch.int32, device=mask.device)
    col_ptr[1:] = nonempty.sum(dim=0).cumsum(0)
    data = torch.cat(
        [
            kind.reshape(-1),
            row_ptr,
            col_ptr,
            rc[:, 1].to(torch.int32),
            cr[:, 1].to(torch.int32),
        ]
    ).contiguous()
    return MaskTiles(
        data=data,
        shape=(n, k),
        n_tiles=nt,
        k_tiles=kt,
        nonempty=int(rc.shape[0]),
        full=int((kind == TILE_FULL).sum()),
    )
