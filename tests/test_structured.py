"""Structured masks and shrink_: the shrunk model is smaller and computes the same outputs."""

import warnings

import pytest
import torch
from torch import nn

from fastkd.structured import shrink_, structured_mask


def _odd_weight(out=13, inp=21, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g)


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_structured_mask_drops_smallest_norm_slices(dim, sparsity):
    w = _odd_weight()
    mask = structured_mask(w, sparsity, dim=dim)
    assert mask.shape == w.shape and mask.dtype == torch.bool
    n = w.shape[dim]
    keep = mask.all(dim=1 - dim)
    # whole slices: every slice is all kept or all dropped
    assert torch.equal(keep, mask.any(dim=1 - dim))
    assert int((~keep).sum()) == round(sparsity * n)
    norms = w.norm(dim=1 - dim)
    if 0 < int((~keep).sum()) < n:
        assert norms[~keep].max() <= norms[keep].min()


def test_structured_mask_takes_numpy_numbers():
    np = pytest.importorskip("numpy")
    w = _odd_weight()
    assert torch.equal(structured_mask(w, np.float32(0.3)), structured_mask(w, 0.3))


def test_structured_mask_ties_are_deterministic():
    w = torch.ones(6, 4)
    m = structured_mask(w, 0.5, dim=0)
    assert m[:3].logical_not().all() and m[3:].all()


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        (dict(weight=torch.randn(3), sparsity=0.5), ValueError),
        (dict(weight=torch.randn(3, 4), sparsity=1.0), ValueError),
        (dict(weight=torch.randn(3, 4), sparsity=-0.1), ValueError),
        (dict(weight=torch.randn(3, 4), sparsity="a"), TypeError),
        (dict(weight=torch.randn(3, 4), sparsity=0.5, dim=2), ValueError),
        (dict(weight=torch.ones(3, 4, dtype=torch.int32), sparsity=0.5), TypeError),
        (dict(weight=torch.tensor([[float("nan"), 1.0]]), sparsity=0.5), ValueError),
        (dict(weight=[[1.0]], sparsity=0.5), TypeError),
    ],
)
def test_structured_mask_bad_inputs(kwargs, exc):
    with pytest.raises(exc):
        structured_mask(**kwargs)


def _mask_(linear, sparsity, dim):
    with torch.no_grad():
        m = structured_mask(linear.weight, sparsity, dim=dim)
        linear.weight.mul_(m)
        if dim == 0 and linear.bias is not None:
            linear.bias.mul_(m[:, 0])


@pytest.mark.parametrize("dim", [0, 1])
def test_shrink_sequential_mlp(dim):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(11, 37), nn.GELU(), nn.Dropout(0.1), nn.Linear(37, 29), nn.ReLU(),
        nn.Linear(29, 5),
    ).eval()
    # dim=0 prunes producers' rows, dim=1 the consumers' columns; either proves neurons dead
    _mask_(model[0] if dim == 0 else model[3], 0.4, dim)
    _mask_(model[3] if dim == 0 else model[5], 0.5, dim)
    x = torch.randn(7, 11)
    ref = model(x)
    report = shrink_(model)
    assert model[0].out_features == 37 - round(0.4 * 37) and model[3].in_features == 37 - 15
    assert model[3].out_features == 29 - round(0.5 * 29) and model[5].in_features == 29 - 14
    assert len(report) == 2
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)


