"""Plain-torch implementations of every fastkd op: the truth in tests, the CPU path, the baseline."""

from .kd_loss import kd_loss_backward, kd_loss_forward
from .kd_loss import n_stats as kd_loss_n_stats
from .kd_topk import kd_loss_topk_backward, kd_loss_topk_forward
from .masked_linear import (
    masked_linear_forward,
    masked_linear_grad_input,
    masked_linear_grad_weight,
)
from .shared_linear import shared_codebook_grad, shared_dequantize, shared_linear_forward

__all__ = [
    "kd_loss_forward",
    "kd_loss_backward",
    "kd_loss_n_stats",
    "kd_loss_topk_forward",
    "kd_loss_topk_backward",
    "masked_linear_forward",
    "masked_linear_grad_input",
    "masked_linear_grad_weight",
    "shared_linear_forward",
    "shared_dequantize",
    "shared_codebook_grad",
]
