"""kd_loss_topk / teacher_topk against a float64 autograd oracle of the bucket formula."""

import pytest
import torch
import torch.nn.functional as tF

import fastkd
from fastkd.functional import kd_loss, kd_loss_topk

from _util import device_for, spy_student_logits

pytest.importorskip("triton")
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def naive_topk(s, ids, lp, target, T, alpha, ignore_index, reduction):
    s = s.double()
    lp = lp.double()
    V = s.shape[-1]
    logq = tF.log_softmax(s / T, -1)
    p = lp.exp()
    pos = p > 0
    d = torch.where(pos, p * (lp - logq.gather(-1, ids)), 0.0).sum(-1)
    if ids.shape[-1] < V:
        tail = torch.ones_like(s, dtype=torch.bool).scatter(-1, ids, False)
        log_qt = torch.logsumexp(torch.where(tail, logq, float("-inf")), -1)
        pt = (1 - p.sum(-1)).clamp_min(0)
        d = d + torch.where(pt > 0, pt * (pt.clamp_min(1e-300).log() - log_qt), 0.0)
    soft = T * T * d
    if target is None:
        rows, count = soft, soft.numel()
    else:
        valid = target != ignore_index
        ce = tF.cross_entropy(s.reshape(-1, V), torch.where(valid, target, 0).reshape(-1),
                              reduction="none").reshape(valid.shape)
        rows = torch.where(valid, alpha * soft + (1 - alpha) * ce, 0.0)
        count = max(int(valid.sum()), 1)
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.sum() / count


def _inputs(shape, k, dtype, seed=0, T=1.0, pad=False):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(shape, generator=g) * 2).to(dtype)
    t = torch.randn(shape, generator=g) * 2
    ids, lp = fastkd.teacher_topk(t, k, temperature=T)
    if pad:  # a row with fewer than k stored classes: -inf log-probability slots
        lp[..., -2:] = float("-inf")
    target = torch.randint(0, shape[-1], shape[:-1], generator=g)
    target.view(-1)[::3] = -100
    return s, ids, lp, target


