"""fastkd: fused kernels for knowledge distillation and model compression in PyTorch."""

__version__ = "0.1.0"

from . import _extension  # noqa: E402,F401  (loads fastkd._C when present; never raises)
from . import _ops  # noqa: E402,F401  (defines the torch.library ops)
from . import functional, nn, prune  # noqa: E402
from ._topk import teacher_topk  # noqa: E402
from .distill import Distiller  # noqa: E402
from .checkpoint import decompress_, load_compressed, save_compressed, size_report  # noqa: E402
from .info import info  # noqa: E402
from .quantize import quantize_  # noqa: E402
from .sharing import share_weights_  # noqa: E402
from .sparsify import fold_masks_, sparsify_  # noqa: E402
from .structured import shrink_, structured_mask  # noqa: E402
from .student import student_from_teacher  # noqa: E402
from . import hf as _hf  # noqa: E402

_hf.install()  # transformers' from_pretrained learns fastkd's layers (imports nothing now)


def __getattr__(name):  # peft is imported only when its part is asked for
    if name in ("lora", "register_lora_layers"):
        import importlib

        lora = importlib.import_module(".lora", __name__)  # sets fastkd.lora
        return lora if name == "lora" else lora.register_lora_layers
    raise AttributeError(f"module 'fastkd' has no attribute {name!r}")

__all__ = [
    "__version__",
    "functional",
    "nn",
    "info",
    "Distiller",
    # pruning
    "prune",
    "sparsify_",
    "fold_masks_",
    "decompress_",
    # int8
    "quantize_",
    # LLM-scale distillation
    "teacher_topk",
    # compression toolbox
    "shrink_",
    "structured_mask",
    "student_from_teacher",
    "share_weights_",
    "save_compressed",
    "load_compressed",
    "size_report",
]  # and fastkd.register_lora_layers / fastkd.lora, which import peft when first used
