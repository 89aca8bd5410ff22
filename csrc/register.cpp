// Schemas of the fused guidance ops (docs/design.md, "The fused operations"). The math and its oracle are in
// spguard/ops/reference.py; the device implementations are in cpu/ and cuda/.
#include <Python.h>
#include <torch/library.h>

// `import spguard._C` loads this library, which registers the ops below with the dispatcher; the
// module itself is empty (the ops are reached through torch.ops.spguard).
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(spguard, m) {
  m.def("cross_attention_aggregate(Tensor q, Tensor k, Tensor token_mask) -> Tensor");
  m.def(
      "phase1_step(Tensor e_u, Tensor e_p, Tensor e_s, float guidance_scale)"
      " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "phase2_step(Tensor e_u, Tensor e_p, Tensor e_s, Tensor strength, float guidance_scale,"
      " float q, Tensor? attention) -> (Tensor, Tensor)");
}
