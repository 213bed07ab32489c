// tests/core/test_fp8_scaling.cpp — per-tensor and fine-grained FP8 scaling.
//
// Independent references:
//  * every scale is recomputed here from a naive amax over exactly the tile's elements
//    (ragged edge tiles included) and compared for equality;
//  * every quantised code is checked to be the nearest FP8 value to x·multiplier, by
//    scanning all finite codes (no call into the rounding code under test);
//  * every round trip is held to an error bound derived from the format's traits: half an
//    ulp relative (epsilon / 2) for normal values plus half the smallest subnormal, both in
//    the tile's units, plus a few float ulps for the multiplications.
#define BOOST_TEST_MODULE fp8_scaling
#include <algorithm>
#include <boost/test/unit_test.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "tessera/quant/fp8_scaling.hpp"

namespace {

using namespace tessera;

constexpr std::uint64_t kSeed = 0xF8F8'2025u;
constexpr float kSentinel = -777.0f;

// Rows whose magnitudes differ by row and by 128-column tile, with an occasional outlier,
// so that each tile has its own amax. In every third row the largest value of each tile sits
// on the tile's last column (the ragged end included), in the next row on its first column:
// an off-by-one in a tile's extent then changes a scale.
std::vector<float> test_matrix(std::int64_t rows, std::int64_t cols, std::mt19937_64& rng) {
  std::vector<float> x(static_cast<std::size_t>(rows * cols));
  std::normal_distribution<float> gauss(0.0f, 1.0f);
  std::uniform_int_distribution<int> exponent(-12, 6);
  std::bernoulli_distribution outlier(0.002);
  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int64_t c = 0; c < cols; c += 128) {
      const float magnitude = std::ldexp(1.0f, exponent(rng));
      for (std::int64_t k = c; k < std::min(cols, c + 128); ++k) {
        x[r * cols + k] = magnitude * gauss(rng) * (outlier(rng) ? 100.0f : 1.0f);
      }
      const std::int64_t edge = r % 3 == 0 ? std::min(cols, c + 128) - 1 : c;
      if (r % 3 != 2) x[r * cols + edge] = magnitude * 1000.0f;
    }
  }
  return x;
}

// The FP8 value nearest to y, ties to the even code, saturating: by brute force over codes.
template <class Fp8>
float nearest_fp8(float y) {
  const float max = number_traits<Fp8>::max_finite;
  y = std::clamp(y, -max, max);
  float best = 0.0f;
  int best_code = 0;
  double best_err = std::numeric_limits<double>::infinity();
  for (int c = 0; c < 256; ++c) {
    const float v = static_cast<float>(Fp8::from_bits(static_cast<std::uint8_t>(c)));
    if (!std::isfinite(v)) continue;
    const double err = std::abs(static_cast<double>(v) - y);
    if (err < best_err || (err == best_err && (c & 1) == 0 && (best_code & 1) == 1)) {
      best = v;
      best_code = c;
      best_err = err;
    }
  }
  return best;
}

// Round-trip bound for x quantised with dequantisation multiplier s (x ≈ q·s).
template <class Fp8>
double round_trip_bound(float x, double s) {
  using traits = number_traits<Fp8>;
  return std::abs(x) * (traits::epsilon / 2.0 + 0x1p-20) +
         s * traits::min_subnormal / 2.0 * (1 + 0x1p-20);
}

// Tracks how close errors come to their bound, so a vacuous bound is noticed.
struct Tightness {
  double worst = 0;
  void add(double err, double bound) {
    if (bound > 0) worst = std::max(worst, err / bound);
  }
};

// Naive amax of one tile [r0, r1) x [c0, c1), in double.
double naive_amax(const std::vector<float>& x, std::int64_t cols, std::int64_t r0, std::int64_t r1,
                  std::int64_t c0, std::int64_t c1) {
  double m = 0;
  for (std::int64_t r = r0; r < r1; ++r) {
    for (std::int64_t c = c0; c < c1; ++c) m = std::max(m, std::abs(double{x[r * cols + c]}));
  }
  return m;
}

