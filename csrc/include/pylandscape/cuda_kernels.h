// Internal interface between the CUDA kernel files (stats.cu computes what perturb.cu uses).
#pragma once
#include <ATen/ATen.h>

#include <vector>

#include "pylandscape/stats.h"

namespace pylandscape {
namespace cuda {

// The chunk table of `offs` on flat's device, int64 [nch, 3] rows (segment, begin, end), followed by
// first[0..L] (the first chunk of each segment). Returns the number of chunks.
int64_t upload_chunks(const int64_t* offs, int64_t L, const at::Device& device, at::Tensor& table);

// [L, 3] float64 (mean, std, mean |w|) on flat's device: one launch for the chunks of all segments, one
// (tiny) launch merging them per segment in a fixed order.
at::Tensor layer_stats_device(const at::Tensor& flat, const at::Tensor& offs, const at::Tensor& table, int64_t nch);

}  // namespace cuda
}  // namespace pylandscape
