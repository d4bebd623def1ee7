// segment_gram's triangular fp32 product (see pylandscape/cpu_syrk.h): 8 x 32 tiles, one fp32 FMA chain per
// entry and chunk, added to the fp64 accumulator after each chunk.
//
// Why our own kernel: MKL's triangular GEMM ran at ~38 GFLOP/s for 100 rows on the AMD VM (the whole product
// of torch's X @ X.T: ~135), and through it every chunk's [n, n] fp32 product went to a workspace and back.
// Here the chunk's rounded differences sit in cache in the layout the kernel reads (no packing), and each
// tile's product is added to fp64 S from registers.
#include "pylandscape/cpu_syrk.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define PLK_SYRK_X86 1
#endif

namespace pylandscape {
namespace cpu {
namespace {

constexpr int64_t G = kSyrkGroup;
constexpr int64_t kWideRows = 24;  // rows of a wide tile (tile24_avx2: four 6-row passes)

// Columns [lo, hi) of the 16 starting at jb that row i may receive: j >= i and j < n.
inline void valid_range(int64_t i, int64_t jb, int64_t n, int& lo, int& hi) {
  lo = static_cast<int>(std::clamp<int64_t>(i - jb, 0, 16));
  hi = static_cast<int>(std::clamp<int64_t>(n - jb, 0, 16));
}

// One chain's fp32 partial sums, columns [lo, hi) of a row, added to the fp64 output.
inline void add_to_row(double* d, const float* f, int lo, int hi) {
  for (int q = lo; q < hi; ++q) d[q] += static_cast<double>(f[q]);
}

// The reference: every other version must give these bits.
void tile_scalar(double* S, int64_t lds, const float* D, int64_t kc, int64_t i0, int64_t j0, int64_t n, int halves) {
  const float* bp = D + (i0 / G) * kc * G + i0 % G;
  const float* vp = D + (j0 / G) * kc * G;
  for (int t = 0; t < kSyrkTileRows; ++t) {
    const int64_t i = i0 + t;
    if (i >= n) break;
    for (int h = 0; h < 2; ++h) {
      if (!(halves >> h & 1)) continue;
      const int64_t jb = j0 + 16 * h;
      int lo, hi;
      valid_range(i, jb, n, lo, hi);
      for (int q = lo; q < hi; ++q) {
        for (int64_t k0 = 0; k0 < kc; k0 += kSyrkChain) {
          float acc = 0.0f;
          for (int64_t k = k0; k < std::min(kc, k0 + kSyrkChain); ++k)
            acc = std::fma(vp[h * kc * G + k * G + q], bp[k * G + t], acc);
          S[i * lds + jb + q] += static_cast<double>(acc);
        }
      }
    }
  }
}

#if defined(PLK_SYRK_X86)
// H: which 16-column halves of the tile have entries to compute (bit 0: j0..j0+15, bit 1: j0+16..j0+31).
// Tiles on the diagonal and at the last column need one half only: for 100 rows that is 26% less work.
template <int H>
__attribute__((target("avx512f"))) inline __attribute__((always_inline)) void tile512(
    double* S, int64_t lds, const float* D, int64_t kc, int64_t i0, int64_t j0, int64_t n) {
  constexpr int NH = H == 3 ? 2 : 1, h0 = H == 2 ? 1 : 0;
  const float* bp = D + (i0 / G) * kc * G + i0 % G;
  const float* v[NH];
  for (int q = 0; q < NH; ++q) v[q] = D + (j0 / G + h0 + q) * kc * G;
  for (int64_t k0 = 0; k0 < kc; k0 += kSyrkChain) {
    const int64_t k1 = std::min(kc, k0 + kSyrkChain);
    __m512 c[kSyrkTileRows][NH];
#pragma GCC unroll 8
    for (int t = 0; t < kSyrkTileRows; ++t)
      for (int q = 0; q < NH; ++q) c[t][q] = _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int64_t k = k0; k < k1; ++k) {
      if ((k & 3) == 0)
        for (int q = 0; q < NH; ++q) _mm_prefetch(reinterpret_cast<const char*>(v[q] + (k + 16) * G), _MM_HINT_T0);
      __m512 a[NH];
      for (int q = 0; q < NH; ++q) a[q] = _mm512_loadu_ps(v[q] + k * G);
      const float* b = bp + k * G;
#pragma GCC unroll 8
      for (int t = 0; t < kSyrkTileRows; ++t) {
        const __m512 x = _mm512_set1_ps(b[t]);
        for (int q = 0; q < NH; ++q) c[t][q] = _mm512_fmadd_ps(a[q], x, c[t][q]);
      }
    }
#pragma GCC unroll 8
    for (int t = 0; t < kSyrkTileRows; ++t) {
      const int64_t i = i0 + t;
      if (i >= n) break;
      for (int q = 0; q < NH; ++q) {
        const int64_t jb = j0 + 16 * (h0 + q);
        int lo, hi;
        valid_range(i, jb, n, lo, hi);
        if (lo >= hi) continue;
        const unsigned m = (hi == 16 ? 0xffffu : ((1u << hi) - 1u)) & ~((1u << lo) - 1u);
        const __mmask8 ma = static_cast<__mmask8>(m & 0xffu), mb = static_cast<__mmask8>(m >> 8);
        const __m512d lo8 = _mm512_cvtps_pd(_mm512_castps512_ps256(c[t][q]));
        const __m512d hi8 =
            _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(c[t][q]), 1)));
        double* d = S + i * lds + jb;
        _mm512_mask_storeu_pd(d, ma, _mm512_add_pd(_mm512_maskz_loadu_pd(ma, d), lo8));
        _mm512_mask_storeu_pd(d + 8, mb, _mm512_add_pd(_mm512_maskz_loadu_pd(mb, d + 8), hi8));
      }
    }
  }
}