def test_shrink_leaves_unprovable_pairs_alone():
    torch.manual_seed(0)
    # Sigmoid(0) = 0.5: zero producer rows still feed the next layer a constant; with no bias
    # in the consumer to fold it into, nothing may go.
    model = nn.Sequential(nn.Linear(8, 16), nn.Sigmoid(), nn.Linear(16, 3, bias=False))
    _mask_(model[0], 0.5, 0)
    x = torch.randn(4, 8)
    ref = model(x)
    with pytest.warns(UserWarning, match="could not prove removable"):
        assert shrink_(model) == []
    assert model[0].out_features == 16
    torch.testing.assert_close(model(x), ref)
    # with a bias there, the constant 0.5 * column goes into it and the neurons go
    model = nn.Sequential(nn.Linear(8, 16), nn.Sigmoid(), nn.Linear(16, 3))
    _mask_(model[0], 0.5, 0)
    ref = model(x)
    assert shrink_(model) == [("0->2", 16, 8)]
    torch.testing.assert_close(model(x), ref)
    # LayerNorm between the two linears mixes neurons: not connected elementwise
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 3))
    _mask_(model[2], 0.5, 1)
    ref = model(x)
    with pytest.warns(UserWarning, match="removed nothing"):
        assert shrink_(model) == []
    assert model[2].in_features == 16
    torch.testing.assert_close(model(x), ref)
    with pytest.raises(TypeError):
        shrink_("not a model")


transformers = pytest.importorskip("transformers")


def _tiny_bert():
    cfg = transformers.BertConfig(
        hidden_size=24, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        vocab_size=53, max_position_embeddings=16, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


def _tiny_llama():
    cfg = transformers.LlamaConfig(
        hidden_size=24, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=3,
        intermediate_size=37, vocab_size=53, max_position_embeddings=16, head_dim=4,
    )
    torch.manual_seed(0)
    return transformers.LlamaModel(cfg).eval()


def test_shrink_bert_mlp_and_heads():
    model = _tiny_bert()
    ids = torch.randint(0, 53, (2, 9))
    for layer in model.encoder.layer:
        _mask_(layer.intermediate.dense, 0.5, 0)
        # kill head 1 via its value rows, head 3 via the output projection's columns
        sa, o = layer.attention.self, layer.attention.output.dense
        hd = sa.attention_head_size
        with torch.no_grad():
            sa.value.weight[hd : 2 * hd] = 0
            sa.value.bias[hd : 2 * hd] = 0
            o.weight[:, 3 * hd : 4 * hd] = 0
    with torch.no_grad():
        ref = model(ids).last_hidden_state
    n_before = sum(p.numel() for p in model.parameters())
    shrink_(model)
    for layer in model.encoder.layer:
        assert layer.intermediate.dense.out_features == 37 - 18
        assert layer.output.dense.in_features == 37 - 18
        assert layer.attention.self.query.out_features == 2 * 6
        assert layer.attention.output.dense.in_features == 2 * 6
    assert sum(p.numel() for p in model.parameters()) < n_before
    with torch.no_grad():
        out = model(ids).last_hidden_state
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_shrink_llama_gated_mlp_and_kv_groups():
    model = _tiny_llama()
    ids = torch.randint(0, 53, (2, 9))
    for i, layer in enumerate(model.layers):
        # layer 0: prune through gate rows (silu(0)=0); layer 1: through down's columns
        if i == 0:
            _mask_(layer.mlp.gate_proj, 0.3, 0)
        else:
            _mask_(layer.mlp.down_proj, 0.6, 1)
        attn = layer.self_attn
        with torch.no_grad():
            attn.v_proj.weight[4:8] = 0  # key/value group 1 (query heads 2, 3) is dead
    with torch.no_grad():
        ref = model(ids).last_hidden_state
    shrink_(model)
    assert model.layers[0].mlp.gate_proj.out_features == 37 - round(0.3 * 37)
    assert model.layers[1].mlp.down_proj.in_features == 37 - round(0.6 * 37)
    for layer in model.layers:
        assert layer.self_attn.k_proj.out_features == 2 * 4
        assert layer.self_attn.q_proj.out_features == 4 * 4
        assert layer.self_attn.o_proj.in_features == 4 * 4
    with torch.no_grad():
        out = model(ids).last_hidden_state
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def _dead_group_and_neurons(model):
    """Kill key/value group 0 (its value rows) and 16 MLP neurons (their up rows) of layer 0."""
    layer = model.layers[0]
    with torch.no_grad():
        layer.self_attn.v_proj.weight[:8] = 0
        if layer.self_attn.v_proj.bias is not None:
            layer.self_attn.v_proj.bias[:8] = 0
        if hasattr(layer.mlp, "up_proj"):  # gpt-oss's is a mixture of experts
            layer.mlp.up_proj.weight[:16] = 0


@pytest.mark.parametrize("arch,extra,shrinks", [
    ("llama", {}, True),
    ("qwen3", {}, True),  # per-head q/k norms (of head_dim): the groups go
    ("olmo2", {}, False),  # q/k norms over all heads' width
    ("cohere", {"use_qk_norm": True}, False),  # norms with a weight per head
    ("gpt_oss", {"num_local_experts": 2, "num_experts_per_tok": 1}, False),  # a sink per head
])
def test_grouped_query_attention_is_shrunk_only_where_running_it_agrees(arch, extra, shrinks):
    """Key/value groups were sliced by the projections' names without running the module: the
    attentions whose norms or sinks hold per-head state crashed in forward afterwards."""
    cfg = transformers.AutoConfig.for_model(
        arch, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, vocab_size=53, pad_token_id=0, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(cfg).eval()
    _dead_group_and_neurons(model)
    ids = torch.randint(3, 50, (2, 7))
    with torch.no_grad():
        ref = model(input_ids=ids).last_hidden_state
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "left as they were"
        report = shrink_(model)
    assert (("layers.0.self_attn.kv_groups", 2, 1) in report) == shrinks
    with torch.no_grad():
        out = model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_gated_mlp_with_llama_names_is_checked_by_running_it():
    """Gemma3n's MLP has LLaMA's names but sparsifies its activations by a cut-off from the
    mean and spread of all its neurons: removing dead ones changed its output by ~8%,
    silently, before LLaMA-named MLPs were run to check."""
    from transformers.models.gemma3n.configuration_gemma3n import Gemma3nTextConfig
    from transformers.models.gemma3n.modeling_gemma3n import Gemma3nTextMLP

    torch.manual_seed(0)
    cfg = Gemma3nTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            activation_sparsity_pattern=[0.95])
    mlp = Gemma3nTextMLP(cfg, 0).eval()
    with torch.no_grad():
        mlp.up_proj.weight[:16] = 0
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        ref = mlp(x)
    with pytest.warns(UserWarning, match="changed the module's output"):
        with pytest.warns(UserWarning, match="removed nothing"):
            assert shrink_(mlp) == []
    assert mlp.up_proj.out_features == 64
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), ref)


