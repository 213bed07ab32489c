// tessera/ops/detail/rows.hpp — shared machinery of the row ops (softmax, log-softmax,
// cross-entropy, RMSNorm, LayerNorm). Internal: include the op headers instead.
//
// Why this exists: the row ops are memory- and exp-bound loops whose speed decides the cost
// of a training step's softmax, loss and every normalisation. tessera is header-only and
// built with the compiler's baseline flags (SSE2 on x86-64), so to use the processor's wide
// vectors without asking users for -march flags, each op's per-thread loop is compiled three
// times (baseline, AVX2+FMA, AVX-512) and one of them is picked per call from CPUID:
//   * the op writes its loop over a row range as a lambda `f(begin, end)`;
//   * run_rows<isa>() calls it from a function carrying the `target` attribute and
//     `flatten`, which inlines the lambda and everything it calls, so the whole loop nest is
//     compiled for that instruction set (no per-row or per-element indirect calls);
//   * parallel_rows() splits [0, n) into one contiguous range per OpenMP thread, exactly as
//     schedule(static) does, and dispatches once per thread.
// Every row is reduced by one thread, in one order fixed by the compiled loop, so results do
// not depend on the thread count. The instruction set can change the last bits of a result
// (vector width decides how a row's sum is split into partial sums, and FMA contraction is
// only available on the wider paths); TESSERA_ROW_ISA=baseline|avx2|avx512 forces a path
// (the tests run every path the machine has).
//
// exp: libm's expf is not vectorisable without -ffast-math, and an op that calls it once per
// element runs at scalar speed. exp_approx() is the Cephes single-precision polynomial
// (within 1 ulp of the exact value over the range the row ops use: arguments <= 0; it flushes
// results below 2^-126 to zero), written so that every path vectorises it. double keeps
// std::exp: the double path is the finite-difference reference, not a fast path.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string_view>
#include <type_traits>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "tessera/core/config.hpp"
#include "tessera/core/cpu_features.hpp"
#include "tessera/core/error.hpp"
#include "tessera/core/number.hpp"
#include "tessera/core/shape.hpp"
#include "tessera/core/tensor.hpp"

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__CUDACC__)
#define TESSERA_ROWS_MULTI_ISA 1
#define TESSERA_ROWS_TARGET_AVX2 __attribute__((target("avx2,fma,bmi,bmi2,f16c"), flatten))
#define TESSERA_ROWS_TARGET_AVX512                                                          \
  __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,bmi,bmi2,f16c,"      \
                        "prefer-vector-width=512"),                                        \
                 flatten))
#endif
#if defined(__GNUC__) && !defined(__CUDACC__)
#define TESSERA_ROWS_FLATTEN __attribute__((flatten))
#else
#define TESSERA_ROWS_FLATTEN
#endif