__attribute__((target("avx512f"))) void tile_avx512(double* S, int64_t lds, const float* D, int64_t kc, int64_t i0,
                                                    int64_t j0, int64_t n, int halves) {
  if (halves == 3) {
    tile512<3>(S, lds, D, kc, i0, j0, n);
  } else if (halves == 1) {
    tile512<1>(S, lds, D, kc, i0, j0, n);
  } else {
    tile512<2>(S, lds, D, kc, i0, j0, n);
  }
}

// One row's step of a 16-column pass: the row's value at p broadcast, times the strip's two vectors (a0, a1),
// into the row's accumulators. A macro, so that the accumulators stay named variables (in registers).
#define PLK_ROW_STEP(p, c0, c1)                  \
  {                                              \
    const __m256 x_ = _mm256_broadcast_ss(p);    \
    c0 = _mm256_fmadd_ps(a0, x_, c0);            \
    c1 = _mm256_fmadd_ps(a1, x_, c1);            \
  }

// d[0..16) += the 16 fp32 sums of (c0, c1), each converted to fp64: add_to_row's additions for a whole row.
__attribute__((target("avx2,fma"))) inline __attribute__((always_inline)) void add_row16(double* d, __m256 c0,
                                                                                        __m256 c1) {
  const __m256 c[2] = {c0, c1};
  for (int q = 0; q < 2; ++q) {
    const __m256d lo4 = _mm256_cvtps_pd(_mm256_castps256_ps128(c[q]));
    const __m256d hi4 = _mm256_cvtps_pd(_mm256_extractf128_ps(c[q], 1));
    _mm256_storeu_pd(d + 8 * q, _mm256_add_pd(_mm256_loadu_pd(d + 8 * q), lo4));
    _mm256_storeu_pd(d + 8 * q + 4, _mm256_add_pd(_mm256_loadu_pd(d + 8 * q + 4), hi4));
  }
}

