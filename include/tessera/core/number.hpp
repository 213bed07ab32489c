// tessera/core/number.hpp — bf16, fp16, fp8_e4m3 and fp8_e5m2 as plain value types.
//
// Why our own types rather than CUDA's __nv_bfloat16, __half and __nv_fp8_e4m3?
//  * The CPU build must not need the CUDA toolkit, yet a tensor must hold the same bits on
//    either device: a checkpoint written on the CPU loads on a GPU, and the CPU reference an
//    op is tested against must round exactly where the CUDA kernel rounds.
//  * So each type is a trivially copyable struct around its raw `bits`, and every conversion
//    reproduces CUDA's *host* conversion functions (cuda_fp16.hpp, cuda_bf16.hpp,
//    cuda_fp8.hpp) bit for bit: round to nearest even, the same NaN encodings, the same
//    overflow behaviour. tests/core/test_number_types.cpp checks every FP8 code and millions
//    of random values against those functions. The same code runs in kernels (TESSERA_HD),
//    so CPU and GPU agree by construction.
//
// There is deliberately no arithmetic and no `==`: tessera converts to float, computes and
// accumulates in fp32, and converts back, as tensor cores do; every rounding point is then
// visible in the code. (Comparing raw `bits` is not value equality anyway: +0 and -0 differ,
// and a NaN equals itself.)
//
// Formats (sign bit, exponent bits, stored mantissa bits, exponent bias):
//   bf16      1  8  7  127   IEEE-like: subnormals, ±inf, NaN; range of float
//   fp16      1  5 10   15   IEEE binary16
//   fp8_e4m3  1  4  3    7   OCP "E4M3FN": no infinities, one NaN per sign (S.1111.111),
//                            max finite 448
//   fp8_e5m2  1  5  2   15   IEEE-like: ±inf, NaN, max finite 57344
#pragma once

#include <concepts>
#include <cstdint>
#include <limits>
#include <ostream>
#include <type_traits>

#include "tessera/core/config.hpp"

