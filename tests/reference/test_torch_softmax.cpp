// LibTorch cross-checks of softmax and log_softmax (forward and backward, masked rows
// included) and of the cross-entropy loss (ignore_index, label smoothing, every reduction),
// in float and bf16.
#define BOOST_TEST_MODULE torch_softmax
#include <algorithm>
#include <boost/test/unit_test.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "cross_check.hpp"
#include "tessera/ops/cross_entropy.hpp"
#include "tessera/ops/softmax.hpp"

using namespace tessera;
using namespace tessera::cross_check;

BOOST_TEST_GLOBAL_FIXTURE(TorchSetup);

namespace {

using Types = std::tuple<float, bf16>;

// ---- tolerances ---------------------------------------------------------------------------------
// Forward. Float: tessera's exp is a polynomial within 2 ulp of expf, LibTorch's is SLEEF's
// (1 ulp), and the row sums (n <= 1000 positive terms) are added in different orders: a few
// eps from the exps plus about sqrt(n) eps from the sums; 64 eps (3.8e-6) covers both with
// margin. bf16: both compute in float and round once: the float difference plus one bf16 ulp
// of the element (for_type in cross_check.hpp).
//
// Backward. Both gradients are differences of terms that can be much larger than the result:
//   softmax      dx_i = y_i dy_i - y_i s,     s = sum_j dy_j y_j
//   log_softmax  dx_i = dy_i - exp(y_i) S,    S = sum_j dy_j
// (for a nearly one-hot row, dx at the peak is ~1e-3 while y dy and y s are ~1). Any float
// implementation is then only accurate to a few eps of those terms, so the scale-relative
// tolerance is measured in units of the largest term (term_scale below), not of the result.
// Two checks per backward:
//   * against LibTorch's backward kernel applied to tessera's own forward output y (the state
//     the backward is given): float and bf16 compute in float from the same numbers, so 64
//     float eps of the term scale, plus one bf16 ulp of the element for the rounding of dx;
//   * against autograd from x: in bf16 tessera's y is rounded (eps relative), which moves dx
//     by eps |y_i| (|dy_i| + |s|) (softmax) or eps |y_i| exp(y_i) |S| (log_softmax), i.e. up
//     to about 2 eps of the term scale with the sum's share; 4 eps of the term scale then.
template <class T>
Tolerance forward_tol() {
  return for_type<T>({64 * kFloatEps, 64 * kFloatEps});
}
template <class T>
Tolerance same_y_tol(double term_scale) {
  return for_type<T>({64 * kFloatEps, 64 * kFloatEps, term_scale});
}
template <class T>
Tolerance autograd_tol(double term_scale) {
  return std::is_same_v<T, float>
             ? Tolerance{64 * kFloatEps, 64 * kFloatEps, term_scale}
             : Tolerance{64 * kFloatEps + 2 * kBf16Eps, 4 * kBf16Eps, term_scale};
}

// The largest term of the softmax / log_softmax gradient formulas above, row by row.
double softmax_term_scale(const Array& y, const Array& dy) {
  const size_t n = static_cast<size_t>(y.shape.back());
  double scale = 0.0;
  for (size_t r = 0; r < y.data.size(); r += n) {
    double s = 0.0;
    for (size_t i = r; i < r + n; ++i) s += double(dy.data[i]) * y.data[i];
    for (size_t i = r; i < r + n; ++i)
      scale = std::max(scale, std::fabs(y.data[i]) * (std::fabs(dy.data[i]) + std::fabs(s)));
  }
  return scale;
}
double log_softmax_term_scale(const Array& y, const Array& dy) {
  const size_t n = static_cast<size_t>(y.shape.back());
  double scale = 0.0;
  for (size_t r = 0; r < y.data.size(); r += n) {
    double sum = 0.0;
    for (size_t i = r; i < r + n; ++i) sum += dy.data[i];
    for (size_t i = r; i < r + n; ++i) {
      const double p = std::exp(double(y.data[i]));  // 0 for a masked (-inf) entry
      const double ylog = std::isfinite(y.data[i]) ? std::fabs(y.data[i]) : 0.0;
      scale = std::max(scale, std::fabs(dy.data[i]) + p * std::max(1.0, ylog) * std::fabs(sum));
    }
  }
  return scale;
}

struct SoftmaxCase {
  Shape shape;
  double stddev;  // logit spread: 1 (flat), 5 (peaked), 20 (nearly one-hot)
  bool masked;    // some entries -inf (attention masks), never a whole row
};

const std::vector<SoftmaxCase> kSoftmaxCases = {
    {{7}, 1.0, false},       {{5, 11}, 5.0, false},  {{3, 7, 13}, 1.0, true},
    {{2, 1000}, 5.0, false}, {{4, 33}, 20.0, false}, {{6, 17}, 2.0, true},
};

template <class T>
Input<T> logits(Gen& gen, const SoftmaxCase& c) {
  const int64_t n = c.shape[-1];
  int64_t i = 0;
  return make_input<T>(c.shape, [&] {
    const int64_t col = i++ % n;
    // Mask about a quarter of the entries, but never column 0, so no row is all -inf.
    if (c.masked && col > 0 && gen.uniform(0.0, 1.0) < 0.25)
      return -std::numeric_limits<double>::infinity();
    return c.stddev * gen.normal();
  });
}

}  // namespace

