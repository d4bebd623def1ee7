// The AVX2 kernel's inner loops alone (csrc/cpu/syrk.cpp): a 4 x 16 pass (8 accumulators) against a 6 x 16
// pass (12), with operands in L1, L2 or L3 by the chain length kc (two arrays of kc x 16 floats). One thread.
//   g++ -O3 -std=c++20 bench/syrk_passes.cpp -o /tmp/passes
//   for kc in 128 1024 4096; do /tmp/passes $kc $((256000 / kc)); done   # GFLOP/s per shape, three times
#include <immintrin.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <random>
#include <vector>

constexpr int64_t G = 16;

// The passes as the kernel writes them: named accumulators, stored one by one (gathered into an array, even
// only at the end, GCC keeps them on the stack through the loop: 4x slower).
#define STEP(t, c0, c1)                         \
  x = _mm256_broadcast_ss(b + t);               \
  c0 = _mm256_fmadd_ps(a0, x, c0);              \
  c1 = _mm256_fmadd_ps(a1, x, c1);
#define STORE(t, c0, c1)                   \
  _mm256_storeu_ps(out + 16 * t, c0);      \
  _mm256_storeu_ps(out + 16 * t + 8, c1);

__attribute__((target("avx2,fma"), noinline)) void pass4(float* out, const float* v, const float* b, int64_t kc) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;
  for (int64_t k = 0; k < kc; ++k, v += G, b += G) {
    const __m256 a0 = _mm256_loadu_ps(v), a1 = _mm256_loadu_ps(v + 8);
    __m256 x;
    STEP(0, c00, c01) STEP(1, c10, c11) STEP(2, c20, c21) STEP(3, c30, c31)
  }
  STORE(0, c00, c01) STORE(1, c10, c11) STORE(2, c20, c21) STORE(3, c30, c31)
}

__attribute__((target("avx2,fma"), noinline)) void pass6(float* out, const float* v, const float* b, int64_t kc) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;
  __m256 c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t k = 0; k < kc; ++k, v += G, b += G) {
    const __m256 a0 = _mm256_loadu_ps(v), a1 = _mm256_loadu_ps(v + 8);
    __m256 x;
    STEP(0, c00, c01) STEP(1, c10, c11) STEP(2, c20, c21) STEP(3, c30, c31) STEP(4, c40, c41) STEP(5, c50, c51)
  }
  STORE(0, c00, c01) STORE(1, c10, c11) STORE(2, c20, c21) STORE(3, c30, c31) STORE(4, c40, c41) STORE(5, c50, c51)
}

int main(int argc, char** argv) {
  const int64_t kc = argc > 1 ? std::atoll(argv[1]) : 1024;
  const int iters = argc > 2 ? std::atoi(argv[2]) : 250;
  std::vector<float> v(kc * G), b(kc * G), out(96);
  std::mt19937 g(1);
  std::normal_distribution<float> nd;
  for (auto& x : v) x = nd(g);
  for (auto& x : b) x = nd(g);
  for (int rep = 0; rep < 3; ++rep) {
    for (int w = 4; w <= 6; w += 2) {
      double best = 1e9;
      for (int r = 0; r < 50; ++r) {
        const auto t0 = std::chrono::steady_clock::now();
        for (int it = 0; it < iters; ++it) {
          if (w == 4) {
            pass4(out.data(), v.data(), b.data(), kc);
          } else {
            pass6(out.data(), v.data(), b.data(), kc);
          }
        }
        best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      }
      std::printf("kc = %lld: %dx16 %.1f GFLOP/s\n", static_cast<long long>(kc), w,
                  double(iters) * kc * w * 16 * 2 / best / 1e9);
    }
  }
}