// AVX2, 8 rows x 8 columns (8 accumulators, 1 load, 8 broadcasts): the half of a 16-column strip that has
// entries, where the other half has none (rows past its columns on the diagonal, columns past n at the end).
// At n = 100 the 16-wide passes computed 1.38x the triangle's entries; with these, 1.15x.
__attribute__((target("avx2,fma"))) void tile_avx2_8x8(double* S, int64_t lds, const float* D, int64_t kc,
                                                       int64_t i0, int64_t jb, int64_t n) {
  const float* v = D + (jb / G) * kc * G + jb % G;
  const float* bp = D + (i0 / G) * kc * G + i0 % G;
  for (int64_t k0 = 0; k0 < kc; k0 += kSyrkChain) {
    __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0;
    const int64_t k1 = std::min(kc, k0 + kSyrkChain);
    const float* vk = v + k0 * G;
    const float* bk = bp + k0 * G;
    for (int64_t k = k0; k < k1; ++k, vk += G, bk += G) {
      const __m256 a = _mm256_loadu_ps(vk);
      c0 = _mm256_fmadd_ps(a, _mm256_broadcast_ss(bk), c0);
      c1 = _mm256_fmadd_ps(a, _mm256_broadcast_ss(bk + 1), c1);
      c2 = _mm256_fmadd_ps(a, _mm256_broadcast_ss(bk + 2), c2);
      c3 = _mm256_fmadd_ps(a, _mm256_broadcast_ss(bk + 3), c3);
      c4 = _mm256_fmadd_ps(a, _mm256_broadcast_ss(bk + 4), c4);
      c5 = _mm256_fmadd_ps(a, _mm256_broadcast_ss(bk + 5), c5);
      c6 = _mm256_fmadd_ps(a, _mm256_broadcast_ss(bk + 6), c6);
      c7 = _mm256_fmadd_ps(a, _mm256_broadcast_ss(bk + 7), c7);
    }
    const __m256 c[8] = {c0, c1, c2, c3, c4, c5, c6, c7};
    for (int t = 0; t < 8; ++t) {
      const int64_t i = i0 + t;
      if (i >= n) break;
      const int lo = static_cast<int>(std::clamp<int64_t>(i - jb, 0, 8));
      const int hi = static_cast<int>(std::clamp<int64_t>(n - jb, 0, 8));
      alignas(32) float f[8];
      _mm256_store_ps(f, c[t]);
      add_to_row(S + i * lds + jb, f, lo, hi);
    }
  }
}

// AVX2: the 8 x 32 tile as four 4 x 16 passes (16 ymm registers: 8 accumulators, 2 loads, 1 broadcast). The
// accumulators are named variables: as an array, GCC stored all eight to the stack at every step (2x slower).
__attribute__((target("avx2,fma"))) void tile_avx2(double* S, int64_t lds, const float* D, int64_t kc, int64_t i0,
                                                   int64_t j0, int64_t n, int halves) {
  for (int h = 0; h < 2; ++h) {
    if (!(halves >> h & 1)) continue;
    const int64_t jb = j0 + 16 * h;
    const bool left = i0 < jb + 8, right = n > jb + 8;  // which 8-column halves of the strip have entries
    if (!left || !right) {
      tile_avx2_8x8(S, lds, D, kc, i0, left ? jb : jb + 8, n);
      continue;
    }
    const float* v = D + (j0 / G + h) * kc * G;
    for (int r = 0; r < 2; ++r) {
      const int64_t ib = i0 + 4 * r;
      if (ib >= n) break;
      const float* bp = D + (ib / G) * kc * G + ib % G;
      for (int64_t k0 = 0; k0 < kc; k0 += kSyrkChain) {
        __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00,
               c31 = c00;
        const int64_t k1 = std::min(kc, k0 + kSyrkChain);
        const float* vk = v + k0 * G;
        const float* bk = bp + k0 * G;
        for (int64_t k = k0; k < k1; ++k, vk += G, bk += G) {
          const __m256 a0 = _mm256_loadu_ps(vk), a1 = _mm256_loadu_ps(vk + 8);
          PLK_ROW_STEP(bk, c00, c01)
          PLK_ROW_STEP(bk + 1, c10, c11)
          PLK_ROW_STEP(bk + 2, c20, c21)
          PLK_ROW_STEP(bk + 3, c30, c31)
        }
        const __m256 c[4][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}};
        for (int t = 0; t < 4; ++t) {
          const int64_t i = ib + t;
          if (i >= n) break;
          int lo, hi;
          valid_range(i, jb, n, lo, hi);
          if (lo == 0 && hi == 16) {  // a whole row: vectorised, the same additions
            add_row16(S + i * lds + jb, c[t][0], c[t][1]);
            continue;
          }
          alignas(32) float f[16];
          _mm256_store_ps(f, c[t][0]);
          _mm256_store_ps(f + 8, c[t][1]);
          add_to_row(S + i * lds + jb, f, lo, hi);
        }
      }
    }
  }
}

