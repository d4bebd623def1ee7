// Internal interface between the CPU kernel files (stats.cpp computes what perturb.cpp uses).
#pragma once
#include <ATen/ATen.h>

#include <vector>

#include "pylandscape/stats.h"

namespace pylandscape {
namespace cpu {

// Per-segment moments of flat (contiguous float32/float64 [P]), chunked and merged in a fixed order.
std::vector<Moments> layer_moments(const at::Tensor& flat, const int64_t* offs, int64_t L);

// [L, 3] float64 (mean, std, mean |w|) from moments.
at::Tensor stats_tensor(const std::vector<Moments>& m);

}  // namespace cpu
}  // namespace pylandscape
