// Standard normal draws from Philox, bit-identical on CPU (any SIMD width), CUDA and the pure-torch
// reference (pylandscape/_reference.py, which follows this file operation by operation).
//
// THE NOISE DEFINITION
//   Element e (0-based position in the flat buffer [P]) of stream (seed, offset) is lane e % 4 of
//   Philox4x32-10 with key = (seed lo32, seed hi32) and counter = (c lo32, c hi32, offset lo32,
//   offset hi32), c = e / 4; seed and offset are int64 read as uint64. The output words (x0, x1, x2, x3)
//   give, by Box-Muller, lanes (r(x0) cos a(x1), r(x0) sin a(x1), r(x2) cos a(x3), r(x2) sin a(x3)):
//     u    = ((x >> 8) + 1) * 2^-24 in [2^-24, 1]       r(x) = sqrt(-2 ln u)   (so |z| <= 5.77)
//     a(x) = 2 pi (x >> 8) 2^-24; octant = x >> 29, fraction in the octant = ((x >> 8) & 0x1FFFFF) 2^-21
//   The normals are float32 values (24 bits of uniform resolution each), cast to the output dtype.
//
// EXACTNESS: ln, sin and cos are our own polynomials (no libm / CUDA transcendentals, whose results
// differ between platforms), evaluated with float32 + - * / sqrt only, each rounded once (IEEE
// round-to-nearest). Host code is compiled with -ffp-contract=off; device code uses the explicit
// __f*_rn intrinsics below, which are never contracted into FMAs, whatever the nvcc flags.
//
// ACCURACY (csrc/tests/test_normal.cpp, against double libm over EVERY one of the 2^24 inputs):
// ln u within 1.68 ulp, the radius sqrt(-2 ln u) within 1.46 ulp, sin and cos within 9.75e-8 absolute
// (1.89 ulp where |sin| > 1e-3). The 2^-24 resolution of u, not the polynomials, limits the tails.
#pragma once
#include <cstdint>
#include <cstring>

#include "pylandscape/exact.h"
#include "pylandscape/philox.h"

