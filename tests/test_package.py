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
