// csrc/cpu/syrk.cpp's kernel alone at the large-N pattern: one packed chunk of n rows (random data), whole
// column tiles as tasks pulled by T threads; GFLOP/s per thread counted on the triangle; checksum of S.
//   g++ -O3 -std=c++20 -ffp-contract=off -Icsrc/include bench/syrk_kernel.cpp csrc/cpu/syrk.cpp -o /tmp/kern -lpthread
//   /tmp/kern 2000 1024 1 1 15     # n, kc, chunks, threads, repeats (best of)
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
      for (int64_t t = next++; t < nt; t = next++)
        syrk_packed(S.data(), n, D.data(), ldc, nck, kc, n, nt - 1 - t, 0, n);
    };
    std::vector<std::thread> th;
    for (int q = 1; q < T; ++q) th.emplace_back(work);
    work();
    for (auto& x : th) x.join();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  const double fl = double(n) * (n + 1) / 2 * kc * nck * 2;
  double cs = 0;
  for (auto v : S) cs += v;
  printf("n=%lld kc=%lld chunks=%lld threads=%d best %.1f ms %.1f GFLOP/s per thread (triangle) checksum %.10g\n",
         (long long)n, (long long)kc, (long long)nck, T, best * 1e3, fl / best / 1e9 / T, cs);
}
