// tests/core/test_int4.cpp — group-quantised int4: layout, rounding, error bounds, errors.
//
// The reference here is arithmetic done independently of core/int4.hpp: each group's range
// is recomputed in double, and every dequantised weight must lie within half a grid step
// (plus a few float ulps of the group's magnitude) of the original. Small hand-made groups
// pin the exact codes, the nibble order and ties-to-even.
#define BOOST_TEST_MODULE int4
#include <algorithm>
#include <boost/test/unit_test.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "tessera/core/int4.hpp"

namespace {

using namespace tessera;

constexpr std::uint64_t kSeed = 20240514;

// Groups with different characters: centred Gaussian at varied scales, all positive, one
// outlier, constant, all zero, tiny magnitudes.
std::vector<float> test_values(std::int64_t groups, int group, std::mt19937_64& rng) {
  std::vector<float> x(static_cast<std::size_t>(groups * group));
  std::normal_distribution<float> gauss(0.0f, 1.0f);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  for (std::int64_t g = 0; g < groups; ++g) {
    float* v = x.data() + g * group;
    const float magnitude = std::ldexp(1.0f, static_cast<int>(g % 13) - 6);
    for (int i = 0; i < group; ++i) {
      switch (g % 6) {
        case 0:
          v[i] = magnitude * gauss(rng);
          break;
        case 1:
          v[i] = magnitude * (2.0f + uniform(rng));
          break;  // not centred on zero
        case 2:
          v[i] = (i == 5 ? 40.0f : 0.01f * gauss(rng));
          break;  // one outlier
        case 3:
          v[i] = -0.75f * magnitude;
          break;  // constant
        case 4:
          v[i] = 0.0f;
          break;
        default:
          v[i] = 1e-30f * gauss(rng);
          break;
      }
    }
  }
  return x;
}

// Half a grid step of one group, computed in double from the group's own values, plus
// slack for the float arithmetic of quantising and decoding (a few ulps of its magnitude).
double error_bound(const float* v, int group, Int4Mode mode) {
  double lo = v[0], hi = v[0];
  for (int i = 0; i < group; ++i) {
    lo = std::min(lo, static_cast<double>(v[i]));
    hi = std::max(hi, static_cast<double>(v[i]));
  }
  const double amax = std::max(-lo, hi);
  const double step = mode == Int4Mode::kSymmetric ? amax / 7.0 : (hi - lo) / 15.0;
  return step / 2 + 8 * std::numeric_limits<float>::epsilon() * amax;
}

template <int Group>
void check_round_trip(Int4Mode mode) {
  std::mt19937_64 rng(kSeed + Group + static_cast<int>(mode));
  const std::int64_t groups = 61;
  const std::vector<float> x = test_values(groups, Group, rng);
  const auto blocks = quantize_int4<Group>(x.data(), static_cast<std::int64_t>(x.size()), mode);
  BOOST_TEST(static_cast<std::int64_t>(blocks.size()) == groups);

  // Sentinels after the output catch a write past the end.
  std::vector<float> out(x.size() + 4, -12345.0f);
  dequantize_int4(blocks, out.data());
  for (std::size_t i = x.size(); i < out.size(); ++i) BOOST_TEST(out[i] == -12345.0f);

  int worst_group = -1;
  double worst_ratio = 0;
  for (std::int64_t g = 0; g < groups; ++g) {
    const float* v = x.data() + g * Group;
    const double bound = error_bound(v, Group, mode);
    for (int i = 0; i < Group; ++i) {
      const double err = std::abs(static_cast<double>(out[g * Group + i]) - v[i]);
      BOOST_TEST(std::isfinite(out[g * Group + i]));
      if (err > bound) {
        BOOST_TEST(err <= bound, "group " << g << " element " << i << ": " << v[i] << " -> "
                                          << out[g * Group + i] << ", bound " << bound);
      }
      if (bound > 0 && err / bound > worst_ratio) {
        worst_ratio = err / bound;
        worst_group = static_cast<int>(g);
      }
    }
    // Codes stay on the mode's range: symmetric never writes -8 (nibble 0).
    for (int i = 0; i < Group; ++i) {
      if (mode == Int4Mode::kSymmetric) BOOST_TEST(blocks[g].nibble(i) >= 1);
    }
  }
  // The bound is not vacuous: some element uses a good part of it.
  BOOST_TEST(worst_ratio > 0.5,
             "largest error / bound = " << worst_ratio << " in group " << worst_group);
  // Constant and zero groups come back exactly in asymmetric mode; zero groups in both.
  for (std::int64_t g = 0; g < groups; ++g) {
    if (g % 6 == 4 || (g % 6 == 3 && mode == Int4Mode::kAsymmetric)) {
      for (int i = 0; i < Group; ++i) BOOST_TEST(out[g * Group + i] == x[g * Group + i]);
    }
  }
}

}  // namespace

