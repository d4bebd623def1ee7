// layer_stats on CUDA: kStatLanes threads reduce one chunk in the lane order of stats.h (the same chunks and
// the same additions as the CPU kernel, so the same bits), then one thread per segment merges its chunks in
// order.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "pylandscape/checks.h"
#include "pylandscape/cuda_kernels.h"
#include "pylandscape/stats.h"

namespace pylandscape {
namespace cuda {
namespace {

constexpr int kThreads = 256;

constexpr int kChunksPerBlock = kThreads / kStatLanes;

// kStatLanes threads per chunk, one per lane, each adding its lane in order; the chunk's first thread then
// adds the lanes and the tail in the order of stats.h: the CPU kernel's bits exactly.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    chunk_moments_kernel(const T* __restrict__ x, const int64_t* __restrict__ table, int64_t nch, Moments* part) {
  __shared__ double sh[3][kThreads];
  const int lane = threadIdx.x % kStatLanes, slot = threadIdx.x / kStatLanes;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kChunksPerBlock; base < nch;
       base += static_cast<int64_t>(gridDim.x) * kChunksPerBlock) {
    const int64_t c = base + slot;
    double s1 = 0, s2 = 0, sa = 0, K = 0;
    int64_t begin = 0, n = 0;
    if (c < nch) {
      begin = table[3 * c + 1];
      n = table[3 * c + 2] - begin;
      K = static_cast<double>(x[begin]);
      for (int64_t i = lane; i + (kStatLanes - lane) <= n; i += kStatLanes)
        lane_step(s1, s2, sa, static_cast<double>(x[begin + i]), K);
    }
    sh[0][threadIdx.x] = s1;
    sh[1][threadIdx.x] = s2;
    sh[2][threadIdx.x] = sa;
    __syncthreads();
    if (c < nch && lane == 0) {
      const int o = slot * kStatLanes;
      part[c] = chunk_finish(&sh[0][o], &sh[1][o], &sh[2][o], x + begin, n, K);
    }
    __syncthreads();  // sh is reused by the next chunks
  }
}

__global__ void merge_kernel(const Moments* __restrict__ part, const int64_t* __restrict__ first, int64_t L,
                             double* __restrict__ out) {
  for (int64_t l = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; l < L;
       l += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    Moments m;
    for (int64_t i = first[l]; i < first[l + 1]; ++i) moments_merge(m, part[i]);
    moments_finish(m, out + 3 * l);
  }
}

}  // namespace

int64_t upload_chunks(const int64_t* offs, int64_t L, const at::Device& device, at::Tensor& table) {
  std::vector<int64_t> first;
  const std::vector<Chunk> chunks = make_chunks(offs, L, &first);
  const int64_t nch = static_cast<int64_t>(chunks.size());
  at::Tensor host = at::empty({3 * nch + L + 1}, at::TensorOptions().dtype(at::kLong));
  int64_t* h = host.data_ptr<int64_t>();
  for (int64_t i = 0; i < nch; ++i) {
    h[3 * i] = chunks[i].segment;
    h[3 * i + 1] = chunks[i].begin;
    h[3 * i + 2] = chunks[i].end;
  }
  std::copy(first.begin(), first.end(), h + 3 * nch);
  table = host.to(device);  // small; a synchronous copy on the current stream
  return nch;
}

at::Tensor layer_stats_device(const at::Tensor& flat, const at::Tensor& offs, const at::Tensor& table, int64_t nch) {
  const int64_t L = offs.numel() - 1;
  at::Tensor out = at::empty({L, 3}, flat.options().dtype(at::kDouble));
  if (L == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  static_assert(sizeof(Moments) == 4 * sizeof(double), "Moments is four doubles");
  at::Tensor part = at::empty({std::max<int64_t>(nch, 1) * 4}, flat.options().dtype(at::kDouble));
  Moments* pp = reinterpret_cast<Moments*>(part.data_ptr<double>());
  const int64_t* tp = table.data_ptr<int64_t>();
  if (nch > 0) {
    const unsigned grid = static_cast<unsigned>(std::min<int64_t>((nch + kChunksPerBlock - 1) / kChunksPerBlock, 65536));
    if (flat.scalar_type() == at::kFloat)
      chunk_moments_kernel<float><<<grid, kThreads, 0, stream>>>(flat.data_ptr<float>(), tp, nch, pp);
    else
      chunk_moments_kernel<double><<<grid, kThreads, 0, stream>>>(flat.data_ptr<double>(), tp, nch, pp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const unsigned mgrid = static_cast<unsigned>(std::min<int64_t>((L + 127) / 128, 65536));
  merge_kernel<<<mgrid, 128, 0, stream>>>(pp, tp + 3 * nch, L, out.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

namespace {

at::Tensor layer_stats_cuda(const at::Tensor& flat_in, const at::Tensor& offsets) {
  check_float(flat_in, "flat");
  TORCH_CHECK_VALUE(flat_in.dim() == 1, "pylandscape: flat must be 1-D [P], got ", flat_in.sizes());
  TORCH_CHECK_VALUE(flat_in.is_cuda(), "pylandscape: flat must be a CUDA tensor here, got ", flat_in.device());
  c10::cuda::CUDAGuard guard(flat_in.device());
  const at::Tensor flat = flat_in.contiguous();
  const at::Tensor offs = check_offsets(offsets, flat.numel());
  at::Tensor table;
  const int64_t nch = upload_chunks(offs.data_ptr<int64_t>(), offs.numel() - 1, flat.device(), table);
  return layer_stats_device(flat, offs, table, nch);
}

}  // namespace
}  // namespace cuda
}  // namespace pylandscape

TORCH_LIBRARY_IMPL(pylandscape, CUDA, m) { m.impl("layer_stats", &pylandscape::cuda::layer_stats_cuda); }
