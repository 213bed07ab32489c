// rms_norm and layer_norm: forward against closed forms (constant rows, a 3-4-5 row) and a
// long-double reference written differently (LayerNorm's variance as E[x^2] - E[x]^2),
// backward (dx, dweight, dbias) against central finite differences in double, float on every
// compiled instruction-set path and thread count (bit-identical weight gradients), bf16/fp16
// with tolerances from the format's epsilon, odd shapes, more rows than gradient chunks,
// strided inputs, and the errors a caller gets.
#define BOOST_TEST_MODULE norm
#include <boost/test/unit_test.hpp>
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "finite_difference.hpp"
#include "tessera/ops/norm.hpp"

using namespace tessera;
using tessera::testing::check_close;
using tessera::testing::dot;
using tessera::testing::numeric_gradient;
using tessera::testing::random_tensor;

namespace {

constexpr uint64_t kSeed = 20240614;

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
      out.data()[i] = To(v);
    }
  }
  return out;
}

Tensor<double> affine(Tensor<double> x, double scale, double shift) {
  for (double& v : x.span()) v = v * scale + shift;
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

bool contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

struct IsaScope {
  explicit IsaScope(const char* isa) { setenv("TESSERA_ROW_ISA", isa, 1); }
  ~IsaScope() { unsetenv("TESSERA_ROW_ISA"); }
};

template <class T>
bool same_bits(const Tensor<T>& a, const Tensor<T>& b) {
  return a.shape() == b.shape() && std::memcmp(a.data(), b.data(), a.size_bytes()) == 0;
}

// References in long double. RMSNorm: x / sqrt(mean(x^2) + eps) * w. LayerNorm: the variance
// as E[x^2] - E[x]^2 (the library uses the two-pass form), y = (x - mean) / sqrt(var + eps) * w
// + b. Empty `b` means RMSNorm.
Tensor<double> ref_norm(const Tensor<double>& x, const Tensor<double>& w, const Tensor<double>* b,
                        double eps) {
  const int64_t n = x.shape()[-1];
  const int64_t rows = x.numel() / n;
  auto y = Tensor<double>::empty(x.shape());
  for (int64_t r = 0; r < rows; ++r) {
    const double* xr = x.data() + r * n;
    long double s = 0, ss = 0;
    for (int64_t i = 0; i < n; ++i) {
      s += xr[i];
      ss += static_cast<long double>(xr[i]) * xr[i];
    }
    const long double mean = b ? s / n : 0.0L;
    const long double var = b ? ss / n - mean * mean : ss / n;
    const long double denom = std::sqrt(var + eps);
    for (int64_t i = 0; i < n; ++i) {
      y.data()[r * n + i] =
          static_cast<double>((xr[i] - mean) / denom * w.data()[i] + (b ? b->data()[i] : 0.0));
    }
  }
  return y;
}

// Odd shapes; (131, 11) has more rows than the 64 weight-gradient chunks, (300, 129) is large
// enough to run in parallel.
const std::vector<Shape> kShapes = {{5, 11}, {7, 129}, {13, 1}, {3, 5, 11}, {131, 11}, {300, 129}};

}  // namespace

