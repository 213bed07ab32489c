// cross_entropy: forward against the closed form (uniform logits give log(vocab) for every
// target and every smoothing) and a long-double reference built from log-probabilities as
// PyTorch defines the loss; backward against central finite differences in double, for every
// reduction, with ignored rows and label smoothing; float on every compiled instruction-set
// path and thread count; bf16/fp16 with tolerances from the format's epsilon; odd shapes,
// several log-sum-exp blocks, masked logits, strided inputs, and the errors a caller gets.
#define BOOST_TEST_MODULE cross_entropy
#include <boost/test/unit_test.hpp>
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "finite_difference.hpp"
#include "tessera/ops/cross_entropy.hpp"

using namespace tessera;
using tessera::ops::CrossEntropyOptions;
using tessera::ops::Reduction;
using tessera::testing::check_close;
using tessera::testing::dot;
using tessera::testing::numeric_gradient;
using tessera::testing::random_tensor;

namespace {

constexpr uint64_t kSeed = 20240613;

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

bool contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

// Targets (shape `s`) drawn from [0, vocab); every `ignore_every`-th row gets ignore_index.
Tensor<int32_t> random_targets(Shape s, int64_t vocab, uint64_t seed, int ignore_every = 0,
                               int32_t ignore_index = -100) {
  std::mt19937_64 gen(seed);
  auto t = Tensor<int32_t>::empty(s);
  for (int64_t i = 0; i < t.numel(); ++i) {
    t.data()[i] = static_cast<int32_t>(gen() % static_cast<uint64_t>(vocab));
    if (ignore_every > 0 && i % ignore_every == ignore_every - 1) t.data()[i] = ignore_index;
  }
  return t;
}

CrossEntropyOptions opts(Reduction r, float smoothing = 0.0f, int32_t ignore = -100) {
  CrossEntropyOptions o;
  o.reduction = r;
  o.label_smoothing = smoothing;
  o.ignore_index = ignore;
  return o;
}

const char* name(Reduction r) { return ops::to_string(r); }

// PyTorch's definition, in long double: log p = x - log(sum exp(x)) (no max shift: the test
// logits are bounded), nll = -log p[t], smooth = -mean(log p), loss = (1-eps) nll + eps smooth.
// Returns the per-row losses (0 on ignored rows) and the reduced loss.
struct RefLoss {
  std::vector<double> rows;
  double reduced = 0;
};
RefLoss ref_loss(const Tensor<double>& x, const Tensor<int32_t>& t, const CrossEntropyOptions& o) {
  const int64_t vocab = x.shape()[-1];
  const int64_t rows = t.numel();
  RefLoss out;
  long double total = 0;
  int64_t count = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const double* xr = x.data() + r * vocab;
    if (t.data()[r] == o.ignore_index) {
      out.rows.push_back(0.0);
      continue;
    }
    long double s = 0;
    for (int64_t c = 0; c < vocab; ++c) s += std::exp(static_cast<long double>(xr[c]));
    const long double log_s = std::log(s);
    long double sum_logp = 0;
    for (int64_t c = 0; c < vocab; ++c) sum_logp += xr[c] - log_s;
    const long double nll = -(xr[t.data()[r]] - log_s);
    const long double smooth = -sum_logp / vocab;
    const long double eps = o.label_smoothing;
    const long double loss = (1 - eps) * nll + eps * smooth;
    out.rows.push_back(static_cast<double>(loss));
    total += loss;
    ++count;
  }
  out.reduced = o.reduction == Reduction::kMean
                    ? (count > 0 ? static_cast<double>(total / count)
                                 : std::numeric_limits<double>::quiet_NaN())
                    : static_cast<double>(total);
  return out;
}

// The loss as a double tensor of the op's output shape.
Tensor<double> ref_loss_tensor(const Tensor<double>& x, const Tensor<int32_t>& t,
                               const CrossEntropyOptions& o) {
  const RefLoss ref = ref_loss(x, t, o);
  if (o.reduction == Reduction::kNone) {
    return Tensor<double>::from(t.shape(), std::span<const double>(ref.rows));
  }
  return Tensor<double>::full(Shape{}, ref.reduced);
}

// A scalar from the op's loss: the loss itself (kMean, kSum) or its dot with g (kNone).
template <class T>
double scalar_loss(const Tensor<T>& loss, const Tensor<double>& g) {
  const auto l = cast<double, T>(loss);
  return l.rank() == 0 ? l.data()[0] * g.data()[0] : dot(l, g);
}

