"""AdversarialKDLoss: losses are the stated formulas, and a toy KD + adversarial game converges."""

import math

import pytest
import torch
from torch import nn

import fastkd
from fastkd.nn import AdversarialKDLoss


def test_losses_match_formulas_and_gradients_flow():
    torch.manual_seed(0)
    adv = AdversarialKDLoss(5, hidden=8)
    s = torch.randn(4, 3, 5, requires_grad=True)
    t = torch.randn(4, 3, 5)
    d_s, d_t = torch.sigmoid(adv.logits(s)), torch.sigmoid(adv.logits(t))
    torch.testing.assert_close(adv.generator_loss(s), -torch.log(d_s).mean())
    torch.testing.assert_close(
        adv.discriminator_loss(s, t), -torch.log(d_t).mean() - torch.log(1 - d_s).mean()
    )
    adv.discriminator_loss(s, t).backward()
    assert s.grad is None  # the discriminator step never reaches the student
    adv(s, t).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()


def test_bad_inputs():
    with pytest.raises(ValueError):
        AdversarialKDLoss(0)
    adv = AdversarialKDLoss(4, hidden=8)
    with pytest.raises(ValueError):
        adv.generator_loss(torch.randn(2, 5))
    with pytest.raises(TypeError):
        adv.generator_loss(torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(TypeError):
        adv(torch.randn(2, 4), "teacher")


def test_toy_distillation_does_not_diverge():
    torch.manual_seed(0)
    dim, n_cls = 8, 5
    teacher = nn.Sequential(nn.Linear(dim, 32), nn.Tanh(), nn.Linear(32, n_cls))
    student = nn.Sequential(nn.Linear(dim, 16), nn.Tanh(), nn.Linear(16, n_cls))
    adv = AdversarialKDLoss(n_cls, hidden=32)
    s_opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    d_opt = torch.optim.Adam(adv.parameters(), lr=1e-3, betas=(0.5, 0.999))
    x_eval = torch.randn(512, dim)
    with torch.no_grad():
        t_eval = teacher(x_eval)

    def gap():
        with torch.no_grad():
            return fastkd.functional.kd_loss(student(x_eval), t_eval, temperature=2.0).item()

    start = gap()
    for _ in range(300):
        x = torch.randn(64, dim)
        with torch.no_grad():
            t = teacher(x)
        s = student(x)
        loss = fastkd.functional.kd_loss(s, t, temperature=2.0) + 0.1 * adv.generator_loss(s)
        s_opt.zero_grad()
        loss.backward()
        s_opt.step()
        d_loss = adv.discriminator_loss(s, t)
        d_opt.zero_grad()
        d_loss.backward()
        d_opt.step()
        assert math.isfinite(loss.item()) and math.isfinite(d_loss.item())
    end = gap()
    assert end < 0.2 * start
    # the game stays near equilibrium: D cannot separate, nor has it collapsed to infinity
    with torch.no_grad():
        d_final = adv.discriminator_loss(student(x_eval), t_eval).item()
    assert 0.5 < d_final < 2.5


def test_a_mask_keeps_rows_out_of_both_losses():
    torch.manual_seed(0)
    adv = AdversarialKDLoss(6, hidden=8)
    s, t = torch.randn(2, 5, 6), torch.randn(2, 5, 6)
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[1, 3:] = False
    s2, t2 = s.clone(), t.clone()
    s2[1, 3:] += 100.0  # what the mask leaves out changes nothing
    t2[1, 3:] -= 100.0
    for a, b in ((s, t), (s2, t2)):
        torch.testing.assert_close(adv.generator_loss(a, mask=keep), adv.generator_loss(s[keep]))
        torch.testing.assert_close(adv.discriminator_loss(a, b, mask=keep),
                                   adv.discriminator_loss(s[keep], t[keep]))
    assert adv.generator_loss(s, mask=torch.zeros(2, 5, dtype=torch.bool)) == 0
    with pytest.raises(ValueError, match="mask"):
        adv.generator_loss(s, mask=keep[:, :4])
    with pytest.raises(ValueError, match="mask"):
        adv.generator_loss(s, mask=keep.float())
