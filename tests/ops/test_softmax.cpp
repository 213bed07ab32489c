// softmax and log_softmax: forward against closed forms (uniform rows give 1/n and -log n) and
// a long-double reference written differently (no max shift), backward
// against central finite differences in double, float on every compiled instruction-set path,
// bf16/fp16 with tolerances from the format's epsilon, odd shapes, strided inputs, extreme
// inputs (large, -inf, NaN), independence from the thread count, and the errors a caller gets.
#define BOOST_TEST_MODULE softmax
#include <boost/test/unit_test.hpp>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "finite_difference.hpp"
#include "tessera/ops/softmax.hpp"

using namespace tessera;
using tessera::testing::check_close;
using tessera::testing::dot;
using tessera::testing::numeric_gradient;
using tessera::testing::random_tensor;

namespace {

constexpr uint64_t kSeed = 20240612;

template <class To, class From>
Tensor<To> cast(TensorView<const From> x) {
  const Tensor<From> c = x.contiguous();
  auto out = Tensor<To>::empty(x.shape());
  for (int64_t i = 0; i < c.numel(); ++i) {
    double v;
    if constexpr (std::is_same_v<From, double> || std::is_same_v<From, float>) {
      v = static_cast<double>(c.data()[i]);
    } else {
      v = static_cast<double>(to_float(c.data()[i]));
    }
    if constexpr (std::is_same_v<To, double> || std::is_same_v<To, float>) {
      out.data()[i] = static_cast<To>(v);
    } else {
      out.data()[i] = To(v);  // rounded once, from the double
    }
  }
  return out;
}

Tensor<double> scaled(Tensor<double> x, double s) {
  for (double& v : x.span()) v *= s;
  return x;
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

struct Rows {
  int64_t rows, cols;
};
Rows rows_of(const Shape& s) { return {s.numel() / s[-1], s[-1]}; }

// The references, in long double and without the library's max shift (the test inputs are
// bounded, so exp cannot overflow): p_i = exp(x_i) / sum_j exp(x_j), log p_i = x_i - log(sum).
Tensor<double> ref_softmax(const Tensor<double>& x, bool log) {
  const auto [rows, n] = rows_of(x.shape());
  auto y = Tensor<double>::empty(x.shape());
  for (int64_t r = 0; r < rows; ++r) {
    const double* xr = x.data() + r * n;
    long double s = 0;
    for (int64_t j = 0; j < n; ++j) s += std::exp(static_cast<long double>(xr[j]));
    for (int64_t i = 0; i < n; ++i) {
      const long double xi = xr[i];
      y.data()[r * n + i] = static_cast<double>(log ? xi - std::log(s) : std::exp(xi) / s);
    }
  }
  return y;
}

// Backward references from the definitions, in long double: the Jacobian of softmax is
// diag(p) - p p^T; that of log_softmax is I - 1 p^T.
Tensor<double> ref_backward(const Tensor<double>& dy, const Tensor<double>& x, bool log) {
  const auto [rows, n] = rows_of(x.shape());
  const Tensor<double> p = ref_softmax(x, false);
  auto dx = Tensor<double>::empty(x.shape());
  for (int64_t r = 0; r < rows; ++r) {
    const double* pr = p.data() + r * n;
    const double* dyr = dy.data() + r * n;
    for (int64_t j = 0; j < n; ++j) {
      long double s = 0;
      for (int64_t i = 0; i < n; ++i) {
        const long double jac = log ? (i == j) - static_cast<long double>(pr[j])
                                    : static_cast<long double>(pr[i]) * ((i == j) - pr[j]);
        s += dyr[i] * jac;
      }
      dx.data()[r * n + j] = static_cast<double>(s);
    }
  }
  return dx;
}

const std::vector<Shape> kShapes = {{5, 11}, {7, 129}, {13, 1}, {3, 5, 11}, {1, 2000}, {300, 129}};

// Every instruction-set path this machine has (the others fall back to the widest present).
const std::vector<const char*> kIsas = {"baseline", "avx2", "avx512"};

struct IsaScope {  // sets TESSERA_ROW_ISA for one scope
  explicit IsaScope(const char* isa) { setenv("TESSERA_ROW_ISA", isa, 1); }
  ~IsaScope() { unsetenv("TESSERA_ROW_ISA"); }
};

template <class T>
bool same_bits(const Tensor<T>& a, const Tensor<T>& b) {
  return a.shape() == b.shape() && std::memcmp(a.data(), b.data(), a.size_bytes()) == 0;
}

}  // namespace

BOOST_AUTO_TEST_CASE(uniform_rows_closed_form) {
  // Every entry of a constant row is 1/n, its log -log(n), whatever the constant.
  for (int64_t n : {1, 7, 129, 1000}) {
    auto x = Tensor<double>::full({3, n}, 0.0);
    for (int64_t i = 0; i < n; ++i) {
      x(0, i) = 0.0;
      x(1, i) = 37.5;
      x(2, i) = -1e4;
    }
    const auto p = ops::softmax<double>(x);
    const auto lp = ops::log_softmax<double>(x);
    const auto pf = ops::softmax<float>(cast<float, double>(x));
    const auto lpf = ops::log_softmax<float>(cast<float, double>(x));
    for (int64_t i = 0; i < x.numel(); ++i) {
      BOOST_TEST(p.data()[i] == 1.0 / n, boost::test_tools::tolerance(1e-15));
      BOOST_TEST(lp.data()[i] == -std::log(static_cast<double>(n)),
                 boost::test_tools::tolerance(1e-15));
      BOOST_TEST(pf.data()[i] == 1.0f / n, boost::test_tools::tolerance(1e-6f));
      BOOST_TEST(lpf.data()[i] == -std::log(static_cast<float>(n)),
                 boost::test_tools::tolerance(1e-6f));
    }
  }
}

BOOST_AUTO_TEST_CASE(exp_polynomial_accuracy) {
  // The float exp the row ops use, against libm in double over the range they call it on.
  using ops::rows_detail::exp_approx;
  double worst = 0;
  for (int i = 0; i <= 200000; ++i) {
    const float x = -87.3f * static_cast<float>(i) / 200000.0f;
    const double expected = std::exp(static_cast<double>(x));
    const double got = exp_approx(x);
    const double ulp = std::ldexp(1.0, std::ilogb(expected) - 23);
    worst = std::max(worst, std::fabs(got - expected) / ulp);
  }
  BOOST_TEST_MESSAGE("exp_approx: worst error " << worst << " ulp on [-87.3, 0]");
  BOOST_TEST(worst <= 2.0);
  BOOST_TEST(exp_approx(0.0f) == 1.0f);
  BOOST_TEST(exp_approx(-88.0f) == 0.0f);  // below float's normal range: flushed to 0
  BOOST_TEST(exp_approx(-std::numeric_limits<float>::infinity()) == 0.0f);
  BOOST_TEST(std::isnan(exp_approx(std::nanf(""))));
  BOOST_TEST(std::isnan(exp_approx(-std::nanf(""))));
}

BOOST_AUTO_TEST_CASE(forward_double_matches_reference) {
  BOOST_TEST_MESSAGE("seed " << kSeed);
  for (const Shape& s : kShapes) {
    BOOST_TEST_CONTEXT("shape " << s << " seed " << kSeed) {
      const auto x = scaled(random_tensor(s, kSeed), 6.0);
      check_close(ops::softmax<double>(x), ref_softmax(x, false), 1e-13, 0.0, "softmax");
      check_close(ops::log_softmax<double>(x), ref_softmax(x, true), 1e-13, 1e-14,
                  "log_softmax");
    }
  }
}

BOOST_AUTO_TEST_CASE(forward_float_every_isa_and_thread_count) {
  // float: the exp polynomial is within 2 ulp of expf and each row is one sum, so a few
  // float epsilons of relative error. The thread count must not change a single bit.
  for (const Shape& s : kShapes) {
    const auto x = cast<float, double>(scaled(random_tensor(s, kSeed + 1), 6.0));
    const auto xr = cast<double, float>(x);
    const auto ref = ref_softmax(xr, false);
    const auto ref_log = ref_softmax(xr, true);
    for (const char* isa : kIsas) {
      IsaScope scope(isa);
      BOOST_TEST_CONTEXT("isa " << isa << " (runs " << ops::rows_detail::to_string(
                                    ops::rows_detail::row_isa())
                                << ") shape " << s << " seed " << kSeed) {
        omp_set_num_threads(1);
        const auto p1 = ops::softmax<float>(x);
        const auto l1 = ops::log_softmax<float>(x);
        omp_set_num_threads(3);
        const auto p3 = ops::softmax<float>(x);
        const auto l3 = ops::log_softmax<float>(x);
        omp_set_num_threads(2);
        BOOST_TEST(same_bits(p1, p3));
        BOOST_TEST(same_bits(l1, l3));
        check_close(cast<double, float>(p1), ref, 4e-6, 0.0, "softmax<float>");
        check_close(cast<double, float>(l1), ref_log, 4e-6, 2e-6, "log_softmax<float>");
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(extreme_inputs) {
  // Large logits: shifted by the row maximum, so 1000 + x behaves as x.
  auto x = Tensor<float>::from({2, 3}, {1000.f, 1001.f, 1002.f, 0.f, 1.f, 2.f});
  auto p = ops::softmax<float>(x);
  for (int i = 0; i < 3; ++i) BOOST_TEST(p(0, i) == p(1, i), boost::test_tools::tolerance(1e-6f));
  BOOST_TEST(std::isfinite(p(0, 0)));

  // A masked (-inf) entry has probability exactly 0 and log-probability -inf.
  const float inf = std::numeric_limits<float>::infinity();
  auto m = Tensor<float>::from({1, 4}, {0.5f, -inf, 1.5f, -0.25f});
  auto pm = ops::softmax<float>(m);
  auto lm = ops::log_softmax<float>(m);
  BOOST_TEST(pm(0, 1) == 0.0f);
  BOOST_TEST(lm(0, 1) == -inf);
  BOOST_TEST(pm(0, 0) + pm(0, 2) + pm(0, 3) == 1.0f, boost::test_tools::tolerance(1e-6f));
  auto pmd = ops::softmax<double>(cast<double, float>(m));
  BOOST_TEST(pmd(0, 1) == 0.0);

  // NaN anywhere in a row gives a NaN row (other rows untouched); an all -inf row is 0/0.
  auto n = Tensor<float>::from({3, 3}, {0.f, std::nanf(""), 1.f, 0.f, 1.f, 2.f, -inf, -inf, -inf});
  auto pn = ops::softmax<float>(n);
  for (int i = 0; i < 3; ++i) {
    BOOST_TEST(std::isnan(pn(0, i)));
    BOOST_TEST(std::isfinite(pn(1, i)));
    BOOST_TEST(std::isnan(pn(2, i)));
  }

  // Spread beyond float's exp range: the small entries underflow to 0, never to NaN.
  auto w = Tensor<float>::from({1, 3}, {0.f, -200.f, -90.f});
  auto pw = ops::softmax<float>(w);
  BOOST_TEST(pw(0, 0) == 1.0f);
  BOOST_TEST(pw(0, 1) == 0.0f);
  BOOST_TEST(pw(0, 2) >= 0.0f);
  BOOST_TEST(pw(0, 2) < 1e-38f);
}

BOOST_AUTO_TEST_CASE(backward_matches_finite_differences) {
  BOOST_TEST_MESSAGE("seed " << kSeed);
  for (const Shape& s : {Shape{5, 11}, Shape{7, 13}, Shape{3, 2, 7}, Shape{1, 1}}) {
    for (bool log : {false, true}) {
      BOOST_TEST_CONTEXT("shape " << s << (log ? " log_softmax" : " softmax") << " seed " << kSeed) {
        const auto x = scaled(random_tensor(s, kSeed + 2), 3.0);
        const auto g = random_tensor(s, kSeed + 3);
        auto fwd = [&](TensorView<const double> xv) {
          return log ? ops::log_softmax<double>(xv) : ops::softmax<double>(xv);
        };
        const auto y = fwd(x);
        const auto dx = log ? ops::log_softmax_backward<double>(g, y)
                            : ops::softmax_backward<double>(g, y);
        const auto numeric = numeric_gradient([&](TensorView<const double> xv) {
          return dot(fwd(xv), g);
        }, x);
        check_close(dx, numeric, 1e-6, 1e-9, "dx vs finite differences");
        check_close(dx, ref_backward(g, x, log), 1e-12, 1e-14, "dx vs Jacobian");
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(backward_float_every_isa) {
  for (const char* isa : kIsas) {
    IsaScope scope(isa);
    for (const Shape& s : {Shape{7, 129}, Shape{300, 129}}) {
      BOOST_TEST_CONTEXT("isa " << isa << " shape " << s << " seed " << kSeed) {
        const auto x = cast<float, double>(scaled(random_tensor(s, kSeed + 4), 4.0));
        const auto g = cast<float, double>(random_tensor(s, kSeed + 5));
        for (bool log : {false, true}) {
          const auto y = log ? ops::log_softmax<float>(x) : ops::softmax<float>(x);
          omp_set_num_threads(1);
          const auto dx1 = log ? ops::log_softmax_backward<float>(g, y)
                               : ops::softmax_backward<float>(g, y);
          omp_set_num_threads(2);
          const auto dx2 = log ? ops::log_softmax_backward<float>(g, y)
                               : ops::softmax_backward<float>(g, y);
          BOOST_TEST(same_bits(dx1, dx2));
          // The same formula in double on the same float inputs; the subtraction
          // dy - sum(dy * y) may cancel, so the bound is absolute in the operands' size.
          const auto yd = cast<double, float>(y);
          const auto dxd = log ? ops::log_softmax_backward<double>(cast<double, float>(g), yd)
                               : ops::softmax_backward<double>(cast<double, float>(g), yd);
          check_close(cast<double, float>(dx1), dxd, 1e-5, 1e-6, "dx<float>");
        }
      }
    }
  }
}

template <class T>
void check_low_precision() {
  const double eps = number_traits<T>::epsilon;
  const double tiny = number_traits<T>::min_subnormal;
  for (const Shape& s : {Shape{5, 11}, Shape{7, 129}, Shape{13, 1}, Shape{300, 129}}) {
    BOOST_TEST_CONTEXT(number_traits<T>::name << " shape " << s << " seed " << kSeed) {
      const auto x = cast<T, double>(scaled(random_tensor(s, kSeed + 6), 4.0));
      const auto xd = cast<double, T>(x);  // the exact values the op sees
      // Computed in float and rounded once: half an epsilon from the rounding, a little more
      // from the float arithmetic. Subnormal outputs (fp16) are absolute.
      check_close(cast<double, T>(ops::softmax<T>(x)), ref_softmax(xd, false), eps, tiny,
                  "softmax");
      const auto ref_log = ref_softmax(xd, true);
      check_close(cast<double, T>(ops::log_softmax<T>(x)), ref_log, eps, tiny + 1e-12, "log_softmax");

      const auto g = cast<T, double>(random_tensor(s, kSeed + 7));
      const auto gd = cast<double, T>(g);
      for (bool log : {false, true}) {
        const auto y = log ? ops::log_softmax<T>(x) : ops::softmax<T>(x);
        const auto dx = log ? ops::log_softmax_backward<T>(g, y) : ops::softmax_backward<T>(g, y);
        const auto yd = cast<double, T>(y);
        const auto dxd = log ? ops::log_softmax_backward<double>(gd, yd)
                             : ops::softmax_backward<double>(gd, yd);
        // dx = y * (dy - s) rounds once, but dy - s may cancel: the absolute part scales with
        // the operands (|dy| <= 1, |y| <= 1, |s| <= 1 for softmax; |s| <= n for log_softmax).
        const double operand = log ? static_cast<double>(s[-1]) : 1.0;
        check_close(cast<double, T>(dx), dxd, eps, 4e-6 * operand + tiny, "dx");
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(bf16_matches_float_reference) { check_low_precision<bf16>(); }
BOOST_AUTO_TEST_CASE(fp16_matches_float_reference) { check_low_precision<fp16>(); }

BOOST_AUTO_TEST_CASE(strided_input_equals_contiguous) {
  const auto x = cast<float, double>(random_tensor({11, 7}, kSeed + 8));
  const auto xt = x.transpose(0, 1);  // (7, 11), strided
  const auto xc = xt.contiguous();
  BOOST_TEST(same_bits(ops::softmax<float>(xt), ops::softmax<float>(xc)));
  BOOST_TEST(same_bits(ops::log_softmax<float>(xt), ops::log_softmax<float>(xc)));
  const auto y = ops::softmax<float>(xc);
  BOOST_TEST(same_bits(ops::softmax_backward<float>(xt, y), ops::softmax_backward<float>(xc, y)));
}

BOOST_AUTO_TEST_CASE(empty_and_errors) {
  // No features, or no rows: an empty result of the same shape.
  BOOST_TEST(ops::softmax<float>(Tensor<float>(Shape{3, 0})).shape() == (Shape{3, 0}));
  BOOST_TEST(ops::log_softmax<float>(Tensor<float>(Shape{0, 5})).shape() == (Shape{0, 5}));

  const auto scalar = Tensor<float>::full(Shape{}, 1.0f);
  const std::string e0 = error_of([&] { (void)ops::softmax<float>(scalar); });
  BOOST_TEST(e0.find("softmax") != std::string::npos);
  BOOST_TEST(e0.find("rank 0") != std::string::npos);

  const auto y = Tensor<float>(Shape{2, 3});
  const auto dy = Tensor<float>(Shape{3, 2});
  const std::string e1 = error_of([&] { (void)ops::softmax_backward<float>(dy, y); });
  BOOST_TEST(e1.find("softmax_backward") != std::string::npos);
  BOOST_TEST(e1.find("'dy'") != std::string::npos);
  BOOST_TEST(e1.find("[3, 2]") != std::string::npos);
  BOOST_CHECK_THROW((void)ops::log_softmax_backward<float>(dy, y), Error);

  IsaScope scope("sse9");
  const std::string e2 = error_of([&] { (void)ops::softmax<float>(y); });
  BOOST_TEST(e2.find("TESSERA_ROW_ISA") != std::string::npos);
  BOOST_TEST(e2.find("sse9") != std::string::npos);
}
