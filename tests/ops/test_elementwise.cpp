// add, mul, scale, add_scaled, add_bias and their backward passes: forward against plain
// double loops, backward against central finite differences in double, bf16/fp16 against
// the double result with the format's epsilon, odd shapes, strided inputs, a deterministic
// bias gradient, and the errors a caller gets.
#define BOOST_TEST_MODULE elementwise
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#include "finite_difference.hpp"
#include "tessera/ops/cast.hpp"
#include "tessera/ops/elementwise.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

using namespace tessera;
using namespace tessera::ops;
using tessera::testing::check_close;
using tessera::testing::dot;
using tessera::testing::numeric_gradient;
using tessera::testing::random_tensor;

namespace {

constexpr uint64_t kSeed = 4242;

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// Element-wise reference in double: out[i] = f(a[i], b[i]).
template <class F>
Tensor<double> ref2(const Tensor<double>& a, const Tensor<double>& b, F f) {
  auto out = Tensor<double>::empty(a.shape());
  for (int64_t i = 0; i < a.numel(); ++i) out.data()[i] = f(a.data()[i], b.data()[i]);
  return out;
}

const Shape kShapes[] = {Shape{1}, Shape{7}, Shape{5, 11}, Shape{3, 13, 7}, Shape{2, 5, 7, 11}};

}  // namespace

BOOST_AUTO_TEST_CASE(forward_double) {
  BOOST_TEST_MESSAGE("seed " << kSeed);
  for (const Shape& s : kShapes) {
    const Tensor<double> a = random_tensor(s, kSeed), b = random_tensor(s, kSeed + 1);
    check_close(add<double>(a, b), ref2(a, b, [](double x, double y) { return x + y; }), 0, 0, "add");
    check_close(mul<double>(a, b), ref2(a, b, [](double x, double y) { return x * y; }), 0, 0, "mul");
    check_close(scale<double>(a, -2.5), ref2(a, b, [](double x, double) { return -2.5 * x; }), 0, 0, "scale");
    check_close(add_scaled<double>(a, b, 0.3), ref2(a, b, [](double x, double y) { return x + 0.3 * y; }),
                1e-15, 1e-16, "add_scaled");
  }
}

BOOST_AUTO_TEST_CASE(add_bias_forward_and_strided) {
  const Tensor<double> x = random_tensor({3, 5, 7}, kSeed + 2);
  const Tensor<double> bias = random_tensor({7}, kSeed + 3);
  auto want = Tensor<double>::empty(x.shape());
  for (int64_t i = 0; i < 3; ++i)
    for (int64_t j = 0; j < 5; ++j)
      for (int64_t k = 0; k < 7; ++k) want(i, j, k) = x(i, j, k) + bias(k);
  check_close(add_bias<double>(x, bias), want, 0, 0, "add_bias");
  // A transposed (strided) input gives the same result as its contiguous copy.
  const Tensor<double> xt = random_tensor({7, 5}, kSeed + 4);
  const TensorView<const double> v = xt.transpose(0, 1);  // (5, 7)
  check_close(add_bias<double>(v, bias), add_bias<double>(v.contiguous(), bias), 0, 0, "strided add_bias");
  check_close(add<double>(v, v), scale<double>(v, 2.0), 0, 0, "strided add");
}

BOOST_AUTO_TEST_CASE(backward_finite_differences) {
  BOOST_TEST_MESSAGE("seed " << kSeed + 10);
  const Shape s{3, 5, 7};
  const Tensor<double> a = random_tensor(s, kSeed + 10);
  const Tensor<double> b = random_tensor(s, kSeed + 11);
  const Tensor<double> g = random_tensor(s, kSeed + 12);
  const double alpha = -0.7;
  using V = TensorView<const double>;

  const auto ga = add_backward<double>(g);
  check_close(ga.da, numeric_gradient([&](V x) { return dot(add<double>(x, b), g); }, a), 1e-8, 1e-9, "add da");
  check_close(ga.db, numeric_gradient([&](V x) { return dot(add<double>(a, x), g); }, b), 1e-8, 1e-9, "add db");

  const auto gm = mul_backward<double>(g, a, b);
  check_close(gm.da, numeric_gradient([&](V x) { return dot(mul<double>(x, b), g); }, a), 1e-8, 1e-9, "mul da");
  check_close(gm.db, numeric_gradient([&](V x) { return dot(mul<double>(a, x), g); }, b), 1e-8, 1e-9, "mul db");

  check_close(scale_backward<double>(g, alpha),
              numeric_gradient([&](V x) { return dot(scale<double>(x, alpha), g); }, a), 1e-8, 1e-9, "scale dx");

  const auto gs = add_scaled_backward<double>(g, alpha);
  check_close(gs.da, numeric_gradient([&](V x) { return dot(add_scaled<double>(x, b, alpha), g); }, a), 1e-8,
              1e-9, "add_scaled da");
  check_close(gs.db, numeric_gradient([&](V x) { return dot(add_scaled<double>(a, x, alpha), g); }, b), 1e-8,
              1e-9, "add_scaled db");

  const Tensor<double> bias = random_tensor({7}, kSeed + 13);
  const auto gb = add_bias_backward<double>(g);
  check_close(gb.dx, numeric_gradient([&](V x) { return dot(add_bias<double>(x, bias), g); }, a), 1e-8, 1e-9,
              "add_bias dx");
  check_close(gb.dbias, numeric_gradient([&](V x) { return dot(add_bias<double>(a, x), g); }, bias), 1e-8, 1e-9,
              "add_bias dbias");
}

