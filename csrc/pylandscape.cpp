// Every operator schema of pylandscape lives here, in one TORCH_LIBRARY block, with the one Autograd
// registration (the ops are not differentiable). Implementations register per device: csrc/cpu/*.cpp (CPU)
// and csrc/cuda/*.cu (CUDA); device-generic host code (argument checks, the Gram driver) is csrc/host/*.cpp.
// Conventions: a model's parameters are one flat buffer `flat` [P] (or [K, P]) plus `offsets`
// (int64 [L+1], non-decreasing, offsets[0] = 0, offsets[L] = P): segment l is flat[offsets[l]:offsets[l+1]],
// usually one parameter tensor (a weight or a bias; the paper's "layer" is a module's weight + bias). Noise is counter-based Philox:
// (seed, offset) fixes the stream, so CPU and CUDA produce bit-identical noise.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <Python.h>
#include <torch/library.h>

#include <vector>

extern "C" {
// Importing pylandscape._C loads this library, whose static initialisers register the ops.
// No pybind11: the ops are reached through torch.ops.pylandscape.*.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(pylandscape, m) {
  // [L, 3] float64: per-segment (mean, population std, mean |w|), accumulated in fp64, one pass.
  m.def("layer_stats(Tensor flat, Tensor offsets) -> Tensor");
  // Out-of-place, batched: flat [P]; scales [K, L] float64 (sigma_kl = scales[k,l] * s_l, where s_l is
  // the segment's std (sigma_mode 0) or mean |w| (sigma_mode 1)); seeds [K] int64. Returns [K, P] perturbed
  // copies. (Not "mode": torch's functionalization of the mutable variants passes a `mode` of its own.)
  m.def("perturb(Tensor flat, Tensor offsets, Tensor scales, Tensor seeds, int offset, int sigma_mode) -> Tensor");
  // In place on one model: flat [P] += noise; scales [L] float64.
  m.def("perturb_(Tensor(a!) flat, Tensor offsets, Tensor scales, int seed, int offset, int sigma_mode) -> ()");
  // perturb into a caller's buffer out [K, P] (contiguous, flat's dtype and device, not overlapping flat):
  // the same values as perturb, without a fresh [K, P] allocation (whose page faults cost as much as the
  // noise on the CPU) when a probe loop reuses one buffer.
  m.def("perturb_out(Tensor flat, Tensor offsets, Tensor scales, Tensor seeds, int offset, int sigma_mode, "
        "Tensor(a!) out) -> ()");
  // The raw noise stream (standard normals) for element indices [0, n) of stream (seed, offset): the
  // oracle that ties CPU, CUDA and the pure-torch reference together.
  m.def("philox_normal(int n, int seed, int offset, ScalarType dtype) -> Tensor");
  // [K, P]: row k = (1 - alphas[k]) * a + alphas[k] * b.
  m.def("interpolate(Tensor a, Tensor b, Tensor alphas) -> Tensor");
  // [K, P] = coeffs [K, M] @ W [M, P], accumulated in fp64 for fp32 inputs.
  m.def("combine(Tensor W, Tensor coeffs) -> Tensor");
  // [L, N, M] float64 per-segment dot products of rows of X [N, P] and Y [M, P] (Y = X when absent:
  // symmetric, only one triangle of blocks is computed). Accurate for nearly parallel rows.
  m.def("segment_gram(Tensor X, Tensor offsets, Tensor? Y=None) -> Tensor");
}

namespace {

// The ops are not differentiable (noise, statistics, Gram matrices of snapshots): their Autograd kernel runs
// the device kernel below autograd, so outputs never require grad, whatever the inputs (like torch.argmax).
// Without it, autograd's fallback would attach a grad_fn that fails (or warns) only at backward time.
// Tensors an op writes (perturb_, perturb_out) get their version counter bumped, as torch's in-place ops do,
// so autograd still notices a mutated tensor that an earlier graph saved.
void below_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  const auto& args = op.schema().arguments();
  std::vector<at::Tensor> written;
  for (size_t i = 0; i < args.size(); ++i) {
    const auto* alias = args[i].alias_info();
    const c10::IValue& v = (*stack)[stack->size() - args.size() + i];
    if (alias != nullptr && alias->isWrite() && v.isTensor()) written.push_back(v.toTensor());
  }
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(ks & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (auto& t : written) t.unsafeGetTensorImpl()->bump_version();
}

}  // namespace

TORCH_LIBRARY_IMPL(pylandscape, Autograd, m) {
  for (const char* name : {"layer_stats", "perturb", "perturb_", "perturb_out", "interpolate", "combine",
                           "segment_gram"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&below_autograd>());
  }
}