// AVX2, rows ib..ib+5 (which may straddle two 16-row groups) x the 16 columns at jb, one chain [k0, k1): 12
// accumulators, 2 loads and 6 broadcasts per column. 1.5x the FMAs of a 4 x 16 pass for the same two lines per
// step, so that it keeps its speed with its operands in L2 or L3 (a 4 x 16 pass: ~102 GFLOP/s with them in L1,
// ~93 in L2, ~83 in L3; this one ~101 in all three, on Zen 3). Only for entries that all exist (j > i, j < n):
// the flush adds whole rows of 16 (add_row16).
__attribute__((target("avx2,fma"))) inline __attribute__((always_inline)) void pass_6x16(
    double* S, int64_t lds, const float* D, int64_t kc, int64_t ib, int64_t jb, int64_t k0, int64_t k1) {
  const float* vk = D + (jb / G) * kc * G + k0 * G;
  const float* bk = D + k0 * G;
  int64_t o[6];
  for (int t = 0; t < 6; ++t) o[t] = ((ib + t) / G) * kc * G + (ib + t) % G;
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
         c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t k = k0; k < k1; ++k, vk += G, bk += G) {
    const __m256 a0 = _mm256_loadu_ps(vk), a1 = _mm256_loadu_ps(vk + 8);
    PLK_ROW_STEP(bk + o[0], c00, c01)
    PLK_ROW_STEP(bk + o[1], c10, c11)
    PLK_ROW_STEP(bk + o[2], c20, c21)
    PLK_ROW_STEP(bk + o[3], c30, c31)
    PLK_ROW_STEP(bk + o[4], c40, c41)
    PLK_ROW_STEP(bk + o[5], c50, c51)
  }
  const __m256 c[6][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  for (int t = 0; t < 6; ++t) add_row16(S + (ib + t) * lds + jb, c[t][0], c[t][1]);
}

// AVX2, transposed: the 16 rows of the group at ig (vectors) x W columns jb..jb+W-1 (broadcast), one chain
// [k0, k1): 2W accumulators, 2 loads and W broadcasts per column. For a last tile narrower than 32 columns, whose
// 16- and 8-wide passes computed up to 8x its entries (n = 100: columns 96-99 as 8). fma(a, b, c) = fma(b, a, c), so
// each entry's chain gives the same bits as the reference's. Only for entries that all exist (rows < jb).
template <int W>
__attribute__((target("avx2,fma"))) inline __attribute__((always_inline)) void pass_16xw(
    double* S, int64_t lds, const float* D, int64_t kc, int64_t ig, int64_t jb, int64_t k0, int64_t k1) {
  const float* ak = D + (ig / G) * kc * G + k0 * G;
  const float* bk = D + (jb / G) * kc * G + k0 * G + jb % G;  // the W columns lie in one 16-row group
  // named accumulators (an array of them went to the stack at every step: 2x slower); unused ones fold away
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
         c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t k = k0; k < k1; ++k, ak += G, bk += G) {
    const __m256 a0 = _mm256_loadu_ps(ak), a1 = _mm256_loadu_ps(ak + 8);
    PLK_ROW_STEP(bk, c00, c01)
    if constexpr (W > 1) PLK_ROW_STEP(bk + 1, c10, c11)
    if constexpr (W > 2) PLK_ROW_STEP(bk + 2, c20, c21)
    if constexpr (W > 3) PLK_ROW_STEP(bk + 3, c30, c31)
    if constexpr (W > 4) PLK_ROW_STEP(bk + 4, c40, c41)
    if constexpr (W > 5) PLK_ROW_STEP(bk + 5, c50, c51)
  }
  const __m256 c[6][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  for (int t = 0; t < W; ++t) {
    alignas(32) float f[16];
    _mm256_store_ps(f, c[t][0]);
    _mm256_store_ps(f + 8, c[t][1]);
    double* d = S + ig * lds + jb + t;
    for (int r = 0; r < 16; ++r) d[r * lds] += static_cast<double>(f[r]);
  }
}

// AVX2: rows [i0, i1) (whole 16-row groups, all < j0) x the w < 32 columns of the last tile at j0, passes of at
// most 6 columns (that do not straddle a 16-row group of the columns).
__attribute__((target("avx2,fma"))) void tile_narrow_avx2(double* S, int64_t lds, const float* D, int64_t kc,
                                                          int64_t i0, int64_t i1, int64_t j0, int64_t w) {
  for (int64_t k0 = 0; k0 < kc; k0 += kSyrkChain) {
    const int64_t k1 = std::min(kc, k0 + kSyrkChain);
    for (int64_t ig = i0; ig < i1; ig += G) {
      for (int64_t jb = j0; jb < j0 + w;) {
        const int64_t left = std::min(j0 + w, (jb / G + 1) * G) - jb;  // columns left in jb's 16-row group
        const int64_t m = left <= 6 ? left : left <= 12 ? (left + 1) / 2 : 6;  // near-equal parts of <= 6
        switch (m) {
          case 1: pass_16xw<1>(S, lds, D, kc, ig, jb, k0, k1); break;
          case 2: pass_16xw<2>(S, lds, D, kc, ig, jb, k0, k1); break;
          case 3: pass_16xw<3>(S, lds, D, kc, ig, jb, k0, k1); break;
          case 4: pass_16xw<4>(S, lds, D, kc, ig, jb, k0, k1); break;
          case 5: pass_16xw<5>(S, lds, D, kc, ig, jb, k0, k1); break;
          default: pass_16xw<6>(S, lds, D, kc, ig, jb, k0, k1); break;
        }
        jb += m;
      }
    }
  }
}

