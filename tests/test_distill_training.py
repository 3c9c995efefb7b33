"""Distiller's training-loop options: mixed precision (autocast, fp16 GradScaler), gradient
accumulation, gradient clipping and learning-rate schedulers (CPU, small models)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from fastkd import Distiller


def _mlp(d_in, hidden, d_out, seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


def _batches(n_batches=4, rows=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, 12, generator=g), torch.randint(0, 5, (rows,), generator=g))
            for _ in range(n_batches)]


def _sgd(lr):
    return lambda params: torch.optim.SGD(params, lr=lr)


def _dtype_probe(module):
    seen = []
    module.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    return seen


@pytest.mark.parametrize("teacher_autocast, teacher_dtype", [(None, torch.bfloat16),
                                                             (False, torch.float32)])
def test_autocast_runs_the_student_in_bf16_and_keeps_fp32_parameters(teacher_autocast,
                                                                     teacher_dtype):
    teacher, student = _mlp(12, 32, 5, seed=0), _mlp(12, 16, 5, seed=1)
    s_seen, t_seen = _dtype_probe(student[0]), _dtype_probe(teacher[0])
    d = Distiller(teacher, student, autocast=True, teacher_autocast=teacher_autocast,
                  progress=False, lr=1e-2)
    assert not d.scaler.is_enabled()  # bf16 needs no loss scaling
    batches = _batches()
    before = d.evaluate(batches)["loss"]
    hist = d.fit(batches, epochs=6)
    assert set(s_seen) == {torch.bfloat16}
    assert set(t_seen) == {teacher_dtype}
    assert all(p.dtype == torch.float32 for p in student.parameters())
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert d.evaluate(batches)["loss"] < before


def test_autocast_training_tracks_fp32_training():
    teacher, student = _mlp(12, 32, 5, seed=0), _mlp(12, 16, 5, seed=1)
    batches = _batches()
    losses = []
    for autocast in (None, torch.bfloat16):
        d = Distiller(teacher, copy.deepcopy(student), autocast=autocast, progress=False,
                      optimizer=_sgd(0.1))
        losses.append([h["train_loss"] for h in d.fit(batches, epochs=3)])
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=2e-2,
                               atol=0)
    assert losses[1] != losses[0]  # it did run in bf16


def test_fp16_autocast_goes_through_a_grad_scaler():
    teacher, student = _mlp(12, 32, 5, seed=0), _mlp(12, 16, 5, seed=1)
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            pass
    except Exception:
        pytest.skip("no fp16 autocast on this CPU build")
    s_seen = _dtype_probe(student[0])
    d = Distiller(teacher, student, autocast=torch.float16, progress=False, lr=1e-2)
    assert d.scaler.is_enabled()
    hist = d.fit(_batches(), epochs=4)
    assert set(s_seen) == {torch.float16}
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert d.scaler.get_scale() > 0
    assert all(torch.isfinite(p).all() for p in student.parameters())


def test_gradient_accumulation_equals_one_step_on_the_joined_batch():
    teacher, student = _mlp(12, 32, 5, seed=0), _mlp(12, 16, 5, seed=1)
    batches = _batches(n_batches=4, rows=8, seed=3)
    joined = [(torch.cat([batches[i][0], batches[i + 1][0]]),
               torch.cat([batches[i][1], batches[i + 1][1]])) for i in (0, 2)]
    a, b = copy.deepcopy(student), copy.deepcopy(student)
    Distiller(teacher, a, optimizer=_sgd(0.5), grad_accum_steps=2, progress=False).fit(batches)
    Distiller(teacher, b, optimizer=_sgd(0.5), progress=False).fit(joined)
    assert not torch.equal(a[0].weight, student[0].weight)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["uneven sizes", "uneven ignored rows", "short last window"])
def test_accumulation_weighs_batches_by_their_counted_rows(case):
    """Each batch's mean loss was divided by grad_accum_steps: batches of 8 and 2 rows, or
    with most rows ignored in one, weighed the same, and a short last window took a fraction
    of a step. The step is now the one of the joined batches."""
    teacher, student = _mlp(12, 32, 5, seed=0), _mlp(12, 16, 5, seed=1)
    g = torch.Generator().manual_seed(4)
    sizes = {"uneven sizes": (8, 2), "uneven ignored rows": (8, 8),
             "short last window": (8, 8, 5)}[case]
    batches = [(torch.randn(n, 12, generator=g), torch.randint(0, 5, (n,), generator=g))
               for n in sizes]
    if case == "uneven ignored rows":
        batches[1][1][1:] = -100  # one counted row against eight
    windows = [batches[:2], batches[2:]] if len(batches) > 2 else [batches]
    joined = [(torch.cat([x for x, _ in w]), torch.cat([y for _, y in w])) for w in windows]
    a, b = copy.deepcopy(student), copy.deepcopy(student)
    hist = Distiller(teacher, a, optimizer=_sgd(0.5), grad_accum_steps=2,
                     progress=False).fit(batches)
    ref = Distiller(teacher, b, optimizer=_sgd(0.5), progress=False).fit(joined)
    assert not torch.equal(a[0].weight, student[0].weight)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    if len(joined) == 1:  # the epoch's loss is over its counted rows, as the joined batch's
        assert hist[0]["train_loss"] == pytest.approx(ref[0]["train_loss"], rel=1e-5)


def test_a_skipped_fp16_step_does_not_step_the_scheduler():
    """An fp16 step with inf gradients is skipped by the GradScaler; the scheduler stepped
    anyway (0.1 -> 0.0125 over three skipped steps), out of phase with the optimizer."""
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            pass
    except Exception:
        pytest.skip("no fp16 autocast on this CPU build")
    teacher = _mlp(12, 32, 5, seed=0)
    torch.manual_seed(1)
    student = nn.Sequential(nn.Linear(12, 64), nn.Linear(64, 5))
    with torch.no_grad():  # large activations: fp16 gradients overflow at the first scales
        student[0].weight.mul_(30.0)
    d = Distiller(teacher, student, autocast=torch.float16, optimizer=_sgd(0.1),
                  progress=False,
                  scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5))
    before = [p.detach().clone() for p in student.parameters()]
    d.fit([(x * 5, y) for x, y in _batches(n_batches=3, rows=8)])
    assert all(torch.equal(p, q) for p, q in zip(student.parameters(), before))
    assert d.scaler.get_scale() < 65536.0
    assert d.optimizer.param_groups[0]["lr"] == pytest.approx(0.1)


def test_a_scheduler_that_needs_a_metric_is_refused_before_training():
    teacher, student = _mlp(12, 32, 5, seed=0), _mlp(12, 16, 5, seed=1)
    before = [p.detach().clone() for p in student.parameters()]
    d = Distiller(teacher, student, optimizer=_sgd(0.1), progress=False,
                  scheduler=lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt))
    with pytest.raises(TypeError, match="metric"):
        d.fit(_batches(n_batches=2))
    assert all(torch.equal(p, q) for p, q in zip(student.parameters(), before))


def test_a_partial_accumulation_steps_at_the_end_of_each_epoch():
    teacher, student = _mlp(12, 32, 5, seed=0), _mlp(12, 16, 5, seed=1)
    d = Distiller(teacher, student, grad_accum_steps=2, progress=False,
                  optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))
    d.fit(_batches(n_batches=3), epochs=2)
    state = d.optimizer.state[student[0].weight]
    assert int(state["step"]) == 4  # 2 per epoch: after batches 2 and 3


def test_max_grad_norm_bounds_each_step():
    teacher, student = _mlp(12, 32, 5, seed=0), _mlp(12, 16, 5, seed=1)
    before = [p.detach().clone() for p in student.parameters()]
    Distiller(teacher, student, optimizer=_sgd(1.0), max_grad_norm=1e-3,
              progress=False).fit(_batches(n_batches=1))
    step = torch.cat([(p.detach() - q).flatten() for p, q in zip(student.parameters(), before)])
    torch.testing.assert_close(step.norm(), torch.tensor(1e-3), rtol=1e-4, atol=0)


def test_scheduler_is_built_with_the_optimizer_and_stepped_per_optimizer_step():
    teacher, student = _mlp(12, 32, 5, seed=0), _mlp(12, 16, 5, seed=1)
    d = Distiller(
        teacher, student, optimizer=_sgd(0.1), grad_accum_steps=2, progress=False,
        scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5**i),
    )
    d.fit(_batches(n_batches=4), epochs=1)  # 2 optimizer steps
    assert d.scheduler is not None
    assert d.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.25)


def test_scheduler_covers_hint_projections_added_to_a_given_optimizer():
    teacher, student = _mlp(12, 32, 5, seed=0), _mlp(12, 16, 5, seed=1)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    d = Distiller(teacher, student, optimizer=opt, hints=[("0", "0")], progress=False,
                  scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda i: 0.5**i))
    d.fit(_batches(n_batches=2))
    assert len(d.optimizer.param_groups) == 2  # the projection's group came first
    assert [g["lr"] for g in d.optimizer.param_groups] == pytest.approx([0.025, 1e-3 * 0.25])


def _gpt2(seed, n_layer):
    """A tiny GPT-2 without dropout (vocabulary 61), in eval mode."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=n_layer, n_head=2, n_embd=32, vocab_size=61,
                                  n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_fused_lm_head_under_autocast_matches_the_unfused_path():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 61, (8, 12), generator=g)
    batches = [{"input_ids": ids[i:i + 4], "labels": ids[i:i + 4]} for i in (0, 4)]
    teacher, student = _gpt2(0, 2), _gpt2(1, 1)
    losses = []
    for fused in (False, True):
        d = Distiller(teacher, copy.deepcopy(student), autocast=True, fused_lm_head=fused,
                      optimizer=_sgd(0.1), progress=False, backend="torch")
        losses.append([h["train_loss"] for h in d.fit(batches, epochs=2)])
        assert all(p.dtype == torch.float32 for p in d.student.parameters())
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-2,
                               atol=0)