namespace tessera {

// What an FP8 conversion does with a value beyond the largest finite number (and with ±inf):
// kNone follows the format (inf for E5M2, NaN for E4M3, which has no inf), kSatFinite
// returns the largest finite value of the same sign. NaN stays NaN in both modes.
// These are CUDA's __NV_NOSAT and __NV_SATFINITE.
enum class Fp8Saturation { kNone, kSatFinite };

namespace detail {

// __builtin_bit_cast rather than std::bit_cast: it is constexpr under g++ and usable in
// device code under nvcc without --expt-relaxed-constexpr.
template <class To, class From>
TESSERA_HD constexpr To bit_cast(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast: sizes differ");
  return __builtin_bit_cast(To, from);
}

inline constexpr std::uint64_t kDoubleAbsMask = 0x7FFF'FFFF'FFFF'FFFFull;
inline constexpr std::uint64_t kDoubleInfBits = 0x7FF0'0000'0000'0000ull;
// Spelled out rather than numeric_limits<float>::infinity(), which nvcc treats as host-only.
inline constexpr float kFloatInf = __builtin_bit_cast(float, 0x7F80'0000u);

// 2^e as a float, for e in float's normal exponent range.
TESSERA_HD constexpr float pow2f(int e) {
  return bit_cast<float>(static_cast<std::uint32_t>(e + 127) << 23);
}

// Rounds a finite, non-negative double, given as its bits, to the nearest value of a binary
// format with `ExpBits` exponent bits and `ManBits` stored mantissa bits (ties to even), and
// returns that value's code (the format's bit pattern without the sign).
//
// The top of the format is not special-cased: the returned code may lie beyond the largest
// finite code, and each caller decides what overflow means (inf, NaN or saturation). That is
// what makes one routine serve all four formats, and it matches CUDA exactly, because CUDA's
// overflow thresholds are the points where round-to-nearest-even would step past the last
// finite code.
//
// Every float is exactly a double, so rounding from double also rounds floats, with no
// double-rounding error.
template <int ExpBits, int ManBits>
TESSERA_HD constexpr std::uint64_t round_to_code(std::uint64_t abs_bits) {
  constexpr int kBias = (1 << (ExpBits - 1)) - 1;
  constexpr int kMinNormalExp = 1 - kBias;
  const int biased_exp = static_cast<int>(abs_bits >> 52);
  // Zero, and double subnormals (< 2^-1022), which lie far below half the smallest
  // subnormal of every format here.
  if (biased_exp == 0) return 0;
  const int exp = biased_exp - 1023;
  const std::uint64_t significand = (abs_bits & ((1ull << 52) - 1)) | (1ull << 52);  // 1.m·2^52
  // Near x the format's grid spacing is 2^(grid_exp - ManBits): the binade's exponent, but
  // never below the smallest normal exponent (that is where the subnormals live). `drop` is
  // the number of low significand bits that fall below the grid.
  const int grid_exp = exp > kMinNormalExp ? exp : kMinNormalExp;
  const int drop = 52 - ManBits + (grid_exp - exp);
  // Below half the smallest subnormal: rounds to zero.
  if (drop > 53) return 0;
  std::uint64_t steps = significand >> drop;  // whole grid steps in x
  const std::uint64_t rest = significand & ((1ull << drop) - 1);
  const std::uint64_t half = 1ull << (drop - 1);
  if (rest > half || (rest == half && (steps & 1u))) ++steps;
  // Codes are consecutive along the number line: each binade above the subnormals adds
  // 2^ManBits codes, and `steps` already counts the implicit leading one. A carry out of
  // the mantissa (steps == 2^(ManBits+1)) lands correctly on the next binade's first code.
  return (static_cast<std::uint64_t>(grid_exp - kMinNormalExp) << ManBits) + steps;
}

// The exact float value of a finite code without its sign. Every value of these formats
// is a float, so nothing rounds here.
template <int ExpBits, int ManBits>
TESSERA_HD constexpr float decode_magnitude(std::uint32_t code) {
  constexpr int kBias = (1 << (ExpBits - 1)) - 1;
  const std::uint32_t exp_field = code >> ManBits;
  const std::uint32_t mantissa = code & ((1u << ManBits) - 1);
  if (exp_field == 0) {
    // Subnormal: mantissa · 2^(1 - bias - ManBits). A small integer times a power of two
    // that is a normal float: exact.
    return static_cast<float>(mantissa) * pow2f(1 - kBias - ManBits);
  }
  return bit_cast<float>(((exp_field - kBias + 127) << 23) | (mantissa << (23 - ManBits)));
}

// CUDA's host code decodes every fp16 and FP8 NaN to this one float (sign dropped, all
// mantissa bits set); we do the same so decoded tensors compare equal bit for bit.
inline constexpr std::uint32_t kCudaCanonicalNanBits = 0x7FFF'FFFFu;

TESSERA_HD constexpr float with_sign(bool negative, float magnitude) {
  return negative ? -magnitude : magnitude;
}

// FP8 from a double, for either format, as CUDA's __nv_cvt_double_to_fp8 does it.
// kMaxCode is the largest finite code, kNoSatOverflowCode what kNone gives beyond it.
template <int ExpBits, int ManBits, std::uint8_t kMaxCode, std::uint8_t kNoSatOverflowCode>
TESSERA_HD constexpr std::uint8_t encode_fp8_non_nan(std::uint64_t bits, Fp8Saturation mode) {
  const auto sign = static_cast<std::uint8_t>((bits >> 56) & 0x80u);
  const std::uint64_t abs_bits = bits & kDoubleAbsMask;
  std::uint64_t code =
      abs_bits == kDoubleInfBits ? 0xFFu : round_to_code<ExpBits, ManBits>(abs_bits);
  if (code > kMaxCode) {
    code = mode == Fp8Saturation::kSatFinite ? kMaxCode : kNoSatOverflowCode;
  }
  return static_cast<std::uint8_t>(sign | code);
}

}  // namespace detail

// ---- bf16 ---------------------------------------------------------------------------------
// The top 16 bits of a float: float's range with 8 significant bits. Training's default.
struct bf16 {
  std::uint16_t bits;

