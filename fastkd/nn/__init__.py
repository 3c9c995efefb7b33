"""Drop-in ``torch.nn`` modules backed by fastkd's fused kernels."""

from .kd_loss import KDLoss

__all__ = ["KDLoss"]
