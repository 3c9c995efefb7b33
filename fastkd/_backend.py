"""Backend selection: which implementation of an op runs for given inputs.

Each op declares its backends in preference order (xformers-style): a backend says on which device
types ``auto`` may pick it and, for given inputs, the reasons it cannot run. ``auto`` takes the first
backend with no reasons; an explicitly requested backend (argument or ``FASTKD_BACKEND``) that
cannot run raises with its reasons instead of quietly running something else.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

BACKEND_CHOICES = ("auto", "torch", "triton", "cuda")
ENV_VAR = "FASTKD_BACKEND"

ReasonFn = Callable[[str], Optional[str]]


def check_backend(backend) -> str:
    """The name itself is one of BACKEND_CHOICES (whether it can run is decided by `select`)."""
    if not isinstance(backend, str) or backend not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")
    return backend


# Decided once, at import: backend selection also runs inside torch.compile'd code, and Dynamo
# refuses to trace importlib.util.find_spec (a hard graph break under fullgraph=True, seen with
# torch 2.11 on CUDA). A module constant is read as a constant.
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_unavailable_reason(device_type: str) -> Optional[str]:
    if not TRITON_INSTALLED:
        return "triton is not installed"
    if device_type == "cuda":
        return None
    if device_type == "cpu":
        if triton_interpret():
            return None
        return "Triton runs CPU tensors only under TRITON_INTERPRET=1"
    return f"the Triton kernels run on CUDA tensors, not on {device_type} tensors"


def torch_unavailable_reason(device_type: str) -> Optional[str]:
    return None


@dataclass(frozen=True)
class Backend:
    name: str
    auto_devices: tuple  # device types on which `auto` may choose this backend
    unavailable: ReasonFn = torch_unavailable_reason


@dataclass
class OpBackends:
    op: str
    backends: list = field(default_factory=list)

    def names(self) -> list:
        return [b.name for b in self.backends]

    def check(self, requested) -> str:
        """``requested`` if it is "auto" or a backend this op has (a module's setting, checked
        when it is made rather than at its first call), else ValueError."""
        check_backend(requested)
        if requested != "auto":
            self._get(requested)
        return requested

    def _get(self, name: str) -> Backend:
        for b in self.backends:
            if b.name == name:
                return b
        raise ValueError(
            f"{self.op} has no {name!r} backend; it has {self.names()} (or 'auto')"
        )

    def reasons(self, name: str, device_type: str, extra=None) -> list:
        """Why backend `name` cannot run this op on `device_type` (empty: it can)."""
        out = []
        r = self._get(name).unavailable(device_type)
        if r:
            out.append(r)
        if extra is not None:
            out.extend(extra(name) or [])
        return out

    def auto(self, device_type: str, extra=None) -> str:
        for b in self.backends:
            if device_type in b.auto_devices and not self.reasons(b.name, device_type, extra):
                return b.name
        return "torch"

    def select(self, requested: str, device, extra=None) -> str:
        """Resolve `requested` (a BACKEND_CHOICES entry) to a concrete backend name.

        `extra(name) -> list[str]` adds reasons that depend on the inputs (dtype, density...).
        """
        check_backend(requested)
        device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
        explicit = requested
        if requested == "auto":
            env = os.environ.get(ENV_VAR, "auto") or "auto"
            if env not in BACKEND_CHOICES:
                raise ValueError(f"{ENV_VAR} must be one of {BACKEND_CHOICES}, got {env!r}")
            # The environment override applies to the ops that have that backend at all.
            explicit = env if env in self.names() else "auto"
        if explicit == "auto":
            return self.auto(device_type, extra)
        why = self.reasons(explicit, device_type, extra)
        if why:
            raise RuntimeError(
                f"backend={explicit!r} cannot run {self.op} on {device_type} tensors: "
                + "; ".join(why)
            )
        return explicit


REGISTRY: dict = {}


def register(op_backends: OpBackends) -> OpBackends:
    REGISTRY[op_backends.op] = op_backends
    return op_backends


ANY_DEVICE = ("cpu", "cuda", "mps", "xpu", "meta")
TORCH = Backend("torch", auto_devices=ANY_DEVICE)
TRITON = Backend("triton", auto_devices=("cuda",), unavailable=triton_unavailable_reason)


def register_triton_op(op: str) -> OpBackends:
    """The common case: a Triton kernel that `auto` picks on CUDA, the torch reference elsewhere."""
    return register(OpBackends(op, [TRITON, TORCH]))
