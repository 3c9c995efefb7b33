"""Guarded loading of the compiled CUDA extension ``fastkd._C``.

Importing fastkd never fails because of the extension: when it is missing or broken the reference
(and Triton) paths keep working, and one warning names the cause where it matters.
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings

import torch

_C = None
LOAD_ERROR: str | None = None


def _load():
    global _C, LOAD_ERROR
    _C, LOAD_ERROR = None, None
    spec = importlib.util.find_spec("fastkd._C")
    if spec is None:
        LOAD_ERROR = (
            "fastkd._C was not built (no CUDA toolkit or CUDA torch at install time, "
            "FASTKD_SKIP_CUDA_BUILD=1, or no CUDA sources); see `python -m fastkd info`"
        )
        # Only worth a warning where a CUDA kernel could have run.
        if torch.cuda.is_available():
            warnings.warn(f"fastkd: CUDA kernels unavailable: {LOAD_ERROR}", RuntimeWarning, 2)
        return
    try:
        _C = importlib.import_module("fastkd._C")
    except Exception as exc:  # a broken build must not break `import fastkd`
        LOAD_ERROR = f"fastkd._C failed to load: {type(exc).__name__}: {exc}"
        warnings.warn(f"fastkd: CUDA kernels unavailable: {LOAD_ERROR}", RuntimeWarning, 2)


_load()


def loaded() -> bool:
    return _C is not None


def build_info() -> dict:
    """Facts the extension recorded at build time (empty when it is not loaded)."""
    if _C is None:
        return {}
    return {k: getattr(_C, k) for k in dir(_C) if k.startswith("build_")}


def has_cuda_kernel(qualname: str) -> bool:
    """True when op `fastkd::name` has a kernel registered for the CUDA dispatch key."""
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CUDA"))
    except RuntimeError:
        return False
