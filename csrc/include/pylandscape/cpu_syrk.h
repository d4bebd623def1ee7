// segment_gram's triangular fp32 product on the CPU (csrc/cpu/syrk.cpp): our own GEMM micro-kernel, so that
// the rounded differences are written once, in the layout the kernel reads, into a buffer that stays in cache,
// and each chunk's fp32 product goes straight into the fp64 accumulator (no [n, n] fp32 workspace, no pass to
// add it). No ATen here: plain pointers, so that it can be benchmarked and tested on its own.
#pragma once

#include <cstdint>

namespace pylandscape {
namespace cpu {

// Packed layout of one chunk of kc columns: rows in groups of kSyrkGroup, column-major inside a group:
// element (row i, column t) at ((i / kSyrkGroup) * kc + t) * kSyrkGroup + i % kSyrkGroup. Rows are padded
// to a multiple of kSyrkPad (padding rows must be finite: they are computed and dropped).
constexpr int64_t kSyrkGroup = 16;
constexpr int64_t kSyrkPad = 32;  // = columns per tile
constexpr int64_t kSyrkTileRows = 8;
// Longest fp32 FMA chain: each entry's partial product goes to fp64 every kSyrkChain columns (and at each
// chunk's end). BLAS kernels sum k-blocks of a few hundred columns separately; one chain over a whole
// 1,024-column chunk made the worst 1 - cos error of bench_gram.py's walks 4-9x larger (2.3e-5 vs 2.5e-6).
// The flush reads and writes the tile's fp64 rows, in L1 by then: ~3% of the kernel's time.
constexpr int64_t kSyrkChain = 256;

inline int64_t syrk_padded_rows(int64_t n) { return (n + kSyrkPad - 1) / kSyrkPad * kSyrkPad; }
inline int64_t syrk_col_tiles(int64_t n) { return (n + kSyrkPad - 1) / kSyrkPad; }

// S [n, n] fp64 (row stride lds), upper triangle (j >= i, diagonal included) += sum over chunks c in
// [0, nck) of D_c D_c^T, D_c = D + c * ldc packed as above (n rows, kc columns). Each chunk's product is fp32
// FMA chains per entry over runs of kSyrkChain columns in order, each added to S in fp64 in order: every
// entry gets the same bits whatever the ISA (AVX-512, AVX2, scalar) and the thread that computed it.
// Only the 32-column tile ct (see syrk_col_tiles), its rows [r0, r1) (r0 a multiple of kSyrkTileRows):
// callers split the tiles, and for few tiles their rows, among threads.
void syrk_packed(double* S, int64_t lds, const float* D, int64_t ldc, int64_t nck, int64_t kc, int64_t n,
                 int64_t ct, int64_t r0, int64_t r1);

// Rows [r_lo, r_hi) of the 16-row group g, staged row-major (row r at stage + r * ld, w columns), into the
// packed layout: staged column t is column col0 + t of the buffer (chunk (col0 + t) / kc at D + chunk * ldc).
// The group's other rows are left as they are (another call, maybe another thread, writes them). col0 and kc
// are multiples of 16. Why: the prep pass computes a row at a time, and writing each value straight into the
// packed layout was one 4-byte store per value, a third of that pass's time (AVX-512: 16 x 16 transposes).
void pack_rows16(const float* stage, int64_t ld, int r_lo, int r_hi, int64_t w, float* D, int64_t ldc, int64_t kc,
                 int64_t g, int64_t col0);

// Which kernel syrk_packed runs on this CPU: "avx512", "avx2" or "scalar" (PYLANDSCAPE_GRAM_ISA=avx2 caps it,
// any other value but avx512 gives "scalar"; for tests and benchmarks). segment_gram's fused pass uses the
// scalar reference only when PYLANDSCAPE_GRAM_ISA=scalar asks for it; otherwise its BLAS path runs.
const char* syrk_isa();

}  // namespace cpu
}  // namespace pylandscape
