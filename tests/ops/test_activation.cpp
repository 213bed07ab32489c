// SiLU, GELU (exact and tanh) and SwiGLU (separate and fused): forward against double
// references written differently from the library (x / (1 + e^-x), x * erfc(-x/sqrt2) / 2,
// x * sigmoid(2 * inner)), published values, backward against central finite differences in
// double, bf16/fp16 with tolerances from the format's epsilon, odd shapes, strided inputs,
// extreme inputs and the errors a caller gets.
#define BOOST_TEST_MODULE activation
#include <boost/test/unit_test.hpp>
#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "finite_difference.hpp"
#include "tessera/ops/activation.hpp"

using namespace tessera;
using tessera::testing::check_close;
using tessera::testing::dot;
using tessera::testing::numeric_gradient;
using tessera::testing::random_tensor;

namespace {

constexpr uint64_t kSeed = 20240611;

template <class To, class From>
Tensor<To> cast(TensorView<const From> x) {
  const Tensor<From> c = x.contiguous();
  auto out = Tensor<To>::empty(x.shape());
  for (int64_t i = 0; i < c.numel(); ++i) {
    if constexpr (std::is_same_v<To, double>) {
      if constexpr (std::is_same_v<From, double> || std::is_same_v<From, float>) {
        out.data()[i] = c.data()[i];
      } else {
        out.data()[i] = static_cast<double>(to_float(c.data()[i]));
      }
    } else if constexpr (std::is_same_v<To, float>) {
      out.data()[i] = static_cast<float>(c.data()[i]);
    } else {
      out.data()[i] = from_float<To>(static_cast<float>(c.data()[i]));
    }
  }
  return out;
}

Tensor<double> scaled(Tensor<double> x, double s) {
  for (double& v : x.span()) v *= s;
  return x;
}

// The references, written differently from the library on purpose.
double ref_silu(double x) { return x / (1.0 + std::exp(-x)); }
double ref_gelu(double x) { return 0.5 * x * std::erfc(-x / std::sqrt(2.0)); }
double ref_gelu_tanh(double x) {  // 0.5 * (1 + tanh(z)) == sigmoid(2z)
  const double z = std::sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x);
  return x / (1.0 + std::exp(-2.0 * z));
}

Tensor<double> map_ref(const Tensor<double>& x, double (*f)(double)) {
  auto y = Tensor<double>::empty(x.shape());
  for (int64_t i = 0; i < x.numel(); ++i) y.data()[i] = f(x.data()[i]);
  return y;
}

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// Relative bound for one rounding into T of a value computed in float.
template <class T>
double format_eps() {
  if constexpr (std::is_same_v<T, float>) return 0x1.0p-20;  // a few ulps of erf/exp/tanh
  return number_traits<T>::epsilon;  // twice the unit roundoff of one rounding
}

const std::vector<Shape> kShapes = {{5}, {7, 11}, {3, 5, 13}, {129, 257} /* > OpenMP threshold */};

struct Unary {
  const char* name;
  double (*ref)(double);
  std::function<Tensor<double>(TensorView<const double>)> f64;
};

}  // namespace

BOOST_AUTO_TEST_CASE(published_values) {
  // torch.nn.functional.silu / gelu at 1.0 and -2.0 (float64).
  auto x = Tensor<double>::from({2}, {1.0, -2.0});
  auto s = ops::silu<double>(x);
  auto ge = ops::gelu<double>(x, ops::GeluApprox::kNone);
  auto gt = ops::gelu<double>(x, ops::GeluApprox::kTanh);
  BOOST_TEST(s(0) == 0.7310585786300049, boost::test_tools::tolerance(1e-15));
  BOOST_TEST(s(1) == -0.2384058440442351, boost::test_tools::tolerance(1e-15));
  BOOST_TEST(ge(0) == 0.8413447460685429, boost::test_tools::tolerance(1e-15));
  BOOST_TEST(ge(1) == -0.04550026389635842, boost::test_tools::tolerance(1e-13));
  BOOST_TEST(gt(0) == 0.8411919906082768, boost::test_tools::tolerance(1e-15));
  BOOST_TEST(gt(1) == -0.04540230591222494, boost::test_tools::tolerance(1e-13));
}