// AVX2: 24 rows x the 32-column tile at j0, every entry existing (rows i0..i0+23 < j0, j0 + 32 <= n): 8 passes
// of 6 x 16 per chain.
__attribute__((target("avx2,fma"))) void tile24_avx2(double* S, int64_t lds, const float* D, int64_t kc, int64_t i0,
                                                     int64_t j0) {
  for (int64_t k0 = 0; k0 < kc; k0 += kSyrkChain) {
    const int64_t k1 = std::min(kc, k0 + kSyrkChain);
    for (int h = 0; h < 2; ++h)
      for (int64_t r = 0; r < kWideRows; r += 6) pass_6x16(S, lds, D, kc, i0 + r, j0 + 16 * h, k0, k1);
  }
}
#endif

// Column t of the packed buffer, row r of group g.
inline float* packed_at(float* D, int64_t ldc, int64_t kc, int64_t g, int64_t t, int r) {
  return D + (t / kc) * ldc + (g * kc + t % kc) * G + r;
}

void pack_scalar(const float* stage, int64_t ld, int r_lo, int r_hi, int64_t w, float* D, int64_t ldc, int64_t kc,
                 int64_t g, int64_t col0) {
  for (int64_t t = 0; t < w; ++t) {
    float* out = packed_at(D, ldc, kc, g, col0 + t, 0);
    for (int r = r_lo; r < r_hi; ++r) out[r] = stage[r * ld + t];
  }
}

#if defined(PLK_SYRK_X86)
__attribute__((target("avx512f"))) void pack_avx512(const float* stage, int64_t ld, int r_lo, int r_hi, int64_t w,
                                                    float* D, int64_t ldc, int64_t kc, int64_t g, int64_t col0) {
  const __mmask16 m = static_cast<__mmask16>(((1u << r_hi) - 1u) & ~((1u << r_lo) - 1u));
  int64_t t = 0;
  for (; t + 16 <= w; t += 16) {
    __m512 r[16];
    for (int q = 0; q < 16; ++q)  // rows outside [r_lo, r_hi): loaded from a row that exists, dropped below
      r[q] = _mm512_loadu_ps(stage + std::clamp(q, r_lo, r_hi - 1) * ld + t);
    // 16 x 16 transpose: 32-bit, 64-bit, then 128-bit lane interleaves (twice)
    __m512 a[16], b[16];
    for (int q = 0; q < 16; q += 2) {
      a[q] = _mm512_unpacklo_ps(r[q], r[q + 1]);
      a[q + 1] = _mm512_unpackhi_ps(r[q], r[q + 1]);
    }
    for (int q = 0; q < 16; q += 4) {
      b[q] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a[q]), _mm512_castps_pd(a[q + 2])));
      b[q + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a[q]), _mm512_castps_pd(a[q + 2])));
      b[q + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a[q + 1]), _mm512_castps_pd(a[q + 3])));
      b[q + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a[q + 1]), _mm512_castps_pd(a[q + 3])));
    }
    for (int q = 0; q < 4; ++q) {
      a[q] = _mm512_shuffle_f32x4(b[q], b[q + 4], 0x88);
      a[q + 4] = _mm512_shuffle_f32x4(b[q], b[q + 4], 0xdd);
      a[q + 8] = _mm512_shuffle_f32x4(b[q + 8], b[q + 12], 0x88);
      a[q + 12] = _mm512_shuffle_f32x4(b[q + 8], b[q + 12], 0xdd);
    }
    for (int q = 0; q < 8; ++q) {
      b[q] = _mm512_shuffle_f32x4(a[q], a[q + 8], 0x88);
      b[q + 8] = _mm512_shuffle_f32x4(a[q], a[q + 8], 0xdd);
    }
    // b[q]: staged column t + q, rows in lanes
    for (int q = 0; q < 16; ++q) _mm512_mask_storeu_ps(packed_at(D, ldc, kc, g, col0 + t + q, 0), m, b[q]);
  }
  if (t < w) pack_scalar(stage + t, ld, r_lo, r_hi, w - t, D, ldc, kc, g, col0 + t);
}
#endif

