// The module init of fastkd._C. Deliberately free of torch headers (it compiles in a second):
// loading the shared object runs the static TORCH_LIBRARY_IMPL registrations of the .cu files,
// and this stub only makes `import fastkd._C` work and records build facts as build_* strings.
#include <Python.h>

// Written by setup.py at build time (torch/CUDA versions, architectures, ops).
#include "_build_info.h"

static struct PyModuleDef fastkd_c_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "fastkd CUDA kernels; the ops are registered with the torch dispatcher as fastkd::*",
    -1,
    nullptr,
};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&fastkd_c_module);
  if (m == nullptr) return nullptr;
  const char* facts[][2] = {
      {"build_torch_version", FASTKD_BUILD_TORCH_VERSION},
      {"build_torch_cuda_version", FASTKD_BUILD_TORCH_CUDA_VERSION},
      {"build_nvcc_version", FASTKD_BUILD_NVCC_VERSION},
      {"build_cuda_arch_list", FASTKD_BUILD_CUDA_ARCH_LIST},
      {"build_cuda_ops", FASTKD_BUILD_CUDA_OPS},
      {"build_cuda_arch_flags", FASTKD_BUILD_CUDA_ARCH_FLAGS},
  };
  for (const auto& fact : facts) {
    if (PyModule_AddStringConstant(m, fact[0], fact[1]) < 0) {
      Py_DECREF(m);
      return nullptr;
    }
  }
  return m;
}
