"""Reference masked linear layer in plain torch, and the tile map the CUDA kernels read.

With x (M, K), weight W and bool mask Mk (N, K), bias b (N,):
    y  = x (W o Mk)^T + b
    dx = dy (W o Mk)
    dW = (dy^T x) o Mk          (pruned weights get exactly zero gradient)
    db = sum over rows of dy
The pruned weights are removed by selection rather than a multiply, so an inf/NaN in a pruned
position cannot leak into the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

TILE = 64  # must equal TILE in csrc/masked_matmul.cu
TILE_EMPTY, TILE_PARTIAL, TILE_FULL = 0, 1, 2


# Same-size integer types to select float bits with (see zero_pruned).
_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
         torch.float64: torch.int64}


def zero_pruned(t: Tensor, mask: Tensor) -> Tensor:
    """``t`` with +0.0 wherever ``mask`` is False, every kept entry's bits unchanged.

    On the CPU ``masked_fill``/``where`` run a branchy loop that a random 50 % mask mispredicts
    half the time (3.5 ms for a 1024 x 1024 fp32 weight on the 2-core CI machine): there the kept
    bits are selected with an integer AND against an all-ones/zero mask instead (0.34 ms, the
    same result bit for bit). Elsewhere ``masked_fill``.
    """
    bits = _BITS.get(t.dtype)
    if t.device.type != "cpu" or bits is None:
        return t.masked_fill(~mask, 0)
    keep = mask.to(bits).neg_()  # -1: every bit set
    return torch.bitwise_and(t.view(bits), keep).view(t.dtype)


def _masked_weight(weight: Tensor, mask: Tensor) -> Tensor:
    return zero_pruned(weight, mask)


def masked_linear_forward(x: Tensor, weight: Tensor, mask: Tensor, bias: Optional[Tensor]) -> Tensor:
    """(M, K) x (N, K) -> (M, N)."""
    return torch.nn.functional.linear(x, _masked_weight(weight, mask), bias)


def masked_linear_grad_input(grad_out: Tensor, weight: Tensor, mask: Tensor) -> Tensor:
    """(M, N), (N, K) -> (M, K)."""
    return grad_out.matmul(_masked_weight(weight, mask))


def masked_linear_grad_weight(grad_out: Tensor, x: Tensor, mask: Tensor) -> Tensor:
    """(M, N), (M, K) -> (N, K), zero wherever the mask is False."""
    return zero_pruned(grad_out.t().matmul(x), mask)


@dataclass(frozen=True)
class TileList:
    """Where one ELL tile list lives in the packed map: for each of ``groups`` groups of output
    tiles, ``count[g]`` non-empty reduction tiles at ``idx[g * width : g * width + count[g]]``, the
    first ``nfull[g]`` of them full (mask not needed), the rest partly kept (ascending within each).
    Fixed size, so the offsets follow from the shape alone (no device read to find them)."""

    count: int  # offset of count[groups]
    nfull: int  # offset of nfull[groups]
    idx: int  # offset of idx[groups * width]
    groups: int
    width: int

    @property
    def end(self) -> int:
        return self.idx + self.groups * self.width


@dataclass(frozen=True)
class TileMapLayout:
    """Offsets of every section of the packed tile map of a mask with ``n_tiles x k_tiles`` tiles.

        [kind    : nt*kt]  0 empty, 1 partly kept, 2 every in-bounds entry kept   (both backends)
        [row_ptr : nt+1 ][col_ptr : kt+1]                                         (CUDA kernels)
        [row_idx : nt*kt][col_idx : nt*kt]  CSR / CSC of the non-empty tiles, each padded to nt*kt
        [rows1][rows2][cols1][cols2]        ELL lists, full tiles first (Triton kernels):
            rows<g>: groups of g tile-rows (forward, BLOCK_N = 64 g), reduction over tile-columns
            cols<g>: groups of g tile-columns (grad_input, BLOCK_K = 64 g), over tile-rows
    A group of two is non-empty where either tile is, and full only where both (in bounds) are.
    """

    n_tiles: int
    k_tiles: int

    @property
    def kind(self) -> int:
        return 0

    @property
    def row_ptr(self) -> int:
        return self.n_tiles * self.k_tiles

    @property
    def col_ptr(self) -> int:
        return self.row_ptr + self.n_tiles + 1

    @property
    def row_idx(self) -> int:
        return self.col_ptr + self.k_tiles + 1

    @property
    def col_idx(self) -> int:
        return self.row_idx + self.n_tiles * self.k_tiles

    def lists(self) -> dict:
        """{"rows1", "rows2", "cols1", "cols2"} -> TileList, in their order in the map."""
        nt, kt = self.n_tiles, self.k_tiles
        out, off = {}, self.col_idx + nt * kt
        for name, groups, width in (
            ("rows1", nt, kt),
            ("rows2", -(-nt // 2), kt),
            ("cols1", kt, nt),
            ("cols2", -(-kt // 2), nt),
        ):
            out[name] = TileList(off, off + groups, off + 2 * groups, groups, width)
            off = out[name].end
        return out

    @property
    def size(self) -> int:
        return self.lists()["cols2"].end


def tile_map_layout(n: int, k: int, tile: int = TILE) -> TileMapLayout:
    """The layout of the tile map of an (n, k) mask."""
    return TileMapLayout(-(-n // tile), -(-k // tile))


@dataclass(frozen=True)
class MaskTiles:
    """The tile map of a (N, K) mask on a grid of TILE x TILE tiles, packed in one int32 tensor
    ``data`` on the mask's device; :class:`TileMapLayout` gives the offset of every section (the
    CUDA kernels read kind and the CSR/CSC lists, see csrc/masked_matmul.cu; the Triton kernels
    read kind and the ELL lists, see kernels/masked_linear.py). The counts are Python ints so
    backend choice needs no device sync.
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

    @property
    def layout(self) -> TileMapLayout:
        """Offsets of the sections of ``data``."""
        return TileMapLayout(self.n_tiles, self.k_tiles)


