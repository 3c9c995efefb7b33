"""Build script for fastkd.

The Python package (``fastkd`` plus ``kernels/`` installed as ``fastkd.kernels``) always installs.
The CUDA extension ``fastkd._C`` is compiled from ``csrc/`` when a CUDA build of torch and a CUDA
toolkit are present; no GPU is needed to compile it.

Switches (environment):
  FASTKD_SKIP_CUDA_BUILD=1  never build fastkd._C
  FASTKD_FORCE_CUDA=1       build fastkd._C or fail loudly (no quiet skip)
  TORCH_CUDA_ARCH_LIST      architectures to build for; without it: the visible GPUs, or "9.0"
                            (Hopper) when none is visible, one architecture to keep CPU builds short
  MAX_JOBS                  parallel compile jobs; without it: sized to cores and memory
"""

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_WITHOUT_GPU = "9.0"


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


def _nvidia_wheel_includes():
    """cuBLAS/cuSPARSE headers shipped in the nvidia-* wheels a CUDA build of torch depends on."""
    dirs = []
    for site in sys.path:
        dirs += glob.glob(os.path.join(site, "nvidia", "cu*", "include"))
        dirs += glob.glob(os.path.join(site, "nvidia", "*", "include"))
    return sorted({d for d in dirs if os.path.isfile(os.path.join(d, "cublas_v2.h"))})


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
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp"))) + cu_sources
    ext = cpp_extension.CUDAExtension(
        name="fastkd._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")] + _nvidia_wheel_includes(),
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17"],
            "nvcc": ["-O3", "-std=c++17", "-lineinfo", "--expt-relaxed-constexpr"],
        },
        py_limited_api=False,
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extensions()

setup(
    packages=find_packages(include=["fastkd", "fastkd.*"]) + ["fastkd.kernels"],
    package_dir={"fastkd.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
