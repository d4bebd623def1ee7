// segment_gram on CPU: the kernels that the host driver (csrc/host/gram_driver.cpp, BLAS through at::bmm)
// calls, and the fused top-level pass of symmetric fp32 segments (sym_pass_cpu: the prep writes the
// differences into a cache-sized buffer in the layout of csrc/cpu/syrk.cpp's triangular kernel):
// the fp64 passes around the GEMMs, as plain loops (one row or pair per task, so results do not depend on the thread
// count), multiversioned for AVX-512/AVX2 with the same results on every ISA.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__unix__) || defined(__APPLE__)
#include <dlfcn.h>
#define PLK_HAVE_DLFCN 1
#endif

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "pylandscape/cpu_syrk.h"
#include "pylandscape/gram_driver.h"
#include "pylandscape/macros.h"

namespace pylandscape {
namespace {

using gram::acc_sq;
using gram::two_sum;

// Every loop below adds into a fixed number of lanes (lane j takes elements j, j + kW, ...) and combines the
// lanes in a fixed order: the compiler vectorises them the same way on every ISA, so the AVX-512, AVX2 and
// baseline clones (PLK_MULTIVERSION) give bit-identical results, whatever the machine.
constexpr int kLanes = 8;

// Work below this many element operations runs on the calling thread: a parallel region costs a wake-up
// and a barrier, and on a machine whose other core is busy the barrier waits for a time slice (ms).
constexpr int64_t kSerialWork = int64_t{1} << 20;

int64_t grain_for(int64_t per_item) { return std::max<int64_t>(1, kSerialWork / std::max<int64_t>(per_item, 1)); }


// Longest fp32 k-chunk on CPU (PYLANDSCAPE_GRAM_CHUNK overrides it, for benchmarks): fewer, longer chunks
// cost less packing and fp64 accumulation; the error bound grows only as sqrt(chunk). 1,024 (was 2,048 with
// MKL's triangular GEMM): one chunk of the fused pass's packed differences must fit its cache budget, and at
// N = 2,000 a 1,024-column chunk is already 8.3 MB.
int64_t max_chunk_cpu() {
  const char* env = std::getenv("PYLANDSCAPE_GRAM_CHUNK");
  const int64_t v = env ? std::atoll(env) : 0;
  return v >= 64 && v <= (1 << 20) ? v : 1024;
}

// Software prefetch, kPrefetch bytes ahead of a streaming read, once per cache line. This VM's hardware
// prefetcher kept these fp64 loops at ~1.1 (sums of squares) and ~0.5 (distances) G elements/s per core on
// data out of cache against ~3.5 and ~2.5 in L1; a prefetch 4 KB ahead doubles the first and quadruples the
// second (measured on the Sapphire Rapids VM, 2026-12). It changes no arithmetic, so no result bits.
constexpr int64_t kPrefetch = 4096;

template <typename scalar_t>
PLK_ALWAYS_INLINE void prefetch_ahead(const scalar_t* p, int64_t k) {
  constexpr int64_t kPerLine = 64 / static_cast<int64_t>(sizeof(scalar_t));
  if (k % kPerLine == 0) __builtin_prefetch(p + k + kPrefetch / static_cast<int64_t>(sizeof(scalar_t)));
}

// Sum of lanes (s_k, c_k) as one compensated total, always in the same order.
PLK_ALWAYS_INLINE double finish(const double* s, const double* c) {
  double tot = s[0], err = c[0];
  for (int k = 1; k < kLanes; ++k) {
    double t, e;
    two_sum(tot, s[k], t, e);
    tot = t;
    err += e + c[k];
  }
  return tot + err;
}

// Plain lane sum, fixed pairwise order.
PLK_ALWAYS_INLINE double lane_sum(const double* a) {
  return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

template <typename scalar_t>
PLK_ALWAYS_INLINE double sumsq_row(const scalar_t* x, int64_t n) {
  double s[kLanes] = {}, c[kLanes] = {};
  int64_t k = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    // squares of fp32 values are exact in fp64: only the sum's rounding needs keeping
    for (; k + kLanes <= n; k += kLanes) {
      prefetch_ahead(x, k);
#pragma omp simd
      for (int q = 0; q < kLanes; ++q) gram::acc_sq_exact(static_cast<double>(x[k + q]), s[q], c[q]);
    }
    for (; k < n; ++k) gram::acc_sq_exact(static_cast<double>(x[k]), s[0], c[0]);
  } else {
    for (; k + kLanes <= n; k += kLanes) {
      prefetch_ahead(x, k);
#pragma omp simd
      for (int q = 0; q < kLanes; ++q) acc_sq(static_cast<double>(x[k + q]), s[q], c[q]);
    }
    for (; k < n; ++k) acc_sq(static_cast<double>(x[k]), s[0], c[0]);
  }
  return finish(s, c);
}

PLK_MULTIVERSION void sumsq_rows_f32(const float* base, int64_t ld, int64_t c0, int64_t len, int64_t b, int64_t e,
                                     double* o) {
  for (int64_t i = b; i < e; ++i) o[i] = sumsq_row(base + i * ld + c0, len);
}

PLK_MULTIVERSION void sumsq_rows_f64(const double* base, int64_t ld, int64_t c0, int64_t len, int64_t b,
                                     int64_t e, double* o) {
  for (int64_t i = b; i < e; ++i) o[i] = sumsq_row(base + i * ld + c0, len);
}

template <typename scalar_t>
PLK_ALWAYS_INLINE double dist2_row(const scalar_t* a, const scalar_t* b, int64_t n) {
  // for fp32 data the fp64 difference is exact; for fp64 data it rounds relative to |a - b|
  double s[kLanes] = {}, c[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    prefetch_ahead(a, k);
    prefetch_ahead(b, k);
#pragma omp simd  // the same lanes as before the pragma (which vectorised it: 4-5x faster), so the same bits
    for (int q = 0; q < kLanes; ++q)
      acc_sq(static_cast<double>(a[k + q]) - static_cast<double>(b[k + q]), s[q], c[q]);
  }
  for (; k < n; ++k) acc_sq(static_cast<double>(a[k]) - static_cast<double>(b[k]), s[0], c[0]);
  return finish(s, c);
}

template <typename scalar_t>
PLK_ALWAYS_INLINE void dist2_rows(const scalar_t* a, int64_t lda, const scalar_t* b, int64_t ldb, const int64_t* pi,
                                  const int64_t* pj, int64_t c0, int64_t len, int64_t s, int64_t e, double* o) {
  for (int64_t k = s; k < e; ++k) o[k] = dist2_row(a + pi[k] * lda + c0, b + pj[k] * ldb + c0, len);
}

PLK_MULTIVERSION void dist2_rows_f32(const float* a, int64_t lda, const float* b, int64_t ldb, const int64_t* pi,
                                     const int64_t* pj, int64_t c0, int64_t len, int64_t s, int64_t e, double* o) {
  dist2_rows(a, lda, b, ldb, pi, pj, c0, len, s, e, o);
}

PLK_MULTIVERSION void dist2_rows_f64(const double* a, int64_t lda, const double* b, int64_t ldb, const int64_t* pi,
                                     const int64_t* pj, int64_t c0, int64_t len, int64_t s, int64_t e, double* o) {
  dist2_rows(a, lda, b, ldb, pi, pj, c0, len, s, e, o);
}

at::Tensor sumsq_cpu(const at::Tensor& rows, int64_t c0, int64_t c1) {
  const int64_t n = rows.size(0), len = c1 - c0, ld = rows.stride(0);
  at::Tensor out = at::empty({n}, rows.options().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  at::parallel_for(0, n, grain_for(len), [&](int64_t b, int64_t e) {
    if (rows.scalar_type() == at::kFloat) {
      sumsq_rows_f32(rows.const_data_ptr<float>(), ld, c0, len, b, e, o);
    } else {
      sumsq_rows_f64(rows.const_data_ptr<double>(), ld, c0, len, b, e, o);
    }
  });
  return out;
}

at::Tensor dist2_cpu(const at::Tensor& A, const at::Tensor& B, const at::Tensor& ii, const at::Tensor& jj,
                     int64_t c0, int64_t c1) {
  const int64_t K = ii.numel(), len = c1 - c0, lda = A.stride(0), ldb = B.stride(0);
  at::Tensor out = at::empty({K}, A.options().dtype(at::kDouble));
  at::Tensor iic = ii.contiguous(), jjc = jj.contiguous();
  const int64_t* pi = iic.const_data_ptr<int64_t>();
  const int64_t* pj = jjc.const_data_ptr<int64_t>();
  double* o = out.data_ptr<double>();
  at::parallel_for(0, K, grain_for(len * 4), [&](int64_t s, int64_t e) {
    if (A.scalar_type() == at::kFloat) {
      dist2_rows_f32(A.const_data_ptr<float>(), lda, B.const_data_ptr<float>(), ldb, pi, pj, c0, len, s, e, o);
    } else {
      dist2_rows_f64(A.const_data_ptr<double>(), lda, B.const_data_ptr<double>(), ldb, pi, pj, c0, len, s, e, o);
    }
  });
  return out;
}

struct PrepArgs {
  int64_t ldx, r0, ldq, nq, c0, s, K, ldc, ldd;
  const int64_t* qidx;
  double* dn2;
  double* T;
  double* ss = nullptr;  // [rows, 2 kLanes]: the rows' squared-norm lanes (s, then c), across column groups
  double* gd = nullptr;  // [rows]: the norms, written on the segment's last group
  bool last = false;
  // packed: D in the triangular kernel's layout (pylandscape/cpu_syrk.h; ldd unused): row i - r0, column t
  // at (t / K) * ldc + (((i - r0) / 16) * K + t % K) * 16 + (i - r0) % 16
  bool packed = false;
  // lanes [rows, (nq + 1) kLanes] fp64: the |d|^2 and reference-dot lanes carried between column groups (so
  // dn2 and T are one lane sum over the whole segment, whatever the groups); null: per call, from zero.
  // With lanes, dn2 and T are written only when last.
  double* lanes = nullptr;
  // packed: rows of the call (rows past it, up to the last 16-row group's end, are the kernel's padding)
  int64_t n = 0;
  // fp32 input: the nq references' columns [c0, c0 + s) in fp64 (row k at refd + k * ldr), converted once per
  // column group by the caller; null: each call converts its panels itself
  const double* refd = nullptr;
  int64_t ldr = 0;
};

// acc[(k + r) * kLanes + lane] += reference row k + r . d over one tile, for r < R: R references at once, so
// that R independent add chains hide the add latency (one reference at a time, the loop waited on it); each
// (reference, lane) still adds its columns in order, so the same bits. rows[k]: reference k's fp64 values at
// the tile's first column.
template <int R>
PLK_ALWAYS_INLINE void ref_dots(const double* const* rows, int64_t k, const double* d, int64_t tl, double* acc) {
  const double* q[R];
  double l[R][kLanes];
  for (int r = 0; r < R; ++r) {
    q[r] = rows[k + r];
    for (int j = 0; j < kLanes; ++j) l[r][j] = acc[(k + r) * kLanes + j];
  }
  int64_t cc = 0;
  for (; cc + kLanes <= tl; cc += kLanes) {
    for (int r = 0; r < R; ++r) {
#pragma omp simd
      for (int j = 0; j < kLanes; ++j) l[r][j] += q[r][cc + j] * d[cc + j];
    }
  }
  for (; cc < tl; ++cc)
    for (int r = 0; r < R; ++r) l[r][cc % kLanes] += q[r][cc] * d[cc];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < kLanes; ++j) acc[(k + r) * kLanes + j] = l[r][j];
}

// Rows [b, e): D (chunk-major: column c of row i at D[(c / K) * ldc + i * ldd + c % K]), |d|^2 and the dot
// products with the nq reference rows, tile by tile (a tile of d stays in L1 for the dot products). Columns go
// in panels of kPanel, every row of [b, e) per panel, so that the panel of the nq reference rows stays in L2
// (row by row over whole segments, nq rows of up to 350 KB each were re-read from memory for every row: the
// pass ran at ~0.7 G elements/s per core). Each row's lanes still see its columns in order, one lane per
// column mod kLanes (tiles and panels are multiples of kLanes but the segment's last): the same bits.
//
// kNorms: also the rows' canonical squared norms (what sumsq computes, in the same lanes and order, so the same
// bits: lane j takes the columns j mod kLanes of the segment, the segment's last s mod kLanes columns go to
// lane 0), saving sumsq's own pass over X. The lanes live in a.ss between column groups.
template <typename scalar_t>
PLK_ALWAYS_INLINE void norm_term(double x, double& s, double& c) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    gram::acc_sq_exact(x, s, c);
  } else {
    acc_sq(x, s, c);
  }
}