def _group(flags: Tensor, g: int, reduce: str) -> Tensor:
    """Combine groups of g consecutive rows of a (G, R) bool grid: any (reduce="any") or all."""
    if g == 1:
        return flags
    rows, width = flags.shape
    pad = (-rows) % g
    # A missing row (past the last tile-row) has no entries: empty for "any", full for "all".
    fill = torch.full((pad, width), reduce == "all", dtype=torch.bool, device=flags.device)
    # (the group count spelled out: -1 cannot be inferred when width is 0, an empty mask)
    grouped = torch.cat([flags, fill]).reshape((rows + pad) // g, g, width)
    return grouped.any(dim=1) if reduce == "any" else grouped.all(dim=1)


def _ell_list(nonempty: Tensor, full: Tensor) -> Tensor:
    """[count: G][nfull: G][idx: G*R] of a (G, R) grid: per group the non-empty columns, the full
    ones first, each part ascending. No device sync (no data-dependent shapes)."""
    groups, width = nonempty.shape
    col = torch.arange(width, device=nonempty.device)
    # sort key: full tiles, then partly kept ones, then empty ones (ignored: past count)
    key = torch.where(full, col, torch.where(nonempty, col + width, col + 2 * width))
    idx = key.argsort(dim=1) % width
    return torch.cat(
        [
            nonempty.sum(dim=1, dtype=torch.int32),
            full.sum(dim=1, dtype=torch.int32),
            idx.to(torch.int32).reshape(-1),
        ]
    )


@torch.no_grad()
def build_tile_map(mask: Tensor, tile: int = TILE) -> MaskTiles:
    """Build the tile map of a bool (N, K) mask. Syncs with the device once (nonzero counts);
    build it once per mask and cache it (fastkd.nn.MaskedLinear does)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a 2-D bool tensor, got {type(mask).__name__}")
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile must be a positive int, got {tile!r}")
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
    full = kind == TILE_FULL
    # CSR by tile-row: nonzero() lists (row, col) in row-major order; padded to nt*kt entries.
    rc = nonempty.nonzero()
    nnz = int(rc.shape[0])
    row_ptr = torch.zeros(nt + 1, dtype=torch.int32, device=mask.device)
    row_ptr[1:] = nonempty.sum(dim=1).cumsum(0)
    # CSC by tile-column: the same on the transpose.
    cr = nonempty.t().nonzero()
    col_ptr = torch.zeros(kt + 1, dtype=torch.int32, device=mask.device)
    col_ptr[1:] = nonempty.sum(dim=0).cumsum(0)
    pad = torch.zeros(nt * kt - nnz, dtype=torch.int32, device=mask.device)
    parts = [
        kind.reshape(-1),
        row_ptr,
        col_ptr,
        rc[:, 1].to(torch.int32),
        pad,
        cr[:, 1].to(torch.int32),
        pad,
    ]
    for g in (1, 2):
        parts.append(_ell_list(_group(nonempty, g, "any"), _group(full, g, "all")))
    for g in (1, 2):
        parts.append(_ell_list(_group(nonempty.t(), g, "any"), _group(full.t(), g, "all")))
    data = torch.cat(parts).contiguous()
    assert data.numel() == TileMapLayout(nt, kt).size
    return MaskTiles(
        data=data,
        shape=(n, k),
        n_tiles=nt,
        k_tiles=kt,
        nonempty=nnz,
        full=int(full.sum()),
    )
