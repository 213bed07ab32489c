// tests/core/test_number_types.cpp — tessera's bf16 / fp16 / fp8 against CUDA, bit for bit.
//
// The promise of core/number.hpp is that a conversion on the CPU gives exactly the bits
// CUDA gives. The only trustworthy reference for that is CUDA itself, so this test includes
// cuda_fp8.h, cuda_fp16.h and cuda_bf16.h and calls their *host* conversion functions,
// compiled by plain g++ (no GPU and no CUDA runtime needed). It checks:
//   * every FP8 code decoded, and every fp16 / bf16 code decoded (65536 each);
//   * for every code of every format: the value itself, the midpoints to its neighbours
//     (the ties), one float ulp either side of each midpoint, and the neighbouring floats;
//   * edge cases (±0, ±inf, NaNs with payloads and signs, max finite, just above it,
//     subnormals, the smallest subnormal and half of it);
//   * 1,000,000 random floats per format and saturation mode (uniform bit patterns, and
//     log-uniform values spread over the format's range), and as many random doubles;
//   * the class constructors (which saturate for FP8) and the integer constructors.
// Mismatches are counted; the first few are printed with input and both outputs in hex.
//
// Without the CUDA headers there is nothing to compare with, so the program reports
// "skipped" to CTest (exit code 77, see tests/core/CMakeLists.txt) instead of passing.

#if !defined(TESSERA_HAVE_CUDA_HEADERS)

#include <cstdio>

int main() {
  std::puts(
      "SKIPPED: test_number_types needs cuda_fp8.h, cuda_fp16.h and cuda_bf16.h "
      "(CUDA toolkit headers), which were not found at configure time");
  return 77;
}

#else

#define BOOST_TEST_MODULE number_types
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <bit>
#include <boost/test/unit_test.hpp>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "tessera/core/number.hpp"

namespace {

using namespace tessera;

constexpr std::uint64_t kSeed = 0x7E55E4A2025ull;
constexpr int kRandomCount = 1'000'000;

// Counts mismatches between ours and CUDA's bits over many inputs, remembering the first few.
class Mismatches {
 public:
  explicit Mismatches(std::string what) : what_(std::move(what)) {}
  template <class In>
  void check(In input, std::uint64_t ours, std::uint64_t cuda) {
    ++checked_;
    if (ours == cuda) return;
    if (++count_ <= 8) {
      std::ostringstream line;
      using InBits = std::conditional_t<sizeof(In) == 8, std::uint64_t, std::uint32_t>;
      line << what_ << ": input " << std::hexfloat << input << " (bits 0x" << std::hex
           << std::bit_cast<InBits>(input) << ") ours 0x" << ours << " cuda 0x" << cuda;
      BOOST_TEST_MESSAGE(line.str());
    }
  }
  ~Mismatches() {
    BOOST_TEST_MESSAGE(what_ << ": " << checked_ << " inputs compared");
    BOOST_TEST(count_ == 0, what_ << ": " << count_ << " of " << checked_ << " differ");
  }

