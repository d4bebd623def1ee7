// Layerwise Gaussian perturbation on CUDA: statistics (stats.cu), a host-side check of the [L, 3]
// statistics (the errors must name the segment before anything is written), then one launch for the
// noise of all K copies. Each thread computes one Philox counter (4 normals) with exactly the
// operations of the CPU kernel (normal.h), so the noise is bit-identical to the CPU.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "pylandscape/checks.h"
#include "pylandscape/cuda_kernels.h"
#include "pylandscape/normal.h"
#include "pylandscape/sigma.h"
#include "pylandscape/stats.h"

namespace pylandscape {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// Task t = k * nch + c: chunk c of copy k. Blocks stride over tasks, threads over the chunk's counters.
// w == out (in place) is allowed; every element is read and written by the same thread.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    noise_kernel(const T* w, T* out, int64_t P, const int64_t* __restrict__ table, int64_t nch,
                 const double* __restrict__ sig, int64_t L, const int64_t* __restrict__ seeds, int64_t K,
                 uint64_t offset) {
  const int64_t ntasks = K * nch;
  for (int64_t t = blockIdx.x; t < ntasks; t += gridDim.x) {
    const int64_t k = t / nch, c = t % nch;
    const int64_t segment = table[3 * c], begin = table[3 * c + 1], end = table[3 * c + 2];
    const double s = sig[k * L + segment];
    T* o = out + k * P;
    if (s == 0.0) {
      if (o != w)
        for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) o[i] = w[i];
      continue;
    }
    const T sigma = static_cast<T>(s);
    const uint64_t seed = static_cast<uint64_t>(seeds[k]);
    for (int64_t cc = begin / 4 + threadIdx.x; cc <= (end - 1) / 4; cc += kThreads) {
      float z[4];
      philox_normal4(seed, offset, static_cast<uint64_t>(cc), z);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t e = 4 * cc + j;
        if (e >= begin && e < end) o[e] = add_noise(w[e], sigma, z[j]);
      }
    }
  }
}

void perturb_into(const at::Tensor& flat, const at::Tensor& offs, const at::Tensor& scales,
                  const at::Tensor& seeds_cpu, int64_t offset, int64_t mode, const at::Tensor& out) {
  const int64_t L = offs.numel() - 1, P = flat.numel(), K = seeds_cpu.numel();
  TORCH_CHECK_VALUE(scales.dim() == 2 && scales.size(0) == K && scales.size(1) == L,
                    "pylandscape: scales must be [K, L] = [", K, ", ", L, "], got ", scales.sizes());
  const at::Tensor sc = host_double(scales);
  at::Tensor table;
  const int64_t nch = upload_chunks(offs.data_ptr<int64_t>(), L, flat.device(), table);
  const at::Tensor stats = layer_stats_device(flat, offs, table, nch).cpu();  // synchronises; [L, 3] only
  const std::vector<double> sig = layer_sigmas(stats.data_ptr<double>(), offs.data_ptr<int64_t>(), L,
                                               sc.data_ptr<double>(), K, mode);
  if (K == 0 || nch == 0) return;
  const at::Tensor sig_d = at::tensor(sig, at::TensorOptions().dtype(at::kDouble)).to(flat.device());
  const at::Tensor seeds_d = seeds_cpu.to(flat.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  // K * nch > 0 here (checked above): a grid of 1 .. 2^20 blocks, grid-stride over the (copy, chunk) tasks
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(K * nch, 1 << 20));
  if (flat.scalar_type() == at::kFloat)
    noise_kernel<float><<<grid, kThreads, 0, stream>>>(flat.data_ptr<float>(), out.data_ptr<float>(), P,
                                                       table.data_ptr<int64_t>(), nch, sig_d.data_ptr<double>(), L,
                                                       seeds_d.data_ptr<int64_t>(), K, static_cast<uint64_t>(offset));
  else
    noise_kernel<double><<<grid, kThreads, 0, stream>>>(flat.data_ptr<double>(), out.data_ptr<double>(), P,
                                                        table.data_ptr<int64_t>(), nch, sig_d.data_ptr<double>(), L,
                                                        seeds_d.data_ptr<int64_t>(), K, static_cast<uint64_t>(offset));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void perturb_out_cuda(const at::Tensor& flat_in, const at::Tensor& offsets, const at::Tensor& scales,
                      const at::Tensor& seeds, int64_t offset, int64_t mode, at::Tensor& out) {
  check_float(flat_in, "flat");
  TORCH_CHECK_VALUE(flat_in.dim() == 1, "pylandscape: flat must be 1-D [P], got ", flat_in.sizes());
  TORCH_CHECK_VALUE(flat_in.is_cuda(), "pylandscape: flat must be a CUDA tensor here, got ", flat_in.device());
  TORCH_CHECK_VALUE(seeds.scalar_type() == at::kLong && seeds.dim() == 1, "pylandscape: seeds must be int64 [K]");
  c10::cuda::CUDAGuard guard(flat_in.device());
  const at::Tensor flat = flat_in.contiguous();
  const at::Tensor offs = check_offsets(offsets, flat.numel());
  const at::Tensor sd = seeds.to(at::kCPU).contiguous();
  check_perturb_out(out, flat_in, sd.numel());
  perturb_into(flat, offs, scales, sd, offset, mode, out);
}

at::Tensor perturb_cuda(const at::Tensor& flat, const at::Tensor& offsets, const at::Tensor& scales,
                        const at::Tensor& seeds, int64_t offset, int64_t mode) {
  at::Tensor out = at::empty({seeds.numel(), flat.numel()}, flat.options());  // shapes checked by perturb_out
  perturb_out_cuda(flat, offsets, scales, seeds, offset, mode, out);
  return out;
}

void perturb_inplace_cuda(at::Tensor& flat, const at::Tensor& offsets, const at::Tensor& scales, int64_t seed,
                          int64_t offset, int64_t mode) {
  check_float(flat, "flat");
  TORCH_CHECK_VALUE(flat.dim() == 1, "pylandscape: flat must be 1-D [P], got ", flat.sizes());
  TORCH_CHECK_VALUE(flat.is_cuda(), "pylandscape: flat must be a CUDA tensor here, got ", flat.device());
  TORCH_CHECK_VALUE(flat.is_contiguous(), "pylandscape: perturb_ needs a contiguous flat");
  c10::cuda::CUDAGuard guard(flat.device());
  const at::Tensor offs = check_offsets(offsets, flat.numel());
  const at::Tensor sd = at::tensor({seed}, at::TensorOptions().dtype(at::kLong));
  perturb_into(flat, offs, scales.reshape({1, -1}), sd, offset, mode, flat);
}

}  // namespace
}  // namespace cuda
}  // namespace pylandscape

TORCH_LIBRARY_IMPL(pylandscape, CUDA, m) {
  m.impl("perturb", &pylandscape::cuda::perturb_cuda);
  m.impl("perturb_", &pylandscape::cuda::perturb_inplace_cuda);
  m.impl("perturb_out", &pylandscape::cuda::perturb_out_cuda);
}
