"""The Triton kernels take strided vectors and odd layouts as the reference does.

The kernels read a row's target as ``target_ptr + row`` and per-channel vectors (bias, scales) as
``ptr + n``: a column of a label table (``labels[:, 0]``), ``y[::2]`` or a bias sliced out of a
packed tensor has another stride and was read wrongly, without a word (the Triton backend is
``auto``'s choice on CUDA). Each case compares ``backend="triton"`` with the torch reference;
on the CPU the kernels run in Triton's interpreter.
"""

import pytest
import torch

import fastkd
import fastkd.functional as F
from fastkd.nn import SharedLinear

from _util import DEVICE, needs_triton

pytestmark = needs_triton


def _strided_target(n, v, ignore_row=2):
    g = torch.Generator().manual_seed(1)
    table = torch.randint(0, v, (n, 3), generator=g)
    table[ignore_row, 0] = -100
    y = table[:, 0].to(DEVICE)  # stride 3
    assert y.stride() == (3,)
    return y


def _logits(n, v, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g).to(DEVICE).requires_grad_(),
            torch.randn(n, v, generator=g).to(DEVICE))


@pytest.mark.parametrize("divergence", ["kl", "jsd"])
def test_kd_loss_reads_a_strided_target(divergence):
    n, v = 6, 11
    y = _strided_target(n, v)
    rows, grads = {}, {}
    for backend in ("torch", "triton"):
        s, t = _logits(n, v)
        loss = F.kd_loss(s, t, y, temperature=2.0, alpha=0.5, reduction="none",
                         divergence=divergence, backend=backend)
        loss.sum().backward()
        rows[backend], grads[backend] = loss.detach(), s.grad
    assert rows["triton"][2] == 0  # the ignored row
    torch.testing.assert_close(rows["triton"], rows["torch"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads["triton"], grads["torch"], rtol=1e-5, atol=1e-5)


def test_kd_loss_topk_reads_a_strided_target():
    n, v = 6, 11
    y = _strided_target(n, v)
    out = {}
    for backend in ("torch", "triton"):
        s, t = _logits(n, v)
        ids, lps = fastkd.teacher_topk(t, 4, 2.0)
        loss = F.kd_loss_topk(s, ids, lps, y, temperature=2.0, alpha=0.5, reduction="none",
                              backend=backend)
        loss.sum().backward()
        out[backend] = (loss.detach(), s.grad)
    torch.testing.assert_close(out["triton"][0], out["torch"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["triton"][1], out["torch"][1], rtol=1e-5, atol=1e-5)


def test_fused_linear_kd_reads_a_strided_target():
    n, v, h = 6, 11, 5
    y = _strided_target(n, v)
    g = torch.Generator().manual_seed(2)
    sh, sw, th, tw = (torch.randn(*shape, generator=g).to(DEVICE)
                      for shape in ((n, h), (v, h), (n, h), (v, h)))
    out = {}
    for backend in ("torch", "triton"):
        w = sw.clone().requires_grad_()
        loss = F.fused_linear_kd_loss(sh, w, th, tw, y, temperature=2.0, chunk_rows=4,
                                      backend=backend)
        loss.backward()
        out[backend] = (loss.detach(), w.grad)
    torch.testing.assert_close(out["triton"][0], out["torch"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["triton"][1], out["torch"][1], rtol=1e-5, atol=1e-5)


def test_kd_loss_of_a_single_class_with_a_strided_class_dimension():
    """V = 1 read through a view whose class stride is not 1 (contiguous() keeps such a view)
    was refused by the Triton kernels' layout check."""
    base_s, base_t = _logits(4, 2)
    s, t = base_s[:, :1], base_t[:, :1]
    s = s.detach().t().contiguous().t().requires_grad_()  # (4, 1) with strides (1, 4)
    assert s.stride(-1) != 1
    for backend in ("torch", "triton"):
        loss = F.kd_loss(s, t, temperature=2.0, backend=backend)
        assert loss.item() == 0.0  # one class: both distributions are 1


def _vector_column(n, dtype, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=g).to(device=DEVICE, dtype=dtype)[:, 0]  # stride 2


@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
def test_int8_linear_reads_a_strided_bias_and_scale(mode):
    n, k = 9, 37
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, k, generator=g).to(DEVICE)
    wq, ws = F.quantize_weight(torch.randn(n, k, generator=g).to(DEVICE))
    bias = _vector_column(n, torch.float32)
    ws_strided = torch.stack([ws, torch.zeros_like(ws)], 1)[:, 0]
    assert bias.stride() == (2,) and ws_strided.stride() == (2,)
    want = F.int8_linear(x, wq, ws, bias.contiguous(), mode=mode, backend="torch")
    got = F.int8_linear(x, wq, ws_strided, bias, mode=mode, backend="triton")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_masked_linear_reads_a_strided_bias():
    n, k = 9, 37
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, k, generator=g).to(DEVICE)
    w = torch.randn(n, k, generator=g).to(DEVICE)
    mask = (torch.rand(n, k, generator=g) > 0.5).to(DEVICE)
    bias = _vector_column(n, torch.float32)
    torch.testing.assert_close(F.masked_linear(x, w, mask, bias, backend="triton"),
                               F.masked_linear(x, w, mask, bias.contiguous(), backend="torch"),
                               rtol=1e-4, atol=1e-4)


def test_shared_linear_reads_a_strided_bias():
    n, k = 9, 37
    torch.manual_seed(0)
    layer = SharedLinear.from_linear(torch.nn.Linear(k, n), bits=4).to(DEVICE)
    x = torch.randn(5, k).to(DEVICE)
    bias = _vector_column(n, torch.float32)
    idx, cb = layer.indices, layer.codebook.detach()
    torch.testing.assert_close(
        F.shared_linear(x, idx, cb, bias, in_features=k, bits=4, backend="triton"),
        F.shared_linear(x, idx, cb, bias.contiguous(), in_features=k, bits=4, backend="torch"),
        rtol=1e-4, atol=1e-4)