BOOST_AUTO_TEST_SUITE(softmax)

BOOST_AUTO_TEST_CASE_TEMPLATE(softmax_forward_backward, T, Types) {
  for (const SoftmaxCase& c : kSoftmaxCases) {
    const std::string tag = "softmax<" + name_of<T>() + "> " + c.shape.str() + " spread " +
                            std::to_string(static_cast<int>(c.stddev)) +
                            (c.masked ? " masked" : "");
    Gen gen(tag);
    auto x = logits<T>(gen, c);
    auto dy = normal<T>(gen, c.shape);
    auto y = ops::softmax<T>(x.tensor);
    auto dx = ops::softmax_backward<T>(dy.tensor, y);
    const auto ref = torch_ref::softmax(x.array, dy.array, precision_of<T>);
    const double terms = softmax_term_scale(ref.y, dy.array);
    check_close(tag + " y", y, ref.y, forward_tol<T>());
    check_close(tag + " dx (autograd)", dx, ref.dx, autograd_tol<T>(terms));
    const Array same_y = torch_ref::softmax_backward(to_array(y), dy.array, precision_of<T>);
    check_close(tag + " dx (same y)", dx, same_y, same_y_tol<T>(terms));
  }
}

BOOST_AUTO_TEST_CASE_TEMPLATE(log_softmax_forward_backward, T, Types) {
  for (const SoftmaxCase& c : kSoftmaxCases) {
    const std::string tag = "log_softmax<" + name_of<T>() + "> " + c.shape.str() + " spread " +
                            std::to_string(static_cast<int>(c.stddev)) +
                            (c.masked ? " masked" : "");
    Gen gen(tag);
    auto x = logits<T>(gen, c);
    auto dy = normal<T>(gen, c.shape);
    auto y = ops::log_softmax<T>(x.tensor);
    auto dx = ops::log_softmax_backward<T>(dy.tensor, y);
    const auto ref = torch_ref::log_softmax(x.array, dy.array, precision_of<T>);
    const double terms = log_softmax_term_scale(ref.y, dy.array);
    check_close(tag + " y", y, ref.y, forward_tol<T>());
    check_close(tag + " dx (autograd)", dx, ref.dx, autograd_tol<T>(terms));
    const Array same_y = torch_ref::log_softmax_backward(to_array(y), dy.array, precision_of<T>);
    check_close(tag + " dx (same y)", dx, same_y, same_y_tol<T>(terms));
  }
}

BOOST_AUTO_TEST_SUITE_END()

// ---- cross-entropy
// -------------------------------------------------------------------------------

namespace {

// Loss. loss_i = lse_i - x[i, t] (smoothed: minus the row mean) cancels when the target
// dominates the row (loss ~ 1e-3 from terms ~ 10), so any float implementation is accurate to
// a few eps of |lse| + |x|, not of the loss: the scale term is in units of
// max|x| + log(C). Float: 64 eps of that (exp polynomial vs SLEEF, sum orders).
// Gradient. dx = g (p - eps/C - (1 - eps) [c == t]): p_t - 1 cancels for a confident row, so
// the scale term is in units of the largest row weight |g| (dloss / count for mean): 64 eps.
// bf16: both round the float result once: plus one bf16 ulp of the element.
template <class T>
Tolerance loss_tol(double term_scale) {
  return for_type<T>({64 * kFloatEps, 64 * kFloatEps, term_scale});
}
template <class T>
Tolerance ce_grad_tol(double g_scale) {
  return for_type<T>({64 * kFloatEps, 64 * kFloatEps, g_scale});
}

torch_ref::Reduction to_ref(ops::Reduction r) {
  switch (r) {
    case ops::Reduction::kMean:
      return torch_ref::Reduction::kMean;
    case ops::Reduction::kSum:
      return torch_ref::Reduction::kSum;
    case ops::Reduction::kNone:
      return torch_ref::Reduction::kNone;
  }
  return torch_ref::Reduction::kMean;
}

struct CeCase {
  Shape logits;
  int32_t ignore_index;
  double ignored_fraction;
};

}  // namespace

