"""fastkd.Distiller on small synthetic problems (CPU, a few seconds in all)."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastkd
from fastkd import Distiller


def _mlp(d_in, hidden, d_out, seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


def _classification_data(seed=0, n=1600, d=20, classes=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, classes, generator=g)
    y = (x @ w + 0.5 * torch.randn(n, classes, generator=g)).argmax(1)
    split = n * 3 // 4
    train = DataLoader(
        TensorDataset(x[:split], y[:split]),
        batch_size=64,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    test = DataLoader(TensorDataset(x[split:], y[split:]), batch_size=200)
    return train, test, (x[split:], y[split:])


def _train_supervised(model, loader, epochs, lr=1e-2):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        for xb, yb in loader:
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


@pytest.fixture(scope="module")
def problem():
    train, test, (x_test, y_test) = _classification_data()
    teacher = _train_supervised(_mlp(20, 128, 5, seed=1), train, epochs=15)
    with torch.no_grad():
        teacher_acc = (teacher(x_test).argmax(1) == y_test).float().mean().item()
    return train, test, teacher, teacher_acc


def test_student_reaches_teacher_accuracy_and_loss_falls(problem):
    train, test, teacher, teacher_acc = problem
    assert teacher_acc > 0.8  # the problem is learnable, or the comparison means nothing
    teacher_state = copy.deepcopy(teacher.state_dict())
    student = _mlp(20, 32, 5, seed=2)
    d = Distiller(teacher, student, temperature=4.0, alpha=0.5, lr=1e-2, progress=False)
    history = d.fit(train, epochs=12, eval_loader=test)

    assert len(history) == 12 and d.history == history
    assert [h["epoch"] for h in history] == list(range(1, 13))
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    assert history[-1]["eval_loss"] < history[0]["eval_loss"]
    metrics = d.evaluate(test)
    assert set(metrics) == {"loss", "accuracy", "agreement"}
    assert metrics["accuracy"] >= teacher_acc - 0.05
    assert metrics["agreement"] >= 0.85
    assert metrics["accuracy"] == pytest.approx(history[-1]["eval_accuracy"])
    # the teacher is never trained
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_state[k]), k
    assert all(p.grad is None for p in teacher.parameters())


def test_evaluate_matches_a_direct_computation(problem):
    _, test, teacher, _ = problem
    student = _mlp(20, 16, 5, seed=3)
    d = Distiller(teacher, student, temperature=2.0, alpha=0.3, progress=False)
    student.train()
    m = d.evaluate(test)
    assert student.training  # mode restored
    x, y = test.dataset.tensors
    with torch.no_grad():
        s, t = student(x), teacher(x)
    kl = F.kl_div(
        F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), log_target=True, reduction="none"
    ).sum(-1)
    expected = (0.3 * 4 * kl + 0.7 * F.cross_entropy(s, y, reduction="none")).mean()
    assert m["loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert m["accuracy"] == pytest.approx((s.argmax(1) == y).float().mean().item())
    assert m["agreement"] == pytest.approx((s.argmax(1) == t.argmax(1)).float().mean().item())


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0])
def test_training_objective_is_the_kd_loss(alpha):
    """One batch, one epoch: the recorded loss is the objective at the initial weights, and the
    SGD step moves the weights by exactly lr times its gradient."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 7), torch.randint(0, 4, (32,))
    teacher, student = _mlp(7, 9, 4, seed=4), _mlp(7, 5, 4, seed=5)
    ref = copy.deepcopy(student)
    d = Distiller(
        teacher,
        student,
        temperature=3.0,
        alpha=alpha,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        progress=False,
    )
    hist = d.fit([(x, y)], epochs=1)
    with torch.no_grad():
        t = teacher(x)
    s = ref(x)
    kl = F.kl_div(
        F.log_softmax(s / 3, -1), F.log_softmax(t / 3, -1), log_target=True, reduction="batchmean"
    )
    expected = alpha * 9 * kl + (1 - alpha) * F.cross_entropy(s, y)
    assert hist[0]["train_loss"] == pytest.approx(expected.item(), rel=1e-5)
    expected.backward()
    for p_new, p_old in zip(student.parameters(), ref.parameters()):
        torch.testing.assert_close(p_new, p_old - 0.1 * p_old.grad, rtol=1e-5, atol=1e-6)


