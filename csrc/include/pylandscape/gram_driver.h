// segment_gram's host driver (csrc/host/gram_driver.cpp, compiled once by the C++ compiler) and the
// device kernels it calls, passed in by each device's registration (csrc/cpu/gram.cpp, csrc/cuda/gram.cu).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <vector>

#include "pylandscape/gram.h"

namespace pylandscape {
namespace gram {

// Default longest fp32 GEMM k-chunk (chunks summed in fp64): bounds the fp32 error growth;
// GramKernels::max_chunk overrides it per device.
constexpr int64_t kChunk = 1024;

struct GramKernels {
  // [n] fp64: canonical squared norms of rows[:, c0:c1] (compensated, deterministic, finite check left
  // to the caller).
  std::function<at::Tensor(const at::Tensor& rows, int64_t c0, int64_t c1)> sumsq;
  // [K] fp64: |A[ii[k], c0:c1] - B[jj[k], c0:c1]|^2 (compensated, exact differences for fp32).
  std::function<at::Tensor(const at::Tensor& A, const at::Tensor& B, const at::Tensor& ii,
                           const at::Tensor& jj, int64_t c0, int64_t c1)>
      dist2;
  // Rows [r0, r1) of X on columns [c0, c1), against reference row p of X:
  //   D [nchunks, n, kc] chunk-major (each GEMM operand contiguous; rounded x_i - x_p in D's dtype;
  //   preallocated, padding columns already zero), dn2 [n] = |x_i - x_p|^2 (exact
  //   differences, fp64), T [n, nq] = Q[qidx[k]] . (x_i - x_p) (fp64). One fused pass over the rows.
  std::function<void(const at::Tensor& X, int64_t r0, int64_t r1, int64_t p, const at::Tensor& Q,
                     const at::Tensor& qidx, int64_t c0, int64_t c1, at::Tensor& D, at::Tensor& dn2,
                     at::Tensor& T)>
      prep;
  // S [n, m] (fp64) += sum over c of T[c] ([nck, n, m] fp32), chunks added in order c = 0, 1, ...
  std::function<void(at::Tensor& S, const at::Tensor& T)> acc;
  // Longest k-chunk of the fp32 GEMMs: error growth vs GEMM efficiency of the device's BLAS.
  int64_t max_chunk = kChunk;
  // Optional fused combine_and_check: writes the block G (a strided view) in place and flag [na, nb] (bool,
  // contiguous); returns the number flagged. Empty: an ATen composition of the same operations.
  std::function<int64_t(const at::Tensor& S, const at::Tensor& tA, const at::Tensor& tB, const CombineArgs& a,
                        const at::Tensor& dnA, const at::Tensor& dnB, const at::Tensor& gdA, const at::Tensor& gdB,
                        at::Tensor& G, at::Tensor& flag)>
      combine;
  // Optional: G [N, N] lower triangle := upper, diagonal := gd. Empty: ATen ops through a buffer.
  std::function<void(at::Tensor& G, const at::Tensor& gd)> mirror;
  // Optional: S [n, n] (fp64, row stride >= n) upper triangle (j >= i) += sum over c of D[c] D[c]^T, D
  // [nck, n, kc] fp32, chunks added in order; prod [nck, n, n] fp32 workspace. Returns false when the device
  // has no triangular GEMM (then the driver cuts the triangle into block GEMMs).
  std::function<bool(at::Tensor& S, const at::Tensor& D, at::Tensor& prod)> syrk_acc;
  // Optional: prep that also accumulates the rows' canonical squared norms (bit-identical to sumsq, without its
  // pass over X): ss [r1 - r0, 16] fp64 carries them between column groups (zeros before the first group), gd
  // [r1 - r0] receives them when last (the segment's last column group).
  std::function<void(const at::Tensor& X, int64_t r0, int64_t r1, int64_t p, const at::Tensor& Q,
                     const at::Tensor& qidx, int64_t c0, int64_t c1, at::Tensor& D, at::Tensor& dn2, at::Tensor& T,
                     at::Tensor& ss, at::Tensor& gd, bool last)>
      prep_norms;
  // Optional: the top-level pass of a symmetric fp32 segment in one call: rows [starts.front(), starts.back())
  // of X in blocks [starts[k], starts[k + 1]) with reference rows refs[k]; dn2 [n] and T [n, nblk] as prep
  // computes them (one sum over the whole segment), the rows' norms into *gd when given (as prep_norms), and
  // S [n, n] upper triangle += sum over kc-chunks of D_c D_c^T (as syrk_acc), the differences formed per
  // column group in the device's own layout into ws (bytes, reused between calls). Returns the number of
  // column groups, 0 when not available (then the driver's own path runs).
  std::function<int64_t(const at::Tensor& X, const std::vector<int64_t>& starts, const std::vector<int64_t>& refs,
                        int64_t c0, int64_t c1, int64_t kc, at::Tensor& S, at::Tensor& dn2, at::Tensor& T,
                        at::Tensor* gd, at::Tensor& ws)>
      sym_pass;
};

// The whole op after the argument checks: X [N, P], offsets [L+1] (checked, any device), Y [M, P] or none.
// Returns [L, N, M] float64 on X's device.
at::Tensor segment_gram(const at::Tensor& X, const at::Tensor& offsets, const std::optional<at::Tensor>& Y,
                        const GramKernels& kern);

}  // namespace gram
}  // namespace pylandscape
