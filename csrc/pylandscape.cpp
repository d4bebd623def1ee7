// Every operator schema of pylandscape lives here, in one TORCH_LIBRARY block.
// Implementations register per device: csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cu (CUDA).
// Conventions: a model's parameters are one flat buffer `flat` [P] (or [K, P]) plus `offsets`
// (int64 [L+1], increasing, offsets[0] = 0, offsets[L] = P). Noise is counter-based Philox:
// (seed, offset) fixes the stream, so CPU and CUDA produce bit-identical noise.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing pylandscape._C loads this library, whose static initialisers register the ops.
// No pybind11: the ops are reached through torch.ops.pylandscape.*.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(pylandscape, m) {
  // [L, 3] float64: per-layer (mean, population std, mean |w|), accumulated in fp64, one pass.
  m.def("layer_stats(Tensor flat, Tensor offsets) -> Tensor");
  // Out-of-place, batched: flat [P]; scales [K, L] float64 (sigma_kl = scales[k,l] * s_l, where s_l is
  // the layer's std (mode 0) or mean |w| (mode 1)); seeds [K] int64. Returns [K, P] perturbed copies.
  m.def("perturb(Tensor flat, Tensor offsets, Tensor scales, Tensor seeds, int offset, int mode) -> Tensor");
  // In place on one model: flat [P] += noise; scales [L] float64.
  m.def("perturb_(Tensor(a!) flat, Tensor offsets, Tensor scales, int seed, int offset, int mode) -> ()");
  // perturb into a caller's buffer out [K, P] (contiguous, flat's dtype and device, not overlapping flat):
  // the same values as perturb, without a fresh [K, P] allocation (whose page faults cost as much as the
  // noise on the CPU) when a probe loop reuses one buffer.
  m.def("perturb_out(Tensor flat, Tensor offsets, Tensor scales, Tensor seeds, int offset, int mode, "
        "Tensor(a!) out) -> ()");
  // The raw noise stream (standard normals) for element indices [0, n) of stream (seed, offset): the
  // oracle that ties CPU, CUDA and the pure-torch reference together.
  m.def("philox_normal(int n, int seed, int offset, ScalarType dtype) -> Tensor");
  // [K, P]: row k = (1 - alphas[k]) * a + alphas[k] * b.
  m.def("interpolate(Tensor a, Tensor b, Tensor alphas) -> Tensor");
  // [K, P] = coeffs [K, M] @ W [M, P], accumulated in fp64 for fp32 inputs.
  m.def("combine(Tensor W, Tensor coeffs) -> Tensor");
  // [L, N, M] float64 per-layer dot products of rows of X [N, P] and Y [M, P] (Y = X when absent:
  // symmetric, only one triangle of blocks is computed). Accurate for nearly parallel rows.
  m.def("segment_gram(Tensor X, Tensor offsets, Tensor? Y=None) -> Tensor");
}
