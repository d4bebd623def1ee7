// Layerwise Gaussian perturbation on the CPU: a statistics pass, then a noise pass that generates
// Philox normals 64 at a time (16 counters side by side: explicit AVX-512 on x86-64-v4 CPUs, else a layout
// the compiler turns into SIMD code)
// and adds sigma_l * z to each element. The noise of element e depends only on (seed, offset, e)
// (csrc/include/pylandscape/normal.h), never on threads or blocking.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "pylandscape/macros.h"
#include "pylandscape/threads.h"
#if defined(PLK_MULTIVERSION_ON) && !defined(__clang__)
#include <immintrin.h>
#endif

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

// Philox words of counters c0 .. c0 + 15 (c0 a multiple of 16), generic C++: lane-outer with the rounds
// unrolled, which the compiler vectorises over the 16 lanes (round-outer loops do not).
PLK_ALWAYS_INLINE void philox_block(uint64_t seed, uint64_t offset, uint64_t c0, uint32_t* x0, uint32_t* x1,
                                    uint32_t* x2, uint32_t* x3) {
  const uint32_t K0 = static_cast<uint32_t>(seed), K1 = static_cast<uint32_t>(seed >> 32);
  for (int j = 0; j < kLanes; ++j) {
    const uint64_t c = c0 + static_cast<uint64_t>(j);
    uint32_t a = static_cast<uint32_t>(c), b = static_cast<uint32_t>(c >> 32);
    uint32_t d2 = static_cast<uint32_t>(offset), d3 = static_cast<uint32_t>(offset >> 32), k0 = K0, k1 = K1;
#pragma GCC unroll 10
    for (int r = 0; r < 10; ++r) {
      philox_round(a, b, d2, d3, k0, k1);
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    x0[j] = a;
    x1[j] = b;
    x2[j] = d2;
    x3[j] = d3;
  }
}

// Box-Muller on 16 Philox outputs: normals of elements 4*c0 .. 4*c0 + 63 into z (the same values as
// philox_normal4, lane by lane).
PLK_ALWAYS_INLINE void box_muller_block(const uint32_t* x0, const uint32_t* x1, const uint32_t* x2,
                                        const uint32_t* x3, float* z) {
  alignas(64) float r01[kLanes], r23[kLanes], s01[kLanes], c01[kLanes], s23[kLanes], c23[kLanes];
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

// Elements [lo, hi) of the block starting at element b: out = w + sigma * z (w == nullptr: out = z;
// w == out allowed: in place). Each output element is written once, nothing is zero-filled.
template <typename T>
PLK_ALWAYS_INLINE void apply_block(const T* w, T* out, int64_t b, int64_t lo, int64_t hi, T sigma, const float* z) {
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

// out[i] = w[i] + sigma * z_i for i in [begin, end) (global element indices; w and out point at
// element 0). Blocks start at multiples of 64 elements, so counters are multiples of 16.
template <typename T>
PLK_ALWAYS_INLINE void noise_range_impl(const T* w, T* out, int64_t begin, int64_t end, uint64_t seed,
                                        uint64_t offset, T sigma) {
  alignas(64) float z[kBlock];
  alignas(64) uint32_t x0[kLanes], x1[kLanes], x2[kLanes], x3[kLanes];
  for (int64_t b = begin - begin % kBlock; b < end; b += kBlock) {
    philox_block(seed, offset, static_cast<uint64_t>(b) / 4, x0, x1, x2, x3);
    box_muller_block(x0, x1, x2, x3, z);
    apply_block(w, out, b, std::max(begin, b), std::min(end, b + kBlock), sigma, z);
  }
}

PLK_MULTIVERSION void noise_range_f32_mv(const float* w, float* out, int64_t begin, int64_t end, uint64_t seed,
                                         uint64_t offset, float sigma) {
  noise_range_impl(w, out, begin, end, seed, offset, sigma);
}
PLK_MULTIVERSION void noise_range_f64_mv(const double* w, double* out, int64_t begin, int64_t end, uint64_t seed,
                                         uint64_t offset, double sigma) {
  noise_range_impl(w, out, begin, end, seed, offset, sigma);
}

#if defined(PLK_MULTIVERSION_ON) && !defined(__clang__)
// AVX-512 Philox with explicit intrinsics: the 32x32 -> 64-bit products of the 16 lanes come from two
// vpmuludq (even and odd lanes) and two blends, with no widening/narrowing shuffles. The compiler's
// own vectorisation of philox_block needs about twice the instructions (the noise pass ran ~1.7x slower,
// measured). Integer arithmetic, so the words are the same bits as philox_block's.
#define PLK_TARGET_V4 __attribute__((target("arch=x86-64-v4")))
PLK_TARGET_V4 inline __attribute__((always_inline)) void mulhilo16(__m512i m, __m512i a, __m512i& hi, __m512i& lo) {
  const __m512i pe = _mm512_mul_epu32(a, m);
  const __m512i po = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(pe, 32), po);
  lo = _mm512_mask_blend_epi32(0xAAAA, pe, _mm512_slli_epi64(po, 32));
}

PLK_TARGET_V4 inline __attribute__((always_inline)) void philox_block_v4(uint64_t seed, uint64_t offset, uint64_t c0,
                                                                         uint32_t* x0, uint32_t* x1, uint32_t* x2,
                                                                         uint32_t* x3) {
  // c0 is a multiple of 16, so c0 + j (j < 16) never carries out of the low word.
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512i a = _mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(c0))));
  __m512i b = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(c0 >> 32)));
  __m512i c = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset)));
  __m512i d = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset >> 32)));
  const __m512i m0 = _mm512_set1_epi64(kPhiloxM0), m1 = _mm512_set1_epi64(kPhiloxM1);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma GCC unroll 10
  for (int r = 0; r < 10; ++r) {
    __m512i hi0, lo0, hi1, lo1;
    mulhilo16(m0, a, hi0, lo0);
    mulhilo16(m1, c, hi1, lo1);
    const __m512i n0 = _mm512_xor_si512(_mm512_xor_si512(hi1, b), _mm512_set1_epi32(static_cast<int>(k0)));
    const __m512i n2 = _mm512_xor_si512(_mm512_xor_si512(hi0, d), _mm512_set1_epi32(static_cast<int>(k1)));
    a = n0;
    b = lo1;
    c = n2;
    d = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  _mm512_store_si512(x0, a);
  _mm512_store_si512(x1, b);
  _mm512_store_si512(x2, c);
  _mm512_store_si512(x3, d);
}

