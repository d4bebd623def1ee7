// Argument checks shared by every op and device (declared in pylandscape/checks.h).
#include "pylandscape/checks.h"

#include <ATen/MemoryOverlap.h>

namespace pylandscape {

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "pylandscape: ", name,
                    " must be float32 or float64, got ", t.scalar_type());
}

at::Tensor check_offsets(const at::Tensor& offsets, int64_t numel) {
  TORCH_CHECK_VALUE(offsets.scalar_type() == at::kLong, "pylandscape: offsets must be int64, got ",
                    offsets.scalar_type());
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.numel() >= 1, "pylandscape: offsets must be 1-D [L+1], got ",
                    offsets.sizes());
  // the kernels read segment bounds on the host (one small copy for device offsets)
  at::Tensor o = offsets.to(at::kCPU).contiguous();
  const int64_t* p = o.const_data_ptr<int64_t>();
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

void check_perturb_out(const at::Tensor& out, const at::Tensor& flat, int64_t K) {
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

}  // namespace pylandscape