BOOST_AUTO_TEST_CASE(closed_forms) {
  // RMSNorm of (3, 4): rms = sqrt(12.5). Constant rows: LayerNorm gives the bias exactly
  // (rstd = 1/sqrt(eps)), RMSNorm gives c / sqrt(c^2 + eps).
  const auto x = Tensor<double>::from({2, 2}, {3.0, 4.0, -2.0, -2.0});
  const auto w = Tensor<double>::from({2}, {1.0, 2.0});
  const auto b = Tensor<double>::from({2}, {0.5, -0.25});
  const double eps = 1e-6;
  const auto rms = ops::rms_norm<double>(x, w, eps);
  BOOST_TEST(rms.y(0, 0) == 3.0 / std::sqrt(12.5 + eps), boost::test_tools::tolerance(1e-15));
  BOOST_TEST(rms.y(0, 1) == 8.0 / std::sqrt(12.5 + eps), boost::test_tools::tolerance(1e-15));
  BOOST_TEST(rms.y(1, 1) == -4.0 / std::sqrt(4.0 + eps), boost::test_tools::tolerance(1e-15));
  BOOST_TEST(rms.rstd(0) == 1.0 / std::sqrt(12.5 + eps), boost::test_tools::tolerance(1e-15));

  const auto ln = ops::layer_norm<double>(x, w, b, eps);
  BOOST_TEST(ln.mean(0) == 3.5);
  BOOST_TEST(ln.rstd(0) == 1.0 / std::sqrt(0.25 + eps), boost::test_tools::tolerance(1e-15));
  BOOST_TEST(ln.y(0, 0) == -0.5 / std::sqrt(0.25 + eps) + 0.5, boost::test_tools::tolerance(1e-15));
  BOOST_TEST(ln.y(1, 0) == 0.5);
  BOOST_TEST(ln.y(1, 1) == -0.25);
  BOOST_TEST(ln.rstd(1) == 1.0 / std::sqrt(eps), boost::test_tools::tolerance(1e-15));

  const auto lnf = ops::layer_norm<float>(cast<float, double>(x), cast<float, double>(w),
                                          cast<float, double>(b), eps);
  BOOST_TEST(lnf.y(1, 0) == 0.5f);
  BOOST_TEST(lnf.y(0, 1) == 2.0f * 0.5f / std::sqrt(0.25f) - 0.25f,
             boost::test_tools::tolerance(1e-5f));
}

BOOST_AUTO_TEST_CASE(forward_double_matches_reference) {
  BOOST_TEST_MESSAGE("seed " << kSeed);
  for (const Shape& s : kShapes) {
    BOOST_TEST_CONTEXT("shape " << s << " seed " << kSeed) {
      const int64_t n = s[-1];
      // A mean of 3 and a spread of 2: LayerNorm has something to remove.
      const auto x = affine(random_tensor(s, kSeed + 1), 2.0, 3.0);
      const auto w = affine(random_tensor({n}, kSeed + 2), 0.5, 1.0);
      const auto b = random_tensor({n}, kSeed + 3);
      check_close(ops::rms_norm<double>(x, w, 1e-6).y, ref_norm(x, w, nullptr, 1e-6), 1e-12,
                  1e-14, "rms_norm");
      // E[x^2] - E[x]^2 in long double cancels ~3 digits of its 64-bit mantissa; the bound
      // covers it.
      check_close(ops::layer_norm<double>(x, w, b, 1e-5).y, ref_norm(x, w, &b, 1e-5), 1e-12,
                  1e-12, "layer_norm");
    }
  }
}

// Loss L = dot(y, g) through each norm; returns (analytic, numeric) gradient pairs.
BOOST_AUTO_TEST_CASE(backward_matches_finite_differences) {
  BOOST_TEST_MESSAGE("seed " << kSeed);
  for (const Shape& s : {Shape{5, 11}, Shape{7, 13}, Shape{3, 2, 7}, Shape{70, 3}, Shape{4, 1}}) {
    BOOST_TEST_CONTEXT("shape " << s << " seed " << kSeed) {
      const int64_t n = s[-1];
      const auto x = affine(random_tensor(s, kSeed + 4), 1.5, 0.5);
      const auto w = affine(random_tensor({n}, kSeed + 5), 0.5, 1.0);
      const auto b = random_tensor({n}, kSeed + 6);
      const auto g = random_tensor(s, kSeed + 7);
      const double eps = 1e-3;  // not negligible, so a wrong eps term shows up

      const auto rf = ops::rms_norm<double>(x, w, eps);
      const auto rg = ops::rms_norm_backward<double>(g, x, w, rf.rstd);
      check_close(rg.dx, numeric_gradient([&](TensorView<const double> xv) {
                    return dot(ops::rms_norm<double>(xv, w, eps).y, g);
                  }, x), 1e-6, 1e-8, "rms_norm dx");
      check_close(rg.dweight, numeric_gradient([&](TensorView<const double> wv) {
                    return dot(ops::rms_norm<double>(x, wv, eps).y, g);
                  }, w), 1e-6, 1e-8, "rms_norm dweight");

      const auto lf = ops::layer_norm<double>(x, w, b, eps);
      const auto lg = ops::layer_norm_backward<double>(g, x, w, lf.mean, lf.rstd);
      check_close(lg.dx, numeric_gradient([&](TensorView<const double> xv) {
                    return dot(ops::layer_norm<double>(xv, w, b, eps).y, g);
                  }, x), 1e-6, 1e-8, "layer_norm dx");
      check_close(lg.dweight, numeric_gradient([&](TensorView<const double> wv) {
                    return dot(ops::layer_norm<double>(x, wv, b, eps).y, g);
                  }, w), 1e-6, 1e-8, "layer_norm dweight");
      check_close(lg.dbias, numeric_gradient([&](TensorView<const double> bv) {
                    return dot(ops::layer_norm<double>(x, w, bv, eps).y, g);
                  }, b), 1e-6, 1e-8, "layer_norm dbias");
    }
  }
}