  bf16() = default;  // uninitialised, like float: tensors of bf16 can skip a fill
  TESSERA_HD static constexpr bf16 from_bits(std::uint16_t raw) {
    bf16 r{};
    r.bits = raw;
    return r;
  }
  // __float2bfloat16_rn: round to nearest even; any NaN becomes 0x7FFF.
  TESSERA_HD constexpr explicit bf16(float x) : bits(from_float_bits(x)) {}
  // __double2bfloat16: rounded once, directly from the double.
  TESSERA_HD constexpr explicit bf16(double x) : bits(from_double_bits(x)) {}
  // Integers go through double, which is exact for |v| <= 2^53.
  template <std::integral I>
  TESSERA_HD constexpr explicit bf16(I v) : bf16(static_cast<double>(v)) {}

  TESSERA_HD constexpr explicit operator float() const {
    return detail::bit_cast<float>(static_cast<std::uint32_t>(bits) << 16);
  }

 private:
  TESSERA_HD static constexpr std::uint16_t from_float_bits(float x) {
    const auto u = detail::bit_cast<std::uint32_t>(x);
    if ((u & 0x7FFF'FFFFu) > 0x7F80'0000u) return 0x7FFF;
    // Round to nearest even on the 16 dropped bits: adding 0x7FFF plus the last kept bit
    // carries into the kept half exactly when the dropped half is above 0x8000, or equal to
    // it with an odd kept half. A carry into the exponent is the correct next binade, and
    // past the largest finite value it gives inf (0x7F80), as IEEE rounding does.
    return static_cast<std::uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }
  TESSERA_HD static constexpr std::uint16_t from_double_bits(double x) {
    const auto u = detail::bit_cast<std::uint64_t>(x);
    const auto sign = static_cast<std::uint16_t>((u >> 48) & 0x8000u);
    const std::uint64_t abs_bits = u & detail::kDoubleAbsMask;
    if (abs_bits > detail::kDoubleInfBits) return 0x7FFF;
    if (abs_bits == detail::kDoubleInfBits) return sign | 0x7F80u;
    const std::uint64_t code = detail::round_to_code<8, 7>(abs_bits);
    return static_cast<std::uint16_t>(sign | (code > 0x7F7Fu ? 0x7F80u : code));
  }
};

// ---- fp16 ---------------------------------------------------------------------------------
// IEEE binary16: 11 significant bits, but only up to 65504; training needs loss scaling.
struct fp16 {
  std::uint16_t bits;

  fp16() = default;
  TESSERA_HD static constexpr fp16 from_bits(std::uint16_t raw) {
    fp16 r{};
    r.bits = raw;
    return r;
  }
  // __float2half_rn: round to nearest even, overflow to ±inf; any NaN becomes 0x7FFF.
  TESSERA_HD constexpr explicit fp16(float x) : bits(from_double_bits(static_cast<double>(x))) {}
  // __double2half: rounded once, directly from the double.
  TESSERA_HD constexpr explicit fp16(double x) : bits(from_double_bits(x)) {}
  template <std::integral I>
  TESSERA_HD constexpr explicit fp16(I v) : fp16(static_cast<double>(v)) {}

  // __half2float: exact; NaNs decode to CUDA's canonical float NaN.
  TESSERA_HD constexpr explicit operator float() const {
    const bool negative = (bits & 0x8000u) != 0;
    const std::uint32_t code = bits & 0x7FFFu;
    if (code >= 0x7C00u) {
      if (code != 0x7C00u) return detail::bit_cast<float>(detail::kCudaCanonicalNanBits);
      return detail::with_sign(negative, detail::kFloatInf);
    }
    return detail::with_sign(negative, detail::decode_magnitude<5, 10>(code));
  }

