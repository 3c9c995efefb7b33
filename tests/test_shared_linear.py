"""SharedLinear / share_weights_: reference vs Triton (interpreter), gradients, zeros, round trips."""

import io

import pytest
import torch
from torch import nn

import fastkd
from fastkd import functional as FK
from fastkd.nn import SharedLinear
from fastkd.reference.shared_linear import pack_indices, shared_dequantize, unpack_indices
from fastkd.sharing import kmeans_1d

from _util import device_for, needs_triton

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False


def _layer(n=19, k=37, bits=4, per_channel=False, bias=True, prune=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.2)
        lin.weight.mul_(torch.rand(n, k, generator=g) > prune)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=g))
    return lin, SharedLinear.from_linear(lin, bits=bits, per_channel=per_channel)


@pytest.mark.parametrize("bits", [1, 3, 4, 5, 8])
@pytest.mark.parametrize("k", [1, 7, 10])
def test_pack_roundtrip(bits, k):
    idx = torch.randint(0, 2**bits, (5, k), dtype=torch.uint8)
    packed = pack_indices(idx, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (5, (k + 1) // 2 if bits <= 4 else k)
    assert torch.equal(unpack_indices(packed, k, bits), idx.long())


@pytest.mark.parametrize("bits", [1, 3, 4, 5, 8])
@pytest.mark.parametrize("k", [1, 7, 10])
@pytest.mark.parametrize("per_channel", [False, True])
def test_dequantize_is_the_codebook_lookup(bits, k, per_channel):
    # The byte-table lookup against the definition: W[n, k] = codebook[(n,) idx[n, k]], entry 0
    # exactly 0 whatever the codebook holds there (here it holds -3.5, and a nan elsewhere).
    g = torch.Generator().manual_seed(bits * 100 + k)
    n, c = 6, 2**bits
    idx = torch.randint(0, c, (n, k), generator=g, dtype=torch.uint8)
    cb = torch.randn((n, c) if per_channel else (c,), generator=g)
    cb[..., 0] = -3.5
    if c > 2:
        cb[..., c - 1] = float("nan")
    w = shared_dequantize(pack_indices(idx, bits), cb, k, bits)
    i = idx.long()
    expect = torch.gather(cb, 1, i) if per_channel else cb[i]
    expect = torch.where(i == 0, 0.0, expect)
    assert w.shape == (n, k) and w.dtype == torch.float32
    assert torch.equal(w.isnan(), expect.isnan())
    assert torch.equal(torch.nan_to_num(w), torch.nan_to_num(expect))
    assert not torch.signbit(w[i == 0]).any()  # +0.0, as the kernels give


def test_kmeans_1d_beats_uniform_grid_and_keeps_zeros():
    torch.manual_seed(0)
    w = torch.randn(3, 500) ** 3  # heavy tails: a uniform grid fits them badly
    cent, assign = kmeans_1d(w, 15)
    err = ((cent.gather(1, assign) - w) ** 2).mean()
    lo, hi = w.min(1, keepdim=True).values, w.max(1, keepdim=True).values
    grid = lo + (hi - lo) * torch.linspace(0, 1, 15)[None]
    grid_err = ((grid.gather(1, torch.searchsorted(((grid[:, 1:] + grid[:, :-1]) / 2).contiguous(), w)) - w) ** 2).mean()
    assert err < 0.5 * grid_err
    # pruned weights stay exactly zero through from_linear
    lin, sl = _layer(prune=0.5, bits=3)
    wq = sl.dequantized_weight()
    assert torch.equal(wq == 0, lin.weight == 0)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bits", [2, 4, 6])
def test_from_linear_reconstructs_weight(bits, per_channel):
    lin, sl = _layer(bits=bits, per_channel=per_channel)
    wq = sl.dequantized_weight()
    # every weight maps to its nearest centroid (1-D k-means fixed point assignment)
    cb = sl.codebook.detach() if per_channel else sl.codebook.detach()[None].expand(19, -1)
    nz = lin.weight != 0
    dist = (lin.weight.detach()[..., None] - cb[:, None, 1:]).abs()
    best = dist.min(-1).values
    assert torch.allclose((wq - lin.weight).abs()[nz], best[nz], atol=1e-6)
    rel = (wq - lin.weight).norm() / lin.weight.norm()
    # Lloyd-Max optimum for a Gaussian: ~0.44 (3 levels), ~0.08 (15), ~0.03 (63, fewer iterations
    # than needed to converge on ~500 values)
    assert rel < {2: 0.5, 4: 0.12, 6: 0.06}[bits]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("per_channel", [False, True])
def test_torch_forward_matches_dense(dtype, per_channel):
    lin, sl = _layer(per_channel=per_channel)
    x = torch.randn(3, 5, 37).to(dtype)
    w = sl.dequantized_weight()
    ref = torch.nn.functional.linear(x.double(), w.double(), sl.bias.double())
    y = FK.shared_linear(
        x, sl.indices, sl.codebook, sl.bias, in_features=37, bits=4, backend="torch"
    )
    assert y.dtype == dtype and y.shape == (3, 5, 19)
    tol = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.float16, 2e-2)])
