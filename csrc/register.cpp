// The Python module spguard._C. The op schemas are defined in Python (spguard/ops/schemas.py, loaded before
// this library); the CPU kernels in cpu/ register implementations of them when the library loads.
#include <Python.h>

// `import spguard._C` loads this library and with it the kernel registrations of cpu/*.cpp; the module
// itself is empty (the ops are reached through torch.ops.spguard).
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
