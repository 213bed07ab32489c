// tests/quant/test_qgemm.cpp — the quantised products of quant/qgemm.hpp on every kernel path
// this processor has.
//
// Reference: W.dequantize() (the weight the product claims to use) multiplied by x in double.
// Bound per output element, for every path:
//     |y - ref| <= (K + 16) · 2^-24 · sum_k |x_k| · mag_k
// where mag_k is |w_k| for fp32/bf16/fp8 and |nibble·scale| + |zero point| (times 1/s for AWQ)
// for INT4. Why: each path sums each output in float, in at most K sequential steps plus a
// 4-level tree over the vector lanes (the textbook bound is (steps)·u·sum|terms|, u = 2^-24);
// the SIMD paths decode an INT4 weight with one fused multiply-add where dequantize() rounds
// twice, an error of at most 2u·mag; AWQ's x·(1/s) and FP8's scale add one rounding each. No
// path quantises activations, so nothing larger is allowed. Any real bug (a wrong nibble, a
// wrong scale, a skipped chunk) is orders of magnitude above this.
//
// Shapes are odd on purpose (N not a multiple of the 4-row tile or of 16, K with a tail beyond
// the vector step, M = 1, 3, 17), and y has sentinels in its padding and past its last row.
// Then the contract a batching engine relies on: a row of x gives bit-identical output alone
// and in a batch, and with one thread or several.
#define BOOST_TEST_MODULE quant_qgemm
#include <omp.h>

#include <algorithm>
#include <boost/test/unit_test.hpp>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "tessera/quant/qgemm.hpp"

