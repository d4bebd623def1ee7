// free_threads / ThreadsForCall (declared in pylandscape/threads.h).
#include "pylandscape/threads.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>

#if defined(_OPENMP)
#include <omp.h>
#endif

#if defined(__linux__)
#include <dirent.h>
#include <dlfcn.h>
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
  constexpr int64_t kKeep = 20'000'000, kKeepBusy = 100'000'000;  // ns
  static std::atomic<int64_t> last_t{INT64_MIN / 2};
  static std::atomic<int> last_n{0};
  static std::atomic<int64_t> keep{kKeep};
  const int64_t now = std::chrono::duration_cast<std::chrono::nanoseconds>(
                          std::chrono::steady_clock::now().time_since_epoch()).count();
  if (now - last_t.load(std::memory_order_relaxed) < keep.load()) return std::min(last_n.load(), want);
  // only when this process may run on every core the kernel counts: /proc/loadavg is machine-wide
  cpu_set_t set;
  const long online = sysconf(_SC_NPROCESSORS_ONLN);
  if (online <= 0 || sched_getaffinity(0, sizeof set, &set) != 0 || CPU_COUNT(&set) != online) return want;
  // What counts is a process that keeps a core busy (a training job), not a task that runs for a moment: a
  // thread waking up, a pool thread of this process read as runnable in /proc/loadavg and asleep in
  // /proc/self/task an instant later. Such a moment made the second of back-to-back segment_gram calls run on
  // one thread at twice its time, nearly every time. So this process's count is the larger of two reads
  // around the machine's, and a busy reading must hold in three more samples 1 ms apart (0.2 ms apart still
  // let 1 run in 3 through); that is paid only when busy, and a busy answer is then kept for kKeepBusy.
  auto sample = []() {
    const int own0 = own_runnable_threads();
    const int run = runnable_tasks();
    return run < 0 ? -1 : std::max(0, run - std::max(own0, own_runnable_threads()));
  };
  int others = sample();
  if (others < 0) return want;
  for (int k = 0; k < 3 && others > 0; ++k) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
    const int o = sample();
    if (o >= 0) others = std::min(others, o);
  }
  const int n = std::max(static_cast<int>(online) - others, 1);
  last_n.store(n);
  keep.store(others > 0 ? kKeepBusy : kKeep);
  last_t.store(now, std::memory_order_relaxed);
  return std::min(n, want);
#else
  return want;
#endif
}

namespace {

// MKL's per-thread thread count (what at::set_num_threads sets besides OpenMP's), looked up in the loaded
// libtorch_cpu; null where torch has no MKL.
using mkl_local_fn = int (*)(int);

mkl_local_fn find_mkl_local() {
#if defined(__linux__)
  void* h = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
  if (h == nullptr) return nullptr;
  // the C entry (mkl_service.h: #define mkl_set_num_threads_local MKL_Set_Num_Threads_Local); the lower-case
  // symbol is the Fortran one, which takes a pointer
  auto f = reinterpret_cast<mkl_local_fn>(dlsym(h, "MKL_Set_Num_Threads_Local"));
  dlclose(h);  // the library stays loaded (RTLD_NOLOAD took a reference)
  return f;
#else
  return nullptr;
#endif
}

}  // namespace

// Not at::set_num_threads: besides OpenMP and MKL it resizes torch's pthreadpool (its threads destroyed and
// created again), which made every small op call ~0.5 ms slower (measured with bench_load.py: combine 8->4
// 0.5 -> 1.0 ms beside one busy process). OpenMP's count for this thread (what at::parallel_for's regions
// use) and MKL's per-thread count are what the op's parallel regions and GEMMs read.
int threads_now() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return at::get_num_threads();
#endif
}

ThreadsForCall::ThreadsForCall(int cap) {
  const int want = at::get_num_threads(), n = std::min(free_threads(), std::max(cap, 1));
  if (n >= want) return;
  static const mkl_local_fn mkl_local = find_mkl_local();
#if defined(_OPENMP)
  prev_omp_ = omp_get_max_threads();
  omp_set_num_threads(n);
#endif
  if (mkl_local != nullptr) prev_mkl_ = mkl_local(n);
  active_ = true;
}

ThreadsForCall::~ThreadsForCall() {
  if (!active_) return;
  static const mkl_local_fn mkl_local = find_mkl_local();
#if defined(_OPENMP)
  omp_set_num_threads(prev_omp_);
#endif
  if (mkl_local != nullptr) mkl_local(prev_mkl_);
}

}  // namespace pylandscape
