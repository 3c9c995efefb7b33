"""Drop-in ``torch.nn`` modules backed by fastkd's fused kernels."""

from .kd_loss import KDLoss
from .int8_linear import Int8Linear

__all__ = ["KDLoss"]

# --- weight sharing (issue 6) ---
from .shared_linear import SharedLinear  # noqa: E402

__all__ += ["SharedLinear"]
from .adversarial import AdversarialKDLoss  # noqa: E402

__all__ += ["AdversarialKDLoss"]
__all__ += ["Int8Linear"]
