import pytest
import torch

from fastkd.prune import magnitude_mask, parse_pattern, pattern_name


def _weight(rows=45, cols=68, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g).to(dtype)


@pytest.mark.parametrize("shape", [(45, 67), (3, 5, 7), (1,), (128,)])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_unstructured_prunes_exact_count_of_smallest(shape, sparsity):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    mask = magnitude_mask(w, sparsity)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    assert int((~mask).sum()) == round(w.numel() * sparsity)
    if 0 < int(mask.sum()) < w.numel():
        assert w.abs()[mask].min() >= w.abs()[~mask].max()


def test_unstructured_ties_are_deterministic():
    w = torch.ones(10, 10)
    m1 = magnitude_mask(w, 0.37)
    m2 = magnitude_mask(w, 0.37)
    assert torch.equal(m1, m2) and int((~m1).sum()) == 37


@pytest.mark.parametrize("pattern,cols", [("2:4", 68), ("1:4", 68), ("4:8", 88), ("1:2", 46), ("4:4", 12)])
def test_nm_keeps_n_largest_per_group(pattern, cols):
    n, m = map(int, pattern.split(":"))
    w = _weight(45, cols)
    mask = magnitude_mask(w, None, pattern)
    groups_w = w.abs().reshape(-1, m)
    groups_m = mask.reshape(-1, m)
    assert (groups_m.sum(1) == n).all()
    for gw, gm in zip(groups_w, groups_m):
        if n < m:
            assert gw[gm].min() >= gw[~gm].max()
    # The implied sparsity is accepted explicitly too.
    assert torch.equal(magnitude_mask(w, 1 - n / m, pattern), mask)


def test_nm_along_input_dimension():
    w = torch.tensor([[1.0, 5.0, 2.0, 4.0, 9.0, 0.1, 0.2, 8.0]])
    assert magnitude_mask(w, None, "2:4").tolist() == [[False, True, False, True, True, False, False, True]]