BOOST_AUTO_TEST_CASE(seed_is_printed) {
  BOOST_TEST_MESSAGE("seed = " << kSeed);
  BOOST_TEST(true);
}

BOOST_AUTO_TEST_CASE(block_sizes) {
  static_assert(sizeof(Int4Block<32>) == 24);
  static_assert(sizeof(Int4Block<64>) == 40);
  static_assert(sizeof(Int4Block<128>) == 72);
  static_assert(std::is_trivially_copyable_v<Int4Block<64>>);
  BOOST_TEST(sizeof(Int4Block<32>{}.packed) == 16u);
}

BOOST_AUTO_TEST_CASE(round_trip_within_half_a_step) {
  for (Int4Mode mode : {Int4Mode::kSymmetric, Int4Mode::kAsymmetric}) {
    check_round_trip<32>(mode);
    check_round_trip<64>(mode);
    check_round_trip<128>(mode);
  }
}

BOOST_AUTO_TEST_CASE(symmetric_codes_layout_and_ties) {
  // amax = 7 gives scale 1, so the codes are the rounded values themselves.
  std::vector<float> x(32, 0.0f);
  x[0] = 7.0f;   // q =  7 -> nibble 15
  x[1] = -7.0f;  // q = -7 -> nibble 1
  x[2] = 2.5f;   // tie -> 2 (even)
  x[3] = 3.5f;   // tie -> 4 (even)
  x[4] = -0.5f;  // tie -> 0
  x[5] = -1.5f;  // tie -> -2
  x[6] = 1.25f;  // -> 1
  const auto blocks = quantize_int4<32>(x.data(), 32, Int4Mode::kSymmetric);
  const Int4Block<32>& b = blocks[0];
  BOOST_TEST(b.scale == 1.0f);
  BOOST_TEST(b.zero_point == -8.0f);
  const int expected_q[7] = {7, -7, 2, 4, 0, -2, 1};
  for (int i = 0; i < 7; ++i) BOOST_TEST(b.nibble(i) == expected_q[i] + 8, "element " << i);
  // Low nibble first: element 0 in bits 0-3 of byte 0, element 1 in bits 4-7.
  BOOST_TEST(b.packed[0] == 0x1F);
  BOOST_TEST(b.packed[1] == ((4 + 8) << 4 | (2 + 8)));
  for (int i = 7; i < 32; ++i) BOOST_TEST(b.nibble(i) == 8);
  std::vector<float> out(32);
  dequantize_int4(blocks, out.data());
  const float expected[7] = {7, -7, 2, 4, 0, -2, 1};
  for (int i = 0; i < 7; ++i) BOOST_TEST(out[i] == expected[i]);
}

