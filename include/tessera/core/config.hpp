// tessera/core/config.hpp — the few macros that let one header serve g++ and nvcc.
//
// Small functions (number conversions, index arithmetic) are needed on both sides of a CUDA
// program: in host code and inside kernels. nvcc wants such functions marked
// `__host__ __device__`; g++ does not know those words. TESSERA_HD says "callable from both"
// and expands to nothing when the file is compiled by a plain C++ compiler, so the CPU build
// never needs the CUDA toolkit.
#pragma once

#if defined(__CUDACC__)
#define TESSERA_HD __host__ __device__
#else
#define TESSERA_HD
#endif

// For the handful of tiny functions on hot paths (per-element conversions) where a missed
// inlining decision would cost more than the function itself.
#if defined(__CUDACC__)
#define TESSERA_FORCE_INLINE __forceinline__
#elif defined(__GNUC__) || defined(__clang__)
#define TESSERA_FORCE_INLINE inline __attribute__((always_inline))
#elif defined(_MSC_VER)
#define TESSERA_FORCE_INLINE __forceinline
#else
#define TESSERA_FORCE_INLINE inline
#endif
