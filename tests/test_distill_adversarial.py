"""Distiller(adversarial_weight=...): adversarial distillation wired into training (CPU, seconds)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastkd
from fastkd import Distiller
from fastkd.nn import AdversarialKDLoss


def _mlp(d_in, hidden, d_out, seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


def _loaders(seed=0, n=1200, d=16, classes=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, classes, generator=g)
    y = (x @ w + 0.5 * torch.randn(n, classes, generator=g)).argmax(1)
    split = n * 3 // 4

    def train():  # a fresh loader with a fixed shuffle, so two runs see the same batches
        return DataLoader(
            TensorDataset(x[:split], y[:split]),
            batch_size=64,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
        )

    test = DataLoader(TensorDataset(x[split:], y[split:]), batch_size=300)
    return train, test


@pytest.fixture(scope="module")
def problem():
    train, test = _loaders()
    teacher = _mlp(16, 96, 5, seed=1)
    opt = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    for _ in range(12):
        for xb, yb in train():
            opt.zero_grad()
            F.cross_entropy(teacher(xb), yb).backward()
            opt.step()
    teacher.zero_grad(set_to_none=True)
    teacher.eval()
    return train, test, teacher


def _distill(teacher, train, test, weight, epochs=8, seed=2, **kw):
    student = _mlp(16, 24, 5, seed=seed)
    torch.manual_seed(100)  # the discriminator's initialisation
    d = Distiller(
        teacher, student, lr=1e-2, adversarial_weight=weight, progress=False, **kw
    )
    before = d.evaluate(test)
    hist = d.fit(train(), epochs=epochs, eval_loader=test)
    return d, before, hist


def test_adversarial_training_stays_finite_and_matches_plain_kd(problem):
    train, test, teacher = problem
    x, y = test.dataset.tensors
    with torch.no_grad():
        t_acc = (teacher(x).argmax(1) == y).float().mean().item()
    assert t_acc > 0.8  # a learnable problem, or the comparison below means nothing

    _, _, plain = _distill(teacher, train, test, 0.0)
    d, before, adv = _distill(teacher, train, test, 0.5)

    for rec in adv:
        for k, v in rec.items():
            assert math.isfinite(v), (k, rec)
        assert {"train_adv_generator_loss", "train_adv_discriminator_loss"} <= set(rec)
        # softplus terms: the generator loss is > 0, the discriminator's two terms sum to > 0
        assert rec["train_adv_generator_loss"] > 0 and rec["train_adv_discriminator_loss"] > 0
    assert "train_adv_generator_loss" not in plain[0]
    # the KD objective falls and does not blow up later on
    assert adv[-1]["eval_loss"] < 0.5 * before["loss"]
    assert max(r["eval_loss"] for r in adv[2:]) < before["loss"]
    # accuracy comparable to plain KD, and close to the teacher
    assert adv[-1]["eval_accuracy"] >= plain[-1]["eval_accuracy"] - 0.04
    assert adv[-1]["eval_accuracy"] >= t_acc - 0.08
    # the discriminator is still in the game (neither side won outright)
    assert 0.05 < adv[-1]["train_adv_discriminator_loss"] < 5.0
    assert isinstance(d.discriminator, AdversarialKDLoss) and d.discriminator.dim == 5


@pytest.mark.parametrize("given_optimizer", [False, True])
def test_discriminator_has_its_own_optimizer(problem, given_optimizer):
    train, _, teacher = problem
    student = _mlp(16, 24, 5, seed=3)
    opt = torch.optim.SGD(student.parameters(), lr=1e-2) if given_optimizer else None
    d = Distiller(
        teacher,
        student,
        optimizer=opt,
        adversarial_weight=0.3,
        adversarial_hidden=32,
        adversarial_lr=2e-3,
        progress=False,
    )
    assert d.discriminator is None  # built lazily, from the first batch
    batches = list(train())[:3]
    d.fit(batches[:1], epochs=1)
    disc = d.discriminator
    assert disc.dim == 5
    assert disc.discriminator[0].parametrizations.weight.original.shape == (32, 5)
    start = {k: v.clone() for k, v in disc.state_dict().items()}
    d.fit(batches[1:], epochs=1)

    d_params = list(disc.parameters())
    d_ids = {id(p) for p in d_params}
    s_ids = {id(p) for g in d.optimizer.param_groups for p in g["params"]}
    assert not (d_ids & s_ids), "discriminator parameters leaked into the student's optimizer"
    assert s_ids == {id(p) for p in student.parameters()}
    own = d.discriminator_optimizer
    assert {id(p) for g in own.param_groups for p in g["params"]} == d_ids
    assert own.param_groups[0]["betas"] == (0.5, 0.999)
    assert own.param_groups[0]["lr"] == pytest.approx(2e-3)
    # its parameters moved, and its optimizer holds state for them
    changed = [k for k, v in disc.state_dict().items() if not torch.equal(v, start[k])]
    assert any(k.endswith("original") for k in changed), changed
    assert all(p in own.state for p in d_params)
    # its device follows the Distiller
    assert all(p.device == d.device for p in d_params)


def test_one_step_is_kd_plus_generator_then_discriminator_step():
    """One batch, SGD on the student: the student moves by lr * grad(KD + w * gen) and the
    discriminator by one Adam step on its own loss alone (the generator's gradient on it is
    dropped first)."""
    torch.manual_seed(0)
    x, y = torch.randn(24, 7), torch.randint(0, 4, (24,))
    teacher, student = _mlp(7, 9, 4, seed=4), _mlp(7, 6, 4, seed=5)
    ref_student = copy.deepcopy(student)
    w, lr, d_lr = 0.7, 0.1, 0.05
    dist = Distiller(
        teacher,
        student,
        temperature=2.0,
        alpha=0.5,
        optimizer=lambda p: torch.optim.SGD(p, lr=lr),
        adversarial_weight=w,
        adversarial_hidden=8,
        adversarial_lr=d_lr,
        progress=False,
    )
    torch.manual_seed(7)
    hist = dist.fit([(x, y)], epochs=1)

    torch.manual_seed(7)
    ref_d = AdversarialKDLoss(4, hidden=8)
    ref_opt = torch.optim.Adam(ref_d.parameters(), lr=d_lr, betas=(0.5, 0.999))
    with torch.no_grad():
        t = teacher(x)
    s = ref_student(x)
    kd = fastkd.nn.KDLoss(temperature=2.0, alpha=0.5)(s, t, y)
    gen = ref_d.generator_loss(s)
    total = kd + w * gen
    grads = torch.autograd.grad(total, list(ref_student.parameters()))
    ref_opt.zero_grad()
    d_loss = ref_d.discriminator_loss(s.detach(), t)
    d_loss.backward()
    ref_opt.step()

    for p, p0, g in zip(student.parameters(), ref_student.parameters(), grads):
        torch.testing.assert_close(p, p0 - lr * g, rtol=1e-5, atol=1e-6)
    for (k, v), (k0, v0) in zip(
        dist.discriminator.state_dict().items(), ref_d.state_dict().items()
    ):
        assert k == k0
        torch.testing.assert_close(v, v0, rtol=1e-5, atol=1e-6)
    assert hist[0]["train_loss"] == pytest.approx(total.item(), rel=1e-5)
    assert hist[0]["train_adv_generator_loss"] == pytest.approx(gen.item(), rel=1e-5)
    assert hist[0]["train_adv_discriminator_loss"] == pytest.approx(d_loss.item(), rel=1e-5)


def test_generator_term_changes_the_student(problem):
    train, _, teacher = problem
    batches = list(train())[:4]
    runs = []
    for weight in (0.0, 0.0, 1.0):
        student = _mlp(16, 24, 5, seed=6)
        torch.manual_seed(11)
        Distiller(
            teacher, student, lr=1e-2, adversarial_weight=weight, progress=False
        ).fit(batches, epochs=1)
        runs.append(torch.cat([p.detach().flatten() for p in student.parameters()]))
    assert torch.equal(runs[0], runs[1])  # deterministic, so the difference below is the term
    assert not torch.allclose(runs[0], runs[2], atol=1e-4)


def test_regression_outputs_are_features():
    torch.manual_seed(0)
    x = torch.randn(256, 10)
    teacher = _mlp(10, 32, 6, seed=8).eval()
    with torch.no_grad():
        y = teacher(x) + 0.05 * torch.randn(256, 6)
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    student = _mlp(10, 16, 6, seed=9)
    d = Distiller(
        teacher, student, task="regression", lr=1e-2, adversarial_weight=0.1, progress=False
    )
    before = d.evaluate(loader)["loss"]
    hist = d.fit(loader, epochs=6)
    after = d.evaluate(loader)["loss"]
    assert d.discriminator.dim == 6
    assert all(math.isfinite(v) for r in hist for v in r.values())
    assert after < 0.5 * before


def test_off_by_default(problem):
    train, _, teacher = problem
    d = Distiller(teacher, _mlp(16, 8, 5, seed=10), progress=False)
    assert d.adversarial_weight == 0.0 and d.discriminator is None
    hist = d.fit(list(train())[:2], epochs=1)
    assert d.discriminator is None and d.discriminator_optimizer is None
    assert not any(k.startswith("train_adv") for k in hist[0])


def test_output_width_change_raises():
    teacher, student = _mlp(4, 8, 3, seed=0), _mlp(4, 8, 3, seed=1)
    d = Distiller(teacher, student, adversarial_weight=0.1, progress=False)
    d.fit([(torch.randn(8, 4), torch.randint(0, 3, (8,)))], epochs=1)
    d.discriminator.dim = 5  # as if built for another width
    with pytest.raises(ValueError, match="output width changed"):
        d.fit([(torch.randn(8, 4), torch.randint(0, 3, (8,)))], epochs=1)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"adversarial_weight": -0.1}, ValueError, "adversarial_weight must be >= 0"),
        ({"adversarial_weight": float("nan")}, ValueError, "adversarial_weight must be finite"),
        ({"adversarial_weight": float("inf")}, ValueError, "adversarial_weight must be finite"),
        ({"adversarial_weight": "0.5"}, TypeError, "adversarial_weight must be a number"),
        ({"adversarial_weight": True}, TypeError, "adversarial_weight must be a number"),
        ({"adversarial_hidden": 0}, ValueError, "adversarial_hidden must be a positive int"),
        ({"adversarial_hidden": 16.0}, ValueError, "adversarial_hidden must be a positive int"),
        ({"adversarial_lr": 0.0}, ValueError, "adversarial_lr must be > 0"),
        ({"adversarial_lr": float("nan")}, ValueError, "adversarial_lr must be finite"),
    ],
)
def test_bad_values_raise(kwargs, err, match):
    with pytest.raises(err, match=match):
        Distiller(_mlp(4, 8, 3, seed=0), _mlp(4, 8, 3, seed=1), progress=False, **kwargs)


def test_structured_mask_in_prune():
    from fastkd.structured import structured_mask

    assert fastkd.prune.structured_mask is structured_mask


@pytest.mark.parametrize("labels", [True, False])
@pytest.mark.parametrize("term", ["adversarial", "hint"])
def test_padding_counts_in_neither_the_adversarial_nor_the_hint_term(labels, term):
    """The KD term left padded and ignored positions out, the generator, discriminator and
    hint terms did not: changing only the tokens under the padding changed them."""
    transformers = pytest.importorskip("transformers")

    def llama(h, seed):
        torch.manual_seed(seed)
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=h, intermediate_size=2 * h, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2, vocab_size=37, max_position_embeddings=32))

    teacher, student = llama(16, 0), llama(8, 1)
    ids = torch.randint(0, 37, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 4:] = 0
    other = ids.clone()
    other[1, 4:] = (ids[1, 4:] + 1) % 37  # only the padded tokens differ
    kw = (dict(adversarial_weight=1.0, adversarial_hidden=8) if term == "adversarial"
          else dict(hints=[("model.norm", "model.norm")]))
    key = "train_adv_generator_loss" if term == "adversarial" else "train_hint_loss"
    runs = []
    for x in (ids, other):
        batch = {"input_ids": x, "attention_mask": mask}
        if labels:
            batch["labels"] = x.masked_fill(mask == 0, -100)
        d = Distiller(teacher, copy.deepcopy(student), progress=False,
                      optimizer=lambda p: torch.optim.SGD(p, lr=0.0), **kw)
        torch.manual_seed(3)
        record = d.fit([batch])[0]
        runs.append((record["train_loss"], record[key]))
    assert runs[0] == pytest.approx(runs[1], rel=1e-6, abs=1e-7)


def test_regression_outputs_of_one_dimension_are_samples_of_width_one():
    """(N,) regression outputs: the discriminator was built N wide, scored the whole batch as
    one sample, and a short last batch raised 'output width changed'."""

    class Scalar(nn.Module):
        def __init__(self, seed):
            super().__init__()
            self.net = _mlp(8, 16, 1, seed)

        def forward(self, x):
            return self.net(x).squeeze(-1)

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 8, generator=g), torch.randn(20, generator=g)
    d = Distiller(Scalar(0), Scalar(1), task="regression", adversarial_weight=0.1,
                  adversarial_hidden=4, progress=False)
    history = d.fit([(x[i:i + 8], y[i:i + 8]) for i in range(0, 20, 8)], epochs=1)
    assert d.discriminator.dim == 1
    assert math.isfinite(history[0]["train_adv_discriminator_loss"])
