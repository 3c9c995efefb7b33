"""Build script for fastkd.

The Python package (``fastkd`` plus ``kernels/`` installed as ``fastkd.kernels``) always installs.
The CUDA extension ``fastkd._C`` is compiled from ``csrc/`` when a CUDA build of torch and a CUDA
toolkit are present; no GPU is needed to compile it.

Switches (environment):
  FASTKD_SKIP_CUDA_BUILD=1  never build fastkd._C
  FASTKD_FORCE_CUDA=1       build fastkd._C or fail loudly (no quiet skip)
  TORCH_CUDA_ARCH_LIST      architectures to build for; without it: the visible GPUs, or "8.0+PTX"
                            when none is visible: one architecture (short CPU builds) whose machine
                            code runs on every 8.x GPU and whose PTX the driver compiles for any
                            later one (Hopper, Blackwell)
  MAX_JOBS                  parallel compile jobs; without it: sized to cores and memory
"""

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_WITHOUT_GPU = "8.0+PTX"


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _say(msg):
    print(f"fastkd setup: {msg}", file=sys.stderr)


def _skip_or_fail(reason):
    if _flag("FASTKD_FORCE_CUDA"):
        raise RuntimeError(f"FASTKD_FORCE_CUDA=1 but fastkd._C cannot be built: {reason}")
    _say(f"not building the CUDA extension fastkd._C: {reason}")
    return [], {}


