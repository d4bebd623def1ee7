// interpolate and combine on CUDA: grid-stride elementwise loops with the float64 formulas of interp.h,
// so results equal the CPU kernels bit for bit (the combine sum runs over m in the same order).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "pylandscape/checks.h"
#include "pylandscape/interp.h"

namespace pylandscape {
namespace cuda {
namespace {

constexpr int kThreads = 256;

unsigned grid_for(int64_t n) { return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, 1 << 16))); }

template <typename T>
__global__ void __launch_bounds__(kThreads) lerp_kernel(const T* __restrict__ a, const T* __restrict__ b,
                                                        const double* __restrict__ alphas, T* __restrict__ out,
                                                        int64_t K, int64_t P) {
  const int64_t n = K * P;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t k = i / P, p = i - k * P;
    out[i] = static_cast<T>(lerp_exact(static_cast<double>(a[p]), static_cast<double>(b[p]), alphas[k]));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) combine_kernel(const T* __restrict__ W, const double* __restrict__ c,
                                                           T* __restrict__ out, int64_t K, int64_t M, int64_t P) {
  const int64_t n = K * P;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t k = i / P, p = i - k * P;
    double acc = 0.0;
    for (int64_t m = 0; m < M; ++m) acc = combine_step(acc, c[k * M + m], static_cast<double>(W[m * P + p]));
    out[i] = static_cast<T>(acc);
  }
}

at::Tensor interpolate_cuda(const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& alphas) {
  check_float(a_in, "a");
  TORCH_CHECK_VALUE(a_in.scalar_type() == b_in.scalar_type(), "pylandscape: a and b must have one dtype");
  TORCH_CHECK_VALUE(a_in.dim() == 1 && b_in.sizes() == a_in.sizes(), "pylandscape: a and b must be [P], got ",
                    a_in.sizes(), " and ", b_in.sizes());
  TORCH_CHECK_VALUE(a_in.is_cuda() && b_in.device() == a_in.device(), "pylandscape: a and b must be on one CUDA device");
  TORCH_CHECK_VALUE(alphas.dim() == 1, "pylandscape: alphas must be [K], got ", alphas.sizes());
  c10::cuda::CUDAGuard guard(a_in.device());
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const at::Tensor al = alphas.to(a.device(), at::kDouble).contiguous();
  const int64_t K = al.numel(), P = a.numel();
  at::Tensor out = at::empty({K, P}, a.options());
  if (K * P == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (a.scalar_type() == at::kFloat)
    lerp_kernel<float><<<grid_for(K * P), kThreads, 0, stream>>>(a.data_ptr<float>(), b.data_ptr<float>(),
                                                                 al.data_ptr<double>(), out.data_ptr<float>(), K, P);
  else
    lerp_kernel<double><<<grid_for(K * P), kThreads, 0, stream>>>(a.data_ptr<double>(), b.data_ptr<double>(),
                                                                  al.data_ptr<double>(), out.data_ptr<double>(), K, P);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor combine_cuda(const at::Tensor& W_in, const at::Tensor& coeffs) {
  check_float(W_in, "W");
  TORCH_CHECK_VALUE(W_in.dim() == 2, "pylandscape: W must be [M, P], got ", W_in.sizes());
  TORCH_CHECK_VALUE(W_in.is_cuda(), "pylandscape: W must be a CUDA tensor here, got ", W_in.device());
  TORCH_CHECK_VALUE(coeffs.dim() == 2 && coeffs.size(1) == W_in.size(0), "pylandscape: coeffs must be [K, M] with M = ",
                    W_in.size(0), ", got ", coeffs.sizes());
  c10::cuda::CUDAGuard guard(W_in.device());
  const at::Tensor W = W_in.contiguous();
  const at::Tensor c = coeffs.to(W.device(), at::kDouble).contiguous();
  const int64_t M = W.size(0), P = W.size(1), K = c.size(0);
  at::Tensor out = at::empty({K, P}, W.options());
  if (K * P == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (W.scalar_type() == at::kFloat)
    combine_kernel<float><<<grid_for(K * P), kThreads, 0, stream>>>(W.data_ptr<float>(), c.data_ptr<double>(),
                                                                    out.data_ptr<float>(), K, M, P);
  else
    combine_kernel<double><<<grid_for(K * P), kThreads, 0, stream>>>(W.data_ptr<double>(), c.data_ptr<double>(),
                                                                     out.data_ptr<double>(), K, M, P);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace pylandscape

TORCH_LIBRARY_IMPL(pylandscape, CUDA, m) {
  m.impl("interpolate", &pylandscape::cuda::interpolate_cuda);
  m.impl("combine", &pylandscape::cuda::combine_cuda);
}