@pytest.mark.parametrize("block", [(3, 4), (5, 17), (1, 68), (45, 1)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_block_prunes_whole_blocks_with_smallest_norm(block, sparsity):
    bh, bw = block
    w = _weight(45, 68)
    mask = magnitude_mask(w, sparsity, block)
    blocks = mask.reshape(45 // bh, bh, 68 // bw, bw).permute(0, 2, 1, 3).reshape(-1, bh * bw)
    uniform = blocks.all(1) | (~blocks).all(1)
    assert uniform.all(), "a block was partly pruned"
    kept = blocks.all(1)
    n_blocks = blocks.shape[0]
    assert int((~kept).sum()) == round(n_blocks * sparsity)
    norms = w.reshape(45 // bh, bh, 68 // bw, bw).permute(0, 2, 1, 3).reshape(-1, bh * bw).norm(dim=1)
    if 0 < int(kept.sum()) < n_blocks:
        assert norms[kept].min() >= norms[~kept].max()


def test_mask_follows_device_and_dtype_of_weight():
    w = _weight(dtype=torch.bfloat16)
    mask = magnitude_mask(w, 0.5)
    assert mask.device == w.device and mask.dtype == torch.bool


@pytest.mark.parametrize(
    "weight,sparsity,pattern,match",
    [
        (_weight(), -0.1, "unstructured", "sparsity"),
        (_weight(), 1.5, "unstructured", "sparsity"),
        (_weight(), float("nan"), "unstructured", "sparsity"),
        (_weight(), "half", "unstructured", "sparsity"),
        (_weight(), None, "unstructured", "sparsity"),
        (_weight(), 0.75, "2:4", "implies sparsity"),
        (_weight(45, 67), None, "2:4", "divisible"),
        (_weight(), None, "3:2", "N <= M"),
        (_weight(), None, "0:4", "N <= M"),
        (_weight(), 0.5, "magnitude", "unknown pruning pattern"),
        (_weight(), 0.5, (0, 4), "two positive ints"),
        (_weight(), 0.5, (2, 2, 2), "two positive ints"),
        (_weight(), 0.5, 7, "unknown pruning pattern"),
        (_weight(45, 67), 0.5, (4, 4), "must divide"),
        (torch.randn(4, 4, 4), 0.5, (2, 2), "2-D"),
        (torch.tensor([[1.0, float("inf")]]), 0.5, "unstructured", "NaN or infinite"),
    ],
)
def test_bad_arguments_raise_value_error(weight, sparsity, pattern, match):
    with pytest.raises(ValueError, match=match):
        magnitude_mask(weight, sparsity, pattern)


def test_non_float_weight_is_a_type_error():
    with pytest.raises(TypeError):
        magnitude_mask(torch.arange(8).reshape(2, 4), 0.5)
    with pytest.raises(TypeError):
        magnitude_mask([[1.0, 2.0]], 0.5)


def test_pattern_names():
    assert pattern_name("unstructured") == "unstructured"
    assert pattern_name(" 2 : 4 ") == "2:4"
    assert pattern_name((64, 64)) == "block64x64"
    assert parse_pattern([8, 16]) == ("block", (8, 16))


# ----------------------------------------------------------------------------- global pruning


def _global_oracle(weights, sparsity, masks=None):
    """Stable sort of all magnitudes (already pruned entries first), the first n pruned."""
    mags = torch.cat([w.detach().abs().float().reshape(-1) for w in weights])
    kept = (torch.cat([m.reshape(-1) for m in masks]) if masks is not None
            else torch.ones_like(mags, dtype=torch.bool))
    n = round(mags.numel() * sparsity)
    key = torch.where(kept, mags, torch.full_like(mags, -1.0))  # pruned ones rank first
    keep = torch.ones_like(kept)
    keep[torch.argsort(key, stable=True)[:max(n, int((~kept).sum()))]] = False
    out, i = [], 0
    for w in weights:
        out.append(keep[i:i + w.numel()].reshape(w.shape))
        i += w.numel()
    return out


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.77, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_masks", [False, True])
def test_global_magnitude_masks_match_a_sorted_oracle(sparsity, dtype, with_masks):
    from fastkd.prune import global_magnitude_masks

    g = torch.Generator().manual_seed(3)
    # rounded values: many exact ties across and within tensors
    ws = [(torch.randn(shape, generator=g) * scale).round(decimals=1).to(dtype)
          for shape, scale in (((5, 7), 1.0), ((3, 11), 3.0), ((13,), 0.2), ((2, 9), 1.0))]
    masks = [torch.rand(w.shape, generator=g) > 0.3 for w in ws] if with_masks else None
    if masks is not None:
        ws = [w.masked_fill(~m, 0) for w, m in zip(ws, masks)]
    got = global_magnitude_masks(ws, sparsity, masks=masks)
    want = _global_oracle(ws, sparsity, masks)
    for a, b in zip(got, want):
        assert a.dtype == torch.bool and torch.equal(a, b)
    if masks is not None:  # pruned entries never come back
        assert all(not (k & ~m).any() for k, m in zip(got, masks))


def test_sparsify_global_scope_prunes_small_layers_more_and_exactly_the_total():
    import fastkd
    from fastkd.nn import MaskedLinear

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.ReLU(), torch.nn.Linear(30, 10),
                                torch.nn.ReLU(), torch.nn.Linear(10, 4))
    with torch.no_grad():
        model[2].weight.mul_(0.2)  # a layer of small weights
    ref = [m.weight.detach().clone() for m in model if isinstance(m, torch.nn.Linear)]
    fastkd.sparsify_(model, 0.5, scope="global", filter_fn=lambda m, n: n != "4")
    layers = [model[0], model[2]]
    assert all(isinstance(m, MaskedLinear) for m in layers) and type(model[4]) is torch.nn.Linear
    want = _global_oracle(ref[:2], 0.5)
    for layer, keep in zip(layers, want):
        assert torch.equal(layer.mask, keep)
    pruned = sum(int((~m.mask).sum()) for m in layers)
    assert pruned == round(0.5 * (600 + 300))
    assert layers[1].density < 0.5 < layers[0].density
    # gradual: further, within the masks in force
    old = [m.mask.clone() for m in layers]
    fastkd.sparsify_(model, 0.8, scope="global", filter_fn=lambda m, n: n != "4")
    assert sum(int((~m.mask).sum()) for m in layers) == round(0.8 * 900)
    assert all(not (m.mask & ~o).any() for m, o in zip(layers, old))
    with pytest.raises(ValueError, match="unstructured"):
        fastkd.sparsify_(model, None, pattern="2:4", scope="global")
    with pytest.raises(ValueError, match="scope"):
        fastkd.sparsify_(model, 0.5, scope="model")