// Shared check for both fine-grained layouts.
template <class Fp8, bool kBlocks>
void check_tiles(std::int64_t rows, std::int64_t cols) {
  BOOST_TEST_CONTEXT(number_traits<Fp8>::name << (kBlocks ? " 128x128" : " 1x128") << " shape ("
                                              << rows << ", " << cols << ")") {
    std::mt19937_64 rng(kSeed + static_cast<std::uint64_t>(rows * 1000 + cols));
    const std::vector<float> x = test_matrix(rows, cols, rng);
    const std::int64_t tile_rows = kBlocks ? 128 : 1;
    const std::int64_t scale_rows = (rows + tile_rows - 1) / tile_rows;
    const std::int64_t scale_cols = (cols + 127) / 128;
    const std::int64_t n_scales =
        kBlocks ? block_scale_count_128x128(rows, cols) : tile_scale_count_1x128(rows, cols);
    BOOST_TEST(n_scales == scale_rows * scale_cols);

    // One spare element past each output: a sentinel that must survive.
    std::vector<Fp8> q(static_cast<std::size_t>(rows * cols) + 1, Fp8::from_bits(0x55));
    std::vector<float> scales(static_cast<std::size_t>(n_scales) + 1, kSentinel);
    std::vector<float> back(static_cast<std::size_t>(rows * cols) + 1, kSentinel);
    if constexpr (kBlocks) {
      quantize_blocks_128x128(x.data(), rows, cols, q.data(), scales.data());
      dequantize_blocks_128x128(q.data(), scales.data(), rows, cols, back.data());
    } else {
      quantize_tiles_1x128(x.data(), rows, cols, q.data(), scales.data());
      dequantize_tiles_1x128(q.data(), scales.data(), rows, cols, back.data());
    }
    BOOST_TEST(q.back().bits == 0x55);
    BOOST_TEST(scales.back() == kSentinel);
    BOOST_TEST(back.back() == kSentinel);

    const float fp8_max = number_traits<Fp8>::max_finite;
    Tightness tight;
    long long bad_codes = 0, bad_errors = 0;
    for (std::int64_t tr = 0; tr < scale_rows; ++tr) {
      for (std::int64_t tc = 0; tc < scale_cols; ++tc) {
        const std::int64_t r0 = tr * tile_rows, r1 = std::min(rows, r0 + tile_rows);
        const std::int64_t c0 = tc * 128, c1 = std::min(cols, c0 + 128);
        const auto amax = static_cast<float>(naive_amax(x, cols, r0, r1, c0, c1));
        const float s = scales[tr * scale_cols + tc];
        BOOST_TEST(s == amax / fp8_max, "tile (" << tr << ", " << tc << ")");
        const float multiplier = fp8_max / amax;
        for (std::int64_t r = r0; r < r1; ++r) {
          for (std::int64_t c = c0; c < c1; ++c) {
            const std::int64_t i = r * cols + c;
            bad_codes += static_cast<float>(q[i]) != nearest_fp8<Fp8>(x[i] * multiplier);
            const double err = std::abs(static_cast<double>(back[i]) - x[i]);
            const double bound = round_trip_bound<Fp8>(x[i], s);
            bad_errors += err > bound;
            tight.add(err, bound);
          }
        }
      }
    }
    BOOST_TEST(bad_codes == 0);
    BOOST_TEST(bad_errors == 0);
    // (A one-element tile is its own amax and maps exactly onto fp8_max: no error at all.)
    if (cols > 8) BOOST_TEST(tight.worst > 0.25, "largest error / bound = " << tight.worst);
  }
}

}  // namespace

BOOST_AUTO_TEST_CASE(seed_is_printed) {
  BOOST_TEST_MESSAGE("seed = 0x" << std::hex << kSeed);
  BOOST_TEST(true);
}

