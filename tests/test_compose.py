"""The compression steps compose on the same layers: prune, then quantize or share weights.

``quantize_`` and ``share_weights_`` used to skip ``MaskedLinear`` layers silently, so the usual
pipeline (sparsify_ then quantize_, or Deep Compression's prune then share) left a pruned model
unquantized with no word said. They now take pruned layers: ``W o M`` is what gets quantized or
clustered, and pruned weights stay exact zeros (int8 code 0, codebook cluster 0).
"""

import copy

import pytest
import torch
from torch import nn

import fastkd
from fastkd.nn import Int8Linear, MaskedLinear, SharedLinear


def _model(seed=0, dims=(45, 67, 31, 13)):
    torch.manual_seed(seed)
    a, b, c, d = dims
    return nn.Sequential(nn.Linear(a, b), nn.GELU(), nn.Linear(b, c), nn.GELU(), nn.Linear(c, d))


def _pruned(pattern="unstructured", sparsity=0.6, seed=0, dims=(45, 67, 31, 13)):
    model = _model(seed, dims)
    kwargs = {"pattern": pattern} if ":" in str(pattern) else {"sparsity": sparsity}
    return fastkd.sparsify_(model, **kwargs)


def _layers(model, cls):
    return [m for m in model if isinstance(m, cls)]


def _sqnr_db(y, ref):
    return 10 * torch.log10(ref.pow(2).sum() / (y - ref).pow(2).sum()).item()


@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
def test_quantize_takes_pruned_layers(mode):
    pruned = _pruned()
    masks = [m.mask.clone() for m in _layers(pruned, MaskedLinear)]
    x = torch.randn(7, 45)
    with torch.no_grad():
        ref = pruned(x)
    quantized = fastkd.quantize_(copy.deepcopy(pruned), mode=mode)
    layers = _layers(quantized, Int8Linear)
    assert len(layers) == 3 and not _layers(quantized, MaskedLinear)
    for layer, mask in zip(layers, masks):
        assert (layer.weight[~mask] == 0).all()  # pruned: int8 zeros
        assert (layer.weight[mask] != 0).float().mean() > 0.95  # kept: mostly nonzero codes
    with torch.no_grad():
        assert _sqnr_db(quantized(x), ref) > 30


def test_quantize_filter_sees_the_pruned_layer_and_a_bare_one_is_refused():
    pruned = _pruned()
    seen = []
    fastkd.quantize_(pruned, filter_fn=lambda m, n: seen.append((type(m), n)) or n == "2")
    assert seen == [(MaskedLinear, "0"), (MaskedLinear, "2"), (MaskedLinear, "4")]
    assert [type(m) for m in pruned if not isinstance(m, nn.GELU)] == [
        MaskedLinear, Int8Linear, MaskedLinear]
    bare = MaskedLinear.from_linear(nn.Linear(8, 4), sparsity=0.5)
    with pytest.raises(ValueError, match="from_linear"):
        fastkd.quantize_(bare)


@pytest.mark.parametrize("per_channel", [False, True])
def test_share_weights_takes_pruned_layers_and_keeps_zeros_through_finetuning(per_channel):
    pruned = _pruned(pattern="2:4", dims=(44, 68, 36, 13))  # N:M needs in_features % 4 == 0
    masks = [m.mask.clone() for m in _layers(pruned, MaskedLinear)]
    x = torch.randn(9, 44)
    with torch.no_grad():
        ref = pruned(x)
    shared = fastkd.share_weights_(copy.deepcopy(pruned), bits=4, per_channel=per_channel)
    model = copy.deepcopy(pruned)
    report = fastkd.share_weights_(model, bits=4, per_channel=per_channel)
    assert set(report["layers"]) == {"0", "2", "4"}
    # per channel, these narrow layers carry a 16-entry fp32 codebook per row
    assert shared["bytes_after"] < shared["bytes_before"] / (2 if per_channel else 3)
    layers = _layers(model, SharedLinear)
    assert len(layers) == 3
    for layer, mask in zip(layers, masks):
        w = layer.dequantized_weight()
        assert (w[~mask] == 0).all() and (w[mask] != 0).all()
    with torch.no_grad():
        assert _sqnr_db(model(x), ref) > 15
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    for layer, mask in zip(layers, masks):
        assert (layer.dequantized_weight()[~mask] == 0).all()


