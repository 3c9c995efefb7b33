"""Adversarial distillation: a discriminator tells teacher outputs from student outputs.

The student gets the non-saturating generator loss ``-log D(student)`` (Goodfellow et al. 2014) on
top of its KD loss; the discriminator is trained with its own optimizer on
``-log D(teacher) - log(1 - D(student))``. Both use logits and ``softplus`` for stability.
"""

from __future__ import annotations

from typing import Optional

import torch
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
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"{name} must be (..., {self.dim}), got shape {tuple(x.shape)}")
        return x.reshape(-1, self.dim)

    def logits(self, x: Tensor) -> Tensor:
        """Discriminator logit per row: > 0 means 'looks like the teacher'."""
        x = self._check(x, "x")
        w = next(self.discriminator.parameters())
        return self.discriminator(x.to(w.dtype)).squeeze(-1)

    @staticmethod
    def _mean(x: Tensor, mask: Optional[Tensor]) -> Tensor:
        """Mean over rows, or over the rows ``mask`` keeps (0 when it keeps none): padding and
        ignored positions of a sequence batch count for nothing."""
        if mask is None:  # (0 over no rows, as with a mask keeping none; not nan)
            return x.sum() / max(x.numel(), 1)
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.numel() != x.numel():
            raise ValueError(f"mask must be a bool tensor with one entry per row ({x.numel()}), "
                             f"got {mask.dtype if isinstance(mask, Tensor) else type(mask)}")
        mask = mask.reshape(-1)
        return torch.where(mask, x, 0.0).sum() / mask.sum().clamp_min(1)

    def generator_loss(self, student: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """Non-saturating ``mean(-log D(student))`` (over the rows ``mask`` keeps); gradient
        reaches the student (and D's params, which the student's optimizer should not hold)."""
        return self._mean(F.softplus(-self.logits(student)), mask)

    def discriminator_loss(self, student: Tensor, teacher: Tensor,
                           mask: Optional[Tensor] = None) -> Tensor:
        """``mean(-log D(teacher)) + mean(-log(1 - D(student)))`` (over the rows ``mask``
        keeps); both inputs are detached."""
        real = self.logits(teacher.detach())
        fake = self.logits(student.detach())
        return self._mean(F.softplus(-real), mask) + self._mean(F.softplus(fake), mask)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        self._check(teacher, "teacher")
        return self.generator_loss(student)