template <typename scalar_t, typename dst_t, bool kNorms, bool kPacked>
PLK_ALWAYS_INLINE void prep_body(const scalar_t* X, const scalar_t* pr, const scalar_t* Q, dst_t* D,
                                 const PrepArgs& a, int64_t b, int64_t e) {
  constexpr int64_t kTile = 512, kPanel = 4096;
  // Row strides of the stage and of the reference panel: one cache line more than a panel, so that their rows
  // do not all map to one L1 set (rows 16 KB or 32 KB apart share a set of the 8-way 32 KB L1: the pack's 16
  // staged rows evicted each other before the second half of each line was read).
  constexpr int64_t kStageLd = kPanel + 64 / static_cast<int64_t>(sizeof(dst_t)), kRefLd = kPanel + 8;
  constexpr int64_t kG = cpu::kSyrkGroup;
  alignas(64) double d[kTile];
  const int64_t nl = a.nq * kLanes;
  std::vector<double> local;
  dst_t* stage = nullptr;  // packed: [kG, kPanel] rows of the current 16-row group
  if constexpr (kPacked) {
    static thread_local std::vector<dst_t> buf;  // 256 KB, reused (a fresh one per call would page-fault)
    buf.resize(static_cast<size_t>(kG * kStageLd));
    stage = buf.data();
  }
  double* lanes = a.lanes;
  int64_t lrow0 = 0;  // row of lanes[0], relative to a.r0
  if (lanes == nullptr) {
    local.assign(static_cast<size_t>((e - b) * (nl + kLanes)), 0.0);
    lanes = local.data();
    lrow0 = b - a.r0;
  }
  // fp32 input: the panel of the nq references and of pr in fp64, converted once per panel, not once per row
  // (exact, so the same bits). Zen 1 runs these conversions on one pipe; 4 of the 6 per element were theirs.
  double* refd = nullptr;  // [nq + 1, kPanel]: the references, then pr
  // the caller's fp64 references: which of them is pr (the row's own reference), or -1
  int64_t own = -1;
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (a.refd != nullptr) {
      for (int64_t k = 0; k < a.nq && own < 0; ++k)
        if (Q + a.qidx[k] * a.ldq + a.c0 == pr) own = k;
    }
    if (own < 0) {
      static thread_local std::vector<double> rbuf;  // (nq + 1) x 32 KB, reused
      rbuf.resize(static_cast<size_t>((a.nq + 1) * kRefLd));
      refd = rbuf.data();
    }
  }
  std::vector<const double*> qrow(static_cast<size_t>(std::max<int64_t>(a.nq, 1)));
  for (int64_t p0 = 0; p0 < a.s; p0 += kPanel) {
    const int64_t p1 = std::min(a.s, p0 + kPanel);
    if constexpr (std::is_same_v<scalar_t, float>) {
      for (int64_t k = 0; k <= a.nq && own < 0; ++k) {
        const scalar_t* src = k < a.nq ? Q + a.qidx[k] * a.ldq + a.c0 : pr;
        double* dst = refd + k * kRefLd - p0;
        for (int64_t t = p0; t < p1; ++t) dst[t] = static_cast<double>(src[t]);
      }
    }
    for (int64_t i = b; i < e; ++i) {
      const scalar_t* x = X + i * a.ldx + a.c0;
      const int64_t pi = i - a.r0;
      // packed: the row goes to its line of the 16-row stage (columns p0..p1), packed when the group is done
      dst_t* drow0 = kPacked ? stage + (pi % kG) * kStageLd - p0 : D + pi * a.ldd;
      double* sq = lanes + (pi - lrow0) * (nl + kLanes);
      double* acc = sq + kLanes;
      double ns[kLanes], nc[kLanes];
      if constexpr (kNorms) {
        for (int j = 0; j < kLanes; ++j) {
          ns[j] = a.ss[(i - a.r0) * 2 * kLanes + j];
          nc[j] = a.ss[(i - a.r0) * 2 * kLanes + kLanes + j];
        }
      }
      for (int64_t t0 = p0, tl = 0; t0 < p1; t0 += tl) {
        tl = std::min({kTile, p1 - t0, a.K - t0 % a.K});  // tiles never straddle chunks
        dst_t* drow = kPacked ? drow0 + t0 : drow0 + (t0 / a.K) * a.ldc + (t0 % a.K);
        const scalar_t* xt = x + t0;
        const double* pt;
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (own >= 0) {
            pt = a.refd + own * a.ldr + t0;
            for (int64_t k = 0; k < a.nq; ++k) qrow[k] = a.refd + k * a.ldr + t0;
          } else {
            pt = refd + a.nq * kRefLd + (t0 - p0);
            for (int64_t k = 0; k < a.nq; ++k) qrow[k] = refd + k * kRefLd + (t0 - p0);
          }
        } else {
          pt = pr + t0;
          for (int64_t k = 0; k < a.nq; ++k) qrow[k] = Q + a.qidx[k] * a.ldq + a.c0 + t0;
        }
        int64_t c = 0;
        for (; c + kLanes <= tl; c += kLanes) {
          prefetch_ahead(xt, c);
#pragma omp simd
          for (int j = 0; j < kLanes; ++j) {
            const double xv = static_cast<double>(xt[c + j]);
            const double v = xv - pt[c + j];
            d[c + j] = v;
            drow[c + j] = static_cast<dst_t>(v);
            sq[j] += v * v;
            if constexpr (kNorms) norm_term<scalar_t>(xv, ns[j], nc[j]);
          }
        }
        for (; c < tl; ++c) {  // only in the segment's last tile (all others are multiples of kLanes)
          const double xv = static_cast<double>(xt[c]);
          const double v = xv - pt[c];
          d[c] = v;
          drow[c] = static_cast<dst_t>(v);
          sq[c % kLanes] += v * v;
          if constexpr (kNorms) norm_term<scalar_t>(xv, ns[0], nc[0]);  // sumsq's tail: lane 0
        }
        int64_t k = 0;
        const double* const* rows = qrow.data();
        for (; k + 4 <= a.nq; k += 4) ref_dots<4>(rows, k, d, tl, acc);
        if (a.nq - k == 3) {  // the rest in one pass too (one reference per pass was add-latency bound)
          ref_dots<3>(rows, k, d, tl, acc);
        } else if (a.nq - k == 2) {
          ref_dots<2>(rows, k, d, tl, acc);
        } else if (a.nq - k == 1) {
          ref_dots<1>(rows, k, d, tl, acc);
        }
      }
      if constexpr (kNorms) {
        for (int j = 0; j < kLanes; ++j) {
          a.ss[(i - a.r0) * 2 * kLanes + j] = ns[j];
          a.ss[(i - a.r0) * 2 * kLanes + kLanes + j] = nc[j];
        }
        if (a.last && p1 == a.s) a.gd[i - a.r0] = finish(ns, nc);
      }
      if constexpr (kPacked) {
        if (pi % kG == kG - 1 || i == e - 1) {  // the group's last row here: its staged rows into D
          const int64_t gs = pi / kG * kG, first = std::max(b - a.r0, gs);
          // the call's last row: the group's padding rows too, so that the pack stores whole lines (a masked store
          // is microcoded on Zen 1). They get stale stage rows (values this thread staged earlier, zeros at first):
          // only entries past n read them, and the kernel drops those.
          const int64_t end = pi == a.n - 1 ? kG : pi - gs + 1;
          cpu::pack_rows16(stage, kStageLd, static_cast<int>(first - gs), static_cast<int>(end), p1 - p0, D, a.ldc, a.K,
                           pi / kG, p0);
        }
      }
    }
  }
  if (a.lanes != nullptr && !a.last) return;
  for (int64_t i = b; i < e; ++i) {
    const double* sq = lanes + (i - a.r0 - lrow0) * (nl + kLanes);
    a.dn2[i - a.r0] = lane_sum(sq);
    for (int64_t k = 0; k < a.nq; ++k) a.T[(i - a.r0) * a.nq + k] = lane_sum(sq + kLanes + k * kLanes);
  }
}

