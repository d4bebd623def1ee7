// interpolate and combine on the CPU: memory-bound loops in float64 arithmetic (interp.h), rounded
// once to the output dtype; results equal the CUDA kernels and the torch references bit for bit.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "pylandscape/threads.h"
#include "pylandscape/checks.h"
#include "pylandscape/interp.h"

namespace pylandscape {
namespace cpu {
namespace {

constexpr int64_t kSpan = 16384;  // elements per parallel task

template <typename T>
PLK_ALWAYS_INLINE void lerp_row_impl(const T* a, const T* b, T* out, int64_t n, double alpha) {
  for (int64_t i = 0; i < n; ++i)
    out[i] = static_cast<T>(lerp_exact(static_cast<double>(a[i]), static_cast<double>(b[i]), alpha));
}
PLK_MULTIVERSION void lerp_row_f32(const float* a, const float* b, float* out, int64_t n, double alpha) {
  lerp_row_impl(a, b, out, n, alpha);
}
PLK_MULTIVERSION void lerp_row_f64(const double* a, const double* b, double* out, int64_t n, double alpha) {
  lerp_row_impl(a, b, out, n, alpha);
}

at::Tensor interpolate_cpu(const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& alphas) {
  ThreadsForCall threads;  // nothing waits on a core another process keeps busy
  check_float(a_in, "a");
  TORCH_CHECK_VALUE(a_in.scalar_type() == b_in.scalar_type(), "pylandscape: a and b must have one dtype");
  TORCH_CHECK_VALUE(a_in.dim() == 1 && b_in.sizes() == a_in.sizes(), "pylandscape: a and b must be [P], got ",
                    a_in.sizes(), " and ", b_in.sizes());
  TORCH_CHECK_VALUE(alphas.dim() == 1, "pylandscape: alphas must be [K], got ", alphas.sizes());
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const at::Tensor al = host_double(alphas);
  const int64_t K = al.numel(), P = a.numel();
  at::Tensor out = at::empty({K, P}, a.options());
  const int64_t ns = (P + kSpan - 1) / kSpan;
  const double* alp = al.data_ptr<double>();
  const bool f32 = a.scalar_type() == at::kFloat;
  at::parallel_for(0, K * ns, 1, [&](int64_t tb, int64_t te) {
    for (int64_t t = tb; t < te; ++t) {
      const int64_t k = t / ns, lo = (t % ns) * kSpan, n = std::min(P - lo, kSpan);
      if (f32)
        lerp_row_f32(a.data_ptr<float>() + lo, b.data_ptr<float>() + lo, out.data_ptr<float>() + k * P + lo, n,
                     alp[k]);
      else
        lerp_row_f64(a.data_ptr<double>() + lo, b.data_ptr<double>() + lo, out.data_ptr<double>() + k * P + lo, n,
                     alp[k]);
    }
  });
  return out;
}

// Columns [lo, lo + n) of every output row: for each k, acc = sum_m c[k, m] W[m, :] in float64, in the
// order m = 0..M-1. The W tile (M x n) is reused from cache for all K rows. Four models per pass keep
// the running sum in a register for four steps (same operations in the same order as one model per
// pass, so the same bits, with a quarter of the acc loads and stores).
template <typename T>
PLK_ALWAYS_INLINE void combine_tile_impl(const T* W, int64_t P, int64_t M, const double* c, int64_t K, T* out,
                                         int64_t lo, int64_t n, double* acc) {
  for (int64_t k = 0; k < K; ++k) {
    const double* ck = c + k * M;
    for (int64_t j = 0; j < n; ++j) acc[j] = 0.0;
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) {
      const double c0 = ck[m], c1 = ck[m + 1], c2 = ck[m + 2], c3 = ck[m + 3];
      const T* w0 = W + m * P + lo;
      const T* w1 = w0 + P;
      const T* w2 = w1 + P;
      const T* w3 = w2 + P;
      for (int64_t j = 0; j < n; ++j) {
        double a = combine_step(acc[j], c0, static_cast<double>(w0[j]));
        a = combine_step(a, c1, static_cast<double>(w1[j]));
        a = combine_step(a, c2, static_cast<double>(w2[j]));
        acc[j] = combine_step(a, c3, static_cast<double>(w3[j]));
      }
    }
    for (; m < M; ++m) {
      const double cm = ck[m];
      const T* w = W + m * P + lo;
      for (int64_t j = 0; j < n; ++j) acc[j] = combine_step(acc[j], cm, static_cast<double>(w[j]));
    }
    T* o = out + k * P + lo;
    for (int64_t j = 0; j < n; ++j) o[j] = static_cast<T>(acc[j]);
  }
}
PLK_MULTIVERSION void combine_tile_f32(const float* W, int64_t P, int64_t M, const double* c, int64_t K, float* out,
                                       int64_t lo, int64_t n, double* acc) {
  combine_tile_impl(W, P, M, c, K, out, lo, n, acc);
}
PLK_MULTIVERSION void combine_tile_f64(const double* W, int64_t P, int64_t M, const double* c, int64_t K,
                                       double* out, int64_t lo, int64_t n, double* acc) {
  combine_tile_impl(W, P, M, c, K, out, lo, n, acc);
}

at::Tensor combine_cpu(const at::Tensor& W_in, const at::Tensor& coeffs) {
  ThreadsForCall threads;  // nothing waits on a core another process keeps busy
  check_float(W_in, "W");
  TORCH_CHECK_VALUE(W_in.dim() == 2, "pylandscape: W must be [M, P], got ", W_in.sizes());
  TORCH_CHECK_VALUE(coeffs.dim() == 2 && coeffs.size(1) == W_in.size(0), "pylandscape: coeffs must be [K, M] with M = ",
                    W_in.size(0), ", got ", coeffs.sizes());
  const at::Tensor W = W_in.contiguous();
  const at::Tensor c = host_double(coeffs);
  const int64_t M = W.size(0), P = W.size(1), K = c.size(0);
  at::Tensor out = at::empty({K, P}, W.options());
  if (K == 0 || P == 0) return out;
  // Tile width: keep the M x n tile of W within ~256 KiB (L2), between 64 and 4096 columns.
  const int64_t bytes = static_cast<int64_t>(W.element_size()) * std::max<int64_t>(M, 1);
  const int64_t tile = std::min<int64_t>(4096, std::max<int64_t>(64, (262144 / bytes) / 64 * 64));
  const int64_t nt = (P + tile - 1) / tile;
  const bool f32 = W.scalar_type() == at::kFloat;
  at::parallel_for(0, nt, 1, [&](int64_t tb, int64_t te) {
    std::vector<double> acc(static_cast<size_t>(tile));
    for (int64_t t = tb; t < te; ++t) {
      const int64_t lo = t * tile, n = std::min(P - lo, tile);
      if (f32)
        combine_tile_f32(W.data_ptr<float>(), P, M, c.data_ptr<double>(), K, out.data_ptr<float>(), lo, n, acc.data());
      else
        combine_tile_f64(W.data_ptr<double>(), P, M, c.data_ptr<double>(), K, out.data_ptr<double>(), lo, n,
                         acc.data());
    }
  });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace pylandscape

TORCH_LIBRARY_IMPL(pylandscape, CPU, m) {
  m.impl("interpolate", &pylandscape::cpu::interpolate_cpu);
  m.impl("combine", &pylandscape::cpu::combine_cpu);
}
