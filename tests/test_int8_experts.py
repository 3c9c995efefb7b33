"""Int8Experts: quantize_ takes the experts of transformers' Mixture-of-Experts blocks (3-D
stacked weights, most of such a model's parameters), which it used to leave float. Checked on
tiny Mixtral, Qwen3-MoE, gpt-oss (transposed weights, biases, its own gate) and DeepSeek-V3
against the transformers class's own eager forward."""

import copy
import warnings

import pytest
import torch

import fastkd
from fastkd.nn import Int8Experts
from fastkd.nn.int8_experts import is_stacked_experts

from _util import HAS_CUDA, needs_triton

try:
    import transformers
except ImportError:  # the toy experts below still run
    transformers = None


class _ToyExperts(torch.nn.Module):
    """Experts laid out and flagged as transformers' use_experts_implementation does (gated,
    optionally transposed with biases), without transformers: for the kernel and GPU tests."""

    def __init__(self, n_experts=5, hidden=24, inner=37, transposed=False, bias=False):
        super().__init__()
        self.num_experts, self.has_gate, self.has_bias = n_experts, True, bias
        self.is_transposed, self.has_post_expert_norm = transposed, False
        self.is_concatenated = True
        g = torch.Generator().manual_seed(7)
        up, down = (2 * inner, hidden), (hidden, inner)
        if transposed:
            up, down = up[::-1], down[::-1]
        self.gate_up_proj = torch.nn.Parameter(torch.randn(n_experts, *up, generator=g) * 0.2)
        self.down_proj = torch.nn.Parameter(torch.randn(n_experts, *down, generator=g) * 0.2)
        if bias:
            self.gate_up_proj_bias = torch.nn.Parameter(torch.randn(n_experts, 2 * inner) * 0.1)
            self.down_proj_bias = torch.nn.Parameter(torch.randn(n_experts, hidden) * 0.1)
        self.act_fn = torch.nn.SiLU()

    def _apply_gate(self, h):
        gate, up = h.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def forward(self, x, idx, w):
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            token, slot = torch.where(idx == e)
            up, down = self.gate_up_proj[e], self.down_proj[e]
            if self.is_transposed:
                up, down = up.t(), down.t()
            b = ((self.gate_up_proj_bias[e], self.down_proj_bias[e]) if self.has_bias
                 else (None, None))
            h = self._apply_gate(torch.nn.functional.linear(x[token], up, b[0]))
            h = torch.nn.functional.linear(h, down, b[1]) * w[token, slot, None]
            out.index_add_(0, token, h.to(out.dtype))
        return out


def _configs(intermediate):
    T = transformers
    att = dict(vocab_size=61, hidden_size=24, num_hidden_layers=2, num_attention_heads=4)
    return {
        "mixtral": lambda: T.MixtralForCausalLM(T.MixtralConfig(
            **att, intermediate_size=intermediate, num_key_value_heads=2, num_local_experts=5)),
        "qwen3_moe": lambda: T.Qwen3MoeForCausalLM(T.Qwen3MoeConfig(
            **att, moe_intermediate_size=intermediate, intermediate_size=40,
            num_key_value_heads=2, num_experts=5, num_experts_per_tok=2, head_dim=6)),
        "gpt_oss": lambda: T.GptOssForCausalLM(T.GptOssConfig(
            **att, intermediate_size=intermediate, num_key_value_heads=2, num_local_experts=5,
            num_experts_per_tok=2, head_dim=6)),
        "deepseek_v3": lambda: T.DeepseekV3ForCausalLM(T.DeepseekV3Config(
            **att, intermediate_size=40, moe_intermediate_size=intermediate,
            num_key_value_heads=4, n_routed_experts=5, num_experts_per_tok=2, n_group=1,
            topk_group=1, first_k_dense_replace=1, kv_lora_rank=8, q_lora_rank=8,
            qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=6)),
    }


ARCHS = ["deepseek_v3", "gpt_oss", "mixtral", "qwen3_moe"]