template <typename scalar_t, typename dst_t>
PLK_ALWAYS_INLINE void prep_rows(const scalar_t* X, const scalar_t* pr, const scalar_t* Q, dst_t* D,
                                 const PrepArgs& a, int64_t b, int64_t e) {
  if (a.packed) {
    if constexpr (std::is_same_v<dst_t, float>) {
      if (a.ss != nullptr) {
        prep_body<scalar_t, dst_t, true, true>(X, pr, Q, D, a, b, e);
      } else {
        prep_body<scalar_t, dst_t, false, true>(X, pr, Q, D, a, b, e);
      }
    }
    return;
  }
  if (a.ss != nullptr) {
    prep_body<scalar_t, dst_t, true, false>(X, pr, Q, D, a, b, e);
  } else {
    prep_body<scalar_t, dst_t, false, false>(X, pr, Q, D, a, b, e);
  }
}

PLK_MULTIVERSION void prep_f32_f32(const float* X, const float* pr, const float* Q, float* D, const PrepArgs& a,
                                   int64_t b, int64_t e) {
  prep_rows(X, pr, Q, D, a, b, e);
}
PLK_MULTIVERSION void prep_f32_f64(const float* X, const float* pr, const float* Q, double* D, const PrepArgs& a,
                                   int64_t b, int64_t e) {
  prep_rows(X, pr, Q, D, a, b, e);
}
PLK_MULTIVERSION void prep_f64_f64(const double* X, const double* pr, const double* Q, double* D,
                                   const PrepArgs& a, int64_t b, int64_t e) {
  prep_rows(X, pr, Q, D, a, b, e);
}

