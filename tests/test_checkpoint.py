"""save_compressed / load_compressed (bit-exact in a fresh process) and size_report."""

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import fastkd
from fastkd.nn import SharedLinear


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(13, 21), nn.ReLU(), nn.Linear(21, 9), nn.LayerNorm(9),
                         nn.Linear(9, 3), nn.ReLU(), nn.Linear(3, 7))


def test_roundtrip_in_fresh_process(tmp_path):
    model = _model()
    fastkd.share_weights_(model, bits=4, filter_fn=lambda m, n: n == "0")
    fastkd.share_weights_(model, bits=6, per_channel=True, filter_fn=lambda m, n: n == "2")
    fastkd.quantize_(model, mode="w8a16", filter_fn=lambda m, n: n == "4")
    fastkd.sparsify_(model, sparsity=0.5, filter_fn=lambda m, n: n == "6")
    ckpt = tmp_path / "model.safetensors"
    header = fastkd.save_compressed(model, ckpt)
    assert set(header["layers"]) == {"0", "2", "4", "6"}
    assert header["layers"]["4"]["settings"]["mode"] == "w8a16"
    assert header["layers"]["2"]["settings"]["per_channel"] is True
    x = torch.randn(5, 13)
    torch.save(x, tmp_path / "x.pt")
    expected = model(x)
    script = textwrap.dedent(
        f"""
        import torch
        from torch import nn
        import fastkd
        torch.manual_seed(123)  # a different init: every tensor must come from the file
        skel = nn.Sequential(nn.Linear(13, 21), nn.ReLU(), nn.Linear(21, 9), nn.LayerNorm(9),
                             nn.Linear(9, 3), nn.ReLU(), nn.Linear(3, 7))
        fastkd.load_compressed(skel, {str(ckpt)!r})
        assert type(skel[0]).__name__ == "SharedLinear" and skel[0].bits == 4
        assert skel[2].per_channel and skel[2].bits == 6
        assert type(skel[4]).__name__ == "Int8Linear" and skel[4].weight.dtype == torch.int8
        assert type(skel[6]).__name__ == "MaskedLinear" and skel[6].mask.dtype == torch.bool
        assert int(skel[6].mask.sum()) == 11  # round(21 * 0.5) of 21 weights pruned
        torch.save(skel(torch.load({str(tmp_path / "x.pt")!r})), {str(tmp_path / "y.pt")!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    assert torch.equal(torch.load(tmp_path / "y.pt"), expected)


def test_smoothquant_factors_round_trip(tmp_path):
    model = _model()
    calib = [torch.randn(6, 13) * torch.linspace(0.1, 20.0, 13)]  # uneven channel ranges
    fastkd.quantize_(model, mode="w8a8", smooth=0.5, calibration=calib,
                     filter_fn=lambda m, n: n in ("0", "2"))
    header = fastkd.save_compressed(model, tmp_path / "m.safetensors")
    assert header["layers"]["0"]["settings"]["smooth"] is True
    torch.manual_seed(5)
    skel = nn.Sequential(nn.Linear(13, 21), nn.ReLU(), nn.Linear(21, 9), nn.LayerNorm(9),
                         nn.Linear(9, 3), nn.ReLU(), nn.Linear(3, 7))
    fastkd.load_compressed(skel, tmp_path / "m.safetensors")
    for i in (0, 2):
        assert torch.equal(skel[i].smooth_scale, model[i].smooth_scale)
        assert not torch.equal(model[i].smooth_scale, torch.ones_like(model[i].smooth_scale))
    x = torch.randn(4, 13)
    assert torch.equal(skel(x), model(x))


def test_bf16_model_loads_with_every_tensor_in_its_dtype(tmp_path):
    """A bf16 SharedLinear's bias came back fp32 (its settings had no dtype)."""
    model = _model().to(torch.bfloat16)
    fastkd.share_weights_(model, bits=4, filter_fn=lambda m, n: n == "0")
    fastkd.quantize_(model, mode="w8a16", filter_fn=lambda m, n: n == "2")
    fastkd.sparsify_(model, sparsity=0.5, filter_fn=lambda m, n: n == "4")
    fastkd.save_compressed(model, tmp_path / "model.safetensors")
    skeleton = _model().to(torch.bfloat16)
    fastkd.load_compressed(skeleton, tmp_path / "model.safetensors")
    saved, loaded = model.state_dict(), skeleton.state_dict()
    assert saved.keys() == loaded.keys()
    for key in saved:
        assert loaded[key].dtype == saved[key].dtype and torch.equal(loaded[key], saved[key]), key


def test_load_errors(tmp_path):
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="not a fastkd"):
        fastkd.load_compressed(_model(), plain)
    model = _model()
    fastkd.share_weights_(model, bits=4)
    ckpt = tmp_path / "m.safetensors"
    fastkd.save_compressed(model, ckpt)
    with pytest.raises(ValueError, match="no module"):
        fastkd.load_compressed(nn.Sequential(nn.Linear(13, 21)), ckpt)
    with pytest.raises(TypeError):
        fastkd.save_compressed("model", ckpt)


