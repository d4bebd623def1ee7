// segment_gram: accurate per-segment Gram matrices of nearly parallel rows, shared by CPU and CUDA.
//
// The algorithm (one segment = one column segment; A = rows of X, B = rows of Y or X):
//   Rows are blocked (block_rows: 64-256 rows). For a block pair (I, J) with reference rows p (middle row
//   of I) and q (middle row of J), write a_i = p + d_i, b_j = q + e_j. Then
//       a_i . b_j = p.q + q.d_i + p.e_j + d_i.e_j,
//   with p.q = (|p|^2 + |q|^2 - |p - q|^2) / 2 and |x|^2 the row's "canonical" squared norm (compensated
//   fp64 sum, computed once per row; the Gram's diagonal IS that value). Only d_i.e_j goes through an
//   fp32 GEMM (on fp32-rounded d, e; k-chunks of <= max_chunk columns summed in fp64); q.d_i and p.e_j are
//   fp64 products of exact differences. Every error is then ~eps * |d_i||e_j| (or ~eps64 * |x||d|), not
//   eps32 * |x|^2: what matters for 1 - cos of nearly parallel rows. The errors of |x|^2 (one ulp) are
//   shared consistently by the diagonal and p.q, so they cancel in 1 - cos to first order.
//   A-posteriori check: entry (i, j) is certified when
//       bound_ij = u32 * C(s) * |d_i||e_j| + u64 * C64(s) * (|p - q|^2 + |q||d_i| + |p||e_j|)
//   is <= kTau * (sqrt(|a_i|^2 |b_j|^2) - G_ij) (kTau = 2.5e-4 of the estimated n_i n_j (1 - cos)).
//   Uncertified entries are recomputed in sub-block pairs (halved, with their own middle-row references,
//   hence smaller |d|), down to kLeaf rows where the pass runs in fp64; entries still uncertified there
//   (duplicates, 1 - cos below ~1e-15) get the direct fp64 distance: G = (|a|^2 + |b|^2 - |a - b|^2) / 2,
//   so exact duplicates give G_ij == G_ii exactly and 1 - cos == 0 exactly.
//   fp64 inputs use the same scheme with fp64 GEMMs throughout.
//
// Memory: the segment's columns go in groups of whole k-chunks (~P / 20 columns), so the workspace of fp32
// (fp64 for fp64 input) differences d is [rows of X (+ Y), group columns], ~5% of X; the fp64 accumulators
// of the block products are the output itself; plus O(N * blocks) fp64 vectors.
//
// The CPU runs the top-level pass of a symmetric fp32 segment as one fused kernel (GramKernels::sym_pass,
// csrc/cpu/gram.cpp + csrc/cpu/syrk.cpp): per column group of ~8 MiB of differences, the prep writes them in
// the layout of our own triangular GEMM kernel, which reads them from cache and adds each tile's fp32 product
// to fp64 S from registers: X read once, no [n, n] fp32 product stored and re-read.
//
// This driver is device-generic (ATen ops + at::bmm, i.e. MKL/OpenBLAS or cuBLAS on the current stream) and
// compiled once, by the C++ compiler; the compensated reductions are device kernels passed in through
// GramKernels (pylandscape/gram_driver.h), the per-element math they share is pylandscape/gram.h.
#include "pylandscape/gram_driver.h"

#include <ATen/Context.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "pylandscape/checks.h"
#include "pylandscape/threads.h"

