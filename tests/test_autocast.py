"""fastkd's layers and losses inside ``torch.autocast`` behave as the torch layers they replace.

Custom ops are not cast by autocast, and their Python implementations sit below autocast's layer
of the dispatcher, so without care an enclosing autocast (a) left fastkd's linears in fp32 where
``nn.Linear`` computes in bf16 (on a GPU, the slow fp32 kernel paths), and (b) re-cast the aten
ops inside the implementations: the exact-integer W8A8 reference ran its fp32 products in bf16
and came back off by ~5e-3. The public functions now apply autocast's input cast (as F.linear
does) and every op implementation runs with autocast off.
"""

import pytest
import torch
from torch import nn

import fastkd.functional as FK
from fastkd.nn import Int8Linear, MaskedLinear, SharedLinear

from _util import DEVICE, needs_triton

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False


def _linear(k=75, n=37, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n)


LAYERS = {
    "int8_w8a8": lambda lin: Int8Linear.from_linear(lin, mode="w8a8"),
    "int8_w8a16": lambda lin: Int8Linear.from_linear(lin, mode="w8a16"),
    "shared_layer": lambda lin: SharedLinear.from_linear(lin, bits=4),
    "shared_channel": lambda lin: SharedLinear.from_linear(lin, bits=3, per_channel=True),
}


def _cpu_autocast_supports(dtype):
    try:
        with torch.autocast("cpu", dtype=dtype):
            return (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == dtype
    except Exception:
        return False


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layers_compute_in_the_autocast_dtype_like_nn_linear(name):
    lin = _linear()
    layer = LAYERS[name](lin)
    x = torch.randn(3, 5, 75)
    with torch.no_grad():
        want = layer(x.bfloat16())  # outside autocast, bf16 activations
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = layer(x)
            ref_dtype = lin(x).dtype
    assert got.dtype == ref_dtype == torch.bfloat16
    assert torch.equal(got, want)  # bit for bit: W8A8 stays exact integer arithmetic


@pytest.mark.parametrize("compiled", [False, True])
def test_backward_rules_keep_their_fp32_math_inside_autocast(compiled):
    """The shared linear's codebook gradient is an fp32 product; a backward run inside autocast
    (or traced by torch.compile under it) recast it to bf16: ~1e-3 off, where outside autocast
    it is exact to fp32."""
    layer = SharedLinear.from_linear(_linear(k=256, n=64, seed=2), bits=4)
    x = torch.randn(64, 256)
    gy = torch.randn(64, 64)
    run = torch.compile(layer, backend="aot_eager", fullgraph=True) if compiled else layer
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = run(x)
        (y.float() * gy).sum().backward()  # inside autocast
    got = layer.codebook.grad.clone()
    layer.codebook.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    (y.float() * gy).sum().backward()  # outside: the eager reference
    torch.testing.assert_close(got, layer.codebook.grad, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_gradients_under_autocast_reach_fp32_inputs(name):
    layer = LAYERS[name](_linear(seed=1))
    x = torch.randn(4, 75, requires_grad=True)
    xb = x.detach().bfloat16().requires_grad_()
    gy = torch.randn(4, 37)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.backward(gy.bfloat16())
    layer(xb).backward(gy.bfloat16())
    assert x.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, xb.grad.float(), rtol=0, atol=0)


def test_masked_linear_under_autocast_matches_nn_linear_dtype():
    lin = _linear(seed=2)
    layer = MaskedLinear.from_linear(lin, sparsity=0.5)
    x = torch.randn(6, 75)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x)
        want = nn.functional.linear(x, layer.weight * layer.mask, layer.bias)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("op", ["int8_linear_w8a8", "int8_linear_w8a16"])