@pytest.mark.parametrize("arch", ["nystromformer", "layoutlmv3", "bert"])
def test_bert_named_attention_is_shrunk_only_where_that_is_safe(arch):
    """BERT's attention names, matched alone: Nystromformer's grouped convolution (and Swin-v2's
    per-head scales) keep every head, LayoutLMv3 gets per-head biases made outside the module;
    their forward crashed after the heads went."""
    T = transformers
    ids = torch.randint(5, 50, (1, 8))
    inputs = dict(input_ids=ids)
    small = dict(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=4,
                 intermediate_size=32)
    if arch == "nystromformer":
        model = T.NystromformerModel(T.NystromformerConfig(
            **small, num_landmarks=8, segment_means_seq_len=8, conv_kernel_size=3,
            max_position_embeddings=40))
    elif arch == "layoutlmv3":
        model = T.LayoutLMv3Model(T.LayoutLMv3Config(
            **small, visual_embed=False, max_2d_position_embeddings=64, coordinate_size=3,
            shape_size=2, max_position_embeddings=32))
        inputs["bbox"] = torch.zeros(1, 8, 4, dtype=torch.long)
    else:
        model = T.BertModel(T.BertConfig(**small))
    model.eval()
    sa = model.encoder.layer[0].attention.self
    with torch.no_grad():  # head 0 dead
        sa.value.weight[:4] = 0
        sa.value.bias[:4] = 0
    with torch.no_grad():
        ref = model(**inputs).last_hidden_state
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = shrink_(model)
    assert (("encoder.layer.0.attention.heads", 4, 3) in report) == (arch == "bert")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).last_hidden_state, ref, rtol=1e-5, atol=1e-5)