def test_calibrated_sharing_of_a_pruned_model():
    pruned = _pruned(sparsity=0.5, seed=1)
    masks = [m.mask.clone() for m in _layers(pruned, MaskedLinear)]
    batches = [torch.randn(64, 45) for _ in range(2)]
    report = fastkd.share_weights_(pruned, bits=3, per_channel=True, calibration=batches)
    assert report["uncalibrated"] == [] and set(report["layers"]) == {"0", "2", "4"}
    for layer, mask in zip(_layers(pruned, SharedLinear), masks):
        assert (layer.dequantized_weight()[~mask] == 0).all()


def test_pruned_then_quantized_checkpoint_loads_into_a_plain_skeleton(tmp_path):
    model = fastkd.quantize_(_pruned(seed=2), mode="w8a8")
    x = torch.randn(4, 45)
    with torch.no_grad():
        want = model(x)
    fastkd.save_compressed(model, tmp_path / "m.safetensors")
    skeleton = fastkd.load_compressed(_model(seed=3), tmp_path / "m.safetensors")
    assert len(_layers(skeleton, Int8Linear)) == 3
    with torch.no_grad():
        assert torch.equal(skeleton(x), want)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_quantizing_a_non_finite_weight_is_a_clear_error(bad):
    lin = nn.Linear(8, 4)
    with torch.no_grad():
        lin.weight[1, 2] = bad
    with pytest.raises(ValueError, match="inf or NaN"):
        Int8Linear.from_linear(lin)
    model = nn.Sequential(nn.Linear(8, 8), lin)  # the bad layer comes second
    with pytest.raises(ValueError, match="inf or NaN"):
        fastkd.quantize_(model)
    assert [type(m) for m in model] == [nn.Linear, nn.Linear]  # nothing half-done