@pytest.mark.parametrize("teacher_autocast, teacher_dtype", [(None, torch.bfloat16),
                                                             (False, torch.float32)])
def test_fused_lm_head_computes_each_head_in_its_models_dtype(monkeypatch, teacher_autocast,
                                                              teacher_dtype):
    """Inside a bf16 student's autocast, teacher_autocast=False keeps the teacher's lm head in
    fp32 in the fused path too (as its unfused forward does); the student's head is bf16."""
    import fastkd.functional as fkd_functional

    seen = []
    real = fkd_functional.fused_linear_kd_loss

    def spy(h_s, w_s, h_t, w_t, *args, **kwargs):
        # the dtype each matmul computes in: autocast's when it is on, else the inputs'
        cast = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        seen.append((cast or h_s.dtype, cast or h_t.dtype))
        return real(h_s, w_s, h_t, w_t, *args, **kwargs)

    monkeypatch.setattr(fkd_functional, "fused_linear_kd_loss", spy)
    ids = torch.randint(0, 61, (4, 12), generator=torch.Generator().manual_seed(0))
    d = Distiller(_gpt2(0, 2), _gpt2(1, 1), autocast=True, teacher_autocast=teacher_autocast,
                  fused_lm_head=True, optimizer=_sgd(0.1), progress=False, backend="torch")
    d.fit([{"input_ids": ids, "labels": ids}], epochs=1)
    assert seen == [(torch.bfloat16, teacher_dtype)]
    assert all(p.dtype == torch.float32 for p in d.student.parameters())