#if defined(PLK_SYRK_X86)
// AVX2: two 8 x 8 transposes per 8 staged columns (rows 0-7 and 8-15 of the group), so that each 64-byte line
// of the packed buffer is written whole.
__attribute__((target("avx2,fma"))) void pack_avx2(const float* stage, int64_t ld, int r_lo, int r_hi, int64_t w,
                                                   float* D, int64_t ldc, int64_t kc, int64_t g, int64_t col0) {
  __m256i m[2];
  bool full[2], any[2];
  int lo[2], hi[2];
  for (int h = 0; h < 2; ++h) {
    lo[h] = std::max(r_lo, 8 * h);
    hi[h] = std::min(r_hi, 8 * h + 8);
    any[h] = lo[h] < hi[h];
    full[h] = lo[h] == 8 * h && hi[h] == 8 * h + 8;
    alignas(32) int mk[8];
    for (int q = 0; q < 8; ++q) mk[q] = 8 * h + q >= lo[h] && 8 * h + q < hi[h] ? -1 : 0;
    m[h] = _mm256_load_si256(reinterpret_cast<const __m256i*>(mk));
  }
  // the rows' addresses, once (rows outside [lo, hi) read a row that exists; they are dropped below): computed per
  // step, with the chunk's division, they were half of this loop's instructions
  const float* src[16];
  for (int q = 0; q < 16; ++q) src[q] = stage + std::clamp(q, lo[q / 8], std::max(lo[q / 8], hi[q / 8] - 1)) * ld;
  int64_t t = 0;
  while (t + 8 <= w) {
    // to the chunk's end (col0, kc multiples of 16: at least 8 columns are left in it)
    const int64_t col = col0 + t, te = t + std::min(w - t, kc - col % kc) / 8 * 8;
    float* out0 = packed_at(D, ldc, kc, g, col, 0);
    for (; t < te; t += 8, out0 += 8 * G) {
      for (int h = 0; h < 2; ++h) {
        if (!any[h]) continue;
        // r[q] (q < 4): columns t..t+3 of rows q (low lane) and q + 4 (high lane); r[q + 4]: columns t+4..t+7.
        // Then in-lane 4 x 4 transposes give whole columns: no cross-lane permute (8 uops each on Zen 1).
        __m256 r[8];
        for (int q = 0; q < 4; ++q) {
          const float* lo_row = src[8 * h + q] + t;
          const float* hi_row = src[8 * h + q + 4] + t;
          r[q] = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(lo_row)), _mm_loadu_ps(hi_row), 1);
          r[q + 4] =
              _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(lo_row + 4)), _mm_loadu_ps(hi_row + 4), 1);
        }
        __m256 b[8];
        for (int u = 0; u < 8; u += 4) {  // in-lane transpose of r[u..u+3]: b[u + c] = column (u + c), rows in lanes
          const __m256 p0 = _mm256_unpacklo_ps(r[u], r[u + 1]), p1 = _mm256_unpackhi_ps(r[u], r[u + 1]);
          const __m256 p2 = _mm256_unpacklo_ps(r[u + 2], r[u + 3]), p3 = _mm256_unpackhi_ps(r[u + 2], r[u + 3]);
          b[u] = _mm256_shuffle_ps(p0, p2, 0x44);
          b[u + 1] = _mm256_shuffle_ps(p0, p2, 0xee);
          b[u + 2] = _mm256_shuffle_ps(p1, p3, 0x44);
          b[u + 3] = _mm256_shuffle_ps(p1, p3, 0xee);
        }
        float* out = out0 + 8 * h;  // the 8 columns lie in one chunk: G apart
        if (full[h]) {  // a masked store is microcoded on Zen 1
          for (int q = 0; q < 8; ++q) _mm256_storeu_ps(out + q * G, b[q]);
        } else {
          for (int q = 0; q < 8; ++q) _mm256_maskstore_ps(out + q * G, m[h], b[q]);
        }
      }
    }
  }
  if (t < w) pack_scalar(stage + t, ld, r_lo, r_hi, w - t, D, ldc, kc, g, col0 + t);
}
#endif

