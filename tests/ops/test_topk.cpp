// topk / topk_backward: against a full stable sort written differently (std::stable_sort of
// (value, index) pairs), ties by the lower index, NaN first, bf16 ties on stored values, odd
// shapes and every k, strided input, backward against finite differences in double, and the
// errors (k out of range, indices out of range, shape mismatch).
#define BOOST_TEST_MODULE topk
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "finite_difference.hpp"
#include "tessera/ops/cast.hpp"
#include "tessera/ops/topk.hpp"

using namespace tessera;
using namespace tessera::ops;
using tessera::testing::check_close;
using tessera::testing::dot;
using tessera::testing::numeric_gradient;
using tessera::testing::random_tensor;

namespace {
constexpr uint64_t kSeed = 1234567;

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// Reference: stable sort by descending value keeps equal values in index order.
std::vector<int32_t> reference_order(const double* row, int64_t n) {
  std::vector<int32_t> idx(n);
  for (int64_t i = 0; i < n; ++i) idx[i] = static_cast<int32_t>(i);
  std::stable_sort(idx.begin(), idx.end(), [&](int32_t a, int32_t b) {
    const bool na = std::isnan(row[a]), nb = std::isnan(row[b]);
    if (na || nb) return na && !nb;
    return row[a] > row[b];
  });
  return idx;
}

template <class T>
void check_against_reference(const Tensor<T>& x, int64_t k, const char* what) {
  const TopK<T> r = topk<T>(x, k);
  const Tensor<double> x64 = cast<double>(x);
  const int64_t n = x.dim(-1), rows = x.numel() / n;
  Shape s = x.shape();
  s[-1] = k;
  BOOST_TEST(r.values.shape() == s);
  BOOST_TEST(r.indices.shape() == s);
  int64_t bad = 0;
  for (int64_t row = 0; row < rows; ++row) {
    const auto order = reference_order(x64.data() + row * n, n);
    for (int64_t j = 0; j < k; ++j) {
      if (r.indices.data()[row * k + j] != order[j]) ++bad;
      if (std::memcmp(&r.values.data()[row * k + j], &x.data()[row * n + order[j]], sizeof(T)) != 0) ++bad;
    }
  }
  BOOST_TEST(bad == 0, what << " k=" << k);
}
}  // namespace

BOOST_AUTO_TEST_CASE(against_stable_sort_every_k) {
  BOOST_TEST_MESSAGE("seed " << kSeed);
  for (const Shape& s : {Shape{1}, Shape{7}, Shape{5, 11}, Shape{3, 5, 13}}) {
    const Tensor<double> x = random_tensor(s, kSeed + s.numel());
    for (int64_t k = 1; k <= s[-1]; ++k) check_against_reference<double>(x, k, "double");
  }
  // bf16 rounding of uniform(-1, 1) values makes many real ties: they go by index.
  const Tensor<bf16> xb = cast<bf16>(random_tensor({9, 257}, kSeed + 1));
  for (int64_t k : {1, 2, 8, 64, 257}) check_against_reference<bf16>(xb, k, "bf16");
  const Tensor<float> xf = cast<float>(random_tensor({300, 64}, kSeed + 2));  // parallel rows
  check_against_reference<float>(xf, 6, "float");
}

BOOST_AUTO_TEST_CASE(ties_and_nan) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const auto x = Tensor<float>::from({1, 8}, {1.0f, 3.0f, nan, 3.0f, -0.0f, 0.0f, nan, 1.0f});
  const TopK<float> r = topk<float>(x, 8);
  const std::vector<int32_t> want{2, 6, 1, 3, 0, 7, 4, 5};  // NaNs first, then ties by index
  for (int j = 0; j < 8; ++j) BOOST_TEST(r.indices(0, j) == want[j]);
  BOOST_TEST(r.values(0, 2) == 3.0f);
  BOOST_TEST(std::signbit(r.values(0, 6)));  // -0.0 at index 4 comes before +0.0 at index 5
}

BOOST_AUTO_TEST_CASE(strided_input) {
  const Tensor<double> x = random_tensor({11, 4}, kSeed + 3);
  const TensorView<const double> t = x.transpose(0, 1);  // (4, 11)
  const TopK<double> a = topk<double>(t, 3);
  const TopK<double> b = topk<double>(t.contiguous(), 3);
  for (int64_t i = 0; i < a.indices.numel(); ++i) {
    BOOST_TEST(a.indices.data()[i] == b.indices.data()[i]);
    BOOST_TEST(a.values.data()[i] == b.values.data()[i]);
  }
}

BOOST_AUTO_TEST_CASE(backward_finite_differences) {
  BOOST_TEST_MESSAGE("seed " << kSeed + 4);
  const Tensor<double> x = random_tensor({3, 5, 13}, kSeed + 4);
  const int64_t k = 4;
  const Tensor<double> g = random_tensor({3, 5, k}, kSeed + 5);
  const TopK<double> r = topk<double>(x, k);
  const Tensor<double> dx = topk_backward<double>(r.values.view(), r.indices.view(), 13);
  BOOST_TEST(dx.shape() == x.shape());
  // Random values have no ties, so topk is differentiable at x and eps never reorders them.
  const Tensor<double> num = numeric_gradient(
      [&](TensorView<const double> v) { return dot(topk<double>(v, k).values, g); }, x);
  const Tensor<double> dxg = topk_backward<double>(g.view(), r.indices.view(), 13);
  check_close(dxg, num, 1e-8, 1e-9, "topk dx");
  // Positions not selected get exactly zero.
  int64_t nonzero = 0;
  for (double v : dxg.span()) nonzero += v != 0.0;
  BOOST_TEST(nonzero == 3 * 5 * k);
}

BOOST_AUTO_TEST_CASE(errors) {
  const auto x = Tensor<float>::zeros({2, 5});
  std::string m = error_of([&] { (void)topk<float>(x, 6); });
  BOOST_TEST(m.find("topk") != std::string::npos, m);
  BOOST_TEST(m.find("k = 6") != std::string::npos, m);
  BOOST_TEST(m.find("[1, 5]") != std::string::npos, m);
  BOOST_CHECK_THROW((void)topk<float>(x, 0), Error);
  BOOST_CHECK_THROW((void)topk<float>(Tensor<float>::zeros({}), 1), Error);

  const auto dv = Tensor<float>::zeros({2, 2});
  const auto ids = Tensor<int32_t>::from({2, 2}, {0, 4, 1, 5});
  m = error_of([&] { (void)topk_backward<float>(dv, ids, 5); });
  BOOST_TEST(m.find("topk_backward") != std::string::npos, m);
  BOOST_TEST(m.find("holds 5") != std::string::npos, m);
  BOOST_TEST(m.find("[0, 5)") != std::string::npos, m);
  m = error_of([&] { (void)topk_backward<float>(dv, Tensor<int32_t>::zeros({2, 3}), 5); });
  BOOST_TEST(m.find("'indices'") != std::string::npos, m);
}