def _default_max_jobs():
    # nvcc on a torch-including translation unit peaks near 3 GiB; keep jobs within memory.
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gib = 8
    return max(1, min(os.cpu_count() or 1, int(mem_gib // 3)))


def _nvidia_wheel_includes(cuda_home=None):
    """cuBLAS/cuSPARSE headers shipped in the nvidia-* wheels a CUDA build of torch depends on.

    Those wheels also carry a full set of CUDA runtime headers of torch's CUDA version; put first on
    the include path they shadow the toolkit's own and nvcc stops with "CUDA compiler and CUDA
    toolkit headers are incompatible" when the versions differ. So when the toolkit has an include
    directory, only the headers it lacks (cublas*, cusparse*, cusolver*, ...) are exposed, through a
    directory of symlinks under build/.
    """
    dirs = []
    for site in sys.path:
        dirs += glob.glob(os.path.join(site, "nvidia", "cu*", "include"))
        dirs += glob.glob(os.path.join(site, "nvidia", "*", "include"))
    dirs = sorted({d for d in dirs if os.path.isfile(os.path.join(d, "cublas_v2.h"))})
    toolkit_inc = os.path.join(cuda_home, "include") if cuda_home else None
    if not toolkit_inc or not os.path.isdir(toolkit_inc):
        return dirs
    present = set(os.listdir(toolkit_inc))
    shims = []
    for i, d in enumerate(dirs):
        shim = os.path.join(ROOT, "build", "nvidia-include-shim", str(i))
        os.makedirs(shim, exist_ok=True)
        # a link left by an earlier plan made against another include dir (torch's /usr/local
        # guess, say) would shadow this toolkit's own header: every later build failed with
        # "CUDA compiler and CUDA toolkit headers are incompatible" until build/ was deleted
        for name in os.listdir(shim):
            link = os.path.join(shim, name)
            if name in present or os.path.realpath(link) != os.path.join(os.path.realpath(d), name):
                os.remove(link)
        for name in os.listdir(d):
            link = os.path.join(shim, name)
            if name in present or os.path.lexists(link):
                continue
            os.symlink(os.path.join(d, name), link)
        shims.append(shim)
    return shims


def _arch_flags(cpp_extension):
    """The -gencode flags this build compiles with (fastkd reads them at run time to tell which
    GPUs the kernels can run on); empty if torch's helper for them is gone."""
    try:
        return [f for f in cpp_extension._get_cuda_arch_flags() if f.startswith("-gencode")]
    except Exception:  # a private torch helper: a missing fact must not fail the build
        return []


def _write_build_info(cpp_extension, torch, cu_sources):
    """csrc/_build_info.h: facts csrc/bindings.cpp exposes as fastkd._C.build_* strings."""
    import re
    import subprocess

    nvcc = "unknown"
    try:
        out = subprocess.run(
            [os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"), "--version"],
            capture_output=True, text=True, timeout=60,
        ).stdout
        found = re.search(r"release [^\n]*", out)
        nvcc = found.group(0) if found else nvcc
    except (OSError, subprocess.SubprocessError):
        pass
    ops = []
    for src in cu_sources:
        with open(src, encoding="utf-8") as f:
            ops += re.findall(r'm\.impl\("([A-Za-z0-9_]+)"', f.read())
    facts = {
        "FASTKD_BUILD_TORCH_VERSION": torch.__version__,
        "FASTKD_BUILD_TORCH_CUDA_VERSION": str(torch.version.cuda),
        "FASTKD_BUILD_NVCC_VERSION": nvcc,
        "FASTKD_BUILD_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", "(visible GPUs)"),
        "FASTKD_BUILD_CUDA_OPS": ",".join(ops),
        "FASTKD_BUILD_CUDA_ARCH_FLAGS": " ".join(_arch_flags(cpp_extension)),
    }
    text = "// Generated by setup.py; not tracked.\n#pragma once\n" + "".join(
        f'#define {k} "{v.replace(chr(92), "/").replace(chr(34), chr(39))}"\n'
        for k, v in facts.items()
    )
    path = os.path.join(ROOT, "csrc", "_build_info.h")
    old = open(path, encoding="utf-8").read() if os.path.exists(path) else None
    if old != text:  # unchanged facts keep ninja from recompiling bindings.cpp
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)


def cuda_extensions():
    if _flag("FASTKD_SKIP_CUDA_BUILD"):
        _say("FASTKD_SKIP_CUDA_BUILD=1: not building the CUDA extension fastkd._C")
        return [], {}
    cu_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    if not cu_sources:
        return _skip_or_fail("csrc/ has no CUDA sources yet")
    try:
        import torch
    except ImportError:
        return _skip_or_fail(
            "torch is not importable in the build environment "
            "(use `pip install --no-build-isolation` with torch installed)"
        )
    if torch.version.cuda is None:
        return _skip_or_fail(f"torch {torch.__version__} is not a CUDA build")
    # torch guesses CUDA_HOME from the nvcc on PATH; /usr/local/bin/nvcc makes it guess /usr/local,
    # which has no lib64/libcudart. Prefer the real toolkit directory when the user named none.
    if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
        if os.path.isfile("/usr/local/cuda/bin/nvcc"):
            os.environ["CUDA_HOME"] = "/usr/local/cuda"
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        return _skip_or_fail("no CUDA toolkit found (set CUDA_HOME)")
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_WITHOUT_GPU
    os.environ.setdefault("MAX_JOBS", str(_default_max_jobs()))
    _say(
        f"building fastkd._C with CUDA_HOME={cpp_extension.CUDA_HOME}, "
        f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '(visible GPUs)')}, "
        f"MAX_JOBS={os.environ['MAX_JOBS']}"
    )
    _write_build_info(cpp_extension, torch, cu_sources)
    # torch >= 2.15's headers demand C++20 (#error otherwise); older ones build as C++17.
    torch_major_minor = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    cxx_std = "c++20" if torch_major_minor >= (2, 15) else "c++17"
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp"))) + cu_sources
    ext = cpp_extension.CUDAExtension(
        name="fastkd._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")] + _nvidia_wheel_includes(cpp_extension.CUDA_HOME),
        extra_compile_args={
            "cxx": ["-O3", f"-std={cxx_std}"],
            "nvcc": ["-O3", f"-std={cxx_std}", "-lineinfo", "--expt-relaxed-constexpr"],
        },
        py_limited_api=False,
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


if __name__ == "__main__":  # pip's build backend runs this file as __main__; tests import it
    ext_modules, cmdclass = cuda_extensions()
    setup(
        packages=find_packages(include=["fastkd", "fastkd.*"]) + ["fastkd.kernels"],
        package_dir={"fastkd.kernels": "kernels"},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
