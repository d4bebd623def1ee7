// Shared by the CPU (.cpp) and CUDA (.cu) kernels: one copy of every per-element formula.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define PLK_HD __host__ __device__ __forceinline__
#else
#define PLK_HD inline
#endif

// Function multiversioning for the CPU hot loops: one binary, AVX-512/AVX2 code chosen at load time.
// Results are identical in every version (only IEEE-exact operations, no contraction).
#if !defined(__CUDACC__) && defined(__x86_64__) && defined(__GNUC__) && defined(__linux__) && \
    !defined(PYLANDSCAPE_NO_MULTIVERSION) && !defined(__SANITIZE_ADDRESS__)
#define PLK_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PLK_MULTIVERSION
#endif
