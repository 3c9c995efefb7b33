"""transformers' save_pretrained / from_pretrained of models fastkd changed. Before fastkd
registered a quantizer with transformers, from_pretrained built float layers and read the int8
codes stored under ``weight`` as float weights (outputs off by ~1000x, one "UNEXPECTED
weight_scale" line in the load report); a shrunk model failed on its narrower widths."""

import copy
import json
import os
import pickle
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import fastkd
from fastkd.nn import (
    Int8Experts,
    Int8Linear,
    MaskedExperts,
    MaskedLinear,
    SharedExperts,
    SharedLinear,
)

transformers = pytest.importorskip("transformers")

VOCAB = 61
_ATT = dict(vocab_size=VOCAB, hidden_size=24, num_hidden_layers=2, num_attention_heads=4)


def _build(arch, seed=0):
    T = transformers
    torch.manual_seed(seed)
    build = {
        "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(
            **_ATT, intermediate_size=37, num_key_value_heads=2)),
        # Conv1D projections, lm_head tied to the embeddings
        "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(
            vocab_size=VOCAB, n_embd=24, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)),
        "falcon": lambda: T.FalconForCausalLM(T.FalconConfig(**_ATT)),  # nn.Linear subclass
        "mixtral": lambda: T.MixtralForCausalLM(T.MixtralConfig(  # stacked experts
            **_ATT, intermediate_size=40, num_key_value_heads=2, num_local_experts=5)),
        # stacked experts fed expert by expert, without transformers' layout flags
        "llama4": lambda: T.Llama4ForCausalLM(T.Llama4TextConfig(
            **_ATT, intermediate_size=40, intermediate_size_mlp=37, num_key_value_heads=2,
            head_dim=6, num_local_experts=5, num_experts_per_tok=1, interleave_moe_layer_step=1)),
        # lm_head, encoder and decoder embeddings tied to one weight
        "t5": lambda: T.T5ForConditionalGeneration(T.T5Config(
            vocab_size=VOCAB, d_model=24, d_ff=37, num_layers=2, num_heads=4, d_kv=6)),
        "bert": lambda: T.BertModel(T.BertConfig(**_ATT, intermediate_size=37)),
    }[arch]
    return build().eval()


def _run(model, x):
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            return model(input_ids=x, decoder_input_ids=x).logits
        out = model(x)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _ids(seed=1):
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(seed))


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # untied heads, experts left float
        return fn(*args, **kwargs)


def _saved_config(path) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def _assert_same_model(loaded, model):
    assert ([type(m).__name__ for m in loaded.modules()]
            == [type(m).__name__ for m in model.modules()])
    a, b = loaded.state_dict(), model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


STEPS = {
    "w8a8": (lambda m: fastkd.quantize_(m, mode="w8a8"), Int8Linear),
    "w8a16": (lambda m: fastkd.quantize_(m, mode="w8a16"), Int8Linear),
    # SmoothQuant factors are one more buffer per layer, which from_pretrained must fill
    "w8a8-smooth": (lambda m: fastkd.quantize_(m, mode="w8a8", smooth=0.5,
                                               calibration=[_ids(3)]), Int8Linear),
    "sparse": (lambda m: fastkd.sparsify_(m, 0.5), MaskedLinear),
    "2:4": (lambda m: fastkd.sparsify_(m, pattern="2:4", filter_fn=lambda _, name: not name
                                       .endswith("down_proj")), MaskedLinear),  # in = 37
    "shared": (lambda m: fastkd.share_weights_(m, bits=4, iters=5), SharedLinear),
}
CASES = [("llama", s) for s in STEPS] + [
    ("gpt2", "w8a16"), ("gpt2", "w8a8-smooth"), ("gpt2", "shared"), ("falcon", "w8a8"), ("mixtral", "w8a8"),
    ("mixtral", "sparse"), ("mixtral", "shared"), ("llama4", "w8a8"), ("llama4", "sparse"),
    ("t5", "w8a16"), ("t5", "sparse"), ("bert", "shared")]


@pytest.mark.parametrize("arch,step", CASES)
def test_save_pretrained_from_pretrained_round_trip(tmp_path, arch, step):
    if arch == "llama4" and not hasattr(transformers, "Llama4TextConfig"):
        pytest.skip("this transformers has no Llama 4")
    model = _build(arch)
    swap, kind = STEPS[step]
    _quiet(swap, model)
    x = _ids()
    expected = _run(model, x)
    model.save_pretrained(tmp_path)
    qc = _saved_config(tmp_path)["quantization_config"]
    assert qc["quant_method"] == "fastkd" and qc["layers"]

    loaded = type(model).from_pretrained(tmp_path).eval()
    assert any(isinstance(m, kind) for m in loaded.modules())
    if arch in ("mixtral", "llama4"):
        experts = {Int8Linear: Int8Experts, MaskedLinear: MaskedExperts,
                   SharedLinear: SharedExperts}[kind]
        assert any(isinstance(m, experts) for m in loaded.modules())
    _assert_same_model(loaded, model)
    assert torch.equal(_run(loaded, x), expected)
    assert not loaded.is_quantized  # .half() / Trainer treat it as the model it was before saving


