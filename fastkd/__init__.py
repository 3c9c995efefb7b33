"""fastkd: fused kernels for knowledge distillation and model compression in PyTorch."""

__version__ = "0.1.0"

from . import _extension  # noqa: E402,F401  (loads fastkd._C when present; never raises)
from . import _ops  # noqa: E402,F401  (defines the torch.library ops)
from . import functional, nn  # noqa: E402
from .info import info  # noqa: E402
from . import prune  # noqa: E402
from .sparsify import sparsify_  # noqa: E402

__all__ = ["__version__", "functional", "nn", "info"]
__all__ += ["prune", "sparsify_"]