 private:
  std::string what_;
  long long checked_ = 0;
  long long count_ = 0;
};

std::uint32_t float_bits(float x) { return std::bit_cast<std::uint32_t>(x); }

// Floats worth converting around one representable value v of a narrower format whose
// neighbour above (in magnitude) is `next`: v, the tie between them, the floats just around
// the tie, and v's own float neighbours. Both signs.
void add_around(std::vector<float>& out, float v, float next) {
  const float inf = std::numeric_limits<float>::infinity();
  const float mid = v + (next - v) / 2;  // exact: both lie on a grid far coarser than float's
  for (float x : {v, mid, std::nextafter(mid, 0.0f), std::nextafter(mid, inf),
                  std::nextafter(v, 0.0f), std::nextafter(v, inf)}) {
    out.push_back(x);
    out.push_back(-x);
  }
}

std::vector<float> special_floats() {
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> v = {0.0f,
                          -0.0f,
                          inf,
                          -inf,
                          std::numeric_limits<float>::max(),
                          -std::numeric_limits<float>::max(),
                          std::numeric_limits<float>::min(),
                          std::numeric_limits<float>::denorm_min(),
                          -std::numeric_limits<float>::denorm_min(),
                          1.0f,
                          -1.0f};
  // NaNs: quiet and signalling, both signs, assorted payloads.
  for (std::uint32_t bits : {0x7FC00000u, 0xFFC00000u, 0x7F800001u, 0xFF800001u, 0x7FFFFFFFu,
                             0xFFFFFFFFu, 0x7FA00000u, 0x7F900000u, 0x7FE00000u, 0xFFB00001u}) {
    v.push_back(std::bit_cast<float>(bits));
  }
  return v;
}

// Random floats: half uniform 32-bit patterns (all of float, NaNs included), half
// log-uniform magnitudes from a quarter of the format's smallest subnormal to four times
// its largest finite value, with random mantissa bits (so ties and near-ties show up).
std::vector<float> random_floats(std::mt19937_64& rng, float min_subnormal, float max_finite) {
  std::vector<float> v;
  v.reserve(kRandomCount);
  std::uniform_int_distribution<std::uint32_t> any_bits;
  const int lo = std::ilogb(min_subnormal) - 2;
  const int hi = std::ilogb(max_finite) + 2;
  std::uniform_int_distribution<int> exponent(lo, hi);
  std::uniform_int_distribution<std::uint32_t> mantissa(0, (1u << 23) - 1);
  std::bernoulli_distribution negative(0.5);
  for (int i = 0; i < kRandomCount; ++i) {
    if (i % 2 == 0) {
      v.push_back(std::bit_cast<float>(any_bits(rng)));
    } else {
      // Keep only a few low mantissa bits sometimes, which makes exact ties likely.
      std::uint32_t m = mantissa(rng);
      if (i % 6 == 1) m &= 0xFFF00000u;
      const float x = std::ldexp(std::bit_cast<float>(0x3F800000u | m), exponent(rng));
      v.push_back(negative(rng) ? -x : x);
    }
  }
  return v;
}

std::vector<double> random_doubles(std::mt19937_64& rng, double min_subnormal, double max_finite) {
  std::vector<double> v;
  v.reserve(kRandomCount);
  const int lo = std::ilogb(min_subnormal) - 2;
  const int hi = std::ilogb(max_finite) + 2;
  std::uniform_int_distribution<int> exponent(lo, hi);
  std::uniform_int_distribution<std::uint64_t> any_bits;
  std::bernoulli_distribution negative(0.5);
  for (int i = 0; i < kRandomCount; ++i) {
    if (i % 4 == 0) {
      v.push_back(std::bit_cast<double>(any_bits(rng)));
    } else {
      // Keep the top mantissa bits only in some draws (exact ties), all of them in others
      // (ties broken far below float precision: a double-rounding trap).
      std::uint64_t m = any_bits(rng) & ((1ull << 52) - 1);
      if (i % 4 == 1) m &= 0xFFF0000000000000ull;
      if (i % 4 == 2) m = (m & 0xFFF0000000000000ull) | 1u;
      const double x = std::ldexp(std::bit_cast<double>(0x3FF0000000000000ull | m), exponent(rng));
      v.push_back(negative(rng) ? -x : x);
    }
  }
  return v;
}

// Every float worth checking for a format, by walking all its codes.
template <class T>
std::vector<float> code_neighbourhood_floats(int code_count) {
  std::vector<float> v = special_floats();
  for (int c = 0; c + 1 < code_count; ++c) {
    const float a = static_cast<float>(T::from_bits(static_cast<decltype(T{}.bits)>(c)));
    const float b = static_cast<float>(T::from_bits(static_cast<decltype(T{}.bits)>(c + 1)));
    if (std::isfinite(a) && std::isfinite(b)) add_around(v, a, b);
  }
  // Just above the largest finite value, up to and past the overflow threshold.
  const float max = number_traits<T>::max_finite;
  const float ulp = std::ldexp(number_traits<T>::epsilon, std::ilogb(max));  // top binade spacing
  for (float x : {max, max + ulp / 2, std::nextafter(max + ulp / 2, 0.0f),
                  std::nextafter(max + ulp / 2, std::numeric_limits<float>::infinity()), max + ulp,
                  2 * max}) {
    v.push_back(x);
    v.push_back(-x);
  }
  // The smallest subnormal, half of it (a tie with zero) and around that.
  const float tiny = number_traits<T>::min_subnormal;
  for (float x : {tiny, tiny / 2, std::nextafter(tiny / 2, 0.0f), std::nextafter(tiny / 2, 1.0f),
                  tiny / 4, tiny * 1.5f, tiny * 2.5f}) {
    v.push_back(x);
    v.push_back(-x);
  }
  return v;
}

__nv_fp8_interpretation_t interpretation_of(fp8_e4m3) { return __NV_E4M3; }
__nv_fp8_interpretation_t interpretation_of(fp8_e5m2) { return __NV_E5M2; }
__nv_saturation_t cuda_mode(Fp8Saturation m) {
  return m == Fp8Saturation::kSatFinite ? __NV_SATFINITE : __NV_NOSAT;
}

float cuda_fp8_to_float(std::uint8_t code, __nv_fp8_interpretation_t format) {
  return __half2float(__half(__nv_cvt_fp8_to_halfraw(code, format)));
}

}  // namespace