BOOST_AUTO_TEST_CASE(amax_matches_naive_and_propagates_nan) {
  std::mt19937_64 rng(kSeed);
  const auto x = test_matrix(3, 300, rng);
  BOOST_TEST(amax(x.data(), static_cast<std::int64_t>(x.size())) ==
             static_cast<float>(naive_amax(x, 300, 0, 3, 0, 300)));
  BOOST_TEST(amax(std::span<const float>(x)) == amax(x.data(), 900));
  BOOST_TEST(amax(x.data(), 0) == 0.0f);
  std::vector<float> y = {1.0f, -3.0f, 2.0f};
  BOOST_TEST(amax(y) == 3.0f);
  y[0] = std::numeric_limits<float>::quiet_NaN();
  BOOST_TEST(std::isnan(amax(y)));
  y[0] = -std::numeric_limits<float>::infinity();
  BOOST_TEST(std::isinf(amax(y)));
  y = {1.0f, std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()};
  BOOST_TEST(std::isnan(amax(y)));
}

BOOST_AUTO_TEST_CASE(scale_from_amax_values) {
  BOOST_TEST(scale_from_amax<fp8_e4m3>(448.0f) == 1.0f);
  BOOST_TEST(scale_from_amax<fp8_e4m3>(2.0f) == 224.0f);
  BOOST_TEST(scale_from_amax<fp8_e5m2>(57344.0f) == 1.0f);
  BOOST_TEST(scale_from_amax<fp8_e4m3>(2.0f, 2) == 56.0f);
  BOOST_TEST(scale_from_amax<fp8_e4m3>(0.0f) == 1.0f);
  // A tiny amax still gives a finite scale.
  BOOST_TEST(std::isfinite(scale_from_amax<fp8_e4m3>(1e-38f)));
  BOOST_TEST(std::isfinite(scale_from_amax<fp8_e5m2>(std::numeric_limits<float>::denorm_min())));
  BOOST_CHECK_THROW(scale_from_amax<fp8_e4m3>(std::numeric_limits<float>::quiet_NaN()), Error);
  BOOST_CHECK_THROW(scale_from_amax<fp8_e4m3>(std::numeric_limits<float>::infinity()), Error);
  BOOST_CHECK_THROW(scale_from_amax<fp8_e4m3>(-1.0f), Error);
  BOOST_CHECK_THROW(scale_from_amax<fp8_e4m3>(1.0f, -1), Error);
}

template <class Fp8>
void check_per_tensor(int margin) {
  BOOST_TEST_CONTEXT(number_traits<Fp8>::name << " margin " << margin) {
    std::mt19937_64 rng(kSeed + static_cast<std::uint64_t>(margin));
    const auto x = test_matrix(5, 1000, rng);
    const auto n = static_cast<std::int64_t>(x.size());
    const float scale = scale_from_amax<Fp8>(amax(x.data(), n), margin);
    std::vector<Fp8> q(x.size() + 1, Fp8::from_bits(0x55));
    std::vector<float> back(x.size() + 1, kSentinel);
    quantize_per_tensor(x.data(), n, scale, q.data());
    dequantize_per_tensor(q.data(), n, scale, back.data());
    BOOST_TEST(q.back().bits == 0x55);
    BOOST_TEST(back.back() == kSentinel);
    long long bad_codes = 0, bad_errors = 0;
    Tightness tight;
    for (std::int64_t i = 0; i < n; ++i) {
      bad_codes += static_cast<float>(q[i]) != nearest_fp8<Fp8>(x[i] * scale);
      const double err = std::abs(static_cast<double>(back[i]) - x[i]);
      const double bound = round_trip_bound<Fp8>(x[i], 1.0 / scale);
      bad_errors += err > bound;
      tight.add(err, bound);
    }
    BOOST_TEST(bad_codes == 0);
    BOOST_TEST(bad_errors == 0);
    BOOST_TEST(tight.worst > 0.25, "largest error / bound = " << tight.worst);
  }
}

BOOST_AUTO_TEST_CASE(per_tensor_round_trip) {
  for (int margin : {0, 1, 3}) {
    check_per_tensor<fp8_e4m3>(margin);
    check_per_tensor<fp8_e5m2>(margin);
  }
  // Values beyond the scaled range saturate instead of turning into NaN or inf.
  const float x[2] = {1000.0f, -1e30f};
  fp8_e4m3 q[2];
  quantize_per_tensor(x, 2, 1.0f, q);
  BOOST_TEST(q[0].bits == 0x7E);
  BOOST_TEST(q[1].bits == 0xFE);
  float y[2];
  BOOST_CHECK_THROW(quantize_per_tensor(x, 2, 0.0f, q), Error);
  BOOST_CHECK_THROW(dequantize_per_tensor(q, 2, std::numeric_limits<float>::infinity(), y), Error);
}