def test_regression_mode():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(800, 6, generator=g)
    teacher = _mlp(6, 32, 3, seed=6)
    with torch.no_grad():
        y = teacher(x) + 0.01 * torch.randn(800, 3, generator=g)
    train = DataLoader(
        TensorDataset(x[:600], y[:600]),
        batch_size=50,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    test = DataLoader(TensorDataset(x[600:], y[600:]), batch_size=100)
    student = _mlp(6, 32, 3, seed=7)
    d = Distiller(teacher, student, task="regression", alpha=0.8, lr=1e-2, progress=False)
    before = d.evaluate(test)
    assert set(before) == {"loss"}  # no accuracy / agreement for regression
    hist = d.fit(train, epochs=15, eval_loader=test)
    assert hist[-1]["train_loss"] < 0.2 * hist[0]["train_loss"]
    after = d.evaluate(test)
    assert after["loss"] < 0.1 * before["loss"]
    # loss is alpha * MSE(s, t) + (1 - alpha) * MSE(s, y), checked directly
    with torch.no_grad():
        s, t = student(x[600:]), teacher(x[600:])
    expected = 0.8 * F.mse_loss(s, t) + 0.2 * F.mse_loss(s, y[600:])
    assert after["loss"] == pytest.approx(expected.item(), rel=1e-4)
    # without targets: MSE to the teacher only
    d_nolabel = Distiller(teacher, student, task="regression", progress=False)
    assert d_nolabel.evaluate([x[600:]])["loss"] == pytest.approx(F.mse_loss(s, t).item(), rel=1e-5)


def test_hints_train_the_projection_and_hint_loss_falls(problem):
    train, test, teacher, _ = problem
    student = _mlp(20, 12, 5, seed=8)
    d = Distiller(
        teacher, student, hints=[("0", "0"), ("1", "1")], hint_weight=0.5, lr=1e-2, progress=False
    )
    assert d.hint_projections is None
    hist = d.fit(train, epochs=1)
    projs = d.hint_projections
    assert [tuple(p.weight.shape) for p in projs] == [(128, 12), (128, 12)]
    # the projections are optimized together with the student
    opt_params = {id(p) for g in d.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in opt_params for p in projs.parameters())
    w0 = [p.detach().clone() for p in projs.parameters()]
    hist += d.fit(train, epochs=5, eval_loader=test)
    assert all(not torch.equal(a, b) for a, b in zip(w0, projs.parameters()))
    assert hist[-1]["train_hint_loss"] < 0.7 * hist[0]["train_hint_loss"]
    assert "eval_hint_loss" in hist[-1] and hist[-1]["eval_hint_loss"] > 0
    # hooks are removed once fit returns: a plain forward leaves nothing behind
    assert not student[0]._forward_hooks and not teacher[0]._forward_hooks


def test_hints_on_a_model_compiled_before_the_distiller_say_why_and_work_after_reset():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 5))
    student = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5))
    x, y = torch.randn(32, 8), torch.randint(0, 5, (32,))
    loader = [(x[i:i + 16], y[i:i + 16]) for i in (0, 16)]
    torch._dynamo.reset()
    try:
        s_c, t_c = torch.compile(student, backend="eager"), torch.compile(teacher, backend="eager")
        # a first run compiles both models without hooks; that code skips hooks added later
        fastkd.Distiller(t_c, s_c, progress=False).fit(loader)
        d = fastkd.Distiller(t_c, s_c, hints=[("1", "1")], progress=False)
        with pytest.raises(RuntimeError, match="torch._dynamo.reset"):
            d.fit(loader, epochs=1)
        torch._dynamo.reset()
        record = fastkd.Distiller(t_c, s_c, hints=[("1", "1")], progress=False).fit(loader)[0]
        assert math.isfinite(record["train_hint_loss"]) and record["train_hint_loss"] > 0
    finally:
        torch._dynamo.reset()


def test_hints_with_a_given_optimizer_and_conv_features():
    class Net(nn.Module):
        def __init__(self, c, seed):
            super().__init__()
            torch.manual_seed(seed)
            self.body = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.ReLU())
            self.head = nn.Linear(c * 5 * 5, 3)

        def forward(self, x):
            return self.head(self.body(x).flatten(1))

    teacher, student = Net(8, 0), Net(3, 1)
    x, y = torch.randn(40, 1, 5, 5), torch.randint(0, 3, (40,))
    opt = torch.optim.SGD(student.parameters(), lr=0.05)
    d = Distiller(teacher, student, optimizer=opt, hints=[("body.0", "body.0")], progress=False)
    hist = d.fit([(x[:20], y[:20]), (x[20:], y[20:])], epochs=8)
    (proj,) = d.hint_projections
    assert isinstance(proj, nn.Conv2d) and proj.in_channels == 3 and proj.out_channels == 8
    assert d.optimizer is opt and len(opt.param_groups) == 2
    assert hist[-1]["train_hint_loss"] < hist[0]["train_hint_loss"]


def test_torch_pruned_student_keeps_its_zeros(problem):
    """A student pruned with torch.nn.utils.prune (weight = weight_orig * mask) stays pruned."""
    train, _, teacher, _ = problem
    student = _mlp(20, 32, 5, seed=9)
    torch.nn.utils.prune.l1_unstructured(student[0], "weight", amount=0.6)
    zeros = student[0].weight_mask == 0
    Distiller(teacher, student, lr=1e-2, progress=False).fit(train, epochs=2)
    assert zeros.sum() == round(0.6 * zeros.numel())
    assert torch.all(student[0].weight[zeros] == 0)


