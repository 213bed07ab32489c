// tests/quant/test_weight_formats.cpp — the quantised weight formats of quant/weight_formats.hpp.
//
// Each format is checked against arithmetic written here independently: INT4 RTN codes, scales
// and zero points against a direct scalar re-implementation; FP8 codes and their decoded values
// against core/number.hpp's conversions bit for bit; Q4_1 repacking against io/gguf.hpp's own
// dequantisation. AWQ is checked by what it is for: on activations whose channels have
// outliers (as LLM activations do) its output error on the calibration rows is below RTN's, and
// it is never above RTN's. Bad inputs must throw with a message that names the problem.
#define BOOST_TEST_MODULE quant_weight_formats
#include <algorithm>
#include <boost/test/unit_test.hpp>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "tessera/io/gguf.hpp"
#include "tessera/quant/weight_formats.hpp"

namespace {

using namespace tessera;
using namespace tessera::quant;

constexpr std::uint64_t kSeed = 20261129;

Tensor<float> gaussian(std::int64_t rows, std::int64_t cols, float sigma, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> g(0.0f, sigma);
  auto t = Tensor<float>::empty(Shape{rows, cols});
  for (float& v : t.span()) v = g(rng);
  return t;
}

// Like trained weights: rows of different scale, heavy tails (1% of weights 6x larger), a few
// columns that are larger throughout, and groups that are not centred on zero.
Tensor<float> realish_weights(std::int64_t rows, std::int64_t cols, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> g(0.0f, 1.0f);
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  auto t = Tensor<float>::empty(Shape{rows, cols});
  for (std::int64_t r = 0; r < rows; ++r) {
    const float row_scale = 0.02f * std::exp(0.5f * g(rng));
    const float offset = r % 5 == 0 ? 0.03f : 0.0f;
    for (std::int64_t c = 0; c < cols; ++c) {
      float v = g(rng) * row_scale;
      if (u(rng) < 0.01f) v *= 6.0f;
      if (c % 37 == 5) v *= 4.0f;
      t(r, c) = v + offset;
    }
  }
  return t;
}

// Activations with a few channels 30x larger than the rest, as measured in LLMs (LLM.int8(),
// AWQ): these are the channels whose weights AWQ protects.
Tensor<float> outlier_activations(std::int64_t rows, std::int64_t cols, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> g(0.0f, 1.0f);
  auto t = Tensor<float>::empty(Shape{rows, cols});
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t c = 0; c < cols; ++c) t(r, c) = g(rng) * (c % 41 == 7 ? 30.0f : 1.0f);
  return t;
}

// sum over rows s and outputs n of (x_s · (W_n - Wq_n))², in double, from dequantised weights.
double output_error(const Tensor<float>& x, const Tensor<float>& w, const Tensor<float>& wq) {
  double total = 0;
  for (std::int64_t s = 0; s < x.dim(0); ++s)
    for (std::int64_t n = 0; n < w.dim(0); ++n) {
      double d = 0;
      for (std::int64_t k = 0; k < w.dim(1); ++k)
        d += static_cast<double>(x(s, k)) * (static_cast<double>(w(n, k)) - wq(n, k));
      total += d * d;
    }
  return total;
}

std::uint32_t bits(float v) {
  std::uint32_t b;
  std::memcpy(&b, &v, 4);
  return b;
}

template <int G>
void check_rtn_against_scalar(const Tensor<float>& w, const char* what) {
  const auto q = quantize<Int4RTN<G>>(w);
  const std::int64_t n = w.dim(0), k = w.dim(1);
  BOOST_TEST_REQUIRE(q.rows() == n);
  BOOST_TEST_REQUIRE(q.cols() == k);
  BOOST_TEST(q.bytes() == static_cast<std::size_t>(n * (k / G)) * (8 + G / 2));
  const Tensor<float> deq = q.dequantize();
  std::int64_t mismatches = 0;
  for (std::int64_t r = 0; r < n; ++r)
    for (std::int64_t g = 0; g < k / G; ++g) {
      const Int4Block<G>& b = q.data()[static_cast<std::size_t>(r * (k / G) + g)];
      float lo = w(r, g * G), hi = w(r, g * G);
      for (int i = 0; i < G; ++i) {
        lo = std::min(lo, w(r, g * G + i));
        hi = std::max(hi, w(r, g * G + i));
      }
      const float scale = (hi - lo) / 15.0f;
      mismatches += bits(b.scale) != bits(scale) || bits(b.zero_point) != bits(lo);
      for (int i = 0; i < G; ++i) {
        const float x = w(r, g * G + i);
        const float code = scale > 0 ? std::clamp(std::nearbyint((x - lo) / scale), 0.0f, 15.0f) : 0.0f;
        mismatches += b.nibble(i) != static_cast<int>(code);
        // And the decoded weight lies within half a step (plus rounding of the decode).
        const double err = std::abs(static_cast<double>(deq(r, g * G + i)) - x);
        mismatches += err > 0.5 * scale + 4e-7 * (std::abs(hi) + std::abs(lo));
      }
    }
  BOOST_TEST(mismatches == 0, what << " G=" << G << ": " << mismatches << " mismatches");
}