def test_bert_mlp_folds_constant_neurons_only_in_eval_mode():
    """In training mode a dropout after the activation (Timesformer's) would drop what folding
    moves into the next bias: the BERT-named MLP folded anyway."""
    torch.manual_seed(0)
    model = _tiny_bert().train()
    inter = model.encoder.layer[0].intermediate
    with torch.no_grad():
        inter.dense.weight[:10] = 0  # row-pruned neurons with live biases: constants
        inter.dense.bias[:10] = 0.5
    report = shrink_(model)
    assert not any("intermediate" in where for where, *_ in report)
    model.eval()
    assert shrink_(model)[0][1:] == (37, 27)


def test_size_report_of_a_model_on_the_meta_device():
    """Meta tensors all sit at address 0: the dedup by address counted same-sized tensors
    once."""
    from fastkd.checkpoint import size_report

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 4), nn.Linear(8, 4), nn.Linear(4, 8))

    real = size_report(build())["total_bytes"]
    with torch.device("meta"):
        meta = build()
    assert size_report(meta)["total_bytes"] == real
    tied = build()
    tied[1].weight = tied[0].weight  # a tie still counts once
    assert size_report(tied)["total_bytes"] == real - 8 * 4 * 4


def test_frozen_biases_stay_frozen():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[2].weight[:, :4] = 0
    model.requires_grad_(False)
    model[0].weight.requires_grad_(True)
    assert shrink_(model)
    assert [p.requires_grad for p in model.parameters()] == [True, False, False, False]


# ---- masked layers (MaskedLinear) and neurons whose constant output is folded into the next bias


def _masked(linear, sparsity=None, structured=None):
    """MaskedLinear over `linear`: a structured (rows/cols) mask, optionally with unstructured
    pruning on top. The bias is left alone, as a masked layer does."""
    from fastkd.nn import MaskedLinear
    from fastkd.prune import magnitude_mask

    mask = torch.ones_like(linear.weight, dtype=torch.bool)
    if structured is not None:
        mask &= structured_mask(linear.weight, structured[0], dim=structured[1])
    if sparsity is not None:
        mask &= magnitude_mask(linear.weight, sparsity)
    return MaskedLinear.from_linear(linear, mask=mask)


def test_row_masked_neurons_with_live_biases_are_folded_and_removed():
    from fastkd.nn import MaskedLinear

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(11, 37), nn.GELU(), nn.Dropout(0.2), nn.Linear(37, 23),
                          nn.Tanh(), nn.Linear(23, 5)).eval()
    model[0] = _masked(model[0], structured=(0.4, 0))  # rows gone, biases still there
    model[3] = _masked(model[3], sparsity=0.3, structured=(0.5, 0))  # and unstructured pruning
    assert (model[0].bias != 0).all()
    x = torch.randn(7, 11)
    with torch.no_grad():
        ref = model(x)
    report = shrink_(model)
    assert report == [("0->3", 37, 37 - 15), ("3->5", 23, 23 - 12)]
    # purely structured: a plain Linear; with unstructured pruning left: still masked
    assert type(model[0]) is nn.Linear
    assert type(model[3]) is MaskedLinear and model[3].mask.shape == (11, 22)
    assert not model[3].mask.all()
    assert type(model[5]) is nn.Linear and model[5].in_features == 11
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)


def test_constant_neurons_stay_where_folding_would_change_the_model():
    torch.manual_seed(2)
    x = torch.randn(5, 9)
    # dropout in training mode draws a mask per call: a constant neuron is not constant
    model = nn.Sequential(nn.Linear(9, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3)).train()
    with torch.no_grad():
        model[0].bias.fill_(0.5)  # relu(0.5) != 0: not zero, only constant
    model[0] = _masked(model[0], structured=(0.5, 0))
    with pytest.warns(UserWarning, match="removed nothing"):
        assert shrink_(model) == []
    # a consumer without a bias has nowhere to put the constant
    model = nn.Sequential(nn.Linear(9, 16), nn.ReLU(), nn.Linear(16, 3, bias=False)).eval()
    with torch.no_grad():
        model[0].bias.fill_(0.5)
    model[0] = _masked(model[0], structured=(0.5, 0))
    with torch.no_grad():
        ref = model(x)
    with pytest.warns(UserWarning, match="removed nothing"):
        assert shrink_(model) == []
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref)


