"""KD loss: reference vs a float64 oracle, Triton (interpreter on CPU) vs the oracle, the op
contract (opcheck, torch.compile) and every bad input."""


import pytest
import torch

import fastkd
from fastkd import functional as F

from _util import DEVICE, HAS_CUDA, device_for, needs_triton, spy_student_logits

SHAPES = [(4, 37), (2, 3, 1271), (3, 50257)]


def oracle(s, t, y, T, alpha, ignore_index=-100, reduction="mean"):
    """KD loss in float64 with autograd: the definition, written as plainly as possible."""
    s = s.double()
    t = t.double()
    log_ps = torch.log_softmax(s / T, dim=-1)
    log_pt = torch.log_softmax(t / T, dim=-1)
    p_t = log_pt.exp()
    kl = torch.where(p_t > 0, p_t * (log_pt - log_ps), torch.zeros_like(p_t)).sum(-1)
    soft = T * T * kl
    if y is None:
        rows, count = soft, max(soft.numel(), 1)
    else:
        valid = y != ignore_index
        ce = torch.nn.functional.cross_entropy(
            s.reshape(-1, s.shape[-1]), y.reshape(-1), ignore_index=ignore_index, reduction="none"
        ).reshape(y.shape)
        rows = torch.where(valid, alpha * soft + (1 - alpha) * ce, torch.zeros_like(soft))
        count = valid.sum().clamp_min(1)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / count


def make_inputs(shape, dtype=torch.float32, teacher_dtype=None, with_target=True, scale=3.0,
                ignored=1, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(shape, generator=g) * scale).to(device=device, dtype=dtype)
    t = (torch.randn(shape, generator=g) * scale).to(device=device, dtype=teacher_dtype or dtype)
    y = None
    if with_target:
        y = torch.randint(0, shape[-1], shape[:-1], generator=g).to(device)
        y.view(-1)[:ignored] = -100
    return s, t, y


def run(s, t, y, backend, reduction="mean", grad_scale=None, **kw):
    """Loss and student gradient for `sum(grad_scale * loss)` (a grad_output that is not 1)."""
    s = s.detach().clone().requires_grad_()
    out = F.kd_loss(s, t, y, reduction=reduction, backend=backend, **kw)
    if grad_scale is None:
        grad_scale = torch.linspace(0.5, 1.5, out.numel(), device=out.device).reshape(out.shape)
    (out * grad_scale).sum().backward()
    return out, s.grad, grad_scale


def check_against_oracle(s, t, y, backend, reduction, T, alpha, loss_tol, grad_tol):
    out, grad, gs = run(s, t, y, backend, reduction, temperature=T, alpha=alpha)
    s64 = s.detach().double().requires_grad_()
    ref = oracle(s64, t, y, T, alpha, reduction=reduction)
    (ref * gs.double()).sum().backward()
    assert out.dtype == torch.float32
    assert grad.dtype == s.dtype
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(out.double(), ref.detach(), **loss_tol)
    torch.testing.assert_close(grad.double(), s64.grad, **grad_tol)


