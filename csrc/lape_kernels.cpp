// Op schemas of the `lape_kernels` namespace (the single definition; see docs/ARCHITECTURE.md)
// and the Python module `lape_kernels._C`.
//
// Kernels live elsewhere: CPU kernels in the extension modules `lape_kernels._cpu_<isa>`
// (csrc/cpu/, the same source compiled once per CPU capability: default, avx2, avx512), CUDA
// kernels in csrc/cuda/*.cu (TORCH_LIBRARY_IMPL(lape_kernels, CUDA, m), linked into this
// module when torch has CUDA). Importing `_C` defines the schemas and then imports the CPU
// kernel module that matches the CPU capability PyTorch itself uses (`ATEN_CPU_CAPABILITY`
// overrides it, as for PyTorch's own kernels), so `import lape_kernels._C` is enough to run.
#include <Python.h>

#include <ATen/Version.h>
#include <torch/library.h>

#include "common/schemas.h"

#include <string>
#include <vector>

TORCH_LIBRARY(lape_kernels, m) { LAPE_KERNELS_DEFINE_SCHEMAS(m); }

namespace {

// Best CPU kernel module first; each is tried in turn (a module may be absent when the build
// machine's compiler could not target that ISA, e.g. on non-x86 hosts only `default` exists).
std::vector<std::string> cpu_variants() {
  std::vector<std::string> order;
#if defined(__x86_64__) || defined(_M_X64)
  // "DEFAULT", "AVX2" or "AVX512" on x86 (honours ATEN_CPU_CAPABILITY, like PyTorch's kernels).
  const std::string cap = at::get_cpu_capability();
  if (cap == "AVX512") order.push_back("avx512");
  if (cap == "AVX512" || cap == "AVX2") order.push_back("avx2");
#endif
  order.push_back("default");
  return order;
}

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "lape_kernels op schemas; importing it also loads the CPU kernels for this machine.",
    -1,
    nullptr,
    nullptr,
    nullptr,
    nullptr,
    nullptr,
};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) {
    return nullptr;
  }
  std::string errors;
  for (const auto& variant : cpu_variants()) {
    const std::string name = "lape_kernels._cpu_" + variant;
    PyObject* kernels = PyImport_ImportModule(name.c_str());
    if (kernels != nullptr) {
      Py_DECREF(kernels);
      PyObject* value = PyUnicode_FromString(variant.c_str());
      if (value == nullptr || PyModule_AddObject(module, "cpu_kernels", value) != 0) {
        Py_XDECREF(value);
        Py_DECREF(module);
        return nullptr;
      }
      return module;
    }
    // Remember why, try the next (less demanding) variant.
    PyObject *type = nullptr, *val = nullptr, *tb = nullptr;
    PyErr_Fetch(&type, &val, &tb);
    PyObject* text = val ? PyObject_Str(val) : nullptr;
    const char* utf8 = text ? PyUnicode_AsUTF8(text) : nullptr;
    PyErr_Clear();
    errors += name + ": " + (utf8 ? utf8 : "unknown error") + "; ";
    Py_XDECREF(text);
    Py_XDECREF(type);
    Py_XDECREF(val);
    Py_XDECREF(tb);
  }
  Py_DECREF(module);
  PyErr_SetString(PyExc_ImportError, ("lape_kernels: no CPU kernel module could be loaded (" +
                                      errors + ") - rebuild with `make build`").c_str());
  return nullptr;
}