bool message_has(const Error& e, const char* part) {
  const bool ok = std::string(e.what()).find(part) != std::string::npos;
  if (!ok) std::printf("message was: %s\n", e.what());
  return ok;
}

}  // namespace

BOOST_AUTO_TEST_CASE(int4_rtn_codes_and_zero_points_match_a_scalar_reimplementation) {
  std::printf("seed %llu\n", static_cast<unsigned long long>(kSeed));
  check_rtn_against_scalar<32>(gaussian(9, 256, 0.05f, kSeed), "gaussian");
  check_rtn_against_scalar<32>(realish_weights(23, 192, kSeed + 1), "realish");
  check_rtn_against_scalar<128>(realish_weights(7, 384, kSeed + 2), "realish");
  BOOST_TEST(Int4RTN<32>::kBitsPerWeight == 6.0);
  BOOST_TEST(Int4AWQ<128>::kBitsPerWeight == 4.5);
}

BOOST_AUTO_TEST_CASE(fp8_round_trip_is_number_hpp_bit_for_bit) {
  auto w = realish_weights(11, 70, kSeed + 3);
  for (std::int64_t c = 0; c < 70; ++c) w(3, c) = 0.0f;  // an all-zero row: scale 1, codes 0
  w(4, 9) = 3.0e5f;                                      // one huge value in a row
  const auto q = quantize<FP8Weights>(w);
  BOOST_TEST(q.bytes() == static_cast<std::size_t>(11 * 70 + 11 * 4));
  const Tensor<float> deq = q.dequantize();
  std::int64_t mismatches = 0;
  for (std::int64_t r = 0; r < 11; ++r) {
    float amax = 0;
    for (std::int64_t c = 0; c < 70; ++c) amax = std::max(amax, std::abs(w(r, c)));
    const float scale = amax == 0 ? 1.0f : amax / 448.0f;
    const float mult = amax == 0 ? 1.0f : 448.0f / amax;
    mismatches += bits(q.row_scales()[static_cast<std::size_t>(r)]) != bits(scale);
    for (std::int64_t c = 0; c < 70; ++c) {
      const fp8_e4m3 code = fp8_e4m3::from_float(w(r, c) * mult, Fp8Saturation::kSatFinite);
      mismatches += q.data()[static_cast<std::size_t>(r * 70 + c)].bits != code.bits;
      mismatches += bits(deq(r, c)) != bits(static_cast<float>(code) * scale);
    }
  }
  BOOST_TEST(mismatches == 0);
  BOOST_TEST(deq(4, 9) == 3.0e5f);  // amax maps to 448 exactly, and back
}

// FP8BlockWeights<B>: the per-row rule applied to each block of B weights of a row on its own,
// recomputed here from core/number.hpp's conversion; a row's outlier costs only its block.
template <int B>
void check_fp8_blocks(const Tensor<float>& w) {
  const std::int64_t n = w.dim(0), k = w.dim(1);
  const auto q = quantize<FP8BlockWeights<B>>(w);
  BOOST_TEST(q.row_scales().size() == static_cast<std::size_t>(n * (k / B)));
  BOOST_TEST(q.bytes() == static_cast<std::size_t>(n * k + n * (k / B) * 4));
  const Tensor<float> deq = q.dequantize();
  std::int64_t mismatches = 0;
  for (std::int64_t r = 0; r < n; ++r)
    for (std::int64_t b = 0; b < k / B; ++b) {
      float amax = 0;
      for (std::int64_t c = b * B; c < (b + 1) * B; ++c) amax = std::max(amax, std::abs(w(r, c)));
      const float scale = amax == 0 ? 1.0f : amax / 448.0f;
      const float mult = amax == 0 ? 1.0f : 448.0f / amax;
      mismatches += bits(q.row_scales()[static_cast<std::size_t>(r * (k / B) + b)]) != bits(scale);
      for (std::int64_t c = b * B; c < (b + 1) * B; ++c) {
        const fp8_e4m3 code = fp8_e4m3::from_float(w(r, c) * mult, Fp8Saturation::kSatFinite);
        mismatches += q.data()[static_cast<std::size_t>(r * k + c)].bits != code.bits;
        mismatches += bits(deq(r, c)) != bits(static_cast<float>(code) * scale);
      }
    }
  BOOST_TEST(mismatches == 0, "fp8 blocks of " << B);
}