BOOST_AUTO_TEST_CASE(seed_is_printed) {
  BOOST_TEST_MESSAGE("seed = 0x" << std::hex << kSeed);
  BOOST_TEST(true);
}

// ---- traits: checked against the decoded codes, not restated ------------------------------
template <class T>
void check_traits(std::uint16_t max_code, std::uint16_t one_code, std::uint16_t one_next_code) {
  using traits = number_traits<T>;
  using Bits = decltype(T{}.bits);
  BOOST_TEST(traits::sizeof_bits == 8 * static_cast<int>(sizeof(T)));
  BOOST_TEST(traits::is_low_precision);
  BOOST_TEST(traits::max_finite == static_cast<float>(T::from_bits(static_cast<Bits>(max_code))));
  BOOST_TEST(static_cast<float>(T::from_bits(static_cast<Bits>(one_code))) == 1.0f);
  BOOST_TEST(traits::epsilon ==
             static_cast<float>(T::from_bits(static_cast<Bits>(one_next_code))) - 1.0f);
  BOOST_TEST(traits::min_subnormal == static_cast<float>(T::from_bits(Bits{1})));
  BOOST_TEST(traits::mantissa_bits + traits::exponent_bits + 1 == traits::sizeof_bits);
}

BOOST_AUTO_TEST_CASE(traits_match_the_encodings) {
  check_traits<bf16>(0x7F7F, 0x3F80, 0x3F81);
  check_traits<fp16>(0x7BFF, 0x3C00, 0x3C01);
  check_traits<fp8_e4m3>(0x7E, 0x38, 0x39);
  check_traits<fp8_e5m2>(0x7B, 0x3C, 0x3D);
  BOOST_TEST(std::string(number_traits<float>::name) == "float");
  BOOST_TEST(std::string(number_traits<double>::name) == "double");
  BOOST_TEST(std::string(number_traits<bf16>::name) == "bf16");
  BOOST_TEST(std::string(number_traits<fp16>::name) == "fp16");
  BOOST_TEST(std::string(number_traits<fp8_e4m3>::name) == "fp8_e4m3");
  BOOST_TEST(std::string(number_traits<fp8_e5m2>::name) == "fp8_e5m2");
  BOOST_TEST(number_traits<float>::sizeof_bits == 32);
  BOOST_TEST(number_traits<double>::sizeof_bits == 64);
  BOOST_TEST(!number_traits<float>::is_low_precision);
  BOOST_TEST(number_traits<float>::max_finite == std::numeric_limits<float>::max());
  // CUDA's own constants agree.
  BOOST_TEST(__half2float(__half(__half_raw{0x7BFF})) == number_traits<fp16>::max_finite);
  BOOST_TEST(static_cast<float>(__nv_fp8_e4m3(1e9f)) == number_traits<fp8_e4m3>::max_finite);
  BOOST_TEST(static_cast<float>(__nv_fp8_e5m2(1e9f)) == number_traits<fp8_e5m2>::max_finite);
}

