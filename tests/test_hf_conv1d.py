"""What the model-wide swaps accept. Hugging Face Conv1D (GPT-2's attention and MLP projections:
y = x @ W + b, W stored (in, out)) is a linear layer to every fastkd swap: quantize_, sparsify_,
share_weights_, the from_linear constructors (including a torch.nn.utils.prune mask), shrink_ and
compressed checkpoints. Weights on the meta device get a clear error where values are needed."""

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import fastkd
from fastkd.nn import Int8Linear, MaskedLinear, SharedLinear

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

from _util import near_lossless_swaps  # noqa: E402


def _gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=48, vocab_size=97, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _conv1d(n_in=37, n_out=29, seed=1):
    torch.manual_seed(seed)
    conv = Conv1D(n_out, n_in)
    nn.init.normal_(conv.weight, std=0.2)
    nn.init.normal_(conv.bias, std=0.1)
    return conv


def _linear_of(conv):
    """The nn.Linear that computes what conv computes, built independently of fastkd."""
    lin = nn.Linear(conv.weight.shape[0], conv.weight.shape[1])
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
        lin.bias.copy_(conv.bias)
    return lin


@pytest.mark.parametrize("make", [
    lambda m: Int8Linear.from_linear(m, mode="w8a8"),
    lambda m: Int8Linear.from_linear(m, mode="w8a16"),
    lambda m: MaskedLinear.from_linear(m, sparsity=0.5),
    lambda m: MaskedLinear.from_linear(m, pattern="2:4"),
    lambda m: SharedLinear.from_linear(m, bits=4, per_channel=True),
])
def test_from_linear_takes_conv1d_as_its_linear(make):
    conv = _conv1d(n_in=40)
    x = torch.randn(5, 3, 40)
    from_conv, from_linear = make(conv), make(_linear_of(conv))
    assert (from_conv.in_features, from_conv.out_features) == (40, 29)
    for (name, a), (_, b) in zip(from_conv.state_dict().items(), from_linear.state_dict().items()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        assert torch.equal(from_conv(x), from_linear(x))
    assert conv.weight.shape == (40, 29)  # the source layer is left as it was


def test_masked_linear_picks_up_a_torch_prune_mask_of_a_conv1d():
    conv = _conv1d()
    prune.l1_unstructured(conv, "weight", amount=0.6)
    masked = MaskedLinear.from_linear(conv)
    assert torch.equal(masked.mask, conv.weight_mask.t().bool())
    assert masked.pattern == "torch.nn.utils.prune"
    x = torch.randn(6, 37)
    with torch.no_grad():
        torch.testing.assert_close(masked(x), conv(x), rtol=1e-5, atol=1e-5)


def test_quantized_and_shared_layers_of_a_torch_pruned_conv1d_keep_its_pruning():
    # a pruned nn.Linear's .weight is torch's masked weight; a pruned Conv1D's copy handed the
    # quantizers its dense weight_orig (outputs ~27% off the pruned layer, pruned entries coded)
    x = torch.randn(6, 37)
    for make in (lambda c: Int8Linear.from_linear(c, mode="w8a16"),
                 lambda c: Int8Linear.from_linear(c, mode="w8a16", input_moment=x.T @ x / 6),
                 lambda c: SharedLinear.from_linear(c, bits=8, iters=5)):
        conv = _conv1d()
        prune.l1_unstructured(conv, "weight", amount=0.6)
        layer = make(conv)
        w = layer.dequantized_weight()
        assert (w[conv.weight_mask.t() == 0] == 0).all()
        with torch.no_grad():
            ref = conv(x)
            assert ((layer(x) - ref).norm() / ref.norm()).item() < 0.02


def test_from_linear_rejects_other_layers():
    for cls in (Int8Linear, MaskedLinear, SharedLinear):
        with pytest.raises(TypeError, match="nn.Linear, a Hugging Face Conv1D or a fastkd MaskedLinear"):
            cls.from_linear(nn.Conv1d(4, 4, 1))


@pytest.mark.filterwarnings("ignore:.*tied embeddings")  # the tied lm_head (test_compose.py)
@pytest.mark.parametrize("swap, kind", near_lossless_swaps())
def test_model_swaps_reach_gpt2s_conv1d_layers(swap, kind):
    model = _gpt2()
    n_conv = sum(isinstance(m, Conv1D) for m in model.modules())
    assert n_conv == 8  # 2 blocks x (c_attn, c_proj, mlp.c_fc, mlp.c_proj)
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        ref = model(ids).logits
    swapped = copy.deepcopy(model)
    swap(swapped)
    assert not any(isinstance(m, Conv1D) for m in swapped.modules())
    assert sum(type(m) is kind for m in swapped.modules()) >= n_conv
    with torch.no_grad():
        out = swapped(ids).logits
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1), dim=-1)
    assert cos.min() > 0.999, cos
    if kind is MaskedLinear:  # sparsity 0 keeps every weight: the same function up to rounding
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_compressed_checkpoint_of_gpt2_round_trips(tmp_path):
    model = _gpt2(seed=3)
    fastkd.sparsify_(model, sparsity=0.5, filter_fn=lambda m, n: "mlp.c_fc" in n)
    fastkd.share_weights_(model, bits=4, filter_fn=lambda m, n: "attn.c_proj" in n)
    fastkd.quantize_(model, mode="w8a8", filter_fn=lambda m, n: "attn.c_attn" in n)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        ref = model(ids).logits
    fastkd.save_compressed(model, tmp_path / "gpt2")
    skeleton = _gpt2(seed=4)
    fastkd.load_compressed(skeleton, tmp_path / "gpt2")
    kinds = {type(skeleton.get_submodule(f"transformer.h.0.{p}")) for p in
             ("mlp.c_fc", "attn.c_proj", "attn.c_attn", "mlp.c_proj")}
    assert kinds == {MaskedLinear, SharedLinear, Int8Linear, Conv1D}
    with torch.no_grad():
        assert torch.equal(skeleton(ids).logits, ref)


