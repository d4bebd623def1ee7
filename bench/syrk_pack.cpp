// csrc/cpu/syrk.cpp's pack alone (pack_rows16: 16 staged rows into the kernel's packed layout), as the fused
// pass runs it at n rows: per 16-row group, the stage is written (as the prep does, so that it sits in cache),
// then packed; a group's two 1,024-column chunks, into two alternating buffers. "flush": a 64 MB sweep between
// repeats, so that the packed buffers start out of cache. One thread; best of the repeats.
//   g++ -O3 -std=c++20 -ffp-contract=off -Icsrc/include bench/syrk_pack.cpp csrc/cpu/syrk.cpp -o /tmp/pack
//   /tmp/pack 100 50; /tmp/pack 100 50 flush     # n, repeats
#include "pylandscape/cpu_syrk.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
using namespace pylandscape::cpu;

int main(int argc, char** argv) {
  const int64_t n = argc > 1 ? atoll(argv[1]) : 100, kc = 1024, nck = 2, w = kc * nck, ld = w + 16;
  const int reps = argc > 2 ? atoi(argv[2]) : 50;
  const bool flush = argc > 3 && std::strcmp(argv[3], "flush") == 0;
  const int64_t npad = syrk_padded_rows(n), ldc = npad * kc;
  std::vector<float> D(ldc * nck * 2), stage(16 * ld), big(flush ? (64 << 20) / 4 : 0);
  double best = 1e9;
  for (int r = 0; r < reps; ++r) {
    double tp = 0;
    for (int64_t g = 0; g < npad / 16; ++g) {
      for (int q = 0; q < 16; ++q)
        for (int64_t t = 0; t < w; ++t) stage[q * ld + t] = static_cast<float>(q + t + r);
      const auto t1 = std::chrono::steady_clock::now();
      pack_rows16(stage.data(), ld, 0, 16, w, D.data() + (r % 2) * ldc * nck, ldc, kc, g, 0);
      tp += std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
    }
    best = std::min(best, tp);
    for (size_t i = 0; i < big.size(); i += 16) big[i] += 1.0f;
  }
  double cs = 0;
  for (size_t i = 0; i < D.size(); i += 97) cs += D[i];
  std::printf("n=%lld%s: pack %.1f us per group of %lld columns (%.1f GB/s written), checksum %.6g\n",
              static_cast<long long>(n), flush ? " (flushed)" : "", best * 1e6, static_cast<long long>(w),
              npad * w * 4 / best / 1e9, cs);
}