def test_op_implementations_ignore_an_enclosing_autocast(op):
    """The ops themselves (below the public functions' cast): fp32 in, the fp32 answer out."""
    from fastkd.functional import quantize_weight

    torch.manual_seed(3)
    w_q, w_s = quantize_weight(torch.randn(37, 75))
    x = torch.randn(9, 75)
    fn = getattr(torch.ops.fastkd, op).default
    want = fn(x, w_q, w_s, None, "torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fn(x, w_q, w_s, None, "torch")
    assert got.dtype == torch.float32
    assert torch.equal(got, want)


@needs_triton
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.skipif(DEVICE == "cpu" and not _cpu_autocast_supports(torch.float16),
                    reason="no fp16 CPU autocast")
@pytest.mark.parametrize("name", ["int8_w8a8", "int8_w8a16", "shared_layer"])
def test_triton_path_under_fp16_autocast(name):
    """On a GPU the compiled kernels, else the interpreter (which has no bf16: fp16 here)."""
    layer = LAYERS[name](_linear(k=33, n=19, seed=4)).to(DEVICE)
    layer.backend = "triton"
    x = torch.randn(5, 33, device=DEVICE)
    with torch.no_grad():
        want = layer(x.half())
        with torch.autocast(DEVICE, dtype=torch.float16):
            got = layer(x)
    assert got.dtype == torch.float16
    assert torch.equal(got, want)


def test_kd_loss_is_unchanged_by_autocast():
    torch.manual_seed(5)
    s = torch.randn(7, 300, requires_grad=True)
    t = torch.randn(7, 300)
    y = torch.randint(0, 300, (7,))
    want = FK.kd_loss(s, t, y, temperature=2.0)
    (gw,) = torch.autograd.grad(want, s)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = FK.kd_loss(s, t, y, temperature=2.0)
    (gg,) = torch.autograd.grad(got, s)
    assert got.dtype == torch.float32
    assert torch.equal(got, want) and torch.equal(gg, gw)


@pytest.mark.parametrize("bf16_hidden", [False, True])
def test_fused_linear_kd_under_autocast_equals_the_autocast_lm_heads(bf16_hidden):
    """fp32 master weights, as in mixed-precision training: the lm-head products run in bf16,
    the weights' gradients come back fp32, and bf16 hidden states are accepted."""
    torch.manual_seed(6)
    n, hs_dim, ht_dim, v = 23, 40, 56, 301
    ws = torch.randn(v, hs_dim, requires_grad=True)
    bs = torch.randn(v, requires_grad=True)
    wt = torch.randn(v, ht_dim)
    hs0 = torch.randn(n, hs_dim) * 0.3
    ht = torch.randn(n, ht_dim) * 0.3
    y = torch.randint(0, v, (n,))
    y[3] = -100
    if bf16_hidden:
        hs0, ht = hs0.bfloat16(), ht.bfloat16()
    hs = hs0.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = FK.fused_linear_kd_loss(hs, ws, ht, wt, y, student_bias=bs, temperature=2.0,
                                      chunk_rows=7)
    got.backward()
    g_fused = (hs.grad, ws.grad, bs.grad)
    ws2, bs2 = ws.detach().clone().requires_grad_(), bs.detach().clone().requires_grad_()
    hs2 = hs0.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s_logits = nn.functional.linear(hs2, ws2, bs2)
        t_logits = nn.functional.linear(ht, wt)
        assert s_logits.dtype == torch.bfloat16
        want = FK.kd_loss(s_logits, t_logits, y, temperature=2.0)
    want.backward()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_fused, (hs2.grad, ws2.grad, bs2.grad)):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-3)
    assert ws.grad.dtype == torch.float32
    # outside autocast a dtype mismatch stays an error, as in F.linear
    if bf16_hidden:
        with pytest.raises(TypeError, match="dtype of its weight"):
            FK.fused_linear_kd_loss(hs, ws, ht, wt, y)


@pytest.mark.parametrize("name", ["int8_w8a8", "shared_layer"])
def test_compiled_layer_under_autocast_matches_eager(name):
    layer = LAYERS[name](_linear(seed=7))
    x = torch.randn(4, 75)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = layer(x)
        got = compiled(x)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want)