// An upstream gradient of the loss's shape (a scalar 0.7 for kMean/kSum).
Tensor<double> upstream(const Tensor<int32_t>& t, Reduction r, uint64_t seed) {
  if (r != Reduction::kNone) return Tensor<double>::full(Shape{}, 0.7);
  return random_tensor(t.shape(), seed);
}

struct IsaScope {
  explicit IsaScope(const char* isa) { setenv("TESSERA_ROW_ISA", isa, 1); }
  ~IsaScope() { unsetenv("TESSERA_ROW_ISA"); }
};

template <class T>
bool same_bits(const Tensor<T>& a, const Tensor<T>& b) {
  return a.shape() == b.shape() && std::memcmp(a.data(), b.data(), a.size_bytes()) == 0;
}

const std::vector<Reduction> kReductions = {Reduction::kMean, Reduction::kSum, Reduction::kNone};

}  // namespace

BOOST_AUTO_TEST_CASE(uniform_logits_give_log_vocab) {
  // p = 1/V everywhere: nll = log V, and the smoothing term is log V as well.
  for (int64_t vocab : {1, 11, 129, 1000, 5000}) {
    for (double c : {0.0, 3.75, -50.0}) {
      for (float eps : {0.0f, 0.1f, 1.0f}) {
        BOOST_TEST_CONTEXT("vocab " << vocab << " logit " << c << " eps " << eps) {
          const auto x = Tensor<double>::full({6, vocab}, c);
          const auto t = random_targets({6}, vocab, kSeed);
          const double expected = std::log(static_cast<double>(vocab));
          const auto d = ops::cross_entropy<double>(x, t, opts(Reduction::kMean, eps));
          BOOST_TEST(d.loss.data()[0] == expected, boost::test_tools::tolerance(1e-14));
          BOOST_TEST(d.valid_rows == 6);
          const auto f = ops::cross_entropy<float>(cast<float, double>(x), t,
                                                   opts(Reduction::kNone, eps));
          for (int64_t r = 0; r < 6; ++r)
            BOOST_TEST(f.loss.data()[r] == expected, boost::test_tools::tolerance(2e-6));
          const auto h = ops::cross_entropy<bf16>(cast<bf16, double>(x), t,
                                                  opts(Reduction::kSum, eps));
          BOOST_TEST(to_float(h.loss.data()[0]) == 6 * expected,
                     boost::test_tools::tolerance(double(number_traits<bf16>::epsilon)));
        }
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(forward_double_matches_reference) {
  BOOST_TEST_MESSAGE("seed " << kSeed);
  const std::vector<Shape> shapes = {{5, 11}, {7, 129}, {13, 1}, {4, 3, 11}, {3, 9000}};
  for (const Shape& s : shapes) {
    const Shape ts(s.span().first(static_cast<size_t>(s.rank() - 1)));
    const int64_t vocab = s[-1];
    const auto x = scaled(random_tensor(s, kSeed + 1), 5.0);
    for (Reduction red : kReductions) {
      for (float eps : {0.0f, 0.1f, 1.0f}) {
        for (int32_t ignore : {-100, 0}) {  // 0 is also a class: rows of class 0 are ignored
          BOOST_TEST_CONTEXT("shape " << s << " reduction " << name(red) << " eps " << eps
                                      << " ignore_index " << ignore << " seed " << kSeed) {
            const auto t = random_targets(ts, vocab, kSeed + 2, 3, ignore);
            const auto o = opts(red, eps, ignore);
            const auto out = ops::cross_entropy<double>(x, t, o);
            const auto ref = ref_loss_tensor(x, t, o);
            if (std::isnan(ref.data()[0])) {  // every row ignored, reduction mean
              BOOST_TEST(std::isnan(out.loss.data()[0]));
            } else {
              check_close(out.loss, ref, 1e-13, 1e-14, "loss");
            }
            BOOST_TEST(out.logsumexp.shape() == (Shape{t.numel()}));
          }
        }
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(float_every_isa_and_thread_count) {
  // float: log-sum-exp from the exp polynomial (2 ulp) and one float sum per row; the losses
  // are summed in double. The thread count must not change a bit of the loss or the gradient.
  for (const Shape& s : {Shape{300, 129}, Shape{2, 9000}, Shape{7, 11}}) {
    const int64_t vocab = s[-1];
    const auto xd = scaled(random_tensor(s, kSeed + 3), 5.0);
    const auto x = cast<float, double>(xd);
    const auto xr = cast<double, float>(x);
    const auto t = random_targets({s[0]}, vocab, kSeed + 4, 5);
    for (Reduction red : kReductions) {
      const auto o = opts(red, 0.1f);
      const auto ref = ref_loss_tensor(xr, t, o);
      const auto g = upstream(t, red, kSeed + 5);
      const auto gf = cast<float, double>(g);
      // The reference gradient: the double op on the same float inputs (checked against finite
      // differences below).
      const auto outd = ops::cross_entropy<double>(xr, t, o);
      const auto dref = ops::cross_entropy_backward<double>(cast<double, float>(gf), xr, t,
                                                            outd.logsumexp, o);
      for (const char* isa : {"baseline", "avx2", "avx512"}) {
        IsaScope scope(isa);
        BOOST_TEST_CONTEXT("isa " << isa << " (runs "
                                  << ops::rows_detail::to_string(ops::rows_detail::row_isa())
                                  << ") shape " << s << " reduction " << name(red) << " seed "
                                  << kSeed) {
          omp_set_num_threads(1);
          const auto o1 = ops::cross_entropy<float>(x, t, o);
          const auto d1 = ops::cross_entropy_backward<float>(gf, x, t, o1.logsumexp, o);
          omp_set_num_threads(3);
          const auto o3 = ops::cross_entropy<float>(x, t, o);
          const auto d3 = ops::cross_entropy_backward<float>(gf, x, t, o3.logsumexp, o);
          omp_set_num_threads(2);
          BOOST_TEST(same_bits(o1.loss, o3.loss));
          BOOST_TEST(same_bits(o1.logsumexp, o3.logsumexp));
          BOOST_TEST(same_bits(d1, d3));
          check_close(cast<double, float>(o1.loss), ref, 2e-6, 2e-6, "loss<float>");
          check_close(cast<double, float>(d1), dref, 1e-5, 1e-8, "dlogits<float>");
        }
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(backward_matches_finite_differences) {
  BOOST_TEST_MESSAGE("seed " << kSeed);
  for (const Shape& s : {Shape{5, 11}, Shape{7, 13}, Shape{3, 2, 7}, Shape{1, 1}}) {
    const Shape ts(s.span().first(static_cast<size_t>(s.rank() - 1)));
    const auto x = scaled(random_tensor(s, kSeed + 6), 3.0);
    const auto t = random_targets(ts, s[-1], kSeed + 7, 4);
    for (Reduction red : kReductions) {
      for (float eps : {0.0f, 0.2f}) {
        BOOST_TEST_CONTEXT("shape " << s << " reduction " << name(red) << " eps " << eps
                                    << " seed " << kSeed) {
          const auto o = opts(red, eps);
          const auto g = upstream(t, red, kSeed + 8);
          const auto out = ops::cross_entropy<double>(x, t, o);
          const auto dx = ops::cross_entropy_backward<double>(g, x, t, out.logsumexp, o);
          const auto numeric = numeric_gradient(
              [&](TensorView<const double> xv) {
                return scalar_loss(ops::cross_entropy<double>(xv, t, o).loss, g);
              },
              x);
          // Central differences of a loss of size ~10 carry ~1e-9 of rounding noise.
          check_close(dx, numeric, 1e-6, 1e-8, "dlogits vs finite differences");
        }
      }
    }
  }
}

template <class T>
void check_low_precision() {
  const double eps = number_traits<T>::epsilon;
  for (const Shape& s : {Shape{5, 11}, Shape{7, 129}, Shape{13, 1}, Shape{300, 129}}) {
    const auto x = cast<T, double>(scaled(random_tensor(s, kSeed + 9), 4.0));
    const auto xd = cast<double, T>(x);  // the exact values the op sees
    const auto t = random_targets({s[0]}, s[-1], kSeed + 10, 6);
    for (Reduction red : kReductions) {
      BOOST_TEST_CONTEXT(number_traits<T>::name << " shape " << s << " reduction " << name(red)
                                                << " seed " << kSeed) {
        const auto o = opts(red, 0.1f);
        const auto out = ops::cross_entropy<T>(x, t, o);
        // Computed in float, rounded once into T: half an epsilon, plus float's error in the
        // log-sum-exp (absolute, a few 1e-7 of its size).
        check_close(cast<double, T>(out.loss), ref_loss_tensor(xd, t, o), eps, 1e-5, "loss");
        const auto g = cast<T, double>(upstream(t, red, kSeed + 11));
        const auto dx = ops::cross_entropy_backward<T>(g, x, t, out.logsumexp, o);
        const auto outd = ops::cross_entropy<double>(xd, t, o);
        const auto dref =
            ops::cross_entropy_backward<double>(cast<double, T>(g), xd, t, outd.logsumexp, o);
        // p - onehot may cancel (p near 1 at the target): absolute part from float's error.
        check_close(cast<double, T>(dx), dref, eps, 1e-6, "dlogits");
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(bf16_matches_float_reference) { check_low_precision<bf16>(); }
BOOST_AUTO_TEST_CASE(fp16_matches_float_reference) { check_low_precision<fp16>(); }

BOOST_AUTO_TEST_CASE(all_rows_ignored_and_no_rows) {
  // As PyTorch: mean over zero rows is NaN (0/0), sum is 0, none is all zeros; no gradient.
  const auto x = cast<float, double>(random_tensor({4, 11}, kSeed + 12));
  const auto t = Tensor<int32_t>::full({4}, -100);
  const auto mean = ops::cross_entropy<float>(x, t, opts(Reduction::kMean, 0.1f));
  BOOST_TEST(std::isnan(mean.loss.data()[0]));
  BOOST_TEST(mean.valid_rows == 0);
  BOOST_TEST(ops::cross_entropy<float>(x, t, opts(Reduction::kSum)).loss.data()[0] == 0.0f);
  const auto none = ops::cross_entropy<float>(x, t, opts(Reduction::kNone));
  for (float v : none.loss.span()) BOOST_TEST(v == 0.0f);
  const auto one = Tensor<float>::full(Shape{}, 1.0f);
  const auto dx = ops::cross_entropy_backward<float>(one, x, t, mean.logsumexp,
                                                     opts(Reduction::kMean, 0.1f));
  for (float v : dx.span()) BOOST_TEST(v == 0.0f);

  const auto x0 = Tensor<float>(Shape{0, 11});
  const auto t0 = Tensor<int32_t>(Shape{0});
  BOOST_TEST(std::isnan(ops::cross_entropy<float>(x0, t0).loss.data()[0]));
  BOOST_TEST(ops::cross_entropy<float>(x0, t0, opts(Reduction::kSum)).loss.data()[0] == 0.0f);
  BOOST_TEST(ops::cross_entropy<float>(x0, t0, opts(Reduction::kNone)).loss.numel() == 0);
}

BOOST_AUTO_TEST_CASE(masked_logits) {
  // A whole log-sum-exp block of -inf (masked classes) adds nothing: the loss equals that of
  // the unmasked classes alone, and their gradient is exactly 0.
  const int64_t vocab = 5000, open = 904;  // the first 4096 classes (one block) are masked
  const auto xs = scaled(random_tensor({2, open}, kSeed + 13), 3.0);
  auto x = Tensor<float>::full({2, vocab}, -std::numeric_limits<float>::infinity());
  for (int64_t r = 0; r < 2; ++r)
    for (int64_t c = 0; c < open; ++c) x(r, vocab - open + c) = static_cast<float>(xs(r, c));
  const auto t = Tensor<int32_t>::from({2}, {static_cast<int32_t>(vocab - 1), 4096});
  const auto ts = Tensor<int32_t>::from({2}, {static_cast<int32_t>(open - 1), 0});
  const auto full = ops::cross_entropy<float>(x, t, opts(Reduction::kNone));
  const auto part = ops::cross_entropy<float>(cast<float, double>(xs), ts, opts(Reduction::kNone));
  for (int64_t r = 0; r < 2; ++r) {
    BOOST_TEST(std::isfinite(full.loss.data()[r]));
    BOOST_TEST(full.loss.data()[r] == part.loss.data()[r], boost::test_tools::tolerance(1e-6f));
  }
  const auto g = Tensor<float>::full({2}, 1.0f);
  const auto dx = ops::cross_entropy_backward<float>(g, x, t, full.logsumexp, opts(Reduction::kNone));
  for (int64_t c = 0; c < vocab - open; ++c) BOOST_TEST(dx(0, c) == 0.0f);
}

BOOST_AUTO_TEST_CASE(strided_logits_equal_contiguous) {
  const auto x = cast<float, double>(random_tensor({11, 7}, kSeed + 14));
  const auto xt = x.transpose(0, 1);  // (7, 11), strided
  const auto xc = xt.contiguous();
  const auto t = random_targets({7}, 11, kSeed + 15);
  const auto a = ops::cross_entropy<float>(xt, t, opts(Reduction::kNone));
  const auto b = ops::cross_entropy<float>(xc, t, opts(Reduction::kNone));
  BOOST_TEST(same_bits(a.loss, b.loss));
  const auto g = Tensor<float>::full({7}, 0.5f);
  BOOST_TEST(same_bits(
      ops::cross_entropy_backward<float>(g, xt, t, a.logsumexp, opts(Reduction::kNone)),
      ops::cross_entropy_backward<float>(g, xc, t, b.logsumexp, opts(Reduction::kNone))));
}

BOOST_AUTO_TEST_CASE(errors_name_the_problem) {
  const auto x = Tensor<float>(Shape{5, 11});
  auto t = Tensor<int32_t>::from({5}, {0, 1, -100, 11, 2});
  std::string e = error_of([&] { (void)ops::cross_entropy<float>(x, t); });
  BOOST_TEST(contains(e, "cross_entropy"));
  BOOST_TEST(contains(e, "target 11 at row 3"));
  BOOST_TEST(contains(e, "[0, 11)"));
  t(3) = -5;
  e = error_of([&] { (void)ops::cross_entropy<float>(x, t); });
  BOOST_TEST(contains(e, "target -5 at row 3"));
  // The ignore_index may be any value: with -5 ignored, -100 is out of range instead.
  BOOST_TEST(contains(error_of([&] {
                        (void)ops::cross_entropy<float>(x, t, opts(Reduction::kMean, 0, -5));
                      }),
                      "target -100 at row 2"));
  t(2) = 7;
  BOOST_TEST(ops::cross_entropy<float>(x, t, opts(Reduction::kMean, 0, -5)).valid_rows == 4);
  t(3) = 4;

  for (float bad : {-0.1f, 1.5f, std::nanf("")}) {
    e = error_of([&] { (void)ops::cross_entropy<float>(x, t, opts(Reduction::kMean, bad)); });
    BOOST_TEST(contains(e, "label_smoothing"));
  }
  e = error_of([&] { (void)ops::cross_entropy<float>(x, Tensor<int32_t>(Shape{4})); });
  BOOST_TEST(contains(e, "'targets'"));
  BOOST_TEST(contains(e, "[4]"));
  BOOST_TEST(contains(e, "[5]"));
  e = error_of([&] { (void)ops::cross_entropy<float>(Tensor<float>(Shape{5, 0}), t); });
  BOOST_TEST(contains(e, "at least one class"));
  e = error_of([&] {
    (void)ops::cross_entropy<float>(Tensor<float>::full(Shape{}, 1.0f), Tensor<int32_t>(Shape{}));
  });
  BOOST_TEST(contains(e, "rank 0"));

  const auto out = ops::cross_entropy<float>(x, t);
  const auto one = Tensor<float>::full(Shape{}, 1.0f);
  e = error_of([&] {
    (void)ops::cross_entropy_backward<float>(one, x, t, Tensor<float>(Shape{4}));
  });
  BOOST_TEST(contains(e, "'logsumexp'"));
  e = error_of([&] {
    (void)ops::cross_entropy_backward<float>(Tensor<float>(Shape{2}), x, t, out.logsumexp);
  });
  BOOST_TEST(contains(e, "'dloss'"));
  BOOST_TEST(contains(e, "mean"));
  e = error_of([&] {
    (void)ops::cross_entropy_backward<float>(one, x, t, out.logsumexp, opts(Reduction::kNone));
  });
  BOOST_TEST(contains(e, "'dloss'"));
  t(1) = 99;
  e = error_of([&] { (void)ops::cross_entropy_backward<float>(one, x, t, out.logsumexp); });
  BOOST_TEST(contains(e, "cross_entropy_backward: target 99 at row 1"));
}