BOOST_AUTO_TEST_CASE(fp8_blocks_are_the_row_rule_per_block) {
  auto w = realish_weights(9, 256, kSeed + 13);
  for (std::int64_t c = 64; c < 128; ++c) w(2, c) = 0.0f;  // an all-zero block: scale 1, codes 0
  w(5, 3) = 3.0e3f;                                        // an outlier in the first block of a row
  check_fp8_blocks<32>(w);
  check_fp8_blocks<64>(w);
  check_fp8_blocks<128>(w);
  BOOST_TEST(FP8BlockWeights<128>::kBitsPerWeight == 8.25);
  // The outlier coarsens its own block only. With one scale per row (3000 / 448) the row's other
  // weights, ~0.05, land among E4M3's subnormals (steps of 2^-9 after scaling, ~25% relative);
  // with blocks they keep the normal 3-bit mantissa. Measured here: about 1/5 of the error.
  const Tensor<float> per_row = quantize<FP8Weights>(w).dequantize();
  const Tensor<float> blocks = quantize<FP8BlockWeights<64>>(w).dequantize();
  double err_row = 0, err_block = 0;
  for (std::int64_t c = 64; c < 256; ++c) {
    err_row += std::abs(per_row(5, c) - w(5, c));
    err_block += std::abs(blocks(5, c) - w(5, c));
  }
  BOOST_TEST(err_block < 0.5 * err_row);
}

// DeepSeek-V3's 128 x 128 weight blocks: each weight decodes to its code times its block's scale.
BOOST_AUTO_TEST_CASE(fp8_square_blocks_load_as_row_blocks) {
  const std::int64_t n = 200, k = 256;  // two block rows, the second one short (72 rows)
  std::vector<fp8_e4m3> codes(static_cast<std::size_t>(n * k));
  for (std::size_t i = 0; i < codes.size(); ++i) codes[i] = fp8_e4m3::from_bits(static_cast<std::uint8_t>((i * 37 + 11) % 126));
  const std::vector<float> scales{0.5f, 0.25f, 3.0f, 0.125f};  // (2, 2) blocks
  const auto q = fp8_from_square_blocks(n, k, codes, scales);
  const Tensor<float> deq = q.dequantize();
  std::int64_t mismatches = 0;
  for (std::int64_t r = 0; r < n; ++r)
    for (std::int64_t c = 0; c < k; ++c) {
      const float want = static_cast<float>(codes[static_cast<std::size_t>(r * k + c)]) *
                         scales[static_cast<std::size_t>((r / 128) * 2 + c / 128)];
      mismatches += bits(deq(r, c)) != bits(want);
    }
  BOOST_TEST(mismatches == 0);
  BOOST_CHECK_EXCEPTION(fp8_from_square_blocks(n, k, codes, std::vector<float>(3, 1.0f)), Error,
                        [](const Error& e) { return message_has(e, "2 x 2 blocks"); });
  BOOST_CHECK_EXCEPTION(fp8_from_square_blocks(n, 200, codes, scales), Error,
                        [](const Error& e) { return message_has(e, "multiple of 128"); });
}

BOOST_AUTO_TEST_CASE(bf16_and_fp32_keep_what_they_should) {
  const auto w = realish_weights(5, 33, kSeed + 4);
  const Tensor<float> b = quantize<BF16Weights>(w).dequantize();
  const Tensor<float> f = quantize<FP32Weights>(w).dequantize();
  std::int64_t mismatches = 0;
  for (std::int64_t i = 0; i < w.numel(); ++i) {
    mismatches += bits(b.data()[i]) != bits(static_cast<float>(bf16(w.data()[i])));
    mismatches += bits(f.data()[i]) != bits(w.data()[i]);
  }
  BOOST_TEST(mismatches == 0);
  BOOST_TEST(quantize<BF16Weights>(w).bytes() == 5u * 33u * 2u);
}