def test_size_report_counts_bytes_per_type():
    model = _model()
    before = fastkd.size_report(model)
    assert before["by_type"]["Linear"]["modules"] == 4
    assert before["total_bytes"] == sum(p.numel() * 4 for p in model.parameters())
    fastkd.share_weights_(model, bits=4)
    after = fastkd.size_report(model)
    assert "Linear" not in after["by_type"] and after["by_type"]["SharedLinear"]["modules"] == 4
    assert after["by_type"]["SharedLinear"]["bytes"] == sum(m.nbytes() for m in model
                                                             if isinstance(m, SharedLinear))
    assert after["total_bytes"] < before["total_bytes"]
    # tied weights are counted once
    tied = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    tied[1].weight = tied[0].weight
    assert fastkd.size_report(tied)["total_bytes"] == 64


_TINY = {
    "bert": "transformers.BertModel(transformers.BertConfig(hidden_size=24, num_hidden_layers=2, "
            "num_attention_heads=4, intermediate_size=37, vocab_size=53, "
            "max_position_embeddings=16, hidden_dropout_prob=0.0, "
            "attention_probs_dropout_prob=0.0)).eval()",
    "llama": "transformers.LlamaModel(transformers.LlamaConfig(hidden_size=24, "
             "num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=3, "
             "intermediate_size=37, vocab_size=53, max_position_embeddings=16, head_dim=4)).eval()",
}