BOOST_AUTO_TEST_CASE(forward_matches_double_reference) {
  BOOST_TEST_MESSAGE("seed " << kSeed);
  const Unary ops_[] = {
      {"silu", ref_silu, [](TensorView<const double> x) { return ops::silu<double>(x); }},
      {"gelu", ref_gelu, [](TensorView<const double> x) { return ops::gelu<double>(x); }},
      {"gelu_tanh", ref_gelu_tanh,
       [](TensorView<const double> x) { return ops::gelu<double>(x, ops::GeluApprox::kTanh); }},
  };
  for (const Unary& op : ops_) {
    uint64_t seed = kSeed;
    for (const Shape& s : kShapes) {
      const Tensor<double> x = scaled(random_tensor(s, seed++), 8.0);  // covers both tails
      const Tensor<double> expected = map_ref(x, op.ref);
      const std::string what = std::string(op.name) + " " + s.str();
      check_close(op.f64(x), expected, 1e-13, 1e-15, (what + " double").c_str());
      // float: the input is exactly representable after the cast, so the only error is the
      // op's own float arithmetic.
      const Tensor<float> xf = cast<float, double>(x);
      const Tensor<double> xr = cast<double, float>(xf);
      Tensor<float> yf;
      if (std::string(op.name) == "silu") yf = ops::silu<float>(xf);
      if (std::string(op.name) == "gelu") yf = ops::gelu<float>(xf);
      if (std::string(op.name) == "gelu_tanh") yf = ops::gelu<float>(xf, ops::GeluApprox::kTanh);
      check_close(cast<double, float>(yf), map_ref(xr, op.ref), format_eps<float>(), 1e-7,
                  (what + " float").c_str());
    }
  }
}

BOOST_AUTO_TEST_CASE(extreme_inputs_stay_finite) {
  auto x = Tensor<float>::from({6}, {-1000.f, -100.f, -30.f, 30.f, 100.f, 1000.f});
  auto s = ops::silu<float>(x);
  auto ds = ops::silu_backward<float>(Tensor<float>::full({6}, 1.f), x);
  auto g = ops::gelu<float>(x);
  auto gt = ops::gelu<float>(x, ops::GeluApprox::kTanh);
  auto dg = ops::gelu_backward<float>(Tensor<float>::full({6}, 1.f), x);
  auto dgt = ops::gelu_backward<float>(Tensor<float>::full({6}, 1.f), x, ops::GeluApprox::kTanh);
  for (int i = 0; i < 6; ++i) {
    for (float v : {s(i), ds(i), g(i), gt(i), dg(i), dgt(i)}) BOOST_TEST(std::isfinite(v));
  }
  BOOST_TEST(s(5) == 1000.f);
  BOOST_TEST(s(0) == 0.f);
  BOOST_TEST(ds(5) == 1.f);
  BOOST_TEST(ds(0) == 0.f);
  BOOST_TEST(g(5) == 1000.f);
  BOOST_TEST(g(0) == 0.f);
  BOOST_TEST(dg(4) == 1.f);
  BOOST_TEST(dgt(0) == 0.f);
}

// Tolerances for the finite-difference checks: the central difference's rounding noise is
// about eps_double * |L| / h ~ 1e-9 for these losses (a few hundred terms), while a wrong
// derivative formula is off by 1e-2 or more; rtol 1e-6 / atol 1e-7 sits between the two.
BOOST_AUTO_TEST_CASE(unary_backward_matches_finite_differences) {
  BOOST_TEST_MESSAGE("seed " << kSeed);
  uint64_t seed = kSeed + 100;
  for (const Shape& s : {Shape{5}, Shape{7, 11}, Shape{2, 3, 13}}) {
    const Tensor<double> x = scaled(random_tensor(s, seed++), 4.0);
    const Tensor<double> g = random_tensor(s, seed++);
    for (auto approx : {ops::GeluApprox::kNone, ops::GeluApprox::kTanh}) {
      auto loss = [&](TensorView<const double> in) {
        return dot(ops::gelu<double>(in, approx), g);
      };
      check_close(ops::gelu_backward<double>(g, x, approx), numeric_gradient(loss, x), 1e-6, 1e-7,
                  approx == ops::GeluApprox::kNone ? "gelu dx" : "gelu_tanh dx");
    }
    auto loss = [&](TensorView<const double> in) { return dot(ops::silu<double>(in), g); };
    check_close(ops::silu_backward<double>(g, x), numeric_gradient(loss, x), 1e-6, 1e-7, "silu dx");
  }
}