namespace pylandscape {

// float32 constants (Taylor / atanh-series coefficients rounded to float32); _reference.py has the same.
constexpr float kPi4 = 0x1.921fb6p-1f;
constexpr float kSqrt2 = 0x1.6a09e6p+0f;
constexpr float kSin1 = -0x1.555556p-3f, kSin2 = 0x1.111112p-7f, kSin3 = -0x1.a01a02p-13f,
                kSin4 = 0x1.71de3ap-19f;
constexpr float kCos1 = -0x1p-1f, kCos2 = 0x1.555556p-5f, kCos3 = -0x1.6c16c2p-10f, kCos4 = 0x1.a01a02p-16f,
                kCos5 = -0x1.27e4fcp-22f;
constexpr float kLog1 = 0x1.555556p-1f, kLog2 = 0x1.99999ap-2f, kLog3 = 0x1.24924ap-2f, kLog4 = 0x1.c71c72p-3f;
constexpr float kLn2Hi = 0x1.62e4p-1f;     // few mantissa bits: e * kLn2Hi is exact for |e| <= 2^8
constexpr float kLn2Lo = 0x1.7f7d1cp-20f;  // ln 2 - kLn2Hi

// ln(n * 2^-24) for an integer n in [1, 2^24]: exponent/mantissa split, then 2 atanh(s), s = f / (2 + f).
PLK_HD float log_u24(uint32_t n) {
  using namespace fp;
  const float nf = static_cast<float>(static_cast<int32_t>(n));  // exact
  const uint32_t b = bits(nf);
  // m = mantissa in [1, 2); when m > sqrt(2) (mantissa bits > those of sqrt(2)) take m / 2 instead (an
  // exponent change, exact), so m lies in [sqrt(1/2), sqrt(2)]. Integer selects: no branches, SIMD-friendly.
  const uint32_t big = (b & 0x7FFFFFu) > 0x3504F3u ? 1u : 0u;
  const float m = from_bits((b & 0x7FFFFFu) | (0x3F800000u - (big << 23)));
  const int32_t e = static_cast<int32_t>(b >> 23) - 127 + static_cast<int32_t>(big) - 24;  // -24 .. 0
  const float f = sub(m, 1.0f);                                   // exact (Sterbenz)
  const float s = div(f, add(f, 2.0f));
  const float s2 = mul(s, s);
  float p = mul(s2, kLog4);
  p = add(p, kLog3);
  p = mul(p, s2);
  p = add(p, kLog2);
  p = mul(p, s2);
  p = add(p, kLog1);
  p = mul(p, s2);
  p = mul(p, s);
  float ln1p = add(s, s);
  ln1p = add(ln1p, p);
  const float ef = static_cast<float>(e);
  float r = mul(ef, kLn2Lo);
  r = add(r, ln1p);
  r = add(r, mul(ef, kLn2Hi));
  return r;
}

// Box-Muller radius sqrt(-2 ln u), u = ((x >> 8) + 1) 2^-24.
PLK_HD float normal_radius(uint32_t x) { return fp::sqrt(fp::mul(log_u24((x >> 8) + 1u), -2.0f)); }

// sin and cos of the angle 2 pi (x >> 8) 2^-24: the octant comes from the bits (exact range
// reduction), then polynomials on [0, pi/4] and exact reflections/sign changes.
PLK_HD void sincos_turn24(uint32_t x, float& sn_out, float& cs_out) {
  using namespace fp;
  const uint32_t o = x >> 29;
  // Selections and sign changes below are bit operations (exact, and branch-free for SIMD).
  const float t0 = mul(static_cast<float>(static_cast<int32_t>((x >> 8) & 0x1FFFFFu)), 0x1p-21f);  // exact
  const float t = select_bits(0u - (o & 1u), sub(1.0f, t0), t0);                                 // exact
  const float th = mul(t, kPi4);
  const float x2 = mul(th, th);
  float ps = mul(x2, kSin4);
  ps = add(ps, kSin3);
  ps = mul(ps, x2);
  ps = add(ps, kSin2);
  ps = mul(ps, x2);
  ps = add(ps, kSin1);
  ps = mul(ps, x2);
  ps = mul(ps, th);
  const float sn = add(th, ps);
  float pc = mul(x2, kCos5);
  pc = add(pc, kCos4);
  pc = mul(pc, x2);
  pc = add(pc, kCos3);
  pc = mul(pc, x2);
  pc = add(pc, kCos2);
  pc = mul(pc, x2);
  pc = add(pc, kCos1);
  pc = mul(pc, x2);
  const float cs = add(pc, 1.0f);
  const uint32_t swap = 0u - (((o + 1u) >> 1) & 1u);
  const uint32_t so = bits(select_bits(swap, cs, sn)) ^ (((o >> 2) & 1u) << 31);
  const uint32_t co = bits(select_bits(swap, sn, cs)) ^ ((((o + 2u) >> 2) & 1u) << 31);
  sn_out = from_bits(so);
  cs_out = from_bits(co);
}

// The four normals of counter c (elements 4c .. 4c+3) of stream (seed, offset).
PLK_HD void philox_normal4(uint64_t seed, uint64_t offset, uint64_t c, float z[4]) {
  const Philox4 w = philox4x32_10(static_cast<uint32_t>(c), static_cast<uint32_t>(c >> 32),
                                  static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32),
                                  static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  const float r01 = normal_radius(w.x[0]);
  const float r23 = normal_radius(w.x[2]);
  float s01, c01, s23, c23;
  sincos_turn24(w.x[1], s01, c01);
  sincos_turn24(w.x[3], s23, c23);
  z[0] = fp::mul(r01, c01);
  z[1] = fp::mul(r01, s01);
  z[2] = fp::mul(r23, c23);
  z[3] = fp::mul(r23, s23);
}

// One perturbed element: w + sigma * z, each operation rounded once in T (float or double).
template <typename T>
PLK_HD T add_noise(T w, T sigma, float z) {
  return fp::add(w, fp::mul(sigma, static_cast<T>(z)));
}

}  // namespace pylandscape