def test_sharded_checkpoint_and_generate(tmp_path):
    model = _build("llama")
    _quiet(fastkd.quantize_, model, mode="w8a16")
    model.save_pretrained(tmp_path, max_shard_size="4KB")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    _assert_same_model(loaded, model)
    prompt = _ids()[:1]
    assert torch.equal(loaded.generate(prompt, max_new_tokens=4, do_sample=False),
                       model.generate(prompt, max_new_tokens=4, do_sample=False))


@pytest.mark.parametrize("first", ["fastkd", "transformers"])
def test_quantizer_is_registered_whichever_package_is_imported_first(tmp_path, first):
    """``import fastkd`` imports no transformers; the quantizer is registered when transformers
    loads its quantizer registry, or at ``import fastkd`` when that already happened."""
    model = _build("llama")
    _quiet(fastkd.quantize_, model, mode="w8a8")
    model.save_pretrained(tmp_path)
    imports = {"fastkd": "import fastkd; assert 'transformers' not in sys.modules; "
                         "import transformers",
               "transformers": "import transformers.quantizers.auto; import fastkd"}[first]
    code = (f"import sys; {imports}; "
            f"m = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}); "
            "print(type(m.model.layers[0].mlp.up_proj).__name__, m.model.layers[0].mlp.up_proj"
            ".weight.dtype, fastkd.info()['transformers_quantizer'])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-3:] == ["Int8Linear", "torch.int8", "registered"]


def test_shrunk_model_round_trip_and_decompress(tmp_path):
    """Widths shrink_ left (which no config describes) are rebuilt; decompress_ keeps them
    recorded, since the plain layers are still narrower than the config says."""
    model = _build("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight[::3] = 0
    assert fastkd.shrink_(model)
    _quiet(fastkd.quantize_, model, mode="w8a16",
           filter_fn=lambda m, name: name.endswith("down_proj"))
    x = _ids()
    model.save_pretrained(tmp_path / "compressed")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "compressed").eval()
    _assert_same_model(loaded, model)
    assert loaded.model.layers[0].mlp.up_proj.out_features == 24
    assert torch.equal(_run(loaded, x), _run(model, x))

    fastkd.decompress_(model)
    assert model.config.quantization_config.layers == {}  # widths only
    model.save_pretrained(tmp_path / "plain")
    assert _saved_config(tmp_path / "plain")["quantization_config"]["shrunk"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    assert type(loaded.model.layers[0].mlp.down_proj) is nn.Linear
    assert torch.equal(_run(loaded, x), _run(model, x))


@pytest.mark.parametrize("wrap", ["compile", "data_parallel"])
def test_swaps_through_a_wrapper_record_the_model_inside(tmp_path, wrap):
    """quantize_(torch.compile(model)) or on a DataParallel model left the transformers model
    inside without a record (its save_pretrained then loaded int8 codes as float weights), and
    filters saw the wrapper's names ("_orig_mod.model.layers...")."""
    model = _build("llama")
    wrapped = torch.compile(model) if wrap == "compile" else nn.DataParallel(model)
    seen = []  # the filter sees the model's own names, not "_orig_mod." / "module." ones
    assert _quiet(fastkd.quantize_, wrapped, mode="w8a16",
                  filter_fn=lambda m, n: seen.append(n) or n.startswith("model.")) is wrapped
    assert "model.layers.0.mlp.up_proj" in seen and type(model.lm_head) is nn.Linear
    assert fastkd.sparsify_(wrapped, 0.5, filter_fn=lambda m, n: n == "lm_head") is wrapped
    assert type(model.lm_head) is MaskedLinear
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    _assert_same_model(loaded, model)


class _Classifier(nn.Module):
    """A model of the user's around a transformers backbone (a sentence encoder, a head)."""

    def __init__(self):
        super().__init__()
        self.backbone = _build("llama")
        self.head = nn.Linear(VOCAB, 3)

    def forward(self, x):
        return self.head(self.backbone(x).logits)


def test_a_swap_on_a_model_holding_a_transformers_model_records_that_model(tmp_path):
    """quantize_ on a user's module around a transformers model left the transformers model
    without a record: its save_pretrained then loaded int8 codes as float weights."""
    model = _Classifier()
    _quiet(fastkd.quantize_, model, mode="w8a16")
    assert type(model.head) is Int8Linear
    backbone = model.backbone
    assert backbone.config.quantization_config.quant_method == "fastkd"
    backbone.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    _assert_same_model(loaded, backbone)


def test_a_swap_on_a_part_of_a_transformers_model_warns_that_it_is_not_recorded():
    """A swap on a submodule (a decoder layer) cannot reach the model save_pretrained runs on;
    it used to say nothing, and the saved checkpoint loaded int8 codes as float weights."""
    model = _build("llama")
    with pytest.warns(UserWarning, match="part of a transformers model"):
        fastkd.quantize_(model.model.layers[0], mode="w8a16")
    assert getattr(model.config, "quantization_config", None) is None
    with warnings.catch_warnings():  # nothing swapped: nothing to say
        warnings.simplefilter("error")
        fastkd.quantize_(model.model.layers[1].mlp, filter_fn=lambda m, n: False)
    # once the model carries fastkd's record, its quantizer records the part again at save
    _quiet(fastkd.sparsify_, model, 0.5, filter_fn=lambda m, n: n == "lm_head")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastkd.quantize_(model.model.layers[1].mlp, mode="w8a16")


def test_decompress_of_an_unshrunk_model_drops_the_config(tmp_path):
    model = _build("llama")
    _quiet(fastkd.quantize_, model)
    assert model.config.quantization_config.quant_method == "fastkd"
    fastkd.decompress_(model)
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    model.save_pretrained(tmp_path)
    assert "quantization_config" not in _saved_config(tmp_path)


def test_layers_swapped_by_hand_after_the_last_fastkd_call_are_saved(tmp_path):
    model = _build("llama")
    _quiet(fastkd.quantize_, model, filter_fn=lambda m, name: ".mlp." in name)
    attn = model.model.layers[0].self_attn
    attn.q_proj = MaskedLinear.from_linear(attn.q_proj, sparsity=0.5)
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, MaskedLinear)
    _assert_same_model(loaded, model)


def test_from_pretrained_in_another_dtype_and_dequantize(tmp_path):
    model = _build("llama")
    _quiet(fastkd.quantize_, model, mode="w8a16", filter_fn=lambda m, name: ".mlp." in name)
    _quiet(fastkd.sparsify_, model, 0.5, filter_fn=lambda m, name: "self_attn" in name)
    x = _ids()
    expected = _run(model, x)
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.bfloat16).eval()
    up, q = loaded.model.layers[0].mlp.up_proj, loaded.model.layers[0].self_attn.q_proj
    assert up.weight.dtype == torch.int8 and up.weight_scale.dtype == torch.float32
    assert q.weight.dtype == torch.bfloat16 and q.mask.dtype == torch.bool
    assert torch.equal(up.weight, model.model.layers[0].mlp.up_proj.weight)
    assert torch.equal(q.mask, model.model.layers[0].self_attn.q_proj.mask)
    out = _run(loaded, x)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), expected, atol=0.05, rtol=0.05)

    loaded.float()  # transformers refuses .float() on models it calls quantized
    loaded.dequantize()  # transformers' API: fastkd.decompress_
    assert not any(isinstance(m, (Int8Linear, MaskedLinear)) for m in loaded.modules())
    assert getattr(loaded.config, "quantization_config", None) is None
    torch.testing.assert_close(_run(loaded, x), expected, atol=0.05, rtol=0.05)