BOOST_AUTO_TEST_CASE(awq_beats_rtn_on_activations_with_outlier_channels) {
  const std::int64_t n = 48, k = 256;
  const Tensor<float> w = realish_weights(n, k, kSeed + 5);
  const Calibration cal{outlier_activations(64, k, kSeed + 6)};
  const auto rtn = quantize<Int4RTN<128>>(w);
  const auto awq = quantize<Int4AWQ<128>>(w, &cal);
  const double e_rtn = output_error(cal.x, w, rtn.dequantize());
  const double e_awq = output_error(cal.x, w, awq.dequantize());
  std::printf("AWQ<128>: alpha %.2f, calibration error %.4g vs RTN %.4g (%.1f%%)\n",
              awq.awq_alpha(), e_awq, e_rtn, 100.0 * e_awq / e_rtn);
  BOOST_TEST(e_rtn > 0.0);
  BOOST_TEST(awq.awq_alpha() > 0.0f);
  BOOST_TEST(e_awq < 0.8 * e_rtn);  // strictly and clearly better
  // The gain carries over to fresh rows from the same distribution.
  const Tensor<float> fresh = outlier_activations(64, k, kSeed + 7);
  BOOST_TEST(output_error(fresh, w, awq.dequantize()) < output_error(fresh, w, rtn.dequantize()));
  // 1/s is what the reference formula gives for the chosen alpha.
  std::vector<double> s(static_cast<std::size_t>(k));
  double lo = 1e300, hi = 0;
  for (std::int64_t c = 0; c < k; ++c) {
    double a = 0;
    for (std::int64_t r = 0; r < cal.x.dim(0); ++r) a += std::abs(cal.x(r, c));
    a = std::max(a / static_cast<double>(cal.x.dim(0)), 1e-4);
    s[static_cast<std::size_t>(c)] = std::pow(a, static_cast<double>(awq.awq_alpha()));
    lo = std::min(lo, s[static_cast<std::size_t>(c)]);
    hi = std::max(hi, s[static_cast<std::size_t>(c)]);
  }
  double worst = 0;
  for (std::int64_t c = 0; c < k; ++c)
    worst = std::max(worst, std::abs(awq.input_scales_inv()[static_cast<std::size_t>(c)] *
                                         s[static_cast<std::size_t>(c)] / std::sqrt(hi * lo) - 1.0));
  BOOST_TEST(worst < 1e-5);
  BOOST_TEST(awq.bytes() == rtn.bytes() + static_cast<std::size_t>(k) * 4);
}

BOOST_AUTO_TEST_CASE(awq_is_never_worse_than_rtn_on_its_calibration_rows) {
  // Without outliers there may be nothing to gain, but alpha = 0 is RTN exactly.
  const std::int64_t n = 24, k = 128;
  const Tensor<float> w = gaussian(n, k, 0.02f, kSeed + 8);
  const Calibration cal{gaussian(32, k, 1.0f, kSeed + 9)};
  const auto rtn = quantize<Int4RTN<32>>(w);
  const auto awq = quantize<Int4AWQ<32>>(w, &cal);
  const double e_rtn = output_error(cal.x, w, rtn.dequantize());
  const double e_awq = output_error(cal.x, w, awq.dequantize());
  std::printf("AWQ<32> without outliers: alpha %.2f, error %.4g vs RTN %.4g\n", awq.awq_alpha(),
              e_awq, e_rtn);
  BOOST_TEST(e_awq <= e_rtn * (1.0 + 1e-12));
}

