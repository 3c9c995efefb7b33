"""Drop-in ``torch.nn`` modules backed by fastkd's fused kernels."""

from .kd_loss import KDLoss
from .masked_linear import MaskedLinear

__all__ = ["KDLoss", "MaskedLinear"]