void prep_any(const at::Tensor& X, int64_t r0, int64_t r1, int64_t p, const at::Tensor& Q, const at::Tensor& qidx,
              int64_t c0, int64_t c1, at::Tensor& D, at::Tensor& dn2, at::Tensor& T, at::Tensor* ss, at::Tensor* gd,
              bool last) {
  TORCH_CHECK(D.dim() == 3 && D.stride(2) == 1 && dn2.is_contiguous() && T.is_contiguous(),
              "segment_gram: bad workspace");
  TORCH_CHECK(X.scalar_type() == Q.scalar_type(), "segment_gram: X and Q dtypes differ");
  at::Tensor qi = qidx.to(at::kCPU).contiguous();
  PrepArgs a{X.stride(0), r0, Q.stride(0), qi.numel(), c0, c1 - c0, D.size(2), D.stride(0), D.stride(1),
             qi.const_data_ptr<int64_t>(), dn2.data_ptr<double>(), T.data_ptr<double>()};
  if (ss != nullptr) {
    TORCH_CHECK(ss->is_contiguous() && ss->size(0) == r1 - r0 && ss->size(1) == 2 * kLanes && gd->is_contiguous() &&
                    gd->numel() == r1 - r0, "segment_gram: bad norm accumulators");
    a.ss = ss->data_ptr<double>();
    a.gd = gd->data_ptr<double>();
    a.last = last;
  }
  at::parallel_for(r0, r1, grain_for(a.s * (2 + a.nq)), [&](int64_t b, int64_t e) {
    if (X.scalar_type() == at::kFloat) {
      const float* x = X.const_data_ptr<float>();
      if (D.scalar_type() == at::kFloat) {
        prep_f32_f32(x, x + p * a.ldx + c0, Q.const_data_ptr<float>(), D.data_ptr<float>(), a, b, e);
      } else {
        prep_f32_f64(x, x + p * a.ldx + c0, Q.const_data_ptr<float>(), D.data_ptr<double>(), a, b, e);
      }
    } else {
      const double* x = X.const_data_ptr<double>();
      prep_f64_f64(x, x + p * a.ldx + c0, Q.const_data_ptr<double>(), D.data_ptr<double>(), a, b, e);
    }
  });
}