def _prune_rows_(layer: nn.Linear, rows) -> None:
    with torch.no_grad():
        layer.weight[rows] = 0
        if layer.bias is not None:
            layer.bias[rows] = 0


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_shrunk_model_loads_into_a_full_size_skeleton(tmp_path, arch):
    """shrink_ leaves widths that differ per layer (no config describes them): the checkpoint
    records them, and a fresh full-size model of the same architecture takes the file, heads
    included, with bit-identical outputs. A layer quantized after shrinking keeps its shape."""
    transformers = pytest.importorskip("transformers")  # noqa: F841 (used by eval below)
    torch.manual_seed(0)
    model = eval(_TINY[arch])
    if arch == "bert":
        for i, layer in enumerate(model.encoder.layer):
            _prune_rows_(layer.intermediate.dense, list(range(0, 37, 2 + i)))
            hd = layer.attention.self.attention_head_size
            _prune_rows_(layer.attention.self.value, list(range(hd, 2 * hd)))  # head 1 dies
        quantized = "encoder.layer.1.output.dense"
    else:
        for i, layer in enumerate(model.layers):
            _prune_rows_(layer.mlp.gate_proj, list(range(1, 37, 3 + i)))
            _prune_rows_(layer.self_attn.v_proj, list(range(4, 8)))  # key/value group 1 dies
        quantized = "layers.1.mlp.down_proj"
    report = fastkd.shrink_(model)
    assert report  # something was removed
    fastkd.quantize_(model, mode="w8a16", filter_fn=lambda m, n: n == quantized)
    ckpt = tmp_path / "shrunk.safetensors"
    header = fastkd.save_compressed(model, ckpt)
    assert header["shapes"]["linear"]
    if arch == "bert":  # its self-attention keeps head counts as attributes
        assert header["shapes"]["attributes"]["encoder.layer.0.attention.self"][
            "num_attention_heads"] == 3
    ids = torch.randint(0, 53, (2, 9))
    with torch.no_grad():
        expected = model(ids).last_hidden_state
    torch.save(ids, tmp_path / "ids.pt")
    script = textwrap.dedent(
        f"""
        import torch, transformers, fastkd
        torch.manual_seed(123)  # another init: every tensor must come from the file
        skel = {_TINY[arch]}
        fastkd.load_compressed(skel, {str(ckpt)!r})
        with torch.no_grad():
            out = skel(torch.load({str(tmp_path / "ids.pt")!r})).last_hidden_state
        torch.save(out, {str(tmp_path / "out.pt")!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)
    # without the recorded widths a full-size skeleton cannot take the file
    from safetensors.torch import load_model

    with pytest.raises(RuntimeError):
        load_model(eval(_TINY[arch]), str(ckpt), strict=True)


def _meta_parameters(model: nn.Module) -> nn.Module:
    """``model`` with its parameters on the meta device and its buffers real, as
    accelerate.init_empty_weights() builds a model (tied parameters stay one object)."""
    moved = {}
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None:
                if id(p) not in moved:
                    moved[id(p)] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)
                mod._parameters[name] = moved[id(p)]
    return model


def test_meta_skeleton_of_a_tied_lm_loads_without_its_float_weights(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=24, vocab_size=53, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    fastkd.sparsify_(model, 0.5, filter_fn=lambda m, n: ".mlp." in n)
    fastkd.quantize_(model, filter_fn=lambda m, n: ".attn." in n)
    ids = torch.randint(0, 53, (2, 9))
    with torch.no_grad():
        ref = model(ids).logits
    fastkd.save_compressed(model, tmp_path / "m")
    with torch.device("meta"):
        all_meta = transformers.GPT2LMHeadModel(cfg).eval()  # no non-persistent buffers
    skeletons = [_meta_parameters(transformers.GPT2LMHeadModel(cfg).eval()), all_meta]
    try:
        import accelerate
    except ImportError:
        pass
    else:  # the docstring's recipe; its skeleton comes untied (lm_head and wte two meta tensors)
        with accelerate.init_empty_weights():
            skeletons.append(transformers.GPT2LMHeadModel(cfg).eval())
    for skeleton in skeletons:
        out = fastkd.load_compressed(skeleton, tmp_path / "m")
        assert not any(t.is_meta for t in (*out.parameters(), *out.buffers()))
        assert out.lm_head.weight is out.transformer.wte.weight  # still tied
        with torch.no_grad():
            assert torch.equal(out(ids).logits, ref)


@pytest.mark.parametrize("how", ["load_compressed", "from_pretrained"])
def test_loaded_int8_codes_are_aligned_for_the_cpu_kernel(tmp_path, how):
    """A checkpoint's tensors are views at 8-byte offsets into the mapped file. Assigned as the
    int8 codes of a bf16 w8a16 model, they sent aten's int8 weight-only kernel off aligned
    memory (a segfault); the codes are copied to aligned memory once, on load, and the loaded
    model computes what the saved one did."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    fastkd.quantize_(model, mode="w8a16")
    ids = torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        ref = model(ids).logits
    if how == "load_compressed":
        fastkd.save_compressed(model, tmp_path / "m")
        skeleton = _meta_parameters(transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval())
        loaded = fastkd.load_compressed(skeleton, tmp_path / "m")
    else:
        model.save_pretrained(tmp_path)
        loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
        # transformers keeps the rotary frequencies in fp32 on load: as the saved model's
        loaded.model.rotary_emb.inv_freq = model.model.rotary_emb.inv_freq.clone()
    codes = [b for b in loaded.buffers() if b.dtype == torch.int8]
    assert codes and all(b.data_ptr() % 64 == 0 for b in codes)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref)


