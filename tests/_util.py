"""Where the tests run fastkd's Triton kernels, decided once for every test module.

With a CUDA device visible the Triton backends get CUDA tensors, so the suite tests the compiled
kernels. Without one they get CPU tensors and run in Triton's interpreter (conftest.py sets
TRITON_INTERPRET=1 before any kernel is defined). Handing CPU tensors to backend="triton" on a GPU
machine does not test anything: it raises, because TRITON_INTERPRET is (rightly) unset there.

The reference (backend="torch") tests may stay on the CPU: use ``device_for(backend)``.
"""

from __future__ import annotations

import pytest
import torch

from fastkd._backend import triton_interpret

HAS_CUDA = torch.cuda.is_available()
# The device for tensors handed to a Triton backend: the GPU when there is one, else the CPU.
DEVICE = "cuda" if HAS_CUDA else "cpu"
# Triton runs here either on a GPU or, on CPU tensors, in the interpreter.
TRITON_OK = HAS_CUDA or triton_interpret()
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="needs CUDA or TRITON_INTERPRET=1")


def near_lossless_swaps(int8_mode: str = "w8a16") -> list:
    """``(swap, layer class)`` for each model-level swap, set to keep a model's outputs close
    enough to compare with the float model's: int8 (``int8_mode``), pruning at sparsity 0,
    8-bit weight sharing. For ``pytest.mark.parametrize("swap, kind", ...)``."""
    import fastkd
    from fastkd.nn import Int8Linear, MaskedLinear, SharedLinear

    return [
        (lambda m: fastkd.quantize_(m, mode=int8_mode), Int8Linear),
        (lambda m: fastkd.sparsify_(m, sparsity=0.0), MaskedLinear),
        (lambda m: fastkd.share_weights_(m, bits=8), SharedLinear),
    ]


def device_for(backend: str) -> str:
    """The device a test should put its tensors on for `backend` ("triton" or "torch")."""
    return DEVICE if backend == "triton" else "cpu"


def spy_student_logits(monkeypatch, backend: str, kernel_module: str, names) -> list:
    """Wrap the entry points ``names`` of the Triton module ``fastkd.kernels.<kernel_module>``
    (or, for the torch backend, of ``fastkd.reference``, with its per-(L, V)-block path forced
    on) so that every student-logits tensor they receive is appended to the returned list: for
    tests that a sliced batch reaches them as a view, not a copy."""
    import importlib

    import fastkd

    if backend == "triton":
        kernels = importlib.import_module(f"fastkd.kernels.{kernel_module}")
    else:  # the reference takes a (B, L, V) batch one (L, V) view at a time (large blocks)
        kernels = importlib.import_module("fastkd.reference")
        monkeypatch.setattr(fastkd._ops, "_MIN_REFERENCE_BLOCK", 1)
    seen = []
    for name in names:
        real = getattr(kernels, name)

        def spy(*args, _real=real, **kw):
            seen.append(args[1 if args[0].dim() == 1 else 0])  # the student logits
            return _real(*args, **kw)

        monkeypatch.setattr(kernels, name, spy)
    return seen