@pytest.mark.parametrize("opt", ["adam", "adamw"])
def test_masked_student_keeps_its_zeros(problem, opt):
    train, test, teacher, _ = problem
    student = fastkd.sparsify_(_mlp(20, 32, 5, seed=10), sparsity=0.5)
    layers = [m for m in student.modules() if isinstance(m, fastkd.nn.MaskedLinear)]
    assert len(layers) == 2
    pruned = [(~m.mask).clone() for m in layers]
    make = (lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1)) if opt == "adamw" else None
    d = Distiller(teacher, student, optimizer=make, lr=1e-2, progress=False)
    hist = d.fit(train, epochs=3)
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    for m, off in zip(layers, pruned):
        assert torch.equal(~m.mask, off)  # the mask is kept
        assert torch.all(m.weight[off] == 0)


def test_int8_student_trains_its_float_parameters(problem):
    train, test, teacher, _ = problem
    student = _mlp(20, 32, 5, seed=13)
    Distiller(teacher, student, lr=1e-2, progress=False).fit(train, epochs=3)
    fastkd.quantize_(student, mode="w8a8")
    int8_state = {k: v.clone() for k, v in student.state_dict().items() if v.dtype == torch.int8}
    assert int8_state  # the weights are int8 buffers now
    d = Distiller(teacher, student, lr=1e-3, progress=False)
    before = d.evaluate(test)
    hist = d.fit(train, epochs=2)
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in hist)
    for k, v in int8_state.items():
        assert torch.equal(student.state_dict()[k], v)  # fine-tuning never touches int8 weights
    assert d.evaluate(test)["agreement"] >= before["agreement"] - 0.05


def test_teacher_autocast_and_mapping_batches():
    class Dict(nn.Module):
        def __init__(self, hidden, seed):
            super().__init__()
            self.net = _mlp(4, hidden, 3, seed)

        def forward(self, input_ids):
            return {"logits": self.net(input_ids)}

    torch.manual_seed(0)
    batches = [
        {"input_ids": torch.randn(16, 4), "labels": torch.randint(0, 3, (16,))} for _ in range(3)
    ]
    d = Distiller(Dict(16, 0), Dict(8, 1), teacher_autocast=True, progress=False)
    hist = d.fit(batches, epochs=2, eval_loader=batches)
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in hist)
    assert 0.0 <= hist[-1]["eval_accuracy"] <= 1.0


def test_bad_inputs(problem):
    train, _, teacher, _ = problem
    student = _mlp(20, 8, 5, seed=11)
    x, y = torch.randn(8, 20), torch.randint(0, 5, (8,))

    with pytest.raises(
        ValueError, match=r"student output shape \(8, 4\).*teacher output shape \(8, 5\)"
    ):
        Distiller(teacher, _mlp(20, 8, 4, seed=0), progress=False).fit([(x, y)])
    d = Distiller(teacher, student, progress=False)
    with pytest.raises(ValueError, match="empty"):
        d.fit(DataLoader(TensorDataset(x[:0], y[:0]), batch_size=4))
    with pytest.raises(ValueError, match="no batches"):
        d.fit(iter([]))
    with pytest.raises(ValueError, match="empty"):
        d.evaluate([])
    with pytest.raises(ValueError, match="epochs"):
        d.fit([(x, y)], epochs=0)
    with pytest.raises(ValueError, match=r"student has no module at path '0\.nope'"):
        Distiller(teacher, student, hints=[("0.nope", "0")])
    with pytest.raises(ValueError, match="teacher has no module at path 'missing'"):
        Distiller(teacher, student, hints=[("0", "missing")])
    with pytest.raises(ValueError, match="pair"):
        Distiller(teacher, student, hints=[("0",)])
    with pytest.raises(ValueError, match="task"):
        Distiller(teacher, student, task="ranking")
    with pytest.raises(ValueError, match="temperature"):
        Distiller(teacher, student, temperature=0.0)
    with pytest.raises(ValueError, match="alpha"):
        Distiller(teacher, student, alpha=1.5)
    with pytest.raises(ValueError, match="different modules"):
        Distiller(teacher, teacher)
    with pytest.raises(TypeError, match="nn.Module"):
        Distiller(teacher, lambda v: v)
    with pytest.raises(TypeError, match="optimizer"):
        Distiller(teacher, student, optimizer="adam")
    frozen = _mlp(20, 8, 5, seed=12).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        Distiller(teacher, frozen, progress=False).fit([(x, y)])
    with pytest.raises(ValueError, match="target values"):
        Distiller(teacher, student, progress=False).fit([(x, y + 5)])
    with pytest.raises(ValueError, match="regression target shape"):
        Distiller(teacher, student, task="regression", progress=False).fit([(x, torch.randn(8))])


def _tiny_gpt2(seed, n_layer, **config):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=n_layer, n_head=2, n_embd=32, vocab_size=61,
                                  n_positions=16, bos_token_id=0, eos_token_id=0, **config)
    return transformers.GPT2LMHeadModel(cfg)


