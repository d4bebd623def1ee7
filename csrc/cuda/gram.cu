// segment_gram on CUDA: the kernels that the host driver (csrc/host/gram_driver.cpp: cuBLAS through at::bmm on
// the current stream) plus the compensated fp64 reductions, as kernels with fixed reduction trees
// (deterministic). int64 indexing throughout.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "pylandscape/gram_driver.h"

namespace pylandscape {

namespace {

constexpr int kThreads = 256;
constexpr int kMaxQ = 8;  // reference rows handled per prep launch

// Blocks of a launch over n rows (one block per row, grid-stride beyond the cap): never 0, never above the
// grid limit.
unsigned row_grid(int64_t n) {
  TORCH_CHECK(n > 0, "segment_gram: empty launch");
  return static_cast<unsigned>(std::min<int64_t>(n, int64_t{1} << 20));
}

// Combine the (sum, compensation) pairs of a block in a fixed tree.
__device__ void block_reduce_comp(double* ss, double* cc, double& s, double& c) {
  const int t = threadIdx.x;
  ss[t] = s;
  cc[t] = c;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w >>= 1) {
    if (t < w) {
      double r, e;
      gram::two_sum(ss[t], ss[t + w], r, e);
      ss[t] = r;
      cc[t] = cc[t] + cc[t + w] + e;
    }
    __syncthreads();
  }
  s = ss[0];
  c = cc[0];
  __syncthreads();
}

__device__ double block_reduce_sum(double* buf, double v) {
  const int t = threadIdx.x;
  buf[t] = v;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w >>= 1) {
    if (t < w) buf[t] += buf[t + w];
    __syncthreads();
  }
  double r = buf[0];
  __syncthreads();
  return r;
}

template <typename scalar_t>
__global__ void sumsq_kernel(const scalar_t* __restrict__ X, int64_t n, int64_t ld, int64_t c0, int64_t len,
                             double* __restrict__ out) {
  __shared__ double ss[kThreads], cc[kThreads];
  for (int64_t row = blockIdx.x; row < n; row += gridDim.x) {
    const scalar_t* x = X + row * ld + c0;
    double s = 0.0, c = 0.0;
    for (int64_t k = threadIdx.x; k < len; k += blockDim.x) gram::acc_sq(static_cast<double>(x[k]), s, c);
    block_reduce_comp(ss, cc, s, c);
    if (threadIdx.x == 0) out[row] = s + c;
  }
}

template <typename scalar_t>
__global__ void dist2_kernel(const scalar_t* __restrict__ A, int64_t lda, const scalar_t* __restrict__ B,
                             int64_t ldb, const int64_t* __restrict__ ii, const int64_t* __restrict__ jj, int64_t K,
                             int64_t c0, int64_t len, double* __restrict__ out) {
  __shared__ double ss[kThreads], cc[kThreads];
  for (int64_t k = blockIdx.x; k < K; k += gridDim.x) {
    const scalar_t* a = A + ii[k] * lda + c0;
    const scalar_t* b = B + jj[k] * ldb + c0;
    double s = 0.0, c = 0.0;
    for (int64_t t = threadIdx.x; t < len; t += blockDim.x)
      gram::acc_sq(static_cast<double>(a[t]) - static_cast<double>(b[t]), s, c);
    block_reduce_comp(ss, cc, s, c);
    if (threadIdx.x == 0) out[k] = s + c;
  }
}

// One block per row: D (chunk-major), |d|^2 and up to kMaxQ dot products with reference rows.
template <typename scalar_t, typename dst_t>
__global__ void prep_kernel(const scalar_t* __restrict__ X, int64_t ldx, int64_t r0, int64_t p,
                            const scalar_t* __restrict__ Q, int64_t ldq, const int64_t* __restrict__ qidx, int64_t q0,
                            int64_t nq_here, int64_t nq_total, int64_t c0, int64_t s, dst_t* __restrict__ D,
                            int64_t kc, int64_t ldc, int64_t ldd, double* __restrict__ dn2,
                            double* __restrict__ T, bool write_d, int64_t n) {
  __shared__ double buf[kThreads];
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {  // i: row offset from r0
    const scalar_t* x = X + (r0 + i) * ldx + c0;
    const scalar_t* pr = X + p * ldx + c0;
    const scalar_t* qr[kMaxQ];
    for (int k = 0; k < kMaxQ; ++k) qr[k] = k < nq_here ? Q + qidx[q0 + k] * ldq + c0 : nullptr;
    double sq = 0.0, acc[kMaxQ];
    for (int k = 0; k < kMaxQ; ++k) acc[k] = 0.0;
    for (int64_t c = threadIdx.x; c < s; c += blockDim.x) {
      const double v = static_cast<double>(x[c]) - static_cast<double>(pr[c]);
      if (write_d) {
        D[(c / kc) * ldc + i * ldd + (c % kc)] = static_cast<dst_t>(v);
        sq += v * v;
      }
#pragma unroll
      for (int k = 0; k < kMaxQ; ++k)
        if (k < nq_here) acc[k] += static_cast<double>(qr[k][c]) * v;
    }
    if (write_d) {
      const double r = block_reduce_sum(buf, sq);
      if (threadIdx.x == 0) dn2[i] = r;
    }
    for (int k = 0; k < kMaxQ; ++k) {
      if (k >= nq_here) break;
      const double r = block_reduce_sum(buf, acc[k]);
      if (threadIdx.x == 0) T[i * nq_total + q0 + k] = r;
    }
  }
}