void prep_cpu(const at::Tensor& X, int64_t r0, int64_t r1, int64_t p, const at::Tensor& Q, const at::Tensor& qidx,
              int64_t c0, int64_t c1, at::Tensor& D, at::Tensor& dn2, at::Tensor& T) {
  prep_any(X, r0, r1, p, Q, qidx, c0, c1, D, dn2, T, nullptr, nullptr, false);
}

void prep_norms_cpu(const at::Tensor& X, int64_t r0, int64_t r1, int64_t p, const at::Tensor& Q,
                    const at::Tensor& qidx, int64_t c0, int64_t c1, at::Tensor& D, at::Tensor& dn2, at::Tensor& T,
                    at::Tensor& ss, at::Tensor& gd, bool last) {
  prep_any(X, r0, r1, p, Q, qidx, c0, c1, D, dn2, T, &ss, &gd, last);
}

// Rows [b, e) of S (row stride lds) += the nck chunk products T [nck, na, nb], in chunk order.
PLK_MULTIVERSION void acc_f32(double* s, int64_t lds, const float* t, int64_t na, int64_t nb, int64_t nck,
                              int64_t b, int64_t e) {
  for (int64_t i = b; i < e; ++i) {
    double* si = s + i * lds;
    for (int64_t c = 0; c < nck; ++c) {
      const float* tc = t + (c * na + i) * nb;
      for (int64_t k = 0; k < nb; ++k) si[k] += static_cast<double>(tc[k]);
    }
  }
}

void acc_cpu(at::Tensor& S, const at::Tensor& T) {
  // one parallel region for all chunks (a region per chunk costs a barrier each, ruinous on a busy machine)
  TORCH_CHECK(S.dim() == 2 && S.stride(1) == 1 && T.is_contiguous() && T.dim() == 3 &&
                  T.size(1) == S.size(0) && T.size(2) == S.size(1),
              "segment_gram: bad accumulator");
  double* s = S.data_ptr<double>();
  const int64_t na = S.size(0), nb = S.size(1), lds = S.stride(0), nck = T.size(0);
  if (T.scalar_type() == at::kFloat) {
    const float* t = T.const_data_ptr<float>();
    at::parallel_for(0, na, grain_for(nb * nck), [&](int64_t b, int64_t e) { acc_f32(s, lds, t, na, nb, nck, b, e); });
    return;
  }
  const double* t = T.const_data_ptr<double>();
  at::parallel_for(0, na, grain_for(nb * nck), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      for (int64_t c = 0; c < nck; ++c)
        for (int64_t k = 0; k < nb; ++k) s[i * lds + k] += t[(c * na + i) * nb + k];
  });
}

// MKL's triangular GEMM (C := alpha op(A) op(B) + beta C, one triangle of C), from the MKL that torch's CPU
// library carries: torch has no op for it. Looked up at run time (dlsym on the loaded libtorch_cpu), checked
// once on a small exact product, and used only if both work; any other torch (OpenBLAS, no MKL, another
// name) gets the block-GEMM path. The integer arguments are passed as int64: MKL's LP64 interface reads
// their low 32 bits (little-endian x86-64), so the same call is right for LP64 and ILP64 builds.
// PYLANDSCAPE_GRAM_GEMMT=0 turns it off (for comparisons).
using sgemmt_fn = void (*)(const char*, const char*, const char*, const int64_t*, const int64_t*, const float*,
                           const float*, const int64_t*, const float*, const int64_t*, const float*, float*,
                           const int64_t*);

void call_gemmt(sgemmt_fn f, const float* D, int64_t n, int64_t k, int64_t ldd, float* C, int64_t ldc) {
  // row-major C (upper, j >= i) = D D^T  ==  column-major C^T (lower) = (D^T)^T D^T, D^T column-major [k, n]
  const float one = 1.0f, zero = 0.0f;
  f("L", "T", "N", &n, &k, &one, D, &ldd, D, &ldd, &zero, C, &ldc);
}

sgemmt_fn find_sgemmt() {
#if defined(PLK_HAVE_DLFCN)
  void* h = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
  if (h == nullptr) return nullptr;
  auto f = reinterpret_cast<sgemmt_fn>(dlsym(h, "mkl_blas_sgemmt"));
  dlclose(h);  // RTLD_NOLOAD took a reference to the already loaded library; it stays loaded
#else
  sgemmt_fn f = nullptr;
#endif
  if (f == nullptr) return nullptr;
  // self-check: 3 rows of 5 small integers (exact in fp32), leading dimensions larger than the sizes
  constexpr int64_t n = 3, k = 5, ldd = 7, ldc = 4;
  float D[n * ldd], C[n * ldc];
  for (int64_t i = 0; i < n * ldd; ++i) D[i] = static_cast<float>((i * 7) % 11) - 5.0f;
  for (float& c : C) c = -1000.0f;
  call_gemmt(f, D, n, k, ldd, C, ldc);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < ldc; ++j) {
      float want = -1000.0f;  // below the diagonal and past n: untouched
      if (j >= i && j < n) {
        want = 0.0f;
        for (int64_t c = 0; c < k; ++c) want += D[i * ldd + c] * D[j * ldd + c];
      }
      if (C[i * ldc + j] != want) return nullptr;
    }
  }
  return f;
}