def _model(arch, intermediate=40, seed=0):
    if transformers is None:
        pytest.skip("needs transformers")
    build = _configs(intermediate).get(arch)
    if build is None or not hasattr(transformers, {
            "mixtral": "MixtralConfig", "qwen3_moe": "Qwen3MoeConfig", "gpt_oss": "GptOssConfig",
            "deepseek_v3": "DeepseekV3Config"}[arch]):
        pytest.skip(f"this transformers has no {arch}")
    torch.manual_seed(seed)
    model = build().eval()
    with torch.no_grad():  # transformers initialises expert weights with a small std; make the
        for m in model.modules():  # gate and the biases matter
            for name, p in m.named_parameters(recurse=False):
                if is_stacked_experts(m) and name.endswith("_bias"):
                    p.normal_(std=0.05)
    if not any(is_stacked_experts(m) for m in model.modules()):
        pytest.skip(f"this transformers keeps {arch}'s experts as separate layers")
    return model


def _reloaded(model, ids, tmp_path, kind):
    """``model`` saved with save_compressed and loaded into a fresh Mixtral (another seed): its
    experts are ``kind`` again and give the same logits on ``ids``, bit for bit."""
    with torch.no_grad():
        ref = model(ids).logits
    fastkd.save_compressed(model, tmp_path / "m.safetensors")
    fresh = _model("mixtral", seed=5)
    fastkd.load_compressed(fresh, tmp_path / "m.safetensors")
    assert all(isinstance(layer.mlp.experts, kind) for layer in fresh.model.layers)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, ref)
    return fresh, ref


def _eager(experts, *args):
    """The transformers class's own loop over experts (its grouped_mm default needs
    16-byte-aligned strides on the CPU)."""
    return type(experts).forward.__wrapped__(experts, *args)


def _routing(n_tokens, n_experts, seed=1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(n_experts, generator=g)[:2] for _ in range(n_tokens)])
    return idx, torch.rand(n_tokens, 2, generator=g)


@pytest.mark.parametrize("arch", ARCHS)
def test_experts_match_the_class_own_forward_on_dequantized_weights(arch):
    model = _model(arch, intermediate=37)  # odd expert width
    experts = next(m for m in model.modules() if is_stacked_experts(m))
    x = torch.randn(13, 24, generator=torch.Generator().manual_seed(2))
    idx, w = _routing(13, experts.num_experts)
    ref = _eager(experts, x, idx, w)
    for mode in ("w8a16", "w8a8"):
        q = Int8Experts.from_experts(experts, mode=mode)
        for p in q.projections:  # int8 codes (E, out, in) whatever the source layout
            assert getattr(q, p).dtype == torch.int8
            assert getattr(q, f"{p}_scale").dtype == torch.float32
        out = q(x, idx, w)
        dequantized = q.to_experts()
        assert type(dequantized) is type(experts)
        # w8a16 computes exactly what the class computes with the dequantized weights
        if mode == "w8a16":
            torch.testing.assert_close(out, _eager(dequantized, x, idx, w), rtol=1e-5, atol=1e-6)
        sqnr = 10 * torch.log10(ref.pow(2).sum() / (out - ref).pow(2).sum())
        assert sqnr > (34 if mode == "w8a16" else 28), (mode, float(sqnr))


