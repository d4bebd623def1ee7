// Interpolation and weighted combination of models: the per-element formulas, shared by CPU and CUDA
// so that both round identically (float64 arithmetic, one rounding to the output dtype at the end).
#pragma once
#include "pylandscape/exact.h"

namespace pylandscape {

// (1 - alpha) a + alpha b in this order: alpha = 0 gives a and alpha = 1 gives b exactly (finite a, b).
PLK_HD double lerp_exact(double a, double b, double alpha) {
  const double wa = fp::mul(fp::sub(1.0, alpha), a);
  const double wb = fp::mul(alpha, b);
  return fp::add(wa, wb);
}

// One step of the combine accumulation, in the fixed order m = 0, 1, ..., M-1 (acc starts at +0).
PLK_HD double combine_step(double acc, double coeff, double w) { return fp::add(acc, fp::mul(coeff, w)); }

}  // namespace pylandscape
