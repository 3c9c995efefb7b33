"""The swaps on a PEFT (LoRA) model and on frozen layers. LoRA's adapters are the float weights
being trained: quantize_ turned lora_A / lora_B into Int8Linear (peft's forward then failed on
int8 weights), and sparsify_ / share_weights_ pruned or clustered them. And a frozen layer came
back trainable from sparsify_ and share_weights_, so the frozen base under LoRA was trained too."""

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

import fastkd
from fastkd.nn import Int8Linear, MaskedLinear, SharedLinear


def _tiny_llama(transformers, seed=0):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2))


STEPS = {
    "quantize_": (lambda m: fastkd.quantize_(m, mode="w8a16"), Int8Linear),
    "sparsify_": (lambda m: fastkd.sparsify_(m, 0.5), MaskedLinear),
    "share_weights_": (lambda m: fastkd.share_weights_(m, bits=6), SharedLinear),
}


@pytest.mark.parametrize("step", sorted(STEPS))
def test_frozen_layers_stay_frozen_and_keep_their_mode(step):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8)).eval()
    model[0].requires_grad_(False)  # a frozen first layer; the last one trains
    swap, kind = STEPS[step]
    swap(model)
    assert type(model[0]) is kind and type(model[2]) is kind
    assert not any(p.requires_grad for p in model[0].parameters())
    assert all(p.requires_grad for p in model[2].parameters())
    assert not model[0].training and not model[2].training
    model(torch.randn(3, 16)).sum().backward()
    assert all(p.grad is None for p in model[0].parameters())
    assert all(p.grad is not None for p in model[2].parameters())


