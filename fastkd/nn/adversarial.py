"""Adversarial distillation: a discriminator tells teacher outputs from student outputs.

The student gets the non-saturating generator loss ``-log D(student)`` (Goodfellow et al. 2014) on
top of its KD loss; the discriminator is trained with its own optimizer on
``-log D(teacher) - log(1 - D(student))``. Both use logits and ``softplus`` for stability.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class AdversarialKDLoss(nn.Module):
    """Discriminator over ``(..., dim)`` outputs or features, with its two losses.

    Use:
        adv = AdversarialKDLoss(dim)
        d_opt = torch.optim.Adam(adv.parameters(), lr)            # its own optimizer
        # student step
        loss = kd_loss + adversarial_weight * adv.generator_loss(student_out)
        # discriminator step (student output detached inside)
        adv.discriminator_loss(student_out, teacher_out).backward(); d_opt.step()

    ``forward(student, teacher)`` returns the generator loss (so it drops in as an extra loss term).
    """

    def __init__(self, dim: int, hidden: int = 256, spectral_norm: bool = True):
        super().__init__()
        for v, nm in ((dim, "dim"), (hidden, "hidden")):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{nm} must be a positive int, got {v!r}")
        self.dim = dim
        sn = nn.utils.parametrizations.spectral_norm if spectral_norm else (lambda m: m)
        # spectral norm keeps the discriminator Lipschitz, which keeps the student's gradient
        # bounded and the game from diverging
        self.discriminator = nn.Sequential(
            sn(nn.Linear(dim, hidden)), nn.LeakyReLU(0.2), sn(nn.Linear(hidden, hidden)),
            nn.LeakyReLU(0.2), sn(nn.Linear(hidden, 1)),
        )

    def _check(self, x: Tensor, name: str) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"{name} must be floating point, got {x.dtype}")
        if x.shape[-1] != self.dim:
            raise ValueError(f"{name} has last dimension {x.shape[-1]}, expected {self.dim}")
        return x.reshape(-1, self.dim)

    def logits(self, x: Tensor) -> Tensor:
        """Discriminator logit per row: > 0 means 'looks like the teacher'."""
        x = self._check(x, "x")
        w = next(self.discriminator.parameters())
        return self.discriminator(x.to(w.dtype)).squeeze(-1)

    def generator_loss(self, student: Tensor) -> Tensor:
        """Non-saturating ``mean(-log D(student))``; gradient reaches the student (and D's params,
        which the student's optimizer should not hold)."""
        return F.softplus(-self.logits(student)).mean()

    def discriminator_loss(self, student: Tensor, teacher: Tensor) -> Tensor:
        """``mean(-log D(teacher)) + mean(-log(1 - D(student)))``; both inputs are detached."""
        real = self.logits(teacher.detach())
        fake = self.logits(student.detach())
        return F.softplus(-real).mean() + F.softplus(fake).mean()

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        self._check(teacher, "teacher")
        return self.generator_loss(student)