 private:
  TESSERA_HD static constexpr std::uint16_t from_double_bits(double x) {
    const auto u = detail::bit_cast<std::uint64_t>(x);
    const auto sign = static_cast<std::uint16_t>((u >> 48) & 0x8000u);
    const std::uint64_t abs_bits = u & detail::kDoubleAbsMask;
    if (abs_bits > detail::kDoubleInfBits) return 0x7FFF;
    if (abs_bits == detail::kDoubleInfBits) return sign | 0x7C00u;
    const std::uint64_t code = detail::round_to_code<5, 10>(abs_bits);
    return static_cast<std::uint16_t>(sign | (code > 0x7BFFu ? 0x7C00u : code));
  }
};

// ---- fp8_e4m3 -----------------------------------------------------------------------------
// 4 significant bits up to ±448; the forward-pass format of FP8 training (DeepSeek-V3 uses
// it everywhere, with fine-grained scaling: quant/fp8_scaling.hpp).
struct fp8_e4m3 {
  std::uint8_t bits;

  fp8_e4m3() = default;
  TESSERA_HD static constexpr fp8_e4m3 from_bits(std::uint8_t raw) {
    fp8_e4m3 r{};
    r.bits = raw;
    return r;
  }
  // __nv_cvt_float_to_fp8(x, mode, __NV_E4M3): any NaN becomes 0x7F first (the float is
  // canonicalised, so its sign is dropped).
  TESSERA_HD static constexpr fp8_e4m3 from_float(float x, Fp8Saturation mode) {
    return from_double(x != x ? detail::bit_cast<float>(0x7FFF'FFFFu) : x, mode);
  }
  // __nv_cvt_double_to_fp8(x, mode, __NV_E4M3): a NaN keeps its sign (0x7F or 0xFF).
  TESSERA_HD static constexpr fp8_e4m3 from_double(double x, Fp8Saturation mode) {
    const auto u = detail::bit_cast<std::uint64_t>(x);
    if ((u & detail::kDoubleAbsMask) > detail::kDoubleInfBits) {
      return from_bits(static_cast<std::uint8_t>(((u >> 56) & 0x80u) | 0x7Fu));
    }
    // E4M3 has no infinity: without saturation an overflow is NaN (0x7F).
    return from_bits(detail::encode_fp8_non_nan<4, 3, 0x7E, 0x7F>(u, mode));
  }
  // The class constructors saturate, like __nv_fp8_e4m3(float) and __nv_fp8_e4m3(double).
  TESSERA_HD constexpr explicit fp8_e4m3(float x)
      : bits(from_float(x, Fp8Saturation::kSatFinite).bits) {}
  TESSERA_HD constexpr explicit fp8_e4m3(double x)
      : bits(from_double(x, Fp8Saturation::kSatFinite).bits) {}
  template <std::integral I>
  TESSERA_HD constexpr explicit fp8_e4m3(I v) : fp8_e4m3(static_cast<double>(v)) {}

  // Exact; both NaN codes decode to CUDA's canonical float NaN.
  TESSERA_HD constexpr explicit operator float() const {
    const bool negative = (bits & 0x80u) != 0;
    const std::uint32_t code = bits & 0x7Fu;
    if (code == 0x7Fu) return detail::bit_cast<float>(detail::kCudaCanonicalNanBits);
    return detail::with_sign(negative, detail::decode_magnitude<4, 3>(code));
  }
};

// ---- fp8_e5m2 -----------------------------------------------------------------------------
// 3 significant bits up to ±57344: range over precision, for gradients.
struct fp8_e5m2 {
  std::uint8_t bits;

  fp8_e5m2() = default;
  TESSERA_HD static constexpr fp8_e5m2 from_bits(std::uint8_t raw) {
    fp8_e5m2 r{};
    r.bits = raw;
    return r;
  }
  // __nv_cvt_float_to_fp8(x, mode, __NV_E5M2): any NaN becomes 0x7F.
  TESSERA_HD static constexpr fp8_e5m2 from_float(float x, Fp8Saturation mode) {
    return from_double(x != x ? detail::bit_cast<float>(0x7FFF'FFFFu) : x, mode);
  }
  // __nv_cvt_double_to_fp8(x, mode, __NV_E5M2). A NaN keeps its sign, and CUDA builds the
  // code as 0x7E | (top two mantissa bits of the double): 0x7E, or 0x7F when bit 50 is set.
  TESSERA_HD static constexpr fp8_e5m2 from_double(double x, Fp8Saturation mode) {
    const auto u = detail::bit_cast<std::uint64_t>(x);
    if ((u & detail::kDoubleAbsMask) > detail::kDoubleInfBits) {
      return from_bits(static_cast<std::uint8_t>(((u >> 56) & 0x80u) | 0x7Eu | ((u >> 50) & 1u)));
    }
    // Without saturation an overflow (or an infinite input) is inf, 0x7C.
    return from_bits(detail::encode_fp8_non_nan<5, 2, 0x7B, 0x7C>(u, mode));
  }
  TESSERA_HD constexpr explicit fp8_e5m2(float x)
      : bits(from_float(x, Fp8Saturation::kSatFinite).bits) {}
  TESSERA_HD constexpr explicit fp8_e5m2(double x)
      : bits(from_double(x, Fp8Saturation::kSatFinite).bits) {}
  template <std::integral I>
  TESSERA_HD constexpr explicit fp8_e5m2(I v) : fp8_e5m2(static_cast<double>(v)) {}

  // Exact; NaNs decode to CUDA's canonical float NaN.
  TESSERA_HD constexpr explicit operator float() const {
    const bool negative = (bits & 0x80u) != 0;
    const std::uint32_t code = bits & 0x7Fu;
    if (code >= 0x7Cu) {
      if (code != 0x7Cu) return detail::bit_cast<float>(detail::kCudaCanonicalNanBits);
      return detail::with_sign(negative, detail::kFloatInf);
    }
    return detail::with_sign(negative, detail::decode_magnitude<5, 2>(code));
  }
};

static_assert(sizeof(bf16) == 2 && alignof(bf16) == 2 && std::is_trivially_copyable_v<bf16>);
static_assert(sizeof(fp16) == 2 && alignof(fp16) == 2 && std::is_trivially_copyable_v<fp16>);
static_assert(sizeof(fp8_e4m3) == 1 && std::is_trivially_copyable_v<fp8_e4m3>);
static_assert(sizeof(fp8_e5m2) == 1 && std::is_trivially_copyable_v<fp8_e5m2>);
static_assert(std::is_trivially_default_constructible_v<bf16> && std::is_standard_layout_v<bf16>);

// ---- traits -------------------------------------------------------------------------------
// One place that says what a number type is. Only the six number types specialise it, and
// the concept below is "has traits", so a typo such as Tensor<int> is rejected at once.
//   sizeof_bits       storage size (so packed formats can say 4 later)
//   exponent_bits, mantissa_bits   the format (mantissa_bits counts stored bits)
//   epsilon           spacing of the numbers just above 1: a relative error bound for
//                     rounding to nearest is epsilon / 2 (for normal values)
//   min_subnormal     the smallest positive value; absolute error bound near zero is half
//   max_finite        the largest finite value (a double for double, a float otherwise)
template <class T>
struct number_traits {};

template <>
struct number_traits<float> {
  static constexpr int sizeof_bits = 32;
  static constexpr const char* name = "float";
  static constexpr bool is_low_precision = false;
  static constexpr int exponent_bits = 8;
  static constexpr int mantissa_bits = 23;
  static constexpr float epsilon = std::numeric_limits<float>::epsilon();
  static constexpr float min_subnormal = std::numeric_limits<float>::denorm_min();
  static constexpr float max_finite = std::numeric_limits<float>::max();
};
template <>
struct number_traits<double> {
  static constexpr int sizeof_bits = 64;
  static constexpr const char* name = "double";
  static constexpr bool is_low_precision = false;
  static constexpr int exponent_bits = 11;
  static constexpr int mantissa_bits = 52;
  static constexpr double epsilon = std::numeric_limits<double>::epsilon();
  static constexpr double min_subnormal = std::numeric_limits<double>::denorm_min();
  static constexpr double max_finite = std::numeric_limits<double>::max();
};
template <>
struct number_traits<bf16> {
  static constexpr int sizeof_bits = 16;
  static constexpr const char* name = "bf16";
  static constexpr bool is_low_precision = true;
  static constexpr int exponent_bits = 8;
  static constexpr int mantissa_bits = 7;
  static constexpr float epsilon = 0x1p-7f;
  static constexpr float min_subnormal = 0x1p-133f;
  static constexpr float max_finite = 0x1.FEp127f;  // 3.3895314e38, bits 0x7F7F
};
template <>
struct number_traits<fp16> {
  static constexpr int sizeof_bits = 16;
  static constexpr const char* name = "fp16";
  static constexpr bool is_low_precision = true;
  static constexpr int exponent_bits = 5;
  static constexpr int mantissa_bits = 10;
  static constexpr float epsilon = 0x1p-10f;
  static constexpr float min_subnormal = 0x1p-24f;
  static constexpr float max_finite = 65504.0f;  // bits 0x7BFF
};
template <>
struct number_traits<fp8_e4m3> {
  static constexpr int sizeof_bits = 8;
  static constexpr const char* name = "fp8_e4m3";
  static constexpr bool is_low_precision = true;
  static constexpr int exponent_bits = 4;
  static constexpr int mantissa_bits = 3;
  static constexpr float epsilon = 0x1p-3f;
  static constexpr float min_subnormal = 0x1p-9f;
  static constexpr float max_finite = 448.0f;  // bits 0x7E (0x7F is NaN)
};
template <>
struct number_traits<fp8_e5m2> {
  static constexpr int sizeof_bits = 8;
  static constexpr const char* name = "fp8_e5m2";
  static constexpr bool is_low_precision = true;
  static constexpr int exponent_bits = 5;
  static constexpr int mantissa_bits = 2;
  static constexpr float epsilon = 0x1p-2f;
  static constexpr float min_subnormal = 0x1p-16f;
  static constexpr float max_finite = 57344.0f;  // bits 0x7B (0x7C is inf)
};

// A tessera number type: one of the six above.
template <class T>
concept Number = std::is_trivially_copyable_v<T> && requires {
  { number_traits<T>::sizeof_bits } -> std::convertible_to<int>;
  { number_traits<T>::name } -> std::convertible_to<const char*>;
  { number_traits<T>::is_low_precision } -> std::convertible_to<bool>;
};

// bf16, fp16 and the FP8 types: the ones stored in fewer bits than they are computed in.
template <class T>
concept LowPrecisionNumber = Number<T> && number_traits<T>::is_low_precision;

template <class T>
concept Fp8Type = std::same_as<T, fp8_e4m3> || std::same_as<T, fp8_e5m2>;

static_assert(Number<float> && Number<double> && Number<bf16> && Number<fp16> && Number<fp8_e4m3> &&
              Number<fp8_e5m2> && !Number<int>);

// ---- conversions for generic code -----------------------------------------------------------
// CPU ops load any element type with to_float, compute in fp32, and store with from_float.
// from_float rounds to nearest even; FP8 saturates (as its constructor does) because an op
// writing an FP8 tensor has already scaled its values into range.
template <Number T>
TESSERA_HD TESSERA_FORCE_INLINE constexpr float to_float(T x) {
  return static_cast<float>(x);
}

template <Number T>
TESSERA_HD TESSERA_FORCE_INLINE constexpr T from_float(float x) {
  return static_cast<T>(x);
}

// Prints the value, not the bits: bf16(0.1f) prints 0.100098.
template <LowPrecisionNumber T>
std::ostream& operator<<(std::ostream& out, T x) {
  return out << static_cast<float>(x);
}

}  // namespace tessera
