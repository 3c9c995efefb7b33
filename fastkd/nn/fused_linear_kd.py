from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .. import functional as F
from .._validate import check_int, check_number, check_reduction, check_temperature


class FusedLinearKDLoss(nn.Module):
    """Student and teacher lm-heads + KD loss without materialising the logits; see
    :func:`fastkd.functional.fused_linear_kd_loss`.

    ``loss = FusedLinearKDLoss(temperature=2.0)(h_s, student.lm_head.weight, h_t,
    teacher.lm_head.weight, target)``
    """

    def __init__(
        self,
        temperature: float = 1.0,
        alpha: float = 0.5,
        ignore_index: int = -100,
        reduction: str = "mean",
        divergence: str = "kl",
        beta: float = 0.5,
        chunk_rows: Optional[int] = None,
        backend: str = "auto",
    ):
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.alpha = check_number(alpha, "alpha", low=0.0, high=1.0)
        self.ignore_index = check_int(ignore_index, "ignore_index")  # not int(): -100.5
        self.reduction = check_reduction(reduction)
        self.divergence, self.beta = F.check_divergence(divergence, beta)
        if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int)
                                       or chunk_rows < 1):
            raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")
        self.chunk_rows = chunk_rows
        self.backend = F.KD_LOSS_BACKENDS.check(backend)

    def forward(
        self,
        student_hidden: Tensor,
        student_weight: Tensor,
        teacher_hidden: Tensor,
        teacher_weight: Tensor,
        target: Optional[Tensor] = None,
        student_bias: Optional[Tensor] = None,
        teacher_bias: Optional[Tensor] = None,
    ) -> Tensor:
        return F.fused_linear_kd_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, target,
            student_bias=student_bias, teacher_bias=teacher_bias,
            temperature=self.temperature, alpha=self.alpha, ignore_index=self.ignore_index,
            reduction=self.reduction, divergence=self.divergence, beta=self.beta,
            chunk_rows=self.chunk_rows, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, alpha={self.alpha}, ignore_index={self.ignore_index}, "
            f"reduction={self.reduction!r}, divergence={self.divergence!r}, beta={self.beta}, "
            f"chunk_rows={self.chunk_rows}, backend={self.backend!r}"
        )