def _lm_batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 61, (8, 12), generator=g)
    labels = ids.clone()
    labels[:2, 9:] = -100  # padding, as a language-modelling collator marks it
    return [{"input_ids": ids[i:i + 4], "labels": labels[i:i + 4]} for i in (0, 4)]


def test_causal_lm_labels_are_shifted_as_the_model_itself_does():
    # Hugging Face LM batches carry labels = input tokens; logits at i predict the token at i + 1.
    # With alpha = 0 the Distiller's loss must be exactly the student's own LM loss.
    teacher, student = _tiny_gpt2(0, 2), _tiny_gpt2(1, 1)
    batches = _lm_batches()
    d = Distiller(teacher, student, alpha=0.0, temperature=2.0, progress=False, backend="torch")
    assert d.shift_labels  # detected: a decoder-only generative model
    with torch.no_grad():
        own = [student.eval()(**b) for b in batches]
        counts = [(b["labels"][:, 1:] != -100).sum() for b in batches]
        expected = sum(o.loss * c for o, c in zip(own, counts)) / sum(counts)
    got = d.evaluate(batches)["loss"]
    torch.testing.assert_close(got, expected.item(), rtol=1e-5, atol=1e-6)
    # and the soft term pairs the same positions: alpha = 1 equals kd_loss on the first L - 1
    d1 = Distiller(teacher, student, alpha=0.5, temperature=2.0, progress=False, backend="torch")
    with torch.no_grad():
        rows = [fastkd.functional.kd_loss(
            student(b["input_ids"]).logits[:, :-1], teacher.eval()(b["input_ids"]).logits[:, :-1],
            b["labels"][:, 1:], temperature=2.0, alpha=0.5, reduction="sum") for b in batches]
    torch.testing.assert_close(d1.evaluate(batches)["loss"], (sum(rows) / sum(counts)).item(),
                               rtol=1e-5, atol=1e-6)
    # labels already aligned with the logits: shift_labels=False pairs position i with label i
    d2 = Distiller(teacher, student, alpha=0.0, progress=False, backend="torch",
                   shift_labels=False)
    with torch.no_grad():
        flat = [F.cross_entropy(student(b["input_ids"]).logits.flatten(0, 1),
                                b["labels"].flatten(), reduction="sum") for b in batches]
        n = sum((b["labels"] != -100).sum() for b in batches)
    torch.testing.assert_close(d2.evaluate(batches)["loss"], (sum(flat) / n).item(),
                               rtol=1e-5, atol=1e-6)
    history = d.fit(batches, epochs=1)
    assert math.isfinite(history[0]["train_loss"])


@pytest.mark.parametrize("arch", ["t5", "bart", "m2m100"])
def test_seq2seq_batches_get_decoder_inputs_from_their_labels(arch):
    # {input_ids, labels} is what a seq2seq collator gives; the model builds its decoder inputs
    # from the labels only when it gets them, and the Distiller keeps them for its loss: T5 and
    # BART failed ("You must specify exactly one of input_ids or inputs_embeds").
    transformers = pytest.importorskip("transformers")
    T = transformers

    def build(seed, layers):
        torch.manual_seed(seed)
        if arch == "t5":
            return T.T5ForConditionalGeneration(T.T5Config(
                vocab_size=61, d_model=24, d_kv=6, d_ff=37, num_layers=layers, num_heads=4,
                decoder_start_token_id=0, pad_token_id=0))
        if arch == "m2m100":  # NLLB's architecture: no prepare_decoder_input_ids_from_labels
            return T.M2M100ForConditionalGeneration(T.M2M100Config(
                vocab_size=61, d_model=24, encoder_attention_heads=4, decoder_attention_heads=4,
                encoder_ffn_dim=37, decoder_ffn_dim=37, encoder_layers=layers,
                decoder_layers=layers, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                decoder_start_token_id=2, max_position_embeddings=32))
        return T.BartForConditionalGeneration(T.BartConfig(
            vocab_size=61, d_model=24, encoder_attention_heads=4, decoder_attention_heads=4,
            encoder_ffn_dim=37, decoder_ffn_dim=37, encoder_layers=layers, decoder_layers=layers,
            pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
            max_position_embeddings=32))

    teacher, student = build(0, 2).eval(), build(1, 1).eval()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 61, (8, 11), generator=g)
    labels = torch.randint(3, 61, (8, 6), generator=g)
    labels[:2, 4:] = -100
    batches = [{"input_ids": ids[i:i + 4], "labels": labels[i:i + 4]} for i in (0, 4)]
    d = Distiller(teacher, student, alpha=0.5, temperature=2.0, progress=False, backend="torch")
    assert not d.shift_labels  # decoder logits align with the labels
    with torch.no_grad():  # the soft and hard terms on the logits each model gives for them
        rows = [fastkd.functional.kd_loss(
            student(**b).logits, teacher(**b).logits, b["labels"], temperature=2.0, alpha=0.5,
            reduction="sum") for b in batches]
        n = sum((b["labels"] != -100).sum() for b in batches)
    torch.testing.assert_close(d.evaluate(batches)["loss"], (sum(rows) / n).item(),
                               rtol=1e-5, atol=1e-6)
    assert math.isfinite(d.fit(batches, epochs=1)[0]["train_loss"])