def test_bert_mlp_with_masked_layers_shrinks_and_the_checkpoint_round_trips(tmp_path):
    import fastkd

    model = _tiny_bert()
    ids = torch.randint(0, 53, (2, 9))
    for layer in model.encoder.layer:
        layer.intermediate.dense = _masked(layer.intermediate.dense, structured=(0.5, 0))
        layer.output.dense = _masked(layer.output.dense, sparsity=0.5)
    with torch.no_grad():
        ref = model(ids).last_hidden_state
    shrink_(model)
    for layer in model.encoder.layer:
        assert type(layer.intermediate.dense) is nn.Linear
        assert layer.intermediate.dense.out_features == 37 - 18
        assert layer.output.dense.mask.shape == (24, 37 - 18)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).last_hidden_state, ref, rtol=1e-5, atol=1e-5)
    fastkd.save_compressed(model, tmp_path / "bert")
    skeleton = fastkd.load_compressed(_tiny_bert(), tmp_path / "bert")
    with torch.no_grad():
        assert torch.equal(skeleton(ids).last_hidden_state, model(ids).last_hidden_state)


def test_gpt2_mlp_after_sparsify_shrinks():
    import fastkd
    from fastkd.nn import MaskedLinear

    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=24, vocab_size=53, n_positions=16,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(4)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    fastkd.sparsify_(model, sparsity=0.3, filter_fn=lambda m, n: ".mlp." in n)
    for block in model.transformer.h:
        fc = block.mlp.c_fc
        assert isinstance(fc, MaskedLinear)
        with torch.no_grad():  # prune 40 of its 96 neurons as whole rows (biases stay)
            fc.mask &= structured_mask(fc.weight, 40 / 96, dim=0)
    ids = torch.randint(0, 53, (2, 9))
    with torch.no_grad():
        ref = model(ids).logits
    report = shrink_(model)
    assert [r[1:] for r in report] == [(96, 56), (96, 56)]
    for block in model.transformer.h:
        assert block.mlp.c_fc.out_features == 56 and block.mlp.c_proj.in_features == 56
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pruned_side", ["c_fc", "c_proj"])
def test_gpt2_mlp_with_one_side_pruned_shrinks(pruned_side):
    """One of c_fc / c_proj a MaskedLinear, the other still a Conv1D (sparsify_ with a filter
    naming one of them): shrink_ removed nothing, with the 'removed nothing' warning."""
    import fastkd
    from fastkd.nn import MaskedLinear

    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=24, vocab_size=53, n_positions=16,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(4)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    fastkd.sparsify_(model, sparsity=0.3, filter_fn=lambda m, n: n.endswith(pruned_side))
    mlp = model.transformer.h[0].mlp
    layer = getattr(mlp, pruned_side)
    assert isinstance(layer, MaskedLinear)
    with torch.no_grad():  # 40 of the 96 hidden neurons go: c_fc's rows or c_proj's columns
        layer.mask &= structured_mask(layer.weight, 40 / 96, dim=0 if pruned_side == "c_fc" else 1)
        if pruned_side == "c_fc":
            layer.bias[~layer.mask.any(1)] = 0  # a dead neuron outputs act(0) = 0
    ids = torch.randint(0, 53, (2, 9))
    with torch.no_grad():
        ref = model(ids).logits
    report = shrink_(model)
    assert [r[1:] for r in report] == [(96, 56)]
    other = mlp.c_proj if pruned_side == "c_fc" else mlp.c_fc
    assert type(other).__name__ == "Conv1D"  # its own layout, narrower
    assert 56 in tuple(other.weight.shape)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)