def test_unrouted_experts_and_sentinels_contribute_nothing():
    model = _model("mixtral")
    experts = model.model.layers[0].mlp.experts
    q = Int8Experts.from_experts(experts, mode="w8a16")
    x = torch.randn(4, 24)
    idx = torch.tensor([[0, 1], [1, 0], [0, 5], [5, 1]])  # 5 = num_experts: not on this rank
    w = torch.rand(4, 2)
    out = q(x, idx, w)
    ref = _eager(q.to_experts(), x, idx, w)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(q(x[:0], idx[:0], w[:0]), x[:0])  # no tokens


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
def test_quantize_takes_the_experts_of_a_moe_model(arch, mode):
    model = _model(arch)
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(3))
    model.config._experts_implementation = "eager"
    with torch.no_grad():
        ref = model(ids).logits
    n_experts = sum(is_stacked_experts(m) for m in model.modules())
    float_bytes = fastkd.size_report(model)["total_bytes"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is left float with a warning
        warnings.filterwarnings("ignore", ".*tied embeddings")
        fastkd.quantize_(model, mode=mode)
    assert sum(type(m) is Int8Experts for m in model.modules()) == n_experts
    assert not any(p.dim() == 3 for p in model.parameters())
    assert fastkd.size_report(model)["total_bytes"] < 0.4 * float_bytes
    with torch.no_grad():
        out = model(ids).logits
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1), dim=-1)
    assert cos.min() > 0.999, cos
    # gradients reach the router and the attention through the int8 experts
    model.train()
    model(ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "gate" in n or "q_proj" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_the_filter_sees_the_experts_module_and_can_leave_it_float():
    model = _model("mixtral")
    seen = []
    with warnings.catch_warnings():  # left out by the filter: the user's choice, quiet
        warnings.simplefilter("error")
        fastkd.quantize_(model, filter_fn=lambda m, n: seen.append(n) or "experts" not in n)
    assert "model.layers.0.mlp.experts" in seen
    assert not any(type(m) is Int8Experts for m in model.modules())
    assert type(model.model.layers[0].self_attn.q_proj) is fastkd.nn.Int8Linear



@pytest.mark.filterwarnings("ignore:.*tied embeddings")
@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_checkpoint_round_trip_and_decompress(arch, tmp_path):
    model = _model(arch)
    model.config._experts_implementation = "eager"
    fastkd.quantize_(model, mode="w8a8")
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(ids).logits
    fastkd.save_compressed(model, tmp_path / arch)
    for meta in (False, True):  # a skeleton with real weights, and one with meta parameters
        skeleton = _model(arch, seed=5)
        if meta:
            for m in skeleton.modules():
                for name, p in list(m.named_parameters(recurse=False)):
                    setattr(m, name, torch.nn.Parameter(p.to("meta"), requires_grad=False))
        skeleton.config._experts_implementation = "eager"
        loaded = fastkd.load_compressed(skeleton, tmp_path / arch)
        assert sum(type(m) is Int8Experts for m in loaded.modules()) == 2
        assert not any(t.is_meta for t in (*loaded.parameters(), *loaded.buffers()))
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, ref)
    fastkd.decompress_(loaded)
    assert not any(type(m) is Int8Experts for m in loaded.modules())
    plain = _model(arch, seed=6)
    plain.config._experts_implementation = "eager"
    plain.load_state_dict(loaded.state_dict(), strict=True)
    with torch.no_grad():
        out = plain(ids).logits
    assert torch.equal(out, loaded(ids).logits)
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1), dim=-1)
    assert cos.min() > 0.999  # w8a8 no longer quantizes activations once decompressed


