"""setup.py's decisions about the CUDA extension (no compiling here: the real build is the install
that CI runs before the tests, and test_masked_linear checks what it registered)."""

import importlib.util
import os
import pathlib

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def setup_module(monkeypatch, tmp_path):
    for var in ("FASTKD_SKIP_CUDA_BUILD", "FASTKD_FORCE_CUDA", "TORCH_CUDA_ARCH_LIST", "MAX_JOBS",
                "CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    spec = importlib.util.spec_from_file_location("fastkd_setup_under_test", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # not __main__: defines the helpers without calling setup()
    # planning only: leave csrc/_build_info.h (compiled into the real build) untouched
    monkeypatch.setattr(mod, "_write_build_info", lambda *a, **k: None)
    # and the header shims under build/ too: a plan made in this process (where torch may have
    # guessed CUDA_HOME=/usr/local before setup.py could say otherwise) must not leave links
    # that the next real build picks up
    monkeypatch.setattr(mod, "ROOT", str(tmp_path / "root"))
    return mod


def _wheel_include_dirs():
    import glob
    import sys

    return sorted({d for site in sys.path for d in glob.glob(f"{site}/nvidia/cu*/include")
                   if os.path.isfile(f"{d}/cublas_v2.h")})


@pytest.mark.skipif(not os.path.isdir("/usr/local/cuda/include") or not _wheel_include_dirs(),
                    reason="needs the toolkit's include dir and torch's nvidia wheels")
def test_header_shims_drop_links_a_plan_against_another_dir_left(setup_module):
    """A plan made against an include dir without CUDA's headers (torch's /usr/local guess)
    linked every wheel header, cccl and the runtime's included; those links stayed, and every
    later build failed with 'CUDA compiler and CUDA toolkit headers are incompatible' until
    build/ was deleted by hand."""
    toolkit = set(os.listdir("/usr/local/cuda/include"))
    both = sorted(toolkit & set(os.listdir(_wheel_include_dirs()[0])))  # cuda_runtime.h, ...
    assert both
    (shim,) = setup_module._nvidia_wheel_includes("/usr/local")  # no include/ of CUDA's there
    assert all(os.path.lexists(os.path.join(shim, name)) for name in both)  # what it exposed
    (shim,) = setup_module._nvidia_wheel_includes("/usr/local/cuda")
    names = set(os.listdir(shim))
    assert not names & toolkit  # the toolkit's own win
    assert "cublas_v2.h" in names  # what the toolkit lacks is still there


def test_skip_switch_builds_nothing(setup_module, monkeypatch, capsys):
    monkeypatch.setenv("FASTKD_SKIP_CUDA_BUILD", "1")
    monkeypatch.chdir(ROOT)
    assert setup_module.cuda_extensions() == ([], {})
    assert "FASTKD_SKIP_CUDA_BUILD=1" in capsys.readouterr().err


def test_no_cuda_sources_builds_nothing_and_says_so(setup_module, monkeypatch, tmp_path, capsys):
    (tmp_path / "csrc").mkdir()
    monkeypatch.chdir(tmp_path)
    assert setup_module.cuda_extensions() == ([], {})
    assert "no CUDA sources" in capsys.readouterr().err
    monkeypatch.setenv("FASTKD_FORCE_CUDA", "1")
    with pytest.raises(RuntimeError, match="FASTKD_FORCE_CUDA=1.*no CUDA sources"):
        setup_module.cuda_extensions()


@pytest.mark.skipif(
    torch.version.cuda is None or not os.path.isfile("/usr/local/cuda/bin/nvcc"),
    reason="needs a CUDA build of torch and the toolkit at /usr/local/cuda",
)
def test_extension_is_planned_with_one_default_arch_off_gpu(setup_module, monkeypatch):
    monkeypatch.chdir(ROOT)
    exts, cmdclass = setup_module.cuda_extensions()
    assert [e.name for e in exts] == ["fastkd._C"]
    sources = {pathlib.Path(s).name for s in exts[0].sources}
    assert {"bindings.cpp", "masked_matmul.cu"} <= sources
    assert "build_ext" in cmdclass
    assert os.environ["CUDA_HOME"] == "/usr/local/cuda"  # not torch's /usr/local guess
    assert int(os.environ["MAX_JOBS"]) >= 1
    if not torch.cuda.is_available():
        assert os.environ["TORCH_CUDA_ARCH_LIST"] == setup_module.DEFAULT_ARCH_WITHOUT_GPU


def test_arch_list_from_the_user_is_kept(setup_module, monkeypatch):
    if torch.version.cuda is None or not os.path.isfile("/usr/local/cuda/bin/nvcc"):
        pytest.skip("needs a CUDA build of torch and the toolkit")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    monkeypatch.setenv("MAX_JOBS", "1")
    monkeypatch.chdir(ROOT)
    setup_module.cuda_extensions()
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0"
    assert os.environ["MAX_JOBS"] == "1"


def test_the_sdist_carries_the_cuda_sources_when_no_extension_is_planned(tmp_path):
    """An sdist made where setup.py plans no extension (an isolated build has no torch, or
    FASTKD_SKIP_CUDA_BUILD=1) left csrc/ out: built elsewhere, it quietly came out without
    fastkd._C (and with FASTKD_FORCE_CUDA=1 failed saying csrc/ had no sources)."""
    import shutil
    import subprocess
    import sys
    import tarfile

    src = tmp_path / "src"  # a copy: the sdist run writes its egg-info next to setup.py
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        "build", "*.egg-info", "__pycache__", ".git", "*.so", "results", ".whl"))
    env = {**os.environ, "FASTKD_SKIP_CUDA_BUILD": "1"}
    proc = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)],
                          cwd=src, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (archive,) = tmp_path.glob("fastkd-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    expected = {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").iterdir()
                if p.suffix in (".cu", ".cpp")}
    assert expected and expected <= names
    assert {"tests/conftest.py", "kernels/kd_loss.py", "setup.py"} <= names
    assert not any(n.endswith(".so") for n in names)
