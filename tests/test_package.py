"""The package itself: import, info(), the CLI, and guarded loading of the CUDA extension."""

import importlib
import json
import subprocess
import sys
import warnings

import pytest
import torch

import fastkd
from fastkd import _extension


def test_info_has_the_promised_keys():
    data = fastkd.info()
    for key in ("version", "torch", "triton", "cuda_extension", "cuda_ops", "ops"):
        assert key in data
    assert data["version"] == fastkd.__version__
    assert data["torch"] == torch.__version__
    assert isinstance(data["cuda_extension"], bool)
    assert data["cuda_extension"] == _extension.loaded()
    assert data["ops"]["kd_loss"]["auto"] == {"cpu": "torch", "cuda": "triton"}
    if not data["cuda_extension"]:
        assert data["cuda_ops"] == [] and data["cuda_extension_error"]


def test_info_auto_columns_follow_fastkd_backend(monkeypatch):
    """info() showed the plain auto choice while FASTKD_BACKEND made the ops take (or refuse)
    another backend."""
    monkeypatch.setenv("FASTKD_BACKEND", "torch")
    assert fastkd.info()["ops"]["kd_loss"]["auto"] == {"cpu": "torch", "cuda": "torch"}
    monkeypatch.setenv("FASTKD_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors need the interpreter
    auto = fastkd.info()["ops"]["kd_loss"]["auto"]
    assert auto["cpu"] == "triton (refused)"
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fastkd.functional.kd_loss(torch.randn(2, 3), torch.randn(2, 3))
    # an op without the named backend keeps its own auto choice, as the ops do
    monkeypatch.setenv("FASTKD_BACKEND", "cuda")
    assert fastkd.info()["ops"]["kd_loss"]["auto"]["cpu"] == "torch"


def test_cli_info_text_and_json():
    out = subprocess.run([sys.executable, "-m", "fastkd", "info"], capture_output=True, text=True,
                         check=True).stdout
    assert "kd_loss" in out and "auto on cuda" in out
    js = subprocess.run([sys.executable, "-m", "fastkd", "info", "--json"], capture_output=True,
                        text=True, check=True).stdout
    assert json.loads(js)["version"] == fastkd.__version__


def test_cli_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "fastkd", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "info" in out


def test_ops_exist_without_the_extension():
    # The contract is defined in Python: the schema is there whatever was built.
    assert hasattr(torch.ops.fastkd, "kd_loss_forward")
    assert "str backend" in str(torch.ops.fastkd.kd_loss_forward.default._schema)


def test_broken_extension_warns_once_and_import_survives(monkeypatch):
    real_import = importlib.import_module

    def broken(name, *a, **k):
        if name == "fastkd._C":
            raise ImportError("undefined symbol: _ZN3c104cuda9SomethingEv")
        return real_import(name, *a, **k)

    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "fastkd._C" else None)
    monkeypatch.setattr(importlib, "import_module", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _extension._load()
    try:
        msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(msgs) == 1 and "undefined symbol" in msgs[0]
        assert not _extension.loaded() and "failed to load" in _extension.LOAD_ERROR
    finally:
        monkeypatch.undo()
        _extension._C = None
        _extension.LOAD_ERROR = None
        _extension._load()


def test_kernels_are_installed_inside_the_package():
    import importlib.metadata

    mod = importlib.import_module("fastkd.kernels.kd_loss")
    assert mod.__name__ == "fastkd.kernels.kd_loss"
    top_level = importlib.metadata.distribution("fastkd").read_text("top_level.txt") or ""
    assert top_level.split() == ["fastkd"]


@pytest.mark.skipif(not _extension.loaded(), reason="fastkd._C was not built here")
def test_extension_reports_build_facts():
    assert _extension.build_info()


def test_backend_selection_touches_no_import_machinery(monkeypatch):
    """Selection runs inside torch.compile'd code; Dynamo (torch 2.11) refuses to trace
    importlib.util.find_spec, which selection once called on every kd_loss on CUDA."""
    from fastkd._backend import REGISTRY

    def refuse(*a, **k):
        raise AssertionError("importlib.util.find_spec called during backend selection")

    monkeypatch.setattr(importlib.util, "find_spec", refuse)
    for ops in REGISTRY.values():
        for device in ("cpu", "cuda", "meta"):
            ops.auto(device)
            for name in ops.names():
                ops.reasons(name, device)


# ------------------------------------------------------------------- eager calls and autograd

def _int8_args(requires_grad=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 37, generator=g).requires_grad_(requires_grad)
    w, ws = fastkd.functional.quantize_weight(torch.randn(11, 37, generator=g))
    return x, w, ws


class _RecordOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_inference_calls_skip_the_dispatcher_hop_only_when_nothing_can_observe_it(monkeypatch):
    from fastkd import _ops

    calls = []
    real = _ops._DIRECT["int8_linear_w8a8"]
    monkeypatch.setitem(_ops._DIRECT, "int8_linear_w8a8",
                        lambda *a: calls.append(1) or real(*a))
    x, w, ws = _int8_args()
    direct = fastkd.functional.int8_linear(x, w, ws, backend="torch")
    assert calls == [1]  # plain tensors, no grad: the implementation, called directly
    # ... with the same result the dispatcher gives
    torch.testing.assert_close(direct, torch.ops.fastkd.int8_linear_w8a8(x, w, ws, None, "torch"),
                               rtol=0, atol=0)
    # a dispatch mode sees the op itself, not its insides only
    with _RecordOps() as mode:
        fastkd.functional.int8_linear(x, w, ws, backend="torch")
    assert "fastkd.int8_linear_w8a8.default" in mode.ops and calls == [1]
    # a torch function mode (torch.device is one) and a gradient to record take the op too
    with torch.device("cpu"):
        fastkd.functional.int8_linear(x, w, ws, backend="torch")
    xg, _, _ = _int8_args(requires_grad=True)
    y = fastkd.functional.int8_linear(xg, w, ws, backend="torch")
    assert calls == [1] and y.grad_fn is not None
    with torch.no_grad():
        fastkd.functional.int8_linear(xg, w, ws, backend="torch")
    assert calls == [1, 1]


def test_autograd_registration_gets_keyword_only_defaults_and_trims_gradients():
    # fastkd._ops.register_autograd fills what the dispatcher drops (keyword-only defaults) and
    # returns one gradient per input actually passed: kd_loss_forward's divergence/beta.
    s = torch.randn(3, 29, requires_grad=True)
    t = torch.randn(3, 29)
    rows, _ = torch.ops.fastkd.kd_loss_forward(s, t, None, 2.0, 0.5, -100, "torch")
    rows.sum().backward()
    grad_default = s.grad.clone()
    s.grad = None
    rows2, _ = torch.ops.fastkd.kd_loss_forward(s, t, None, 2.0, 0.5, -100, "torch",
                                                divergence="kl", beta=0.5)
    rows2.sum().backward()
    torch.testing.assert_close(rows, rows2, rtol=0, atol=0)
    torch.testing.assert_close(s.grad, grad_default, rtol=0, atol=0)
    s.grad = None
    rows3, _ = torch.ops.fastkd.kd_loss_forward(s, t, None, 2.0, 0.5, -100, "torch",
                                                divergence="jsd", beta=0.25)
    rows3.sum().backward()
    assert not torch.allclose(rows3, rows) and torch.isfinite(s.grad).all()
    assert not torch.allclose(s.grad, grad_default)  # the backward got divergence="jsd" too


def test_public_names_import_and_are_documented():
    """fastkd.functional had no __all__: import * brought os, torch, the check_* helpers and
    a dozen constants with it."""
    import fastkd.functional as F
    import fastkd.nn

    for module in (fastkd, fastkd.nn, F):
        for name in module.__all__:
            try:
                obj = getattr(module, name)
            except ImportError:  # register_lora_layers without peft installed
                continue
            assert (getattr(obj, "__doc__", None) or "").strip(), f"{module.__name__}.{name}"
    assert {"kd_loss", "kd_loss_topk", "fused_linear_kd_loss", "masked_linear", "int8_linear",
            "shared_linear", "quantize_per_token"} <= set(F.__all__)
    assert not {"os", "torch", "Tensor", "Optional"} & set(F.__all__)