BOOST_AUTO_TEST_CASE(swiglu_forward_and_backward) {
  BOOST_TEST_MESSAGE("seed " << kSeed);
  uint64_t seed = kSeed + 200;
  for (const Shape& s : {Shape{7}, Shape{5, 13}, Shape{3, 2, 11}}) {
    const Tensor<double> gate = scaled(random_tensor(s, seed++), 4.0);
    const Tensor<double> up = scaled(random_tensor(s, seed++), 2.0);
    const Tensor<double> g = random_tensor(s, seed++);
    auto expected = Tensor<double>::empty(s);
    for (int64_t i = 0; i < s.numel(); ++i)
      expected.data()[i] = ref_silu(gate.data()[i]) * up.data()[i];
    check_close(ops::swiglu<double>(gate, up), expected, 1e-14, 1e-15, "swiglu");

    auto grads = ops::swiglu_backward<double>(g, gate, up);
    auto loss_g = [&](TensorView<const double> in) { return dot(ops::swiglu<double>(in, up), g); };
    auto loss_u = [&](TensorView<const double> in) {
      return dot(ops::swiglu<double>(gate, in), g);
    };
    check_close(grads.dgate, numeric_gradient(loss_g, gate), 1e-6, 1e-7, "swiglu dgate");
    check_close(grads.dup, numeric_gradient(loss_u, up), 1e-6, 1e-7, "swiglu dup");
  }
}

BOOST_AUTO_TEST_CASE(fused_swiglu_splits_gate_first) {
  BOOST_TEST_MESSAGE("seed " << kSeed);
  uint64_t seed = kSeed + 300;
  for (const Shape& s : {Shape{5, 26}, Shape{3, 7, 22}, Shape{2}}) {
    const int64_t hidden = s[-1] / 2;
    const Tensor<double> x = scaled(random_tensor(s, seed++), 4.0);  // [gate | up]
    const Tensor<double> gate = x.slice(-1, 0, hidden).contiguous();
    const Tensor<double> up = x.slice(-1, hidden, 2 * hidden).contiguous();
    const Tensor<double> y = ops::swiglu_fused<double>(x);
    const Tensor<double> y_sep = ops::swiglu<double>(gate, up);
    BOOST_TEST(y.shape() == gate.shape());
    check_close(y, y_sep, 0.0, 0.0, "fused == separate");

    const Tensor<double> g = random_tensor(y.shape(), seed++);
    const Tensor<double> dx = ops::swiglu_fused_backward<double>(g, x);
    BOOST_TEST(dx.shape() == s);
    auto sep = ops::swiglu_backward<double>(g, gate, up);
    check_close(dx.slice(-1, 0, hidden), sep.dgate, 0.0, 0.0, "fused dgate == separate");
    check_close(dx.slice(-1, hidden, 2 * hidden), sep.dup, 0.0, 0.0, "fused dup == separate");
    auto loss = [&](TensorView<const double> in) { return dot(ops::swiglu_fused<double>(in), g); };
    check_close(dx, numeric_gradient(loss, x), 1e-6, 1e-7, "swiglu_fused dx");
  }
}

template <class T>
void check_low_precision() {
  const double eps = format_eps<T>();
  BOOST_TEST_MESSAGE(number_traits<T>::name << ": seed " << kSeed << ", rtol " << eps);
  uint64_t seed = kSeed + 400;
  for (const Shape& s : {Shape{7, 11}, Shape{129, 257}}) {
    // Round the inputs to T first, so the reference sees exactly what the op sees.
    const Tensor<T> x = cast<T, double>(scaled(random_tensor(s, seed++), 6.0));
    const Tensor<T> u = cast<T, double>(scaled(random_tensor(s, seed++), 2.0));
    const Tensor<T> g = cast<T, double>(random_tensor(s, seed++));
    const Tensor<double> xd = cast<double, T>(x), ud = cast<double, T>(u), gd = cast<double, T>(g);
    // One rounding of a value computed in float: relative error <= eps/2, plus float's own.
    check_close(cast<double, T>(ops::silu<T>(x)), map_ref(xd, ref_silu), eps, 1e-6, "silu");
    check_close(cast<double, T>(ops::gelu<T>(x)), map_ref(xd, ref_gelu), eps, 1e-6, "gelu");
    check_close(cast<double, T>(ops::gelu<T>(x, ops::GeluApprox::kTanh)),
                map_ref(xd, ref_gelu_tanh), eps, 1e-6, "gelu_tanh");
    check_close(cast<double, T>(ops::swiglu<T>(x, u)), ops::swiglu<double>(xd, ud), eps, 1e-6,
                "swiglu");
    check_close(cast<double, T>(ops::silu_backward<T>(g, x)), ops::silu_backward<double>(gd, xd),
                eps, 1e-6, "silu_backward");
    check_close(cast<double, T>(ops::gelu_backward<T>(g, x)), ops::gelu_backward<double>(gd, xd),
                eps, 1e-6, "gelu_backward");
    auto grads = ops::swiglu_backward<T>(g, x, u);
    auto grads_d = ops::swiglu_backward<double>(gd, xd, ud);
    check_close(cast<double, T>(grads.dgate), grads_d.dgate, eps, 1e-6, "swiglu dgate");
    check_close(cast<double, T>(grads.dup), grads_d.dup, eps, 1e-6, "swiglu dup");
  }
}