namespace {

using namespace tessera;
using namespace tessera::quant;

constexpr std::uint64_t kSeed = 777001;
constexpr float kSentinel = -12345.5f;

Tensor<float> random_matrix(std::int64_t rows, std::int64_t cols, float sigma, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> g(0.0f, sigma);
  auto t = Tensor<float>::empty(Shape{rows, cols});
  for (float& v : t.span()) v = g(rng) + (seed % 3 == 0 ? 0.01f : 0.0f);
  return t;
}

// x (M, K) stored with row stride ldx > K; the gap holds garbage the kernels must not read.
std::vector<float> strided_x(std::int64_t m, std::int64_t k, std::int64_t ldx, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> g(0.0f, 1.0f);
  std::vector<float> x(static_cast<std::size_t>(m * ldx), 1e30f);
  for (std::int64_t r = 0; r < m; ++r)
    for (std::int64_t c = 0; c < k; ++c)
      x[static_cast<std::size_t>(r * ldx + c)] = g(rng) * (c % 29 == 3 ? 12.0f : 1.0f);
  return x;
}

// |decoded weight| for the error bound (see the file comment).
template <class F>
Tensor<float> magnitudes(const QuantizedMatrix<F>& q) {
  auto mag = q.dequantize();
  if constexpr (is_int4_v<F>) {
    const std::int64_t k = q.cols(), g = F::kGroup;
    for (std::int64_t n = 0; n < q.rows(); ++n)
      for (std::int64_t c = 0; c < k; ++c) {
        const auto& b = q.data()[static_cast<std::size_t>(n * (k / g) + c / g)];
        float m = std::abs(b.nibble(static_cast<int>(c % g)) * b.scale) + std::abs(b.zero_point);
        if constexpr (F::kActivationAware) m *= q.input_scales_inv()[static_cast<std::size_t>(c)];
        mag(n, c) = m;
      }
  } else {
    for (float& v : mag.span()) v = std::abs(v);
  }
  return mag;
}

template <class F>
QuantizedMatrix<F> make(std::int64_t n, std::int64_t k, std::uint64_t seed) {
  const Tensor<float> w = random_matrix(n, k, 0.05f, seed);
  if constexpr (is_awq_v<F>) {
    const std::vector<float> xs = strided_x(16, k, k, seed + 1);
    Calibration cal{Tensor<float>::from(Shape{16, k}, std::span<const float>(xs))};
    return quantize<F>(w, &cal);
  } else {
    return quantize<F>(w);
  }
}

template <class F>
void check_against_reference(KernelPath path, std::int64_t n, std::int64_t k, std::int64_t m) {
  const auto q = make<F>(n, k, kSeed + static_cast<std::uint64_t>(n * 1000 + k));
  const Tensor<float> wd = q.dequantize(), mag = magnitudes(q);
  const std::int64_t ldx = k + 5, ldy = n + 3;
  const std::vector<float> x = strided_x(m, k, ldx, kSeed + static_cast<std::uint64_t>(m));
  std::vector<float> y(static_cast<std::size_t>((m + 1) * ldy), kSentinel);
  matmul_via(path, x.data(), m, ldx, q, y.data(), ldy);
  std::int64_t bad = 0, sentinels = 0;
  double worst = 0, norm = 0;
  for (std::int64_t r = 0; r <= m; ++r)
    for (std::int64_t c = 0; c < ldy; ++c) {
      const float got = y[static_cast<std::size_t>(r * ldy + c)];
      if (r == m || c >= n) {
        sentinels += got != kSentinel;
        continue;
      }
      double ref = 0, scale = 0;
      for (std::int64_t i = 0; i < k; ++i) {
        const double xi = x[static_cast<std::size_t>(r * ldx + i)];
        ref += xi * wd(c, i);
        scale += std::abs(xi) * mag(c, i);
      }
      const double bound = static_cast<double>(k + 16) * 0x1p-24 * scale;
      const double err = std::abs(got - ref);
      bad += !(err <= bound);
      worst = std::max(worst, err / bound);
      norm += ref * ref;
    }
  BOOST_TEST(bad == 0, F::kName << " " << to_string(path) << " N=" << n << " K=" << k << " M=" << m
                                << ": " << bad << " outputs beyond the bound");
  BOOST_TEST(sentinels == 0, F::kName << " " << to_string(path) << ": padding overwritten");
  BOOST_TEST(norm > 0.0);
  if (worst > 0.5)
    std::printf("  %s %s N=%lld K=%lld M=%lld: error up to %.2f of the bound\n", F::kName,
                to_string(path), static_cast<long long>(n), static_cast<long long>(k),
                static_cast<long long>(m), worst);
}

template <class F>
void check_shapes(KernelPath path, std::initializer_list<std::int64_t> ks) {
  for (std::int64_t k : ks)
    for (std::int64_t n : {1, 6, 37})
      for (std::int64_t m : {1, 3, 17}) check_against_reference<F>(path, n, k, m);
}

// Row r of a batch of 7 equals the same row multiplied alone, bit for bit, and so does a
// 3-row batch taken from the middle.
template <class F>
void check_batch_invariance(KernelPath path, std::int64_t n, std::int64_t k) {
  const auto q = make<F>(n, k, kSeed + 5);
  const std::int64_t ldx = k + 1;
  const std::vector<float> x = strided_x(7, k, ldx, kSeed + 6);
  std::vector<float> batch(static_cast<std::size_t>(7 * n)), one(static_cast<std::size_t>(n)),
      three(static_cast<std::size_t>(3 * n));
  matmul_via(path, x.data(), 7, ldx, q, batch.data(), n);
  std::int64_t differ = 0;
  for (std::int64_t r = 0; r < 7; ++r) {
    matmul_via(path, x.data() + r * ldx, 1, ldx, q, one.data(), n);
    differ += std::memcmp(one.data(), batch.data() + r * n, static_cast<std::size_t>(n) * 4) != 0;
  }
  matmul_via(path, x.data() + 2 * ldx, 3, ldx, q, three.data(), n);
  differ += std::memcmp(three.data(), batch.data() + 2 * n, static_cast<std::size_t>(3 * n) * 4) != 0;
  BOOST_TEST(differ == 0, F::kName << " " << to_string(path) << ": " << differ
                                   << " rows differ between batch and single");
}

// One thread and two (and three, more than this machine's cores) give the same bits.
template <class F>
void check_thread_invariance(KernelPath path) {
  const std::int64_t n = 301, k = 512, m = 5;  // n·k above the parallel threshold
  const auto q = make<F>(n, k, kSeed + 8);
  const std::vector<float> x = strided_x(m, k, k, kSeed + 9);
  const int keep = omp_get_max_threads();
  std::vector<std::vector<float>> ys;
  for (int t : {1, 2, 3}) {
    omp_set_num_threads(t);
    ys.emplace_back(static_cast<std::size_t>(m * n));
    matmul_via(path, x.data(), m, k, q, ys.back().data(), n);
  }
  omp_set_num_threads(keep);
  const std::size_t bytes = ys[0].size() * 4;
  BOOST_TEST(std::memcmp(ys[0].data(), ys[1].data(), bytes) == 0,
             F::kName << " " << to_string(path) << ": 1 and 2 threads differ");
  BOOST_TEST(std::memcmp(ys[0].data(), ys[2].data(), bytes) == 0,
             F::kName << " " << to_string(path) << ": 1 and 3 threads differ");
}

template <class F>
void check_all(std::initializer_list<std::int64_t> ks) {
  for (KernelPath path : available_paths()) {
    check_shapes<F>(path, ks);
    check_batch_invariance<F>(path, 37, *(ks.end() - 1));
    check_thread_invariance<F>(path);
  }
}

}  // namespace

