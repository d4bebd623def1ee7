// Argument checks of the C++ ops (csrc/host/checks.cpp): the second line of defence behind
// pylandscape/ops.py, which applies the same rules earlier. TORCH_CHECK_VALUE raises Python ValueError.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

namespace pylandscape {

// t is float32 or float64 (name: the argument, for the message).
void check_float(const at::Tensor& t, const char* name);

// The one offsets rule: a 1-D int64 tensor [L+1] (L >= 0, any device), offsets[0] = 0, non-decreasing
// (equal neighbours: empty segments are allowed), offsets[L] = numel. Returns it on the CPU, contiguous.
// The same rule as pylandscape.ops.check_offsets, which also converts other integer dtypes to int64.
at::Tensor check_offsets(const at::Tensor& offsets, int64_t numel);

// out [K, P] for perturb_out: flat's dtype and device, contiguous, and not sharing memory with flat.
void check_perturb_out(const at::Tensor& out, const at::Tensor& flat, int64_t K);

// scales [K, L] float64 on the CPU (moved there when needed; they are small).
inline at::Tensor host_double(const at::Tensor& t) { return t.to(at::kCPU, at::kDouble).contiguous(); }

}  // namespace pylandscape