BOOST_AUTO_TEST_CASE(bf16_matches_double) { check_low_precision<bf16>(); }
BOOST_AUTO_TEST_CASE(fp16_matches_double) { check_low_precision<fp16>(); }

BOOST_AUTO_TEST_CASE(strided_inputs) {
  const Tensor<double> x = scaled(random_tensor({7, 11}, kSeed + 500), 3.0);
  const Tensor<double> u = random_tensor({11, 7}, kSeed + 501);
  auto xt = x.transpose(0, 1);  // (11, 7), not contiguous
  check_close(ops::silu<double>(xt), ops::silu<double>(xt.contiguous()), 0.0, 0.0, "silu strided");
  check_close(ops::gelu<double>(xt), ops::gelu<double>(xt.contiguous()), 0.0, 0.0, "gelu strided");
  check_close(ops::swiglu<double>(xt, u), ops::swiglu<double>(xt.contiguous(), u), 0.0, 0.0,
              "swiglu strided");
  check_close(ops::silu_backward<double>(u, xt), ops::silu_backward<double>(u, xt.contiguous()),
              0.0, 0.0, "silu_backward strided");
  // A fused input that is a column slice of a wider buffer.
  const Tensor<double> wide = random_tensor({5, 30}, kSeed + 502);
  auto x26 = wide.slice(1, 2, 28);
  check_close(ops::swiglu_fused<double>(x26), ops::swiglu_fused<double>(x26.contiguous()), 0.0, 0.0,
              "swiglu_fused strided");
}

BOOST_AUTO_TEST_CASE(empty_tensors) {
  BOOST_TEST(ops::silu<float>(Tensor<float>::zeros({0, 5})).numel() == 0);
  BOOST_TEST(ops::swiglu_fused<float>(Tensor<float>::zeros({0, 6})).shape() == (Shape{0, 3}));
  BOOST_TEST(ops::swiglu_fused<float>(Tensor<float>::zeros({4, 0})).shape() == (Shape{4, 0}));
  auto dx =
      ops::swiglu_fused_backward<float>(Tensor<float>::zeros({0, 3}), Tensor<float>::zeros({0, 6}));
  BOOST_TEST(dx.shape() == (Shape{0, 6}));
}

BOOST_AUTO_TEST_CASE(errors_name_the_tensors) {
  auto a = Tensor<float>::zeros({3, 4});
  auto b = Tensor<float>::zeros({3, 5});
  std::string msg = error_of([&] { (void)ops::swiglu<float>(a, b); });
  BOOST_TEST(msg.find("swiglu") != std::string::npos);
  BOOST_TEST(msg.find("[3, 4]") != std::string::npos);
  BOOST_TEST(msg.find("[3, 5]") != std::string::npos);

  msg = error_of([&] { (void)ops::swiglu_fused<float>(Tensor<float>::zeros({2, 7})); });
  BOOST_TEST(msg.find("swiglu_fused") != std::string::npos);
  BOOST_TEST(msg.find("gate_up") != std::string::npos);
  BOOST_TEST(msg.find("even") != std::string::npos);
  BOOST_CHECK_THROW((void)ops::swiglu_fused<float>(Tensor<float>(Shape{})), Error);

  msg = error_of([&] { (void)ops::swiglu_fused_backward<float>(a, Tensor<float>::zeros({3, 6})); });
  BOOST_TEST(msg.find("'dout'") != std::string::npos);
  BOOST_TEST(msg.find("expected [3, 3]") != std::string::npos);

  msg = error_of([&] { (void)ops::silu_backward<float>(b, a); });
  BOOST_TEST(msg.find("silu_backward") != std::string::npos);
  BOOST_CHECK_THROW((void)ops::gelu_backward<float>(b, a), Error);
  BOOST_CHECK_THROW((void)ops::swiglu_backward<float>(b, a, a), Error);
}