BOOST_AUTO_TEST_CASE(float_every_isa_and_thread_count) {
  // float against the double op on the same float inputs; every output, the weight gradients
  // included, must be bit-identical for 1 and 3 threads.
  for (const Shape& s : kShapes) {
    const int64_t n = s[-1];
    const auto x = cast<float, double>(affine(random_tensor(s, kSeed + 8), 2.0, 1.0));
    const auto w = cast<float, double>(affine(random_tensor({n}, kSeed + 9), 0.5, 1.0));
    const auto b = cast<float, double>(random_tensor({n}, kSeed + 10));
    const auto g = cast<float, double>(random_tensor(s, kSeed + 11));
    const auto xd = cast<double, float>(x), wd = cast<double, float>(w),
               bd = cast<double, float>(b), gd = cast<double, float>(g);
    const auto rd = ops::rms_norm<double>(xd, wd);
    const auto rgd = ops::rms_norm_backward<double>(gd, xd, wd, rd.rstd);
    const auto ld = ops::layer_norm<double>(xd, wd, bd);
    const auto lgd = ops::layer_norm_backward<double>(gd, xd, wd, ld.mean, ld.rstd);
    // dweight sums up to 300 rows of O(1) terms in float.
    const double sum_tol = 1e-6 * static_cast<double>(s.numel() / n);
    for (const char* isa : {"baseline", "avx2", "avx512"}) {
      IsaScope scope(isa);
      BOOST_TEST_CONTEXT("isa " << isa << " (runs "
                                << ops::rows_detail::to_string(ops::rows_detail::row_isa())
                                << ") shape " << s << " seed " << kSeed) {
        omp_set_num_threads(1);
        const auto r1 = ops::rms_norm<float>(x, w);
        const auto rg1 = ops::rms_norm_backward<float>(g, x, w, r1.rstd);
        const auto l1 = ops::layer_norm<float>(x, w, b);
        const auto lg1 = ops::layer_norm_backward<float>(g, x, w, l1.mean, l1.rstd);
        omp_set_num_threads(3);
        const auto r3 = ops::rms_norm<float>(x, w);
        const auto rg3 = ops::rms_norm_backward<float>(g, x, w, r3.rstd);
        const auto l3 = ops::layer_norm<float>(x, w, b);
        const auto lg3 = ops::layer_norm_backward<float>(g, x, w, l3.mean, l3.rstd);
        omp_set_num_threads(2);
        BOOST_TEST(same_bits(r1.y, r3.y));
        BOOST_TEST(same_bits(r1.rstd, r3.rstd));
        BOOST_TEST(same_bits(rg1.dx, rg3.dx));
        BOOST_TEST(same_bits(rg1.dweight, rg3.dweight));
        BOOST_TEST(same_bits(l1.y, l3.y));
        BOOST_TEST(same_bits(l1.mean, l3.mean));
        BOOST_TEST(same_bits(l1.rstd, l3.rstd));
        BOOST_TEST(same_bits(lg1.dx, lg3.dx));
        BOOST_TEST(same_bits(lg1.dweight, lg3.dweight));
        BOOST_TEST(same_bits(lg1.dbias, lg3.dbias));

        check_close(cast<double, float>(r1.y), rd.y, 2e-6, 1e-6, "rms_norm y");
        check_close(cast<double, float>(r1.rstd), rd.rstd, 2e-6, 0.0, "rms_norm rstd");
        check_close(cast<double, float>(rg1.dx), rgd.dx, 1e-5, 1e-5, "rms_norm dx");
        check_close(cast<double, float>(rg1.dweight), rgd.dweight, 1e-5, sum_tol, "rms dweight");
        check_close(cast<double, float>(l1.y), ld.y, 2e-6, 2e-6, "layer_norm y");
        check_close(cast<double, float>(l1.mean), ld.mean, 2e-6, 1e-6, "layer_norm mean");
        check_close(cast<double, float>(l1.rstd), ld.rstd, 2e-6, 0.0, "layer_norm rstd");
        check_close(cast<double, float>(lg1.dx), lgd.dx, 1e-5, 1e-5, "layer_norm dx");
        check_close(cast<double, float>(lg1.dweight), lgd.dweight, 1e-5, sum_tol, "ln dweight");
        check_close(cast<double, float>(lg1.dbias), lgd.dbias, 1e-5, sum_tol, "ln dbias");
      }
    }
  }
}