def test_share_weights_leaves_multihead_attention_out_proj_alone():
    # nn.MultiheadAttention reads out_proj.weight itself: whatever the filter says, that
    # nn.Linear subclass must stay a float linear (quantize_ and sparsify_ already skip it).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16))
    model.attn = nn.MultiheadAttention(16, 2, batch_first=True)
    fastkd.share_weights_(model, bits=4, filter_fn=lambda m, n: True)
    assert type(model[0]) is SharedLinear
    assert type(model.attn.out_proj) is not SharedLinear
    x = torch.randn(2, 5, 16)
    out, _ = model.attn(x, x, x)
    assert torch.isfinite(out).all()


def test_shrink_removes_dead_gpt2_mlp_neurons_and_the_checkpoint_round_trips(tmp_path):
    model = _gpt2(seed=5)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        fc0 = model.transformer.h[0].mlp.c_fc  # (48, 192): output neurons are columns
        keep = fastkd.structured_mask(fc0.weight.t(), 0.4, dim=0)[:, 0]
        fc0.weight.mul_(keep[None, :])
        fc0.bias.mul_(keep)  # GELU(0) = 0: these neurons are always 0
        proj1 = model.transformer.h[1].mlp.c_proj  # (192, 48): input neurons are rows
        proj1.weight[:50] = 0  # these neurons reach nothing
        masked = model(ids).logits
    report = fastkd.shrink_(model)
    widths = {where: (before, after) for where, before, after in report}
    assert widths == {"transformer.h.0.mlp.c_fc/c_proj": (192, 192 - int((~keep).sum())),
                      "transformer.h.1.mlp.c_fc/c_proj": (192, 142)}
    assert model.transformer.h[0].mlp.c_fc.weight.shape == (48, 192 - int((~keep).sum()))
    assert model.transformer.h[1].mlp.c_proj.weight.shape == (142, 48)
    with torch.no_grad():
        shrunk = model(ids).logits
    torch.testing.assert_close(shrunk, masked, rtol=1e-5, atol=1e-5)
    fastkd.quantize_(model, filter_fn=lambda m, n: n == "transformer.h.1.mlp.c_fc")
    with torch.no_grad():
        ref = model(ids).logits
    fastkd.save_compressed(model, tmp_path / "shrunk")
    skeleton = _gpt2(seed=6)  # full size
    fastkd.load_compressed(skeleton, tmp_path / "shrunk")
    with torch.no_grad():
        assert torch.equal(skeleton(ids).logits, ref)


def test_weights_on_the_meta_device_get_a_clear_error():
    # masks and codebooks are computed from the weights' values; int8 layers can be made on meta
    meta = nn.Sequential(nn.Linear(16, 8, device="meta"))
    with pytest.raises(ValueError, match="meta device"):
        fastkd.sparsify_(meta, sparsity=0.5)
    with pytest.raises(ValueError, match="meta device"):
        fastkd.share_weights_(meta, bits=4)
    fastkd.quantize_(meta)  # shapes only: fine on meta, filled by load_state_dict later
    assert type(meta[0]) is Int8Linear and meta[0].weight.is_meta


def test_shrink_removes_dead_gpt2_heads_and_the_checkpoint_round_trips(tmp_path):
    model = _gpt2(seed=7)  # 2 heads of 24 per block
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        attn0 = model.transformer.h[0].attn
        attn0.c_attn.weight[:, 96 + 24:] = 0  # head 1's value columns (v = columns 96..143)
        attn0.c_attn.bias[96 + 24:] = 0
        model.transformer.h[1].attn.c_proj.weight[:24] = 0  # head 0 reaches nothing
        masked = model(ids).logits
    report = fastkd.shrink_(model)
    heads = {where: (before, after) for where, before, after in report if "heads" in where}
    assert heads == {"transformer.h.0.attn.heads": (2, 1), "transformer.h.1.attn.heads": (2, 1)}
    attn0 = model.transformer.h[0].attn
    assert attn0.c_attn.weight.shape == (48, 72) and attn0.c_proj.weight.shape == (24, 48)
    assert (attn0.num_heads, attn0.split_size) == (1, 24)
    with torch.no_grad():
        shrunk = model(ids).logits
        torch.testing.assert_close(shrunk, masked, rtol=1e-5, atol=1e-5)
        generated = model.generate(ids, max_new_tokens=3, do_sample=False,
                                   attention_mask=torch.ones_like(ids), pad_token_id=0)
    assert generated.shape == (2, 12)  # the cache copes with per-layer head counts
    fastkd.save_compressed(model, tmp_path / "heads")
    skeleton = _gpt2(seed=8)
    fastkd.load_compressed(skeleton, tmp_path / "heads")
    with torch.no_grad():
        assert torch.equal(skeleton(ids).logits, shrunk)
