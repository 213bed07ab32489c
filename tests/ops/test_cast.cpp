// cast<To>(x) between float, double, bf16, fp16, fp8_e4m3 and fp8_e5m2: round trips that must
// be exact, the single rounding of float -> low precision checked against the number types'
// own conversions, FP8 saturation (default) and no-saturation modes, NaN, strided inputs and
// a parallel-sized tensor.
#define BOOST_TEST_MODULE cast
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <cstdint>
#include <limits>

#include "finite_difference.hpp"
#include "tessera/ops/cast.hpp"

using namespace tessera;
using namespace tessera::ops;
using tessera::testing::random_tensor;

namespace {
constexpr uint64_t kSeed = 31337;

template <class T>
uint32_t bits_of(T v) {
  return v.bits;
}

Tensor<float> scaled_floats(Shape s, uint64_t seed, float scale) {
  Tensor<float> f = cast<float>(random_tensor(s, seed));
  for (float& v : f.span()) v *= scale;
  return f;
}

// Every element of cast<T>(x) equals T(float(x[i])) bit for bit, and cast<float> back is exact.
template <class T>
void check_against_number_type(const Tensor<float>& x) {
  const Tensor<T> y = cast<T>(x);
  BOOST_TEST(y.shape() == x.shape());
  int64_t mismatches = 0;
  for (int64_t i = 0; i < x.numel(); ++i)
    if (bits_of(y.data()[i]) != bits_of(from_float<T>(x.data()[i]))) ++mismatches;
  BOOST_TEST(mismatches == 0, number_traits<T>::name);
  const Tensor<float> back = cast<float>(y);
  for (int64_t i = 0; i < x.numel(); ++i) {
    const float want = to_float(y.data()[i]);
    if (!(back.data()[i] == want || (std::isnan(want) && std::isnan(back.data()[i])))) ++mismatches;
  }
  BOOST_TEST(mismatches == 0, number_traits<T>::name << " back to float");
  // Round trip of representable values is exact: T -> float -> T.
  const Tensor<T> again = cast<T>(back);
  for (int64_t i = 0; i < x.numel(); ++i)
    if (bits_of(again.data()[i]) != bits_of(y.data()[i])) ++mismatches;
  BOOST_TEST(mismatches == 0, number_traits<T>::name << " round trip");
}
}  // namespace

BOOST_AUTO_TEST_CASE(float_to_every_type) {
  BOOST_TEST_MESSAGE("seed " << kSeed);
  // 70000 elements: large enough for the parallel loop.
  const Tensor<float> x = scaled_floats({7, 10000}, kSeed, 4.0f);
  check_against_number_type<bf16>(x);
  check_against_number_type<fp16>(x);
  check_against_number_type<fp8_e4m3>(x);
  check_against_number_type<fp8_e5m2>(x);
}

BOOST_AUTO_TEST_CASE(double_float_exact_paths) {
  const Tensor<double> d = random_tensor({5, 13}, kSeed + 1);
  const Tensor<float> f = cast<float>(d);
  const Tensor<double> back = cast<double>(f);
  for (int64_t i = 0; i < d.numel(); ++i) {
    BOOST_TEST(f.data()[i] == static_cast<float>(d.data()[i]));
    BOOST_TEST(back.data()[i] == static_cast<double>(f.data()[i]));
  }
  // Same type: a copy.
  const Tensor<double> same = cast<double>(d);
  for (int64_t i = 0; i < d.numel(); ++i) BOOST_TEST(same.data()[i] == d.data()[i]);
  // Low precision -> double is exact.
  const Tensor<bf16> b = cast<bf16>(d);
  const Tensor<double> bd = cast<double>(b);
  for (int64_t i = 0; i < d.numel(); ++i) BOOST_TEST(bd.data()[i] == static_cast<double>(to_float(b.data()[i])));
  // Between two low-precision types: through float.
  const Tensor<fp8_e4m3> e = cast<fp8_e4m3>(b);
  for (int64_t i = 0; i < d.numel(); ++i)
    BOOST_TEST(bits_of(e.data()[i]) == bits_of(from_float<fp8_e4m3>(to_float(b.data()[i]))));
}

BOOST_AUTO_TEST_CASE(fp8_saturation_modes) {
  const float inf = std::numeric_limits<float>::infinity();
  const auto x = Tensor<float>::from({6}, {1000.0f, -1000.0f, 1e6f, inf, -inf, 448.0f});
  // Default: saturate to the largest finite value of the format.
  const Tensor<float> e4 = cast<float>(cast<fp8_e4m3>(x));
  BOOST_TEST(e4(0) == 448.0f);
  BOOST_TEST(e4(1) == -448.0f);
  BOOST_TEST(e4(3) == 448.0f);
  BOOST_TEST(e4(4) == -448.0f);
  BOOST_TEST(e4(5) == 448.0f);
  const Tensor<float> e5 = cast<float>(cast<fp8_e5m2>(x));
  BOOST_TEST(e5(0) == 1024.0f);
  BOOST_TEST(e5(2) == 57344.0f);
  BOOST_TEST(e5(3) == 57344.0f);
  BOOST_TEST(e5(4) == -57344.0f);
  // No saturation: e4m3 overflows to NaN, e5m2 to inf.
  const Tensor<float> n4 = cast<float>(cast<fp8_e4m3>(x, Fp8Saturation::kNone));
  BOOST_TEST(std::isnan(n4(0)));
  BOOST_TEST(std::isnan(n4(3)));
  BOOST_TEST(n4(5) == 448.0f);
  const Tensor<float> n5 = cast<float>(cast<fp8_e5m2>(x, Fp8Saturation::kNone));
  BOOST_TEST(n5(2) == inf);
  BOOST_TEST(n5(4) == -inf);
  // NaN stays NaN in both modes and in every format.
  const auto nan = Tensor<float>::from({1}, {std::numeric_limits<float>::quiet_NaN()});
  BOOST_TEST(std::isnan(cast<float>(cast<fp8_e4m3>(nan))(0)));
  BOOST_TEST(std::isnan(cast<float>(cast<fp8_e5m2>(nan))(0)));
  BOOST_TEST(std::isnan(cast<float>(cast<bf16>(nan))(0)));
  BOOST_TEST(std::isnan(cast<float>(cast<fp16>(nan))(0)));
}

BOOST_AUTO_TEST_CASE(strided_input) {
  const Tensor<float> x = scaled_floats({7, 5}, kSeed + 2, 1.0f);
  const TensorView<const float> t = x.transpose(0, 1);  // (5, 7), strided
  const Tensor<bf16> y = cast<bf16>(t);
  BOOST_TEST(y.shape() == Shape({5, 7}));
  for (int64_t i = 0; i < 5; ++i)
    for (int64_t j = 0; j < 7; ++j) BOOST_TEST(bits_of(y(i, j)) == bits_of(from_float<bf16>(x(j, i))));
}