def test_shifted_labels_do_not_copy_the_logits(monkeypatch):
    # The loss takes the models' logits as they are (the labels move instead): a (B, L-1, V)
    # slice would be copied into rows, N x V per model, with its gradient scattered back.
    teacher, student = _tiny_gpt2(0, 2), _tiny_gpt2(1, 1)
    seen = []
    real = fastkd.functional.kd_loss

    def spy(s, t, *args, **kwargs):
        seen.append((s.is_contiguous(), t.is_contiguous()))
        return real(s, t, *args, **kwargs)

    monkeypatch.setattr(fastkd.functional, "kd_loss", spy)
    d = Distiller(teacher, student, temperature=2.0, progress=False, backend="torch")
    d.fit(_lm_batches(), epochs=1)
    d.evaluate(_lm_batches())
    assert seen and all(a and b for a, b in seen)


def test_shift_labels_is_off_for_other_models_and_checked(problem):
    teacher, student = _mlp(20, 32, 5, 0), _mlp(20, 8, 5, 1)
    assert not Distiller(teacher, student, progress=False).shift_labels
    with pytest.raises(TypeError, match="shift_labels"):
        Distiller(teacher, student, shift_labels="yes")
    # (batch, classes) outputs cannot be shifted along a sequence
    train = problem[0]
    d = Distiller(teacher, student, progress=False, shift_labels=True)
    with pytest.raises(ValueError, match="shift_labels"):
        d.evaluate(train)


def test_ignored_rows_count_in_no_metric():
    # labels of -100 (a collator's padding) leave the loss, the accuracy and the agreement; the
    # agreement used to count them, so what the models predicted at padding moved it
    torch.manual_seed(0)
    teacher, student = _mlp(8, 16, 5, 0), _mlp(8, 4, 5, 1)
    x = torch.randn(12, 8)
    y = torch.randint(0, 5, (12,))
    y[::3] = -100
    d = Distiller(teacher, student, progress=False)
    got = d.evaluate([(x, y)])
    with torch.no_grad():
        s, t = student.eval()(x), teacher.eval()(x)
    keep = y != -100
    agreement = (s.argmax(-1) == t.argmax(-1))[keep].float().mean().item()
    accuracy = (s.argmax(-1) == y)[keep].float().mean().item()
    assert got["agreement"] == pytest.approx(agreement)
    assert got["accuracy"] == pytest.approx(accuracy)
    # no counted row at all: the metrics are absent, not 0
    assert set(d.evaluate([(x, torch.full((12,), -100))])) == {"loss"}


def test_padding_without_labels_does_not_count():
    # Pure distillation of a padded LM batch (no labels): the positions the attention_mask drops
    # must not count, so what sits there cannot change the loss or the metrics.
    teacher, student = _tiny_gpt2(0, 2), _tiny_gpt2(1, 1)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 61, (4, 10), generator=g)
    mask = torch.ones(4, 10, dtype=torch.long)
    mask[1, 6:] = 0
    mask[3, 3:] = 0
    d = Distiller(teacher, student, temperature=2.0, progress=False, backend="torch")
    got = d.evaluate([{"input_ids": ids, "attention_mask": mask}])
    with torch.no_grad():
        s = student.eval()(ids, attention_mask=mask).logits
        t = teacher.eval()(ids, attention_mask=mask).logits
        keep = mask.bool()
        expected = fastkd.functional.kd_loss(s[keep], t[keep], temperature=2.0)
        agreement = (s.argmax(-1) == t.argmax(-1))[keep].float().mean()
    torch.testing.assert_close(got["loss"], expected.item(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["agreement"], agreement.item())
    other = ids.clone()
    other[~keep] = (other[~keep] + 7) % 61  # different tokens where the mask says padding
    again = d.evaluate([{"input_ids": other, "attention_mask": mask}])
    torch.testing.assert_close(again["loss"], got["loss"], rtol=1e-6, atol=1e-7)
    history = d.fit([{"input_ids": ids, "attention_mask": mask}], epochs=1)
    assert math.isfinite(history[0]["train_loss"])


def test_shift_labels_detection_across_model_types():
    # only decoder-only generative models take shifted labels; classifiers, encoders, masked LMs
    # and encoder-decoders (whose decoder logits align with their labels) do not
    transformers = pytest.importorskip("transformers")
    from fastkd.distill import _is_hf_causal_lm

    gpt2 = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=16,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)
    llama = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, vocab_size=50)
    bert = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32, vocab_size=50)
    t5 = transformers.T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, vocab_size=50,
                               d_kv=8)
    cases = [
        (transformers.GPT2LMHeadModel(gpt2), True),
        (transformers.LlamaForCausalLM(llama), True),
        (transformers.GPT2ForSequenceClassification(gpt2), False),
        (transformers.GPT2Model(gpt2), False),
        (transformers.BertForMaskedLM(bert), False),
        (transformers.T5ForConditionalGeneration(t5), False),
    ]
    for model, expected in cases:
        assert _is_hf_causal_lm(model) is expected, type(model).__name__