template <typename T>
PLK_TARGET_V4 void noise_range_v4(const T* w, T* out, int64_t begin, int64_t end, uint64_t seed, uint64_t offset,
                                  T sigma) {
  alignas(64) float z[kBlock];
  alignas(64) uint32_t x0[kLanes], x1[kLanes], x2[kLanes], x3[kLanes];
  for (int64_t b = begin - begin % kBlock; b < end; b += kBlock) {
    philox_block_v4(seed, offset, static_cast<uint64_t>(b) / 4, x0, x1, x2, x3);
    box_muller_block(x0, x1, x2, x3, z);
    apply_block(w, out, b, std::max(begin, b), std::min(end, b + kBlock), sigma, z);
  }
}

bool cpu_has_v4() {
  static const bool v4 = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("x86-64-v4") != 0;
  }();
  return v4;
}
#define PLK_HAVE_V4_PATH 1
#endif

void noise_range_f32(const float* w, float* out, int64_t begin, int64_t end, uint64_t seed, uint64_t offset,
                     float sigma) {
#ifdef PLK_HAVE_V4_PATH
  if (cpu_has_v4()) return noise_range_v4<float>(w, out, begin, end, seed, offset, sigma);
#endif
  noise_range_f32_mv(w, out, begin, end, seed, offset, sigma);
}
void noise_range_f64(const double* w, double* out, int64_t begin, int64_t end, uint64_t seed, uint64_t offset,
                     double sigma) {
#ifdef PLK_HAVE_V4_PATH
  if (cpu_has_v4()) return noise_range_v4<double>(w, out, begin, end, seed, offset, sigma);
#endif
  noise_range_f64_mv(w, out, begin, end, seed, offset, sigma);
}