// S (upper triangle, fp64, row stride lds) += sum over chunks of D[c] D[c]^T: one MKL triangular GEMM per
// chunk into prod, then the chunk products added in fp64 in chunk order (as acc_f32 does), row pairs
// (i, n - 1 - i) per task so that the triangle's rows balance.
PLK_MULTIVERSION void acc_upper_f32(double* s, int64_t lds, const float* t, int64_t n, int64_t nck, int64_t b,
                                    int64_t e) {
  for (int64_t p = b; p < e; ++p) {
    const int64_t rows[2] = {p, n - 1 - p};
    for (int r = 0; r < (rows[1] == p ? 1 : 2); ++r) {  // the middle row of an odd n: once
      const int64_t i = rows[r];
      double* si = s + i * lds;
      for (int64_t c = 0; c < nck; ++c) {
        const float* tc = t + (c * n + i) * n;
        for (int64_t k = i; k < n; ++k) si[k] += static_cast<double>(tc[k]);
      }
    }
  }
}

bool syrk_acc_cpu(at::Tensor& S, const at::Tensor& D, at::Tensor& prod) {
  static const sgemmt_fn f = find_sgemmt();
  const char* env = std::getenv("PYLANDSCAPE_GRAM_GEMMT");  // read per call: tests switch it
  if (f == nullptr || D.scalar_type() != at::kFloat || (env && env[0] == '0')) return false;
  const int64_t nck = D.size(0), n = D.size(1), k = D.size(2);
  TORCH_CHECK(D.stride(2) == 1 && prod.is_contiguous() && prod.scalar_type() == at::kFloat && prod.size(0) == nck &&
                  prod.size(1) == n && prod.size(2) == n && S.size(0) == n && S.size(1) == n && S.stride(1) == 1,
              "segment_gram: bad triangular GEMM operands");
  const float* d = D.const_data_ptr<float>();
  float* t = prod.data_ptr<float>();
  for (int64_t c = 0; c < nck; ++c) call_gemmt(f, d + c * D.stride(0), n, k, D.stride(1), t + c * n * n, n);
  double* s = S.data_ptr<double>();
  const int64_t lds = S.stride(0), np = (n + 1) / 2;
  at::parallel_for(0, np, grain_for(2 * n * nck),
                   [&](int64_t b, int64_t e) { acc_upper_f32(s, lds, t, n, nck, b, e); });
  return true;
}

// The top-level pass of a symmetric fp32 segment, fused (GramKernels::sym_pass): per column group, the prep of
// every block writes the rounded differences in the triangular kernel's packed layout into a buffer small
// enough to stay in cache (PYLANDSCAPE_GRAM_PACKED_BYTES for all buffers together; default 8 MiB, at most X's
// bytes / 32), then cpu::syrk_packed adds the group's chunk products to S from there. X is read once; no [n, n]
// fp32 product is stored and re-read.
// Bits: the same on any thread count (each entry is one thread's fixed sequence of operations).
int64_t packed_budget(int64_t x_bytes) {
  const char* env = std::getenv("PYLANDSCAPE_GRAM_PACKED_BYTES");
  const int64_t v = env ? std::atoll(env) : 0;
  // at most 1/32 of X's bytes: for small N, 8 MiB would be 11% of X (N = 100)
  return v > 0 ? v : std::min(int64_t{8} << 20, x_bytes / 32);
}

