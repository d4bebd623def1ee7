// free_threads / ThreadsForCall (declared in pylandscape/threads.h).
#include "pylandscape/threads.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <dirent.h>
#include <sched.h>
#include <unistd.h>
#endif

namespace pylandscape {
namespace {

#if defined(__linux__)
// Runnable tasks on the whole machine (the 4th field of /proc/loadavg, "running/total"); -1 if unknown.
int runnable_tasks() {
  FILE* f = std::fopen("/proc/loadavg", "r");
  if (f == nullptr) return -1;
  double l1, l5, l15;
  int run = -1, total = 0;
  if (std::fscanf(f, "%lf %lf %lf %d/%d", &l1, &l5, &l15, &run, &total) != 5) run = -1;
  std::fclose(f);
  return run;
}

// Threads of this process in state R (running or runnable): the caller, and pool threads still spinning.
int own_runnable_threads() {
  DIR* d = opendir("/proc/self/task");
  if (d == nullptr) return 1;
  int n = 0;
  char path[64], buf[512];
  while (dirent* e = readdir(d)) {
    if (e->d_name[0] == '.') continue;
    std::snprintf(path, sizeof path, "/proc/self/task/%.20s/stat", e->d_name);
    FILE* f = std::fopen(path, "r");
    if (f == nullptr) continue;
    const size_t k = std::fread(buf, 1, sizeof buf - 1, f);
    std::fclose(f);
    buf[k] = '\0';
    const char* p = std::strrchr(buf, ')');  // "pid (comm) S ...": the state follows the last ')'
    if (p != nullptr && p[1] == ' ' && p[2] == 'R') ++n;
  }
  closedir(d);
  return std::max(n, 1);
}
#endif

}  // namespace

int free_threads() {
  const int want = at::get_num_threads();
  const char* env = std::getenv("PYLANDSCAPE_THREADS");
  if (want <= 1 || (env != nullptr && std::strcmp(env, "all") == 0)) return want;
#if defined(__linux__)
  // the answer is kept for kKeep: reading /proc costs ~20-50 us, a small op call ~0.5 ms
  constexpr int64_t kKeep = 20'000'000;  // ns
  static std::atomic<int64_t> last_t{INT64_MIN / 2};
  static std::atomic<int> last_n{0};
  const int64_t now = std::chrono::duration_cast<std::chrono::nanoseconds>(
                          std::chrono::steady_clock::now().time_since_epoch()).count();
  if (now - last_t.load(std::memory_order_relaxed) < kKeep) return std::min(last_n.load(), want);
  // only when this process may run on every core the kernel counts: /proc/loadavg is machine-wide
  cpu_set_t set;
  const long online = sysconf(_SC_NPROCESSORS_ONLN);
  if (online <= 0 || sched_getaffinity(0, sizeof set, &set) != 0 || CPU_COUNT(&set) != online) return want;
  const int run = runnable_tasks();
  if (run < 0) return want;
  const int others = std::max(0, run - own_runnable_threads());
  const int n = std::max(static_cast<int>(online) - others, 1);
  last_n.store(n);
  last_t.store(now, std::memory_order_relaxed);
  return std::min(n, want);
#else
  return want;
#endif
}

ThreadsForCall::ThreadsForCall() {
  const int want = at::get_num_threads(), n = free_threads();
  if (n < want) {
    prev_ = want;
    at::set_num_threads(n);
  }
}

ThreadsForCall::~ThreadsForCall() {
  if (prev_ > 0) at::set_num_threads(prev_);
}

}  // namespace pylandscape
