"""nn.Linear subclasses. One that holds only weight and bias and computes x W^T + b (Falcon's
FalconLinear, which does it as x @ W.T + b) is a linear to every fastkd swap, to shrink_ and to
compressed checkpoints, and comes back as its own class from fold_masks_ / decompress_. One that
computes something else (an MoE router returning its top-k), keeps state of its own, or whose
parent reads its weight (nn.MultiheadAttention's out_proj) is left alone."""

import copy

import pytest
import torch
from torch import nn

import fastkd
from fastkd.nn import MaskedLinear
from fastkd.nn._linear_like import computes_linear
from fastkd.structured import structured_mask

from _util import near_lossless_swaps

transformers = pytest.importorskip("transformers")
FalconLinear = pytest.importorskip("transformers.models.falcon.modeling_falcon").FalconLinear


class _MatmulLinear(nn.Linear):  # what FalconLinear does, without transformers
    def forward(self, x):
        y = x @ self.weight.T
        return y if self.bias is None else y + self.bias


class _Router(nn.Linear):  # an MoE router: scores, then the top-2 choices
    def forward(self, x):
        return torch.topk(super().forward(x), 2, dim=-1)


class _Scaled(nn.Linear):  # same state, another map
    def forward(self, x):
        return 2 * super().forward(x)


class _WithBuffer(nn.Linear):  # per-output state a compressed layer would drop
    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.register_buffer("gain", torch.ones(self.out_features))

    def forward(self, x):
        return super().forward(x) * self.gain


class _Initialised(nn.Linear):  # another initialisation, nn.Linear's forward
    def reset_parameters(self):
        nn.init.normal_(self.weight, std=0.02)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


def test_computes_linear_tells_the_product_from_other_maps():
    torch.manual_seed(0)
    assert computes_linear(_MatmulLinear(37, 29)) and computes_linear(_MatmulLinear(5, 3, False))
    assert computes_linear(FalconLinear(37, 29))
    assert computes_linear(_Initialised(11, 7))
    assert computes_linear(_MatmulLinear(37, 29, dtype=torch.bfloat16))
    assert not computes_linear(nn.Linear(4, 4))  # not a subclass: replaceable on its own
    assert not computes_linear(_Router(16, 5))
    assert not computes_linear(_Scaled(16, 5))
    assert not computes_linear(_WithBuffer(16, 5))
    assert not computes_linear(nn.MultiheadAttention(16, 2).out_proj)
    assert not computes_linear(_MatmulLinear(8, 8, device="meta"))  # cannot be run


def _model():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.up = _MatmulLinear(24, 37)
    model.act = nn.GELU()
    model.down = _MatmulLinear(37, 19, bias=False)
    model.router = _Router(19, 5)
    model.other = _WithBuffer(19, 7)
    return model.eval()


@pytest.mark.parametrize("swap, kind", near_lossless_swaps())
def test_swaps_take_subclasses_that_compute_the_product_and_nothing_else(swap, kind):
    model = _model()
    swap(model)
    assert type(model.up) is kind and type(model.down) is kind
    assert type(model.router) is _Router and type(model.other) is _WithBuffer