FP32_TOL = dict(loss=dict(rtol=1e-5, atol=1e-5), grad=dict(rtol=1e-4, atol=1e-6))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("with_target", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reference_matches_oracle(shape, T, with_target, reduction):
    s, t, y = make_inputs(shape, with_target=with_target)
    check_against_oracle(
        s, t, y, "torch", reduction, T, 0.3, FP32_TOL["loss"], FP32_TOL["grad"]
    )


@pytest.mark.parametrize("T", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("with_target", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_kl_paths_agree(monkeypatch, T, with_target, dtype):
    # The reference computes "kl" one way for small chunks (fused log_softmax / softmax, fewest
    # ops) and another for large ones (fewest passes and buffers): the same loss and gradient,
    # on masked vocabulary entries, extreme logits, ignored and undefined rows alike.
    from fastkd.reference import kd_loss as ref_kd

    s, t, y = make_inputs((7, 203), dtype=dtype, with_target=with_target, seed=12)
    t[:, 190:] = float("-inf")  # a padded vocabulary, masked in some student rows too
    s[:3, 190:] = float("-inf")
    s[3] = s[3].sign() * 1e4  # extreme logits
    s[4, 5] = float("nan")  # undefined rows
    t[5] = float("-inf")
    if y is not None:  # no target on a masked class (its cross-entropy is inf); row 0 ignored
        y = torch.where(y == -100, y, y % 190)
        assert y[0] == -100
    results = []
    for small in (1 << 30, 0):
        monkeypatch.setattr(ref_kd, "_SMALL_ELEMENTS", small)
        results.append(run(s, t, y, "torch", "none", temperature=T, alpha=0.3)[:2])
    (out_a, grad_a), (out_b, grad_b) = results
    assert torch.isnan(out_a[[4, 5]]).all() and torch.isfinite(out_a[[0, 1, 2, 3, 6]]).all()
    torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-5, equal_nan=True)
    # rounding differs between the two ways; the 1e4 logits' probabilities carry ~1e4 * 2**-24
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-5)
    torch.testing.assert_close(grad_a, grad_b, equal_nan=True, **tol)


def _chunked_runs(monkeypatch, s, t, y, chunks, **kw):
    """(loss, grad, upstream gradient) of the reference under each _CHUNK_ELEMENTS in `chunks`
    (reduction "none", a different upstream gradient per row)."""
    from fastkd.reference import kd_loss as ref_kd

    results = []
    for chunk in chunks:
        monkeypatch.setattr(ref_kd, "_CHUNK_ELEMENTS", chunk)
        results.append(run(s, t, y, "torch", "none", **kw))
    return results


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
def test_reference_many_row_chunks_equal_one_chunk(monkeypatch, divergence):
    # Past _CHUNK_ELEMENTS logits (4M) the reference loops over row chunks, and each chunk must
    # read its own rows of the upstream gradient, targets and statistics (the backward once
    # read the first chunk's upstream gradient for every chunk). _CHUNK_ELEMENTS = 600 on a
    # (9, 300) input gives chunks of 2 rows and a last one of 1: the same per-row loss and
    # gradient as one chunk, and as the float64 oracle for "kl".
    s, t, y = make_inputs((9, 300), ignored=0, seed=21)
    y[3] = -100  # an ignored row that is not its chunk's first
    for target, alpha in ((y, 0.0), (y, 0.4), (None, 0.4)):
        for T in (1.0, 2.0):
            kw = dict(temperature=T, alpha=alpha, divergence=divergence, beta=0.3)
            (one, g_one, gs), (many, g_many, _) = _chunked_runs(monkeypatch, s, t, target,
                                                                (1 << 22, 600), **kw)
            assert torch.isfinite(many).all() and torch.isfinite(g_many).all()
            torch.testing.assert_close(many, one, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(g_many, g_one, rtol=1e-6, atol=1e-7)
            if target is not None:
                assert many[3] == 0 and (g_many[3] == 0).all()
            if divergence == "kl":
                s64 = s.double().requires_grad_()
                ref = oracle(s64, t, target, T, alpha, reduction="none")
                (ref * gs.double()).sum().backward()
                torch.testing.assert_close(many.double(), ref.detach(), **FP32_TOL["loss"])
                torch.testing.assert_close(g_many.double(), s64.grad, **FP32_TOL["grad"])


@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("with_target", [True, False])
def test_reference_kl_large_row_chunks_match_oracle(monkeypatch, T, with_target):
    # Row chunks of more than _SMALL_ELEMENTS logits take _kl_backward_chunk (the gradient read
    # off the saved statistics; at T = 1 the student's softmax doubles as the CE's), the last,
    # smaller chunk _kl_backward_small. _SMALL_ELEMENTS = 500 and _CHUNK_ELEMENTS = 600 on a
    # (9, 300) input: chunks of 2 rows (600 > 500 logits) and a last one of 1 (300), each
    # scaled by its own rows' upstream gradient, against the float64 oracle and one chunk.
    from fastkd.reference import kd_loss as ref_kd

    monkeypatch.setattr(ref_kd, "_SMALL_ELEMENTS", 500)
    s, t, y = make_inputs((9, 300), with_target=with_target, ignored=0, seed=22)
    if with_target:
        y[5] = -100
    kw = dict(temperature=T, alpha=0.4)
    (one, g_one, gs), (many, g_many, _) = _chunked_runs(monkeypatch, s, t, y, (1 << 22, 600),
                                                        **kw)
    torch.testing.assert_close(many, one, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_many, g_one, rtol=1e-6, atol=1e-7)
    s64 = s.double().requires_grad_()
    ref = oracle(s64, t, y, T, 0.4, reduction="none")
    (ref * gs.double()).sum().backward()
    torch.testing.assert_close(many.double(), ref.detach(), **FP32_TOL["loss"])
    torch.testing.assert_close(g_many.double(), s64.grad, **FP32_TOL["grad"])


@needs_triton
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("with_target", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_triton_matches_oracle_fp32(shape, T, with_target, reduction):
    s, t, y = make_inputs(shape, with_target=with_target, seed=1)
    check_against_oracle(
        s, t, y, "triton", reduction, T, 0.7, FP32_TOL["loss"], FP32_TOL["grad"]
    )


@needs_triton
@pytest.mark.parametrize("shape", [(5, 37), (3, 1271)])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_triton_fp16_and_mixed_dtypes(shape, T):
    # fp16 inputs are exact in fp32 arithmetic, so the only error left is the fp16 gradient store.
    for s_dtype, t_dtype in [(torch.float16, torch.float16), (torch.float16, torch.float32),
                             (torch.float32, torch.float16)]:
        s, t, y = make_inputs(shape, s_dtype, t_dtype, seed=2)
        check_against_oracle(
            s, t, y, "triton", "mean", T, 0.5,
            dict(rtol=1e-5, atol=1e-5), dict(rtol=2e-3, atol=2e-6),
        )


@pytest.mark.parametrize("shape", [(5, 37), (2, 3, 1271)])
def test_reference_bf16_error_is_bounded_by_bf16_rounding(shape):
    # The loss is computed in fp32 from bf16 inputs; only the gradient is rounded to bf16.
    s, t, y = make_inputs(shape, torch.bfloat16, torch.bfloat16, seed=3)
    out, grad, gs = run(s, t, y, "torch", temperature=2.0, alpha=0.4)
    s64 = s.detach().double().requires_grad_()
    ref = oracle(s64, t, y, 2.0, 0.4)
    (ref * gs.double()).sum().backward()
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    assert grad.dtype == torch.bfloat16
    # bf16 keeps 8 bits: the stored gradient is within one bf16 rounding of the exact one.
    err = (grad.double() - s64.grad).abs()
    assert (err <= s64.grad.abs() * 2**-8 + 1e-12).all()


@needs_triton
def test_triton_equals_reference_on_same_inputs():
    s, t, y = make_inputs((7, 2053), seed=4)
    a, ga, _ = run(s, t, y, "torch", temperature=3.0, alpha=0.25, reduction="none")
    b, gb, _ = run(s, t, y, "triton", temperature=3.0, alpha=0.25, reduction="none")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_all_rows_ignored_gives_zero_loss_and_zero_grad(backend):
    s, t, y = make_inputs((4, 37))
    y.fill_(-100)
    for reduction in ("mean", "sum"):
        out, grad, _ = run(s, t, y, backend, reduction, grad_scale=torch.tensor(1.0))
        assert out.item() == 0.0
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_custom_ignore_index_and_empty_batch(backend):
    s, t, y = make_inputs((6, 37), ignored=0)
    y[1] = 7  # a real class that is also the ignore_index: must be skipped
    out, grad, _ = run(s, t, y, backend, "none", ignore_index=7)
    assert out[1].item() == 0.0 and torch.equal(grad[1], torch.zeros_like(grad[1]))
    assert (out[y != 7] > 0).all()
    e_s, e_t, e_y = make_inputs((0, 37))
    out, grad, _ = run(e_s, e_t, e_y, backend, "mean", grad_scale=torch.tensor(1.0))
    assert out.item() == 0.0 and grad.shape == (0, 37)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_masked_vocabulary_entries(backend):
    # A padded vocabulary: -inf teacher logits (zero probability), in the student too or not.
    s, t, y = make_inputs((5, 300), seed=5)
    t[:, 250:] = float("-inf")
    s[:3, 250:] = float("-inf")
    y = torch.randint(0, 250, (5,), device=s.device)
    for T in (0.5, 1.0, 3.0):
        check_against_oracle(
            s, t, y, backend, "none", T, 0.5, FP32_TOL["loss"], FP32_TOL["grad"]
        )
    _, grad, _ = run(s, t, y, backend, "mean", temperature=2.0)
    assert torch.equal(grad[:3, 250:], torch.zeros_like(grad[:3, 250:]))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("T", [0.25, 1.0, 16.0])
def test_extreme_logits_stay_finite_and_accurate(backend, T):
    s, t, y = make_inputs((4, 129), scale=1.0, seed=6)
    s = s.sign() * 1e4 * (s.abs() > 1.5) + s
    t = -t.sign() * 1e4 * (t.abs() > 1.5) + t
    out, grad, gs = run(s, t, y, backend, "none", temperature=T, alpha=0.5)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    s64 = s.detach().double().requires_grad_()
    ref = oracle(s64, t, y, T, 0.5, reduction="none")
    (ref * gs.double()).sum().backward()
    # fp32 statistics of logits of magnitude L = max|x|/T carry an absolute error of about
    # L * 2^-24 in every log-probability: that bounds the achievable accuracy here.
    delta = 4 * (1e4 / T) * 2.0**-24
    torch.testing.assert_close(out.double(), ref.detach(), rtol=max(1e-5, 2 * delta), atol=1e-3)
    torch.testing.assert_close(grad.double(), s64.grad, rtol=1e-4, atol=max(1e-4, T * delta))


@needs_triton
@pytest.mark.parametrize("T", [0.5, 1.0])
def test_a_masked_student_class_under_a_vanishing_teacher_one_is_finite(monkeypatch, T):
    """A student logit of -inf (a masked class) where the teacher's is finite but ~120 nats
    below the teacher's largest, in a later column block: the reference's fp32 probability of
    it is 0, and so is its term; the kernel's rescaling made it 0 * inf = nan."""
    from fastkd.kernels import kd_loss as kk

    monkeypatch.setattr(kk, "_launch_config", lambda n_cols: (32, 4))  # several blocks
    s, t = torch.zeros(2, 101), torch.zeros(2, 101)
    s[:, 3] = float("-inf")
    t[:, 90] = 120.0
    t[1, 3] = -5.0
    out, grad, _ = run(s, t, None, "triton", "none", temperature=T)
    ref, ref_grad, _ = run(s, t, None, "torch", "none", temperature=T)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("where", ["student", "teacher"])
@pytest.mark.parametrize("with_target", [True, False])
@pytest.mark.parametrize("kind", ["nan", "+inf", "no_mass"])
def test_undefined_row_is_nan(backend, divergence, where, with_target, kind):
    # A diverged model must not get a finite loss back: torch's own losses propagate nan, and
    # the masking that drops zero-probability entries must not drop a nan with them. A row whose
    # distribution is undefined (a nan or +inf logit, or every logit -inf: no mass) is nan too,
    # in the loss and the gradient, on both paths.
    s, t, y = make_inputs((4, 301), seed=11, with_target=with_target, ignored=0)
    bad = s if where == "student" else t
    for row, col in ((1, 17), (2, 0)):
        if kind == "no_mass":
            bad[row] = float("-inf")
        else:
            bad[row, col] = float(kind)
    if with_target:
        y[2] = -100  # an ignored row stays 0, nan or not, as in cross_entropy
    out, grad, _ = run(s, t, y, backend, "none", temperature=2.0, divergence=divergence)
    assert torch.isnan(out[1]), out
    assert torch.isnan(grad[1]).any()
    if with_target:
        assert out[2].item() == 0.0 and torch.equal(grad[2], torch.zeros_like(grad[2]))
    else:
        assert torch.isnan(out[2])
    assert torch.isfinite(out[[0, 3]]).all() and torch.isfinite(grad[[0, 3]]).all()


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_identical_logits_give_zero_soft_loss(backend):
    s, _, _ = make_inputs((3, 1271), seed=7)
    out, grad, _ = run(s, s.clone(), None, backend, "none", temperature=2.0)
    assert (out.abs() < 1e-5).all()
    assert grad.abs().max().item() < 1e-6


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_noncontiguous_inputs(backend):
    s, t, y = make_inputs((37, 9), seed=8)
    s_nc, t_nc = s.t(), t.t()  # (9, 37) views with column stride != 1
    y = torch.randint(0, 37, (9,), device=s.device)
    assert not s_nc.is_contiguous()
    check_against_oracle(s_nc, t_nc, y, backend, "none", 2.0, 0.5,
                         FP32_TOL["loss"], FP32_TOL["grad"])


# A next-token slice of a (B, L, V) batch, logits[:, :-1], is not one strided run of rows:
# flattening it would copy it (4 GB for 16k rows of a 128k vocabulary in bf16). The kernels read it
# in place as (B, L, V); the teacher may be sliced differently or not at all.
SLICES = {
    "both_sliced": (lambda s: s[:, :-1], lambda t: t[:, 1:]),
    "teacher_contiguous": (lambda s: s[:, 1:], lambda t: t[:, 1:].contiguous()),
    "strided_batch": (lambda s: s[::2, :-2], lambda t: t[::2, :-2]),
    "transposed": (lambda s: s.transpose(0, 1)[:, :-1], lambda t: t.transpose(0, 1)[:, :-1]),
}


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("layout", sorted(SLICES))
@pytest.mark.parametrize("with_target", [False, True])
def test_sliced_batch_matches_oracle_and_is_not_copied(backend, layout, with_target,
                                                       monkeypatch):
    cut_s, cut_t = SLICES[layout]
    s_full, t_full, _ = make_inputs((5, 9, 37), seed=31, with_target=False,
                                    device=device_for(backend))
    s_full.requires_grad_()
    s, t = cut_s(s_full), cut_t(t_full)
    y = None
    if with_target:
        y = torch.randint(0, 37, s.shape[:-1], device=s.device)
        y[0, 1] = -100
    seen = spy_student_logits(monkeypatch, backend, "kd_loss", ("kd_loss_forward", "kd_loss_backward"))
    gs = torch.linspace(0.5, 1.5, s.shape[0] * s.shape[1], device=s.device).reshape(s.shape[:-1])
    out = F.kd_loss(s, t, y, temperature=2.0, reduction="none", backend=backend)
    (out * gs).sum().backward()
    s64 = s.detach().double().requires_grad_()
    ref = oracle(s64, t, y, 2.0, 0.5, reduction="none")
    (ref * gs.double()).sum().backward()
    torch.testing.assert_close(out.double(), ref.detach(), **FP32_TOL["loss"])
    full_grad = torch.zeros_like(s_full, dtype=torch.float64)
    cut_s(full_grad).copy_(s64.grad)  # the gradient lands in the slice, zeros elsewhere
    torch.testing.assert_close(s_full.grad.double(), full_grad, **FP32_TOL["grad"])
    assert len(seen) >= 2
    for student in seen:  # the kernels got views of the leaf's storage, not copies
        assert student.untyped_storage().data_ptr() == s_full.untyped_storage().data_ptr()


def test_as_rows_views_every_layout_it_can():
    from fastkd._rows import as_row_pair, as_rows

    x = torch.randn(4, 6, 3, 11)
    cases = {  # layout -> shape of the rows
        "contiguous": (x, (72, 11)),
        "vocab_slice": (x[..., :5], (72, 5)),
        "last_rows": (x[:, :, 1:], (24, 2, 11)),
        "size_one_dims": (x[:1, :, 1:], (6, 2, 11)),
        "batch_stride": (x[::2], (2, 18, 11)),
    }
    for name, (v, shape) in cases.items():
        r = as_rows(v)
        assert tuple(r.shape) == shape, name
        assert r.data_ptr() == v.data_ptr() and r._base is not None, name  # a view
        torch.testing.assert_close(r.reshape(-1, 11 if shape[-1] == 11 else 5),
                                   v.reshape(-1, v.shape[-1]))
    three_runs = x[::2, :, 1:]  # leading dims that are three strided runs: copied
    assert as_rows(three_runs).shape == (24, 11)
    # a pair takes one shape: a contiguous partner is viewed in the sliced one's layout
    a, b = as_row_pair(x[:, :, 1:], torch.randn(4, 6, 2, 11))
    assert a.shape == b.shape == (24, 2, 11) and a.data_ptr() == x[:, :, 1:].data_ptr()
    # two layouts that share no split fall back to rows (copies), in the same order
    other = torch.randn(8, 6, 2, 11)[::2]  # rows (4, 12) where x[:, :, 1:] has (24, 2)
    a, b = as_row_pair(x[:, :, 1:], other)
    assert a.shape == b.shape == (48, 11)
    torch.testing.assert_close(a, x[:, :, 1:].reshape(-1, 11))
    torch.testing.assert_close(b, other.reshape(-1, 11))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_opcheck_sliced_batch(backend):
    s, t, y = make_inputs((3, 6, 37), seed=32, device=device_for(backend))
    s3, t3 = s[:, :-1].requires_grad_(), t[:, 1:]
    y = y[:, 1:].reshape(-1)
    torch.library.opcheck(torch.ops.fastkd.kd_loss_forward.default,
                          (s3, t3, y, 2.0, 0.5, -100, backend))
    _, stats = torch.ops.fastkd.kd_loss_forward(s3.detach(), t3, y, 2.0, 0.5, -100, backend)
    torch.library.opcheck(torch.ops.fastkd.kd_loss_backward.default,
                          (torch.rand(15, device=s.device), s3.detach(), t3, y, stats, 2.0, 0.5,
                           -100, backend))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_teacher_gets_no_gradient(backend):
    s, t, y = make_inputs((3, 37))
    t.requires_grad_()
    s.requires_grad_()
    F.kd_loss(s, t, y, temperature=2.0, backend=backend).backward()
    assert t.grad is None and s.grad is not None


def test_module_matches_functional_and_repr():
    s, t, y = make_inputs((2, 3, 37))
    mod = fastkd.nn.KDLoss(temperature=2.0, alpha=0.25, reduction="sum")
    torch.testing.assert_close(
        mod(s, t, y), F.kd_loss(s, t, y, temperature=2.0, alpha=0.25, reduction="sum")
    )
    r = repr(mod)
    assert "temperature=2.0" in r and "alpha=0.25" in r and "'sum'" in r
    assert mod(s, t, y).shape == ()
    assert fastkd.nn.KDLoss(reduction="none")(s, t, y).shape == (2, 3)


# ----------------------------------------------------------------------------- op contract


def _op_args(backend, with_target=True):
    s, t, y = make_inputs((3, 37), with_target=with_target)
    return s.requires_grad_(), t, y, 2.0, 0.5, -100, backend


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("with_target", [False, True])
def test_opcheck_forward(backend, with_target):
    torch.library.opcheck(torch.ops.fastkd.kd_loss_forward.default,
                          _op_args(backend, with_target))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_opcheck_backward(backend):
    s, t, y, T, a, ii, be = _op_args(backend)
    _, stats = torch.ops.fastkd.kd_loss_forward(s.detach(), t, y, T, a, ii, be)
    grad_rows = torch.rand(3, device=s.device)
    torch.library.opcheck(torch.ops.fastkd.kd_loss_backward.default,
                          (grad_rows, s.detach(), t, y, stats, T, a, ii, be))


# "auto" too: backend selection itself runs inside the compiled region (on torch 2.11 it once
# called importlib.util.find_spec there, which Dynamo refuses to trace).
@pytest.mark.parametrize("backend", ["torch", "auto", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("sliced", [False, True])
def test_torch_compile_fullgraph(backend, sliced):
    s, t, y = make_inputs((2, 5, 37), seed=9)

    def step(s, t, y):
        if sliced:  # next-token rows, read in place (B, L, V) by the op
            s, t, y = s[:, :-1], t[:, :-1], y[:, 1:]
        return F.kd_loss(s, t, y, temperature=2.0, alpha=0.5, backend=backend)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    s1 = s.clone().requires_grad_()
    s2 = s.clone().requires_grad_()
    out_c = compiled(s1, t, y)
    out_e = step(s2, t, y)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(s1.grad, s2.grad)


def test_torch_compile_inductor_module():
    s, t, y = make_inputs((4, 37), seed=10)
    mod = fastkd.nn.KDLoss(temperature=2.0, backend="torch")
    compiled = torch.compile(mod, fullgraph=True)
    torch.testing.assert_close(compiled(s, t, y), mod(s, t, y))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(alpha=1.5), ValueError, "alpha"),
        (dict(alpha=-0.1), ValueError, "alpha"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(backend="cutlass"), ValueError, "backend"),
        (dict(ignore_index=1.5), TypeError, "ignore_index"),
        (dict(temperature="2"), TypeError, "temperature"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    s, t, y = make_inputs((3, 37))
    with pytest.raises(exc, match=match):
        F.kd_loss(s, t, y, **kwargs)


def test_bad_tensors():
    s, t, y = make_inputs((3, 37))
    with pytest.raises(ValueError, match="same shape .*padded to different sizes"):
        F.kd_loss(s, t[:, :36], y)
    with pytest.raises(ValueError, match=r"same shape$"):  # rows differ: no vocabulary hint
        F.kd_loss(s, t[:2], y)
    with pytest.raises(ValueError, match="leading shape"):
        F.kd_loss(s, t, y[:2])
    with pytest.raises(TypeError, match="student_logits must be one of"):
        F.kd_loss(s.long(), t, y)
    with pytest.raises(TypeError, match="teacher_logits must be one of"):
        F.kd_loss(s, t.double(), y)
    with pytest.raises(TypeError, match="integer class indices"):
        F.kd_loss(s, t, y.float())
    with pytest.raises(TypeError, match="torch.Tensor"):
        F.kd_loss(s.tolist(), t, y)
    with pytest.raises(ValueError, match="on meta"):
        F.kd_loss(s, t.to("meta"), y)
    with pytest.raises(ValueError, match="at least one class"):
        F.kd_loss(s[:, :0], t[:, :0], y)


@pytest.mark.skipif(HAS_CUDA, reason="CPU tensors check target values eagerly")
@pytest.mark.parametrize("bad", [37, -1, 1000])
def test_target_out_of_range(bad):
    s, t, y = make_inputs((3, 37), device="cpu")
    y[1] = bad
    with pytest.raises(ValueError, match=r"\[0, 37\)"):
        F.kd_loss(s, t, y)


def test_target_out_of_range_on_the_async_path():
    # On an accelerator or under torch.compile the range check is a device-side assert (no host
    # sync); a compiled call on the CPU raises it as RuntimeError, so CI checks that branch too.
    from fastkd._validate import check_class_targets

    check = torch.compile(check_class_targets, fullgraph=True, dynamic=False)
    check(torch.tensor([0, 36, -100]), 37, -100)  # in range or ignored: fine
    for bad in (37, -1):
        with pytest.raises(RuntimeError, match=r"\[0, 37\)"):
            check(torch.tensor([0, bad, -100]), 37, -100)


def test_module_rejects_bad_settings():
    with pytest.raises(ValueError, match="temperature"):
        fastkd.nn.KDLoss(temperature=0)
    with pytest.raises(ValueError, match="alpha"):
        fastkd.nn.KDLoss(alpha=2)
    with pytest.raises(ValueError, match="reduction"):
        fastkd.nn.KDLoss(reduction="batchmean")
    with pytest.raises(ValueError, match="backend"):
        fastkd.nn.KDLoss(backend="fast")
    # the modules took int(ignore_index): -100.5 became -100 and True became 1, silently
    for module in (fastkd.nn.KDLoss, fastkd.nn.FusedLinearKDLoss):
        for bad in (-100.5, True, "-100"):
            with pytest.raises(TypeError, match="ignore_index"):
                module(ignore_index=bad)
    with pytest.raises(ValueError, match="chunk_rows"):
        fastkd.nn.FusedLinearKDLoss(chunk_rows=True)


# ----------------------------------------------------------------------------- backends


@pytest.mark.skipif(HAS_CUDA, reason="CPU-only behaviour")
def test_explicit_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    s, t, y = make_inputs((3, 37))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        F.kd_loss(s, t, y, backend="triton")
    # auto quietly takes the reference on CPU
    assert torch.isfinite(F.kd_loss(s, t, y, backend="auto"))


def test_env_override(monkeypatch):
    s, t, y = make_inputs((3, 37))
    monkeypatch.setenv("FASTKD_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FASTKD_BACKEND"):
        F.kd_loss(s, t, y)
    monkeypatch.setenv("FASTKD_BACKEND", "torch")
    assert F.KD_LOSS_BACKENDS.select("auto", s.device) == "torch"
    # an override naming a backend this op does not have leaves `auto` in charge
    monkeypatch.setenv("FASTKD_BACKEND", "cuda")
    assert F.KD_LOSS_BACKENDS.select("auto", "cpu") == "torch"
    if not HAS_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        monkeypatch.setenv("FASTKD_BACKEND", "triton")
        with pytest.raises(RuntimeError, match="cannot run kd_loss"):
            F.kd_loss(s, t, y)


def test_auto_picks_triton_on_cuda_and_reference_on_cpu(monkeypatch):
    monkeypatch.delenv("FASTKD_BACKEND", raising=False)
    assert F.KD_LOSS_BACKENDS.select("auto", "cpu") == "torch"
    assert F.KD_LOSS_BACKENDS.select("auto", "cuda") == "triton"


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(33, 50257), (7, 128256), (1, 1000)])
def test_gpu_triton_matches_reference(dtype, shape):
    s, t, y = make_inputs(shape, dtype, seed=11, device="cuda")
    a, ga, _ = run(s, t, y, "torch", "none", temperature=2.0, alpha=0.5)
    b, gb, _ = run(s, t, y, "triton", "none", temperature=2.0, alpha=0.5)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    tol = dict(rtol=2e-2, atol=1e-5) if dtype != torch.float32 else dict(rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(gb.float(), ga.float(), **tol)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("layout", sorted(SLICES))
def test_gpu_sliced_batch_matches_reference(layout):
    """The compiled kernels on (B, L, V) views: against the reference on the same rows."""
    cut_s, cut_t = SLICES[layout]
    s_full, t_full, _ = make_inputs((6, 41, 50257), torch.bfloat16, seed=13, with_target=False,
                                    device="cuda")
    s, t = cut_s(s_full), cut_t(t_full)
    y = torch.randint(0, 50257, s.shape[:-1], device="cuda")
    a, ga, gs = run(s.contiguous(), t.contiguous(), y, "torch", "none", temperature=2.0)
    leaf = s_full.detach().clone().requires_grad_()
    b = F.kd_loss(cut_s(leaf), t, y, temperature=2.0, reduction="none", backend="triton")
    (b * gs).sum().backward()
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cut_s(leaf.grad).float(), ga.float(), rtol=2e-2, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpu_cuda_graph_capture_and_no_host_sync():
    s, t, y = make_inputs((64, 32003), torch.bfloat16, seed=12, device="cuda")
    s.requires_grad_()
    torch.cuda.set_sync_debug_mode("error")
    try:
        F.kd_loss(s, t, y, temperature=2.0).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    static_s = s.detach().clone().requires_grad_()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        F.kd_loss(static_s, t, y, temperature=2.0).backward()  # warm up (compiles kernels)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    static_s.grad = None
    with torch.cuda.graph(graph):
        loss = F.kd_loss(static_s, t, y, temperature=2.0)
        loss.backward()
    graph.replay()
    torch.cuda.synchronize()
    ref = F.kd_loss(s.detach(), t, y, temperature=2.0, backend="torch")
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-4)