def test_bad_training_options():
    teacher, student = _mlp(12, 32, 5, seed=0), _mlp(12, 16, 5, seed=1)
    for kwargs, err, match in [
        ({"grad_accum_steps": 0}, ValueError, "grad_accum_steps"),
        ({"grad_accum_steps": True}, ValueError, "grad_accum_steps"),
        ({"grad_accum_steps": 1.5}, ValueError, "grad_accum_steps"),
        ({"max_grad_norm": 0.0}, ValueError, "max_grad_norm"),
        ({"max_grad_norm": float("nan")}, ValueError, "max_grad_norm"),
        ({"autocast": torch.float32}, ValueError, "autocast must be bfloat16 or float16"),
        ({"autocast": "bf16"}, TypeError, "autocast must be None"),
        ({"teacher_autocast": torch.int8}, ValueError, "teacher_autocast"),
        ({"scheduler": 3}, TypeError, "scheduler"),
    ]:
        with pytest.raises(err, match=match):
            Distiller(teacher, student, progress=False, **kwargs)
    d = Distiller(teacher, student, progress=False, scheduler=lambda opt: object())
    with pytest.raises(TypeError, match="step"):
        d.fit(_batches(n_batches=1))


def _resume_setup(**kw):
    teacher, student = _mlp(12, 32, 5, seed=0), _mlp(12, 16, 5, seed=1)
    make = lambda s: Distiller(  # noqa: E731
        teacher, s, progress=False, hints=[("0", "0")],
        optimizer=lambda p: torch.optim.Adam(p, lr=1e-2),
        scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5),
        **kw)
    return student, make


@pytest.mark.parametrize("kw", [{}, {"adversarial_weight": 0.1}, {"grad_accum_steps": 2}],
                         ids=["plain", "adversarial", "accumulation"])
