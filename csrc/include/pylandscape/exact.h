// IEEE-exact arithmetic helpers shared by the CPU and CUDA kernels: every operation is rounded once
// (round-to-nearest-even). On the device the __*_rn intrinsics are never fused into FMAs, whatever the
// nvcc flags; on the host the build uses -ffp-contract=off (setup.py, CMakeLists.txt).
#pragma once
#include <cstdint>
#include <cstring>

#include "pylandscape/macros.h"

namespace pylandscape {
namespace fp {

#if defined(__CUDA_ARCH__)
PLK_HD float mul(float a, float b) { return __fmul_rn(a, b); }
PLK_HD float add(float a, float b) { return __fadd_rn(a, b); }
PLK_HD float sub(float a, float b) { return __fsub_rn(a, b); }
PLK_HD float div(float a, float b) { return __fdiv_rn(a, b); }
PLK_HD float sqrt(float a) { return __fsqrt_rn(a); }
PLK_HD double mul(double a, double b) { return __dmul_rn(a, b); }
PLK_HD double add(double a, double b) { return __dadd_rn(a, b); }
PLK_HD double sub(double a, double b) { return __dsub_rn(a, b); }
PLK_HD uint32_t bits(float a) { return static_cast<uint32_t>(__float_as_int(a)); }
PLK_HD float from_bits(uint32_t b) { return __int_as_float(static_cast<int>(b)); }
#else
PLK_HD float mul(float a, float b) { return a * b; }
PLK_HD float add(float a, float b) { return a + b; }
PLK_HD float sub(float a, float b) { return a - b; }
PLK_HD float div(float a, float b) { return a / b; }
PLK_HD float sqrt(float a) { return __builtin_sqrtf(a); }  // IEEE correctly rounded (sqrtss/vsqrtps)
PLK_HD double mul(double a, double b) { return a * b; }
PLK_HD double add(double a, double b) { return a + b; }
PLK_HD double sub(double a, double b) { return a - b; }
PLK_HD uint32_t bits(float a) {
  uint32_t b;
  std::memcpy(&b, &a, sizeof b);
  return b;
}
PLK_HD float from_bits(uint32_t b) {
  float a;
  std::memcpy(&a, &b, sizeof a);
  return a;
}
#endif

// mask all ones: a, mask zero: b.
PLK_HD float select_bits(uint32_t mask, float a, float b) { return from_bits((bits(a) & mask) | (bits(b) & ~mask)); }

}  // namespace fp
}  // namespace pylandscape