// One (chunk, copy) task: noise, or a plain copy when sigma is 0 (the segment stays bit-for-bit).
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
  // Tasks are (copy, chunk) pairs, copy-major; grain 4 (up to 64K elements) so that a tiny problem does
  // not pay for a parallel region. The noise of an element does not depend on the split.
  at::parallel_for(0, K * nch, 4, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t k = t / nch;
      const Chunk& c = chunks[t % nch];
      char* row = static_cast<char*>(out_base) + static_cast<size_t>(k * P) * es;
      noise_task(flat, row, c, static_cast<uint64_t>(seeds[k]), static_cast<uint64_t>(offset), sig[k * L + c.segment]);
    }
  });
}

// A large fresh output is first-touched page by page: at K = 64 the 4 KiB page faults (kernel zeroing
// included) cost about as much as generating the noise (~30 ms for 48 MB, measured). Asking for
// transparent huge pages on it (advisory, like c10's THP_MEM_ALLOC_ENABLE) cuts that to a few ms.
void advise_huge_pages(void* p, size_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  if (nbytes < 4 * kHuge) return;
  const uintptr_t a = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t e = (reinterpret_cast<uintptr_t>(p) + nbytes) & ~(kHuge - 1);
  if (e > a) (void)madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);  // a hint: failure is fine
#else
  (void)p;
  (void)nbytes;
#endif
}

void perturb_out_cpu(const at::Tensor& flat_in, const at::Tensor& offsets, const at::Tensor& scales,
                     const at::Tensor& seeds, int64_t offset, int64_t mode, at::Tensor& out) {
  ThreadsForCall threads;  // nothing waits on a core another process keeps busy
  check_float(flat_in, "flat");
  TORCH_CHECK_VALUE(flat_in.dim() == 1, "pylandscape: flat must be 1-D [P], got ", flat_in.sizes());
  TORCH_CHECK_VALUE(seeds.scalar_type() == at::kLong && seeds.dim() == 1, "pylandscape: seeds must be int64 [K]");
  const at::Tensor flat = flat_in.contiguous();
  const at::Tensor offs = check_offsets(offsets, flat.numel());
  const at::Tensor sd = seeds.to(at::kCPU).contiguous();
  check_perturb_out(out, flat_in, sd.numel());
  perturb_into(flat, offs, scales, sd.data_ptr<int64_t>(), sd.numel(), offset, mode, out.data_ptr());
}

at::Tensor perturb_cpu(const at::Tensor& flat, const at::Tensor& offsets, const at::Tensor& scales,
                       const at::Tensor& seeds, int64_t offset, int64_t mode) {
  ThreadsForCall threads;  // nothing waits on a core another process keeps busy
  at::Tensor out = at::empty({seeds.numel(), flat.numel()}, flat.options());  // shapes checked by perturb_out
  advise_huge_pages(out.data_ptr(), out.nbytes());
  perturb_out_cpu(flat, offsets, scales, seeds, offset, mode, out);
  return out;
}

void perturb_inplace_cpu(at::Tensor& flat, const at::Tensor& offsets, const at::Tensor& scales, int64_t seed,
                         int64_t offset, int64_t mode) {
  ThreadsForCall threads;  // nothing waits on a core another process keeps busy
  check_float(flat, "flat");
  TORCH_CHECK_VALUE(flat.dim() == 1, "pylandscape: flat must be 1-D [P], got ", flat.sizes());
  TORCH_CHECK_VALUE(flat.is_contiguous(), "pylandscape: perturb_ needs a contiguous flat");
  const at::Tensor offs = check_offsets(offsets, flat.numel());
  const int64_t s = seed;
  perturb_into(flat, offs, scales.reshape({1, -1}), &s, 1, offset, mode, flat.data_ptr());
}

at::Tensor philox_normal_cpu(int64_t n, int64_t seed, int64_t offset, at::ScalarType dtype) {
  ThreadsForCall threads;  // nothing waits on a core another process keeps busy
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
  m.impl("perturb_out", &pylandscape::cpu::perturb_out_cpu);
}

// No tensor arguments, so no backend key to dispatch on: one kernel for every key (it returns a CPU tensor).
TORCH_LIBRARY_IMPL(pylandscape, CompositeExplicitAutograd, m) {
  m.impl("philox_normal", &pylandscape::cpu::philox_normal_cpu);
}
