// Shared by the CPU (.cpp) and CUDA (.cu) kernels: one copy of every per-element formula.
#pragma once

// Host side: always inlined. These helpers run inside the PLK_MULTIVERSION hot loops, and a helper left
// out of line is compiled for the baseline ISA (SSE2) and called per element: an unrelated change to
// perturb.cpp once made GCC stop inlining sincos_turn24, and the noise pass ran 2-3x slower (measured).
#if defined(__CUDACC__) || defined(__HIPCC__)
#define PLK_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define PLK_HD inline __attribute__((always_inline))
#else
#define PLK_HD inline
#endif

// Function multiversioning for the CPU hot loops: one binary, AVX-512/AVX2 code chosen at load time.
// Results are identical in every version (only IEEE-exact operations, no contraction).
#if !defined(__CUDACC__) && defined(__x86_64__) && defined(__GNUC__) && defined(__linux__) && \
    !defined(PYLANDSCAPE_NO_MULTIVERSION) && !defined(__SANITIZE_ADDRESS__)
// x86-64-v4 (AVX-512 F/BW/DQ/VL) rather than plain "avx512f": without VL/BW/DQ GCC cannot narrow the
// 64-bit Philox products to 32-bit lanes in registers, and the noise loop ran ~1.7x slower (measured).
#if !defined(__clang__) && __GNUC__ >= 12  // arch=x86-64-vN clone names: GCC 12 checked
#define PLK_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define PLK_MULTIVERSION_ON 1  // also enables the explicit AVX-512 Philox path (csrc/cpu/perturb.cpp)
#else
#define PLK_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#else
#define PLK_MULTIVERSION
#endif

// Helpers called from a PLK_MULTIVERSION function must be inlined into it: a helper compiled on its own
// gets the baseline ISA (SSE2), whatever its caller's clone. GCC would not inline the large noise block
// by itself (it stayed an SSE2 function and made the whole noise pass ~2x slower, measured).
#if defined(__GNUC__) && !defined(__CUDACC__)
#define PLK_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define PLK_ALWAYS_INLINE inline
#endif