int64_t sym_pass_cpu(const at::Tensor& X, const std::vector<int64_t>& starts, const std::vector<int64_t>& refs,
                     int64_t c0, int64_t c1, int64_t kc, at::Tensor& S, at::Tensor& dn2, at::Tensor& T,
                     at::Tensor* gd, at::Tensor& ws) {
  const char* env = std::getenv("PYLANDSCAPE_GRAM_PACKED");  // 0: the BLAS path (tests compare; read per call)
  if ((env && env[0] == '0') || X.scalar_type() != at::kFloat || X.stride(1) != 1) return 0;
  // the scalar kernel is the reference (~1 GFLOP/s): on a CPU without AVX2 (ARM, old x86) the BLAS path runs,
  // unless PYLANDSCAPE_GRAM_ISA=scalar asks for it (tests)
  static const bool scalar_only = std::strcmp(cpu::syrk_isa(), "scalar") == 0;
  static const bool asked = [] {
    const char* isa = std::getenv("PYLANDSCAPE_GRAM_ISA");
    return isa != nullptr && std::strcmp(isa, "scalar") == 0;
  }();
  if (scalar_only && !asked) return 0;
  const int64_t r0 = starts.front(), n = starts.back() - r0, nblk = static_cast<int64_t>(refs.size());
  TORCH_CHECK(S.dim() == 2 && S.size(0) == n && S.size(1) == n && S.stride(1) == 1 && dn2.is_contiguous() &&
                  dn2.numel() == n && T.is_contiguous() && T.numel() == n * nblk && kc % cpu::kSyrkGroup == 0,
              "segment_gram: bad fused-pass operands");
  const int64_t npad = cpu::syrk_padded_rows(n), s = c1 - c0, nck = (s + kc - 1) / kc, ldc = npad * kc;
  // chunks per group: the budget holds one buffer, or two when there is more than one group
  const int64_t budget = packed_budget(X.size(0) * X.size(1) * 4);
  int64_t gck = std::clamp<int64_t>(budget / (ldc * 4), 1, nck);
  if (gck < nck) gck = std::clamp<int64_t>(budget / 2 / (ldc * 4), 1, nck);
  const int64_t ngroups = (nck + gck - 1) / gck, nbuf = ngroups > 1 ? 2 : 1;
  const int64_t bytes = nbuf * gck * ldc * 4;  // two buffers: group g's kernel runs beside group g + 1's prep
  if (!ws.defined() || ws.numel() < bytes || !ws.device().is_cpu())
    ws = at::empty({bytes}, X.options().dtype(at::kByte));
  float* D0 = reinterpret_cast<float*>(ws.data_ptr<uint8_t>());
  constexpr int64_t kG = cpu::kSyrkGroup;
  // padding rows: computed by the kernel and dropped; zero (finite) once per call
  for (int64_t c = 0; c < nbuf * gck; ++c)
    for (int64_t i = n; i < npad; ++i)
      for (int64_t t = 0; t < kc; ++t) D0[c * ldc + ((i / kG) * kc + t) * kG + i % kG] = 0.0f;
  auto f64 = X.options().dtype(at::kDouble);
  at::Tensor lanes = at::zeros({n, (nblk + 1) * kLanes}, f64);
  at::Tensor ss = gd != nullptr ? at::zeros({n, 2 * kLanes}, f64) : at::Tensor();
  const float* x = X.const_data_ptr<float>();
  const int64_t ldx = X.stride(0);
  PrepArgs a{ldx, r0, ldx, nblk, c0, 0, kc, ldc, 0, refs.data(), dn2.data_ptr<double>(), T.data_ptr<double>()};
  a.packed = true;
  a.n = n;
  a.lanes = lanes.data_ptr<double>();
  if (gd != nullptr) {
    TORCH_CHECK(gd->is_contiguous() && gd->numel() == n, "segment_gram: bad norm output");
    a.ss = ss.data_ptr<double>();
    a.gd = gd->data_ptr<double>();
  }
  double* Sp = S.data_ptr<double>();
  const int64_t lds = S.stride(0), nt = cpu::syrk_col_tiles(n);
  const int64_t piece = nt >= 4 * at::get_num_threads() ? n : cpu::kSyrkPad;  // rows per task
  std::vector<std::array<int64_t, 3>> tasks;  // (column tile, first row, end row), largest first
  for (int64_t ct = nt - 1; ct >= 0; --ct)
    for (int64_t r = 0; r < std::min(n, (ct + 1) * cpu::kSyrkPad); r += piece) tasks.push_back({ct, r, r + piece});
  const int64_t ntask = static_cast<int64_t>(tasks.size()), nunit = (n + kG - 1) / kG;
  // One parallel region per group: the kernel's tasks of group g - 1, then the prep of group g (into the other
  // buffer) in 16-row units, pulled from one queue. With a region for each, every group waited twice at a
  // barrier for the slower thread (its share of the rows, its last task): 10% of the samples at N = 100. A
  // group's prep needs only the previous group's prep (each row's lanes) and its buffer only the kernel of two
  // groups back, both finished at the end of the previous region; S sees each entry's chunks in order.
  // Bits: each row's prep and each entry's sums are the same sequences of operations whoever runs them.
  std::vector<PrepArgs> ga(static_cast<size_t>(ngroups), a);
  for (int64_t g = 0; g < ngroups; ++g) {
    ga[g].c0 = c0 + g * gck * kc;
    ga[g].s = std::min(c1, ga[g].c0 + gck * kc) - ga[g].c0;
    ga[g].last = g == ngroups - 1;
  }
  // the references in fp64, one group's columns at a time (exact; the prep's units would each convert them)
  const int64_t ldr = (gck * kc + 7) / 8 * 8 + 8;  // + a line: rows 16 KB apart share an L1 set
  std::vector<double> refd(static_cast<size_t>(nblk * ldr));
  for (auto& p : ga) {
    p.refd = refd.data();
    p.ldr = ldr;
  }
  auto buf = [&](int64_t g) { return D0 + (g % nbuf) * gck * ldc; };
  auto chunks = [&](int64_t g) { return std::min(gck, nck - g * gck); };
  for (int64_t g = 0; g <= ngroups; ++g) {
    const bool prep = g < ngroups, kern = g > 0;
    if (prep) {
      for (int64_t k = 0; k < nblk; ++k) {
        const float* src = x + refs[k] * ldx + ga[g].c0;
        double* dst = refd.data() + k * ldr;
        for (int64_t t = 0; t < ga[g].s; ++t) dst[t] = static_cast<double>(src[t]);
      }
      const int64_t tail = chunks(g) * kc - ga[g].s;  // the segment's last chunk: zero columns past its end
      if (tail > 0) {
        float* Dl = buf(g) + (chunks(g) - 1) * ldc;
        for (int64_t gi = 0; gi < npad / kG; ++gi)
          std::fill(Dl + (gi * kc + kc - tail) * kG, Dl + (gi * kc + kc) * kG, 0.0f);
      }
    }
    const int64_t nk = kern ? ntask : 0, items = nk + (prep ? nunit : 0);
    // one thread for tiny work: an element of the prep costs ~10 simple operations, a kernel entry 2 per column
    const int64_t work = (prep ? n * ga[g].s * (10 + nblk) : 0) + (kern ? n * n * ga[g - 1].s : 0);
    const int64_t nth = work < kSerialWork ? 1 : std::max<int64_t>(1, at::get_num_threads());
    std::atomic<int64_t> next{0};
    at::parallel_for(0, nth, 1, [&](int64_t, int64_t) {
      for (int64_t t = next++; t < items; t = next++) {
        if (t < nk) {
          cpu::syrk_packed(Sp, lds, buf(g - 1), ldc, chunks(g - 1), kc, n, tasks[t][0], tasks[t][1], tasks[t][2]);
          continue;
        }
        // rows of one 16-row group of the packed layout (the pack writes whole groups; the call's last row
        // pads its group)
        const int64_t b = r0 + (t - nk) * kG, e = std::min(r0 + n, b + kG);
        for (int64_t k = 0; k < nblk; ++k) {
          const int64_t lo = std::max(b, starts[k]), hi = std::min(e, starts[k + 1]);
          if (lo < hi) prep_f32_f32(x, x + refs[k] * ldx + ga[g].c0, x, buf(g), ga[g], lo, hi);
        }
      }
    });
  }
  if (std::getenv("PYLANDSCAPE_GRAM_STATS") != nullptr)
    std::fprintf(stderr, "[segment_gram] fused pass cols=%lld rows=%lld groups=%lld chunks=%lld isa=%s\n",
                 static_cast<long long>(s), static_cast<long long>(n), static_cast<long long>(ngroups),
                 static_cast<long long>(nck), cpu::syrk_isa());
  return ngroups;
}

