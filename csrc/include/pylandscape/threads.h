// How many threads one CPU op call may use on a shared machine (csrc/host/threads.cpp).
#pragma once

namespace pylandscape {

// Threads that would not wait on a core another process keeps busy: at most at::get_num_threads(), at least
// 1. Linux: the cores, minus the tasks runnable right now (/proc/loadavg) that are not threads of this
// process. Elsewhere, or with PYLANDSCAPE_THREADS=all: at::get_num_threads().
int free_threads();

// The threads an op's parallel regions would use now, from this thread (OpenMP's count; torch's elsewhere).
int threads_now();

// For one op call on the CPU: at most free_threads() threads (OpenMP's and MKL's counts for the calling
// thread; torch's own setting is left alone), restored afterwards.
// Why: libgomp's threads spin at every barrier, so a parallel region whose other thread was descheduled by a
// busy process waits a time slice (measured: a 100 ms Gram call took 2.7 s beside busy processes); one
// thread on the free core instead loses only the parallel speed-up. Results of the perturbation, statistics,
// interpolation and combination kernels do not depend on the thread count; segment_gram's fp32 GEMM may
// round differently (within its certificate, as with torch.set_num_threads).
class ThreadsForCall {
 public:
  explicit ThreadsForCall(int cap = 1 << 30);  // and at most cap threads
  ~ThreadsForCall();
  ThreadsForCall(const ThreadsForCall&) = delete;
  ThreadsForCall& operator=(const ThreadsForCall&) = delete;

 private:
  bool active_ = false;
  int prev_omp_ = 0, prev_mkl_ = 0;
};

}  // namespace pylandscape