// ---- FP8 ----------------------------------------------------------------------------------
template <class Fp8>
void check_fp8_decode() {
  const auto format = interpretation_of(Fp8{});
  Mismatches bits(std::string(number_traits<Fp8>::name) + " decode");
  int nan_codes = 0;
  for (int c = 0; c < 256; ++c) {
    const auto code = static_cast<std::uint8_t>(c);
    const float ours = static_cast<float>(Fp8::from_bits(code));
    const float cuda = cuda_fp8_to_float(code, format);
    BOOST_TEST(std::isnan(ours) == std::isnan(cuda), "code " << c);
    nan_codes += std::isnan(ours);
    bits.check(static_cast<float>(c), float_bits(ours), float_bits(cuda));
    // The class operator gives the same; and to_float, the generic path, too.
    __nv_fp8_storage_t raw = code;
    float cuda_class = 0.0f;
    if (format == __NV_E4M3) {
      __nv_fp8_e4m3 t;
      t.__x = raw;
      cuda_class = static_cast<float>(t);
    } else {
      __nv_fp8_e5m2 t;
      t.__x = raw;
      cuda_class = static_cast<float>(t);
    }
    bits.check(static_cast<float>(c), float_bits(to_float(Fp8::from_bits(code))),
               float_bits(cuda_class));
  }
  BOOST_TEST(nan_codes == (format == __NV_E4M3 ? 2 : 6));
}

BOOST_AUTO_TEST_CASE(fp8_decode_every_code) {
  check_fp8_decode<fp8_e4m3>();
  check_fp8_decode<fp8_e5m2>();
}

template <class Fp8>
void check_fp8_from_floats(const std::vector<float>& inputs, const std::string& label) {
  const auto format = interpretation_of(Fp8{});
  for (Fp8Saturation mode : {Fp8Saturation::kNone, Fp8Saturation::kSatFinite}) {
    Mismatches m(std::string(number_traits<Fp8>::name) + " from float, " + label +
                 (mode == Fp8Saturation::kNone ? ", NOSAT" : ", SATFINITE"));
    for (float x : inputs) {
      m.check(x, Fp8::from_float(x, mode).bits, __nv_cvt_float_to_fp8(x, cuda_mode(mode), format));
    }
  }
  // The constructor saturates, as CUDA's class constructor does.
  Mismatches ctor(std::string(number_traits<Fp8>::name) + " constructor, " + label);
  for (float x : inputs) {
    std::uint8_t cuda = 0;
    if (format == __NV_E4M3) {
      cuda = __nv_fp8_e4m3(x).__x;
    } else {
      cuda = __nv_fp8_e5m2(x).__x;
    }
    ctor.check(x, Fp8(x).bits, cuda);
    ctor.check(x, from_float<Fp8>(x).bits, cuda);
  }
}

template <class Fp8>
void check_fp8_from_doubles(const std::vector<double>& inputs, const std::string& label) {
  const auto format = interpretation_of(Fp8{});
  for (Fp8Saturation mode : {Fp8Saturation::kNone, Fp8Saturation::kSatFinite}) {
    Mismatches m(std::string(number_traits<Fp8>::name) + " from double, " + label +
                 (mode == Fp8Saturation::kNone ? ", NOSAT" : ", SATFINITE"));
    for (double x : inputs) {
      m.check(x, Fp8::from_double(x, mode).bits,
              __nv_cvt_double_to_fp8(x, cuda_mode(mode), format));
    }
  }
  Mismatches ctor(std::string(number_traits<Fp8>::name) + " double constructor, " + label);
  for (double x : inputs) {
    const std::uint8_t cuda = format == __NV_E4M3 ? __nv_fp8_e4m3(x).__x : __nv_fp8_e5m2(x).__x;
    ctor.check(x, Fp8(x).bits, cuda);
  }
}

std::vector<double> widen(const std::vector<float>& v) { return {v.begin(), v.end()}; }

// Doubles near each tie, closer than any float can be: x·(1 ± 2^-40).
std::vector<double> near_ties_in_double(const std::vector<float>& v) {
  std::vector<double> out;
  for (float f : v) {
    if (!std::isfinite(f) || f == 0.0f) continue;
    out.push_back(static_cast<double>(f) * (1.0 + 0x1p-40));
    out.push_back(static_cast<double>(f) * (1.0 - 0x1p-40));
  }
  // NaN doubles: both signs, payloads with and without bit 50 (E5M2 copies it).
  for (std::uint64_t bits :
       {0x7FF8000000000000ull, 0xFFF8000000000000ull, 0x7FF4000000000000ull, 0xFFF4000000000000ull,
        0x7FF0000000000001ull, 0x7FFC000000000000ull, 0xFFFFFFFFFFFFFFFFull}) {
    out.push_back(std::bit_cast<double>(bits));
  }
  return out;
}

