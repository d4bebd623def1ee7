// segment_gram: accurate per-segment Gram matrices of nearly parallel rows, shared by CPU and CUDA.
//
// The algorithm (one segment = one column segment; A = rows of X, B = rows of Y or X):
//   Rows are blocked (kBlock rows). For a block pair (I, J) with reference rows p (middle row of I) and
//   q (middle row of J), write a_i = p + d_i, b_j = q + e_j. Then
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
// Memory (per segment of s columns): the fp32 (fp64 for fp64 input) differences d of all rows of X (and
// of Y), i.e. one more copy of the segment's slice of the inputs, plus O(N * blocks) fp64 vectors.
//
// This driver is device-generic (ATen ops + at::bmm, i.e. MKL/OpenBLAS or cuBLAS on the current stream) and
// compiled once, by the C++ compiler; the compensated reductions are device kernels passed in through
// GramKernels (pylandscape/gram_driver.h), the per-element math they share is pylandscape/gram.h.
#include "pylandscape/gram_driver.h"

#include <ATen/Context.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "pylandscape/checks.h"

namespace pylandscape {
namespace gram {
namespace {

constexpr int64_t kBlock = 256;      // rows per top-level block
constexpr int64_t kLeaf = 32;        // at most this many rows per side: fp64 pass
constexpr int64_t kDirectCost = 64;  // one direct fp64 distance ~ this many entries of a sub-block pass
constexpr int64_t kSmallLayer = 512; // segments this small go straight to the fp64 pass (cheap, exact-er)
constexpr int64_t kSmallBlock = 1024;  // their rows per block: few block pairs (per-pair overhead dominates)
constexpr int64_t kSplitDiag = 64;   // diagonal blocks of >= 2x this rows: three half-size GEMMs, not four
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
struct Workspace {
  at::Tensor buf;
  at::Tensor view(at::IntArrayRef shape, const at::TensorOptions& opt) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    if (!buf.defined() || buf.numel() < n || buf.scalar_type() != opt.dtype().toScalarType() ||
        buf.device() != opt.device())
      buf = at::empty({n}, opt);
    return buf.narrow(0, 0, n).view(shape);
  }
};

// Wall time per phase (PYLANDSCAPE_GRAM_STATS=1, CPU: the ops there are synchronous).
struct Prof {
  static constexpr int kN = 8;
  bool on = std::getenv("PYLANDSCAPE_GRAM_STATS") != nullptr;
  double t[kN] = {};
  int64_t n_split = 0;  // diagonal blocks cut into three half-size GEMMs
  std::chrono::steady_clock::time_point last = std::chrono::steady_clock::now();
  void lap(int k) {
    if (!on) return;
    const auto now = std::chrono::steady_clock::now();
    t[k] += std::chrono::duration<double>(now - last).count();
    last = now;
  }
};

// Chunk-major workspace [nck, n, kc] for n rows of an s-column segment, the padding columns zeroed.
at::Tensor chunked_workspace(int64_t n, int64_t s, int64_t kc, const at::TensorOptions& opt,
                                    Workspace* ws = nullptr) {
  const int64_t nck = n_chunks(s, kc);
  at::Tensor D = ws ? ws->view({nck, n, kc}, opt) : at::empty({nck, n, kc}, opt);
  const int64_t tail = nck * kc - s;
  if (tail > 0) D.select(0, nck - 1).narrow(1, kc - tail, tail).zero_();
  return D;
}

// sum over chunks of DA[c] @ DB[c]^T, fp32 products summed in fp64 (fp64 workspaces: fp64 GEMMs).
// upper: DB is DA and only the upper triangle (with the diagonal) is needed: the block is cut in halves and
// the lower-left quarter skipped (three GEMMs of a quarter's size instead of four; that quarter stays zero),
// recursively down to kSplitDiag rows.
at::Tensor chunked_gemm(const at::Tensor& DA, const at::Tensor& DB, const GramKernels& kern,
                               Workspace* ws = nullptr, Prof* prof = nullptr, bool upper = false) {
  const int64_t nck = DA.size(0), na = DA.size(1), nb = DB.size(1);
  if (upper && na == nb && na >= 2 * kSplitDiag && DA.scalar_type() == at::kFloat) {
    const int64_t h = na / 2;
    if (prof) ++prof->n_split;
    at::Tensor S = at::zeros({na, nb}, DA.options().dtype(at::kDouble));
    at::Tensor top = DA.narrow(1, 0, h), bot = DA.narrow(1, h, na - h);
    S.narrow(0, 0, h).narrow(1, 0, h).copy_(chunked_gemm(top, top, kern, ws, prof, true));
    S.narrow(0, 0, h).narrow(1, h, na - h).copy_(chunked_gemm(top, bot, kern, ws, prof));
    S.narrow(0, h, na - h).narrow(1, h, na - h).copy_(chunked_gemm(bot, bot, kern, ws, prof, true));
    return S;
  }
  at::Tensor S = at::zeros({na, nb}, DA.options().dtype(at::kDouble));
  if (DA.scalar_type() == at::kDouble) {
    for (int64_t c = 0; c < nck; ++c) S.addmm_(DA.select(0, c), DB.select(0, c).t());
    return S;
  }
  // one batched GEMM over all chunks (as fast as a single long GEMM, unlike a loop of short ones), then
  // the chunk products summed in fp64, always in chunk order
  at::Tensor prod = ws ? ws->view({nck, na, nb}, DA.options()) : at::empty({nck, na, nb}, DA.options());
  at::bmm_out(prod, DA, DB.transpose(1, 2));
  if (prof) prof->lap(3);
  kern.acc(S, prod);
  if (prof) prof->lap(4);
  return S;
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

struct LayerCtx {
  at::Tensor A, B;        // [N, P], [M, P] inputs (B may alias A)
  int64_t c0, c1;         // the segment's columns
  at::Tensor gdA, gdB;    // [N], [M] canonical squared norms (fp64)
  at::Tensor G;           // [N, M] fp64 view: out[l]
  bool sym;               // B is A and only the upper triangle is wanted
  bool in64;              // fp64 input: every GEMM in fp64
  const GramKernels* k;
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

// One pass over rows [a0,a1) x [b0,b1) with the sub-blocks' middle rows as references, computed from
// scratch in column chunks (used by refinement, so small blocks; fp64 GEMM when use64).
void local_pass(LayerCtx& ctx, int64_t a0, int64_t a1, int64_t b0, int64_t b1, bool use64,
                       at::Tensor& Gout, at::Tensor& flag) {
  const int64_t s = ctx.c1 - ctx.c0;
  const int64_t p = (a0 + a1 - 1) / 2, q = (b0 + b1 - 1) / 2;
  auto f64 = ctx.A.options().dtype(at::kDouble);
  auto dopt = ctx.A.options().dtype(use64 ? at::kDouble : at::kFloat);
  const int64_t na = a1 - a0, nb = b1 - b0;
  const int64_t kc = chunk_width(s, ctx.k->max_chunk);
  auto iopt = ctx.A.options().dtype(at::kLong);
  at::Tensor DA = chunked_workspace(na, s, kc, dopt), dnA2 = at::empty({na}, f64), tA = at::empty({na, 1}, f64);
  ctx.k->prep(ctx.A, a0, a1, p, ctx.B, at::full({1}, q, iopt), ctx.c0, ctx.c1, DA, dnA2, tA);
  at::Tensor DB, dnB2, tB;
  if (ctx.sym && a0 == b0 && a1 == b1) {
    DB = DA;
    dnB2 = dnA2;
    tB = tA;
  } else {
    DB = chunked_workspace(nb, s, kc, dopt);
    dnB2 = at::empty({nb}, f64);
    tB = at::empty({nb, 1}, f64);
    ctx.k->prep(ctx.B, b0, b1, q, ctx.A, at::full({1}, p, iopt), ctx.c0, ctx.c1, DB, dnB2, tB);
  }
  at::Tensor S = chunked_gemm(DA, DB, *ctx.k);
  tA = tA.select(1, 0);
  tB = tB.select(1, 0);
  auto opt_i = ctx.A.options().dtype(at::kLong);
  at::Tensor w_t = ctx.k->dist2(ctx.A, ctx.B, at::full({1}, p, opt_i), at::full({1}, q, opt_i), ctx.c0, ctx.c1);
  const double w = w_t.item<double>();
  const double gp = ctx.gdA[p].item<double>(), gq = ctx.gdB[q].item<double>();
  const double c0 = 0.5 * ((gp + gq) - w);
  const double C = use64 ? (1.0 + kKappa * std::sqrt(static_cast<double>(std::max<int64_t>(s, 1))))
                         : gemm_const(s, kc);
  const double u = use64 ? kU64 : kU32;
  combine_and_check(S, tA, tB, c0, w, std::sqrt(gp), std::sqrt(gq), at::sqrt(dnA2), at::sqrt(dnB2),
                    ctx.gdA.narrow(0, a0, na), ctx.gdB.narrow(0, b0, nb), C, u,
                    1.0 + std::sqrt(static_cast<double>(s)), Gout, flag);
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
    at::Tensor Gn, fl;
    ++ctx.n_leaf64;
    local_pass(ctx, a0, a1, b0, b1, /*use64=*/true, Gn, fl);
    at::Tensor Gv = ctx.G.narrow(0, a0, na).narrow(1, b0, nb);
    Gv.copy_(at::where(mask, Gn, Gv));
    ctx.n_refined += mask.sum().item<int64_t>();
    direct_entries(ctx, a0, b0, mask.logical_and(fl));
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
      at::Tensor Gn, fl;
      ++ctx.n_subpass;
      local_pass(ctx, sa0, sa1, sb0, sb1, /*use64=*/ctx.in64, Gn, fl);
      at::Tensor Gv = ctx.G.narrow(0, sa0, sa1 - sa0).narrow(1, sb0, sb1 - sb0);
      Gv.copy_(at::where(m, Gn, Gv));
      ctx.n_refined += m.sum().item<int64_t>();
      at::Tensor still = m.logical_and(fl);
      if (still.any().item<bool>()) refine(ctx, sa0, sa1, sb0, sb1, still, false);
    }
  }
}

struct Side {  // per-block precomputation of one side (A or B) for one segment
  std::vector<int64_t> starts;  // block boundaries, size nblk + 1
  std::vector<int64_t> refs;    // reference row of each block
  at::Tensor D;                 // [n, s] rounded differences x_i - ref(i) (fp32, or fp64 for fp64 input)
  at::Tensor dn;                // [n] fp64 |x_i - ref(i)| (exact differences)
  at::Tensor T;                 // [n, nblk_other] fp64: ref_other_J . (x_i - ref(i))
};

std::vector<int64_t> block_starts(int64_t n, int64_t block = kBlock) {
  std::vector<int64_t> st;
  const int64_t nblk = std::max<int64_t>(1, (n + block - 1) / block);
  // equal-ish blocks (no tiny last block)
  for (int64_t b = 0; b <= nblk; ++b) st.push_back(n * b / nblk);
  return st;
}

std::vector<int64_t> block_refs(const std::vector<int64_t>& st) {
  std::vector<int64_t> r;
  for (size_t b = 0; b + 1 < st.size(); ++b) r.push_back((st[b] + st[b + 1] - 1) / 2);
  return r;
}

// D, dn and T = (x_i - ref(i)) . other_refs for one side, block by block (fused kernel pass).
void prepare_side(const at::Tensor& X, int64_t c0, int64_t c1, Side& sd, const at::Tensor& other,
                         const at::Tensor& other_refs, bool in64, const GramKernels& kern,
                         Workspace* ws = nullptr) {
  const int64_t n = X.size(0), s = c1 - c0;
  auto f64 = X.options().dtype(at::kDouble);
  sd.D = chunked_workspace(n, s, chunk_width(s, kern.max_chunk), X.options().dtype(in64 ? at::kDouble : at::kFloat),
                           ws);
  at::Tensor dn2 = at::empty({n}, f64);
  sd.T = at::empty({n, other_refs.size(0)}, f64);
  const int64_t nblk = static_cast<int64_t>(sd.refs.size());
  for (int64_t b = 0; b < nblk; ++b) {
    const int64_t r0 = sd.starts[b], r1 = sd.starts[b + 1];
    if (r1 == r0) continue;
    at::Tensor D = sd.D.narrow(1, r0, r1 - r0), dn = dn2.narrow(0, r0, r1 - r0), T = sd.T.narrow(0, r0, r1 - r0);
    kern.prep(X, r0, r1, sd.refs[b], other, other_refs, c0, c1, D, dn, T);
  }
  sd.dn = at::sqrt(dn2);
}

// The whole op: X [N, P], offsets [L+1] (CPU int64 values), Y [M, P] or undefined. Returns [L, N, M].
at::Tensor run(const at::Tensor& X_in, const std::vector<int64_t>& off,
                                    const at::Tensor& Y_in, const GramKernels& kern) {
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
  Workspace wsA, wsB, wsProd, wsMirror;  // large buffers, reused by every segment and block pair
  int64_t max_cols = 0, max_nck = 0;  // padded columns and chunks of the largest segment
  for (int64_t l = 0; l < L; ++l) {
    const int64_t s = off[l + 1] - off[l];
    if (s <= kSmallLayer || in64) continue;
    const int64_t kc = chunk_width(s, kern.max_chunk);
    max_cols = std::max(max_cols, n_chunks(s, kc) * kc);
    max_nck = std::max(max_nck, n_chunks(s, kc));
  }
  if (max_nck > 0) {  // sized once for the largest segment: growing them segment by segment re-faults every page
    const auto fopt = X.options().dtype(at::kFloat);
    wsA.view({N, max_cols}, fopt);
    if (!sym) wsB.view({M, max_cols}, fopt);
    wsProd.view({max_nck, std::min(N, kBlock), std::min(M, kBlock)}, fopt);
  }
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
    ctx.G = out.select(0, l);
    prof.lap(7);
    ctx.gdA = kern.sumsq(X, c0, c1);
    ctx.gdB = sym ? ctx.gdA : kern.sumsq(Y, c0, c1);
    for (int side = 0; side < (sym ? 1 : 2); ++side) {
      at::Tensor gd = side == 0 ? ctx.gdA : ctx.gdB;
      if (!at::isfinite(gd).all().item<bool>()) {
        const int64_t bad = at::logical_not(at::isfinite(gd)).nonzero().select(1, 0)[0].item<int64_t>();
        TORCH_CHECK_VALUE(false, "segment_gram: ", side == 0 ? "X" : "Y", " row ", bad, " holds NaN or inf ",
                          "(or overflows) in segment ", l, " (columns ", c0, ":", c1, ")");
      }
    }
    Side sa, sb;
    const bool small = s <= kSmallLayer || in64;
    const int64_t blk = s <= kSmallLayer ? kSmallBlock : kBlock;
    sa.starts = block_starts(N, blk);
    sa.refs = block_refs(sa.starts);
    sb.starts = sym ? sa.starts : block_starts(M, blk);
    sb.refs = sym ? sa.refs : block_refs(sb.starts);
    at::Tensor refsA = at::tensor(sa.refs, at::TensorOptions().dtype(at::kLong)).to(X.device());
    at::Tensor refsB = at::tensor(sb.refs, at::TensorOptions().dtype(at::kLong)).to(X.device());
    prof.lap(0);
    prepare_side(X, c0, c1, sa, Y, refsB, small, kern, small ? nullptr : &wsA);
    if (!sym) prepare_side(Y, c0, c1, sb, X, refsA, small, kern, small ? nullptr : &wsB);
    prof.lap(1);
    const Side& B = sym ? sa : sb;
    // |p_I - q_J|^2 for every block pair, and the reference norms
    const int64_t nA = static_cast<int64_t>(sa.refs.size()), nB = static_cast<int64_t>(B.refs.size());
    at::Tensor pi = refsA.repeat_interleave(nB), qj = refsB.repeat({nA});
    at::Tensor W = kern.dist2(X, Y, pi, qj, c0, c1).view({nA, nB}).cpu();
    at::Tensor gdp = ctx.gdA.index_select(0, refsA).cpu(), gdq = ctx.gdB.index_select(0, refsB).cpu();
    const double C = small ? (1.0 + kKappa * std::sqrt(static_cast<double>(s)))
                           : gemm_const(s, chunk_width(s, kern.max_chunk));
    const double u = small ? kU64 : kU32;
    const double C64 = 1.0 + std::sqrt(static_cast<double>(s));
    const int64_t split0 = prof.n_split;
    for (int64_t I = 0; I < nA; ++I) {
      const int64_t a0 = sa.starts[I], na = sa.starts[I + 1] - a0;
      for (int64_t J = sym ? I : 0; J < nB; ++J) {
        const int64_t b0 = B.starts[J], nb = B.starts[J + 1] - b0;
        if (na == 0 || nb == 0) continue;
        prof.lap(2);
        ++ctx.n_pairs;
        at::Tensor S =
            chunked_gemm(sa.D.narrow(1, a0, na), B.D.narrow(1, b0, nb), kern, small ? nullptr : &wsProd, &prof,
                         sym && I == J);
        const double w = W[I][J].item<double>();
        const double gp = gdp[I].item<double>(), gq = gdq[J].item<double>();
        const double cc = 0.5 * ((gp + gq) - w);
        at::Tensor tA = sa.T.narrow(0, a0, na).select(1, J);
        at::Tensor tB = (sym ? sa.T : sb.T).narrow(0, b0, nb).select(1, I);
        at::Tensor Gv = ctx.G.narrow(0, a0, na).narrow(1, b0, nb);
        at::Tensor dnA = sa.dn.narrow(0, a0, na), dnB = B.dn.narrow(0, b0, nb);
        at::Tensor gA = ctx.gdA.narrow(0, a0, na), gB = ctx.gdB.narrow(0, b0, nb);
        at::Tensor flag;
        bool any;
        if (kern.combine) {
          flag = at::empty({na, nb}, X.options().dtype(at::kBool));
          const CombineArgs ca{cc, w, std::sqrt(gp), std::sqrt(gq), C, u, C64, sym && I == J};
          any = kern.combine(S, tA, tB, ca, dnA, dnB, gA, gB, Gv, flag) > 0;
        } else {
          at::Tensor Gb;
          combine_and_check(S, tA, tB, cc, w, std::sqrt(gp), std::sqrt(gq), dnA, dnB, gA, gB, C, u, C64, Gb, flag);
          if (sym && I == J) flag = at::triu(flag, 1);
          Gv.copy_(Gb);
          any = flag.any().item<bool>();
        }
        prof.lap(5);
        if (any) refine(ctx, a0, a0 + na, b0, b0 + nb, flag, small && !in64);
        prof.lap(6);
      }
    }
    if (std::getenv("PYLANDSCAPE_GRAM_STATS") != nullptr) {
      // diagnostics: how much refinement this segment needed
      // diagnostics (tests read these counters to show that each path ran): the top-level path (fp64 for
      // small segments and fp64 input, else fp32), its blocks and block pairs, split diagonal GEMMs, and
      // the refinement: sub-block passes, fp64 leaf passes, entries refined, entries given the direct
      // distance
      auto ll = [](int64_t v) { return static_cast<long long>(v); };
      std::fprintf(stderr, "[segment_gram] segment %lld cols=%lld path=%s blocks=%lldx%lld pairs=%lld "
                   "split=%lld subpass=%lld leaf64=%lld refined=%lld direct=%lld of=%lld\n", ll(l), ll(s),
                   small ? "fp64" : "fp32", ll(nA), ll(nB), ll(ctx.n_pairs), ll(prof.n_split - split0),
                   ll(ctx.n_subpass), ll(ctx.n_leaf64), ll(ctx.n_refined), ll(ctx.n_direct),
                   ll(sym ? N * (N - 1) / 2 : N * M));
    }
    if (sym && kern.mirror) {
      kern.mirror(ctx.G, ctx.gdA);
    } else if (sym) {  // mirror the upper triangle, through a reused buffer (no fresh N x N temporaries)
      at::Tensor g = ctx.G;
      g.triu_(1);
      at::Tensor low = wsMirror.view({N, N}, g.options());
      low.copy_(g.t());
      g.add_(low);
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