template <class T>
void check_low_precision() {
  const double eps = number_traits<T>::epsilon;
  for (const Shape& s : {Shape{5, 11}, Shape{7, 129}, Shape{13, 1}, Shape{131, 11}}) {
    BOOST_TEST_CONTEXT(number_traits<T>::name << " shape " << s << " seed " << kSeed) {
      const int64_t n = s[-1];
      const auto x = cast<T, double>(affine(random_tensor(s, kSeed + 12), 2.0, 1.0));
      const auto w = cast<T, double>(affine(random_tensor({n}, kSeed + 13), 0.5, 1.0));
      const auto b = cast<T, double>(random_tensor({n}, kSeed + 14));
      const auto g = cast<T, double>(random_tensor(s, kSeed + 15));
      // The exact values the op sees.
      const auto xd = cast<double, T>(x), wd = cast<double, T>(w), bd = cast<double, T>(b),
                 gd = cast<double, T>(g);
      // Forward: computed in float and rounded once (half an epsilon); LayerNorm's output is a
      // sum (x' * w + b) that may cancel, so an absolute part of an epsilon of its terms.
      const auto r = ops::rms_norm<T>(x, w);
      check_close(cast<double, T>(r.y), ref_norm(xd, wd, nullptr, 1e-6), eps, 1e-6, "rms_norm");
      const auto l = ops::layer_norm<T>(x, w, b);
      check_close(cast<double, T>(l.y), ref_norm(xd, wd, &bd, 1e-5), eps, eps, "layer_norm");
      // Statistics stay in float.
      check_close(cast<double, float>(r.rstd), ops::rms_norm<double>(xd, wd).rstd, 2e-6, 0.0,
                  "rms_norm rstd");
      // Backward against the double op on the same inputs and statistics; dx is a difference
      // of O(1) terms (absolute part eps), dweight/dbias a sum of `rows` terms rounded once.
      const double rows = static_cast<double>(s.numel() / n);
      const auto rg = ops::rms_norm_backward<T>(g, x, w, r.rstd);
      const auto rgd = ops::rms_norm_backward<double>(gd, xd, wd, cast<double, float>(r.rstd));
      check_close(cast<double, T>(rg.dx), rgd.dx, eps, eps, "rms_norm dx");
      check_close(cast<double, T>(rg.dweight), rgd.dweight, eps, 1e-5 * rows, "rms_norm dweight");
      const auto lg = ops::layer_norm_backward<T>(g, x, w, l.mean, l.rstd);
      const auto lgd = ops::layer_norm_backward<double>(gd, xd, wd, cast<double, float>(l.mean),
                                                        cast<double, float>(l.rstd));
      check_close(cast<double, T>(lg.dx), lgd.dx, eps, eps, "layer_norm dx");
      check_close(cast<double, T>(lg.dweight), lgd.dweight, eps, 1e-5 * rows, "ln dweight");
      check_close(cast<double, T>(lg.dbias), lgd.dbias, eps, 1e-5 * rows, "ln dbias");
    }
  }
}

BOOST_AUTO_TEST_CASE(bf16_matches_float_reference) { check_low_precision<bf16>(); }
BOOST_AUTO_TEST_CASE(fp16_matches_float_reference) { check_low_precision<fp16>(); }