template <class Fp8>
void check_fp8_conversions() {
  std::mt19937_64 rng(kSeed ^ static_cast<std::uint64_t>(number_traits<Fp8>::exponent_bits));
  using traits = number_traits<Fp8>;
  const auto edges = code_neighbourhood_floats<Fp8>(128);
  check_fp8_from_floats<Fp8>(edges, "edge cases");
  check_fp8_from_floats<Fp8>(random_floats(rng, traits::min_subnormal, traits::max_finite),
                             "random");
  check_fp8_from_doubles<Fp8>(widen(edges), "edge cases");
  check_fp8_from_doubles<Fp8>(near_ties_in_double(edges), "near ties");
  check_fp8_from_doubles<Fp8>(random_doubles(rng, traits::min_subnormal, traits::max_finite),
                              "random");
}

BOOST_AUTO_TEST_CASE(fp8_e4m3_from_float_and_double) { check_fp8_conversions<fp8_e4m3>(); }
BOOST_AUTO_TEST_CASE(fp8_e5m2_from_float_and_double) { check_fp8_conversions<fp8_e5m2>(); }

BOOST_AUTO_TEST_CASE(fp8_known_values) {
  // A few values worked out by hand, so a reader sees the formats without CUDA.
  BOOST_TEST(fp8_e4m3(1.0f).bits == 0x38);
  BOOST_TEST(fp8_e4m3(-2.0f).bits == 0xC0);
  BOOST_TEST(fp8_e4m3(448.0f).bits == 0x7E);
  BOOST_TEST(fp8_e4m3(464.0f).bits == 0x7E);  // tie between 448 and (NaN) 480: even wins
  BOOST_TEST(fp8_e4m3::from_float(465.0f, Fp8Saturation::kNone).bits == 0x7F);  // NaN
  BOOST_TEST(fp8_e4m3::from_float(-1e9f, Fp8Saturation::kSatFinite).bits == 0xFE);
  BOOST_TEST(fp8_e4m3(0x1p-10f).bits == 0x00);   // half the smallest subnormal: tie to zero
  BOOST_TEST(fp8_e4m3(-0x1p-10f).bits == 0x80);  // ... keeping the sign
  BOOST_TEST(
      fp8_e5m2::from_float(std::numeric_limits<float>::infinity(), Fp8Saturation::kNone).bits ==
      0x7C);
  BOOST_TEST(fp8_e5m2(std::numeric_limits<float>::infinity()).bits == 0x7B);
  BOOST_TEST(fp8_e5m2(61440.0f).bits == 0x7B);  // saturating constructor
  BOOST_TEST(fp8_e5m2::from_float(61440.0f, Fp8Saturation::kNone).bits == 0x7C);
}

// ---- fp16 ---------------------------------------------------------------------------------
BOOST_AUTO_TEST_CASE(fp16_decode_every_code) {
  Mismatches m("fp16 decode");
  for (int c = 0; c < 65536; ++c) {
    const auto code = static_cast<std::uint16_t>(c);
    const float ours = static_cast<float>(fp16::from_bits(code));
    const float cuda = __half2float(__half(__half_raw{code}));
    m.check(static_cast<float>(c), float_bits(ours), float_bits(cuda));
  }
}

BOOST_AUTO_TEST_CASE(fp16_from_float_and_double) {
  std::mt19937_64 rng(kSeed ^ 16u);
  const auto edges = code_neighbourhood_floats<fp16>(0x7C00);
  const auto random =
      random_floats(rng, number_traits<fp16>::min_subnormal, number_traits<fp16>::max_finite);
  for (const auto* inputs : {&edges, &random}) {
    Mismatches m(inputs == &edges ? "fp16 from float, edge cases" : "fp16 from float, random");
    for (float x : *inputs) {
      const std::uint16_t cuda = __half_as_ushort(__float2half_rn(x));
      m.check(x, fp16(x).bits, cuda);
      m.check(x, from_float<fp16>(x).bits, cuda);
    }
  }
  auto doubles = near_ties_in_double(edges);
  const auto more =
      random_doubles(rng, number_traits<fp16>::min_subnormal, number_traits<fp16>::max_finite);
  doubles.insert(doubles.end(), more.begin(), more.end());
  for (float f : edges) doubles.push_back(f);
  Mismatches m("fp16 from double");
  for (double x : doubles) m.check(x, fp16(x).bits, __half_as_ushort(__double2half(x)));
}