BOOST_AUTO_TEST_SUITE(cross_entropy)

// Every reduction x label smoothing (0, 0.1, 1) x ignore pattern, on (N, C) and (B, T, C)
// logits and a vocabulary-sized row. ignore_index 3 is also a valid class: rows targeting 3
// must be ignored, not scored.
BOOST_AUTO_TEST_CASE_TEMPLATE(reductions_smoothing_ignore, T, Types) {
  const std::vector<CeCase> cases = {
      {{7, 11}, -100, 0.0}, {{3, 5, 13}, -100, 0.3}, {{16, 37}, 3, 0.25}, {{4, 1000}, -100, 0.25}};
  for (const CeCase& c : cases) {
    for (ops::Reduction reduction :
         {ops::Reduction::kMean, ops::Reduction::kSum, ops::Reduction::kNone}) {
      for (float smoothing : {0.0f, 0.1f, 1.0f}) {
        const std::string tag = "cross_entropy<" + name_of<T>() + "> " + c.logits.str() + " " +
                                to_string(reduction) + " smoothing " +
                                std::to_string(smoothing).substr(0, 3) + " ignore " +
                                std::to_string(c.ignore_index);
        Gen gen(tag);
        const int64_t classes = c.logits[-1];
        auto x = normal<T>(gen, c.logits, 3.0);
        const auto lead = c.logits.span().first(static_cast<size_t>(c.logits.rank() - 1));
        const Shape tshape(lead);
        auto targets = Tensor<int32_t>::empty(tshape);
        IndexArray tref{{}, dims_of(tshape)};
        for (int64_t i = 0; i < targets.numel(); ++i) {
          // Row 0 is never ignored, so the mean has at least one row.
          const bool ignored = i > 0 && gen.uniform(0.0, 1.0) < c.ignored_fraction;
          targets.data()[i] =
              ignored ? c.ignore_index : static_cast<int32_t>(gen.integer(0, classes - 1));
          tref.data.push_back(targets.data()[i]);
        }
        const ops::CrossEntropyOptions options{c.ignore_index, smoothing, reduction};
        auto dloss = normal<T>(gen, reduction == ops::Reduction::kNone ? tshape : Shape{});
        auto fwd = ops::cross_entropy<T>(x.tensor, targets, options);
        auto dx =
            ops::cross_entropy_backward<T>(dloss.tensor, x.tensor, targets, fwd.logsumexp, options);
        const auto ref = torch_ref::cross_entropy(x.array, tref, c.ignore_index, smoothing,
                                                  to_ref(reduction), dloss.array, precision_of<T>);
        double xmax = 0.0, gmax = 0.0;
        for (float v : x.array.data) xmax = std::max(xmax, double(std::fabs(v)));
        int64_t valid = 0;
        for (int64_t t : tref.data) valid += t != c.ignore_index;
        for (float g : dloss.array.data)
          gmax = std::max(
              gmax, std::fabs(double(g)) / double(reduction == ops::Reduction::kMean ? valid : 1));
        check_close(tag + " loss", fwd.loss, ref.loss,
                    loss_tol<T>(xmax + std::log(double(classes))),
                    /*allow_zero=*/reduction == ops::Reduction::kNone);
        check_close(tag + " dlogits", dx, ref.dlogits, ce_grad_tol<T>(gmax));
        BOOST_TEST(fwd.valid_rows == valid);
      }
    }
  }
}

// Every row ignored under mean: LibTorch's loss is NaN (0 / 0) and its gradient zero.
BOOST_AUTO_TEST_CASE_TEMPLATE(all_rows_ignored, T, Types) {
  Gen gen("cross_entropy all ignored " + name_of<T>());
  auto x = normal<T>(gen, {5, 7});
  auto targets = Tensor<int32_t>::full({5}, -100);
  const IndexArray tref{std::vector<int64_t>(5, -100), {5}};
  auto dloss = normal<T>(gen, Shape{});
  const ops::CrossEntropyOptions options{-100, 0.1f, ops::Reduction::kMean};
  auto fwd = ops::cross_entropy<T>(x.tensor, targets, options);
  auto dx = ops::cross_entropy_backward<T>(dloss.tensor, x.tensor, targets, fwd.logsumexp, options);
  const auto ref = torch_ref::cross_entropy(x.array, tref, -100, 0.1, torch_ref::Reduction::kMean,
                                            dloss.array, precision_of<T>);
  BOOST_TEST(std::isnan(ref.loss.data.at(0)));
  BOOST_TEST(std::isnan(widen(fwd.loss.data()[0])));
  check_equal("cross_entropy all ignored dlogits", to_array(dx), ref.dlogits);
}

BOOST_AUTO_TEST_SUITE_END()
