// Argument checks of the C++ ops: the second line of defence behind pylandscape/ops.py, which raises
// the same conditions earlier with friendlier messages. TORCH_CHECK_VALUE raises Python ValueError.
#pragma once
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <string>

namespace pylandscape {

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "pylandscape: ", name,
                    " must be float32 or float64, got ", t.scalar_type());
}

// offsets: int64 CPU [L+1], offsets[0] = 0, non-decreasing, offsets[L] = numel. Returns it contiguous.
inline at::Tensor check_offsets(const at::Tensor& offsets, int64_t numel) {
  TORCH_CHECK_VALUE(offsets.scalar_type() == at::kLong, "pylandscape: offsets must be int64, got ",
                    offsets.scalar_type());
  TORCH_CHECK_VALUE(offsets.device().is_cpu(),
                    "pylandscape: offsets must be a CPU tensor (the kernels read layer bounds on the host)");
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.numel() >= 1, "pylandscape: offsets must be 1-D [L+1], got ",
                    offsets.sizes());
  at::Tensor o = offsets.contiguous();
  const int64_t* p = o.data_ptr<int64_t>();
  const int64_t n = o.numel();
  TORCH_CHECK_VALUE(p[0] == 0, "pylandscape: offsets[0] must be 0, got ", p[0]);
  for (int64_t i = 1; i < n; ++i) {
    TORCH_CHECK_VALUE(p[i] >= p[i - 1], "pylandscape: offsets must be non-decreasing, but offsets[", i,
                      "] = ", p[i], " < offsets[", i - 1, "] = ", p[i - 1]);
  }
  TORCH_CHECK_VALUE(p[n - 1] == numel, "pylandscape: offsets[-1] must equal the number of parameters ", numel,
                    ", got ", p[n - 1]);
  return o;
}

// out [K, P] for perturb_out: flat's dtype and device, contiguous, and not sharing memory with flat.
inline void check_perturb_out(const at::Tensor& out, const at::Tensor& flat, int64_t K) {
  TORCH_CHECK_VALUE(out.scalar_type() == flat.scalar_type(), "pylandscape: out must have flat's dtype ",
                    flat.scalar_type(), ", got ", out.scalar_type());
  TORCH_CHECK_VALUE(out.device() == flat.device(), "pylandscape: out must be on flat's device ", flat.device(),
                    ", got ", out.device());
  TORCH_CHECK_VALUE(out.dim() == 2 && out.size(0) == K && out.size(1) == flat.numel(),
                    "pylandscape: out must be [K, P] = [", K, ", ", flat.numel(), "], got ", out.sizes());
  TORCH_CHECK_VALUE(out.is_contiguous(), "pylandscape: out must be contiguous");
  TORCH_CHECK_VALUE(at::get_overlap_status(out, flat) == at::MemOverlapStatus::No,
                    "pylandscape: out must not share memory with flat");
}

// scales [K, L] float64 on the CPU (moved there when needed; they are small).
inline at::Tensor host_double(const at::Tensor& t) { return t.to(at::kCPU, at::kDouble).contiguous(); }

}  // namespace pylandscape
