"""Guarded loading of the compiled CUDA extension ``fastkd._C``.

Importing fastkd never fails because of the extension: when it is missing or broken the reference
(and Triton) paths keep working, and one warning names the cause where it matters.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
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


def _compiled_archs():
    """(machine-code targets, PTX targets) of fastkd._C as (major, minor, arch_specific)
    triples, read from the -gencode flags the build recorded; None when it recorded none (an
    older build, or torch's flag helper missing at build time)."""
    flags = build_info().get("build_cuda_arch_flags", "")
    sass, ptx = [], []
    for kind, digits, suffix in re.findall(r"code=\[?(sm|compute)_(\d+)([a-z]?)", flags):
        # sm_86 -> (8, 6); sm_100 -> (10, 0); an "a"/"f" suffix ties the code to that exact arch
        entry = (int(digits[:-1]), int(digits[-1]), bool(suffix))
        (sass if kind == "sm" else ptx).append(entry)
    return (sass, ptx) if sass or ptx else None


def arch_unavailable_reason(capability) -> str | None:
    """Why fastkd._C has no kernel image for a GPU of compute capability ``(major, minor)``, or
    None when it has one (or the build did not record its architectures). Machine code for sm_XY
    runs on XY and later minors of the same major; PTX for compute_XY on every later GPU (the
    driver compiles it at load)."""
    archs = _compiled_archs()
    if archs is None:
        return None
    sass, ptx = archs
    major, minor = capability
    for a_major, a_minor, specific in sass:
        if a_major == major and (a_minor == minor if specific else a_minor <= minor):
            return None
    for a_major, a_minor, specific in ptx:
        if ((a_major, a_minor) == (major, minor)) if specific else (a_major, a_minor) <= (major, minor):
            return None
    built = ", ".join(f"sm_{a}{b}" for a, b, _ in sass) or "PTX only"
    return (
        f"fastkd._C was built for {built}{' + PTX' if ptx and sass else ''} "
        f"(TORCH_CUDA_ARCH_LIST={build_info().get('build_cuda_arch_list', '?')}), which cannot run "
        f"on this compute capability {major}.{minor} GPU: rebuild with "
        f"TORCH_CUDA_ARCH_LIST=\"{major}.{minor}\" (or build on this machine)"
    )
