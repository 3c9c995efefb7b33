"""Llama 4's experts: 3-D stacked weights like transformers' other MoE classes, but without their
layout flags, gate and up in one ``(E, H, 2I)`` matrix, and a ``forward(hidden_states)`` that takes
the tokens laid out expert by expert (each row scaled by its router score, zero where the token
is not routed there). quantize_, sparsify_ and share_weights_ used to leave them float; they now
become Int8Experts / MaskedExperts / SharedExperts, checked against Llama4TextExperts' own forward
on the weights each computes with, whole models, checkpoints and torch.compile."""

import copy

import pytest
import torch

import fastkd
from fastkd.nn import Int8Experts, MaskedExperts, SharedExperts
from fastkd.nn._stacked_experts import is_stacked_experts

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Llama4TextConfig"):
    pytest.skip("this transformers has no Llama 4", allow_module_level=True)

N_EXPERTS, HIDDEN = 5, 24


def _model(seed=0, inner=37):
    """A tiny Llama 4 text model, every layer a MoE (one routed expert per token and a shared
    MLP), with expert weights large enough to matter."""
    cfg = transformers.Llama4TextConfig(
        vocab_size=61, hidden_size=HIDDEN, intermediate_size=inner, intermediate_size_mlp=40,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=6,
        num_local_experts=N_EXPERTS, num_experts_per_tok=1, interleave_moe_layer_step=1)
    torch.manual_seed(seed)
    model = transformers.Llama4ForCausalLM(cfg).eval()
    with torch.no_grad():
        for m in _all_experts(model):
            m.gate_up_proj.normal_(std=0.2)
            m.down_proj.normal_(std=0.2)
    return model


def _all_experts(model):
    return [m for m in model.modules() if type(m).__name__ == "Llama4TextExperts"]


