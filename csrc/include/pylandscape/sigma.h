// From per-segment moments and scales to the noise standard deviation of each (copy, segment), with the
// checks every device makes on the host (the statistics are small) before any noise is written.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <vector>

#include "pylandscape/stats.h"

namespace pylandscape {

constexpr int64_t kModeStd = 0, kModeMagnitude = 1;

// stats: [L, 3] float64 on the CPU (mean, std, mean |w|); scales: [K, L] float64 CPU.
// Returns sigma [K * L]; empty segments get 0. Raises ValueError (same text as _reference.layer_sigmas).
inline std::vector<double> layer_sigmas(const double* stats, const int64_t* offs, int64_t L, const double* scales,
                                        int64_t K, int64_t mode) {
  TORCH_CHECK_VALUE(mode == kModeStd || mode == kModeMagnitude, "pylandscape: mode must be 0 (std) or 1 (magnitude), got ",
                    mode);
  std::vector<double> sig(static_cast<size_t>(K * L), 0.0);
  for (int64_t l = 0; l < L; ++l) {
    if (offs[l + 1] <= offs[l]) continue;  // empty: no elements, sigma irrelevant
    const double* st = stats + 3 * l;
    TORCH_CHECK_VALUE(std::isfinite(st[0]) && std::isfinite(st[1]) && std::isfinite(st[2]), "perturb: segment ", l,
                      " (flat[", offs[l], ":", offs[l + 1], "]) contains NaN or Inf");
    const double s = mode == kModeStd ? st[1] : st[2];
    for (int64_t k = 0; k < K; ++k) {
      const double sc = scales[k * L + l];
      TORCH_CHECK_VALUE(std::isfinite(sc) && sc >= 0, "perturb: scale of segment ", l, " (copy ", k,
                        ") must be finite and >= 0, got ", sc);
      if (mode == kModeStd && s == 0.0 && sc != 0.0) {
        TORCH_CHECK_VALUE(false, "perturb: segment ", l, " (flat[", offs[l], ":", offs[l + 1],
                          "]) has zero std, so std-relative noise would be zero; use scale 0 for it or "
                          "mode='magnitude'");
      }
      sig[k * L + l] = sc * s;
    }
  }
  return sig;
}

}  // namespace pylandscape
