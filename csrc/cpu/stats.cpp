// layer_stats on the CPU: one pass, float64 shifted sums per chunk, chunks in parallel, fixed merge order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "pylandscape/threads.h"
#include "pylandscape/checks.h"
#include "pylandscape/cpu_kernels.h"
#include "pylandscape/stats.h"

namespace pylandscape {
namespace cpu {
namespace {

// The lane order of stats.h (eight independent accumulators per sum: the compiler vectorises them without
// reassociating, so results do not depend on the SIMD width, and equal the CUDA kernel's).
template <typename T>
PLK_ALWAYS_INLINE Moments chunk_moments_impl(const T* x, int64_t n) {
  constexpr int V = kStatLanes;
  const double K = static_cast<double>(x[0]);
  double s1[V] = {}, s2[V] = {}, sa[V] = {};
  for (int64_t i = 0; i + V <= n; i += V) {
    for (int j = 0; j < V; ++j) lane_step(s1[j], s2[j], sa[j], static_cast<double>(x[i + j]), K);
  }
  return chunk_finish(s1, s2, sa, x, n, K);
}

PLK_MULTIVERSION Moments chunk_moments_f32(const float* x, int64_t n) { return chunk_moments_impl(x, n); }
PLK_MULTIVERSION Moments chunk_moments_f64(const double* x, int64_t n) { return chunk_moments_impl(x, n); }

}  // namespace

std::vector<Moments> layer_moments(const at::Tensor& flat, const int64_t* offs, int64_t L) {
  std::vector<int64_t> first;
  const std::vector<Chunk> chunks = make_chunks(offs, L, &first);
  std::vector<Moments> part(chunks.size());
  const bool f32 = flat.scalar_type() == at::kFloat;
  const void* base = flat.data_ptr();
  // Grain 32 chunks (up to 512K elements, ~0.1 ms): a smaller pass is not worth waking a second thread
  // (on a busy machine one parallel region cost ~8 ms, measured). The merge order is fixed either way.
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 32, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const Chunk& c = chunks[i];
      part[i] = f32 ? chunk_moments_f32(static_cast<const float*>(base) + c.begin, c.end - c.begin)
                    : chunk_moments_f64(static_cast<const double*>(base) + c.begin, c.end - c.begin);
    }
  });
  std::vector<Moments> out(L);
  for (int64_t l = 0; l < L; ++l)
    for (int64_t i = first[l]; i < first[l + 1]; ++i) moments_merge(out[l], part[i]);
  return out;
}

at::Tensor stats_tensor(const std::vector<Moments>& m) {
  const int64_t L = static_cast<int64_t>(m.size());
  at::Tensor out = at::empty({L, 3}, at::TensorOptions().dtype(at::kDouble));
  double* p = out.data_ptr<double>();
  for (int64_t l = 0; l < L; ++l) moments_finish(m[l], p + 3 * l);
  return out;
}

namespace {

at::Tensor layer_stats_cpu(const at::Tensor& flat_in, const at::Tensor& offsets) {
  ThreadsForCall threads;  // nothing waits on a core another process keeps busy
  check_float(flat_in, "flat");
  TORCH_CHECK_VALUE(flat_in.dim() == 1, "pylandscape: flat must be 1-D [P], got ", flat_in.sizes());
  const at::Tensor flat = flat_in.contiguous();
  const at::Tensor offs = check_offsets(offsets, flat.numel());
  const int64_t L = offs.numel() - 1;
  return stats_tensor(layer_moments(flat, offs.data_ptr<int64_t>(), L));
}

}  // namespace
}  // namespace cpu
}  // namespace pylandscape

TORCH_LIBRARY_IMPL(pylandscape, CPU, m) { m.impl("layer_stats", &pylandscape::cpu::layer_stats_cpu); }
