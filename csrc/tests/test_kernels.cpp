// The CPU kernels through the dispatcher on small cases (built with ASan in CI-less developer runs):
// stats of known layers, the vectorised noise path equal to the scalar formula, interpolate/combine.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>

#include "check.h"
#include "pylandscape/normal.h"

using at::Tensor;

static c10::TypedOperatorHandle<Tensor(const Tensor&, const Tensor&)> op2(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Tensor(const Tensor&, const Tensor&)>();
}

int main() {
  // layer_stats: layers {1,2,3,4}, {} (empty), {5}, {-1e6 + [0, 1, 2]}
  Tensor flat = at::tensor({1.0f, 2.0f, 3.0f, 4.0f, 5.0f, -1e6f, -1e6f + 1, -1e6f + 2});
  Tensor offs = at::tensor({0L, 4L, 4L, 5L, 8L});
  Tensor st = op2("pylandscape::layer_stats").call(flat, offs);
  auto s = st.accessor<double, 2>();
  EXPECT(s[0][0] == 2.5 && std::fabs(s[0][1] - std::sqrt(1.25)) < 1e-15 && s[0][2] == 2.5);
  EXPECT(std::isnan(s[1][0]) && std::isnan(s[1][1]) && std::isnan(s[1][2]));
  EXPECT(s[2][0] == 5.0 && s[2][1] == 0.0 && s[2][2] == 5.0);
  EXPECT(s[3][0] == -1e6 + 1 && std::fabs(s[3][1] - std::sqrt(2.0 / 3.0)) < 1e-12);

  // philox_normal (vectorised blocks) == philox_normal4 (scalar formula), for odd n
  auto pn = c10::Dispatcher::singleton()
                .findSchemaOrThrow("pylandscape::philox_normal", "")
                .typed<Tensor(int64_t, int64_t, int64_t, at::ScalarType)>();
  const int64_t n = 16384 * 2 + 37;
  Tensor z = pn.call(n, -42, 9, at::kFloat);
  const float* zp = z.data_ptr<float>();
  for (int64_t c = 0; 4 * c < n; ++c) {
    float w[4];
    pylandscape::philox_normal4(static_cast<uint64_t>(-42), 9, static_cast<uint64_t>(c), w);
    for (int j = 0; j < 4 && 4 * c + j < n; ++j) EXPECT(zp[4 * c + j] == w[j]);
  }

  // perturb: layers with unaligned starts; element e gets sigma_l * z_e
  auto pert = c10::Dispatcher::singleton()
                  .findSchemaOrThrow("pylandscape::perturb", "")
                  .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t)>();
  Tensor x = at::randn({1001}, at::kDouble);
  Tensor o2 = at::tensor({0L, 3L, 700L, 1001L});
  Tensor scales = at::tensor({0.5, 0.0, 2.0}, at::kDouble).reshape({1, 3});
  Tensor out = pert.call(x, o2, scales, at::tensor({5L}), 0, 1);
  Tensor stats = op2("pylandscape::layer_stats").call(x, o2);
  Tensor zz = pn.call(1001, 5, 0, at::kDouble);
  for (int64_t e = 0; e < 1001; ++e) {
    const int l = e < 3 ? 0 : (e < 700 ? 1 : 2);
    const double sig = scales[0][l].item<double>() * stats[l][2].item<double>();
    const double want = sig == 0 ? x[e].item<double>() : x[e].item<double>() + sig * zz[e].item<double>();
    EXPECT(out[0][e].item<double>() == want);
  }

  // interpolate endpoints and combine
  auto interp = c10::Dispatcher::singleton()
                    .findSchemaOrThrow("pylandscape::interpolate", "")
                    .typed<Tensor(const Tensor&, const Tensor&, const Tensor&)>();
  Tensor a = at::randn({333}), b = at::randn({333});
  Tensor ab = interp.call(a, b, at::tensor({0.0, 1.0}, at::kDouble));
  EXPECT(at::equal(ab[0], a) && at::equal(ab[1], b));
  Tensor W = at::randn({3, 100});
  Tensor cmb = op2("pylandscape::combine").call(W, at::eye(3, at::kDouble));
  EXPECT(at::equal(cmb, W));
  TEST_MAIN_END();
}