namespace tessera::ops {

// The type the row ops compute and keep statistics in: double for double, float for every
// other element type (float, bf16, fp16).
template <class T>
using row_acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// The element types the row ops (softmax, log-softmax, cross-entropy, norms) accept.
template <class T>
concept RowOpType = std::is_same_v<T, float> || std::is_same_v<T, double> ||
                    std::is_same_v<T, bf16> || std::is_same_v<T, fp16>;

namespace rows_detail {

template <class T>
TESSERA_FORCE_INLINE row_acc_t<T> load(T v) {
  if constexpr (std::is_same_v<T, double> || std::is_same_v<T, float>) {
    return v;
  } else {
    return to_float(v);
  }
}

template <class T>
TESSERA_FORCE_INLINE T store(row_acc_t<T> v) {
  if constexpr (std::is_same_v<T, double> || std::is_same_v<T, float>) {
    return v;
  } else {
    return from_float<T>(v);
  }
}

// Numbers of the right accumulation type, so templates read `k<A>(0.5)`.
template <class A>
TESSERA_FORCE_INLINE constexpr A k(double v) {
  return static_cast<A>(v);
}

// exp(x) for float arguments; see the file header. NaN in, NaN out; x < -87.33 gives 0.
//
// The range tests compare the bits as integers and select with masks, never with a float
// comparison: under the default -ftrapping-math a float compare may raise an exception, so
// GCC refuses to if-convert it and the loop around it stays scalar.
TESSERA_FORCE_INLINE float exp_approx(float x) {
  constexpr float kMinArg = -87.3365478515625f;  // just above ln(2^-126)
  constexpr float kMaxArg = 88.0f;               // the row ops never exceed 0
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;  // ln 2 split so that n * kLn2Hi is exact
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kShift = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  constexpr std::uint32_t kMinBits = detail::bit_cast<std::uint32_t>(kMinArg);
  constexpr std::uint32_t kMaxBits = detail::bit_cast<std::uint32_t>(kMaxArg);
  constexpr std::uint32_t kNegInfBits = 0xFF800000u;
  constexpr std::uint32_t kPosInfBits = 0x7F800000u;
  const std::uint32_t u = detail::bit_cast<std::uint32_t>(x);
  // All ones where x lies in [-inf, kMinArg) (resp. (kMaxArg, +inf]); NaNs are in neither.
  const std::uint32_t below = 0u - static_cast<std::uint32_t>((u > kMinBits) & (u <= kNegInfBits));
  const std::uint32_t above = 0u - static_cast<std::uint32_t>((u > kMaxBits) & (u <= kPosInfBits));
  const std::uint32_t clamped = (below & kMinBits) | (above & kMaxBits) | (~(below | above) & u);
  const float xc = detail::bit_cast<float>(clamped);
  const float t = xc * kLog2e + kShift;
  const float n = t - kShift;  // round(x / ln 2), in [-126, 127]
  // t's bits are those of kShift plus n, so this is n + 127, the exponent field of 2^n;
  // unsigned, so a NaN's bits wrap harmlessly instead of overflowing.
  const std::uint32_t biased = detail::bit_cast<std::uint32_t>(t) - 0x4B400000u + 127u;
  const float r = xc - n * kLn2Hi - n * kLn2Lo;  // |r| <= ln(2) / 2
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float scale = detail::bit_cast<float>(biased << 23);  // 2^n
  const float e = p * scale;
  return detail::bit_cast<float>(~below & detail::bit_cast<std::uint32_t>(e));
}

// exp in the accumulation type: the polynomial for float, libm for double.
template <class A>
TESSERA_FORCE_INLINE A exp_acc(A x) {
  if constexpr (std::is_same_v<A, float>) {
    return exp_approx(x);
  } else {
    return std::exp(x);
  }
}

// A contiguous view of an input: borrowed when it already is contiguous, copied otherwise.
template <class T>
struct Dense {
  Tensor<T> owned;
  const T* data = nullptr;
  explicit Dense(TensorView<const T, Cpu> v) {
    if (v.is_contiguous()) {
      data = v.data();
    } else {
      owned = v.contiguous();
      data = owned.data();
    }
  }
};

// Rows and features of a row op's input: the last axis is the feature axis.
struct RowGeometry {
  int64_t rows = 0;
  int64_t cols = 0;
};

inline RowGeometry row_geometry(const char* op, const char* tensor, const Shape& shape) {
  TESSERA_CHECK(shape.rank() >= 1, op, ": tensor '", tensor, "' has shape ", shape,
                " (rank 0), expected rank >= 1 (the last axis is the feature axis)");
  RowGeometry g;
  g.cols = shape[-1];
  g.rows = 1;  // the product of the leading extents (numel / cols fails when cols is 0)
  for (int i = 0; i + 1 < shape.rank(); ++i) g.rows *= shape[i];
  return g;
}

// ---- instruction-set dispatch -----------------------------------------------------------
enum class Isa { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

inline const char* to_string(Isa isa) {
  switch (isa) {
    case Isa::kBaseline: return "baseline";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
  }
  return "?";
}

// The widest path this processor runs.
inline Isa best_isa() {
#if defined(TESSERA_ROWS_MULTI_ISA)
  const CpuFeatures& f = cpu_features();
  if (f.avx512f && f.avx512bw && f.avx2 && f.fma) return Isa::kAvx512;
  if (f.avx2 && f.fma) return Isa::kAvx2;
#endif
  return Isa::kBaseline;
}

// best_isa(), or a narrower path when TESSERA_ROW_ISA asks for one. Asking for a path the
// processor lacks gives the widest one it has (the variable is a test and triage knob; a
// request must not crash a machine without AVX-512). An unknown name throws.
inline Isa row_isa() {
  const Isa best = best_isa();
  const char* v = std::getenv("TESSERA_ROW_ISA");
  if (v == nullptr || *v == '\0') return best;
  const std::string_view name(v);
  Isa asked = Isa::kBaseline;
  if (name == "baseline") {
    asked = Isa::kBaseline;
  } else if (name == "avx2") {
    asked = Isa::kAvx2;
  } else if (name == "avx512") {
    asked = Isa::kAvx512;
  } else {
    fail("TESSERA_ROW_ISA: '", name, "' is unknown; expected one of baseline, avx2, avx512");
  }
  return static_cast<int>(asked) < static_cast<int>(best) ? asked : best;
}

template <class F>
TESSERA_ROWS_FLATTEN void run_baseline(const F& f, int64_t begin, int64_t end) {
  f(begin, end);
}
#if defined(TESSERA_ROWS_MULTI_ISA)
template <class F>
TESSERA_ROWS_TARGET_AVX2 void run_avx2(const F& f, int64_t begin, int64_t end) {
  f(begin, end);
}
template <class F>
TESSERA_ROWS_TARGET_AVX512 void run_avx512(const F& f, int64_t begin, int64_t end) {
  f(begin, end);
}
#endif

template <class F>
void run_isa(Isa isa, const F& f, int64_t begin, int64_t end) {
#if defined(TESSERA_ROWS_MULTI_ISA)
  switch (isa) {
    case Isa::kAvx512: run_avx512(f, begin, end); return;
    case Isa::kAvx2: run_avx2(f, begin, end); return;
    case Isa::kBaseline: break;
  }
#endif
  (void)isa;
  run_baseline(f, begin, end);
}

// Below this many elements of work a parallel region costs more than it saves.
inline constexpr int64_t kParallelMinWork = int64_t{1} << 15;

// Calls f(begin, end) on disjoint ranges covering [0, n): one contiguous range per OpenMP
// thread (schedule(static)), each compiled for `isa`. `work` estimates the elements touched,
// to stay serial when a parallel region would not pay. f must not throw.
template <class F>
void parallel_rows(Isa isa, int64_t n, int64_t work, const F& f) {
  if (n <= 0) return;
#if defined(_OPENMP)
  if (n > 1 && work >= kParallelMinWork && omp_get_max_threads() > 1 && !omp_in_parallel()) {
#pragma omp parallel
    {
      const int64_t threads = omp_get_num_threads();
      const int64_t t = omp_get_thread_num();
      const int64_t begin = n * t / threads;
      const int64_t end = n * (t + 1) / threads;
      if (begin < end) run_isa(isa, f, begin, end);
    }
    return;
  }
#endif
  (void)work;
  run_isa(isa, f, 0, n);
}

}  // namespace rows_detail
}  // namespace tessera::ops