def test_a_resumed_run_continues_exactly(kw, tmp_path):
    import io

    student, make = _resume_setup(**kw)
    batches = _batches(n_batches=5)
    torch.manual_seed(5)  # projections and discriminator are initialised on the first batch
    straight = make(copy.deepcopy(student))
    straight.fit(batches, epochs=3)

    torch.manual_seed(5)
    first = make(copy.deepcopy(student))
    first.fit(batches, epochs=1)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = make(copy.deepcopy(student))  # fresh, nothing built yet
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert [h["epoch"] for h in resumed.history] == [1]
    resumed.fit(batches, epochs=2)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    for a, b in zip(resumed.student.parameters(), straight.student.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(resumed.hint_projections.parameters(),
                    straight.hint_projections.parameters()):
        assert torch.equal(a, b)
    assert resumed.optimizer.param_groups[0]["lr"] == straight.optimizer.param_groups[0]["lr"]
    assert [h["train_loss"] for h in resumed.history] == pytest.approx(
        [h["train_loss"] for h in straight.history], rel=1e-6)
    if kw.get("adversarial_weight"):
        for a, b in zip(resumed.discriminator.parameters(), straight.discriminator.parameters()):
            assert torch.equal(a, b)


def test_resuming_into_a_different_distiller_is_refused():
    student, make = _resume_setup()
    d = make(copy.deepcopy(student))
    d.fit(_batches(n_batches=2))
    state = d.state_dict()
    teacher = d.teacher
    with pytest.raises(ValueError, match="hint projections"):
        Distiller(teacher, copy.deepcopy(student), progress=False).load_state_dict(state)
    with pytest.raises(ValueError, match="scheduler"):
        Distiller(teacher, copy.deepcopy(student), progress=False,
                  hints=[("0", "0")]).load_state_dict(state)
    with pytest.raises(ValueError, match="not a Distiller state"):
        d.load_state_dict(d.student.state_dict())


@pytest.mark.parametrize("divergence, beta", [("reverse_kl", 0.5), ("jsd", 0.3)])
def test_divergence_reaches_the_module_and_the_distiller(divergence, beta):
    import fastkd.functional as FK
    from fastkd.nn import KDLoss

    torch.manual_seed(0)
    s, t, y = torch.randn(6, 9), torch.randn(6, 9), torch.randint(0, 9, (6,))
    loss = KDLoss(temperature=2.0, divergence=divergence, beta=beta)
    want = FK.kd_loss(s, t, y, temperature=2.0, divergence=divergence, beta=beta)
    assert torch.equal(loss(s, t, y), want)
    assert not torch.equal(want, FK.kd_loss(s, t, y, temperature=2.0))
    assert divergence in repr(loss)
    with pytest.raises(ValueError, match="divergence"):
        KDLoss(divergence="hellinger")
    # the Distiller's objective is that loss, in fit and evaluate
    teacher, student = _mlp(12, 32, 5, seed=0), _mlp(12, 16, 5, seed=1)
    batches = _batches(n_batches=2)
    d = Distiller(teacher, student, temperature=2.0, divergence=divergence, beta=beta,
                  progress=False)
    with torch.no_grad():
        want = sum(FK.kd_loss(student(x), teacher(x), yy, temperature=2.0, alpha=0.5,
                              divergence=divergence, beta=beta) for x, yy in batches) / 2
    assert d.evaluate(batches)["loss"] == pytest.approx(want.item(), rel=1e-5)


# ---- offline distillation: the teacher stored as its top-k (teacher=None)


def _topk_batches(teacher, batches, k, temperature):
    import fastkd

    out = []
    with torch.no_grad():
        for x, y in batches:
            ids, lps = fastkd.teacher_topk(teacher(x), k, temperature=temperature)
            out.append((x, y, ids, lps))
    return out


def test_offline_with_the_whole_vocabulary_trains_like_the_online_teacher():
    teacher, student = _mlp(12, 32, 5, seed=0), _mlp(12, 16, 5, seed=1)
    batches = _batches(n_batches=3)
    stored = _topk_batches(teacher, batches, k=5, temperature=2.0)
    runs = []
    for t, data in ((teacher, batches), (None, stored)):
        d = Distiller(t, copy.deepcopy(student), temperature=2.0, optimizer=_sgd(0.2),
                      progress=False)
        hist = d.fit(data, epochs=2, eval_loader=data)
        runs.append((hist, d.student))
    (h_on, s_on), (h_off, s_off) = runs
    for key in ("train_loss", "eval_loss", "eval_agreement", "eval_accuracy"):
        assert [h[key] for h in h_off] == pytest.approx([h[key] for h in h_on], rel=1e-5), key
    for a, b in zip(s_off.parameters(), s_on.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_offline_top2_trains_and_agreement_is_against_the_teachers_top1():
    teacher, student = _mlp(12, 32, 5, seed=0), _mlp(12, 16, 5, seed=1)
    batches = _batches(n_batches=4)
    stored = _topk_batches(teacher, batches, k=2, temperature=1.0)
    d = Distiller(None, student, temperature=1.0, alpha=1.0, progress=False, lr=1e-2)
    before = d.evaluate(stored)
    hist = d.fit(stored, epochs=8)
    after = d.evaluate(stored)
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert after["agreement"] > before["agreement"]
    with torch.no_grad():
        top1 = torch.cat([teacher(x).argmax(-1) for x, _ in batches])
        pred = torch.cat([student(x).argmax(-1) for x, _ in batches])
    assert after["agreement"] == pytest.approx((pred == top1).float().mean().item())


def test_offline_causal_lm_shifts_like_the_online_path():
    import fastkd

    teacher, student = _gpt2(0, 2), _gpt2(1, 1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 61, (6, 10), generator=g)
    labels = ids.clone()
    labels[0, 7:] = -100
    batches = [{"input_ids": ids[i:i + 3], "labels": labels[i:i + 3]} for i in (0, 3)]
    stored = []
    for b in batches:
        with torch.no_grad():
            t_ids, t_lps = fastkd.teacher_topk(teacher(input_ids=b["input_ids"]).logits, 61,
                                               temperature=2.0)
        stored.append({**b, "teacher_ids": t_ids, "teacher_logprobs": t_lps})
    losses = []
    for t, data in ((teacher, batches), (None, stored)):
        d = Distiller(t, copy.deepcopy(student), temperature=2.0, optimizer=_sgd(0.1),
                      progress=False, backend="torch")
        assert d.shift_labels
        losses.append([h["train_loss"] for h in d.fit(data, epochs=2)])
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_offline_errors():
    student = _mlp(12, 16, 5, seed=1)
    for kwargs in ({"hints": [("0", "0")]}, {"adversarial_weight": 0.1},
                   {"task": "regression"}, {"divergence": "jsd"}):
        with pytest.raises(ValueError, match="offline"):
            Distiller(None, student, progress=False, **kwargs)
    d = Distiller(None, student, progress=False)
    x, y = _batches(n_batches=1)[0]
    with pytest.raises(ValueError, match="offline"):
        d.fit([(x, y)])
    with pytest.raises(ValueError, match="missing"):
        d.fit([{"input": x, "teacher_ids": torch.zeros(16, 2, dtype=torch.long)}])
    with pytest.raises(ValueError, match="leading shape"):
        d.fit([(x, y, torch.zeros(8, 2, dtype=torch.long), torch.zeros(8, 2))])


def test_a_nan_loss_stops_training_before_its_optimizer_step():
    """A nan loss was noticed at the end of the epoch, after nan updates had ruined the
    student; now the step it would have taken is not taken."""
    teacher, student = _mlp(12, 32, 5, seed=0), _mlp(12, 16, 5, seed=1)
    batches = _batches(n_batches=4)
    batches[2] = (torch.full_like(batches[2][0], float("nan")), batches[2][1])
    d = Distiller(teacher, student, optimizer=_sgd(0.1), progress=False)
    with pytest.raises(FloatingPointError, match="batch 3"):
        d.fit(batches)
    assert all(torch.isfinite(p).all() for p in student.parameters())
    assert d.optimizer.param_groups[0]["params"][0].grad is None


# Found by an audit of the Distiller


def test_a_layer_unfrozen_between_fits_joins_the_optimizer():
    """Gradual unfreezing: the unfrozen layer was never in the optimizer, so it never trained
    (its gradient piled up, never cleared)."""
    teacher, student = _mlp(12, 32, 5, seed=0), _mlp(12, 16, 5, seed=1)
    student[0].requires_grad_(False)
    d = Distiller(teacher, student, progress=False, lr=1e-2)
    batches = _batches()
    d.fit(batches, epochs=1)
    student[0].requires_grad_(True)
    before = student[0].weight.detach().clone()
    with pytest.warns(UserWarning, match="not in its optimizer"):
        d.fit(batches, epochs=1)
    assert not torch.equal(student[0].weight, before)
    assert any(p is student[0].weight for g in d.optimizer.param_groups for p in g["params"])


def test_evaluate_weighs_the_hint_loss_by_rows_whatever_the_batching():
    """It averaged the batches' means: 21 rows as 20 + 1 gave another figure than as 21."""
    teacher, student = _mlp(12, 32, 5, seed=0), _mlp(12, 16, 5, seed=1)
    d = Distiller(teacher, student, hints=[("0", "0")], progress=False, lr=1e-2)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(21, 12, generator=g), torch.randint(0, 5, (21,), generator=g)
    d.fit([(x, y)], epochs=1)
    whole = d.evaluate([(x, y)])["hint_loss"]
    split = d.evaluate([(x[:20], y[:20]), (x[20:], y[20:])])["hint_loss"]
    assert split == pytest.approx(whole, rel=1e-6)
    with torch.no_grad():
        proj = d.hint_projections[0]
        direct = (proj(student[0](x)) - teacher[0](x)).square().mean().item()
    assert whole == pytest.approx(direct, rel=1e-5)


@pytest.mark.parametrize("kind", ["regression", "hints"])
def test_an_empty_batch_leaves_the_loss_finite(kind):
    """A batch of no rows (a ragged last one) has weight 0; its mean squared error over no
    elements was nan, and 0 * nan stopped fit with a FloatingPointError."""
    g = torch.Generator().manual_seed(4)
    if kind == "regression":
        teacher, student = _mlp(12, 32, 3, seed=0), _mlp(12, 16, 3, seed=1)
        x, y = torch.randn(16, 12, generator=g), torch.randn(16, 3, generator=g)
        d = Distiller(teacher, student, task="regression", progress=False, lr=1e-2)
    else:
        teacher, student = _mlp(12, 32, 5, seed=0), _mlp(12, 16, 5, seed=1)
        x, y = torch.randn(16, 12, generator=g), torch.randint(0, 5, (16,), generator=g)
        d = Distiller(teacher, student, hints=[("0", "0")], progress=False, lr=1e-2)
    full = [(x[:8], y[:8]), (x[8:], y[8:])]
    reference = copy.deepcopy(d)
    torch.manual_seed(5)  # the hint projection is drawn at the first batch
    history = d.fit(full + [(x[:0], y[:0])], epochs=1)
    assert math.isfinite(history[0]["train_loss"])
    # the empty batch changes nothing: the same training as without it
    torch.manual_seed(5)
    assert history[0]["train_loss"] == pytest.approx(reference.fit(full, epochs=1)[0]["train_loss"])
    metrics = d.evaluate(full + [(x[:0], y[:0])])
    assert all(math.isfinite(v) for v in metrics.values())


def test_a_compiled_students_checkpoint_resumes_an_uncompiled_one_and_back():
    """state_dict kept torch.compile's _orig_mod. prefix: the two did not load into each other."""
    torch._dynamo.reset()
    teacher, student = _mlp(12, 32, 5, seed=0), _mlp(12, 16, 5, seed=1)
    batches = _batches()
    compiled = Distiller(teacher, torch.compile(copy.deepcopy(student), backend="eager"),
                         progress=False, lr=1e-2)
    compiled.fit(batches, epochs=1)
    state = compiled.state_dict()
    assert not any(k.startswith("_orig_mod.") for k in state["student"])
    plain = Distiller(teacher, copy.deepcopy(student), progress=False, lr=1e-2)
    plain.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(plain.student.state_dict().values(),
                                                 state["student"].values()))
    # a checkpoint written with the prefix (before) loads too
    old = dict(state, student={f"_orig_mod.{k}": v for k, v in state["student"].items()})
    Distiller(teacher, copy.deepcopy(student), progress=False, lr=1e-2).load_state_dict(old)
    again = Distiller(teacher, torch.compile(copy.deepcopy(student), backend="eager"),
                      progress=False, lr=1e-2)
    again.load_state_dict(plain.state_dict())


def test_loose_arguments_are_checked_when_the_distiller_is_made():
    teacher, student = _mlp(12, 32, 5, seed=0), _mlp(12, 16, 5, seed=1)
    with pytest.raises(TypeError, match="progress"):
        Distiller(teacher, student, progress="no")
    with pytest.raises(ValueError, match="no 'cuda' backend"):  # failed at the first loss
        Distiller(teacher, student, backend="cuda")
    np = pytest.importorskip("numpy")
    d = Distiller(teacher, student, temperature=np.float32(2.0), progress=False)
    assert d.temperature == 2.0