def _check(backend, dtype, shape, k, T, alpha, reduction, with_target, pad=False, seed=0):
    s, ids, lp, target = _inputs(shape, k, dtype, seed=seed, T=T, pad=pad)
    if not with_target:
        target = None
    s64 = s.double().requires_grad_()
    ref = naive_topk(s64, ids, lp, target, T, alpha, -100, reduction)
    # the oracle stays on the CPU; the backend gets its inputs where it runs (a GPU for Triton
    # when there is one)
    dev = device_for(backend)
    sv = s.to(dev, copy=True).requires_grad_()
    out = kd_loss_topk(sv, ids.to(dev), lp.to(dev), None if target is None else target.to(dev),
                       temperature=T, alpha=alpha, reduction=reduction, backend=backend)
    w = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    (ref * w).sum().backward()
    (out * w.float().to(dev)).sum().backward()
    out, grad = out.detach().cpu(), sv.grad.cpu()
    assert out.dtype == torch.float32 and grad.dtype == dtype
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    tol = {torch.float32: 3e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(out.double(), ref.detach(), rtol=tol, atol=tol * 4)
    gs = s64.grad.abs().max().item()
    torch.testing.assert_close(grad.double(), s64.grad, rtol=tol * 4, atol=tol * 2 * gs)


CASES = [(1.0, 0.5, True, "mean"), (2.5, 0.3, True, "none"), (0.8, 0.5, False, "sum")]


@pytest.mark.parametrize("k", [1, 7, 61])
@pytest.mark.parametrize("T,alpha,with_target,reduction", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference(k, T, alpha, with_target, reduction, dtype):
    _check("torch", dtype, (3, 5, 61), k, T, alpha, reduction, with_target)


@pytest.mark.parametrize("k", [1, 7, 61])
@pytest.mark.parametrize("T,alpha,with_target,reduction", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton(k, T, alpha, with_target, reduction, dtype):
    _check("triton", dtype, (7, 61), k, T, alpha, reduction, with_target)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_padded_slots(backend):
    _check(backend, torch.float32, (6, 53), 9, 1.5, 0.5, "none", True, pad=True)


@pytest.mark.parametrize("T,alpha,with_target,reduction", CASES)
def test_reference_many_row_chunks(monkeypatch, T, alpha, with_target, reduction):
    # The reference loops over row chunks of _CHUNK_ELEMENTS logits (fastkd.reference.kd_loss's,
    # read by _row_chunk; 4M, so no other test has more than one): each chunk must read its
    # own rows of the stored log-probabilities (the backward once read the first chunk's for
    # every chunk). 61 * 2 gives chunks of 2 rows and a last one of 1 on 9 distinct rows.
    from fastkd.reference import kd_loss as ref_kd

    monkeypatch.setattr(ref_kd, "_CHUNK_ELEMENTS", 61 * 2)
    _check("torch", torch.float32, (9, 61), 7, T, alpha, reduction, with_target, seed=3)


def test_triton_many_blocks(monkeypatch):
    from fastkd.kernels import kd_loss as kk

    monkeypatch.setattr(kk, "_launch_config", lambda n_cols: (32, 4))
    import fastkd.kernels.kd_topk as kt

    monkeypatch.setattr(kt, "_launch_config", lambda n_cols: (32, 4))
    _check("triton", torch.float32, (5, 203), 11, 2.0, 0.4, "none", True)


def test_triton_a_masked_first_block_before_far_negative_logits(monkeypatch):
    """As kd_loss's kernel: a block of -inf student logits keeps the running max at -inf, so
    the later blocks (logits / T far below 0) are not shifted by 0 into underflow."""
    import fastkd.kernels.kd_topk as kt
    from test_kd_divergences import assert_triton_matches_torch, masked_first_block_case

    monkeypatch.setattr(kt, "_launch_config", lambda n_cols: (32, 4))
    s, t, target = masked_first_block_case()
    ids, lp = fastkd.teacher_topk(t, 5, temperature=0.25)
    assert_triton_matches_torch(
        lambda sv, backend: kd_loss_topk(sv, ids.to(sv.device), lp.to(sv.device),
                                         target.to(sv.device), temperature=0.25,
                                         backend=backend, reduction="none"), s)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_full_topk_is_kd_loss(backend):
    """k = V (no tail bucket) reproduces kd_loss's forward KL at the same temperature."""
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(2, 3, 29, generator=g) * 2, torch.randn(2, 3, 29, generator=g) * 2
    y = torch.randint(0, 29, (2, 3), generator=g)
    s, t, y = (x.to(device_for(backend)) for x in (s, t, y))
    ids, lp = fastkd.teacher_topk(t, 29, temperature=1.7)
    a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
    la = kd_loss_topk(a, ids, lp, y, temperature=1.7, alpha=0.6, backend=backend)
    lb = kd_loss(b, t, y, temperature=1.7, alpha=0.6, backend=backend)
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)


def test_tail_bucket_matters():
    """The tail bucket is part of the loss: moving student mass inside the tail changes nothing,
    moving it between the tail and the top-k does."""
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(4, 40, generator=g), torch.randn(4, 40, generator=g)
    ids, lp = fastkd.teacher_topk(t, 5)
    tail = torch.ones_like(s, dtype=torch.bool).scatter(1, ids, False)
    # permute the student logits among the tail classes of each row: the loss is unchanged
    s2 = s.clone()
    for r in range(4):
        cols = tail[r].nonzero().flatten()
        s2[r, cols] = s[r, cols[torch.randperm(cols.numel(), generator=g)]]
    base = kd_loss_topk(s, ids, lp, backend="torch")
    torch.testing.assert_close(kd_loss_topk(s2, ids, lp, backend="torch"), base)
    assert (kd_loss_topk(s + 3.0 * tail, ids, lp, backend="torch") - base).abs() > 1e-2


def test_teacher_topk():
    t = torch.randn(3, 4, 50, dtype=torch.bfloat16)
    ids, lp = fastkd.teacher_topk(t, 6, temperature=2.0)
    assert ids.shape == (3, 4, 6) and ids.dtype == torch.long and lp.dtype == torch.float32
    full = torch.log_softmax(t.float() / 2.0, -1)
    torch.testing.assert_close(lp, full.gather(-1, ids))
    assert (lp[..., :-1] >= lp[..., 1:]).all()  # most likely first
    torch.testing.assert_close(full.topk(6, -1).values, lp)


def test_teacher_topk_of_a_sliced_batch(monkeypatch):
    """teacher_topk(t[:, :-1]) reads the (B, L, V) view block by block (a flat copy would be
    N x V) and gives what the contiguous copy gives, in the same row order."""
    import fastkd._topk

    monkeypatch.setattr(fastkd._topk, "_TOPK_CHUNK_ELEMENTS", 41 * 3)  # chunks of 3 rows
    g = torch.Generator().manual_seed(7)
    t = torch.randn(3, 9, 41, generator=g) * 3
    for view in (t[:, :-1], t[::2, 1:], t.transpose(0, 1)[:, 1:]):
        ids, lp = fastkd.teacher_topk(view, 5, temperature=2.0)
        ids_c, lp_c = fastkd.teacher_topk(view.contiguous(), 5, temperature=2.0)
        assert ids.shape == view.shape[:-1] + (5,)
        assert torch.equal(ids, ids_c) and torch.equal(lp, lp_c)


def test_validation():
    s = torch.randn(3, 10)
    ids, lp = fastkd.teacher_topk(torch.randn(3, 10), 4)
    with pytest.raises(ValueError, match="distinct"):
        kd_loss_topk(s, torch.zeros_like(ids), lp)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        kd_loss_topk(s, ids + 10, lp)
    with pytest.raises(ValueError, match="same shape"):
        kd_loss_topk(s, ids, lp[:, :3])
    with pytest.raises(TypeError, match="integer"):
        kd_loss_topk(s, ids.float(), lp)
    with pytest.raises(ValueError, match="leading shape"):
        kd_loss_topk(s, ids[:2], lp[:2])
    with pytest.raises(ValueError, match="k must"):
        fastkd.teacher_topk(s, 11)
    # logits passed for log-probabilities: a huge loss, silently, before this check
    logits = torch.randn(3, 10).topk(4).values + 2.0
    with pytest.raises(ValueError, match="log-probabilities"):
        kd_loss_topk(s, ids, logits)
    with pytest.raises(ValueError, match="log-probabilities"):  # each <= 0, summing past 1
        kd_loss_topk(s, ids, torch.full((3, 4), -0.5))
    # what rounding leaves (bf16 storage), -inf padded slots and a nan (a nan row) pass
    kd_loss_topk(s, ids, lp.bfloat16().float())
    kd_loss_topk(s, ids, torch.tensor([[-0.1, -3.0, float("-inf"), float("-inf")]] * 3))
    assert kd_loss_topk(s, ids, lp.index_fill(1, torch.tensor([1]), float("nan")),
                        reduction="none").isnan().all()


def test_validation_on_the_async_path():
    # Where reading the ids would cost a host sync (an accelerator, or under torch.compile) the
    # range and distinctness checks are device-side asserts; on the CPU a compiled call raises
    # them as RuntimeError, which lets CI check that path's logic.
    from fastkd._topk import _check_ids

    check = torch.compile(_check_ids, fullgraph=True, dynamic=False)
    ids = torch.tensor([[0, 3, 5], [1, 2, 4]])
    check(ids, 10)  # fine
    for bad in (torch.tensor([[0, 3, 3], [1, 2, 4]]), torch.tensor([[0, 3, 5], [1, 2, 10]])):
        with pytest.raises(RuntimeError, match="distinct within each row"):
            check(bad, 10)
    from fastkd._topk import _check_logprobs

    check_lp = torch.compile(_check_logprobs, fullgraph=True, dynamic=False)
    check_lp(torch.tensor([[-0.1, -2.5], [-1.0, -1.0]]))  # fine
    with pytest.raises(RuntimeError, match="log-probabilities"):
        check_lp(torch.tensor([[3.0, -2.5], [-1.0, -1.0]]))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend):
    s, ids, lp, y = (x.to(device_for(backend))
                     for x in _inputs((5, 23), 4, torch.float32, seed=2))
    s.requires_grad_()
    torch.library.opcheck(torch.ops.fastkd.kd_loss_topk_forward,
                          (s, ids, lp, y, 2.0, 0.5, -100, backend))
    _, st = torch.ops.fastkd.kd_loss_topk_forward(s.detach(), ids, lp, y, 2.0, 0.5, -100, backend)
    grad_rows = torch.rand(5, device=s.device)
    torch.library.opcheck(torch.ops.fastkd.kd_loss_topk_backward,
                          (grad_rows, s.detach(), ids, lp, y, st, 2.0, 0.5, -100, backend))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sliced_batch_is_read_in_place(backend, monkeypatch):
    """Next-token rows of a (B, L, V) batch, student[:, :-1] (not one strided run of rows), match
    the oracle, and the Triton kernels read them in place rather than from a copy."""
    s_full, _, _, _ = _inputs((4, 9, 29), 5, torch.float32, seed=4)
    t = torch.randn(4, 9, 29, generator=torch.Generator().manual_seed(5)) * 2
    ids, lp = fastkd.teacher_topk(t[:, 1:], 5, temperature=2.0)
    y = torch.randint(0, 29, (4, 8), generator=torch.Generator().manual_seed(6))
    y[1, 3] = -100
    s64 = s_full.double()[:, :-1].detach().requires_grad_()
    ref = naive_topk(s64, ids, lp, y, 2.0, 0.5, -100, "none")
    w = torch.rand(ref.shape, dtype=torch.float64)
    (ref * w).sum().backward()
    dev = device_for(backend)
    seen = spy_student_logits(monkeypatch, backend, "kd_topk", ("kd_loss_topk_forward", "kd_loss_topk_backward"))
    sv = s_full.to(dev, copy=True).requires_grad_()
    out = kd_loss_topk(sv[:, :-1], ids.to(dev), lp.to(dev), y.to(dev), temperature=2.0,
                       reduction="none", backend=backend)
    (out * w.float().to(dev)).sum().backward()
    torch.testing.assert_close(out.detach().cpu().double(), ref.detach(), rtol=3e-5, atol=1e-4)
    expected = torch.zeros(4, 9, 29, dtype=torch.float64)
    expected[:, :-1] = s64.grad
    torch.testing.assert_close(sv.grad.cpu().double(), expected, rtol=1e-4, atol=1e-6)
    assert len(seen) >= 2
    assert all(x.untyped_storage().data_ptr() == sv.untyped_storage().data_ptr() for x in seen)
    if backend == "triton":
        s3 = sv.detach()[:, :-1]
        y1 = y.reshape(-1).to(dev)
        ids2, lp2 = ids.reshape(-1, 5).to(dev), lp.reshape(-1, 5).to(dev)
        torch.library.opcheck(torch.ops.fastkd.kd_loss_topk_forward,
                              (s3.requires_grad_(), ids2, lp2, y1, 2.0, 0.5, -100, backend))


def test_compile_fullgraph():
    s, ids, lp, y = _inputs((4, 23), 5, torch.float32, seed=3)

    def f(s):
        return kd_loss_topk(s, ids, lp, y, temperature=2.0, backend="torch")

    a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
    f(a).backward()
    torch.compile(f, fullgraph=True, backend="aot_eager")(b).backward()
    torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_tiny_student_tail_stays_finite(backend):
    # A confident student: its mass outside the teacher's k classes is ~exp(-120), below fp32's
    # range when shifted by the row's max. The tail's logsumexp has its own shift (in the
    # kernel, a second pass over such a row: its loss was inf), so the tail term stays finite
    # and equal to the float64 oracle's.
    s, ids, lp, target = _inputs((3, 211), 5, torch.float32, seed=4)
    s = s.scatter_add(1, ids, torch.full(ids.shape, 120.0))
    s64 = s.double().requires_grad_()
    ref = naive_topk(s64, ids, lp, target, 1.0, 0.5, -100, "none")
    dev = device_for(backend)
    sv = s.to(dev).requires_grad_()
    ids, lp, target = ids.to(dev), lp.to(dev), target.to(dev)
    out = kd_loss_topk(sv, ids, lp, target, temperature=1.0, reduction="none",
                       backend=backend).cpu()
    target = target.cpu()
    assert torch.isfinite(out).all() and (out[target != -100] > 50).all()  # a large, finite loss
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-3)
    ref.sum().backward()
    out.sum().backward()
    assert torch.isfinite(sv.grad).all()
    torch.testing.assert_close(sv.grad.double().cpu(), s64.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_padded_vocabulary_with_every_real_class_in_the_top_k(backend):
    """k = the real classes of a vocabulary padded with -inf: the tail is padding on both
    sides. In fp32 the k probabilities sum to 1 - ~1e-7 on about half the rows, and that
    rounding, set against the student's zero tail mass, made those rows inf (nan gradients)."""
    dev = device_for(backend)
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(24, 37, generator=g) * 2, torch.randn(24, 37, generator=g) * 2
    s[:, 29:] = t[:, 29:] = float("-inf")
    s, t = s.to(dev), t.to(dev)
    ids, lp = fastkd.teacher_topk(t, 29, temperature=2.0)
    assert (lp.exp().sum(-1) < 1).any()  # the rounding this is about
    a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
    top = kd_loss_topk(a, ids, lp, temperature=2.0, reduction="none", backend=backend)
    full = kd_loss(b, t, temperature=2.0, reduction="none", backend=backend)
    top.sum().backward()
    full.sum().backward()
    torch.testing.assert_close(top, full, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("where", ["student nan", "student +inf", "student no mass", "teacher nan"])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_undefined_row_is_nan(backend, where, T):
    # a diverged student (a nan or +inf logit, or every logit -inf) or a corrupt stored teacher
    # must not give a finite loss or gradient; an ignored row stays 0 as in cross_entropy
    s, ids, lp, target = _inputs((4, 97), 6, torch.float32, seed=5)
    target[:] = torch.tensor([3, 5, -100, 7])
    for row in (1, 2):
        if where == "student no mass":
            s[row] = float("-inf")
        elif where.startswith("student"):
            s[row, 40] = float(where.split()[1])
        else:
            lp[row, 2] = float("nan")
    dev = device_for(backend)
    sv = s.to(dev).requires_grad_()
    out = kd_loss_topk(sv, ids.to(dev), lp.to(dev), target.to(dev), temperature=T,
                       reduction="none", backend=backend)
    out.sum().backward()
    out, grad = out.detach().cpu(), sv.grad.cpu()
    assert torch.isnan(out[1]) and out[2].item() == 0.0
    assert torch.isfinite(out[[0, 3]]).all() and torch.isfinite(grad[[0, 3]]).all()
    assert torch.equal(grad[2], torch.zeros_like(grad[2]))
    assert torch.isnan(grad[1]).any()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_term_of_weight_zero_adds_exactly_zero(backend):
    # alpha = 0: the CE alone, even where the top-k divergence is infinite (the student puts no
    # mass on a teacher id); alpha = 1: the divergence alone, even where the CE is infinite
    dev = device_for(backend)
    g = torch.Generator().manual_seed(5)
    s = torch.randn(4, 29, generator=g) * 2
    ids, lps = fastkd.teacher_topk(torch.randn(4, 29, generator=g) * 2, 3)
    y = torch.randint(0, 29, (4,), generator=g)
    s_inf = s.clone()
    s_inf[0, ids[0, 0]] = float("-inf")  # infinite divergence in row 0
    x = s_inf.clone().to(dev).requires_grad_()
    loss = kd_loss_topk(x, ids.to(dev), lps.to(dev), y.to(dev), alpha=0.0, reduction="none",
                        backend=backend)
    loss.sum().backward()
    x2 = s_inf.clone().requires_grad_()
    ce = tF.cross_entropy(x2, y, reduction="none")
    ce.sum().backward()
    torch.testing.assert_close(loss.cpu(), ce, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad.cpu(), x2.grad, rtol=1e-4, atol=1e-6)
    y1 = y.clone()
    y1[1] = int(torch.isin(torch.arange(29), ids[1], invert=True).nonzero()[0])
    s_ce = s.clone()
    s_ce[1, y1[1]] = float("-inf")  # infinite CE in row 1 (a class outside the teacher's top-k)
    x = s_ce.clone().to(dev).requires_grad_()
    loss = kd_loss_topk(x, ids.to(dev), lps.to(dev), y1.to(dev), alpha=1.0, reduction="none",
                        backend=backend)
    loss.sum().backward()
    x2 = s_ce.clone().to(dev).requires_grad_()
    soft = kd_loss_topk(x2, ids.to(dev), lps.to(dev), reduction="none", backend=backend)
    soft.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all()
    torch.testing.assert_close(loss, soft, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_tail_of_a_confident_student(dtype):
    """The student puts all but ~1e-9 of its mass on the teacher's ids while the teacher leaves
    ~3 % in the tail: Q_tail must come from the tail classes. As 1 - sum_i Q_i (fp32, error
    ~1e-7) it was 0 or noise, the tail ratio P_tail / Q_tail off by orders of magnitude, and the
    tail classes' gradients with it (inf in fp16)."""
    g = torch.Generator().manual_seed(2)
    n, v, k = 6, 97, 5
    t = torch.randn(n, v, generator=g)
    ids, lps = fastkd.teacher_topk(t * 3, k)
    s = torch.randn(n, v, generator=g)
    s.scatter_(1, ids, 25.0 + torch.randn(n, k, generator=g))  # tail mass ~ e^-20
    s = s.to(dtype)
    out = {}
    for backend in ("torch", "triton"):
        x = s.clone().to(device_for(backend)).requires_grad_()
        loss = kd_loss_topk(x, ids.to(x.device), lps.to(x.device), reduction="none",
                            backend=backend)
        loss.sum().backward()
        out[backend] = (loss.detach().cpu().float(), x.grad.cpu().float())
    assert torch.isfinite(out["triton"][1]).all()
    torch.testing.assert_close(out["triton"][0], out["torch"][0], rtol=1e-4, atol=1e-4)
    atol = 1e-6 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(out["triton"][1], out["torch"][1], rtol=1e-3, atol=atol)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_alpha_zero_with_a_student_that_gives_the_tail_no_mass(backend):
    # Q_tail = 0 against a teacher tail of mass > 0: the tail ratio is infinite; at alpha = 0
    # the loss and gradient are the CE's, with no 0 * inf from the teacher's term
    dev = device_for(backend)
    g = torch.Generator().manual_seed(8)
    ids, lps = fastkd.teacher_topk(torch.randn(3, 11, generator=g), 4)
    s = torch.full((3, 11), float("-inf"))
    s.scatter_(1, ids, torch.randn(3, 4, generator=g))
    y = ids[:, 1].clone()
    x = s.clone().to(dev).requires_grad_()
    loss = kd_loss_topk(x, ids.to(dev), lps.to(dev), y.to(dev), alpha=0.0, reduction="none",
                        backend=backend)
    loss.sum().backward()
    x2 = s.clone().requires_grad_()
    ce = tF.cross_entropy(x2, y, reduction="none")
    ce.sum().backward()
    torch.testing.assert_close(loss.cpu(), ce)
    torch.testing.assert_close(x.grad.cpu(), x2.grad)
