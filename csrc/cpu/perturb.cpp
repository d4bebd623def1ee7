// Layerwise Gaussian perturbation on the CPU: a statistics pass, then a noise pass that generates
// Philox normals 64 at a time (16 counters side by side, a layout the compiler turns into SIMD code)
// and adds sigma_l * z to each element. The noise of element e depends only on (seed, offset, e)
// (csrc/include/pylandscape/normal.h), never on threads or blocking.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "pylandscape/checks.h"
#include "pylandscape/cpu_kernels.h"
#include "pylandscape/normal.h"
#include "pylandscape/sigma.h"
#include "pylandscape/stats.h"

namespace pylandscape {
namespace cpu {
namespace {

constexpr int kLanes = 16;           // Philox counters per block
constexpr int kBlock = 4 * kLanes;   // normals per block

// Normals of elements 4*c0 .. 4*c0 + 63 into z (same values as philox_normal4, lane by lane).
inline void normal_block(uint64_t seed, uint64_t offset, uint64_t c0, float* z) {
  uint32_t x0[kLanes], x1[kLanes], x2[kLanes], x3[kLanes];
  for (int j = 0; j < kLanes; ++j) {
    const uint64_t c = c0 + static_cast<uint64_t>(j);
    x0[j] = static_cast<uint32_t>(c);
    x1[j] = static_cast<uint32_t>(c >> 32);
    x2[j] = static_cast<uint32_t>(offset);
    x3[j] = static_cast<uint32_t>(offset >> 32);
  }
  // Lane-outer, rounds unrolled: the compiler vectorises over the 16 lanes (round-outer loops do not).
  const uint32_t K0 = static_cast<uint32_t>(seed), K1 = static_cast<uint32_t>(seed >> 32);
  for (int j = 0; j < kLanes; ++j) {
    uint32_t c0 = x0[j], c1 = x1[j], c2 = x2[j], c3 = x3[j], k0 = K0, k1 = K1;
#pragma GCC unroll 10
    for (int r = 0; r < 10; ++r) {
      philox_round(c0, c1, c2, c3, k0, k1);
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    x0[j] = c0;
    x1[j] = c1;
    x2[j] = c2;
    x3[j] = c3;
  }
  float r01[kLanes], r23[kLanes], s01[kLanes], c01[kLanes], s23[kLanes], c23[kLanes];
  for (int j = 0; j < kLanes; ++j) {
    r01[j] = normal_radius(x0[j]);
    r23[j] = normal_radius(x2[j]);
  }
  for (int j = 0; j < kLanes; ++j) {
    sincos_turn24(x1[j], s01[j], c01[j]);
    sincos_turn24(x3[j], s23[j], c23[j]);
  }
  for (int j = 0; j < kLanes; ++j) {
    z[4 * j + 0] = fp::mul(r01[j], c01[j]);
    z[4 * j + 1] = fp::mul(r01[j], s01[j]);
    z[4 * j + 2] = fp::mul(r23[j], c23[j]);
    z[4 * j + 3] = fp::mul(r23[j], s23[j]);
  }
}

// out[i] = w[i] + sigma * z_i for i in [begin, end) (global element indices; w and out point at
// element 0). w == nullptr: out[i] = z_i. w == out is allowed (in place).
template <typename T>
inline void noise_range_impl(const T* w, T* out, int64_t begin, int64_t end, uint64_t seed, uint64_t offset,
                             T sigma) {
  alignas(64) float z[kBlock];
  for (int64_t b = begin - begin % kBlock; b < end; b += kBlock) {
    normal_block(seed, offset, static_cast<uint64_t>(b) / 4, z);
    const int64_t lo = std::max(begin, b), hi = std::min(end, b + kBlock);
    T* o = out + b;
    if (w == nullptr) {
      for (int64_t i = lo - b; i < hi - b; ++i) o[i] = static_cast<T>(z[i]);
    } else if (w == out) {
      for (int64_t i = lo - b; i < hi - b; ++i) o[i] = add_noise(o[i], sigma, z[i]);
    } else {
      const T* x = w + b;
      for (int64_t i = lo - b; i < hi - b; ++i) o[i] = add_noise(x[i], sigma, z[i]);
    }
  }
}

PLK_MULTIVERSION void noise_range_f32(const float* w, float* out, int64_t begin, int64_t end, uint64_t seed,
                                      uint64_t offset, float sigma) {
  noise_range_impl(w, out, begin, end, seed, offset, sigma);
}
PLK_MULTIVERSION void noise_range_f64(const double* w, double* out, int64_t begin, int64_t end, uint64_t seed,
                                      uint64_t offset, double sigma) {
  noise_range_impl(w, out, begin, end, seed, offset, sigma);
}

// One (chunk, copy) task: noise, or a plain copy when sigma is 0 (the layer stays bit-for-bit).
void noise_task(const at::Tensor& flat, void* out_base, const Chunk& c, uint64_t seed, uint64_t offset,
                double sigma) {
  const bool f32 = flat.scalar_type() == at::kFloat;
  const size_t es = f32 ? sizeof(float) : sizeof(double);
  const char* w = static_cast<const char*>(flat.data_ptr());
  char* out = static_cast<char*>(out_base);
  if (sigma == 0.0) {
    if (w != out) std::memcpy(out + c.begin * es, w + c.begin * es, static_cast<size_t>(c.end - c.begin) * es);
    return;
  }
  if (f32)
    noise_range_f32(reinterpret_cast<const float*>(w), reinterpret_cast<float*>(out), c.begin, c.end, seed, offset,
                    static_cast<float>(sigma));
  else
    noise_range_f64(reinterpret_cast<const double*>(w), reinterpret_cast<double*>(out), c.begin, c.end, seed,
                    offset, sigma);
}

// Shared by perturb and perturb_: stats, sigma checks, then K noise passes into out (K rows of P).
void perturb_into(const at::Tensor& flat, const at::Tensor& offs, const at::Tensor& scales, const int64_t* seeds,
                  int64_t K, int64_t offset, int64_t mode, void* out_base) {
  const int64_t L = offs.numel() - 1;
  const int64_t P = flat.numel();
  const int64_t* o = offs.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(scales.dim() == 2 && scales.size(0) == K && scales.size(1) == L,
                    "pylandscape: scales must be [K, L] = [", K, ", ", L, "], got ", scales.sizes());
  const at::Tensor sc = host_double(scales);
  const at::Tensor stats = stats_tensor(layer_moments(flat, o, L));
  const std::vector<double> sig = layer_sigmas(stats.data_ptr<double>(), o, L, sc.data_ptr<double>(), K, mode);
  const std::vector<Chunk> chunks = make_chunks(o, L);
  const int64_t nch = static_cast<int64_t>(chunks.size());
  const size_t es = flat.element_size();
  at::parallel_for(0, K * nch, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t k = t / nch;
      const Chunk& c = chunks[t % nch];
      char* row = static_cast<char*>(out_base) + static_cast<size_t>(k * P) * es;
      noise_task(flat, row, c, static_cast<uint64_t>(seeds[k]), static_cast<uint64_t>(offset), sig[k * L + c.layer]);
    }
  });
}

at::Tensor perturb_cpu(const at::Tensor& flat_in, const at::Tensor& offsets, const at::Tensor& scales,
                       const at::Tensor& seeds, int64_t offset, int64_t mode) {
  check_float(flat_in, "flat");
  TORCH_CHECK_VALUE(flat_in.dim() == 1, "pylandscape: flat must be 1-D [P], got ", flat_in.sizes());
  TORCH_CHECK_VALUE(seeds.scalar_type() == at::kLong && seeds.dim() == 1, "pylandscape: seeds must be int64 [K]");
  const at::Tensor flat = flat_in.contiguous();
  const at::Tensor offs = check_offsets(offsets, flat.numel());
  const at::Tensor sd = seeds.to(at::kCPU).contiguous();
  const int64_t K = sd.numel();
  at::Tensor out = at::empty({K, flat.numel()}, flat.options());
  perturb_into(flat, offs, scales, sd.data_ptr<int64_t>(), K, offset, mode, out.data_ptr());
  return out;
}

void perturb_inplace_cpu(at::Tensor& flat, const at::Tensor& offsets, const at::Tensor& scales, int64_t seed,
                         int64_t offset, int64_t mode) {
  check_float(flat, "flat");
  TORCH_CHECK_VALUE(flat.dim() == 1, "pylandscape: flat must be 1-D [P], got ", flat.sizes());
  TORCH_CHECK_VALUE(flat.is_contiguous(), "pylandscape: perturb_ needs a contiguous flat");
  const at::Tensor offs = check_offsets(offsets, flat.numel());
  const int64_t s = seed;
  perturb_into(flat, offs, scales.reshape({1, -1}), &s, 1, offset, mode, flat.data_ptr());
}

at::Tensor philox_normal_cpu(int64_t n, int64_t seed, int64_t offset, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(n >= 0, "pylandscape: philox_normal needs n >= 0, got ", n);
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kDouble, "pylandscape: philox_normal dtype must be "
                    "float32 or float64, got ", dtype);
  at::Tensor out = at::empty({n}, at::TensorOptions().dtype(dtype));
  const int64_t nb = (n + kChunk - 1) / kChunk;
  at::parallel_for(0, nb, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t lo = i * kChunk, hi = std::min(n, lo + kChunk);
      if (dtype == at::kFloat)
        noise_range_f32(nullptr, out.data_ptr<float>(), lo, hi, static_cast<uint64_t>(seed),
                        static_cast<uint64_t>(offset), 1.0f);
      else
        noise_range_f64(nullptr, out.data_ptr<double>(), lo, hi, static_cast<uint64_t>(seed),
                        static_cast<uint64_t>(offset), 1.0);
    }
  });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace pylandscape

TORCH_LIBRARY_IMPL(pylandscape, CPU, m) {
  m.impl("perturb", &pylandscape::cpu::perturb_cpu);
  m.impl("perturb_", &pylandscape::cpu::perturb_inplace_cpu);
}

// No tensor arguments, so no backend key to dispatch on: one kernel for every key (it returns a CPU tensor).
TORCH_LIBRARY_IMPL(pylandscape, CompositeExplicitAutograd, m) {
  m.impl("philox_normal", &pylandscape::cpu::philox_normal_cpu);
}