template <class T>
void low_precision_case() {
  const double eps = number_traits<T>::epsilon;
  BOOST_TEST_MESSAGE(number_traits<T>::name << " seed " << kSeed + 20);
  const Tensor<T> a = cast<T>(random_tensor({13, 11}, kSeed + 20));
  const Tensor<T> b = cast<T>(random_tensor({13, 11}, kSeed + 21));
  const Tensor<T> bias = cast<T>(random_tensor({11}, kSeed + 22));
  const Tensor<double> a64 = cast<double>(a), b64 = cast<double>(b), bias64 = cast<double>(bias);
  // One rounding of the exact result: relative error <= eps / 2 (tiny absolute floor for
  // cancellations near zero, where the float computation itself is exact anyway).
  check_close(cast<double>(add<T>(a, b)), add<double>(a64, b64), eps / 2, 1e-7, "add");
  check_close(cast<double>(mul<T>(a, b)), mul<double>(a64, b64), eps / 2, 1e-7, "mul");
  check_close(cast<double>(scale<T>(a, 0.1)), scale<double>(a64, static_cast<float>(0.1)), eps / 2, 1e-7, "scale");
  check_close(cast<double>(add_scaled<T>(a, b, 3.0)), add_scaled<double>(a64, b64, 3.0), eps / 2, 1e-6,
              "add_scaled");
  check_close(cast<double>(add_bias<T>(a, bias)), add_bias<double>(a64, bias64), eps / 2, 1e-7, "add_bias");
  // The bias gradient sums 13 rows in float and rounds once.
  check_close(cast<double>(bias_grad<T>(a)), bias_grad<double>(a64), eps / 2, 1e-5, "bias_grad");
}

BOOST_AUTO_TEST_CASE(bf16_and_fp16) {
  low_precision_case<bf16>();
  low_precision_case<fp16>();
  low_precision_case<float>();
}

BOOST_AUTO_TEST_CASE(bias_grad_is_deterministic_and_exact_on_integers) {
  // 300 x 131 integer values: the float sums are exact, and identical for 1 and 2 threads.
  auto d = Tensor<float>::empty({300, 131});
  for (int64_t i = 0; i < d.numel(); ++i) d.data()[i] = static_cast<float>((i * 7919) % 23 - 11);
  const Tensor<float> g2 = bias_grad<float>(d);
  for (int64_t j = 0; j < 131; ++j) {
    double s = 0;
    for (int64_t r = 0; r < 300; ++r) s += d(r, j);
    BOOST_TEST(g2(j) == s);
  }
#if defined(_OPENMP)
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  auto big = cast<float>(random_tensor({4000, 70}, kSeed + 30));
  const Tensor<float> one = bias_grad<float>(big);
  omp_set_num_threads(2);
  const Tensor<float> two = bias_grad<float>(big);
  omp_set_num_threads(saved);
  BOOST_TEST(std::memcmp(one.data(), two.data(), one.size_bytes()) == 0);
#endif
}

BOOST_AUTO_TEST_CASE(errors) {
  auto a = Tensor<float>::zeros({2, 3});
  auto b = Tensor<float>::zeros({3, 2});
  std::string m = error_of([&] { (void)add<float>(a, b); });
  BOOST_TEST(m.find("add") != std::string::npos, m);
  BOOST_TEST(m.find("[2, 3]") != std::string::npos, m);
  BOOST_TEST(m.find("[3, 2]") != std::string::npos, m);
  BOOST_CHECK_THROW((void)mul<float>(a, b), Error);
  BOOST_CHECK_THROW((void)add_scaled<float>(a, b, 1.0), Error);
  BOOST_CHECK_THROW((void)mul_backward<float>(a, a, b), Error);
  m = error_of([&] { (void)mul_backward<float>(b, a, a); });
  BOOST_TEST(m.find("'dout'") != std::string::npos, m);
  m = error_of([&] { (void)add_bias<float>(a, Tensor<float>::zeros({2})); });
  BOOST_TEST(m.find("add_bias") != std::string::npos, m);
  BOOST_TEST(m.find("'bias'") != std::string::npos, m);
  BOOST_TEST(m.find("expected [3]") != std::string::npos, m);
  BOOST_CHECK_THROW((void)add_bias<float>(a, Tensor<float>::zeros({1, 3})), Error);
  BOOST_CHECK_THROW((void)add_bias<float>(Tensor<float>::zeros({}), Tensor<float>::zeros({1})), Error);
}