BOOST_AUTO_TEST_CASE(kernel_paths_on_this_machine) {
  std::printf("seed %llu; %s; paths:", static_cast<unsigned long long>(kSeed),
              cpu_features().str().c_str());
  for (KernelPath p : available_paths()) std::printf(" %s", to_string(p));
  std::printf("\n");
  BOOST_TEST((available_paths().front() == KernelPath::kScalar));
}

BOOST_AUTO_TEST_CASE(fp32_every_path) { check_all<FP32Weights>({7, 100, 384}); }
BOOST_AUTO_TEST_CASE(bf16_every_path) { check_all<BF16Weights>({7, 100, 384}); }
BOOST_AUTO_TEST_CASE(fp8_every_path) { check_all<FP8Weights>({7, 100, 384}); }
BOOST_AUTO_TEST_CASE(int4_rtn32_every_path) { check_all<Int4RTN<32>>({32, 96, 384}); }
BOOST_AUTO_TEST_CASE(int4_awq128_every_path) { check_all<Int4AWQ<128>>({128, 384}); }

BOOST_AUTO_TEST_CASE(linear_takes_leading_axes_and_views) {
  const auto q = make<Int4RTN<32>>(19, 64, kSeed + 11);
  const Tensor<float> x = random_matrix(6, 64, 1.0f, kSeed + 12);
  const Tensor<float> y = linear(x.reshape({2, 3, 64}), q);
  BOOST_TEST(y.shape() == Shape({2, 3, 19}));
  std::vector<float> want(6 * 19);
  matmul(x.data(), 6, 64, q, want.data(), 19);
  BOOST_TEST(std::memcmp(y.data(), want.data(), want.size() * 4) == 0);
  // A non-contiguous view (every other row) is copied, not misread.
  const Tensor<float> x2 = random_matrix(64, 4, 1.0f, kSeed + 13);
  const Tensor<float> y2 = linear(x2.transpose(0, 1), q);  // (4, 64) view of a (64, 4) tensor
  const Tensor<float> xt = x2.transpose(0, 1).contiguous();
  std::vector<float> want2(4 * 19);
  matmul(xt.data(), 4, 64, q, want2.data(), 19);
  BOOST_TEST(std::memcmp(y2.data(), want2.data(), want2.size() * 4) == 0);
  BOOST_CHECK_THROW(linear(random_matrix(2, 32, 1.0f, 1), q), Error);
}

BOOST_AUTO_TEST_CASE(path_override_and_argument_errors) {
  const auto q = make<FP8Weights>(4, 16, kSeed);
  std::vector<float> x(32), y(8);
  BOOST_CHECK_THROW(matmul(x.data(), 2, 8, q, y.data(), 4), Error);    // ldx < K
  BOOST_CHECK_THROW(matmul(x.data(), 2, 16, q, y.data(), 3), Error);   // ldy < N
  BOOST_CHECK_THROW(matmul(x.data(), -1, 16, q, y.data(), 4), Error);  // M < 0
  setenv("TESSERA_QGEMM_PATH", "scalar", 1);
  BOOST_TEST((kernel_path() == KernelPath::kScalar));
  setenv("TESSERA_QGEMM_PATH", "avx9000", 1);
  BOOST_CHECK_THROW(kernel_path(), Error);
  unsetenv("TESSERA_QGEMM_PATH");
  BOOST_TEST((kernel_path() == available_paths().back()));
}