@pytest.mark.parametrize("with_labels", [True, False])
def test_fused_lm_head_trains_like_the_unfused_loss(with_labels):
    # fused_lm_head never materialises the logits: the same batches from the same initial
    # weights must give the same losses and the same trained student, to rounding
    teacher, student = _tiny_gpt2(0, 2), _tiny_gpt2(1, 1)
    batches = _lm_batches(seed=5)
    if not with_labels:  # padded batches without labels: the attention_mask decides
        for b in batches:
            mask = torch.ones_like(b["input_ids"])
            mask[0, 8:] = 0
            b["attention_mask"] = mask
            del b["labels"]
    runs = []
    for fused in (False, True):
        torch.manual_seed(7)  # the same dropout masks in both runs
        s = copy.deepcopy(student)
        # SGD: Adam's normalisation would turn rounding-level gradients into full-size steps
        d = Distiller(teacher, s, temperature=2.0, alpha=0.4, progress=False, backend="torch",
                      optimizer=lambda params: torch.optim.SGD(params, lr=0.5),
                      fused_lm_head=fused)
        head_calls = []
        s.lm_head.register_forward_hook(lambda *a: head_calls.append(1))
        history = d.fit(batches, epochs=2)
        # fused: the lm head module runs once, in the first-batch check, never in a step
        assert len(head_calls) == (1 if fused else 2 * len(batches))
        runs.append(([h["train_loss"] for h in history], s.state_dict()))
    (loss_a, state_a), (loss_b, state_b) = runs
    assert not torch.equal(state_a["lm_head.weight"], student.state_dict()["lm_head.weight"])
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-4, atol=1e-6)
    for name in state_a:
        torch.testing.assert_close(state_b[name], state_a[name], rtol=1e-3, atol=1e-5,
                                   msg=name)


@pytest.mark.parametrize("heads", ["masked_student_int8_teacher", "frozen_shared_student"])
def test_fused_lm_head_takes_compressed_heads(heads):
    """A pruned student head (W o M: pruned weights get no gradient), a w8a16 teacher head and a
    weight-shared head with a frozen codebook were refused by fused_lm_head; they now train as
    the unfused loss does, through their dequantized weight."""
    # untied heads: sparsify_ leaves a head tied to the embeddings alone
    teacher = _tiny_gpt2(0, 2, tie_word_embeddings=False)
    student = _tiny_gpt2(1, 1, tie_word_embeddings=False)
    if heads == "masked_student_int8_teacher":
        fastkd.sparsify_(student, 0.5, filter_fn=lambda m, n: n == "lm_head")
        fastkd.quantize_(teacher, mode="w8a16", filter_fn=lambda m, n: n == "lm_head")
    else:
        fastkd.share_weights_(student, bits=4, iters=2, filter_fn=lambda m, n: n == "lm_head")
        student.lm_head.codebook.requires_grad_(False)
    batches = _lm_batches(seed=5)
    runs = []
    for fused in (False, True):
        torch.manual_seed(7)
        s = copy.deepcopy(student)
        d = Distiller(teacher, s, temperature=2.0, alpha=0.4, progress=False, backend="torch",
                      optimizer=lambda params: torch.optim.SGD(params, lr=0.5),
                      fused_lm_head=fused)
        history = d.fit(batches, epochs=2)
        runs.append(([h["train_loss"] for h in history], s.state_dict(), s))
    (loss_a, state_a, _), (loss_b, state_b, trained) = runs
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-4, atol=1e-6)
    for name in state_a:
        torch.testing.assert_close(state_b[name], state_a[name], rtol=1e-3, atol=1e-5,
                                   msg=name)
    if heads == "masked_student_int8_teacher":
        head = trained.lm_head
        assert bool((head.weight[~head.mask] == 0).all())  # pruned weights stayed pruned
        assert not torch.equal(head.weight, student.lm_head.weight)  # the rest trained


def test_fused_lm_head_takes_compressed_heads_of_bf16_models():
    # the first-batch check compared the logits with F.linear on the dequantized bf16 weight,
    # which differs from the int8 head's own output by more than its tolerance: refused
    teacher = _tiny_gpt2(0, 2, tie_word_embeddings=False).bfloat16()
    student = _tiny_gpt2(1, 1, tie_word_embeddings=False).bfloat16()
    fastkd.quantize_(teacher, mode="w8a16", filter_fn=lambda m, n: n == "lm_head")
    fastkd.sparsify_(student, 0.5, filter_fn=lambda m, n: n == "lm_head")
    batches = _lm_batches(seed=5)
    losses = [Distiller(teacher, copy.deepcopy(student), progress=False, backend="torch",
                        fused_lm_head=fused).fit(batches, epochs=1)[0]["train_loss"]
              for fused in (False, True)]
    assert math.isfinite(losses[1]) and abs(losses[1] - losses[0]) < 1e-2 * abs(losses[0])