BOOST_AUTO_TEST_CASE(asymmetric_codes) {
  // min -1, max 14: scale 1, zero point -1, codes = x + 1.
  std::vector<float> x(32);
  for (int i = 0; i < 32; ++i) x[i] = static_cast<float>(i % 16) - 1.0f;
  x[20] = 2.5f;  // (2.5 + 1) = 3.5: tie -> 4
  const auto blocks = quantize_int4<32>(x.data(), 32, Int4Mode::kAsymmetric);
  BOOST_TEST(blocks[0].scale == 1.0f);
  BOOST_TEST(blocks[0].zero_point == -1.0f);
  for (int i = 0; i < 32; ++i) {
    const int expected = i == 20 ? 4 : i % 16;
    BOOST_TEST(blocks[0].nibble(i) == expected, "element " << i);
  }
}

BOOST_AUTO_TEST_CASE(bad_sizes_are_errors) {
  std::vector<float> x(100, 1.0f);
  try {
    quantize_int4<32>(x.data(), 100, Int4Mode::kSymmetric);
    BOOST_FAIL("n = 100 with groups of 32 must throw");
  } catch (const Error& e) {
    const std::string what = e.what();
    BOOST_TEST(what.find("100") != std::string::npos, what);
    BOOST_TEST(what.find("32") != std::string::npos, what);
  }
  BOOST_CHECK_THROW(Int4Matrix<64>::quantize(x.data(), 1, 100, Int4Mode::kSymmetric), Error);
  BOOST_CHECK_THROW(Int4Matrix<32>(2, 64, std::vector<Int4Block<32>>(3)), Error);
  x[7] = std::numeric_limits<float>::quiet_NaN();
  BOOST_CHECK_THROW(quantize_int4<32>(x.data(), 96, Int4Mode::kAsymmetric), Error);
  BOOST_TEST(quantize_int4<32>(x.data(), 0, Int4Mode::kSymmetric).empty());
}

BOOST_AUTO_TEST_CASE(matrix_rows) {
  constexpr int kGroup = 64;
  const std::int64_t rows = 7, cols = 3 * kGroup;
  std::mt19937_64 rng(kSeed);
  std::normal_distribution<float> gauss(0.0f, 0.02f);
  std::vector<float> w(static_cast<std::size_t>(rows * cols));
  for (float& v : w) v = gauss(rng);
  const auto m = Int4Matrix<kGroup>::quantize(w.data(), rows, cols, Int4Mode::kAsymmetric);
  BOOST_TEST(m.rows() == rows);
  BOOST_TEST(m.cols() == cols);
  BOOST_TEST(m.blocks_per_row() == 3);
  BOOST_TEST(static_cast<std::int64_t>(m.blocks().size()) == rows * 3);

  // Each row equals quantising that row alone, so rows are independent and row-major.
  std::vector<float> row(static_cast<std::size_t>(cols) + 2, 99.0f);
  std::vector<float> alone(static_cast<std::size_t>(cols));
  for (std::int64_t r = 0; r < rows; ++r) {
    m.dequantize_row(r, row.data());
    const auto blocks = quantize_int4<kGroup>(w.data() + r * cols, cols, Int4Mode::kAsymmetric);
    dequantize_int4(blocks, alone.data());
    for (std::int64_t c = 0; c < cols; ++c) {
      const float* group = w.data() + r * cols + c / kGroup * kGroup;
      BOOST_TEST(row[c] == alone[c]);
      BOOST_TEST(std::abs(row[c] - w[r * cols + c]) <=
                 error_bound(group, kGroup, Int4Mode::kAsymmetric));
    }
    BOOST_TEST(row[cols] == 99.0f);  // sentinel
  }
  BOOST_CHECK_THROW(m.dequantize_row(rows, row.data()), Error);
  BOOST_CHECK_THROW(m.dequantize_row(-1, row.data()), Error);

  // A matrix rebuilt from its blocks decodes the same.
  const Int4Matrix<kGroup> copy(
      rows, cols, std::vector<Int4Block<kGroup>>(m.blocks().begin(), m.blocks().end()));
  copy.dequantize_row(3, alone.data());
  m.dequantize_row(3, row.data());
  for (std::int64_t c = 0; c < cols; ++c) BOOST_TEST(alone[c] == row[c]);
}