using PackFn = void (*)(const float*, int64_t, int, int, int64_t, float*, int64_t, int64_t, int64_t, int64_t);

using TileFn = void (*)(double*, int64_t, const float*, int64_t, int64_t, int64_t, int64_t, int);
// 24 rows x 32 columns, all entries existing (see tile24_avx2); null where the ISA has none
using Tile24Fn = void (*)(double*, int64_t, const float*, int64_t, int64_t, int64_t);
// rows [i0, i1) x the w < 32 columns of the last tile (see tile_narrow_avx2); null where the ISA has none
using NarrowFn = void (*)(double*, int64_t, const float*, int64_t, int64_t, int64_t, int64_t, int64_t);

struct Isa {
  TileFn fn = tile_scalar;
  Tile24Fn fn24 = nullptr;
  NarrowFn narrow = nullptr;
  PackFn pack = pack_scalar;
  const char* name = "scalar";
  Isa() {
#if defined(PLK_SYRK_X86)
    const char* cap = std::getenv("PYLANDSCAPE_GRAM_ISA");
    const bool allow512 = cap == nullptr || std::strcmp(cap, "avx512") == 0;
    const bool allow2 = allow512 || std::strcmp(cap, "avx2") == 0;
    __builtin_cpu_init();
    if (allow512 && __builtin_cpu_supports("avx512f")) {
      fn = tile_avx512;
      pack = pack_avx512;
      name = "avx512";
    } else if (allow2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      fn = tile_avx2;
      fn24 = tile24_avx2;
      narrow = tile_narrow_avx2;
      pack = pack_avx2;
      name = "avx2";
    }
#endif
  }
};

const Isa& isa() {
  static const Isa i;
  return i;
}

}  // namespace

const char* syrk_isa() { return isa().name; }

void pack_rows16(const float* stage, int64_t ld, int r_lo, int r_hi, int64_t w, float* D, int64_t ldc, int64_t kc,
                 int64_t g, int64_t col0) {
  if (r_lo < r_hi && w > 0) isa().pack(stage, ld, r_lo, r_hi, w, D, ldc, kc, g, col0);
}

void syrk_packed(double* S, int64_t lds, const float* D, int64_t ldc, int64_t nck, int64_t kc, int64_t n,
                 int64_t ct, int64_t r0, int64_t r1) {
  const TileFn fn = isa().fn;
  const Tile24Fn fn24 = isa().fn24;
  const int64_t j0 = ct * kSyrkPad;
  const int64_t i_end = std::min({n, j0 + kSyrkPad, r1});  // rows with some j >= i in this tile
  // rows [r0, full) have every entry of the tile (j > i, j < n): kWideRows at a time where the ISA has a wide
  // tile
  const int64_t full = fn24 != nullptr && j0 + kSyrkPad <= n ? std::min(i_end, j0) : r0;
  // a last tile narrower than 32 columns, not a multiple of 8 (those the 16- and 8-column passes compute without
  // waste, and faster at large n: one flush per row, not per column): rows [r0, nfull) in transposed passes where
  // the ISA has them
  const NarrowFn narrow = isa().narrow;
  const int64_t w = n - j0;
  const int64_t nfull = narrow != nullptr && w < kSyrkPad && w % 8 != 0 ? std::max(r0, std::min(i_end, j0)) : r0;
  for (int64_t c = 0; c < nck; ++c) {  // chunks outside: the tile's 32 columns of a chunk stay in L2
    const float* Dc = D + c * ldc;
    if (nfull > r0) narrow(S, lds, Dc, kc, r0, nfull, j0, w);
    int64_t i0 = nfull;
    for (; i0 + kWideRows <= full; i0 += kWideRows) fn24(S, lds, Dc, kc, i0, j0);
    for (; i0 < i_end; i0 += kSyrkTileRows) {
      // a half has work when some j in it (j < n) has j >= i0
      const int halves = (i0 <= j0 + 15 ? 1 : 0) | (j0 + 16 < n && i0 <= std::min(j0 + 31, n - 1) ? 2 : 0);
      fn(S, lds, Dc, kc, i0, j0, n, halves);
    }
  }
}

}  // namespace cpu
}  // namespace pylandscape