// The fused form of gram::combine_and_check (same operations in the same order, so the same bits): writes
// the block of G in place and the flags; returns how many entries were flagged in rows [b, e).
PLK_MULTIVERSION int64_t combine_rows(const double* S, int64_t lds, const double* tA, int64_t stA, const double* tB,
                                      const gram::CombineArgs& a, const double* dnA, const double* dnB,
                                      const double* gdA, const double* gdB, double* G, int64_t ldg, bool* flag,
                                      int64_t nb, int64_t b, int64_t e) {
  const double uc = a.u * a.C, uc64 = gram::kU64 * a.C64, c0 = a.c0, np = a.np;
  int64_t count = 0;
  for (int64_t i = b; i < e; ++i) {
    const double ta = tA[i * stA], da = dnA[i], ga = gdA[i], wa = a.w + a.nq * da;
    const double* Si = S + i * lds;
    double* Gi = G + i * ldg;
    bool* fi = flag + i * nb;
    const int64_t j0 = a.upper ? std::min(i + 1, nb) : 0;  // diagonal blocks: only j > i may be flagged
    for (int64_t j = 0; j < j0; ++j) {
      Gi[j] = gram::combine_entry(Si[j], ta, tB[j], c0);
      fi[j] = false;
    }
    int64_t cnt = 0;
#pragma omp simd reduction(+ : cnt)
    for (int64_t j = j0; j < nb; ++j) {
      const double g = gram::combine_entry(Si[j], ta, tB[j], c0);
      Gi[j] = g;
      const bool f = gram::combine_flag(g, da, dnB[j], wa, ga, gdB[j], uc, np, uc64);
      fi[j] = f;
      cnt += f ? 1 : 0;
    }
    count += cnt;
  }
  return count;
}

int64_t combine_cpu(const at::Tensor& S, const at::Tensor& tA, const at::Tensor& tB, const gram::CombineArgs& a,
                    const at::Tensor& dnA, const at::Tensor& dnB, const at::Tensor& gdA, const at::Tensor& gdB,
                    at::Tensor& G, at::Tensor& flag) {
  TORCH_CHECK(S.stride(1) == 1 && dnA.is_contiguous() && dnB.is_contiguous() && gdA.is_contiguous() &&
                  gdB.is_contiguous() && G.stride(1) == 1 && flag.is_contiguous(),
              "segment_gram: bad combine operands");
  const int64_t na = S.size(0), nb = S.size(1);
  at::Tensor tBc = tB.contiguous();
  std::vector<int64_t> counts(static_cast<size_t>(na), 0);
  // S may be G itself (the accumulator is combined in place): each entry is read before it is written
  at::parallel_for(0, na, grain_for(nb * 16), [&](int64_t b, int64_t e) {
    counts[b] = combine_rows(S.const_data_ptr<double>(), S.stride(0), tA.const_data_ptr<double>(), tA.stride(0),
                             tBc.const_data_ptr<double>(), a, dnA.const_data_ptr<double>(),
                             dnB.const_data_ptr<double>(), gdA.const_data_ptr<double>(),
                             gdB.const_data_ptr<double>(), G.data_ptr<double>(), G.stride(0),
                             flag.data_ptr<bool>(), nb, b, e);
  });
  int64_t total = 0;
  for (int64_t c : counts) total += c;
  return total;
}

// G [N, N] (row stride ld): lower triangle := upper triangle, diagonal := gd. 64 x 64 tiles.
void mirror_cpu(at::Tensor& G, const at::Tensor& gd) {
  TORCH_CHECK(G.stride(1) == 1 && gd.is_contiguous(), "segment_gram: bad mirror operands");
  const int64_t n = G.size(0), ld = G.stride(0);
  constexpr int64_t kT = 64;
  double* g = G.data_ptr<double>();
  const double* d = gd.const_data_ptr<double>();
  const int64_t nt = (n + kT - 1) / kT;
  at::parallel_for(0, nt, grain_for(n * kT), [&](int64_t tb, int64_t te) {
    for (int64_t ti = tb; ti < te; ++ti) {
      const int64_t i0 = ti * kT, i1 = std::min(n, i0 + kT);
      for (int64_t j0 = 0; j0 <= i0; j0 += kT) {
        const int64_t j1 = std::min(n, j0 + kT);
        for (int64_t i = i0; i < i1; ++i)
          for (int64_t j = j0; j < std::min(j1, i); ++j) g[i * ld + j] = g[j * ld + i];
      }
      for (int64_t i = i0; i < i1; ++i) g[i * ld + i] = d[i];
    }
  });
}

}  // namespace

at::Tensor segment_gram_cpu(const at::Tensor& X, const at::Tensor& offsets, const std::optional<at::Tensor>& Y) {
  static const gram::GramKernels kern{sumsq_cpu,    dist2_cpu,      prep_cpu,    acc_cpu,
                                      max_chunk_cpu(), combine_cpu, mirror_cpu, syrk_acc_cpu,
                                      prep_norms_cpu, sym_pass_cpu};
  return gram::segment_gram(X, offsets, Y, kern);
}

TORCH_LIBRARY_IMPL(pylandscape, CPU, m) {
  m.impl("segment_gram", &segment_gram_cpu);
}

}  // namespace pylandscape