def test_replacing_a_tied_head_says_so_and_counts_nothing_freed():
    # an lm_head tied to the input embedding: quantize_ and share_weights_ replace it (a faster
    # head), which unties it; the embedding keeps the float weight, so nothing is freed there
    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(53, 24)
            self.body = nn.Linear(24, 24)
            self.head = nn.Linear(24, 53, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(torch.relu(self.body(self.emb(ids))))

    torch.manual_seed(0)
    lm = TiedLM()
    ids = torch.randint(0, 53, (2, 7))
    ref = lm(ids)
    q = copy.deepcopy(lm)
    with pytest.warns(UserWarning, match="head share.*tied"):
        fastkd.quantize_(q)
    assert isinstance(q.head, Int8Linear) and q.emb.weight.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(q(ids).flatten(), ref.flatten(), dim=0) > 0.99
    s = copy.deepcopy(lm)
    with pytest.warns(UserWarning, match="head share.*tied"):
        report = fastkd.share_weights_(s, bits=6)
    assert report["layers"]["head"][0] == 0  # nothing freed
    assert report["layers"]["body"][0] == 24 * 24 * 4 + 24 * 4
    # leaving the head out keeps the tie, without a warning
    import warnings

    kept = copy.deepcopy(lm)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastkd.quantize_(kept, filter_fn=lambda m, n: n != "head")
        fastkd.sparsify_(copy.deepcopy(lm), 0.5, filter_fn=lambda m, n: n != "head")
    assert kept.head.weight is kept.emb.weight
    # sparsify_ leaves a tied head dense (pruning it would prune the embedding) and says so
    pruned = copy.deepcopy(lm)
    with pytest.warns(UserWarning, match="leaves head dense"):
        fastkd.sparsify_(pruned, 0.5)
    assert type(pruned.head) is nn.Linear and pruned.head.weight is pruned.emb.weight


def test_fold_masks_gives_plain_linears_with_the_same_outputs(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(hidden_size=24, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=37, vocab_size=53)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    fastkd.sparsify_(model, 0.6)
    ids = torch.randint(0, 53, (2, 9))
    with torch.no_grad():
        ref = model(ids).last_hidden_state
    masked = {n: m for n, m in model.named_modules() if isinstance(m, MaskedLinear)}
    keep = next(n for n in masked if n.endswith("query"))
    out = fastkd.fold_masks_(model, filter_fn=lambda m, n: n != keep)
    assert out is model
    assert [n for n, m in model.named_modules() if isinstance(m, MaskedLinear)] == [keep]
    for name, old in masked.items():
        if name == keep:
            continue
        new = model.get_submodule(name)
        assert type(new) is nn.Linear
        assert torch.equal(new.weight, old.masked_weight())  # pruned weights exact zeros
    with torch.no_grad():
        assert torch.equal(model(ids).last_hidden_state, ref)
    # the folded model's state_dict has no masks: a plain model of the architecture loads it
    fastkd.fold_masks_(model)
    plain = transformers.BertModel(cfg).eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(plain(ids).last_hidden_state, ref)
    layer = MaskedLinear.from_linear(nn.Linear(7, 5), sparsity=0.4)
    x = torch.randn(3, 7)
    assert torch.equal(layer.to_linear()(x), layer(x))
    with pytest.raises(ValueError, match="to_linear"):
        fastkd.fold_masks_(layer)
    with pytest.raises(TypeError):
        fastkd.fold_masks_("model")


def test_a_step_that_leaves_compressed_layers_as_they_are_says_so():
    """quantize_ then sparsify_ (or another order no step can undo) changed nothing, silently."""
    import warnings

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))

    m = fastkd.quantize_(model())
    with pytest.warns(UserWarning, match="prune before quantize_"):
        fastkd.sparsify_(m, 0.5)
    assert [type(x).__name__ for x in m] == ["Int8Linear", "ReLU", "Int8Linear"]
    with pytest.warns(UserWarning, match="share_weights_ leaves 2 Int8Linear"):
        fastkd.share_weights_(m, bits=4)
    m = model()
    fastkd.share_weights_(m, bits=4)  # returns its size report
    with pytest.warns(UserWarning, match="quantize_ leaves 2 SharedLinear"):
        fastkd.quantize_(m)
    # layers the filter leaves out are not the step's business; the right order is quiet
    m = fastkd.quantize_(model(), filter_fn=lambda mod, name: name == "2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastkd.sparsify_(m, 0.5, filter_fn=lambda mod, name: name == "0")
        fastkd.quantize_(fastkd.sparsify_(model(), 0.5))


class _StackedExperts(nn.Module):
    """Experts held as transformers 5 holds them: one (E, out, in) parameter per projection."""

    def __init__(self, n_experts=3, dim=16, hidden=24):
        super().__init__()
        self.up = nn.Parameter(torch.randn(n_experts, hidden, dim) * 0.1)
        self.down = nn.Parameter(torch.randn(n_experts, dim, hidden) * 0.1)

    def forward(self, x):  # every expert, averaged: enough to hold the weights in a model
        h = torch.relu(torch.einsum("nd,ehd->neh", x, self.up))
        return torch.einsum("neh,edh->nd", h, self.down) / self.up.shape[0]


@pytest.mark.parametrize("step", ["quantize_", "sparsify_", "share_weights_"])
def test_a_step_that_leaves_stacked_expert_weights_float_says_so(step):
    """A Mixture-of-Experts model's experts (3-D parameters, most of its weights) were left
    float while the step replaced the attention and router-free linears around them, silently."""
    import warnings

    def model():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(16, 16), _StackedExperts(), nn.Linear(16, 8))
        m.conv = nn.Conv1d(4, 4, 3)  # a 3-D convolution weight is no stack of linears
        return m

    run = {"quantize_": lambda m, **kw: fastkd.quantize_(m, **kw),
           "sparsify_": lambda m, **kw: fastkd.sparsify_(m, 0.5, **kw),
           "share_weights_": lambda m, **kw: fastkd.share_weights_(m, bits=4, **kw)}[step]
    m = model()
    share = sum(p.numel() for p in m[1].parameters()) / sum(p.numel() for p in m.parameters())
    with pytest.warns(UserWarning, match=rf"{step} leaves 1 module\(s\) with weights stacked in "
                                         rf"3-D parameters .*: 1 \(up, down\); {share:.0%} of"):
        run(m)
    assert type(m[0]).__name__ != "Linear" and type(m[1]) is _StackedExperts
    with warnings.catch_warnings():  # left out by the filter: the user's choice, quiet
        warnings.simplefilter("error")
        run(model(), filter_fn=lambda mod, name: not isinstance(mod, _StackedExperts))
    # a filter written for linears is asked about the experts only, and failing there is no
    # choice to leave them out
    with pytest.warns(UserWarning, match="stacked"):
        run(model(), filter_fn=lambda mod, name: mod.in_features >= 16)


