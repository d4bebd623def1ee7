// Philox4x32-10 (Salmon, Moraes, Dror, Shaw: "Parallel random numbers: as easy as 1, 2, 3", SC'11).
// A counter-based generator: output = bijection_key(counter), so any element of any stream can be
// computed independently, on any device, in any order. Known-answer vectors: csrc/tests/.
#pragma once
#include <cstdint>

#include "pylandscape/macros.h"

namespace pylandscape {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;  // sqrt(3) - 1

struct Philox4 {
  uint32_t x[4];
};

PLK_HD void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

// One round; the CPU block generator (csrc/cpu/perturb.cpp) calls it on 16 counters side by side.
PLK_HD void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0, uint32_t k1) {
  uint32_t hi0, lo0, hi1, lo1;
  philox_mulhilo(kPhiloxM0, c0, hi0, lo0);
  philox_mulhilo(kPhiloxM1, c2, hi1, lo1);
  const uint32_t n0 = hi1 ^ c1 ^ k0;
  const uint32_t n2 = hi0 ^ c3 ^ k1;
  c0 = n0;
  c1 = lo1;
  c2 = n2;
  c3 = lo0;
}

// Ten rounds on counter (c0, c1, c2, c3) with key (k0, k1); the key is bumped between rounds.
PLK_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    philox_round(c0, c1, c2, c3, k0, k1);
    k0 += kPhiloxW0;  // the 10th bump is unused; harmless and keeps the loop branch-free
    k1 += kPhiloxW1;
  }
  return Philox4{{c0, c1, c2, c3}};
}

}  // namespace pylandscape