def test_bf16_keeps_fp32_scales_and_deepcopy_and_torch_save_work(tmp_path):
    model = _model("mixtral")
    model.config._experts_implementation = "eager"
    fastkd.quantize_(model, mode="w8a16")
    model = model.to(torch.bfloat16)
    q = model.model.layers[0].mlp.experts
    assert q.gate_up_proj_scale.dtype == torch.float32 and q.gate_up_proj.dtype == torch.int8
    ids = torch.randint(0, 61, (2, 9))
    with torch.no_grad():
        out = model(ids).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.save(copy.deepcopy(model), tmp_path / "m.pt")
    back = torch.load(tmp_path / "m.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, out)


def test_bad_input():
    with pytest.raises(TypeError, match="transformers experts module"):
        Int8Experts(torch.nn.Linear(4, 4))
    model = _model("mixtral")
    with pytest.raises(ValueError, match="mode"):
        Int8Experts(model.model.layers[0].mlp.experts, mode="w4a16")
    q = Int8Experts.from_experts(_ToyExperts())
    idx, w = _routing(3, 5)
    with pytest.raises(ValueError, match=r"hidden_states must be \(tokens, 24\)"):
        q(torch.randn(3, 23), idx, w)
    with pytest.raises(TypeError, match="hidden_states"):
        q(torch.ones(3, 24, dtype=torch.int32), idx, w)


@pytest.mark.parametrize("bias", [False, True])
def test_w8a8_without_a_gradient_quantizes_the_tokens_once_with_the_same_result(bias,
                                                                               monkeypatch):
    """Inference quantizes every token once for all the up projections (per-token scales do
    not depend on the expert) and runs one scaled int8 GEMM per expert: the same bits as
    int8_linear per expert, which training needs for its straight-through gradient."""
    from fastkd import _ops

    q = Int8Experts.from_experts(_ToyExperts(bias=bias), mode="w8a8")
    x = torch.randn(13, 24)
    idx, w = _routing(13, 5)
    calls = []
    real = _ops.call
    monkeypatch.setattr(_ops, "call", lambda name, *a: calls.append(name) or real(name, *a))
    with torch.no_grad():
        fast = q(x, idx, w)
    assert calls.count("quantize_per_token") == 1 and "int8_mm_scaled" in calls
    calls.clear()
    x_grad = x.clone().requires_grad_()
    trained = q(x_grad, idx, w)
    assert "quantize_per_token" not in calls and "int8_linear_w8a8" in calls
    assert torch.equal(fast, trained.detach())
    trained.sum().backward()
    assert x_grad.grad is not None and x_grad.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_w8a8_trains_expert_biases_under_a_frozen_input(backend):
    """The inference shortcut was taken whenever the tokens needed no gradient, though the
    up projections' biases did: their gradient was lost (Triton) or came through torch's
    deprecated fallback for ops without autograd (reference)."""
    from _util import device_for

    dev = device_for(backend)
    experts = _ToyExperts(transposed=True, bias=True).to(dev)
    x = torch.randn(9, 24, device=dev)  # a frozen model below: no gradient wanted for x
    idx, w = (t.to(dev) for t in _routing(9, 5))
    grads = []
    for x_grad in (False, True):
        q = Int8Experts.from_experts(experts, mode="w8a8", backend=backend)
        q(x.clone().requires_grad_(x_grad), idx, w).sum().backward()
        grads.append((q.gate_up_proj_bias.grad, q.down_proj_bias.grad))
    for frozen, free in zip(*grads):
        assert frozen is not None and frozen.abs().sum() > 0
        torch.testing.assert_close(frozen, free)


@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
@pytest.mark.parametrize("x_grad", [False, True])
def test_expert_bias_gradients_match_the_float_experts(mode, x_grad):
    """The quantized experts' bias gradients are the float experts' on the same routing and
    loss (a different upstream gradient per token): the down projection's does not depend on
    the weights (the routing weight times the upstream gradient, summed over the expert's
    tokens), so it matches to rounding; the up projection's goes through the activation at
    quantized pre-activations, so it matches to the quantization error."""
    torch.manual_seed(3)  # the toy experts' biases
    experts = _ToyExperts(transposed=True, bias=True)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(9, 24, generator=g)
    upstream = torch.randn(9, 24, generator=g)
    idx, w = _routing(9, 5)
    q = Int8Experts.from_experts(experts, mode=mode)
    (experts(x.clone().requires_grad_(x_grad), idx, w) * upstream).sum().backward()
    (q(x.clone().requires_grad_(x_grad), idx, w) * upstream).sum().backward()
    torch.testing.assert_close(q.down_proj_bias.grad, experts.down_proj_bias.grad,
                               rtol=1e-5, atol=1e-6)
    ref = experts.gate_up_proj_bias.grad
    err = (q.gate_up_proj_bias.grad - ref).abs().max()
    assert ref.abs().max() > 0.1 and err <= 0.05 * ref.abs().max(), float(err)


def test_int8_mm_scaled_bias_gradient_is_the_upstream_gradient_summed_over_tokens():
    # int8_mm_scaled (the w8a8 experts' inference GEMM on tokens quantized once) takes an
    # optional bias; its gradient is dY summed over the rows (the experts only call it where
    # no bias needs a gradient, so this is checked on the op itself)
    g = torch.Generator().manual_seed(5)
    x_q = torch.randint(-127, 128, (6, 24), generator=g, dtype=torch.int8)
    x_s = torch.rand(6, generator=g) * 0.02 + 1e-3
    w_q = torch.randint(-127, 128, (10, 24), generator=g, dtype=torch.int8)
    w_s = torch.rand(10, generator=g) * 0.02 + 1e-3
    bias = torch.randn(10, generator=g).requires_grad_()
    upstream = torch.randn(6, 10, generator=g)
    out = torch.ops.fastkd.int8_mm_scaled(x_q, x_s, w_q, w_s, bias, torch.float32, "torch")
    exact = (x_q.double() @ w_q.double().t()) * x_s.double()[:, None] * w_s.double() \
        + bias.detach().double()
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-6)
    (out * upstream).sum().backward()
    torch.testing.assert_close(bias.grad, upstream.sum(0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("transposed, bias", [(False, False), (True, True)])
def test_toy_experts_without_transformers(transposed, bias):
    experts = _ToyExperts(transposed=transposed, bias=bias)
    assert is_stacked_experts(experts)
    x = torch.randn(11, 24)
    idx, w = _routing(11, 5)
    q = Int8Experts.from_experts(experts, mode="w8a16")
    torch.testing.assert_close(q(x, idx, w), q.to_experts()(x, idx, w), rtol=1e-5, atol=1e-5)
    # extra state, a missing gate or wrong shapes: not experts this class understands
    odd = _ToyExperts()
    odd.register_buffer("extra", torch.zeros(3))
    assert not is_stacked_experts(odd)
    odd = _ToyExperts()
    odd.down_proj = torch.nn.Parameter(torch.zeros(5, 24, 36))
    assert not is_stacked_experts(odd)


@needs_triton
@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
def test_triton_backend_matches_the_reference(mode):
    from _util import DEVICE

    experts = _ToyExperts(transposed=True, bias=True).to(DEVICE)
    x = torch.randn(9, 24, device=DEVICE)
    idx, w = (t.to(DEVICE) for t in _routing(9, 5))
    got = Int8Experts.from_experts(experts, mode=mode, backend="triton")(x, idx, w)
    want = Int8Experts.from_experts(experts, mode=mode, backend="torch")(x, idx, w)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
def test_gpu_experts_bf16(mode):
    experts = _ToyExperts(n_experts=8, hidden=1000, inner=1403, bias=True).cuda()
    x = torch.randn(300, 1000, device="cuda", dtype=torch.bfloat16)
    idx, w = (t.cuda() for t in _routing(300, 8))
    q = Int8Experts.from_experts(experts, mode=mode).to(torch.bfloat16)
    out = q(x, idx, w)
    ref = experts.double()(x.double(), idx, w.double())
    sqnr = 10 * torch.log10(ref.pow(2).sum() / (out.double() - ref).pow(2).sum())
    assert out.dtype == torch.bfloat16 and sqnr > (30 if mode == "w8a16" else 25), float(sqnr)


def test_compiles_with_the_same_result():
    experts = _ToyExperts(bias=True)
    q = Int8Experts.from_experts(experts, mode="w8a8")
    x = torch.randn(7, 24)
    idx, w = _routing(7, 5)
    torch.testing.assert_close(torch.compile(q)(x, idx, w), q(x, idx, w))


def test_meta_weights_and_float_state_dicts_get_clear_errors():
    with pytest.raises(ValueError, match="meta device"):
        Int8Experts(_ToyExperts().to("meta"))
    experts = _ToyExperts()
    q = Int8Experts.from_experts(experts)
    with pytest.raises(RuntimeError, match=r"gate_up_proj in the state_dict is float32, not int8"):
        q.load_state_dict(experts.state_dict(), strict=False)
