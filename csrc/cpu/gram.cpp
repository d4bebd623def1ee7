// segment_gram on CPU: the device-generic driver of pylandscape/gram.h (BLAS through at::mm) plus the
// compensated fp64 reductions it needs, as plain loops (one row or pair per task, so results do not
// depend on the thread count).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "pylandscape/gram.h"

namespace pylandscape {
namespace {

using gram::acc_sq;
using gram::two_sum;

constexpr int kLanes = 4;

// Sum of lanes (s_k, c_k) as one compensated total, always in the same order.
inline double finish(const double* s, const double* c) {
  double tot = s[0], err = c[0];
  for (int k = 1; k < kLanes; ++k) {
    double t, e;
    two_sum(tot, s[k], t, e);
    tot = t;
    err += e + c[k];
  }
  return tot + err;
}

template <typename scalar_t>
double sumsq_row(const scalar_t* x, int64_t n) {
  double s[kLanes] = {0, 0, 0, 0}, c[kLanes] = {0, 0, 0, 0};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    for (int q = 0; q < kLanes; ++q) acc_sq(static_cast<double>(x[k + q]), s[q], c[q]);
  }
  for (; k < n; ++k) acc_sq(static_cast<double>(x[k]), s[0], c[0]);
  return finish(s, c);
}

template <typename scalar_t>
double dist2_row(const scalar_t* a, const scalar_t* b, int64_t n) {
  // for fp32 data the fp64 difference is exact; for fp64 data it rounds relative to |a - b|
  double s[kLanes] = {0, 0, 0, 0}, c[kLanes] = {0, 0, 0, 0};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    for (int q = 0; q < kLanes; ++q)
      acc_sq(static_cast<double>(a[k + q]) - static_cast<double>(b[k + q]), s[q], c[q]);
  }
  for (; k < n; ++k) acc_sq(static_cast<double>(a[k]) - static_cast<double>(b[k]), s[0], c[0]);
  return finish(s, c);
}

at::Tensor sumsq_cpu(const at::Tensor& rows, int64_t c0, int64_t c1) {
  const int64_t n = rows.size(0), len = c1 - c0, ld = rows.stride(0);
  at::Tensor out = at::empty({n}, rows.options().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "segment_gram_sumsq", [&] {
    const scalar_t* base = rows.const_data_ptr<scalar_t>();
    at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) o[i] = sumsq_row(base + i * ld + c0, len);
    });
  });
  return out;
}

at::Tensor dist2_cpu(const at::Tensor& A, const at::Tensor& B, const at::Tensor& ii, const at::Tensor& jj,
                     int64_t c0, int64_t c1) {
  const int64_t K = ii.numel(), len = c1 - c0, lda = A.stride(0), ldb = B.stride(0);
  at::Tensor out = at::empty({K}, A.options().dtype(at::kDouble));
  at::Tensor iic = ii.contiguous(), jjc = jj.contiguous();
  const int64_t* pi = iic.const_data_ptr<int64_t>();
  const int64_t* pj = jjc.const_data_ptr<int64_t>();
  double* o = out.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "segment_gram_dist2", [&] {
    const scalar_t* a = A.const_data_ptr<scalar_t>();
    const scalar_t* b = B.const_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(len, 1));
    at::parallel_for(0, K, grain, [&](int64_t s, int64_t e) {
      for (int64_t k = s; k < e; ++k) o[k] = dist2_row(a + pi[k] * lda + c0, b + pj[k] * ldb + c0, len);
    });
  });
  return out;
}

}  // namespace

// Argument checks shared by the CPU and CUDA registrations (ValueError on bad input).
std::vector<int64_t> gram_check_args(const at::Tensor& X, const at::Tensor& offsets,
                                     const std::optional<at::Tensor>& Y) {
  TORCH_CHECK_VALUE(X.dim() == 2, "segment_gram: X must be [N, P], got ", X.dim(), " dims");
  TORCH_CHECK_VALUE(X.scalar_type() == at::kFloat || X.scalar_type() == at::kDouble,
                    "segment_gram: X must be float32 or float64, got ", X.scalar_type());
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.scalar_type() == at::kLong && offsets.numel() >= 2,
                    "segment_gram: offsets must be a 1-D int64 tensor [L+1] with L >= 1");
  if (Y.has_value()) {
    const at::Tensor& y = *Y;
    TORCH_CHECK_VALUE(y.dim() == 2, "segment_gram: Y must be [M, P], got ", y.dim(), " dims");
    TORCH_CHECK_VALUE(y.scalar_type() == X.scalar_type(), "segment_gram: Y must have X's dtype ",
                      X.scalar_type(), ", got ", y.scalar_type());
    TORCH_CHECK_VALUE(y.size(1) == X.size(1), "segment_gram: Y must have X's row length P = ", X.size(1),
                      ", got ", y.size(1));
    TORCH_CHECK_VALUE(y.device() == X.device(), "segment_gram: X and Y must be on the same device");
  }
  at::Tensor oc = offsets.to(at::kCPU).contiguous();
  std::vector<int64_t> off(oc.const_data_ptr<int64_t>(), oc.const_data_ptr<int64_t>() + oc.numel());
  TORCH_CHECK_VALUE(off.front() == 0 && off.back() == X.size(1),
                    "segment_gram: offsets must start at 0 and end at P = ", X.size(1), ", got ", off.front(),
                    " ... ", off.back());
  for (size_t l = 0; l + 1 < off.size(); ++l)
    TORCH_CHECK_VALUE(off[l + 1] >= off[l], "segment_gram: offsets must be non-decreasing (layer ", l, ")");
  return off;
}

at::Tensor segment_gram_cpu(const at::Tensor& X, const at::Tensor& offsets, const std::optional<at::Tensor>& Y) {
  std::vector<int64_t> off = gram_check_args(X, offsets, Y);
  static const gram::GramKernels kern{sumsq_cpu, dist2_cpu};
  return gram::segment_gram_impl(X, off, Y.has_value() ? *Y : at::Tensor(), kern);
}

TORCH_LIBRARY_IMPL(pylandscape, CPU, m) {
  m.impl("segment_gram", &segment_gram_cpu);
}

}  // namespace pylandscape
