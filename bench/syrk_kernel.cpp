// csrc/cpu/syrk.cpp's kernel alone at the large-N pattern: one packed chunk of n rows (random data), whole
// column tiles as tasks pulled by T threads; GFLOP/s per thread counted on the triangle; checksum of S.
//   g++ -O3 -std=c++20 -ffp-contract=off -Icsrc/include bench/syrk_kernel.cpp csrc/cpu/syrk.cpp -o /tmp/kern -lpthread
//   /tmp/kern 2000 1024 1 1 15     # n, kc, chunks, threads, repeats (best of)
//   /tmp/kern 100 1024 2 1 200 3   # ... and one column tile only (here N = 100's last: columns 96-99)
#include "pylandscape/cpu_syrk.h"
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <random>
#include <thread>
#include <atomic>
#include <algorithm>
using namespace pylandscape::cpu;

int main(int argc, char** argv) {
  const int64_t n = argc > 1 ? atoll(argv[1]) : 2000, kc = argc > 2 ? atoll(argv[2]) : 1024;
  const int64_t nck = argc > 3 ? atoll(argv[3]) : 1;
  const int T = argc > 4 ? atoi(argv[4]) : 1, reps = argc > 5 ? atoi(argv[5]) : 3;
  const int64_t only = argc > 6 ? atoll(argv[6]) : -1;  // one column tile, all its rows
  const int64_t npad = syrk_padded_rows(n), ldc = npad * kc, nt = syrk_col_tiles(n);
  std::vector<float> D(ldc * nck);
  std::mt19937 g(1);
  std::normal_distribution<float> nd;
  for (auto& v : D) v = nd(g);
  std::vector<double> S(n * n, 0.0);
  double best = 1e9;
  for (int r = 0; r < reps; ++r) {
    std::atomic<int64_t> next{0};
    const auto t0 = std::chrono::steady_clock::now();
    auto work = [&] {  // whole column tiles, largest first, as segment_gram's tasks at large n
      for (int64_t t = next++; t < (only >= 0 ? 1 : nt); t = next++)
        syrk_packed(S.data(), n, D.data(), ldc, nck, kc, n, only >= 0 ? only : nt - 1 - t, 0, n);
    };
    std::vector<std::thread> th;
    for (int q = 1; q < T; ++q) th.emplace_back(work);
    work();
    for (auto& x : th) x.join();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  // entries of the triangle computed (j >= i, j < n): all of them, or those of the one tile
  double entries = double(n) * (n + 1) / 2;
  if (only >= 0) {
    entries = 0;
    for (int64_t j = only * kSyrkPad; j < std::min(n, (only + 1) * kSyrkPad); ++j) entries += double(j) + 1;
  }
  const double fl = entries * kc * nck * 2;
  double cs = 0;
  for (auto v : S) cs += v;
  printf("n=%lld kc=%lld chunks=%lld threads=%d%s best %.1f us %.1f GFLOP/s per thread (triangle) checksum %.10g\n",
         (long long)n, (long long)kc, (long long)nck, T, only >= 0 ? " (one tile)" : "", best * 1e6,
         fl / best / 1e9 / T, cs);
}