namespace pylandscape {
namespace gram {
namespace {

constexpr int64_t kBlock = 256;      // rows per top-level block, at most (block_rows)
constexpr int64_t kMinBlock = 32;    // ... and at least (64 made N = 64 one block whose far rows all went to
                                     // fp64 leaf passes: 41.6 ms, with two 32-row blocks 14.8 ms; AMD VM)
constexpr int64_t kLeaf = 32;        // at most this many rows per side: fp64 pass
// One direct fp64 distance costs about this many entries of an fp64 leaf pass: measured on the Zen 3 VM at
// N = 16 (one 16-row block; 6-7 near pairs flagged per large segment), a 16 x 16 leaf pass over a 87,552-column
// segment took ~2.5 ms (the rows' fp64 prep, then MKL's fp64 GEMM of a tiny shape), one direct distance ~0.1
// ms: 256 / 25 ~ 10. It was 64, which sent those 7 entries through the leaf pass: refinement was 11 of N = 16's
// 15 ms (5.5 ms now; N = 8: 6.6 -> 3.1 ms, N = 32: 25.7 -> ~9 ms).
constexpr int64_t kDirectCost = 10;
constexpr int64_t kSmallLayer = 512; // segments this small go straight to the fp64 pass (cheap, exact-er)
constexpr int64_t kSmallBlock = 1024;  // their rows per block: few block pairs (per-pair overhead dominates)
constexpr int64_t kSplitDiag = 192;  // diagonal blocks of >= this many rows: three half-size GEMMs, not four
                                     // (measured with MKL: 3 x 125^2 cost 13% less than 250^2, 3 x 50^2 more
                                     // than 100^2; smaller GEMMs lose more to BLAS overheads than the skipped
                                     // quarter saves)
constexpr int64_t kPanelRows = 1024;  // rows per panel of the triangular-GEMM path (its fp32 products: ~2% of X)
constexpr double kU32 = 5.9604644775390625e-08;   // 2^-24
constexpr double kKappa = 0.35;      // probabilistic error constant per sqrt(chunk length), measured ~0.17

// Error-bound constant of a GEMM over s columns in k-chunks of `chunk` (one rounding of d, e included).
double gemm_const(int64_t s, int64_t chunk) {
  double k = static_cast<double>(s < chunk ? s : chunk);
  return 1.0 + kKappa * std::sqrt(k < 1.0 ? 1.0 : k);
}

// Chunk width for an s-column segment: chunks of at most max_chunk columns, as equal as possible (a
// multiple of 16), so that padding costs almost no GEMM work.
int64_t chunk_width(int64_t s, int64_t max_chunk) {
  if (s <= 0) return 16;
  const int64_t nck = (s + max_chunk - 1) / max_chunk;
  const int64_t kc = (s + nck - 1) / nck;
  return (kc + 15) / 16 * 16;
}

int64_t n_chunks(int64_t s, int64_t kc) { return (s + kc - 1) / kc; }

// A buffer reused across segments and block pairs. Large fresh allocations are not free on the CPU: each
// one is a new mmap whose pages fault in on first touch (measured: most of the op's time went there).
// Bytes, viewed as the dtype asked for: the fp32 segments and the fp64 ones (small segments, leaf passes)
// share it. (One buffer per dtype was reallocated at every switch: the paper's net alternates weights and
// biases, so the 33 MB fp32 workspace of N = 1,000 was allocated 5 times per call, and glibc kept the freed
// copies: the first call's peak memory grew by ~70 MB, 9% of X.)
struct Workspace {
  at::Tensor buf;  // uint8
  at::Tensor view(at::IntArrayRef shape, const at::TensorOptions& opt) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    const at::ScalarType st = opt.dtype().toScalarType();
    const int64_t bytes = n * static_cast<int64_t>(c10::elementSize(st));
    if (!buf.defined() || buf.numel() < bytes || buf.device() != opt.device())
      buf = at::empty({std::max<int64_t>(bytes, 1)}, opt.dtype(at::kByte));
    return buf.narrow(0, 0, bytes).view(st).view(shape);
  }
};

// Wall time per phase (PYLANDSCAPE_GRAM_STATS=1, CPU: the ops there are synchronous).
struct Prof {
  static constexpr int kN = 8;
  bool on = std::getenv("PYLANDSCAPE_GRAM_STATS") != nullptr;
  double t[kN] = {};
  int64_t n_split = 0;  // diagonal blocks cut into three half-size GEMMs
  int64_t n_tri = 0;    // row panels whose triangle went through the triangular GEMM (per column group)
  int64_t n_packed = 0; // column groups through the device's fused pass (kern.sym_pass)
  std::chrono::steady_clock::time_point last = std::chrono::steady_clock::now();
  void lap(int k) {
    if (!on) return;
    const auto now = std::chrono::steady_clock::now();
    t[k] += std::chrono::duration<double>(now - last).count();
    last = now;
  }
};

// Rows per top-level block for n rows on the CPU: about four blocks, a multiple of 16 rows, between kMinBlock
// and kBlock
// (PYLANDSCAPE_GRAM_BLOCK overrides it, for tests and benchmarks). With the triangular GEMM by row panels the
// block size no longer sets the GEMMs: it trades the prep pass's reference dot products (one per block per
// element) against refinement (a block's rows far from its middle row fail the certificate more often).
// Measured on the random-walk trajectories of bench_gram.py (2 threads, seconds): N = 256: 256-row blocks
// 0.136 (refinement 0.037), 128: 0.093, 64: 0.087; N = 500: 256: 0.305, 128: 0.255, 64: 0.268; N = 100:
// one block 0.036, 64: 0.030; at N = 1,000 256-row blocks refine only 0.023 s and more blocks cost prep.
int64_t block_rows(int64_t n, bool cpu) {
  if (const char* env = std::getenv("PYLANDSCAPE_GRAM_BLOCK")) {
    const int64_t v = std::atoll(env);
    if (v >= 1) return v;
  }
  if (!cpu) return kBlock;  // block-pair GEMMs there (no triangular GEMM): small ones waste a GPU
  const int64_t quarter = ((n + 3) / 4 + 15) / 16 * 16;
  return std::clamp<int64_t>(quarter, kMinBlock, kBlock);
}

// Columns are processed in groups of whole chunks, so the workspace of rounded differences is [chunks of one
// group, rows, kc]: about 5% of X's bytes (P / 20 columns), not a copy of the largest segment (which was
// ~46% of X for the paper's net, and cost its first-touch page faults on every first call).
int64_t group_chunks(int64_t P, int64_t kc) {
  const int64_t want = std::max<int64_t>(1, P / 20 / std::max<int64_t>(kc, 1));
  return std::min<int64_t>(want, 64);
}

// S (fp64, a strided view: rows of G or a scratch block) += sum over chunks of DA[c] @ DB[c]^T, fp32
// products summed in fp64 in chunk order (fp64 workspaces: fp64 GEMMs).
// upper: DB is DA and only the upper triangle (with the diagonal) is needed: the block is cut in halves and
// the lower-left quarter skipped (three GEMMs of a quarter's size instead of four; that quarter is left as
// it was), recursively down to kSplitDiag rows.
void gemm_acc(at::Tensor S, const at::Tensor& DA, const at::Tensor& DB, const GramKernels& kern,
              Workspace* ws = nullptr, Prof* prof = nullptr, bool upper = false) {
  const int64_t nck = DA.size(0), na = DA.size(1), nb = DB.size(1);
  if (upper && na == nb && na >= kSplitDiag && DA.scalar_type() == at::kFloat) {
    const int64_t h = ((na + 1) / 2 + 15) / 16 * 16;  // an aligned top half (see kAlign)
    if (prof) ++prof->n_split;
    at::Tensor top = DA.narrow(1, 0, h), bot = DA.narrow(1, h, na - h);
    gemm_acc(S.narrow(0, 0, h).narrow(1, 0, h), top, top, kern, ws, prof, true);
    gemm_acc(S.narrow(0, 0, h).narrow(1, h, na - h), top, bot, kern, ws, prof);
    gemm_acc(S.narrow(0, h, na - h).narrow(1, h, na - h), bot, bot, kern, ws, prof, true);
    return;
  }
  if (DA.scalar_type() == at::kDouble) {
    for (int64_t c = 0; c < nck; ++c) S.addmm_(DA.select(0, c), DB.select(0, c).t());
    return;
  }
  // one batched GEMM over the group's chunks (as fast as a single long GEMM, unlike a loop of short ones),
  // then the chunk products summed in fp64, always in chunk order
  at::Tensor prod = ws ? ws->view({nck, na, nb}, DA.options()) : at::empty({nck, na, nb}, DA.options());
  at::bmm_out(prod, DA, DB.transpose(1, 2));
  if (prof) prof->lap(3);
  kern.acc(S, prod);
  if (prof) prof->lap(4);
}

// fp32 GEMMs must not silently become TF32/bf16 (torch.set_float32_matmul_precision): force "highest".
struct HighestMatmulPrecision {
  at::Float32MatmulPrecision prev;
  HighestMatmulPrecision() : prev(at::globalContext().float32MatmulPrecision()) {
    if (prev != at::Float32MatmulPrecision::HIGHEST) at::globalContext().setFloat32MatmulPrecision("highest");
  }
  ~HighestMatmulPrecision() {
    if (prev == at::Float32MatmulPrecision::HIGH) at::globalContext().setFloat32MatmulPrecision("high");
    if (prev == at::Float32MatmulPrecision::MEDIUM) at::globalContext().setFloat32MatmulPrecision("medium");
  }
};

// Tiny problems run on the calling thread alone (their parallel regions cost more than they save); the rest
// use the threads whose cores no other process keeps busy (ThreadsForCall, pylandscape/threads.h): with the
// other core busy (a training job beside this), every parallel region's barrier waits for a descheduled
// thread, and a call of ~100 ms took 2.7 s on 2 threads vs 0.15 s on one (measured, libgomp's default
// spinning wait). Threshold: N * M * P products (PYLANDSCAPE_GRAM_SERIAL_WORK overrides it; 0 keeps every
// free thread). It was 2.5e9 (N = 100 of the paper's net) before the free-core check: N = 100 on two free
// cores takes 0.033 s, on one 0.058 s.
int thread_cap(const at::Tensor& X, int64_t N, int64_t M) {
  const char* env = std::getenv("PYLANDSCAPE_GRAM_SERIAL_WORK");
  const double limit = env ? std::atof(env) : 1e8;
  return static_cast<double>(N) * M * X.size(1) <= limit ? 1 : 1 << 30;
}

struct LayerCtx {
  at::Tensor A, B;        // [N, P], [M, P] inputs (B may alias A)
  int64_t c0, c1;         // the segment's columns
  at::Tensor gdA, gdB;    // [N], [M] canonical squared norms (fp64)
  at::Tensor G;           // [N, M] fp64 view: out[l]
  bool sym;               // B is A and only the upper triangle is wanted
  bool in64;              // fp64 input: every GEMM in fp64
  const GramKernels* k;
  Workspace* ws;          // [4]: rounded differences of A and B, GEMM products, small fp64 temporaries
  // statistics (PYLANDSCAPE_GRAM_STATS=1): which paths ran
  int64_t n_pairs = 0;    // top-level block pairs
  int64_t n_refined = 0;  // entries recomputed in sub-blocks
  int64_t n_subpass = 0;  // sub-block passes (fp32, or fp64 for fp64 input)
  int64_t n_leaf64 = 0;   // leaf passes in fp64 (<= kLeaf rows per side)
  int64_t n_direct = 0;   // entries given the direct distance
};

// G, flags for rows ia of A x rows ja of B: combine S (= d_i.e_j) with the fp64 terms, then check.
void combine_and_check(const at::Tensor& S, const at::Tensor& tA, const at::Tensor& tB, double c0,
                              double w, double np, double nq, const at::Tensor& dnA, const at::Tensor& dnB,
                              const at::Tensor& gdA, const at::Tensor& gdB, double C, double u,
                              double C64, at::Tensor& Gout, at::Tensor& flag) {
  Gout = ((S + tA.unsqueeze(1)) + tB.unsqueeze(0)) + c0;
  at::Tensor bound = (dnA.unsqueeze(1) * dnB.unsqueeze(0)) * (u * C) +
                     (w + nq * dnA.unsqueeze(1) + np * dnB.unsqueeze(0)) * (kU64 * C64);
  at::Tensor est = at::sqrt(gdA.unsqueeze(1) * gdB.unsqueeze(0)) - Gout;
  flag = bound > est * kTau;
}

// One side of a pass: rows [starts.front(), starts.back()) of X in blocks, each with its reference row.
struct Side {
  std::vector<int64_t> starts;  // block boundaries (absolute rows), size nblk + 1
  std::vector<int64_t> refs;    // reference row of each block (absolute)
  at::Tensor refs_t;            // refs as an int64 tensor on X's device
  at::Tensor dn2;               // [n] fp64 |x_i - ref(i)|^2 (exact differences), summed over column groups
  at::Tensor T;                 // [n, nblk_other] fp64 ref_other_J . (x_i - ref(i)), summed over groups
  int64_t first() const { return starts.front(); }
  int64_t rows() const { return starts.back() - starts.front(); }
  int64_t nblk() const { return static_cast<int64_t>(refs.size()); }
};

// Blocks of a multiple of kAlign rows but the last (equal-ish; the last may be shorter, or up to half a block
// longer where it absorbs a short tail).
// BLAS runs aligned sizes faster: MKL's batched fp32 GEMM of 256 x 256 blocks ran at 336 GFLOP/s here, of
// 250 x 250 at 301.
constexpr int64_t kAlign = 16;

std::vector<int64_t> block_starts(int64_t r0, int64_t r1, int64_t block) {
  std::vector<int64_t> st;
  const int64_t n = r1 - r0;
  const int64_t nblk = std::max<int64_t>(1, (n + block - 1) / block);
  const int64_t size = nblk == 1 ? std::max<int64_t>(n, 1)
                                 : ((n + nblk - 1) / nblk + kAlign - 1) / kAlign * kAlign;
  for (int64_t b = 0; b * size < n || b == 0; ++b) st.push_back(r0 + b * size);  // no empty block
  // a short last block (N = 100: 32, 32, 32, 4) joins the one before: one reference row less, whose dot product
  // every row's prep computes
  if (st.size() >= 3 && (r1 - st.back()) * 2 < size) st.pop_back();
  st.push_back(r1);
  return st;
}

Side make_side(int64_t r0, int64_t r1, int64_t block, const at::Device& dev) {
  Side sd;
  sd.starts = block_starts(r0, r1, block);
  for (size_t b = 0; b + 1 < sd.starts.size(); ++b) sd.refs.push_back((sd.starts[b] + sd.starts[b + 1] - 1) / 2);
  sd.refs_t = at::tensor(sd.refs, at::TensorOptions().dtype(at::kLong)).to(dev);
  return sd;
}

// One block pair's accumulator and where its result goes.
struct Pair {
  int64_t I, J;
  at::Tensor S;  // fp64 [na, nb] view (of G, or scratch): d_i . e_j summed over column groups
};

// The fp32 (fp64 when use64) products of a pass over the segment's columns [c0, c1), in column groups:
// per group, the rounded differences of both sides' rows from their block references (one fused kernel
// pass per block), then every pair's GEMM into its accumulator. dn2 and T of both sides are summed too.
//
// Gtop (the top-level pass of a symmetric fp32 segment, whose pairs tile G's upper triangle): when the device
// has a triangular GEMM (kern.syrk_acc), the products go by row panels of up to kPanelRows rows instead of
// block pairs: the panel's triangle in one triangular GEMM per chunk, the rest of its rows in one GEMM. Fewer,
// larger BLAS calls (and parallel regions), and MKL's triangular GEMM costs ~0.6 of the square one where the
// three half-size GEMMs of a split diagonal block cost ~0.75.
void accumulate(const at::Tensor& A, const at::Tensor& B, int64_t c0, int64_t c1, Side& sa, Side* sb_in,
                std::vector<Pair>& pairs, bool use64, int64_t kc, const GramKernels& kern, Workspace& wsA,
                Workspace& wsB, Workspace& wsProd, Workspace& wsTmp, Prof* prof, at::Tensor* Gtop = nullptr,
                at::Tensor* gdA = nullptr, at::Tensor* gdB = nullptr) {
  const bool sym = sb_in == nullptr;
  bool panels = Gtop != nullptr && sym && !use64 && static_cast<bool>(kern.syrk_acc);
  Side& sb = sym ? sa : *sb_in;
  const int64_t s = c1 - c0, nck = n_chunks(s, kc), gck = group_chunks(A.size(1), kc);
  auto f64 = A.options().dtype(at::kDouble);
  auto dopt = A.options().dtype(use64 ? at::kDouble : at::kFloat);
  sa.dn2 = at::zeros({sa.rows()}, f64);
  sa.T = at::zeros({sa.rows(), sb.nblk()}, f64);
  if (!sym) {
    sb.dn2 = at::zeros({sb.rows()}, f64);
    sb.T = at::zeros({sb.rows(), sa.nblk()}, f64);
  }
  for (auto& pr : pairs) pr.S.zero_();
  if (panels && kern.sym_pass) {  // the device's fused pass: prep and triangle per cache-sized column group
    const int64_t o = sa.first(), n = sa.rows();
    at::Tensor Sd = Gtop->narrow(0, o, n).narrow(1, o, n);
    const int64_t groups = kern.sym_pass(A, sa.starts, sa.refs, c0, c1, kc, Sd, sa.dn2, sa.T, gdA, wsA.buf);
    if (groups > 0) {
      if (prof) {
        prof->n_packed += groups;
        prof->lap(3);
      }
      return;
    }
  }
  // the rows' squared norms folded into the prep pass (kern.prep_norms): their lanes, between column groups
  at::Tensor ssA, ssB;
  if (gdA != nullptr) ssA = at::zeros({sa.rows(), 16}, f64);
  if (gdB != nullptr && !sym) ssB = at::zeros({sb.rows(), 16}, f64);
  for (int64_t g0 = 0; g0 < nck; g0 += gck) {
    const int64_t ng = std::min(gck, nck - g0);
    const int64_t gc0 = c0 + g0 * kc, gc1 = std::min(c1, gc0 + ng * kc);
    const bool last = g0 + gck >= nck;
    auto prep_side = [&](const at::Tensor& X, Side& sd, const at::Tensor& other, const Side& so, Workspace& ws,
                         at::Tensor* gd, at::Tensor& ss) {
      at::Tensor D = ws.view({ng, sd.rows(), kc}, dopt);
      const int64_t tail = ng * kc - (gc1 - gc0);
      if (tail > 0) D.select(0, ng - 1).narrow(1, kc - tail, tail).zero_();
      at::Tensor dn = wsTmp.view({sd.rows() * (1 + so.nblk())}, f64);
      at::Tensor dn2 = dn.narrow(0, 0, sd.rows()), T = dn.narrow(0, sd.rows(), sd.rows() * so.nblk())
                                                            .view({sd.rows(), so.nblk()});
      for (int64_t b = 0; b < sd.nblk(); ++b) {
        const int64_t r0 = sd.starts[b], r1 = sd.starts[b + 1];
        if (r1 == r0) continue;
        const int64_t o = r0 - sd.first();
        at::Tensor Db = D.narrow(1, o, r1 - r0), dnb = dn2.narrow(0, o, r1 - r0), Tb = T.narrow(0, o, r1 - r0);
        if (gd != nullptr) {
          at::Tensor ssb = ss.narrow(0, o, r1 - r0), gdb = gd->narrow(0, r0, r1 - r0);
          kern.prep_norms(X, r0, r1, sd.refs[b], other, so.refs_t, gc0, gc1, Db, dnb, Tb, ssb, gdb, last);
        } else {
          kern.prep(X, r0, r1, sd.refs[b], other, so.refs_t, gc0, gc1, Db, dnb, Tb);
        }
      }
      sd.dn2.add_(dn2);
      sd.T.add_(T);
      return D;
    };
    at::Tensor DA = prep_side(A, sa, B, sb, wsA, gdA, ssA);
    at::Tensor DB = sym ? DA : prep_side(B, sb, A, sa, wsB, gdB, ssB);
    if (prof) prof->lap(1);
    if (panels) {
      const int64_t n = sa.rows(), o = sa.first();
      for (int64_t r0 = 0; r0 < n && panels; r0 += kPanelRows) {
        const int64_t r1 = std::min(n, r0 + kPanelRows), nr = r1 - r0;
        at::Tensor Sd = Gtop->narrow(0, o + r0, nr).narrow(1, o + r0, nr);
        at::Tensor prod = wsProd.view({ng, nr, nr}, DA.options());
        if (!kern.syrk_acc(Sd, DA.narrow(1, r0, nr), prod)) {
          TORCH_CHECK(g0 == 0 && r0 == 0, "segment_gram: the triangular GEMM failed mid-pass");
          panels = false;  // not available: block pairs below, from the start
          break;
        }
        if (prof) {
          ++prof->n_tri;
          prof->lap(3);
        }
        if (r1 < n)
          gemm_acc(Gtop->narrow(0, o + r0, nr).narrow(1, o + r1, n - r1), DA.narrow(1, r0, nr),
                   DA.narrow(1, r1, n - r1), kern, &wsProd, prof);
      }
      if (panels) continue;
    }
    for (auto& pr : pairs) {
      const int64_t a0 = sa.starts[pr.I] - sa.first(), na = sa.starts[pr.I + 1] - sa.starts[pr.I];
      const int64_t b0 = sb.starts[pr.J] - sb.first(), nb = sb.starts[pr.J + 1] - sb.starts[pr.J];
      if (prof) prof->lap(2);
      gemm_acc(pr.S, DA.narrow(1, a0, na), DB.narrow(1, b0, nb), kern, &wsProd, prof, sym && pr.I == pr.J);
    }
  }
}

// Error-bound constants of a pass (see the header comment).
struct Bounds {
  double C, u, C64;
};

Bounds bounds(int64_t s, bool use64, int64_t kc) {
  const double C = use64 ? (1.0 + kKappa * std::sqrt(static_cast<double>(std::max<int64_t>(s, 1))))
                         : gemm_const(s, kc);
  return {C, use64 ? kU64 : kU32, 1.0 + std::sqrt(static_cast<double>(s))};
}

// Small host-side steps, as plain loops for CPU tensors: each ATen op a call uses for the first time in a process
// maps its code pages (isfinite + all, sqrt, index_select and stack together ~1.3 ms on the Zen 3 VM, a first
// segment_gram at N = 100 being ~30 ms); other devices keep the ATen ops (one host synchronisation each).
bool host_cpu_f64(const at::Tensor& t) {
  return t.device().is_cpu() && t.scalar_type() == at::kDouble && t.is_contiguous();
}

// elementwise sqrt (correctly rounded either way: the same bits)
at::Tensor sqrt_of(const at::Tensor& t) {
  if (!host_cpu_f64(t)) return at::sqrt(t);
  at::Tensor out = at::empty_like(t);
  const double* a = t.const_data_ptr<double>();
  double* o = out.data_ptr<double>();
  for (int64_t i = 0; i < t.numel(); ++i) o[i] = std::sqrt(a[i]);
  return out;
}

bool all_finite(const at::Tensor& t) {
  if (!host_cpu_f64(t)) return at::isfinite(t).all().item<bool>();
  const double* a = t.const_data_ptr<double>();
  for (int64_t i = 0; i < t.numel(); ++i)
    if (!std::isfinite(a[i])) return false;
  return true;
}

// gd[refs[k]] for every k, on the host
std::vector<double> gather_host(const at::Tensor& gd, const Side& sd) {
  std::vector<double> out(sd.refs.size());
  if (host_cpu_f64(gd)) {
    const double* a = gd.const_data_ptr<double>();
    for (size_t k = 0; k < out.size(); ++k) out[k] = a[sd.refs[k]];
  } else {
    at::Tensor g = gd.index_select(0, sd.refs_t).cpu().contiguous();
    std::copy(g.const_data_ptr<double>(), g.const_data_ptr<double>() + g.numel(), out.begin());
  }
  return out;
}

// the pairs' flagged counts (int64 scalars on the data's device), on the host
std::vector<int64_t> counts_host(const std::vector<at::Tensor>& counts) {
  std::vector<int64_t> out(counts.size());
  if (counts.empty() || counts.front().device().is_cpu()) {
    for (size_t k = 0; k < counts.size(); ++k) out[k] = counts[k].item<int64_t>();
  } else {
    at::Tensor c = at::stack(counts).cpu().contiguous();  // one synchronisation for all pairs
    std::copy(c.const_data_ptr<int64_t>(), c.const_data_ptr<int64_t>() + c.numel(), out.begin());
  }
  return out;
}

// Combine one pair's accumulator (in place: pr.S becomes the pair's Gram block) with the fp64 terms, and
// flag the entries whose certificate fails. w = |p - q|^2, gp, gq the references' squared norms.
// Returns the number flagged as an int64 tensor on the data's device (no host synchronisation).
at::Tensor combine_pair(const LayerCtx& ctx, const Side& sa, const Side& sb, const Pair& pr, double w, double gp,
                        double gq, const Bounds& bd, bool upper, at::Tensor& flag) {
  const int64_t a0 = sa.starts[pr.I], na = sa.starts[pr.I + 1] - a0;
  const int64_t b0 = sb.starts[pr.J], nb = sb.starts[pr.J + 1] - b0;
  const double cc = 0.5 * ((gp + gq) - w);
  at::Tensor tA = sa.T.narrow(0, a0 - sa.first(), na).select(1, pr.J);
  at::Tensor tB = sb.T.narrow(0, b0 - sb.first(), nb).select(1, pr.I);
  at::Tensor dnA = sqrt_of(sa.dn2.narrow(0, a0 - sa.first(), na));
  at::Tensor dnB = sqrt_of(sb.dn2.narrow(0, b0 - sb.first(), nb));
  at::Tensor gA = ctx.gdA.narrow(0, a0, na), gB = ctx.gdB.narrow(0, b0, nb);
  at::Tensor G = pr.S;
  if (ctx.k->combine) {
    flag = at::empty({na, nb}, ctx.A.options().dtype(at::kBool));
    const CombineArgs ca{cc, w, std::sqrt(gp), std::sqrt(gq), bd.C, bd.u, bd.C64, upper};
    return at::scalar_tensor(ctx.k->combine(pr.S, tA, tB, ca, dnA, dnB, gA, gB, G, flag),
                             at::TensorOptions().dtype(at::kLong));
  }
  at::Tensor Gb;
  combine_and_check(pr.S, tA, tB, cc, w, std::sqrt(gp), std::sqrt(gq), dnA, dnB, gA, gB, bd.C, bd.u, bd.C64, Gb,
                    flag);
  if (upper) flag = at::triu(flag, 1);
  G.copy_(Gb);
  return flag.sum(at::kLong);
}

// One pass over rows [a0,a1) x [b0,b1) with the sub-blocks' middle rows as references, computed from
// scratch in column groups (used by refinement, so small blocks; fp64 GEMM when use64): the new values
// where `mask` is set are written to G; returns the entries (within mask) still flagged.
at::Tensor local_pass(LayerCtx& ctx, int64_t a0, int64_t a1, int64_t b0, int64_t b1, bool use64,
                      const at::Tensor& mask) {
  const int64_t s = ctx.c1 - ctx.c0, na = a1 - a0, nb = b1 - b0;
  const bool same = ctx.sym && a0 == b0 && a1 == b1;
  const at::Device dev = ctx.A.device();
  Side sa = make_side(a0, a1, na, dev);
  Side sb = same ? Side() : make_side(b0, b1, nb, dev);
  std::vector<Pair> pairs{{0, 0, at::empty({na, nb}, ctx.A.options().dtype(at::kDouble))}};
  const int64_t kc = chunk_width(s, ctx.k->max_chunk);
  accumulate(ctx.A, ctx.B, ctx.c0, ctx.c1, sa, same ? nullptr : &sb, pairs, use64, kc, *ctx.k, ctx.ws[0],
             ctx.ws[1], ctx.ws[2], ctx.ws[3], nullptr);
  const Side& B = same ? sa : sb;
  const int64_t p = sa.refs[0], q = B.refs[0];
  auto iopt = ctx.A.options().dtype(at::kLong);
  const double w =
      ctx.k->dist2(ctx.A, ctx.B, at::full({1}, p, iopt), at::full({1}, q, iopt), ctx.c0, ctx.c1).item<double>();
  const double gp = ctx.gdA[p].item<double>(), gq = ctx.gdB[q].item<double>();
  at::Tensor fl;
  combine_pair(ctx, sa, B, pairs[0], w, gp, gq, bounds(s, use64, kc), same, fl);
  at::Tensor Gv = ctx.G.narrow(0, a0, na).narrow(1, b0, nb);
  Gv.copy_(at::where(mask, pairs[0].S, Gv));
  ctx.n_refined += mask.sum().item<int64_t>();
  return mask.logical_and(fl);
}

// Direct fp64 distance for the flagged entries: G = (|a|^2 + |b|^2 - |a - b|^2) / 2 (duplicates -> G_ii).
void direct_entries(LayerCtx& ctx, int64_t a0, int64_t b0, const at::Tensor& mask) {
  at::Tensor idx = mask.nonzero();  // [K, 2]
  const int64_t K = idx.size(0);
  if (K == 0) return;
  ctx.n_direct += K;
  at::Tensor ii = idx.select(1, 0) + a0, jj = idx.select(1, 1) + b0;
  at::Tensor d2 = ctx.k->dist2(ctx.A, ctx.B, ii, jj, ctx.c0, ctx.c1);
  at::Tensor g = ((ctx.gdA.index_select(0, ii) + ctx.gdB.index_select(0, jj)) - d2) * 0.5;
  ctx.G.index_put_({ii, jj}, g);
}

// Fix the flagged entries (mask [na, nb] bool) of G[a0:a1, b0:b1]. top64: the pass that flagged them
// already ran in fp64 with this block's own references (small segments), so go direct.
void refine(LayerCtx& ctx, int64_t a0, int64_t a1, int64_t b0, int64_t b1, const at::Tensor& mask,
                   bool top64) {
  const int64_t na = a1 - a0, nb = b1 - b0;
  if (top64) {
    direct_entries(ctx, a0, b0, mask);
    return;
  }
  // Few flagged entries (the usual case: neighbours along a trajectory): their exact fp64 distances cost
  // less than recomputing whole sub-blocks, which costs the block's full GEMM at every level.
  if (mask.sum().item<int64_t>() * kDirectCost <= na * nb) {
    direct_entries(ctx, a0, b0, mask);
    return;
  }
  if (std::max(na, nb) <= kLeaf) {
    ++ctx.n_leaf64;
    direct_entries(ctx, a0, b0, local_pass(ctx, a0, a1, b0, b1, /*use64=*/true, mask));
    return;
  }
  const int64_t am = a0 + (na + 1) / 2, bm = b0 + (nb + 1) / 2;
  const int64_t as[3] = {a0, am, a1}, bs[3] = {b0, bm, b1};
  for (int x = 0; x < 2; ++x) {
    for (int y = 0; y < 2; ++y) {
      const int64_t sa0 = as[x], sa1 = as[x + 1], sb0 = bs[y], sb1 = bs[y + 1];
      if (sa1 <= sa0 || sb1 <= sb0) continue;
      at::Tensor m = mask.narrow(0, sa0 - a0, sa1 - sa0).narrow(1, sb0 - b0, sb1 - sb0);
      if (!m.any().item<bool>()) continue;
      if (std::max(sa1 - sa0, sb1 - sb0) <= kLeaf) {
        refine(ctx, sa0, sa1, sb0, sb1, m, false);
        continue;
      }
      ++ctx.n_subpass;
      at::Tensor still = local_pass(ctx, sa0, sa1, sb0, sb1, /*use64=*/ctx.in64, m);
      if (still.any().item<bool>()) refine(ctx, sa0, sa1, sb0, sb1, still, false);
    }
  }
}

// The whole op: X [N, P], offsets [L+1] (CPU int64 values), Y [M, P] or undefined. Returns [L, N, M].
at::Tensor run(const at::Tensor& X_in, const std::vector<int64_t>& off, const at::Tensor& Y_in,
               const GramKernels& kern) {
  HighestMatmulPrecision precision_guard;
  const bool sym = !Y_in.defined();
  at::Tensor X = X_in.stride(1) == 1 ? X_in : X_in.contiguous();
  at::Tensor Y = sym ? X : (Y_in.stride(1) == 1 ? Y_in : Y_in.contiguous());
  const int64_t N = X.size(0), M = Y.size(0), L = static_cast<int64_t>(off.size()) - 1;
  const bool in64 = X.scalar_type() == at::kDouble;
  Prof prof;
  // every entry is written below (blocks, then the mirror), except for empty segments
  at::Tensor out = at::empty({L, N, M}, X.options().dtype(at::kDouble));
  if (N == 0 || M == 0) return out;
  std::optional<ThreadsForCall> threads;
  if (X.device().is_cpu()) threads.emplace(thread_cap(X, N, M));
  Workspace ws[4];  // reused by every segment, group and block pair (fresh memory costs page faults)
  for (int64_t l = 0; l < L; ++l) {
    const int64_t c0 = off[l], c1 = off[l + 1], s = c1 - c0;
    if (s == 0) {
      out.select(0, l).zero_();
      continue;
    }
    LayerCtx ctx;
    ctx.A = X;
    ctx.B = Y;
    ctx.c0 = c0;
    ctx.c1 = c1;
    ctx.sym = sym;
    ctx.in64 = in64;
    ctx.k = &kern;
    ctx.ws = ws;
    ctx.G = out.select(0, l);
    prof.lap(7);
    // the rows' canonical squared norms: folded into the prep pass where the device has it (one pass over X
    // less), else their own pass; checked for NaN / inf after that pass
    const char* fold_env = std::getenv("PYLANDSCAPE_GRAM_FOLD_NORMS");  // 0: their own pass (tests compare)
    const bool fold = static_cast<bool>(kern.prep_norms) && !(fold_env && fold_env[0] == '0');
    auto f64 = X.options().dtype(at::kDouble);
    ctx.gdA = fold ? at::empty({N}, f64) : kern.sumsq(X, c0, c1);
    ctx.gdB = sym ? ctx.gdA : (fold ? at::empty({M}, f64) : kern.sumsq(Y, c0, c1));
    auto check_finite = [&]() {
      for (int side = 0; side < (sym ? 1 : 2); ++side) {
        at::Tensor gd = side == 0 ? ctx.gdA : ctx.gdB;
        if (!all_finite(gd)) {
          const int64_t bad = at::logical_not(at::isfinite(gd)).nonzero().select(1, 0)[0].item<int64_t>();
          TORCH_CHECK_VALUE(false, "segment_gram: ", side == 0 ? "X" : "Y", " row ", bad, " holds NaN or inf ",
                            "(or overflows) in segment ", l, " (columns ", c0, ":", c1, ")");
        }
      }
    };
    if (!fold) check_finite();
    const bool small = s <= kSmallLayer || in64;  // fp64 differences and GEMMs
    const int64_t blk = s <= kSmallLayer ? kSmallBlock : block_rows(std::max(N, M), X.device().is_cpu());
    Side sa = make_side(0, N, blk, X.device());
    Side sb = sym ? Side() : make_side(0, M, blk, X.device());
    const Side& B = sym ? sa : sb;
    const int64_t nA = sa.nblk(), nB = B.nblk();
    std::vector<Pair> pairs;
    for (int64_t I = 0; I < nA; ++I) {
      for (int64_t J = sym ? I : 0; J < nB; ++J) {
        const int64_t a0 = sa.starts[I], na = sa.starts[I + 1] - a0, b0 = B.starts[J], nb = B.starts[J + 1] - b0;
        if (na > 0 && nb > 0) pairs.push_back({I, J, ctx.G.narrow(0, a0, na).narrow(1, b0, nb)});
      }
    }
    ctx.n_pairs = static_cast<int64_t>(pairs.size());
    prof.lap(0);
    const int64_t kc = chunk_width(s, kern.max_chunk);
    const int64_t split0 = prof.n_split, tri0 = prof.n_tri, packed0 = prof.n_packed;
    accumulate(X, Y, c0, c1, sa, sym ? nullptr : &sb, pairs, small, kc, kern, ws[0], ws[1], ws[2], ws[3], &prof,
               &ctx.G, fold ? &ctx.gdA : nullptr, fold && !sym ? &ctx.gdB : nullptr);
    if (fold) check_finite();
    // |p_I - q_J|^2 for every block pair, and the reference norms (one host copy per segment). Symmetric: only
    // I < J is computed; (I, I) is 0 and (J, I) the same value ((p - q)^2 = (q - p)^2 exactly), so the same bits
    // for a third of the pairs at 3 blocks
    at::Tensor W;
    if (sym) {
      std::vector<int64_t> ii, jj, pi, qj;  // the pairs I < J, and their reference rows
      for (int64_t I = 0; I < nA; ++I) {
        for (int64_t J = I + 1; J < nA; ++J) {
          ii.push_back(I);
          jj.push_back(J);
          pi.push_back(sa.refs[I]);
          qj.push_back(sa.refs[J]);
        }
      }
      W = at::zeros({nA, nA}, f64.device(at::kCPU));
      if (!ii.empty()) {
        const auto i64 = at::TensorOptions().dtype(at::kLong);
        at::Tensor d = kern.dist2(X, Y, at::tensor(pi, i64).to(X.device()), at::tensor(qj, i64).to(X.device()), c0, c1)
                           .cpu();
        double* wp = W.data_ptr<double>();
        const double* dp = d.const_data_ptr<double>();
        for (size_t k = 0; k < ii.size(); ++k) wp[ii[k] * nA + jj[k]] = wp[jj[k] * nA + ii[k]] = dp[k];
      }
    } else {
      at::Tensor pi = sa.refs_t.repeat_interleave(nB), qj = B.refs_t.repeat({nA});
      W = kern.dist2(X, Y, pi, qj, c0, c1).view({nA, nB}).cpu();
    }
    const std::vector<double> gdp = gather_host(ctx.gdA, sa), gdq = gather_host(ctx.gdB, B);
    const double* w = W.const_data_ptr<double>();
    // (the fused pass's fp32 chains are shorter than kc, cpu::kSyrkChain: the bound keeps kc, conservative. With
    // the chain's length instead, fewer near pairs went to the exact distances and bench_gram.py's worst 1 - cos
    // error at N = 1,000 was 1.3e-5 instead of 5.6e-6, for ~1% less time)
    const Bounds bd = bounds(s, small, kc);
    std::vector<at::Tensor> flags, counts;
    for (const Pair& pr : pairs) {
      prof.lap(2);
      at::Tensor flag;
      counts.push_back(combine_pair(ctx, sa, B, pr, w[pr.I * nB + pr.J], gdp[pr.I], gdq[pr.J], bd,
                                    sym && pr.I == pr.J, flag));
      flags.push_back(flag);
      prof.lap(5);
    }
    // one host synchronisation per segment: which pairs need refinement
    const std::vector<int64_t> cnt = counts_host(counts);
    for (size_t k = 0; k < pairs.size(); ++k) {
      if (cnt[k] == 0) continue;
      const Pair& pr = pairs[k];
      refine(ctx, sa.starts[pr.I], sa.starts[pr.I + 1], B.starts[pr.J], B.starts[pr.J + 1], flags[k],
             small && !in64);
    }
    prof.lap(6);
    if (prof.on) {
      // diagnostics (tests read these counters to show that each path ran): the top-level path (fp64 for
      // small segments and fp64 input, else fp32), its blocks and block pairs, split diagonal GEMMs,
      // triangular-GEMM panels (x column groups), the threads it ran on, and
      // the refinement: sub-block passes, fp64 leaf passes, entries refined, entries given the direct
      // distance
      auto ll = [](int64_t v) { return static_cast<long long>(v); };
      std::fprintf(stderr, "[segment_gram] segment %lld cols=%lld path=%s blocks=%lldx%lld pairs=%lld "
                   "split=%lld tri=%lld packed=%lld subpass=%lld leaf64=%lld refined=%lld direct=%lld of=%lld "
                   "threads=%d\n",
                   ll(l), ll(s), small ? "fp64" : "fp32", ll(nA), ll(nB), ll(ctx.n_pairs), ll(prof.n_split - split0),
                   ll(prof.n_tri - tri0), ll(prof.n_packed - packed0),
                   ll(ctx.n_subpass), ll(ctx.n_leaf64), ll(ctx.n_refined), ll(ctx.n_direct),
                   ll(sym ? N * (N - 1) / 2 : N * M), threads_now());
    }
    if (sym && kern.mirror) {
      kern.mirror(ctx.G, ctx.gdA);
    } else if (sym) {  // mirror the upper triangle (lower-triangle entries are overwritten)
      at::Tensor g = ctx.G;
      g.triu_(1);
      g.add_(g.t().clone());
      g.diagonal().copy_(ctx.gdA);
    }
  }
  prof.lap(7);
  if (prof.on) {
    std::fprintf(stderr, "[segment_gram] seconds: norms %.3f  prep %.3f  pair setup %.3f  gemm %.3f  acc %.3f  "
                 "combine+check %.3f  refine %.3f  output/mirror %.3f\n", prof.t[0], prof.t[1], prof.t[2],
                 prof.t[3], prof.t[4], prof.t[5], prof.t[6], prof.t[7]);
  }
  return out;
}

}  // namespace

at::Tensor segment_gram(const at::Tensor& X, const at::Tensor& offsets, const std::optional<at::Tensor>& Y,
                        const GramKernels& kern) {
  TORCH_CHECK_VALUE(X.dim() == 2, "segment_gram: X must be [N, P], got ", X.dim(), " dims");
  check_float(X, "X");
  if (Y.has_value()) {
    const at::Tensor& y = *Y;
    TORCH_CHECK_VALUE(y.dim() == 2, "segment_gram: Y must be [M, P], got ", y.dim(), " dims");
    TORCH_CHECK_VALUE(y.scalar_type() == X.scalar_type(), "segment_gram: Y must have X's dtype ",
                      X.scalar_type(), ", got ", y.scalar_type());
    TORCH_CHECK_VALUE(y.size(1) == X.size(1), "segment_gram: Y must have X's row length P = ", X.size(1),
                      ", got ", y.size(1));
    TORCH_CHECK_VALUE(y.device() == X.device(), "segment_gram: X and Y must be on the same device");
  }
  const at::Tensor o = check_offsets(offsets, X.size(1));
  std::vector<int64_t> off(o.const_data_ptr<int64_t>(), o.const_data_ptr<int64_t>() + o.numel());
  return run(X, off, Y.has_value() ? *Y : at::Tensor(), kern);
}

}  // namespace gram
}  // namespace pylandscape