@pytest.mark.parametrize("step", ["quantize_", "share_weights_"])
def test_vit_tokens_and_position_tables_are_not_taken_for_experts(step):
    """ViT's cls_token (1, 1, H) and position_embeddings (1, T, H) are 3-D: every quantize_ of a
    ViT warned that it left 'weights stacked in 3-D parameters' (experts) float."""
    import warnings

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    vit = transformers.ViTModel(transformers.ViTConfig(
        hidden_size=24, num_hidden_layers=1, num_attention_heads=4, intermediate_size=32,
        image_size=16, patch_size=8)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        {"quantize_": lambda m: fastkd.quantize_(m, mode="w8a16"),
         "share_weights_": lambda m: fastkd.share_weights_(m, bits=6)}[step](vit)
    vit(pixel_values=torch.randn(1, 3, 16, 16))


@pytest.mark.parametrize("step", ["quantize_", "sparsify_", "share_weights_"])
def test_t5_whose_mlp_reads_wo_weight_runs_after_every_step(step):
    """T5's MLP reads ``wo.weight.dtype`` in its forward: a SharedLinear, which holds no float
    weight, failed there with an AttributeError."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.T5Config(vocab_size=53, d_model=24, d_kv=6, d_ff=37, num_layers=1,
                                num_heads=4, decoder_start_token_id=0)
    torch.manual_seed(0)
    model = transformers.T5Model(cfg).eval()
    ids = torch.randint(3, 53, (2, 9), generator=torch.Generator().manual_seed(1))

    def out(m):
        with torch.no_grad():
            return m(input_ids=ids, decoder_input_ids=ids[:, :4]).last_hidden_state

    ref = out(model)
    {"quantize_": lambda: fastkd.quantize_(model, mode="w8a16"),
     "sparsify_": lambda: fastkd.sparsify_(model, 0.0),
     "share_weights_": lambda: fastkd.share_weights_(model, bits=8)}[step]()
    wo = model.encoder.block[0].layer[1].DenseReluDense.wo
    assert type(wo).__name__ in ("Int8Linear", "MaskedLinear", "SharedLinear")
    if isinstance(wo, SharedLinear):
        assert wo.weight.shape == (24, 37) and wo.weight.dtype == torch.float32
        assert torch.equal(wo.weight, wo.dequantized_weight())
        x = torch.randn(3, 37)
        with torch.no_grad():
            torch.testing.assert_close(wo(x), x @ wo.weight.T, rtol=1e-5, atol=1e-5)
        with pytest.raises(AttributeError):
            wo.weight = torch.zeros(24, 37)
    cos = torch.nn.functional.cosine_similarity(out(model).flatten(), ref.flatten(), dim=0)
    assert cos > 0.999, cos


class _SharedBlock(nn.Module):
    """One linear registered under two names (a block reused twice, ALBERT-style)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        lin = nn.Linear(16, 16)
        self.a = nn.Sequential(lin, nn.ReLU())
        self.b = nn.Sequential(lin)

    def forward(self, x):
        return self.b(self.a(x))


def _one_layer(model, kind):
    assert model.a[0] is model.b[0] and type(model.a[0]) is kind


@pytest.mark.parametrize("step", ["quantize_", "share_weights_", "sparsify_then_fold"])
def test_a_layer_shared_under_two_names_stays_one_layer(step, tmp_path):
    """named_modules() names a shared module once: share_weights_, fold_masks_ and decompress_
    swapped it under its first name only (two layers, untied, no word), and load_compressed
    failed on the second name's missing tensors."""
    model = _SharedBlock()
    x = torch.randn(3, 16)
    if step == "quantize_":
        fastkd.quantize_(model, mode="w8a16")
        _one_layer(model, Int8Linear)
    elif step == "share_weights_":
        fastkd.share_weights_(model, bits=4)
        _one_layer(model, SharedLinear)
    else:
        layer = MaskedLinear.from_linear(model.a[0], sparsity=0.5)
        model.a[0] = model.b[0] = layer
        out = model(x)
        fastkd.fold_masks_(model)
        _one_layer(model, nn.Linear)
        torch.testing.assert_close(model(x), out, rtol=0, atol=0)
        return
    out = model(x)
    fastkd.save_compressed(model, tmp_path / "m.safetensors")
    loaded = fastkd.load_compressed(_SharedBlock(), tmp_path / "m.safetensors")
    _one_layer(loaded, type(model.a[0]))
    torch.testing.assert_close(loaded(x), out, rtol=0, atol=0)
    fastkd.decompress_(loaded)
    _one_layer(loaded, nn.Linear)
    torch.testing.assert_close(loaded(x), out)


def test_a_swap_run_again_with_other_settings_does_what_it_says_or_says_why_not():
    """quantize_(mode="w8a16") on w8a8 layers, and share_weights_(bits=2) on 4-bit ones, left
    them as they were without a word; a 2:4 pass over a pruned layer kept its repr saying
    'unstructured'."""
    x = torch.randn(5, 45)
    model = fastkd.quantize_(_model(), mode="w8a8")
    fastkd.quantize_(model, mode="w8a16")
    assert {m.mode for m in model if isinstance(m, Int8Linear)} == {"w8a16"}
    fresh = fastkd.quantize_(_model(), mode="w8a16")
    torch.testing.assert_close(model(x), fresh(x), rtol=0, atol=0)  # the same codes

    model = _model()
    fastkd.share_weights_(model, bits=4)
    with pytest.warns(UserWarning, match="decompress_ them and share again for bits=2"):
        report = fastkd.share_weights_(model, bits=2)
    assert report["layers"] == {} and {m.bits for m in model if isinstance(m, SharedLinear)} == {4}

    model = _pruned(sparsity=0.5, dims=(44, 68, 32, 12))
    fastkd.sparsify_(model, None, pattern="2:4")
    assert "pattern='unstructured then 2:4'" in repr(model[0])


@pytest.mark.parametrize("step", ["quantize_", "share_weights_"])
@pytest.mark.parametrize("rejected", ["a.0", "b.0"])
def test_a_filter_rejecting_one_name_of_a_shared_layer_leaves_it_whole(step, rejected):
    """quantize_ asked filter_fn per name and swapped a shared layer only where it said yes: an
    int8 and a float copy, untied, without a word; share_weights_ asked under the first name
    only. Now: one answer per layer (every name must be accepted), and a warning."""
    model = _SharedBlock()
    x = torch.randn(3, 16)
    out = model(x)
    with pytest.warns(UserWarning, match="registered under"):
        getattr(fastkd, step)(model, filter_fn=lambda m, name: name != rejected)
    _one_layer(model, nn.Linear)
    torch.testing.assert_close(model(x), out, rtol=0, atol=0)
    # a filter accepting every name compresses it, once, under both
    getattr(fastkd, step)(model, filter_fn=lambda m, name: name in ("a.0", "b.0"))
    _one_layer(model, Int8Linear if step == "quantize_" else SharedLinear)
