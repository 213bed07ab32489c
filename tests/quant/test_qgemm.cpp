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
#include <map>
#include <random>
#include <string>
#include <tuple>
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

// The same matrix for every kernel path: AWQ's scale search costs far more than the products.
template <class F>
const QuantizedMatrix<F>& made(std::int64_t n, std::int64_t k, std::uint64_t seed) {
  static std::map<std::tuple<std::int64_t, std::int64_t, std::uint64_t>, QuantizedMatrix<F>> cache;
  auto it = cache.find({n, k, seed});
  if (it == cache.end()) it = cache.emplace(std::tuple{n, k, seed}, make<F>(n, k, seed)).first;
  return it->second;
}

template <class F>
void check_against_reference(KernelPath path, std::int64_t n, std::int64_t k, std::int64_t m) {
  const auto& q = made<F>(n, k, kSeed + static_cast<std::uint64_t>(n * 1000 + k));
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
  const auto& q = made<F>(n, k, kSeed + 5);
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

// One thread and two (and three, more than this machine's cores) give the same bits, for a
// batch of 2 (codes decoded in registers) and of 5 (decoded once per tile into a buffer).
template <class F>
void check_thread_invariance(KernelPath path, std::int64_t m) {
  const std::int64_t n = 301, k = 512;  // n·k above the parallel threshold
  const auto& q = made<F>(n, k, kSeed + 8);
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

// ---- kAvx512Vnni on INT4: int8 activations ------------------------------------------------
// The path quantises each row of x (times AWQ's 1/s) per sub-block of 32 to d·q, d = max|x|/127,
// q = round-to-even(x / d), and computes y = Σ_g (scale_g · Σ_sub d·Σ nibble·q + zero_g · Σ_g x).
// Checked twice, in double, from the blocks' own nibbles, scales and zero points:
//   * against the same formula with activations quantised here by a scalar loop. Bound: the
//     float steps of the kernel (per group G/32 fmas by d, one by the scale, one by the zero
//     point; the group sum rounded once), n = G/32 + 2·K/G + 2 roundings at most, so
//     |y - ref_q| <= (n + 1) · 2^-24 · (Σ_sub |scale|·d·Σ|nibble·q| + Σ_g |zero|·Σ|x|).
//     The integer part is exact, so any wrong code, lane or term is far above this.
//   * against the unquantised product Σ (nibble·scale + zero)·x. Per element |x - d·q| <=
//     d·(1/2 + 127·2^-24) (the half step, plus the rounding of x / d), and only the nibble
//     part of the weight multiplies it (the zero point takes the exact sum), so
//     |ref_q - ref| <= Σ |nibble·scale| · d · (1/2 + 2^-16)   (+ 2^-24·Σ|w·x| for AWQ's x·(1/s)),
//     added to the bound above.
struct QuantisedX {
  std::vector<float> x;  // x · (1/s) as the path computes it (float product), or x
  std::vector<float> d;  // per sub-block of 32
  std::vector<int> q;
};

template <class F>
QuantisedX quantise_x(const QuantizedMatrix<F>& w, const float* x, std::int64_t k) {
  QuantisedX out{std::vector<float>(x, x + k), {}, std::vector<int>(static_cast<std::size_t>(k))};
  if constexpr (F::kActivationAware)
    for (std::int64_t i = 0; i < k; ++i)
      out.x[static_cast<std::size_t>(i)] = x[i] * w.input_scales_inv()[static_cast<std::size_t>(i)];
  for (std::int64_t c0 = 0; c0 < k; c0 += 32) {
    float amax = 0;
    for (std::int64_t i = c0; i < c0 + 32; ++i) amax = std::max(amax, std::abs(out.x[static_cast<std::size_t>(i)]));
    const float d = amax / 127.0f;
    out.d.push_back(d);
    for (std::int64_t i = c0; i < c0 + 32; ++i)
      out.q[static_cast<std::size_t>(i)] =
          d > 0 ? static_cast<int>(std::nearbyint(out.x[static_cast<std::size_t>(i)] / d)) : 0;
  }
  return out;
}

struct VnniCheck {
  std::int64_t bad_q = 0, bad_full = 0;
  double worst_q = 0, worst_full = 0;  // error / bound
};

// One output of the VNNI path against both references (see above).
template <class F>
void check_vnni_output(const QuantizedMatrix<F>& w, std::int64_t n, const QuantisedX& xq,
                       float got, VnniCheck& out) {
  constexpr std::int64_t G = F::kGroup;
  const std::int64_t k = w.cols();
  double ref_q = 0, ref = 0, terms = 0, rounding = 0, awq = 0;
  for (std::int64_t g = 0; g < k / G; ++g) {
    const auto& b = w.data()[static_cast<std::size_t>(n * (k / G) + g)];
    double xsum = 0, xabs = 0;
    for (std::int64_t c0 = g * G; c0 < (g + 1) * G; c0 += 32) {
      const double d = xq.d[static_cast<std::size_t>(c0 / 32)];
      std::int64_t isum = 0, iabs = 0;
      for (std::int64_t i = c0; i < c0 + 32; ++i) {
        const int nib = b.nibble(static_cast<int>(i % G)), qi = xq.q[static_cast<std::size_t>(i)];
        const double xi = xq.x[static_cast<std::size_t>(i)];
        isum += nib * qi;
        iabs += nib * std::abs(qi);
        xsum += xi;
        xabs += std::abs(xi);
        const double wi = static_cast<double>(nib) * b.scale + b.zero_point;
        ref += wi * xi;
        rounding += std::abs(static_cast<double>(nib) * b.scale) * d * (0.5 + 0x1p-16);
        awq += std::abs(wi * xi);
      }
      ref_q += static_cast<double>(b.scale) * d * static_cast<double>(isum);
      terms += std::abs(static_cast<double>(b.scale)) * d * static_cast<double>(iabs);
    }
    ref_q += static_cast<double>(b.zero_point) * xsum;
    terms += std::abs(static_cast<double>(b.zero_point)) * xabs;
  }
  const double roundings = static_cast<double>(G / 32 + 2 * (k / G) + 3);
  const double bound_q = roundings * 0x1p-24 * terms;
  const double bound_full = bound_q + rounding + (F::kActivationAware ? 0x1p-24 * awq : 0.0);
  const double err_q = std::abs(got - ref_q), err_full = std::abs(got - ref);
  out.bad_q += !(err_q <= bound_q);
  out.bad_full += !(err_full <= bound_full);
  if (bound_q > 0) out.worst_q = std::max(out.worst_q, err_q / bound_q);
  if (bound_full > 0) out.worst_full = std::max(out.worst_full, err_full / bound_full);
}

template <class F>
void check_vnni_against_references(const QuantizedMatrix<F>& w, std::int64_t m) {
  const std::int64_t n = w.rows(), k = w.cols();
  const std::int64_t ldx = k + 5, ldy = n + 3;
  std::vector<float> x = strided_x(m, k, ldx, kSeed + static_cast<std::uint64_t>(m));
  // A sub-block of zeros (step 0) and one with a single non-zero value.
  if (k >= 64) {
    std::fill_n(x.begin() + 32, 32, 0.0f);
    if (m > 1) std::fill_n(x.begin() + ldx, 32, 0.0f), x[static_cast<std::size_t>(ldx + 7)] = -3.0f;
  }
  std::vector<float> y(static_cast<std::size_t>((m + 1) * ldy), kSentinel);
  matmul_via(KernelPath::kAvx512Vnni, x.data(), m, ldx, w, y.data(), ldy);
  VnniCheck chk;
  std::int64_t sentinels = 0;
  for (std::int64_t r = 0; r <= m; ++r) {
    const QuantisedX xq = r < m ? quantise_x(w, x.data() + r * ldx, k) : QuantisedX{};
    for (std::int64_t c = 0; c < ldy; ++c) {
      const float got = y[static_cast<std::size_t>(r * ldy + c)];
      if (r == m || c >= n) {
        sentinels += got != kSentinel;
        continue;
      }
      check_vnni_output(w, c, xq, got, chk);
    }
  }
  const std::string what = std::string(F::kName) + "<" + std::to_string(F::kGroup) +
                           "> avx512-vnni N=" + std::to_string(n) + " K=" + std::to_string(k) +
                           " M=" + std::to_string(m);
  BOOST_TEST(chk.bad_q == 0, what << ": " << chk.bad_q << " outputs beyond the summation bound "
                                  << "from the same int8 activations (worst " << chk.worst_q << ")");
  BOOST_TEST(chk.bad_full == 0, what << ": " << chk.bad_full << " outputs beyond the activation "
                                     << "rounding bound (worst " << chk.worst_full << ")");
  BOOST_TEST(sentinels == 0, what << ": padding overwritten");
  if (chk.worst_q > 0.5 || chk.worst_full > 0.5)
    std::printf("  %s: error up to %.2f / %.2f of the bounds\n", what.c_str(), chk.worst_q,
                chk.worst_full);
}

// Every M from 1 to 64 (the register path up to 4 rows, the unpacked-tile path beyond, every
// tail of the 4-row chunks): the first M rows of a 64-row product, bit for bit.
template <class F>
void check_vnni_every_m(std::int64_t n, std::int64_t k) {
  const auto w = make<F>(n, k, kSeed + 21);
  const std::vector<float> x = strided_x(64, k, k, kSeed + 22);
  std::vector<float> all(static_cast<std::size_t>(64 * n)), some(static_cast<std::size_t>(64 * n));
  matmul_via(KernelPath::kAvx512Vnni, x.data(), 64, k, w, all.data(), n);
  std::int64_t differ = 0;
  for (std::int64_t m = 1; m <= 64; ++m) {
    matmul_via(KernelPath::kAvx512Vnni, x.data(), m, k, w, some.data(), n);
    differ += std::memcmp(some.data(), all.data(), static_cast<std::size_t>(m * n) * 4) != 0;
  }
  BOOST_TEST(differ == 0, F::kName << "<" << F::kGroup << "> avx512-vnni: " << differ
                                   << " of 64 batch sizes differ from the 64-row product");
}

template <class F>
void check_vnni(std::initializer_list<std::int64_t> ks) {
  for (std::int64_t k : ks)
    for (std::int64_t n : {1, 6, 16, 37}) {
      const auto& w = made<F>(n, k, kSeed + static_cast<std::uint64_t>(n * 1000 + k));
      for (std::int64_t m : {1, 3, 5, 17}) check_vnni_against_references(w, m);
    }
  check_vnni_every_m<F>(37, *(ks.end() - 1));
}

template <class F>
void check_all(std::initializer_list<std::int64_t> ks) {
  for (KernelPath path : available_paths()) {
    if (is_int4_v<F> && path == KernelPath::kAvx512Vnni) {
      if constexpr (is_int4_v<F>) check_vnni<F>(ks);
    } else {
      check_shapes<F>(path, ks);
    }
    check_batch_invariance<F>(path, 37, *(ks.end() - 1));
    for (const std::int64_t m : {2, 5}) check_thread_invariance<F>(path, m);
  }
  // Other formats run kAvx512's kernels on kAvx512Vnni: the same bits.
  if (!is_int4_v<F> && path_available(KernelPath::kAvx512Vnni)) {
    constexpr std::int64_t k = k_multiple<F>() > 1 ? 4 * k_multiple<F>() : 100;
    const auto q = make<F>(37, k, kSeed + 31);
    const std::vector<float> x = strided_x(6, k, k, kSeed + 32);
    std::vector<float> a(6 * 37), b(6 * 37);
    matmul_via(KernelPath::kAvx512, x.data(), 6, k, q, a.data(), 37);
    matmul_via(KernelPath::kAvx512Vnni, x.data(), 6, k, q, b.data(), 37);
    BOOST_TEST(std::memcmp(a.data(), b.data(), a.size() * 4) == 0);
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
// A block of 32 is one AVX-512 k-step and two AVX2 steps; a block of 128 spans four and eight.
BOOST_AUTO_TEST_CASE(fp8_blocks_every_path) {
  check_all<FP8BlockWeights<32>>({32, 96, 384});
  for (KernelPath path : available_paths()) check_shapes<FP8BlockWeights<128>>(path, {128, 384});
}
BOOST_AUTO_TEST_CASE(int4_rtn32_every_path) { check_all<Int4RTN<32>>({32, 96, 384}); }
BOOST_AUTO_TEST_CASE(int4_awq128_every_path) { check_all<Int4AWQ<128>>({128, 384}); }

// The VNNI kernel's other group sizes (its unpacking depends on G through the sub-block's place
// in its block); the float paths take G only through the block's decode, covered above.
BOOST_AUTO_TEST_CASE(int4_vnni_every_group) {
  if (!path_available(KernelPath::kAvx512Vnni)) {
    std::printf("no avx512_vnni here: the VNNI kernel is not tested on this machine\n");
    return;
  }
  check_vnni<Int4RTN<64>>({64, 192, 576});
  check_vnni<Int4RTN<128>>({128, 384, 1536});
  check_vnni<Int4AWQ<32>>({32, 96, 384});
  check_vnni<Int4AWQ<64>>({64, 576});
}

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
  setenv("TESSERA_QGEMM_PATH", "avx512-vnni", 1);
  BOOST_TEST((kernel_path() == available_paths().back()));  // or the widest path below it
  BOOST_TEST((path_available(KernelPath::kAvx512Vnni) == cpu_features().avx512_vnni));
  if (path_available(KernelPath::kAvx512Vnni)) {
    setenv("TESSERA_QGEMM_PATH", "avx512", 1);
    BOOST_TEST((kernel_path() == KernelPath::kAvx512));
  }
  setenv("TESSERA_QGEMM_PATH", "avx9000", 1);
  BOOST_CHECK_THROW(kernel_path(), Error);
  unsetenv("TESSERA_QGEMM_PATH");
  BOOST_TEST((kernel_path() == available_paths().back()));
}