def test_base_model_loads_from_a_checkpoint_with_a_head_and_back(tmp_path):
    model = _build("llama")
    _quiet(fastkd.quantize_, model, mode="w8a16")
    model.save_pretrained(tmp_path / "lm")
    base = transformers.AutoModel.from_pretrained(tmp_path / "lm").eval()
    assert isinstance(base.layers[1].mlp.down_proj, Int8Linear)
    assert torch.equal(base(_ids()).last_hidden_state, model.model(_ids()).last_hidden_state)

    base.save_pretrained(tmp_path / "base")
    with_head = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base")
    assert isinstance(with_head.model.layers[1].mlp.down_proj, Int8Linear)
    assert type(with_head.lm_head) is nn.Linear  # not in that checkpoint: a new float head


def _clip():
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=48, max_position_embeddings=16),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=48, image_size=16, patch_size=8),
        projection_dim=16)
    return transformers.CLIPModel(cfg).eval()


def test_a_tower_of_a_composite_model_loads_alone(tmp_path):
    """CLIPVisionModel / CLIPTextModel from a compressed CLIPModel checkpoint read only their
    sub-config, which had no quantization_config: transformers never called the quantizer and
    read the int8 codes as float weights (outputs off by ~4e5), silently."""
    model = _clip()
    _quiet(fastkd.quantize_, model, mode="w8a16")
    model.save_pretrained(tmp_path)
    px, ids = torch.randn(2, 3, 16, 16), torch.randint(0, 97, (2, 7))
    vision = _quiet(transformers.CLIPVisionModel.from_pretrained, tmp_path).eval()
    text = _quiet(transformers.CLIPTextModel.from_pretrained, tmp_path).eval()
    assert any(isinstance(m, Int8Linear) for m in vision.modules())
    assert any(isinstance(m, Int8Linear) for m in text.modules())
    with torch.no_grad():
        assert torch.equal(vision(pixel_values=px).last_hidden_state,
                           model.vision_model(pixel_values=px).last_hidden_state)
        assert torch.equal(text(input_ids=ids).last_hidden_state,
                           model.text_model(input_ids=ids).last_hidden_state)
    # the composite itself still round-trips, and decompress_ leaves no config behind in the
    # sub-configs either (a loaded sub-config holds it as the JSON's dict)
    whole = _quiet(transformers.CLIPModel.from_pretrained, tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(whole(input_ids=ids, pixel_values=px).logits_per_image,
                           model(input_ids=ids, pixel_values=px).logits_per_image)
    fastkd.decompress_(whole)
    whole.save_pretrained(tmp_path / "float")
    assert "quantization_config" not in json.dumps(_saved_config(tmp_path / "float"))


def test_student_of_a_compressed_teacher(tmp_path):
    teacher = _build("llama")
    _quiet(fastkd.quantize_, teacher, mode="w8a16")
    student = fastkd.student_from_teacher(teacher, [1])
    assert list(student.config.quantization_config.layers) != list(
        teacher.config.quantization_config.layers)  # its own paths, not the teacher's
    student.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert len(loaded.model.layers) == 1
    _assert_same_model(loaded, student)


def test_quantization_config_on_float_weights_is_refused(tmp_path):
    _build("llama").save_pretrained(tmp_path)
    from fastkd._hf_quantizer import FastkdConfig

    with pytest.raises(ValueError, match="fastkd.quantize_"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path,
                                                          quantization_config=FastkdConfig())


def test_a_model_quantized_by_another_method_is_left_alone():
    model = _build("llama")

    class OtherQuantizer:  # what bitsandbytes/torchao loading leaves on a model
        quantization_config = None

    model.hf_quantizer = OtherQuantizer()
    with pytest.warns(UserWarning, match="save_compressed"):
        fastkd.sparsify_(model, 0.5)
    assert isinstance(model.hf_quantizer, OtherQuantizer)
    assert getattr(model.config, "quantization_config", None) is None


def test_a_transformers_the_quantizer_does_not_know_gets_a_warning_not_a_mark(monkeypatch):
    from fastkd import hf

    monkeypatch.setattr(hf, "_registered", False)
    monkeypatch.setattr(hf, "_failure", [])
    monkeypatch.setattr(hf, "supported", lambda: False)  # transformers 4.x
    model = _build("llama")
    with pytest.warns(RuntimeWarning, match="save_compressed"):
        fastkd.quantize_(model)
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fastkd.sparsify_(_build("llama"), 0.5)
    assert not [w for w in caught if "cannot register" in str(w.message)]  # said once


def test_marked_model_copies_and_pickles():
    model = _build("llama")
    _quiet(fastkd.quantize_, model, mode="w8a16")
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert clone.hf_quantizer.quantization_config.layers == \
            model.hf_quantizer.quantization_config.layers
        assert torch.equal(_run(clone, _ids()), _run(model, _ids()))


def test_trainer_checkpoints_of_a_pruned_model_load_pruned(tmp_path):
    """transformers' Trainer saves with save_pretrained: its checkpoints load as the pruned
    model it trained (masks, pruned weights still zero), and resuming keeps the masks."""
    model = _build("llama")
    fastkd.sparsify_(model, 0.5)

    class Batches(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            ids = torch.randint(0, VOCAB, (9,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids}

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, save_steps=2,
        learning_rate=1e-2, report_to=[], use_cpu=True, disable_tqdm=True)
    transformers.Trainer(model=model, args=args, train_dataset=Batches()).train()
    q = model.model.layers[0].self_attn.q_proj
    assert bool((q.weight[~q.mask] == 0).all())
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint-2")
    _assert_same_model(loaded, model)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_from_pretrained_onto_the_gpu_in_bf16(tmp_path):
    """Loaded straight onto the GPU (device_map) in bf16: the layers run their GPU kernels."""
    model = _build("llama")
    _quiet(fastkd.quantize_, model, mode="w8a8", filter_fn=lambda m, name: ".mlp." in name)
    _quiet(fastkd.sparsify_, model, 0.5, filter_fn=lambda m, name: "self_attn" in name)
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, device_map="cuda", dtype=torch.bfloat16).eval()
    up = loaded.model.layers[0].mlp.up_proj
    assert up.weight.device.type == "cuda" and up.weight.dtype == torch.int8
    x = _ids()
    out = _run(loaded, x.cuda()).float().cpu()
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), _run(model, x).flatten(1))
    assert cos.min() > 0.99, cos
