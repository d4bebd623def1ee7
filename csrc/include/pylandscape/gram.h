// segment_gram: the per-element math shared by the CPU and CUDA kernels (error-free transformations and
// the combine-and-check scalars). The host driver that uses them is csrc/host/gram_driver.cpp.
#pragma once

#include <cmath>
#include <cstdint>

#include "pylandscape/macros.h"

namespace pylandscape {
namespace gram {

constexpr double kU64 = 1.1102230246251565e-16;  // 2^-53
constexpr double kTau = 2.5e-4;  // certified when the error bound <= kTau * estimated (n_i n_j - G_ij)

// Error-free transformations: compensated (Dot2-style) sums of squares and of squared differences.
PLK_HD void two_sum(double a, double b, double& s, double& e) {
  s = a + b;
  double z = s - a;
  e = (a - (s - z)) + (b - z);
}

// One term x*x added to (s, c): the square's rounding error (fma) and the sum's are both kept.
PLK_HD void acc_sq(double x, double& s, double& c) {
  double h = x * x;
#if defined(__CUDACC__)
  double l = fma(x, x, -h);
#else
  double l = std::fma(x, x, -h);
#endif
  double t, e;
  two_sum(s, h, t, e);
  s = t;
  c += e + l;
}

// x*x exact in fp64 (x from fp32 data): only the sum's rounding needs keeping.
PLK_HD void acc_sq_exact(double x, double& s, double& c) {
  double t, e;
  two_sum(s, x * x, t, e);
  s = t;
  c += e;
}

// Scalars of one block pair's combine-and-check. upper: a diagonal block of the symmetric case, where only
// entries above the diagonal may be flagged.
struct CombineArgs {
  double c0, w, np, nq, C, u, C64;
  bool upper;
};

// One entry of the combine-and-check: G = ((s + ta) + tb) + c0 and whether its error bound fails the
// certificate. The same operations in the same order on every device (so the same bits).
PLK_HD double combine_entry(double s, double ta, double tb, double c0) { return ((s + ta) + tb) + c0; }

PLK_HD bool combine_flag(double g, double da, double db, double wa, double ga, double gb, double uc, double np,
                         double uc64) {
  const double bound = (da * db) * uc + (wa + np * db) * uc64;
  const double est = sqrt(ga * gb) - g;
  return bound > est * kTau;
}

}  // namespace gram
}  // namespace pylandscape