@pytest.mark.parametrize("bits, per_channel, bias", [(4, False, True), (3, True, False), (6, True, True)])
def test_triton_matches_reference(dtype, tol, bits, per_channel, bias):
    dev = device_for("triton")
    lin, sl = _layer(n=21, k=45, bits=bits, per_channel=per_channel, bias=bias)
    sl = sl.to(dev)
    x = torch.randn(13, 45, device=dev).to(dtype)
    args = (x, sl.indices, sl.codebook, sl.bias)
    y_tr = FK.shared_linear(*args, in_features=45, bits=bits, backend="triton")
    w = sl.dequantized_weight().double()
    ref = torch.nn.functional.linear(x.double(), w, None if sl.bias is None else sl.bias.double())
    y_torch = FK.shared_linear(*args, in_features=45, bits=bits, backend="torch")
    err_tr = (y_tr.double() - ref).abs().max()
    err_torch = (y_torch.double() - ref).abs().max()
    assert y_tr.dtype == dtype
    assert err_tr <= max(2 * err_torch, tol * ref.abs().max())


def _random_layer(n, k, bits, per_channel, bias, dev, seed=0):
    """Indices over the whole range and a random codebook whose entry 0 is NOT zero: the kernels
    must read it as 0 themselves."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8)
    cb = torch.randn((n, 2**bits) if per_channel else (2**bits,), generator=g)
    b = torch.randn(n, generator=g) if bias else None
    return pack_indices(idx, bits).to(dev), cb.to(dev), None if b is None else b.to(dev)


def _check_variant(variant, dtype, m, n, k, bits, per_channel, bias, config=None, seed=0):
    from fastkd.kernels import shared_linear as kernels

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    indices, cb, b = _random_layer(n, k, bits, per_channel, bias, dev, seed)
    x = torch.randn(m, k, device=dev).to(dtype)
    y = kernels.shared_linear_forward(x, indices, cb, b, k, bits, variant=variant, config=config)
    w = shared_dequantize(indices, cb, k, bits)
    ref = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    # the same-dtype torch computation sets the tolerance (it rounds W and y to dtype the same way)
    y_torch = FK.shared_linear(x, indices, cb, b, in_features=k, bits=bits, backend="torch")
    err = (y.double() - ref).abs().max().item()
    err_torch = (y_torch.double() - ref).abs().max().item()
    tol = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 8e-2}[dtype]
    tol *= max(1.0, ref.abs().max().item())
    assert y.dtype == dtype and y.shape == (m, n)
    assert err <= max(2 * err_torch, tol), (err, err_torch, tol)


# (m, n, k): M = 1 and odd, K odd and not a multiple of BLOCK_K (32 in the interpreter, 64-256 on
# GPU), N not a multiple of BLOCK_N (16 / 64-128), K = 1
V2_SHAPES = [(1, 19, 37), (13, 21, 45), (3, 5, 1)]
V2_LAYOUTS = [(4, False), (4, True), (3, True), (6, False), (6, True), (8, False)]


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("m, n, k", V2_SHAPES)
@pytest.mark.parametrize("bits, per_channel", V2_LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_triton_v2_fused_matches_reference(m, n, k, bits, per_channel, dtype, bias):
    _check_variant("v2_fused", dtype, m, n, k, bits, per_channel, bias)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("m, n, k", [(13, 21, 45), (1, 19, 37)])
@pytest.mark.parametrize("bits, per_channel", V2_LAYOUTS)
def test_triton_v2_dequant_matches_reference(m, n, k, bits, per_channel):
    _check_variant("v2_dequant", torch.float16, m, n, k, bits, per_channel, bias=True)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bits, per_channel", [(4, False), (4, True), (6, True)])
@pytest.mark.parametrize("split, steps", [(2, 1), (3, 2)])
def test_triton_v2_split_k(dtype, bits, per_channel, split, steps):
    """K split over programs (fp32 partials + the reduce kernel); a split of several K steps whose
    last one runs past K, odd M and N."""
    k = 32 * steps * (split - 1) + 19  # the last split is short and ends mid-tile
    cfg = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2,
           "split": split, "k_split": 32 * steps}
    _check_variant("v2_fused", dtype, 7, 23, k, bits, per_channel, True, config=cfg)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bits, per_channel", [(4, False), (6, True)])
def test_triton_v1_still_matches_reference(dtype, bits, per_channel):
    _check_variant("v1", dtype, 13, 21, 45, bits, per_channel, True)


# The GPU tile configs: (16, 1000, 1500) splits K six ways with 16x64x128 tiles; (100, 1100, 4100)
# splits a 128x128x64 wgmma tile five ways; (300, 1100, 777) runs whole-K wgmma tiles; (1100, 700,
# 333) crosses _DEQUANT_MIN_M, so "v2" takes the dequantize + cuBLAS path there.
GPU_CASES = [(1, 1000, 1500), (16, 1000, 1500), (100, 1100, 4100), (300, 1100, 777),
             (1100, 700, 333)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("m, n, k", GPU_CASES)
@pytest.mark.parametrize("bits, per_channel", [(4, False), (4, True), (6, False), (6, True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_v2_matches_reference(m, n, k, bits, per_channel, dtype):
    _check_variant("v2", dtype, m, n, k, bits, per_channel, bias=True, seed=m)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("m, n, k", [(16, 1000, 1500), (1100, 700, 333)])
@pytest.mark.parametrize("variant", ["v2_fused", "v1"])
def test_gpu_fused_and_v1_match_reference(m, n, k, variant):
    _check_variant(variant, torch.bfloat16, m, n, k, 4, False, bias=True, seed=m)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("m", [16, 1100])
@pytest.mark.parametrize("bits, per_channel", [(4, False), (4, True), (6, True)])
def test_gpu_dequant_path_matches_reference(m, bits, per_channel):
    _check_variant("v2_dequant", torch.bfloat16, m, 700, 333, bits, per_channel, bias=True)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_triton_default_variant_switches_to_dequant_for_large_m(monkeypatch):
    from fastkd.kernels import shared_linear as kernels

    calls = []
    real = kernels._forward_v2_dequant
    monkeypatch.setattr(kernels, "_DEQUANT_MIN_M", 8)
    monkeypatch.setattr(kernels, "_forward_v2_dequant",
                        lambda *a: calls.append(a[0].shape[0]) or real(*a))
    _check_variant("v2", torch.float16, 9, 21, 45, 4, False, True)  # M >= 8: dequant + GEMM
    _check_variant("v2", torch.float16, 7, 21, 45, 4, False, True)  # fused
    _check_variant("v2", torch.float32, 9, 21, 45, 4, False, True)  # fp32 stays fused (exact)
    assert calls == [9]


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_triton_variant_errors():
    from fastkd.kernels import shared_linear as kernels

    indices, cb, _ = _random_layer(5, 9, 4, False, False, "cpu")
    with pytest.raises(ValueError, match="variant"):
        kernels.shared_linear_forward(torch.randn(2, 9), indices, cb, None, 9, 4, variant="v3")
    with pytest.raises(ValueError, match="fp16/bf16"):
        kernels.shared_linear_forward(torch.randn(2, 9), indices, cb, None, 9, 4,
                                      variant="v2_dequant")


@pytest.mark.parametrize("per_channel", [False, True])
def test_codebook_gradient_is_cluster_sum(per_channel):
    lin, sl = _layer(per_channel=per_channel)
    x = torch.randn(9, 37, dtype=torch.float64).float().requires_grad_()
    g = torch.randn(9, 19)
    (sl(x) * g).sum().backward()
    # dense reference: grad_W = g^T x, summed per cluster; cluster 0 (pruned) gets nothing
    grad_w = g.t() @ x.detach()
    idx = unpack_indices(sl.indices, 37, 4)
    expect = torch.zeros_like(sl.codebook)
    for n in range(19):
        for c in range(1, 16):
            s = grad_w[n][idx[n] == c].sum()
            if per_channel:
                expect[n, c] = s
            else:
                expect[c] += s
    torch.testing.assert_close(sl.codebook.grad, expect, rtol=1e-4, atol=1e-4)
    w = sl.dequantized_weight()
    torch.testing.assert_close(x.grad, g @ w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sl.bias.grad, g.sum(0))
    assert sl.indices.grad is None


def test_finetuning_moves_centroids_keeps_zeros():
    torch.manual_seed(0)
    lin, sl = _layer(prune=0.4)
    target = nn.Linear(37, 19)
    opt = torch.optim.AdamW(sl.parameters(), lr=1e-2, weight_decay=0.1)
    x = torch.randn(64, 37)
    with torch.no_grad():
        y_t = target(x)
    losses = []
    idx_before = sl.indices.clone()
    for _ in range(30):
        opt.zero_grad()
        loss = ((sl(x) - y_t) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.equal(sl.indices, idx_before)
    assert torch.equal(sl.dequantized_weight() == 0, lin.weight == 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_module_dtype_conversion_keeps_the_codebook_fp32(dtype):
    # model.to(bf16) after share_weights_ is how a model is served; the op takes an fp32
    # codebook, so the conversion keeps it (and its gradient) fp32 and converts the bias.
    torch.manual_seed(0)
    layer = SharedLinear.from_linear(nn.Linear(40, 24), bits=4, per_channel=True)
    x = torch.randn(3, 40)
    layer(x).sum().backward()
    codebook, grad = layer.codebook.detach().clone(), layer.codebook.grad.clone()
    converted = layer.to(dtype)
    assert converted.codebook.dtype == torch.float32 and converted.bias.dtype == dtype
    assert torch.equal(converted.codebook, codebook) and torch.equal(converted.codebook.grad, grad)
    y = converted(x.to(dtype))
    assert y.dtype == dtype
    expected = x.to(dtype).double() @ converted.dequantized_weight().double().t()
    torch.testing.assert_close(y.double(), expected + converted.bias.double(), rtol=2e-2, atol=2e-2)
    y.float().sum().backward()  # the gradient keeps accumulating in fp32
    assert converted.codebook.grad.dtype == torch.float32


def test_opcheck_and_compile():
    lin, sl = _layer(n=7, k=9, per_channel=True)
    x = torch.randn(5, 9, requires_grad=True)
    for backend in ["torch"] + (["triton"] if HAS_TRITON else []):
        # the Triton kernel gets its tensors where it runs (a GPU when there is one)
        dev = device_for(backend)
        args = [t.detach().to(dev).requires_grad_(t.requires_grad)
                for t in (x, sl.indices, sl.codebook, sl.bias)]
        torch.library.opcheck(torch.ops.fastkd.shared_linear, (*args, 9, 4, backend))
    compiled = torch.compile(sl, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), sl(x))


def test_share_weights_model_and_roundtrip():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(33, 41), nn.GELU(), nn.Linear(41, 7))
    x = torch.randn(8, 33)
    ref = model(x)
    report = fastkd.share_weights_(model, bits=4, filter_fn=lambda m, n: n == "0")
    assert isinstance(model[0], SharedLinear) and type(model[2]) is nn.Linear
    assert report["bytes_before"] == (33 * 41 + 41) * 4
    assert report["bytes_after"] == 41 * 17 + 16 * 4 + 41 * 4
    cos = torch.nn.functional.cosine_similarity(model(x).flatten(), ref.flatten(), dim=0)
    assert cos > 0.99
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    other = nn.Sequential(SharedLinear(33, 41), nn.GELU(), nn.Linear(41, 7))
    other.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    assert torch.equal(other(x), model(x))


def test_state_dicts_with_indices_that_are_not_codes_are_refused():
    """int64 indices wrapped modulo 256, floats were truncated, and a code past a 3-bit
    codebook read a padding zero (past a per-channel one, the next channel's table): all
    loaded without a word."""
    torch.manual_seed(0)
    for bits, per_channel in ((3, False), (5, True)):
        layer = SharedLinear.from_linear(nn.Linear(6, 4), bits=bits, per_channel=per_channel)
        good = layer.state_dict()
        fresh = SharedLinear(6, 4, bits=bits, per_channel=per_channel)
        fresh.load_state_dict(good)  # its own codes load
        assert torch.equal(fresh.indices, layer.indices)
        past = good["indices"].clone()
        past[0, 0] = 12 if bits <= 4 else 40  # a low nibble of 12, or a byte of 40
        for bad, match in ((good["indices"].long(), "int64, not uint8"),
                           (good["indices"].float(), "float32, not uint8"),
                           (past, "past the")):
            with pytest.raises(RuntimeError, match=match):
                fresh.load_state_dict({**good, "indices": bad})


def test_layers_without_weights_give_the_bias_as_nn_linear_does():
    """in_features = 0 (or out_features = 0) crashed on a reshape of 0 elements."""
    from fastkd.nn import MaskedLinear

    x = torch.randn(3, 0, requires_grad=True)
    for layer in (MaskedLinear(0, 2), SharedLinear(0, 2)):
        torch.nn.init.constant_(layer.bias, 0.5)
        y = layer(x)
        assert y.shape == (3, 2) and (y == 0.5).all()
        y.sum().backward()
        assert layer.bias.grad.tolist() == [3.0, 3.0]
    assert SharedLinear(4, 0)(torch.randn(3, 4)).shape == (3, 0)
    assert MaskedLinear(4, 0)(torch.randn(3, 4)).shape == (3, 0)


def test_bad_inputs():
    lin, sl = _layer()
    x = torch.randn(2, 37)
    with pytest.raises(ValueError):
        FK.shared_linear(torch.randn(2, 36), sl.indices, sl.codebook, in_features=37, bits=4)
    with pytest.raises(TypeError):
        FK.shared_linear(x, sl.indices.long(), sl.codebook, in_features=37, bits=4)
    with pytest.raises(TypeError):
        FK.shared_linear(x, sl.indices, sl.codebook.double(), in_features=37, bits=4)
    with pytest.raises(ValueError):
        FK.shared_linear(x, sl.indices, sl.codebook[:8], in_features=37, bits=4)
    with pytest.raises(ValueError):
        FK.shared_linear(x, sl.indices, sl.codebook, in_features=37, bits=9)
    with pytest.raises(TypeError):
        FK.shared_linear(x.long(), sl.indices, sl.codebook, in_features=37, bits=4)
    with pytest.raises(ValueError, match="must be"):  # a 0-d input: IndexError before
        sl(torch.tensor(1.0))
    with pytest.raises(TypeError, match="bias"):  # an integer bias was cast silently
        FK.shared_linear(x, sl.indices, sl.codebook, torch.ones(sl.out_features).long(),
                         in_features=37, bits=4)
    with pytest.raises(ValueError):
        SharedLinear.from_linear(nn.Linear(3, 3), bits=0)
    bad = nn.Linear(3, 3)
    with torch.no_grad():
        bad.weight[0, 0] = float("nan")
    with pytest.raises(ValueError):
        SharedLinear.from_linear(bad)
    with pytest.raises(TypeError):
        fastkd.share_weights_("model")
    # accepted before: iters=-1 ran no Lloyd step, per_channel="no" meant per channel
    model = nn.Sequential(nn.Linear(8, 4))
    for kwargs, err in (({"iters": -1}, ValueError), ({"iters": 2.5}, TypeError),
                        ({"per_channel": "no"}, TypeError)):
        with pytest.raises(err, match=next(iter(kwargs))):
            fastkd.share_weights_(model, **kwargs)
        assert type(model[0]) is nn.Linear
    with pytest.raises(ValueError, match="iters"):
        SharedLinear.from_linear(nn.Linear(3, 3), iters=0)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("bits,k", [(3, 37), (2, 36), (6, 37)])
def test_codes_past_the_codebook_are_refused_per_call(bits, k, backend):
    """At widths whose codes do not fill their storage a code can reach past the codebook: the
    Triton kernel read a padding zero or the next channel's table (silently), the reference
    raised an IndexError. Both nibbles of a packed byte count. (A device-side assert on a
    GPU: not raised here.)"""
    torch.manual_seed(0)
    n, dev = 5, device_for(backend)
    idx = torch.randint(0, 2 ** bits, (n, k), dtype=torch.uint8, device=dev)
    codebook = torch.randn(n, 2 ** bits, device=dev)
    x = torch.randn(3, k, device=dev)
    packed = pack_indices(idx, bits)
    FK.shared_linear(x, packed, codebook, in_features=k, bits=bits, backend=backend)  # fine
    if dev != "cpu":
        return  # a device-side assert would end the process's CUDA context
    bad = idx.clone()
    bad[2, 1] = 2 ** bits  # an odd column: the high nibble of a packed byte
    with pytest.raises(ValueError, match=f"past the {2 ** bits} entries of a {bits}-bit "
                       f"codebook: {2 ** bits}"):
        FK.shared_linear(x, pack_indices(bad, bits), codebook, in_features=k, bits=bits,
                         backend=backend)


def test_codes_past_the_codebook_are_refused_under_compile_too():
    """Traced as a torch._assert_async (no host sync): raised when the graph runs."""
    torch.manual_seed(1)
    idx = torch.randint(0, 8, (5, 37), dtype=torch.uint8)
    codebook, x = torch.randn(8), torch.randn(3, 37)
    fn = torch.compile(lambda x, i: FK.shared_linear(x, i, codebook, in_features=37, bits=3),
                       backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(fn(x, pack_indices(idx, 3)),
                               FK.shared_linear(x, pack_indices(idx, 3), codebook,
                                                in_features=37, bits=3))
    idx[4, 36] = 8
    with pytest.raises(RuntimeError, match="past the 8 entries of a 3-bit codebook"):
        fn(x, pack_indices(idx, 3))


# Found by an audit of weight sharing


def test_kmeans_fits_rows_with_no_more_distinct_values_than_clusters_exactly():
    """Tied values have no spread: the init piled centroids onto them, an empty one never moved,
    and values there was room for were merged (-0.01 and 0.14 into 0.065 at 2 bits)."""
    lin = nn.Linear(7, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[-0.59] * 5 + [-0.01, 0.14]]))
    shared = SharedLinear.from_linear(lin, bits=2)
    torch.testing.assert_close(shared.dequantized_weight(), lin.weight.detach(), rtol=0, atol=0)
    # int8-dequantized weights re-shared at 8 bits: at most 255 distinct values per channel
    torch.manual_seed(0)
    w = torch.randn(6, 300)
    q, s = FK.quantize_weight(w)
    codes_w = q.float() * s[:, None]
    cent, assign = kmeans_1d(codes_w, 255)
    torch.testing.assert_close(cent.gather(1, assign), codes_w, rtol=0, atol=0)
    # with more distinct values than clusters nothing changes: still <= k values; rows of both
    # kinds together (per-channel sharing) each get theirs
    mixed = torch.randn(3, 50)
    mixed[1] = torch.tensor([0.5, -0.2] * 25)
    cent, assign = kmeans_1d(mixed, 4)
    assert all(len(torch.unique(r)) <= 4 for r in cent.gather(1, assign))
    torch.testing.assert_close(cent.gather(1, assign)[1], mixed[1], rtol=0, atol=0)
    torch.testing.assert_close(kmeans_1d(mixed[[0, 2]], 4)[0], cent[[0, 2]])


def test_share_weights_changes_nothing_when_a_layer_cannot_be_clustered():
    """The NaN check came inside the replacement loop: the layers before the bad one were
    already shared, their float weights gone."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3))
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="inf or NaN"):
        fastkd.share_weights_(model, bits=4)
    assert [type(m) for m in model] == [nn.Linear, nn.Linear]
    calls = []
    with pytest.raises(ValueError, match="bits"):  # before the calibration runs the model
        fastkd.share_weights_(nn.Sequential(nn.Linear(4, 4)), bits=9,
                              calibration=lambda m: calls.append(1))
    assert calls == []