# Tiny versions of architectures whose MLPs use other names; hidden 24, MLP width 37 (odd).
# (builder, input kwargs, where the MLP producers live)
def _hf_cases():
    T = transformers
    ids = torch.randint(3, 53, (2, 9), generator=torch.Generator().manual_seed(1))
    pix = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    s2s = {"input_ids": ids, "decoder_input_ids": ids[:, :5]}
    d = dict(hidden_size=24, num_attention_heads=4, intermediate_size=37, num_hidden_layers=2)
    bart = dict(vocab_size=53, d_model=24, encoder_attention_heads=4, decoder_attention_heads=4,
                encoder_ffn_dim=37, decoder_ffn_dim=37, encoder_layers=1, decoder_layers=1,
                pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
                max_position_embeddings=16)
    t5 = dict(vocab_size=53, d_model=24, d_kv=6, d_ff=37, num_layers=1, num_heads=4,
              decoder_start_token_id=0)
    return {
        "vit": (lambda: T.ViTModel(T.ViTConfig(image_size=16, patch_size=8, **d)),
                {"pixel_values": pix}, 3),
        "distilbert": (lambda: T.DistilBertModel(T.DistilBertConfig(
            vocab_size=53, dim=24, n_heads=4, hidden_dim=37, n_layers=2)), {"input_ids": ids}, 3),
        "gpt_neox": (lambda: T.GPTNeoXModel(T.GPTNeoXConfig(vocab_size=53, **d)),
                     {"input_ids": ids}, 3),
        "opt": (lambda: T.OPTModel(T.OPTConfig(
            vocab_size=53, hidden_size=24, num_attention_heads=4, ffn_dim=37, num_hidden_layers=2,
            word_embed_proj_dim=24, max_position_embeddings=16)), {"input_ids": ids}, 3),
        "gptj": (lambda: T.GPTJModel(T.GPTJConfig(vocab_size=53, n_embd=24, n_head=4, n_layer=2,
                                                  rotary_dim=4, n_inner=37)),
                 {"input_ids": ids}, 3),
        "bart": (lambda: T.BartModel(T.BartConfig(**bart)), s2s, 3),
        "t5": (lambda: T.T5Model(T.T5Config(**t5)), s2s, 3),
        "t5_gated": (lambda: T.T5Model(T.T5Config(**t5, feed_forward_proj="gated-gelu")), s2s, 3),
        # FalconLinear: an nn.Linear subclass (sliced where the result is checked by running)
        "falcon": (lambda: T.FalconModel(T.FalconConfig(
            vocab_size=53, hidden_size=24, num_attention_heads=4, ffn_hidden_size=37,
            num_hidden_layers=2, bias=True)), {"input_ids": ids}, 3),
        # MLPs whose forward also takes the residual (BLOOM, MPT); up_proj -> down_proj
        # without a gate (MPT, Nemotron); ModernBERT's packed Wi -> Wo
        "bloom": (lambda: T.BloomModel(T.BloomConfig(vocab_size=53, hidden_size=24, n_head=4,
                                                     n_layer=2)), {"input_ids": ids}, 3),
        "mpt": (lambda: T.MptModel(T.MptConfig(vocab_size=53, d_model=24, n_heads=4,
                                               n_layers=2)), {"input_ids": ids}, 3),
        "nemotron": (lambda: T.NemotronModel(T.NemotronConfig(
            vocab_size=53, num_key_value_heads=2, pad_token_id=0, **d)), {"input_ids": ids}, 3),
        "modernbert": (lambda: T.ModernBertModel(T.ModernBertConfig(
            vocab_size=53, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
            sep_token_id=2, **d)), {"input_ids": ids}, 3),
        "phi3": (lambda: T.Phi3Model(T.Phi3Config(vocab_size=53, num_key_value_heads=2,
                                                  pad_token_id=0, **d)),
                 {"input_ids": ids}, 3),
    }


def _prune_mlp_producers(model, fraction=0.4):
    """Zero whole rows of every MLP producer (biases left alone: row-masked neurons with live
    biases are constants that shrink_ must fold, not drop)."""
    names = ("fc1", "lin1", "dense_h_to_4h", "fc_in", "wi", "wi_0", "wi_1", "gate_up_proj",
             "up_proj", "Wi")
    n = 0
    with torch.no_grad():
        for name, lin in model.named_modules():
            if isinstance(lin, nn.Linear) and name.rsplit(".", 1)[-1] in names:
                lin.weight.mul_(structured_mask(lin.weight, fraction, dim=0))
                n += 1
    return n