def test_fused_evaluate_of_a_head_compressed_after_fit():
    # distill with the fused head, compress, evaluate: evaluating takes no gradient, so a w8a8
    # head (its own forward, chunk by chunk) and a trainable codebook serve; both were refused
    teacher = _tiny_gpt2(0, 2, tie_word_embeddings=False)
    batches = _lm_batches(seed=7)
    for compress in (lambda m: fastkd.quantize_(m, mode="w8a8",
                                                filter_fn=lambda mod, n: n == "lm_head"),
                     lambda m: fastkd.share_weights_(m, bits=4, iters=2,
                                                     filter_fn=lambda mod, n: n == "lm_head")):
        student = _tiny_gpt2(1, 1, tie_word_embeddings=False)
        d = Distiller(teacher, student, fused_lm_head=True, progress=False, backend="torch")
        d.fit(batches, epochs=1)
        compress(student)
        fused = d.evaluate(batches)
        plain = Distiller(teacher, student, progress=False, backend="torch").evaluate(batches)
        assert fused.keys() == plain.keys()
        for key in plain:
            assert math.isclose(fused[key], plain[key], rel_tol=1e-4, abs_tol=1e-6), (key, fused,
                                                                                    plain)


def test_fused_lm_head_refuses_what_it_cannot_fuse():
    teacher, student = _tiny_gpt2(0, 2), _tiny_gpt2(1, 1)
    with pytest.raises(ValueError, match="Hugging Face language model"):
        Distiller(_mlp(20, 32, 5, 0), _mlp(20, 8, 5, 1), fused_lm_head=True, progress=False)
    quantized = copy.deepcopy(student)
    with pytest.warns(UserWarning, match="tied"):  # GPT-2's lm_head is the embedding's weight
        fastkd.quantize_(quantized, filter_fn=lambda m, n: n == "lm_head")
    with pytest.raises(ValueError, match="cannot fuse the student's lm head Int8Linear.*w8a8"):
        Distiller(teacher, quantized, fused_lm_head=True, progress=False)
    shared = copy.deepcopy(student)
    with pytest.warns(UserWarning, match="tied"):
        fastkd.share_weights_(shared, bits=4, iters=2, filter_fn=lambda m, n: n == "lm_head")
    with pytest.raises(ValueError, match="codebook"):  # a trainable codebook: not fusable
        Distiller(teacher, shared, fused_lm_head=True, progress=False)
    with pytest.raises(ValueError, match="adversarial"):
        Distiller(teacher, student, fused_lm_head=True, adversarial_weight=0.1, progress=False)
    # a model whose forward post-processes its logits (as softcapping does) is caught at once
    capped = copy.deepcopy(student)
    forward = capped.forward

    def softcapped(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = 5.0 * torch.tanh(out.logits / 5.0)
        return out

    capped.forward = softcapped
    d = Distiller(teacher, capped, fused_lm_head=True, progress=False, backend="torch")
    with pytest.raises(ValueError, match="post-processes"):
        d.fit(_lm_batches(), epochs=1)
    # a softcap the config declares is refused up front: on a new student's small logits
    # (tanh(x / 30) * 30 ~ x) the numeric check passes, and the fused loss would train without it
    T = pytest.importorskip("transformers")

    def gemma2(softcap):
        return T.Gemma2ForCausalLM(T.Gemma2Config(
            vocab_size=61, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, head_dim=8,
            final_logit_softcapping=softcap))

    with pytest.raises(ValueError, match="student's config .*final_logit_softcapping=30.0"):
        Distiller(gemma2(None), gemma2(30.0), fused_lm_head=True, progress=False)
    Distiller(gemma2(None), gemma2(None), fused_lm_head=True, progress=False)


@pytest.mark.parametrize("with_labels", [True, False])
def test_fused_lm_head_evaluate_matches_the_unfused_metrics(monkeypatch, with_labels):
    # fused evaluation computes the logits a chunk of rows at a time (7 rows here, so every
    # batch takes several chunks): loss, agreement and accuracy must not change
    import fastkd._fused_linear_kd as fused_module

    monkeypatch.setattr(fused_module, "default_chunk_rows", lambda n_rows, n_classes: 7)
    teacher, student = _tiny_gpt2(0, 2), _tiny_gpt2(1, 1)
    batches = _lm_batches(seed=9)
    if not with_labels:
        for b in batches:
            b["attention_mask"] = (torch.arange(12) < 10).long().expand(4, 12).clone()
            del b["labels"]
    metrics = [Distiller(teacher, student, temperature=2.0, alpha=0.3, progress=False,
                         backend="torch", fused_lm_head=fused).evaluate(batches)
               for fused in (False, True)]
    assert metrics[0].keys() == metrics[1].keys()
    assert ("accuracy" in metrics[0]) == with_labels
    for key in metrics[0]:
        torch.testing.assert_close(metrics[1][key], metrics[0][key], rtol=1e-5, atol=1e-7,
                                   msg=key)


def test_a_data_parallel_wrapper_keeps_the_label_convention():
    # DataParallel (and DDP) hide the wrapped model's config: the label shift of a causal LM was
    # silently lost; with no GPU DataParallel just calls the module
    teacher, student = _tiny_gpt2(0, 2), _tiny_gpt2(1, 1)
    d = Distiller(teacher, nn.DataParallel(student), progress=False, backend="torch")
    assert d.shift_labels is True
    with pytest.warns(UserWarning, match="not recognised"):  # a student of another kind
        assert Distiller(teacher, nn.Sequential(nn.Linear(3, 3)),
                         progress=False).shift_labels is False
    with pytest.raises(ValueError, match="DataParallel wrapper"):
        Distiller(teacher, nn.DataParallel(student), fused_lm_head=True, progress=False)


def test_layers_replaced_between_fits_get_a_new_optimizer_or_a_clear_error():
    """distill, sparsify_, distill again with the same Distiller: sparsify_ builds new parameters,
    which the first optimizer does not hold; training them silently did nothing."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 5))
    x, y = torch.randn(64, 8), torch.randint(0, 5, (64,))
    loader = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]

    def student():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5))

    s = student()
    d = fastkd.Distiller(teacher, s, progress=False,
                         scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1))
    d.fit(loader)
    fastkd.sparsify_(s, 0.5)
    before = s[0].weight.detach().clone()
    with pytest.warns(UserWarning, match="replaced"):
        d.fit(loader)
    held = {id(p) for g in d.optimizer.param_groups for p in g["params"]}
    assert {id(p) for p in s.parameters()} <= held
    assert d.scheduler.optimizer is d.optimizer
    assert not torch.equal(s[0].weight, before)  # trained
    assert (s[0].weight[~s[0].mask] == 0).all()  # pruned weights stay zero
    # a given optimizer instance cannot be rebuilt: a clear error instead
    s = student()
    d = fastkd.Distiller(teacher, s, optimizer=torch.optim.SGD(s.parameters(), lr=0.1),
                         progress=False)
    d.fit(loader)
    fastkd.quantize_(s, mode="w8a16")
    with pytest.raises(ValueError, match="new optimizer"):
        d.fit(loader)
    # an optimizer over a subset of the student (the rest left alone on purpose) is not that
    s = student()
    d = fastkd.Distiller(teacher, s, optimizer=torch.optim.SGD(s[2].parameters(), lr=0.1),
                         progress=False)
    d.fit(loader)
    d.fit(loader)


def test_a_wrapped_causal_lm_student_of_a_causal_lm_teacher_gets_a_warning():
    """A student of the user's around a causal LM was not recognised as one: its labels were
    paired with the logits unshifted, one token off, without a word."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=31, n_embd=16, n_layer=1, n_head=2)
    teacher = transformers.GPT2LMHeadModel(cfg)

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = transformers.GPT2LMHeadModel(cfg)

        def forward(self, input_ids, **kwargs):
            return self.lm(input_ids, **kwargs).logits

    with pytest.warns(UserWarning, match="shift_labels=True"):
        d = Distiller(teacher, Wrapped(), progress=False)
    assert d.shift_labels is False
    for given in (True, False):  # said explicitly: nothing to warn about
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert Distiller(teacher, Wrapped(), shift_labels=given,
                             progress=False).shift_labels is given
    with warnings.catch_warnings():  # both recognised: shifted, silently
        warnings.simplefilter("error")
        assert Distiller(teacher, transformers.GPT2LMHeadModel(cfg),
                         progress=False).shift_labels is True


def test_labels_under_label_and_a_tokenizer_output_in_a_tuple_are_read_as_labels():
    """{"input_ids", "label"} (torch's default collate of a datasets column named "label")
    passed label= to the model, which swallowed it: the hard-label term was dropped, silently.
    (tokenizer output, labels) passed the dict as the first positional argument."""
    teacher, student = _tiny_gpt2(0, 2), _tiny_gpt2(1, 1)
    ids = torch.randint(0, 50, (4, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    d = Distiller(teacher, student, progress=False, backend="torch")
    want = d.evaluate([{"input_ids": ids, "attention_mask": mask, "labels": ids}])
    assert "accuracy" in want
    for batch in ({"input_ids": ids, "attention_mask": mask, "label": ids},
                  ({"input_ids": ids, "attention_mask": mask}, ids)):
        assert d.evaluate([batch]) == want
