from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .. import functional as F
from .._validate import check_int, check_number, check_reduction, check_temperature


class KDLoss(nn.Module):
    """Knowledge-distillation loss as a module; see :func:`fastkd.functional.kd_loss`.

    ``loss = KDLoss(temperature=2.0, alpha=0.5)(student_logits, teacher_logits, target)``;
    ``divergence="reverse_kl"`` or ``"jsd"`` (with ``beta``) as in ``kd_loss``.
    """

    def __init__(
        self,
        temperature: float = 1.0,
        alpha: float = 0.5,
        ignore_index: int = -100,
        reduction: str = "mean",
        backend: str = "auto",
        divergence: str = "kl",
        beta: float = 0.5,
    ):
        super().__init__()
        # Checked here too, so a bad setting fails when the loss is built, not mid-training.
        self.temperature = check_temperature(temperature)
        self.alpha = check_number(alpha, "alpha", low=0.0, high=1.0)
        self.ignore_index = check_int(ignore_index, "ignore_index")  # not int(): -100.5
        self.reduction = check_reduction(reduction)
        self.backend = F.KD_LOSS_BACKENDS.check(backend)
        self.divergence, self.beta = F.check_divergence(divergence, beta)

    def forward(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Optional[Tensor] = None
    ) -> Tensor:
        return F.kd_loss(
            student_logits,
            teacher_logits,
            target,
            temperature=self.temperature,
            alpha=self.alpha,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            backend=self.backend,
            divergence=self.divergence,
            beta=self.beta,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, alpha={self.alpha}, "
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"backend={self.backend!r}, divergence={self.divergence!r}, beta={self.beta}"
        )