def _routed_rows(tokens=7, seed=2):
    """What Llama4TextMoe hands its experts: (E x tokens, H) rows, expert-major, each token's
    row scaled by its router score at its expert and zero at the others."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, HIDDEN, generator=g)
    scores = torch.zeros(N_EXPERTS, tokens)
    scores[torch.randint(0, N_EXPERTS, (tokens,), generator=g), torch.arange(tokens)] = \
        torch.rand(tokens, generator=g) + 0.5
    return (x[None] * scores[..., None]).reshape(-1, HIDDEN)


def _swaps():
    return {
        "int8_w8a16": lambda e: Int8Experts.from_experts(e, mode="w8a16"),
        "int8_w8a8": lambda e: Int8Experts.from_experts(e, mode="w8a8"),
        "masked": lambda e: MaskedExperts.from_experts(e, sparsity=0.6),
        "shared": lambda e: SharedExperts.from_experts(e, bits=4, iters=10),
    }


def test_llama4_experts_are_recognised_with_their_layout():
    experts = _all_experts(_model())[0]
    assert is_stacked_experts(experts)
    stand_in = Int8Experts.from_experts(experts, mode="w8a16")
    assert (stand_in.has_gate, stand_in.is_transposed, stand_in.has_bias) == (True, True, False)
    assert stand_in.projections == ("gate_up_proj", "down_proj")
    # (E, out, in) codes whatever the source's (E, in, out) layout
    assert stand_in.gate_up_proj.shape == (N_EXPERTS, 2 * 37, HIDDEN)
    assert stand_in.down_proj.shape == (N_EXPERTS, HIDDEN, 37)


@pytest.mark.parametrize("kind", list(_swaps()))
def test_each_stand_in_computes_the_class_forward_on_its_weights(kind):
    experts = _all_experts(_model())[0]
    x = _routed_rows()
    stand_in = _swaps()[kind](copy.deepcopy(experts))
    weights = stand_in.to_experts()  # Llama4TextExperts holding what the stand-in computes with
    assert type(weights) is type(experts)
    # the layout flags fastkd read are not written onto the class's own module
    assert not any(hasattr(weights, f) for f in ("has_gate", "is_transposed", "has_bias"))
    out = stand_in(x)
    assert out.shape == x.shape
    if kind == "int8_w8a8":  # activations quantized per token: close, not equal
        ref = weights(x)
        assert 10 * torch.log10(ref.pow(2).sum() / (out - ref).pow(2).sum()) > 30
    else:
        torch.testing.assert_close(out, weights(x), rtol=1e-5, atol=1e-6)
    zero_rows = x.eq(0).all(-1)
    assert zero_rows.any() and not out[zero_rows].any()  # unrouted: exactly zero, as the class


def test_zero_rows_are_left_out_and_gradients_match_the_class():
    experts = _all_experts(_model())[0]
    masked = MaskedExperts.from_experts(copy.deepcopy(experts), sparsity=0.5)
    reference = masked.to_experts()
    seen = []
    masked.act_fn.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    x = _routed_rows()
    x_ref = x.clone().requires_grad_()
    x = x.clone().requires_grad_()
    out = masked(x)
    live = int(x.ne(0).any(-1).sum())
    assert sum(seen) == live < x.shape[0]  # only the routed rows ran through the experts
    grad = torch.randn_like(out)
    out.backward(grad)
    ref = reference(x_ref)
    ref.backward(grad)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    for p in masked.projections:  # the pruned weights' gradient is W o M's
        mask = getattr(masked, f"{p}_mask")
        torch.testing.assert_close(getattr(masked, p).grad,
                                   getattr(reference, p).grad * mask, rtol=1e-5, atol=1e-6)


def _rows_through_experts(model, ids):
    rows = []
    hooks = [m.act_fn.register_forward_hook(lambda mod, i, o: rows.append(i[0].shape[0]))
             for m in model.modules() if isinstance(m, MaskedExperts)]
    with torch.no_grad():
        out = model(ids).logits
    for h in hooks:
        h.remove()
    return sum(rows), out


def test_a_model_loaded_with_from_pretrained_still_leaves_out_the_zero_rows(tmp_path):
    """from_pretrained builds the stand-ins under the meta device: whether act(0) = 0 is still
    decided on the CPU, so the loaded model runs the routed rows only, as the saved one."""
    model = _model()
    fastkd.sparsify_(model, sparsity=0.5)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(3))
    (n_saved, out), (n_loaded, out_loaded) = (_rows_through_experts(m, ids)
                                              for m in (model, loaded))
    assert n_loaded == n_saved == 2 * ids.numel()  # one routed expert per token, two layers
    assert torch.equal(out_loaded, out)
    with torch.device("meta"):
        assert MaskedExperts(_all_experts(_model())[0])._zero_skip


def test_an_activation_nonzero_at_zero_keeps_every_row():
    """Sigmoid(0) = 1/2: a zero row's output is still zero (no bias) but its input gradient is
    not, so no row is left out."""
    experts = _all_experts(_model())[0]
    experts.act_fn = torch.nn.Sigmoid()
    masked = MaskedExperts.from_experts(copy.deepcopy(experts), sparsity=0.5)
    reference = masked.to_experts()
    x, x_ref = (_routed_rows().requires_grad_() for _ in range(2))
    grad = torch.randn(x.shape)
    masked(x).backward(grad)
    reference(x_ref).backward(grad)
    zero_rows = x.detach().eq(0).all(-1)
    assert x_ref.grad[zero_rows].abs().sum() > 0
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("swap, kind", [
    (lambda m: fastkd.quantize_(m, mode="w8a16"), Int8Experts),
    (lambda m: fastkd.sparsify_(m, sparsity=0.5), MaskedExperts),
    (lambda m: fastkd.share_weights_(m, bits=8), SharedExperts),
])
def test_whole_model_swaps_and_trains(swap, kind, tmp_path):
    model = _model()
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(3))
    swap(model)
    stand_ins = [m for m in model.modules() if type(m) is kind]
    assert len(stand_ins) == 2 and not _all_experts(model)
    with torch.no_grad():
        out = model(ids).logits
    decompressed = fastkd.decompress_(copy.deepcopy(model))  # the class's own experts again
    assert len(_all_experts(decompressed)) == 2
    with torch.no_grad():
        torch.testing.assert_close(decompressed(ids).logits, out, rtol=1e-4, atol=1e-5)
    # a checkpoint loads into a fresh Llama 4 skeleton, bit-exact
    fastkd.save_compressed(model, tmp_path / "m")
    fresh = fastkd.load_compressed(_model(seed=5), tmp_path / "m")
    assert sum(type(m) is kind for m in fresh.modules()) == 2
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, out)
    # gradients reach the router and the attention through the stand-ins
    model.train()
    model(ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "router" in n or "q_proj" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
                         for g in grads)


def test_int8_model_stays_close_to_the_float_model():
    model = _model()
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids).logits
    fastkd.quantize_(model, mode="w8a8")
    assert sum(type(m) is Int8Experts for m in model.modules()) == 2
    with torch.no_grad():
        out = model(ids).logits
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1), dim=-1)
    assert cos.min() > 0.999, cos


def test_compiles_whole_with_the_eager_result():
    torch._dynamo.reset()
    model = _model()
    fastkd.sparsify_(model, sparsity=0.5)
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids).logits
        out = torch.compile(model, backend="eager", fullgraph=True)(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_bad_input():
    masked = MaskedExperts.from_experts(_all_experts(_model())[0], sparsity=0.5)
    with pytest.raises(ValueError, match="expert by expert"):
        masked(torch.randn(N_EXPERTS * 3 + 1, HIDDEN))
    with pytest.raises(ValueError, match="expert by expert"):
        masked(torch.randn(2, N_EXPERTS, HIDDEN))
    with pytest.raises(TypeError, match="top_k_weights"):
        masked(torch.randn(N_EXPERTS, HIDDEN), torch.zeros(N_EXPERTS, 1, dtype=torch.long))


def test_distiller_fused_lm_head_trains_a_pruned_llama4_student_like_the_unfused_loss():
    """fused_lm_head runs the body and hands its hidden states to the fused loss: Llama 4's
    causal LM has no base_model of its own (its prefix names a language_model it does not
    hold); its body is .model."""
    teacher = _model(seed=0)
    student = _model(seed=1)
    fastkd.sparsify_(student, sparsity=0.5)
    g = torch.Generator().manual_seed(4)
    batches = [{"input_ids": ids, "labels": ids}
               for ids in torch.randint(0, 61, (2, 3, 9), generator=g)]
    losses, states = [], []
    for fused in (False, True):
        s = copy.deepcopy(student)
        d = fastkd.Distiller(teacher, s, fused_lm_head=fused, progress=False, backend="torch",
                             optimizer=lambda params: torch.optim.SGD(params, lr=0.1))
        losses.append([h["train_loss"] for h in d.fit(batches, epochs=2)])
        states.append(s.state_dict())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-6)
    for name in states[0]:
        torch.testing.assert_close(states[1][name], states[0][name], rtol=1e-3, atol=1e-5,
                                   msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["int8_w8a16", "int8_w8a8", "masked", "shared"])
def test_gpu_bf16_stand_ins_match_the_class_forward(kind):
    """On the GPU in bf16 (the Triton / CUDA kernels behind each stand-in): the class's own
    forward on the weights each computes with, to bf16 rounding."""
    experts = _all_experts(_model())[0]
    stand_in = _swaps()[kind](copy.deepcopy(experts)).cuda().to(torch.bfloat16)
    weights = stand_in.to_experts().cuda().to(torch.bfloat16)
    x = _routed_rows(tokens=37).cuda().to(torch.bfloat16)
    out, ref = stand_in(x), weights(x)
    assert out.dtype == torch.bfloat16
    if kind.startswith("int8"):  # the class rounds its dequantized weights to bf16 first
        sqnr = 10 * torch.log10(ref.float().pow(2).sum() / (out - ref).float().pow(2).sum())
        assert sqnr > (30 if kind == "int8_w8a8" else 38), float(sqnr)  # CPU: 37.0 / 44.3 dB
    else:
        torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