def test_a_layer_without_inputs_is_shared():
    model = nn.Sequential(nn.Linear(0, 3))
    fastkd.share_weights_(model, bits=4)
    assert type(model[0]) is SharedLinear
    x = torch.randn(2, 0)
    torch.testing.assert_close(model(x), model[0].bias.detach().expand(2, 3))


def test_shared_linear_takes_per_channel_as_a_bool_only():
    with pytest.raises(TypeError, match="per_channel"):
        SharedLinear(4, 3, per_channel="no")


@pytest.mark.parametrize("bits", [2, 4, 6])
@pytest.mark.parametrize("per_channel", [False, True])
def test_the_looked_up_weight_is_differentiable_at_every_width(bits, per_channel):
    """At 1-4 bits the lookup read the codebook's bit patterns: layer.weight had no gradient, so
    a regulariser on it raised (or silently did nothing)."""
    torch.manual_seed(0)
    layer = SharedLinear.from_linear(nn.Linear(9, 5), bits=bits, per_channel=per_channel)
    w = layer.weight
    assert w.requires_grad
    w.square().sum().backward()
    idx = unpack_indices(layer.indices, 9, bits)
    looked_up = layer.dequantized_weight().detach()
    cb = layer.codebook.detach()
    expected = torch.zeros_like(cb)
    rows = expected if per_channel else expected[None]
    rows.scatter_add_(1, idx if per_channel else idx.reshape(1, -1),
                      (2 * looked_up).reshape(rows.shape[0], -1))
    expected[..., 0] = 0  # the pruned cluster reads as 0 whatever its entry
    torch.testing.assert_close(layer.codebook.grad, expected)
    with torch.no_grad():  # and the fast lookup, where no gradient is wanted, agrees
        torch.testing.assert_close(layer.dequantized_weight(), looked_up)


def test_loose_construction_arguments_are_refused():
    with pytest.raises(ValueError, match="no 'cuda' backend"):  # failed at the first forward
        SharedLinear(4, 3, backend="cuda")
    with pytest.raises(ValueError, match="NaN or infinite"):  # gave NaN centroids
        kmeans_1d(torch.tensor([[0.1, float("nan"), 0.3]]), 2)
    with pytest.raises(ValueError, match="k must be"):
        kmeans_1d(torch.randn(2, 5), 0)
    # entries left out of the fit may hold anything
    cent, _ = kmeans_1d(torch.tensor([[0.1, float("nan"), 0.3]]), 2,
                        valid=torch.tensor([[True, False, True]]))
    assert torch.isfinite(cent).all()
