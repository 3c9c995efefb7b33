"""Drop-in ``torch.nn`` modules backed by fastkd's fused kernels."""

from .adversarial import AdversarialKDLoss
from .fused_linear_kd import FusedLinearKDLoss
from .int8_experts import Int8Experts
from .int8_linear import Int8Linear
from .kd_loss import KDLoss
from .masked_experts import MaskedExperts
from .masked_linear import MaskedLinear
from .shared_experts import SharedExperts
from .shared_linear import SharedLinear

__all__ = ["KDLoss", "FusedLinearKDLoss", "AdversarialKDLoss", "Int8Linear", "Int8Experts", "MaskedLinear",
           "MaskedExperts", "SharedLinear", "SharedExperts"]