BOOST_AUTO_TEST_CASE(q4_1_blocks_decode_as_gguf_decodes_them) {
  std::mt19937_64 rng(kSeed + 10);
  std::uniform_int_distribution<int> byte(0, 255);
  std::normal_distribution<float> g(0.0f, 1.0f);
  const std::int64_t rows = 3, cols = 96, per_row = cols / 32;
  std::vector<std::byte> file(static_cast<std::size_t>(rows * per_row * 20));
  std::vector<Int4Block<32>> blocks;
  for (std::int64_t b = 0; b < rows * per_row; ++b) {
    std::uint8_t raw[20];
    const std::uint16_t d = fp16(0.01f * std::abs(g(rng))).bits, m = fp16(-0.08f * std::abs(g(rng))).bits;
    std::memcpy(raw, &d, 2);
    std::memcpy(raw + 2, &m, 2);
    for (int j = 0; j < 16; ++j) raw[4 + j] = static_cast<std::uint8_t>(byte(rng));
    std::memcpy(file.data() + b * 20, raw, 20);
    blocks.push_back(repack_q4_1(d, m, raw + 4));
  }
  const auto q = from_int4_blocks(rows, cols, std::move(blocks));
  std::vector<float> want(static_cast<std::size_t>(rows * cols));
  io::dequantize_row(io::GgmlType::Q4_1, file, rows * cols, want.data());
  const Tensor<float> got = q.dequantize();
  std::int64_t mismatches = 0;
  for (std::int64_t i = 0; i < rows * cols; ++i)
    mismatches += bits(got.data()[i]) != bits(want[static_cast<std::size_t>(i)]);
  BOOST_TEST(mismatches == 0);
}

// What a caller writes to a file (data(), row_scales(), input_scales_inv()) reads back through
// from_parts() into the same matrix, bit for bit.
template <class F>
void check_parts_round_trip(const Tensor<float>& w, const Calibration* cal) {
  const auto q = quantize<F>(w, cal);
  const auto d = q.data();
  const auto back = QuantizedMatrix<F>::from_parts(
      q.rows(), q.cols(), std::vector<typename F::Element>(d.begin(), d.end()),
      std::vector<float>(q.row_scales().begin(), q.row_scales().end()),
      std::vector<float>(q.input_scales_inv().begin(), q.input_scales_inv().end()));
  const Tensor<float> a = q.dequantize(), b = back.dequantize();
  BOOST_TEST(back.bytes() == q.bytes());
  BOOST_TEST(std::memcmp(a.data(), b.data(), a.size_bytes()) == 0, F::kName);
}

BOOST_AUTO_TEST_CASE(stored_parts_read_back_into_the_same_matrix) {
  const Tensor<float> w = realish_weights(6, 128, kSeed + 11);
  const Calibration cal{outlier_activations(16, 128, kSeed + 12)};
  check_parts_round_trip<FP8Weights>(w, nullptr);
  check_parts_round_trip<FP8BlockWeights<32>>(w, nullptr);
  check_parts_round_trip<BF16Weights>(w, nullptr);
  check_parts_round_trip<Int4RTN<32>>(w, nullptr);
  check_parts_round_trip<Int4AWQ<128>>(w, &cal);
}

BOOST_AUTO_TEST_CASE(bad_inputs_throw_with_a_message) {
  const Tensor<float> w = gaussian(4, 100, 1.0f, kSeed);
  BOOST_CHECK_EXCEPTION(quantize<Int4RTN<32>>(w), Error,
                        [](const Error& e) { return message_has(e, "not a multiple of the group size 32"); });
  const Tensor<float> empty = Tensor<float>::empty(Shape{0, 64});
  BOOST_CHECK_EXCEPTION(quantize<FP8Weights>(empty), Error,
                        [](const Error& e) { return message_has(e, "empty weight matrix"); });
  for (const float bad : {std::numeric_limits<float>::quiet_NaN(), INFINITY}) {
    Tensor<float> nan = gaussian(2, 64, 1.0f, kSeed);
    nan(1, 17) = bad;
    BOOST_CHECK_EXCEPTION(quantize<Int4RTN<64>>(nan), Error,
                          [](const Error& e) { return message_has(e, "W[1, 17]"); });
    BOOST_CHECK_EXCEPTION(quantize<BF16Weights>(nan), Error,
                          [](const Error& e) { return message_has(e, "not finite"); });
  }
  const Tensor<float> w64 = gaussian(2, 64, 1.0f, kSeed);
  BOOST_CHECK_EXCEPTION(quantize<Int4AWQ<32>>(w64), Error,
                        [](const Error& e) { return message_has(e, "needs calibration"); });
  const Calibration wrong{gaussian(3, 32, 1.0f, kSeed)};
  BOOST_CHECK_EXCEPTION(quantize<Int4AWQ<32>>(w64, &wrong), Error,
                        [](const Error& e) { return message_has(e, "expected (S, 64)"); });
  BOOST_CHECK_EXCEPTION(from_int4_blocks(2, 64, std::vector<Int4Block<32>>(3)), Error,
                        [](const Error& e) { return message_has(e, "needs 4 elements, got 3"); });
  std::vector<fp8_e4m3> codes(4, fp8_e4m3::from_bits(0x7F));
  BOOST_CHECK_EXCEPTION(QuantizedMatrix<FP8Weights>::from_parts(1, 4, codes, {1.0f}), Error,
                        [](const Error& e) { return message_has(e, "NaN"); });
  BOOST_CHECK_EXCEPTION(quantize<FP8BlockWeights<64>>(gaussian(2, 96, 1.0f, kSeed)), Error,
                        [](const Error& e) { return message_has(e, "not a multiple of the block size 64"); });
  const std::vector<fp8_e4m3> zeros(128, fp8_e4m3::from_bits(0));
  BOOST_CHECK_EXCEPTION(QuantizedMatrix<FP8BlockWeights<32>>::from_parts(2, 64, zeros, {1.0f, 1.0f}), Error,
                        [](const Error& e) { return message_has(e, "needs 4 scales, got 2"); });
}

