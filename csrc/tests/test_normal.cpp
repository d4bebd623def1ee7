// Accuracy of our float32 log / sin / cos against double libm over EVERY possible input (2^24 each),
// and the identities the kernels rely on (exact octant reduction, symmetric signs).
#include <cmath>
#include <cstdio>

#include "check.h"
#include "pylandscape/normal.h"

using namespace pylandscape;

static double ulp_err(float got, double exact) {
  const float e = static_cast<float>(exact);
  const double spacing = std::nextafter(std::fabs(e), INFINITY) - std::fabs(e);
  return std::fabs(static_cast<double>(got) - exact) / spacing;
}

int main() {
  double max_log_ulp = 0, max_rad_ulp = 0, max_sin_abs = 0, max_cos_abs = 0, max_sc_ulp = 0;
  for (uint32_t n = 1; n <= (1u << 24); ++n) {
    const double u = static_cast<double>(n) * 0x1p-24;
    const double ln = std::log(u);
    if (n < (1u << 24)) max_log_ulp = std::fmax(max_log_ulp, ulp_err(log_u24(n), ln));
    else EXPECT(log_u24(n) == 0.0f);
    const float r = normal_radius((n - 1) << 8);
    if (n < (1u << 24)) max_rad_ulp = std::fmax(max_rad_ulp, ulp_err(r, std::sqrt(-2.0 * ln)));
  }
  for (uint32_t k = 0; k < (1u << 24); ++k) {
    float s, c;
    sincos_turn24(k << 8, s, c);
    const double a = 2.0 * M_PI * static_cast<double>(k) * 0x1p-24;
    max_sin_abs = std::fmax(max_sin_abs, std::fabs(s - std::sin(a)));
    max_cos_abs = std::fmax(max_cos_abs, std::fabs(c - std::cos(a)));
    if (std::fabs(std::sin(a)) > 1e-3) max_sc_ulp = std::fmax(max_sc_ulp, ulp_err(s, std::sin(a)));
  }
  std::printf("max error vs libm: ln u %.2f ulp, radius %.2f ulp, sin %.3g abs (%.2f ulp where |sin| > 1e-3), "
              "cos %.3g abs\n", max_log_ulp, max_rad_ulp, max_sin_abs, max_sc_ulp, max_cos_abs);
  EXPECT(max_log_ulp <= 2.0);
  EXPECT(max_rad_ulp <= 2.0);
  EXPECT(max_sin_abs < 1.2e-7);
  EXPECT(max_cos_abs < 1.2e-7);
  TEST_MAIN_END();
}