BOOST_AUTO_TEST_CASE(strided_input_equals_contiguous) {
  const auto x = cast<float, double>(random_tensor({11, 7}, kSeed + 16));
  const auto xt = x.transpose(0, 1);  // (7, 11), strided
  const auto xc = xt.contiguous();
  const auto w = Tensor<float>::full({11}, 1.5f);
  const auto b = Tensor<float>::full({11}, -0.5f);
  BOOST_TEST(same_bits(ops::rms_norm<float>(xt, w).y, ops::rms_norm<float>(xc, w).y));
  const auto lt = ops::layer_norm<float>(xt, w, b);
  const auto lc = ops::layer_norm<float>(xc, w, b);
  BOOST_TEST(same_bits(lt.y, lc.y));
  const auto gt = ops::layer_norm_backward<float>(xt, xt, w, lt.mean, lt.rstd);
  const auto gc = ops::layer_norm_backward<float>(xc, xc, w, lc.mean, lc.rstd);
  BOOST_TEST(same_bits(gt.dx, gc.dx));
  BOOST_TEST(same_bits(gt.dweight, gc.dweight));
}

BOOST_AUTO_TEST_CASE(no_rows) {
  const auto x = Tensor<float>(Shape{0, 11});
  const auto w = Tensor<float>::full({11}, 1.0f);
  const auto r = ops::rms_norm<float>(x, w);
  BOOST_TEST(r.y.shape() == (Shape{0, 11}));
  BOOST_TEST(r.rstd.shape() == (Shape{0}));
  const auto rg = ops::rms_norm_backward<float>(x, x, w, r.rstd);
  BOOST_TEST(rg.dweight.shape() == (Shape{11}));
  for (float v : rg.dweight.span()) BOOST_TEST(v == 0.0f);
  const auto l = ops::layer_norm<float>(x, w, w);
  const auto lg = ops::layer_norm_backward<float>(x, x, w, l.mean, l.rstd);
  for (float v : lg.dbias.span()) BOOST_TEST(v == 0.0f);
}

BOOST_AUTO_TEST_CASE(errors_name_the_problem) {
  const auto x = Tensor<float>(Shape{5, 11});
  const auto w = Tensor<float>(Shape{11});
  const auto w10 = Tensor<float>(Shape{10});
  std::string e = error_of([&] { (void)ops::rms_norm<float>(x, w10); });
  BOOST_TEST(contains(e, "rms_norm"));
  BOOST_TEST(contains(e, "'weight'"));
  BOOST_TEST(contains(e, "[10]"));
  BOOST_TEST(contains(e, "[11]"));
  e = error_of([&] { (void)ops::layer_norm<float>(x, w, w10); });
  BOOST_TEST(contains(e, "layer_norm: tensor 'bias'"));
  e = error_of([&] { (void)ops::rms_norm<float>(Tensor<float>(Shape{5, 0}), Tensor<float>(Shape{0})); });
  BOOST_TEST(contains(e, "at least one feature"));
  e = error_of([&] { (void)ops::rms_norm<float>(Tensor<float>::full(Shape{}, 1.0f), w); });
  BOOST_TEST(contains(e, "rank 0"));
  e = error_of([&] { (void)ops::rms_norm<float>(x, w, -1e-6); });
  BOOST_TEST(contains(e, "eps"));

  const auto r = ops::rms_norm<float>(x, w);
  e = error_of([&] { (void)ops::rms_norm_backward<float>(x, x, w, Tensor<float>(Shape{4})); });
  BOOST_TEST(contains(e, "rms_norm_backward: tensor 'rstd'"));
  e = error_of([&] { (void)ops::rms_norm_backward<float>(Tensor<float>(Shape{5, 10}), x, w, r.rstd); });
  BOOST_TEST(contains(e, "'dy'"));
  const auto l = ops::layer_norm<float>(x, w, w);
  e = error_of([&] {
    (void)ops::layer_norm_backward<float>(x, x, w, Tensor<float>(Shape{6}), l.rstd);
  });
  BOOST_TEST(contains(e, "layer_norm_backward: tensor 'mean'"));
  BOOST_TEST(contains(e, "[6]"));
  BOOST_TEST(contains(e, "[5]"));
}