def test_meta_skeleton_needs_its_non_persistent_buffers(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=53, hidden_size=24, intermediate_size=37,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=6)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    fastkd.quantize_(model, mode="w8a16")
    ids = torch.randint(0, 53, (2, 9))
    with torch.no_grad():
        ref = model(ids).logits
    fastkd.save_compressed(model, tmp_path / "m")
    # everything on meta: the rotary frequencies (non-persistent) are in no checkpoint
    with torch.device("meta"):
        bare = transformers.LlamaForCausalLM(cfg).eval()
    with pytest.raises(ValueError, match="non-persistent buffer.*inv_freq"):
        fastkd.load_compressed(bare, tmp_path / "m")
    # meta parameters, real buffers: loads, and nothing was allocated for the float weights
    out = fastkd.load_compressed(_meta_parameters(transformers.LlamaForCausalLM(cfg).eval()),
                                 tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(out(ids).logits, ref)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_decompress_gives_a_plain_model_of_the_architecture(tmp_path, arch):
    """A model shipped compressed (every fastkd layer type in it) loads into a skeleton, and
    decompress_ turns it back into plain nn.Linear layers: a fresh model of the architecture
    loads its state_dict strictly and gives the compressed model's outputs (to the rounding of
    the float replacement; bit for bit for folded masks)."""
    transformers = pytest.importorskip("transformers")  # noqa: F841 (used by eval below)
    torch.manual_seed(0)
    model = eval(_TINY[arch])
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    masked, int8, shared = names[0::3], names[1::3], names[2::3]
    fastkd.sparsify_(model, 0.5, filter_fn=lambda m, n: n in masked)
    fastkd.quantize_(model, mode="w8a16", filter_fn=lambda m, n: n in int8)
    fastkd.share_weights_(model, bits=4, filter_fn=lambda m, n: n in shared)
    ids = torch.randint(0, 53, (2, 9))
    with torch.no_grad():
        ref = model(ids).last_hidden_state
    fastkd.save_compressed(model, tmp_path / "m.safetensors")
    torch.manual_seed(1)
    loaded = fastkd.load_compressed(eval(_TINY[arch]), tmp_path / "m.safetensors")
    assert fastkd.decompress_(loaded) is loaded
    kinds = {type(m).__name__ for m in loaded.modules()}
    assert not kinds & {"MaskedLinear", "Int8Linear", "SharedLinear"}, kinds
    for n in masked:  # folded masks: the pruned weights are exact zeros of the plain weight
        w = loaded.get_submodule(n).weight
        assert type(loaded.get_submodule(n)) is nn.Linear and (w == 0).float().mean() >= 0.45
    plain = eval(_TINY[arch])
    plain.load_state_dict(loaded.state_dict())  # strict: the keys of the architecture
    with torch.no_grad():
        out = plain(ids).last_hidden_state
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_decompress_dtype_filter_and_bad_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12, bias=False), nn.ReLU(), nn.Linear(12, 5))
    fastkd.quantize_(model, mode="w8a16")
    x = torch.randn(3, 16)
    bf16 = fastkd.decompress_(model.to(torch.bfloat16), dtype=torch.bfloat16)
    assert [m.weight.dtype for m in bf16 if isinstance(m, nn.Linear)] == [torch.bfloat16] * 2
    assert bf16(x.bfloat16()).dtype == torch.bfloat16
    # per layer, by filter; a layer's own to_linear keeps its outputs
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 5))
    fastkd.share_weights_(model, bits=4)
    with torch.no_grad():
        ref = model(x)
    fastkd.decompress_(model, filter_fn=lambda m, n: n == "2")
    assert isinstance(model[0], SharedLinear) and type(model[2]) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref)
        torch.testing.assert_close(model[0].to_linear()(x), model[0](x))
    with pytest.raises(ValueError, match="to_linear"):
        fastkd.decompress_(model[0])
    with pytest.raises(TypeError):
        fastkd.decompress_("model")
    with pytest.raises(TypeError, match="dtype"):
        fastkd.decompress_(model, dtype=torch.int8)
    with pytest.raises(TypeError, match="filter_fn"):
        fastkd.decompress_(model, filter_fn=3)