@pytest.mark.parametrize("arch", sorted(_hf_cases()))
def test_shrink_mlps_of_other_architectures(arch, tmp_path):
    import warnings


    build, inputs, _ = _hf_cases()[arch]
    torch.manual_seed(0)
    model = build().eval()
    assert _prune_mlp_producers(model) > 0

    def out(m):
        return m(**inputs).last_hidden_state

    with torch.no_grad():
        ref = out(model)
    before = sum(p.numel() for p in model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no pattern may fall back to "left as it was" here
        report = shrink_(model)
    assert report, f"{arch}: nothing shrunk"
    assert all(after < before_w for _, before_w, after in report)
    assert sum(p.numel() for p in model.parameters()) < before
    with torch.no_grad():
        torch.testing.assert_close(out(model), ref, rtol=1e-5, atol=1e-5)
    _assert_loads_into_a_full_size_skeleton(model, build, out, tmp_path / arch)


def _assert_loads_into_a_full_size_skeleton(model, build, out, path):
    """The shrunk widths travel in the checkpoint: a freshly built full-size model takes them."""
    import fastkd

    fastkd.save_compressed(model, path)
    torch.manual_seed(1)
    skeleton = fastkd.load_compressed(build().eval(), path)
    with torch.no_grad():
        assert torch.equal(out(skeleton), out(model))


class _GluNamedLikeAnMlp(nn.Module):
    """fc1/fc2 names, but fc1's output is split GLU-style: neuron j of fc2 reads fc1's j and
    j + 8, so fc1's zero rows are not dead neurons of fc2 one to one."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 16), nn.Linear(8, 6)
        self.activation_fn = nn.GELU()

    def forward(self, x):
        a, b = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(self.activation_fn(a) * b)


def test_named_pattern_that_does_not_hold_is_put_back_with_a_warning():
    torch.manual_seed(0)
    mlp = _GluNamedLikeAnMlp().eval()
    with torch.no_grad():  # zero fc2's input columns 0..3: the pattern would drop fc1's rows 0..3
        mlp.fc2.weight[:, :4] = 0
    x = torch.randn(5, 6)
    ref = mlp(x)
    # fc1 (16 out) and fc2 (8 in) do not even pair by width: not matched; only the note that
    # dead neurons were left
    with pytest.warns(UserWarning, match="removed nothing"):
        assert shrink_(mlp) == []
    assert mlp.fc1.out_features == 16
    # widths that pair, with a forward that is not fc2(act(fc1(x))): matched, checked, undone
    mlp.fc2 = nn.Linear(16, 6)
    mlp.forward = lambda x: mlp.fc2(mlp.fc1(x).flip(-1))
    with torch.no_grad():
        mlp.fc2.weight[:, :5] = 0
    ref = mlp(x)
    with pytest.warns(UserWarning, match="changed the module's output"):
        with pytest.warns(UserWarning, match="removed nothing"):
            assert shrink_(mlp) == []
    assert mlp.fc1.out_features == 16 and mlp.fc2.in_features == 16
    torch.testing.assert_close(mlp(x), ref)


def test_shrink_says_when_it_finds_dead_neurons_it_cannot_remove():
    torch.manual_seed(0)

    class Block(nn.Module):  # no known names: nothing can be proven connected
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(6, 12), nn.Linear(12, 6)

        def forward(self, x):
            return self.down(torch.relu(self.up(x)))

    block = Block()
    _mask_(block.up, 0.5, 0)
    with pytest.warns(UserWarning, match="removed nothing: 1 linear"):
        assert shrink_(block) == []
    # a model without any dead neuron is not warned about
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert shrink_(Block()) == []


@pytest.mark.parametrize("arch", ["vit", "distilbert", "opt", "bart"])
def test_shrink_dead_heads_of_other_architectures(arch, tmp_path):

    build, inputs, _ = _hf_cases()[arch]
    torch.manual_seed(0)
    model = build().eval()
    n_attn = 0
    with torch.no_grad():  # head 1 of every attention module: value rows (and bias) zero
        for name, lin in model.named_modules():
            if name.rsplit(".", 1)[-1] in ("v_proj", "v_lin"):
                lin.weight[6:12] = 0
                lin.bias[6:12] = 0
                n_attn += 1
    assert n_attn > 0

    def out(m):
        return m(**inputs).last_hidden_state

    with torch.no_grad():
        ref = out(model)
    report = shrink_(model)
    heads = [r for r in report if r[0].endswith("heads")]
    assert len(heads) == n_attn and all(r[1:] == (4, 3) for r in heads)
    with torch.no_grad():
        torch.testing.assert_close(out(model), ref, rtol=1e-5, atol=1e-5)
    _assert_loads_into_a_full_size_skeleton(model, build, out, tmp_path / arch)


def test_named_mlp_folds_constant_neurons_only_in_eval_mode():
    # a row-pruned neuron with a live bias holds the constant act(bias): folding it into the next
    # bias is exact in eval mode, but a dropout between the layers that no module shows (BART's
    # functional activation_dropout) would have dropped it in training
    build, inputs, _ = _hf_cases()["vit"]
    torch.manual_seed(0)
    model = build()
    _prune_mlp_producers(model)
    with torch.no_grad():  # HF initialises biases to 0: give the pruned neurons live ones
        for layer in model.layers:
            layer.mlp.fc1.bias.uniform_(0.1, 0.2)
    model.train()
    with pytest.warns(UserWarning, match="removed nothing"):
        assert shrink_(model) == []  # every dead row has a live bias here
    model.eval()
    with torch.no_grad():
        ref = model(**inputs).last_hidden_state
    assert shrink_(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).last_hidden_state, ref, rtol=1e-5, atol=1e-5)


def test_dead_neurons_left_beside_removed_ones_are_named():
    """The warning about dead neurons shrink_ could not remove came only when it removed
    nothing; beside a pair it did shrink, they went unmentioned."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), nn.LayerNorm(8),
                          nn.Linear(8, 3))
    _mask_(model[0], 0.5, 0)  # removable: ReLU(0) = 0
    _mask_(model[4], 0.5, 1)  # behind a LayerNorm: not provably removable
    with pytest.warns(UserWarning, match=r"removed some, not all: 1 .*\(4\)"):
        assert shrink_(model) == [("0->2", 16, 8)]