BOOST_AUTO_TEST_CASE(tiles_1x128_odd_shapes) {
  for (auto [rows, cols] : {std::pair<std::int64_t, std::int64_t>{5, 300},
                            {7, 128},
                            {3, 1},
                            {1, 129},
                            {11, 255},
                            {2, 513}}) {
    check_tiles<fp8_e4m3, false>(rows, cols);
    check_tiles<fp8_e5m2, false>(rows, cols);
  }
}

BOOST_AUTO_TEST_CASE(blocks_128x128_odd_shapes) {
  for (auto [rows, cols] : {std::pair<std::int64_t, std::int64_t>{300, 200},
                            {128, 128},
                            {129, 1},
                            {1, 257},
                            {13, 131}}) {
    check_tiles<fp8_e4m3, true>(rows, cols);
    check_tiles<fp8_e5m2, true>(rows, cols);
  }
}

BOOST_AUTO_TEST_CASE(outlier_stays_in_its_tile) {
  // Row of 256: an outlier in the first tile must not coarsen the second.
  std::vector<float> x(256);
  for (int i = 0; i < 256; ++i) x[i] = 0.001f * static_cast<float>(i % 17 + 1);
  x[3] = 1000.0f;
  std::vector<fp8_e4m3> q(256);
  float scales[2];
  quantize_tiles_1x128(x.data(), 1, 256, q.data(), scales);
  BOOST_TEST(scales[0] == 1000.0f / 448.0f);
  BOOST_TEST(scales[1] == 0.001f * 17.0f / 448.0f);
  std::vector<float> back(256);
  dequantize_tiles_1x128(q.data(), scales, 1, 256, back.data());
  for (int i = 128; i < 256; ++i) {
    BOOST_TEST(std::abs(back[i] - x[i]) <= x[i] * (0.0625f + 1e-5f), "element " << i);
  }
}

BOOST_AUTO_TEST_CASE(degenerate_tiles) {
  // All-zero tile: scale 1 and zero codes. Tiny tile: finite scale, values survive.
  std::vector<float> x(2 * 130, 0.0f);
  for (int i = 128; i < 130; ++i) x[i] = 3e-38f * static_cast<float>(i - 126);
  std::vector<fp8_e4m3> q(x.size());
  std::vector<float> scales(4), back(x.size());
  quantize_tiles_1x128(x.data(), 2, 130, q.data(), scales.data());
  dequantize_tiles_1x128(q.data(), scales.data(), 2, 130, back.data());
  BOOST_TEST(scales[0] == 1.0f);
  BOOST_TEST(scales[2] == 1.0f);
  BOOST_TEST(scales[3] == 1.0f);
  BOOST_TEST(scales[1] == 0x1p-125f);  // amax raised to fp8_max · 2^-125
  BOOST_TEST(fp8_min_scaled_amax<fp8_e4m3>() == 448.0f * 0x1p-125f);
  for (std::size_t i = 0; i < x.size(); ++i) {
    BOOST_TEST(std::abs(back[i] - x[i]) <= std::abs(x[i]) * 0.0625f, "element " << i);
  }
  // Non-finite values are the caller's bug: the error names the tile.
  x[200] = std::numeric_limits<float>::infinity();
  try {
    quantize_tiles_1x128(x.data(), 2, 130, q.data(), scales.data());
    BOOST_FAIL("an inf must throw");
  } catch (const Error& e) {
    BOOST_TEST(std::string(e.what()).find("row 1, column 0") != std::string::npos, e.what());
  }
  BOOST_CHECK_THROW(quantize_blocks_128x128(x.data(), -1, 130, q.data(), scales.data()), Error);
  // Empty matrices are fine and write nothing.
  quantize_blocks_128x128<fp8_e4m3>(nullptr, 0, 5, nullptr, nullptr);
  BOOST_TEST(block_scale_count_128x128(0, 5) == 0);
}
