"""Drop-in ``torch.nn`` modules backed by fastkd's fused kernels."""

from .kd_loss import KDLoss
from .int8_linear import Int8Linear

__all__ = ["KDLoss"]
__all__ += ["Int8Linear"]
