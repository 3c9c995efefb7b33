"""Plain-torch implementations of every fastkd op: the truth in tests, the CPU path, the baseline."""

from .kd_loss import kd_loss_backward, kd_loss_forward

__all__ = ["kd_loss_forward", "kd_loss_backward"]

# --- weight sharing (issue 6) ---
from .shared_linear import (  # noqa: E402
    shared_codebook_grad,
    shared_dequantize,
    shared_linear_forward,
)

__all__ += ["shared_linear_forward", "shared_dequantize", "shared_codebook_grad"]