@pytest.mark.filterwarnings("ignore:.*tied embeddings")
@pytest.mark.parametrize("step", sorted(STEPS))
def test_lora_adapters_stay_float_and_only_they_train(step):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    base = _tiny_llama(transformers).eval()
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(base, lora)
    ids = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    swap, kind = STEPS[step]
    if step == "sparsify_":  # all weights kept: the outputs must not move
        swap = lambda m: fastkd.sparsify_(m, 0.0)  # noqa: E731
    swap(model)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q_proj.base_layer) is kind  # the base weight is compressed
    assert type(q_proj.lora_A["default"]) is nn.Linear  # the adapters are not
    assert type(q_proj.lora_B["default"]) is nn.Linear
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == trainable
    with torch.no_grad():
        out = model(ids).logits
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1), dim=-1)
    assert cos.min() > 0.999, cos
    model.train()
    model(ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_adapter_layers_names_what_is_under_a_tuner_layer_but_its_base():
    peft = pytest.importorskip("peft")
    from fastkd.nn._linear_like import adapter_layers

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    model = peft.get_peft_model(copy.deepcopy(Net()), peft.LoraConfig(r=2, target_modules=["a"]))
    names = adapter_layers(model)
    assert "base_model.model.a.lora_A.default" in names
    assert "base_model.model.a.lora_B.default" in names
    assert not any("base_layer" in n for n in names)
    assert not any(n.startswith("base_model.model.b") for n in names)
    assert adapter_layers(Net()) == set()


def test_distilling_a_pruned_lora_student_trains_only_the_adapters():
    # Before: sparsify_ made the frozen base trainable, so the Distiller (which trains what
    # requires grad) trained every pruned weight of the base model along with the adapters.
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    teacher = _tiny_llama(transformers).eval()
    student = peft.get_peft_model(_tiny_llama(transformers, seed=1),
                                  peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    fastkd.sparsify_(student, 0.5)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    ids = torch.randint(0, 61, (8, 9), generator=torch.Generator().manual_seed(1))
    loader = [{"input_ids": ids[i:i + 4], "labels": ids[i:i + 4]} for i in (0, 4)]
    fastkd.Distiller(teacher, student, lr=1e-2, progress=False).fit(loader, epochs=2)
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".lora_" in n for n in changed), sorted(changed)
    q = student.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert type(q) is MaskedLinear and bool((q.weight[~q.mask] == 0).all())


@pytest.mark.parametrize("step", sorted(STEPS))
def test_merging_lora_into_compressed_bases_is_refused_and_works_after_decompress(step):
    # peft's merge adds the adapter into base_layer.weight: a MaskedLinear masked part of it
    # away and a SharedLinear's looked-up weight is a copy (the merge did nothing), silently
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    model = peft.get_peft_model(_tiny_llama(transformers).eval(), peft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    swap, _ = STEPS[step]
    swap(model)
    ids = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == "LoraCompressedLinear"
    with pytest.raises(ValueError, match="decompress_"):
        model.merge_and_unload()
    with torch.no_grad():  # the refused merge changed nothing
        assert torch.equal(model(ids).logits, ref)
    fastkd.decompress_(model)
    merged = model.merge_and_unload()
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:.*tied embeddings")
@pytest.mark.parametrize("step", sorted(STEPS))
def test_lora_on_a_model_that_is_already_compressed(tmp_path, step):
    """peft refused fastkd's layers as LoRA targets ("Target module ... is not supported"), so a
    model loaded compressed (from_pretrained of a fastkd checkpoint) could not take adapters."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    swap, kind = STEPS[step]
    base = _tiny_llama(transformers).eval()
    swap(base)
    base.save_pretrained(tmp_path / "base")
    ids = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = base(ids).logits
    with pytest.raises(ValueError, match="not supported"):  # peft on its own
        peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["q_proj"]))

    config = fastkd.register_lora_layers(peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model = peft.get_peft_model(base, config)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q_proj.base_layer) is kind and type(q_proj).__name__ == "LoraCompressedLinear"
    with torch.no_grad():  # lora_B starts at zero: the base model's outputs
        assert torch.equal(model(ids).logits, ref)
    frozen = {n: t.detach().clone() for n, t in q_proj.base_layer.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    assert all(torch.equal(t, frozen[n]) for n, t in q_proj.base_layer.state_dict().items())
    model.eval()
    with torch.no_grad():
        tuned = model(ids).logits
    assert not torch.equal(tuned, ref)  # the adapters trained

    # a session later: the compressed base from its checkpoint, the adapter from its own
    model.save_pretrained(tmp_path / "adapter")
    fresh = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    config = peft.LoraConfig.from_pretrained(tmp_path / "adapter")
    again = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter",
                                           config=fastkd.register_lora_layers(config))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, tuned)


def test_lora_variants_that_need_a_float_base_weight_are_refused():
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    base = _tiny_llama(transformers).eval()
    fastkd.quantize_(base, mode="w8a16", filter_fn=lambda m, n: "lm_head" not in n)
    config = fastkd.register_lora_layers(peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                         use_dora=True))
    with pytest.raises(ValueError, match="use_dora"):
        peft.get_peft_model(base, config)
    with pytest.raises(TypeError, match="LoraConfig"):
        fastkd.register_lora_layers(object())


def test_peft_is_imported_only_when_its_part_is_used():
    pytest.importorskip("peft")
    code = ("import sys, fastkd; assert 'peft' not in sys.modules; "
            "assert 'transformers' not in sys.modules; f = fastkd.register_lora_layers; "
            "assert 'peft' in sys.modules and fastkd.lora.register_lora_layers is f")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("step", sorted(STEPS))
def test_decompress_keeps_a_frozen_base_frozen(step):
    """decompress_ (the README's way to merge LoRA into a compressed base) made every float
    weight it built trainable: the frozen base under the adapters trained with them."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    base = _tiny_llama(transformers)
    STEPS[step][0](base)
    model = peft.get_peft_model(base, fastkd.register_lora_layers(
        peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    fastkd.decompress_(model)
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == trainable
    # outside peft a decompressed layer trains where the model does (nn.Linear's default)
    plain = _tiny_llama(transformers)
    STEPS[step][0](plain)
    fastkd.decompress_(plain)
    assert all(p.requires_grad for p in plain.parameters())


@pytest.mark.parametrize("step", ["quantize_", "sparsify_"])
def test_fused_lm_head_distils_a_lora_student(step):
    """fused_lm_head ran a PeftModel's base_model (peft's tuner around the whole causal LM)
    as the transformer body: its output had no last hidden state, and fit failed."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    teacher = _tiny_llama(transformers).eval()
    ids = torch.randint(0, 61, (8, 9), generator=torch.Generator().manual_seed(1))
    loader = [{"input_ids": ids[i:i + 4], "labels": ids[i:i + 4]} for i in (0, 4)]
    runs = []
    for fused in (False, True):
        base = _tiny_llama(transformers, seed=1)
        STEPS[step][0](base)
        student = peft.get_peft_model(base, fastkd.register_lora_layers(
            peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])))
        torch.manual_seed(2)
        fastkd.Distiller(teacher, student, lr=1e-2, progress=False, backend="torch",
                         fused_lm_head=fused).fit(loader)
        runs.append({n: p.detach() for n, p in student.named_parameters() if ".lora_" in n})
    for name, p in runs[0].items():
        torch.testing.assert_close(runs[1][name], p, rtol=1e-4, atol=1e-6, msg=name)


def _moe(transformers, arch):
    torch.manual_seed(0)
    if arch == "mixtral":
        return transformers.MixtralForCausalLM(transformers.MixtralConfig(
            vocab_size=61, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)).eval()
    if not hasattr(transformers, "Llama4TextConfig"):
        pytest.skip("this transformers has no Llama 4")
    return transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(
        vocab_size=61, hidden_size=16, intermediate_size=24, intermediate_size_mlp=20,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=4,
        num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=1)).eval()


@pytest.mark.parametrize("arch", ["mixtral", "llama4"])
@pytest.mark.parametrize("step", sorted(STEPS))
def test_lora_on_the_experts_own_weights_is_refused_and_nothing_changes(arch, step):
    """peft's target_parameters puts LoRA on the experts' 3-D weights, re-parametrizing them by
    name at each forward. Compressing such experts crashed (Llama 4: int8 codes in another
    layout), computed the delta on int8 codes (Mixtral: 0.3 off in the logits) or masked it."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model = _moe(transformers, arch)
    path = "mlp.experts" if arch == "mixtral" else "feed_forward.experts"
    try:
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=2, target_modules=["q_proj"], target_parameters=[f"{path}.gate_up_proj"],
            init_lora_weights=False))
    except (TypeError, ValueError) as err:  # a peft without target_parameters
        pytest.skip(f"this peft cannot target parameters: {err}")
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids).logits
    types = [type(m) for m in model.modules()]
    swap, _ = STEPS[step]
    with pytest.raises(ValueError, match="target_parameters"):
        swap(model)
    assert [type(m) for m in model.modules()] == types  # nothing was swapped
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
    # leaving the wrapped experts out compresses the rest
    getattr(fastkd, step)(model, filter_fn=lambda m, name: "experts" not in name)
    assert any(type(m) is STEPS[step][1] for m in model.modules())


@pytest.mark.filterwarnings("ignore:.*tied embeddings")
@pytest.mark.parametrize("step", sorted(STEPS))
def test_all_linear_targets_the_compressed_layers(step):
    """peft expands target_modules='all-linear' to nn.Linear / Conv1D only: on a compressed
    model the adapters went to whatever float linear was left (or peft found nothing)."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model = _tiny_llama(transformers)
    swap, kind = STEPS[step]
    swap(model)
    with pytest.raises(ValueError, match="takes the model"):
        fastkd.register_lora_layers(peft.LoraConfig(r=4, target_modules="all-linear"))
    config = fastkd.register_lora_layers(peft.LoraConfig(r=4, target_modules="all-linear"), model)
    wrapped = {name: mod for name, mod in peft.get_peft_model(model, config).named_modules()
               if hasattr(mod, "lora_A") and hasattr(mod, "base_layer")}
    bases = {type(mod.base_layer) for mod in wrapped.values()}
    assert len(wrapped) == 7 and bases == {kind}, (sorted(wrapped), bases)  # q k v o gate up down
    assert not any(name.endswith("lm_head") for name in wrapped)