// quantize_awq_with_scales (the whole-model search's builder): with the scales quantize<AWQ>
// chose and the same rows it is that matrix bit for bit; without rows it is RTN of W·diag(s),
// computed here with the group quantiser, times 1/s.
BOOST_AUTO_TEST_CASE(awq_with_given_scales_is_the_searched_matrix_for_those_scales) {
  const std::int64_t n = 16, k = 128;
  const Tensor<float> w = realish_weights(n, k, kSeed + 13);
  const Calibration cal{outlier_activations(32, k, kSeed + 14)};
  const auto searched = quantize<Int4AWQ<64>>(w, &cal);
  // s as the search had it (1/(1/s) may differ from s in the last bit).
  std::vector<float> a(static_cast<std::size_t>(k)), s_ref, s_inv;
  for (std::int64_t c = 0; c < k; ++c) {
    double sum = 0;
    for (std::int64_t r = 0; r < cal.x.dim(0); ++r) sum += std::abs(static_cast<double>(cal.x(r, c)));
    a[static_cast<std::size_t>(c)] = std::max(static_cast<float>(sum / static_cast<double>(cal.x.dim(0))), 1e-4f);
  }
  tessera::quant::detail::awq_scales(a, searched.awq_alpha(), s_ref, s_inv);
  const auto again = quantize_awq_with_scales<Int4AWQ<64>>(w, s_ref, searched.awq_alpha(), &cal);
  const Tensor<float> d1 = searched.dequantize(), d2 = again.dequantize();
  BOOST_TEST(std::memcmp(d1.data(), d2.data(), d1.size_bytes()) == 0);
  BOOST_TEST(again.awq_alpha() == searched.awq_alpha());

  const auto plain = quantize_awq_with_scales<Int4AWQ<64>>(w, s_ref, 0.5f, nullptr);
  std::vector<float> scaled(static_cast<std::size_t>(n * k));
  for (std::int64_t i = 0; i < n * k; ++i) scaled[static_cast<std::size_t>(i)] = w.data()[i] * s_ref[static_cast<std::size_t>(i % k)];
  const auto blocks = quantize_int4<64>(scaled.data(), n * k, Int4Mode::kAsymmetric);
  std::vector<float> want(static_cast<std::size_t>(n * k));
  dequantize_int4(blocks, want.data());
  const Tensor<float> got = plain.dequantize();
  std::int64_t mismatches = 0;
  for (std::int64_t i = 0; i < n * k; ++i)
    mismatches += bits(got.data()[i]) != bits(want[static_cast<std::size_t>(i)] * (1.0f / s_ref[static_cast<std::size_t>(i % k)]));
  BOOST_TEST(mismatches == 0);
  BOOST_TEST(plain.awq_alpha() == 0.5f);

  std::vector<float> bad = s_ref;
  bad[7] = 0.0f;
  BOOST_CHECK_EXCEPTION(quantize_awq_with_scales<Int4AWQ<64>>(w, bad, 0.5f), Error,
                        [](const Error& e) { return message_has(e, "s[7]"); });
  BOOST_CHECK_EXCEPTION(quantize_awq_with_scales<Int4AWQ<64>>(w, std::vector<float>(64, 1.0f), 0.5f), Error,
                        [](const Error& e) { return message_has(e, "64 input scales for K = 128"); });
}