// ---- bf16 ---------------------------------------------------------------------------------
BOOST_AUTO_TEST_CASE(bf16_decode_every_code) {
  Mismatches m("bf16 decode");
  for (int c = 0; c < 65536; ++c) {
    const auto code = static_cast<std::uint16_t>(c);
    const float ours = static_cast<float>(bf16::from_bits(code));
    const float cuda = __bfloat162float(__nv_bfloat16(__nv_bfloat16_raw{code}));
    m.check(static_cast<float>(c), float_bits(ours), float_bits(cuda));
  }
}

BOOST_AUTO_TEST_CASE(bf16_from_float_and_double) {
  std::mt19937_64 rng(kSeed ^ 8u);
  const auto edges = code_neighbourhood_floats<bf16>(0x7F80);
  const auto random =
      random_floats(rng, number_traits<bf16>::min_subnormal, number_traits<bf16>::max_finite);
  for (const auto* inputs : {&edges, &random}) {
    Mismatches m(inputs == &edges ? "bf16 from float, edge cases" : "bf16 from float, random");
    for (float x : *inputs) {
      const std::uint16_t cuda = __bfloat16_as_ushort(__float2bfloat16_rn(x));
      m.check(x, bf16(x).bits, cuda);
      m.check(x, from_float<bf16>(x).bits, cuda);
    }
  }
  auto doubles = near_ties_in_double(edges);
  const auto more =
      random_doubles(rng, number_traits<bf16>::min_subnormal, number_traits<bf16>::max_finite);
  doubles.insert(doubles.end(), more.begin(), more.end());
  for (float f : edges) doubles.push_back(f);
  // Beyond float's range, where a double must not overflow to inf too early or too late.
  for (double x : {3.4028235677973366e38, 3.4e38, 3.3961e38, 1e300, -1e300}) doubles.push_back(x);
  Mismatches m("bf16 from double");
  for (double x : doubles) m.check(x, bf16(x).bits, __bfloat16_as_ushort(__double2bfloat16(x)));
}

// ---- integers, generic helpers, printing --------------------------------------------------
BOOST_AUTO_TEST_CASE(integer_constructors_match_cuda) {
  std::mt19937_64 rng(kSeed ^ 32u);
  std::vector<int> ints;
  for (int i = -70000; i <= 70000; ++i) ints.push_back(i);
  std::uniform_int_distribution<int> any_int;
  for (int i = 0; i < 100000; ++i) ints.push_back(any_int(rng));
  Mismatches half("fp16 from int"), bfloat("bf16 from int"), e4m3("fp8_e4m3 from int");
  for (int i : ints) {
    half.check(static_cast<double>(i), fp16(i).bits, __half_as_ushort(__half(i)));
    bfloat.check(static_cast<double>(i), bf16(i).bits, __bfloat16_as_ushort(__nv_bfloat16(i)));
    e4m3.check(static_cast<double>(i), fp8_e4m3(i).bits, __nv_fp8_e4m3(i).__x);
  }
}

BOOST_AUTO_TEST_CASE(generic_helpers_and_printing) {
  static_assert(Number<float> && Number<double> && Number<bf16> && !Number<int>);
  static_assert(Fp8Type<fp8_e4m3> && !Fp8Type<fp16>);
  // constexpr all the way: usable in static_asserts and table initialisers.
  static_assert(bf16(1.0f).bits == 0x3F80 && fp16(-2.0f).bits == 0xC000);
  static_assert(to_float(fp8_e4m3::from_bits(0x7E)) == 448.0f);
  BOOST_TEST(to_float(1.5) == 1.5f);
  BOOST_TEST(from_float<double>(0.25f) == 0.25);
  BOOST_TEST(to_float(from_float<bf16>(3.0f)) == 3.0f);
  std::ostringstream out;
  out << bf16(0.5f) << ' ' << fp16(-3.0f) << ' ' << fp8_e4m3(1e9f) << ' ' << fp8_e5m2(0.25f);
  BOOST_TEST(out.str() == "0.5 -3 448 0.25");
}

#endif  // TESSERA_HAVE_CUDA_HEADERS