def _falcon(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = transformers.FalconConfig(vocab_size=61, hidden_size=24, num_attention_heads=4,
                                    num_hidden_layers=2, ffn_hidden_size=37, bias=True, **kw)
    return transformers.FalconForCausalLM(cfg).eval()


def _n_falcon_linear(model):
    return sum(type(m) is FalconLinear for m in model.modules())


@pytest.mark.filterwarnings("ignore:.*tied embeddings")  # the tied lm_head (test_compose.py)
@pytest.mark.parametrize("swap, kind", near_lossless_swaps("w8a8"))
def test_model_swaps_reach_falcons_layers(swap, kind):
    # They left all eight FalconLinear layers as they were, silently, and swapped the lm_head.
    model = _falcon()
    assert _n_falcon_linear(model) == 8  # 2 blocks x (query_key_value, dense, h_to_4h, 4h_to_h)
    ids = torch.randint(0, 61, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    swap(model)
    assert _n_falcon_linear(model) == 0
    assert sum(type(m) is kind for m in model.modules()) >= 8
    with torch.no_grad():
        out = model(ids).logits
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1), dim=-1)
    assert cos.min() > 0.999, cos
    if kind is MaskedLinear:
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore:.*tied embeddings")
def test_falcon_ships_back_as_falcon_layers(tmp_path):
    """sparsify_ / quantize_ / share_weights_, a compressed checkpoint loaded into a fresh
    Falcon, then fold_masks_ and decompress_: FalconLinear layers again, whose state_dict a plain
    Falcon loads strictly and which compute what the compressed model did."""
    model = _falcon()
    fastkd.sparsify_(model, sparsity=0.5, filter_fn=lambda m, n: "dense_h_to_4h" in n)
    fastkd.quantize_(model, mode="w8a8", filter_fn=lambda m, n: "query_key_value" in n)
    fastkd.share_weights_(model, bits=4, filter_fn=lambda m, n: "dense_4h_to_h" in n)
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids).logits
    fastkd.save_compressed(model, tmp_path / "falcon")
    loaded = fastkd.load_compressed(_falcon(seed=5), tmp_path / "falcon")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref)
    fastkd.fold_masks_(loaded)
    fastkd.decompress_(loaded)
    block = loaded.transformer.h[0]
    for layer in (block.mlp.dense_h_to_4h, block.self_attention.query_key_value,
                  block.mlp.dense_4h_to_h, block.self_attention.dense):
        assert type(layer) is FalconLinear
    plain = _falcon(seed=6)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    with torch.no_grad():
        out = plain(ids).logits
        assert torch.equal(out, loaded(ids).logits)
    # decompressed W8A8 layers no longer quantize their activations: close, not equal
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1), dim=-1)
    assert cos.min() > 0.999, cos


def test_shrink_slices_falcon_mlps_and_they_stay_falcon_layers(tmp_path):
    model = _falcon()
    with torch.no_grad():
        for block in model.transformer.h:
            w = block.mlp.dense_4h_to_h.weight
            w.mul_(structured_mask(w, 0.4, dim=1))
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids).logits
    before = sum(p.numel() for p in model.parameters())
    report = fastkd.shrink_(model)
    assert [r[1:] for r in report] == [(37, 22), (37, 22)]
    assert sum(p.numel() for p in model.parameters()) < before
    for block in model.transformer.h:
        assert type(block.mlp.dense_h_to_4h) is FalconLinear
        assert block.mlp.dense_h_to_4h.out_features == 22
        assert block.mlp.dense_4h_to_h.in_features == 22
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)
    fastkd.save_compressed(model, tmp_path / "shrunk")
    skeleton = fastkd.load_compressed(_falcon(seed=7), tmp_path / "shrunk")
    assert type(skeleton.transformer.h[1].mlp.dense_4h_to_h) is FalconLinear
    with torch.no_grad():
        assert torch.equal(skeleton(ids).logits, model(ids).logits)


def test_shrink_leaves_a_subclass_that_computes_something_else():
    torch.manual_seed(0)
    seq = nn.Sequential(_Scaled(6, 12), nn.ReLU(), nn.Linear(12, 6))
    with torch.no_grad():
        seq[2].weight[:, :5] = 0
    with pytest.warns(UserWarning, match="removed nothing"):
        assert fastkd.shrink_(seq) == []
    assert seq[0].out_features == 12 and type(seq[0]) is _Scaled


def test_a_subclass_copy_keeps_its_class_through_deepcopy_and_torch_save(tmp_path):
    model = _model()
    fastkd.sparsify_(model, sparsity=0.5, filter_fn=lambda m, n: n == "up")
    clone = copy.deepcopy(model)
    torch.save(clone, tmp_path / "m.pt")
    back = torch.load(tmp_path / "m.pt", weights_only=False)
    fastkd.fold_masks_(back)
    assert type(back.up) is _MatmulLinear
    x = torch.randn(3, 24)
    with torch.no_grad():
        torch.testing.assert_close(back.up(x), model.up(x))


def test_the_forward_check_runs_once_per_layer_and_weight():
    # shrink_ asks about a layer once per pattern it tries: each ask ran a forward
    calls = []

    class Counting(_MatmulLinear):
        def forward(self, x):
            calls.append(1)
            return super().forward(x)

    layer = Counting(16, 8)
    assert computes_linear(layer) and computes_linear(layer)
    assert len(calls) == 1
    layer.weight = nn.Parameter(torch.randn(8, 16))  # a new weight: asked again
    assert computes_linear(layer)
    assert len(calls) == 2
