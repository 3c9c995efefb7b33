"""What fastkd has on this machine, and which backend ``auto`` would pick where."""

from __future__ import annotations

import importlib.metadata
import os

import torch

from . import _extension
from . import hf
from ._backend import ENV_VAR, REGISTRY, triton_interpret


def _version(dist: str):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _auto_pick(entry, device_type: str) -> str:
    """What ``backend="auto"`` resolves to for this op on ``device_type``, FASTKD_BACKEND
    included (it overrides auto for the ops that have the backend it names)."""
    try:
        return entry.select("auto", torch.device(device_type))
    except (RuntimeError, ValueError):
        return f"{os.environ.get(ENV_VAR)} (refused)"


def info() -> dict:
    """A dict describing versions, the CUDA extension and the backend choices per op."""
    from . import __version__

    cuda_available = torch.cuda.is_available()
    ops = {}
    for name, entry in sorted(REGISTRY.items()):
        ops[name] = {
            "backends": entry.names(),
            "auto": {dev: _auto_pick(entry, dev) for dev in ("cpu", "cuda")},
            "unavailable": {
                dev: {b: r for b in entry.names() if (r := entry.reasons(b, dev))}
                for dev in ("cpu", "cuda")
            },
        }
    cuda_ops = sorted(
        str(op).split("::")[-1]
        for op in torch._C._dispatch_get_all_op_names()
        if str(op).startswith("fastkd::") and _extension.has_cuda_kernel(str(op))
    )
    return {
        "version": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "cuda_available": cuda_available,
        "device": torch.cuda.get_device_name() if cuda_available else "cpu",
        "cuda_extension": _extension.loaded(),
        "cuda_extension_error": _extension.LOAD_ERROR,
        # a build without machine code or PTX for this GPU loads, then fails at every launch
        "cuda_extension_arch_error": (
            _extension.arch_unavailable_reason(torch.cuda.get_device_capability())
            if cuda_available and _extension.loaded() else None
        ),
        "cuda_extension_build": _extension.build_info(),
        "cuda_ops": cuda_ops,
        "backend_override": os.environ.get(ENV_VAR),
        "triton_interpret": triton_interpret(),
        "transformers_quantizer": hf.status(),
        "ops": ops,
    }


def format_info(data: dict) -> str:
    lines = []
    for key in ("version", "torch", "torch_cuda", "triton", "cuda_available", "device"):
        lines.append(f"{key:<22} {data[key]}")
    ext = "loaded" if data["cuda_extension"] else f"not loaded ({data['cuda_extension_error']})"
    lines.append(f"{'cuda_extension':<22} {ext}")
    if data.get("cuda_extension_arch_error"):
        lines.append(f"  {'cannot run here':<20} {data['cuda_extension_arch_error']}")
    for k, v in data["cuda_extension_build"].items():
        lines.append(f"  {k:<20} {v}")
    lines.append(f"{'cuda_ops':<22} {', '.join(data['cuda_ops']) or '(none)'}")
    lines.append(f"{'FASTKD_BACKEND':<22} {data['backend_override'] or '(unset)'}")
    lines.append(f"{'TRITON_INTERPRET':<22} {data['triton_interpret']}")
    lines.append(f"{'transformers quantizer':<22} {data['transformers_quantizer']}")
    lines.append("")
    lines.append(f"{'op':<20} {'backends':<26} {'auto on cpu':<13} auto on cuda")
    for name, op in data["ops"].items():
        lines.append(
            f"{name:<20} {', '.join(op['backends']):<26} {op['auto']['cpu']:<13} {op['auto']['cuda']}"
        )
        for dev, reasons in op["unavailable"].items():
            for backend, why in reasons.items():
                lines.append(f"    {backend} on {dev}: {'; '.join(why)}")
    return "\n".join(lines)
