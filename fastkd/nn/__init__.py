"""Drop-in ``torch.nn`` modules backed by fastkd's fused kernels."""

from .kd_loss import KDLoss

__all__ = ["KDLoss"]

from .fused_linear_kd import FusedLinearKDLoss  # noqa: E402

__all__ += ["FusedLinearKDLoss"]
