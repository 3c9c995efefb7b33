"""fused_linear_kd_loss / FusedLinearKDLoss equal the unfused lm-head + kd_loss, forward and
backward, without keeping N x V tensors for the backward."""

import pytest
import torch

import fastkd
from fastkd.functional import fused_linear_kd_loss, kd_loss

from _util import device_for

pytest.importorskip("triton")
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def _make(N=13, Hs=11, Ht=19, V=53, dtype=torch.float32, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    sh = (torch.randn(N, Hs, generator=g)).to(dtype)
    sw = (torch.randn(V, Hs, generator=g) / Hs**0.5 * 3).to(dtype)
    th = torch.randn(N, Ht, generator=g).to(dtype)
    tw = (torch.randn(V, Ht, generator=g) / Ht**0.5 * 3).to(dtype)
    sb = (torch.randn(V, generator=g) * 0.1).to(dtype) if bias else None
    tb = (torch.randn(V, generator=g) * 0.1).to(dtype) if bias else None
    y = torch.randint(0, V, (N,), generator=g)
    y[::4] = -100
    return sh, sw, sb, th, tw, tb, y


def _run(fused, sh, sw, sb, th, tw, tb, y, reduction, **kw):
    leaves = [x.clone().requires_grad_() for x in (sh, sw)] + (
        [sb.clone().requires_grad_()] if sb is not None else [])
    h, w = leaves[0], leaves[1]
    b = leaves[2] if sb is not None else None
    if fused:
        loss = fused_linear_kd_loss(h, w, th, tw, y, student_bias=b, teacher_bias=tb,
                                    reduction=reduction, **kw)
    else:
        kw.pop("chunk_rows", None)
        s_log = h @ w.t() + (b if b is not None else 0)
        t_log = th @ tw.t() + (tb if tb is not None else 0)
        loss = kd_loss(s_log, t_log, y, reduction=reduction, **kw)
    wgt = torch.linspace(0.5, 1.5, loss.numel(), device=loss.device).reshape(loss.shape)
    (loss * wgt).sum().backward()
    return loss.detach(), [x.grad for x in leaves]


def _compare(dtype, backend, reduction, divergence="kl", beta=0.5, chunk_rows=4, bias=True,
             with_target=True, T=2.0, tol=None):
    sh, sw, sb, th, tw, tb, y = _make(dtype=dtype, bias=bias)
    y = y if with_target else None
    kw = dict(temperature=T, alpha=0.3, divergence=divergence, beta=beta, backend=backend)
    # oracle: the unfused lm-head + kd_loss in fp32 on the reference backend (kd_loss itself is
    # checked against float64 in test_kd_divergences.py)
    ref = _run(False, *[x.float() if x is not None else None for x in (sh, sw, sb, th, tw, tb)],
               y, reduction, **{**kw, "backend": "torch"})
    # the fused run gets its inputs where the backend runs (a GPU for Triton when there is one)
    dev = device_for(backend)
    args = [None if x is None else x.to(dev) for x in (sh, sw, sb, th, tw, tb, y)]
    loss, grads = _run(True, *args, reduction, chunk_rows=chunk_rows, **kw)
    out = loss.cpu(), [g.cpu() for g in grads]
    tol = tol or {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}[dtype]
    torch.testing.assert_close(out[0], ref[0], rtol=tol, atol=tol)
    for a, b in zip(out[1], ref[1]):
        assert a.dtype == dtype
        scale = b.abs().max().item()
        torch.testing.assert_close(a.float(), b, rtol=tol * 2, atol=tol * scale * 2)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("divergence,beta", [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_matches_unfused_fp32(reduction, divergence, beta, backend):
    _compare(torch.float32, backend, reduction, divergence, beta)


@pytest.mark.parametrize("chunk_rows", [1, 5, 13, 100, None])
def test_chunk_sizes(chunk_rows):
    _compare(torch.float32, "torch", "mean", chunk_rows=chunk_rows, bias=False, with_target=False)


@pytest.mark.parametrize("dtype,backend", [(torch.bfloat16, "torch"), (torch.float16, "torch"),
                                           (torch.float16, "triton")])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_low_precision(dtype, backend, reduction):
    _compare(dtype, backend, reduction, T=1.0)


def test_leading_dims_and_module():
    sh, sw, sb, th, tw, tb, y = _make(N=12)
    mod = fastkd.nn.FusedLinearKDLoss(temperature=1.5, divergence="jsd", beta=0.2, chunk_rows=5)
    assert "jsd" in repr(mod)
    out = mod(sh.reshape(3, 4, -1), sw, th.reshape(3, 4, -1), tw, y.reshape(3, 4), sb, tb)
    ref = fused_linear_kd_loss(sh, sw, th, tw, y, student_bias=sb, teacher_bias=tb,
                               temperature=1.5, divergence="jsd", beta=0.2)
    torch.testing.assert_close(out, ref)


def test_saves_no_n_by_v_tensor():
    """The backward keeps only hidden-sized / weight-sized gradients, never chunk logits."""
    N, V = 40, 97
    sh, sw, sb, th, tw, tb, y = _make(N=N, V=V)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    h, w = sh.requires_grad_(), sw.requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fused_linear_kd_loss(h, w, th, tw, y, chunk_rows=8)
    loss.backward()
    assert saved and all(V not in s or s == tuple(sw.shape) for s in saved), saved
    assert all(torch.Size(s).numel() < N * V for s in saved), saved


def test_compile_fullgraph():
    sh, sw, sb, th, tw, tb, y = _make()

    def f(h, w, b):
        return fused_linear_kd_loss(h, w, th, tw, y, student_bias=b, teacher_bias=tb,
                                    temperature=2.0, chunk_rows=5, backend="torch")

    eager = [x.clone().requires_grad_() for x in (sh, sw, sb)]
    comp = [x.clone().requires_grad_() for x in (sh, sw, sb)]
    f(*eager).backward()
    torch.compile(f, fullgraph=True, backend="aot_eager")(*comp).backward()
    for a, b in zip(eager, comp):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_dynamic_rows_compiles_once_and_matches_eager(reduction):
    """Batches of varying length through one compiled training step (autograd traced too): the
    chunk loop runs inside the op, so one graph serves every N (it used to be unrolled at trace
    time, one compilation per N until the recompile limit)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    _, sw, sb, _, tw, tb, _ = _make()

    def step(h, w, b, th, y):
        loss = fused_linear_kd_loss(h, w, th, tw, y, student_bias=b, teacher_bias=tb,
                                    temperature=2.0, chunk_rows=4, reduction=reduction)
        return loss.sum() if reduction == "none" else loss

    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend="aot_eager")
    for n in (5, 11, 17):
        sh, _, _, th, _, _, y = _make(N=n, seed=n)
        eager = [x.clone().requires_grad_() for x in (sh, sw, sb)]
        comp = [x.clone().requires_grad_() for x in (sh, sw, sb)]
        loss_e = step(*eager, th, y)
        loss_c = compiled(*comp, th, y)
        loss_e.backward()
        loss_c.backward()
        torch.testing.assert_close(loss_c, loss_e)
        for a, b in zip(comp, eager):
            torch.testing.assert_close(a.grad, b.grad)
    graphs = counters["stats"]["unique_graphs"]  # (a restart of one analysis counts once)
    assert graphs == 1, f"{graphs} compilations for 3 row counts"


def test_fp16_mean_weight_gradient_does_not_overflow():
    """The mean's gradient over many rows in an fp16 weight: its rows are weighted by 1/N before
    they are summed into the weight gradient (summed unscaled, 8192 rows of ~30 overflowed to
    inf, where lm-head + kd_loss is finite)."""
    g = torch.Generator().manual_seed(0)
    n, h, v = 8192, 4, 8
    sh = (torch.randn(n, h, generator=g) * 0.1 + 30).half()
    sw = (torch.randn(v, h, generator=g) * 0.01).half()
    th, tw = torch.randn(n, h, generator=g).half(), torch.randn(v, h, generator=g).half()
    y = torch.zeros(n, dtype=torch.long)
    w = sw.clone().requires_grad_()
    fused_linear_kd_loss(sh, w, th, tw, y, backend="torch", chunk_rows=1024).backward()
    w_ref = sw.float().requires_grad_()
    kd_loss(sh.float() @ w_ref.t(), th.float() @ tw.float().t(), y, backend="torch").backward()
    assert torch.isfinite(w.grad).all()
    torch.testing.assert_close(w.grad.float(), w_ref.grad, rtol=2e-2, atol=2e-2)


def test_ops_opcheck():
    sh, sw, sb, th, tw, tb, y = _make()
    settings = (2.0, 0.3, -100, "torch", "jsd", 0.4, 4)
    for grads in [(True, True, True), (False, True, False)]:
        torch.library.opcheck(torch.ops.fastkd.fused_linear_kd_forward.default,
                              (sh, sw, sb, th, tw, tb, y, torch.tensor([0.25]), *settings, *grads))
        torch.library.opcheck(torch.ops.fastkd.fused_linear_kd_backward.default,
                              (torch.rand(13), sh, sw, sb, th, tw, tb, y, *settings, *grads))
    torch.library.opcheck(torch.ops.fastkd.fused_linear_kd_forward.default,
                          (sh, sw, None, th, tw, None, None, None, *settings[:-1], 0, True, True,
                           False))


def test_validation():
    sh, sw, sb, th, tw, tb, y = _make()
    with pytest.raises(ValueError, match="classes"):
        fused_linear_kd_loss(sh, sw, th, tw[:-1], y)
    with pytest.raises(ValueError, match="features"):
        fused_linear_kd_loss(sh, sw[:, :-1], th, tw, y)
    with pytest.raises(ValueError, match="leading shape"):
        fused_linear_kd_loss(sh, sw, th[:-1], tw, y)
    with pytest.raises(ValueError, match="student_bias"):
        fused_linear_kd_loss(sh, sw, th, tw, y, student_bias=sb[:-1])
    with pytest.raises(ValueError, match="chunk_rows"):
        fused_linear_kd_loss(sh, sw, th, tw, y, chunk_rows=0)
    with pytest.raises(TypeError, match="dtype"):
        fused_linear_kd_loss(sh, sw.half(), th, tw, y)
    with pytest.raises(ValueError, match="divergence"):
        fused_linear_kd_loss(sh, sw, th, tw, y, divergence="x")


def test_second_backward_through_the_graph_is_refused_clearly():
    """Gradients computed in the forward are handed over (scaled in place) by the first backward;
    a retain_graph second backward must raise, not silently return scaled-twice gradients."""
    sh, sw, sb, th, tw, tb, y = _make()
    h, w = sh.clone().requires_grad_(), sw.clone().requires_grad_()
    loss = fused_linear_kd_loss(h, w, th, tw, y, reduction="mean", backend="torch")
    (2.0 * loss).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()
    # reduction="none" recomputes in its backward and supports it
    h.grad = w.grad = None
    rows = fused_linear_kd_loss(h, w, th, tw, y, reduction="none", backend="torch")
    rows.sum().backward(retain_graph=True)
    g1 = w.grad.clone()
    rows.sum().backward()
    torch.testing.assert_close(w.grad, 2 * g1)


def test_default_chunk_rows():
    from fastkd._fused_linear_kd import default_chunk_rows

    assert default_chunk_rows(4096, 128256) == (1 << 27) // 128256 == 1046
    assert default_chunk_rows(10, 128256) == 10 and default_chunk_rows(5, 1 << 30) == 1
