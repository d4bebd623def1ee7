// Per-segment statistics (mean, population std, mean |w|) accumulated in float64, and the chunk layout
// shared by the statistics and the noise kernels on CPU and CUDA.
//
// A segment is cut into chunks of at most kChunk elements whose boundaries are segment boundaries or
// multiples of kChunk (so every chunk starts on a 4-element Philox counter boundary unless it starts
// a segment). Each chunk sums (x - K), (x - K)^2 and |x| with K = its first element (shifted sums:
// accurate for segments with a large mean), then chunks merge in order with Chan et al.'s formula.
// The merge order is fixed, so the statistics do not depend on the number of threads.
//
// Empty segment: mean, std and mean |w| are NaN (0/0); the perturbation never touches it.
// NaN/Inf in a segment makes its mean |w| non-finite; the perturbation rejects such segments.
#pragma once
#include <cmath>
#include <cstdint>
#include <vector>

#include "pylandscape/macros.h"

namespace pylandscape {

constexpr int64_t kChunk = 16384;  // elements; a multiple of 64 (the CPU noise block)

struct Chunk {
  int64_t segment, begin, end;
};

// Chunks in segment order; first[l] .. first[l+1]-1 are the chunks of segment l.
inline std::vector<Chunk> make_chunks(const int64_t* offsets, int64_t L, std::vector<int64_t>* first = nullptr) {
  std::vector<Chunk> chunks;
  if (first) first->assign(L + 1, 0);
  for (int64_t l = 0; l < L; ++l) {
    if (first) (*first)[l] = static_cast<int64_t>(chunks.size());
    int64_t b = offsets[l];
    const int64_t e = offsets[l + 1];
    while (b < e) {
      const int64_t next = (b / kChunk + 1) * kChunk;
      const int64_t stop = next < e ? next : e;
      chunks.push_back(Chunk{l, b, stop});
      b = stop;
    }
  }
  if (first) (*first)[L] = static_cast<int64_t>(chunks.size());
  return chunks;
}

// Partial moments of one chunk: n, mean, M2 = sum (x - mean)^2, sum |x|.
struct Moments {
  double n = 0, mean = 0, m2 = 0, sabs = 0;
};

// From shifted sums s1 = sum (x - K), s2 = sum (x - K)^2 over n elements.
PLK_HD Moments moments_from_shifted(double n, double K, double s1, double s2, double sabs) {
  Moments m;
  m.n = n;
  if (n > 0) {
    const double d = s1 / n;
    m.mean = K + d;
    const double m2 = s2 - s1 * d;
    m.m2 = m2 > 0 ? m2 : 0;  // rounding can leave a tiny negative for constant chunks
    // NaN/Inf propagate through sabs (and s1/s2) unchanged by the clamp above
    if (!(m2 == m2)) m.m2 = m2;
  }
  m.sabs = sabs;
  return m;
}

// The summation order of one chunk, shared by the CPU (eight SIMD lanes) and CUDA (eight threads) kernels so
// that both give the same bits: lane j (of kStatLanes) adds the shifted values of elements j, j + 8, ... of the
// chunk's whole 8-element groups, in order (lane_step); the lanes are then added in order 0..7, and the
// tail elements after them, one by one (chunk_finish). Statistics, sigmas and hence the noise of a
// perturbation are then bit-identical on CPU and CUDA.
constexpr int kStatLanes = 8;

PLK_HD void lane_step(double& s1, double& s2, double& sa, double v, double K) {
  const double d = v - K;
  s1 = s1 + d;
  s2 = s2 + d * d;
  sa = sa + fabs(v);
}

// s1, s2, sa: the kStatLanes lane sums of the chunk x[0, n) with shift K.
template <typename T>
PLK_HD Moments chunk_finish(const double* s1, const double* s2, const double* sa, const T* x, int64_t n, double K) {
  double t1 = 0, t2 = 0, ta = 0;
  for (int j = 0; j < kStatLanes; ++j) {
    t1 = t1 + s1[j];
    t2 = t2 + s2[j];
    ta = ta + sa[j];
  }
  for (int64_t i = n / kStatLanes * kStatLanes; i < n; ++i) lane_step(t1, t2, ta, static_cast<double>(x[i]), K);
  return moments_from_shifted(static_cast<double>(n), K, t1, t2, ta);
}

// Chan, Golub, LeVeque (1979): merge b into a.
PLK_HD void moments_merge(Moments& a, const Moments& b) {
  if (b.n == 0) return;
  if (a.n == 0) {
    a = b;
    return;
  }
  const double n = a.n + b.n;
  const double delta = b.mean - a.mean;
  const double wb = b.n / n;
  a.mean = a.mean + delta * wb;
  a.m2 = a.m2 + b.m2 + delta * delta * (a.n * wb);
  a.sabs = a.sabs + b.sabs;
  a.n = n;
}

// Writes (mean, population std, mean |w|); NaN for an empty segment.
PLK_HD void moments_finish(const Moments& m, double* out3) {
  if (m.n == 0) {
    const double nan = NAN;
    out3[0] = out3[1] = out3[2] = nan;
    return;
  }
  out3[0] = m.mean;
  out3[1] = ::sqrt(m.m2 / m.n);
  out3[2] = m.sabs / m.n;
}

}  // namespace pylandscape