def test_dead_expert_neurons_are_named_not_left_silently():
    """Dead neurons in a Mixture-of-Experts block's stacked experts: nothing removed (their
    width is one for all the experts) and nothing said."""
    T = transformers
    cfg = T.AutoConfig.for_model("mixtral", hidden_size=32, intermediate_size=40,
                                 num_hidden_layers=1, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=53, num_local_experts=2,
                                 num_experts_per_tok=1)
    torch.manual_seed(0)
    model = T.AutoModel.from_config(cfg).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing dead yet: nothing to say
        shrink_(model)
    experts = model.layers[0].mlp.experts
    with torch.no_grad():
        experts.down_proj[1, :, 3] = 0  # expert 1's intermediate neuron 3
    with pytest.warns(UserWarning, match="does not shrink Mixture-of-Experts"):
        assert shrink_(model) == []


@pytest.mark.parametrize("compress", ["quantize_", "share_weights_"])
def test_shrink_after_quantize_or_share_says_it_leaves_their_dead_neurons(compress):
    """shrink_ returned [] without a word on a model pruned and then quantized (or shared):
    it slices float and masked linears only."""
    import fastkd

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    _mask_(model[0], 0.5, 0)
    getattr(fastkd, compress)(model)
    with pytest.warns(UserWarning, match="before quantize_ / share_weights_"):
        assert shrink_(model) == []
    # and a compressed model without dead neurons gets no such warning
    clean = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    getattr(fastkd, compress)(clean)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert shrink_(clean) == []