def test_gpt2_layers_come_back_as_conv1d(tmp_path):
    """GPT-2 keeps its projections as Conv1D (weight stored transposed): folding or decompressing
    a fastkd layer made from one must give a Conv1D again, or a plain GPT-2 would load the
    state_dict transposed (silently, for its square attention output projection)."""
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    def tiny():
        cfg = transformers.GPT2Config(n_embd=24, n_layer=2, n_head=4, vocab_size=53,
                                      n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0)
        return transformers.GPT2Model(cfg).eval()

    torch.manual_seed(0)
    model = tiny()
    names = [n for n, m in model.named_modules() if isinstance(m, Conv1D)]
    fastkd.sparsify_(model, 0.5, filter_fn=lambda m, n: n in names[0::3])
    fastkd.quantize_(model, mode="w8a16", filter_fn=lambda m, n: n in names[1::3])
    fastkd.share_weights_(model, bits=6, filter_fn=lambda m, n: n in names[2::3])
    ids = torch.randint(0, 53, (2, 9))
    with torch.no_grad():
        ref = model(ids).last_hidden_state
    # in place, and through a checkpoint loaded in a fresh skeleton
    folded = fastkd.decompress_(copy.deepcopy(model))
    path = tmp_path / "gpt2.safetensors"
    fastkd.save_compressed(model, path)
    loaded = fastkd.decompress_(fastkd.load_compressed(tiny(), path))
    for out in (folded, loaded):
        assert all(type(out.get_submodule(n)) is Conv1D for n in names)
        plain = tiny()
        plain.load_state_dict(out.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(plain(ids).last_hidden_state, ref, rtol=1e-4, atol=1e-4)
    # fold_masks_ alone, on the masked layers only
    masked_only = tiny()
    fastkd.sparsify_(masked_only, 0.5)
    with torch.no_grad():
        ref = masked_only(ids).last_hidden_state
    fastkd.fold_masks_(masked_only)
    assert all(type(masked_only.get_submodule(n)) is Conv1D for n in names)
    plain = tiny()
    plain.load_state_dict(masked_only.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).last_hidden_state, ref, rtol=1e-5, atol=1e-5)
    # shrink_ slices such a layer: the sliced one keeps the Conv1D origin too
    shrunk = tiny()
    fastkd.sparsify_(shrunk, 0.5)
    mlp = shrunk.h[0].mlp
    with torch.no_grad():
        keep = mlp.c_fc.mask.clone()
        keep[:10] = False  # ten dead neurons
        mlp.c_fc.set_mask_(keep)
        ref = shrunk(ids).last_hidden_state
    fastkd.shrink_(shrunk)
    fastkd.fold_masks_(shrunk)
    assert type(shrunk.h[0].mlp.c_fc) is Conv1D and shrunk.h[0].mlp.c_fc.nf == 86
    with torch.no_grad():
        torch.testing.assert_close(shrunk(ids).last_hidden_state, ref, rtol=1e-5, atol=1e-5)


def test_missing_safetensors_gets_an_install_hint(monkeypatch, tmp_path):
    """safetensors is optional (the demo extra): a bare ModuleNotFoundError named no remedy."""
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match="pip install safetensors"):
        fastkd.save_compressed(torch.nn.Linear(2, 2), tmp_path / "m.safetensors")
    with pytest.raises(ImportError, match="pip install safetensors"):
        fastkd.load_compressed(torch.nn.Linear(2, 2), tmp_path / "m.safetensors")


def _assign_kinds():
    from test_int8_experts import _ToyExperts

    from fastkd.nn import Int8Experts, SharedExperts

    def linear():
        return nn.Linear(20, 7)

    return {
        "int8_linear": (lambda: fastkd.nn.Int8Linear.from_linear(linear(), mode="w8a16"),
                        lambda: torch.randn(3, 20)),
        "shared_linear": (lambda: fastkd.nn.SharedLinear.from_linear(linear(), bits=4),
                          lambda: torch.randn(3, 20)),
        "int8_experts": (lambda: Int8Experts.from_experts(_ToyExperts(), mode="w8a16"), None),
        "shared_experts": (lambda: SharedExperts.from_experts(_ToyExperts(), bits=3), None),
    }


@pytest.mark.parametrize("kind", ["int8_linear", "shared_linear", "int8_experts",
                                  "shared_experts"])
def test_assign_load_of_a_half_checkpoint_keeps_the_fp32_state(kind):
    """load_state_dict(assign=True) of a checkpoint whose scales / codebooks were saved in
    fp16 (a .half() state dict) installed them as fp16, and every forward then refused them."""
    from test_int8_experts import _routing

    make, inputs = _assign_kinds()[kind]
    torch.manual_seed(0)
    source = make()
    half = {k: v.half() if v.is_floating_point() else v for k, v in source.state_dict().items()}
    torch.manual_seed(1)
    target = make()
    target.load_state_dict(half, assign=True)
    fp32 = {k: v for k, v in target.state_dict().items() if "scale" in k or "codebook" in k}
    assert fp32 and all(v.dtype == torch.float32 for v in fp32.values())
    # what a copy-load of the same checkpoint gives (it casts into the fp32 buffers)
    torch.manual_seed(1)
    copied = make()
    copied.load_state_dict(half)
    if inputs is None:  # experts: (tokens, hidden), routing
        x = torch.randn(5, 24)
        idx, w = _routing(5, 5)
        args = (x, idx, w)
    else:
        args = (inputs(),)
    torch.testing.assert_close(target(*args), copied(*args))
    assert half[next(iter(fp32))].dtype == torch.float16  # the caller's dict is left alone
