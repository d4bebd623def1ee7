// segment_gram on CPU: the device-generic driver of pylandscape/gram.h (BLAS through at::mm) plus the
// compensated fp64 reductions it needs, as plain loops (one row or pair per task, so results do not
// depend on the thread count).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
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
  if constexpr (std::is_same_v<scalar_t, float>) {
    // squares of fp32 values are exact in fp64: no fma needed (and none in hardware for generic x86-64)
    for (; k + kLanes <= n; k += kLanes) {
#pragma omp simd
      for (int q = 0; q < kLanes; ++q) gram::acc_sq_exact(static_cast<double>(x[k + q]), s[q], c[q]);
    }
    for (; k < n; ++k) gram::acc_sq_exact(static_cast<double>(x[k]), s[0], c[0]);
  } else {
    for (; k + kLanes <= n; k += kLanes) {
      for (int q = 0; q < kLanes; ++q) acc_sq(static_cast<double>(x[k + q]), s[q], c[q]);
    }
    for (; k < n; ++k) acc_sq(static_cast<double>(x[k]), s[0], c[0]);
  }
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

template <typename scalar_t, typename dst_t>
void prep_rows(const scalar_t* X, int64_t ldx, int64_t r0, int64_t r1, int64_t p, const scalar_t* Q, int64_t ldq,
               const int64_t* qidx, int64_t nq, int64_t c0, int64_t c1, dst_t* D, int64_t ldc, int64_t ldd,
               double* dn2, double* T) {
  // D is chunk-major: column c of row i lives at D[(c / kChunk) * ldc + i * ldd + c % kChunk]
  constexpr int64_t K = gram::kChunk;
  constexpr int64_t kTile = 512;
  static_assert(K % kTile == 0, "tiles must not straddle chunks");
  const int64_t s = c1 - c0;
  const scalar_t* pr = X + p * ldx + c0;
  at::parallel_for(r0, r1, 1, [&](int64_t b, int64_t e) {
    std::vector<double> d(kTile), acc(nq);
    for (int64_t i = b; i < e; ++i) {
      const scalar_t* x = X + i * ldx + c0;
      dst_t* drow0 = D + (i - r0) * ldd;
      double sq = 0.0;
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t t0 = 0; t0 < s; t0 += kTile) {
        const int64_t tl = std::min(kTile, s - t0);
        dst_t* drow = drow0 + (t0 / K) * ldc + (t0 % K);
        double sqt = 0.0;
#pragma omp simd reduction(+ : sqt)
        for (int64_t c = 0; c < tl; ++c) {
          const double v = static_cast<double>(x[t0 + c]) - static_cast<double>(pr[t0 + c]);
          d[c] = v;
          drow[c] = static_cast<dst_t>(v);
          sqt += v * v;
        }
        sq += sqt;
        for (int64_t k = 0; k < nq; ++k) {
          const scalar_t* q = Q + qidx[k] * ldq + c0 + t0;
          double a = 0.0;
          const double* dd = d.data();
#pragma omp simd reduction(+ : a)
          for (int64_t c = 0; c < tl; ++c) a += static_cast<double>(q[c]) * dd[c];
          acc[k] += a;
        }
      }
      dn2[i - r0] = sq;
      for (int64_t k = 0; k < nq; ++k) T[(i - r0) * nq + k] = acc[k];
    }
  });
}

void prep_cpu(const at::Tensor& X, int64_t r0, int64_t r1, int64_t p, const at::Tensor& Q, const at::Tensor& qidx,
              int64_t c0, int64_t c1, at::Tensor& D, at::Tensor& dn2, at::Tensor& T) {
  TORCH_CHECK(D.dim() == 3 && D.stride(2) == 1 && dn2.is_contiguous() && T.is_contiguous(),
              "segment_gram: bad workspace");
  at::Tensor qi = qidx.to(at::kCPU).contiguous();
  const int64_t nq = qi.numel();
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "segment_gram_prep", [&] {
    const scalar_t* x = X.const_data_ptr<scalar_t>();
    const scalar_t* q = Q.const_data_ptr<scalar_t>();
    if (D.scalar_type() == at::kFloat) {
      prep_rows<scalar_t, float>(x, X.stride(0), r0, r1, p, q, Q.stride(0), qi.const_data_ptr<int64_t>(), nq, c0,
                                 c1, D.data_ptr<float>(), D.stride(0), D.stride(1), dn2.data_ptr<double>(),
                                 T.data_ptr<double>());
    } else {
      prep_rows<scalar_t, double>(x, X.stride(0), r0, r1, p, q, Q.stride(0), qi.const_data_ptr<int64_t>(), nq, c0,
                                  c1, D.data_ptr<double>(), D.stride(0), D.stride(1), dn2.data_ptr<double>(),
                                  T.data_ptr<double>());
    }
  });
}

void acc_cpu(at::Tensor& S, const at::Tensor& T) {
  // one parallel region for all chunks (a region per chunk costs a barrier each, ruinous on a busy machine)
  TORCH_CHECK(S.is_contiguous() && T.is_contiguous() && T.dim() == 3, "segment_gram: bad accumulator");
  double* s = S.data_ptr<double>();
  const int64_t n = S.numel(), nck = T.size(0);
  AT_DISPATCH_FLOATING_TYPES(T.scalar_type(), "segment_gram_acc", [&] {
    const scalar_t* t = T.const_data_ptr<scalar_t>();
    at::parallel_for(0, n, 4096, [&](int64_t b, int64_t e) {
      for (int64_t c = 0; c < nck; ++c) {
        const scalar_t* tc = t + c * n;
        for (int64_t k = b; k < e; ++k) s[k] += static_cast<double>(tc[k]);
      }
    });
  });
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
  static const gram::GramKernels kern{sumsq_cpu, dist2_cpu, prep_cpu, acc_cpu};
  return gram::segment_gram_impl(X, off, Y.has_value() ? *Y : at::Tensor(), kern);
}

TORCH_LIBRARY_IMPL(pylandscape, CPU, m) {
  m.impl("segment_gram", &segment_gram_cpu);
}

}  // namespace pylandscape
