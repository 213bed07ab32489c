// tessera/ops/cast.hpp — element-type conversion between float, double, bf16, fp16 and the
// two FP8 formats.
//
// How it is built:
//   * Every conversion goes through float (double -> float -> bf16 rounds twice; the
//     difference from a direct conversion is a rare tie and far below what a model notices,
//     and it keeps one rounding routine per format: the number types' own constructors).
//     Conversions to double and between identical types are exact.
//   * FP8 has so little range (e4m3: +-448, e5m2: +-57344) that overflow is the normal case
//     when a tensor is scaled badly, so the default is saturation to the largest finite value
//     (cuda_fp8.h's __NV_SATFINITE, also what the FP8 training recipes assume; +-inf saturates
//     too). Fp8Saturation::kNone keeps the format's own overflow rule instead (e4m3 -> NaN,
//     e5m2 -> inf, as __NV_NOSAT). NaN stays NaN in both modes. The bit-exact encoding is the
//     number types' (tessera/core/number.hpp), which follow cuda_fp8.hpp.
//   * The loop is OpenMP-parallel over elements; each element is independent, so the result
//     does not depend on the thread count.
//
// The small load/store helpers below (widen to the arithmetic type, round once on the way out)
// are also used by matmul.hpp, elementwise.hpp and topk.hpp.
#pragma once

#include <cstdint>
#include <type_traits>

#include "tessera/core/error.hpp"
#include "tessera/core/number.hpp"
#include "tessera/core/tensor.hpp"

namespace tessera::ops {

namespace cast_detail {

template <class T>
inline constexpr bool is_fp8_v = std::is_same_v<T, fp8_e4m3> || std::is_same_v<T, fp8_e5m2>;

template <class T>
inline constexpr bool is_native_v = std::is_same_v<T, float> || std::is_same_v<T, double>;

// The type arithmetic happens in: double for double, float for everything else.
template <class T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Widens a stored value to the arithmetic type A (float or double), exactly.
template <class A, class T>
inline A load(T v) {
  if constexpr (is_native_v<T>) {
    return static_cast<A>(v);
  } else {
    return static_cast<A>(to_float(v));
  }
}

// Rounds an arithmetic value (float or double) once to the stored type T.
template <class T, class A>
inline T store(A v) {
  if constexpr (is_native_v<T>) {
    return static_cast<T>(v);
  } else {
    return from_float<T>(static_cast<float>(v));
  }
}

template <class To, class From>
inline To convert(From v, Fp8Saturation overflow) {
  if constexpr (std::is_same_v<To, From>) {
    return v;
  } else if constexpr (is_native_v<To>) {
    return load<To>(v);
  } else {
    const float f = load<float>(v);
    if constexpr (is_fp8_v<To>) {
      return To::from_float(f, overflow);
    } else {
      return from_float<To>(f);
    }
  }
}

// Below this many elements a parallel region costs more than the loop.
inline constexpr int64_t kParallelElements = int64_t{1} << 15;

}  // namespace cast_detail

// Converts every element of x to To (see the file header for rounding and FP8 overflow).
// x may be a strided view; the result is a new contiguous tensor of the same shape.
template <class To, class From>
Tensor<To> cast(TensorView<const From, Cpu> x, Fp8Saturation overflow = Fp8Saturation::kSatFinite) {
  Tensor<From> owned;
  const From* src = x.data();
  if (!x.is_contiguous()) {
    owned = x.contiguous();
    src = owned.data();
  }
  auto out = Tensor<To>::empty(x.shape());  // same shape as x
  To* dst = out.data();
  const int64_t n = x.numel();
#pragma omp parallel for schedule(static) if (n >= cast_detail::kParallelElements)
  for (int64_t i = 0; i < n; ++i) dst[i] = cast_detail::convert<To, From>(src[i], overflow);
  return out;
}

// The same for a tensor or a mutable view, so `cast<bf16>(t)` deduces From.
template <class To, class From>
Tensor<To> cast(const Tensor<From, Cpu>& x, Fp8Saturation overflow = Fp8Saturation::kSatFinite) {
  return cast<To, From>(x.view(), overflow);
}
template <class To, class From>
  requires(!std::is_const_v<From>)
Tensor<To> cast(TensorView<From, Cpu> x, Fp8Saturation overflow = Fp8Saturation::kSatFinite) {
  return cast<To, From>(TensorView<const From, Cpu>(x), overflow);
}

}  // namespace tessera::ops
