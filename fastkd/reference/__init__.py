"""Plain-torch implementations of every fastkd op: the truth in tests, the CPU path, the baseline."""

from .kd_loss import kd_loss_backward, kd_loss_forward

__all__ = ["kd_loss_forward", "kd_loss_backward"]