at::Tensor sumsq_cuda(const at::Tensor& rows, int64_t c0, int64_t c1) {
  const int64_t n = rows.size(0);
  at::Tensor out = at::empty({n}, rows.options().dtype(at::kDouble));
  if (n == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "segment_gram_sumsq_cuda", [&] {
    sumsq_kernel<scalar_t><<<row_grid(n), kThreads, 0, stream>>>(
        rows.const_data_ptr<scalar_t>(), n, rows.stride(0), c0, c1 - c0, out.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor dist2_cuda(const at::Tensor& A, const at::Tensor& B, const at::Tensor& ii, const at::Tensor& jj,
                      int64_t c0, int64_t c1) {
  const int64_t K = ii.numel();
  at::Tensor out = at::empty({K}, A.options().dtype(at::kDouble));
  if (K == 0) return out;
  at::Tensor iic = ii.contiguous(), jjc = jj.contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "segment_gram_dist2_cuda", [&] {
    dist2_kernel<scalar_t><<<row_grid(K), kThreads, 0, stream>>>(
        A.const_data_ptr<scalar_t>(), A.stride(0), B.const_data_ptr<scalar_t>(), B.stride(0),
        iic.const_data_ptr<int64_t>(), jjc.const_data_ptr<int64_t>(), K, c0, c1 - c0, out.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

void prep_cuda(const at::Tensor& X, int64_t r0, int64_t r1, int64_t p, const at::Tensor& Q, const at::Tensor& qidx,
               int64_t c0, int64_t c1, at::Tensor& D, at::Tensor& dn2, at::Tensor& T) {
  TORCH_CHECK(D.dim() == 3 && D.stride(2) == 1 && dn2.is_contiguous() && T.is_contiguous(),
              "segment_gram: bad workspace");
  const int64_t n = r1 - r0, nq = qidx.numel();
  if (n == 0) return;
  at::Tensor qi = qidx.to(X.device()).contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "segment_gram_prep_cuda", [&] {
    auto launch = [&](auto* dptr) {
      using dst_t = std::remove_pointer_t<decltype(dptr)>;
      // first launch writes D and |d|^2 (and the first refs); later ones only add dot products
      for (int64_t q0 = 0; q0 < std::max<int64_t>(nq, 1); q0 += kMaxQ) {
        const int64_t here = std::min<int64_t>(kMaxQ, nq - q0);
        prep_kernel<scalar_t, dst_t><<<row_grid(n), kThreads, 0, stream>>>(
            X.const_data_ptr<scalar_t>(), X.stride(0), r0, p, Q.const_data_ptr<scalar_t>(), Q.stride(0),
            qi.const_data_ptr<int64_t>(), q0, std::max<int64_t>(here, 0), nq, c0, c1 - c0, dptr, D.size(2),
            D.stride(0), D.stride(1), dn2.data_ptr<double>(), T.data_ptr<double>(), q0 == 0, n);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    };
    if (D.scalar_type() == at::kFloat) {
      launch(D.data_ptr<float>());
    } else {
      launch(D.data_ptr<double>());
    }
  });
}

// S (fp64, a strided view) += the chunk products summed in fp64 (a fixed reduction: deterministic).
void acc_cuda(at::Tensor& S, const at::Tensor& T) { S.add_(T.sum(0, /*keepdim=*/false, at::kDouble)); }

at::Tensor segment_gram_cuda(const at::Tensor& X, const at::Tensor& offsets, const std::optional<at::Tensor>& Y) {
  c10::cuda::CUDAGuard guard(X.device());
  static const gram::GramKernels kern{sumsq_cuda, dist2_cuda, prep_cuda, acc_cuda};
  return gram::segment_gram(X, offsets, Y, kern);
}

}  // namespace

TORCH_LIBRARY_IMPL(pylandscape, CUDA, m) {
  m.impl("segment_gram", &segment_gram_cuda);
}

}  // namespace pylandscape
