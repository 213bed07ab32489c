// tessera/quant/weight_formats.hpp — weight matrices stored in fewer bits, for inference.
//
// Decoding one token reads every weight of the model once, so on a CPU its speed is the
// memory bandwidth divided by the bytes of the weights. Storing weights in 16, 8 or ~4.5 bits
// instead of 32 makes decoding that many times faster, at the price of a rounding error in
// every weight. This header defines the formats as types and the quantisers that produce them;
// tessera/quant/qgemm.hpp multiplies activations by them without expanding them in memory.
//
// Formats (tag types; QuantizedMatrix<Format> holds a (N, K) = (out, in) weight in it):
//   FP32Weights      the float weights themselves (the baseline the others are measured by)
//   BF16Weights      top 16 bits of each float, rounded to nearest even
//   FP8Weights       E4M3 codes with one float scale per output row (per channel):
//                    scale = amax / 448, code = fp8(w · 448 / amax), ties to even, saturating
//                    (quant/fp8_scaling.hpp's tile quantiser with one tile per row)
//   FP8BlockWeights<B>  E4M3 codes with one float scale per block of B consecutive weights of
//                    a row (1 x B tiles, the same rule per block): one outlier costs only its
//                    block the resolution. DeepSeek-V3 ships its FP8 weights with one scale per
//                    128 x 128 block; that is this format with B = 128 and the block's scale
//                    repeated on its 128 rows (fp8_from_square_blocks), so such a checkpoint loads
//                    without rounding anything again. 8 + 32/B bits per weight
//   Int4RTN<G>       round to nearest, asymmetric: each row is cut into groups of G values
//                    along K, each group an Int4Block<G> (core/int4.hpp) with its own
//                    float scale and zero point (min); 4 + 64/G bits per weight
//   Int4AWQ<G>       activation-aware (Lin et al., 2023, "AWQ"): the same blocks, but of
//                    W·diag(s), where s scales up the input channels that carry large
//                    activations, so their weights get a finer grid relative to their size.
//                    The product divides the activations by s first:
//                        y = (x / s) · Q(W·diag(s))^T  ≈  x · W^T
//                    s needs calibration rows of the product's input (struct Calibration).
//
// The AWQ search (as in the reference implementation, llm-awq's auto_scale.py):
//   a_c    = mean over calibration rows of |x_c|                          (per input channel)
//   s(α)_c = a_c^α, then divided by sqrt(max(s)·min(s)) so the scales straddle 1
//   α*     = argmin over α in {0, 1/20, ..., 19/20} of ||x W^T - x Weff(α)^T||² on the
//            calibration rows, where Weff(α) = Q(W·diag(s)) diag(1/s) is what the product uses
// α = 0 gives s = 1 exactly, i.e. plain RTN, and a larger α is only taken when it is strictly
// better, so AWQ's error on the calibration rows is never above RTN's.
// That is quantize<Int4AWQ>'s search, one product alone. A whole model (quant/model_quant.hpp)
// scores α by the output of the module the products feed instead, one s shared by the products
// that read the same input, and builds each matrix with quantize_awq_with_scales.
//
// Storage, so a caller can write it to a file and read it back (from_parts):
//   data()                 N·K elements (float, bf16, fp8_e4m3) or N·K/G Int4Block<G> blocks,
//                          row-major: row n is [n·K, (n+1)·K) or [n·K/G, (n+1)·K/G)
//   row_scales()           FP8: N dequantisation scales (w ≈ float(code) · scale);
//                          FP8BlockWeights<B>: N·K/B, row n's at [n·K/B, (n+1)·K/B)
//   input_scales_inv()     AWQ: K values 1/s_c (the product multiplies x by them)
// GGUF's Q4_1 blocks are the asymmetric Int4Block<32> with fp16 scale and min: repack_q4_1()
// turns one into our block and from_int4_blocks() wraps the rows, so a GGUF model's weights run
// on the same kernels as shipped (no re-quantisation).
#pragma once

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "tessera/core/error.hpp"
#include "tessera/core/int4.hpp"
#include "tessera/core/number.hpp"
#include "tessera/core/shape.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/quant/fp8_scaling.hpp"

namespace tessera::quant {

// ---- format tags ------------------------------------------------------------------------------
// kBits is the stored code width; kBitsPerWeight adds the per-group metadata (FP8's one scale
// per row depends on K and is left out: 8 + 32/K).
struct FP32Weights {
  static constexpr const char* kName = "fp32";
  static constexpr int kBits = 32;
  static constexpr double kBitsPerWeight = 32;
  using Element = float;
};
struct BF16Weights {
  static constexpr const char* kName = "bf16";
  static constexpr int kBits = 16;
  static constexpr double kBitsPerWeight = 16;
  using Element = bf16;
};
struct FP8Weights {
  static constexpr const char* kName = "fp8_e4m3";
  static constexpr int kBits = 8;
  static constexpr double kBitsPerWeight = 8;
  using Element = fp8_e4m3;
};
template <int Block_>
struct FP8BlockWeights {
  static_assert(Block_ == 32 || Block_ == 64 || Block_ == 128,
                "FP8BlockWeights<Block>: the block must be 32, 64 or 128 weights");
  static constexpr int kBlock = Block_;
  static constexpr const char* kName = "fp8_e4m3_block";
  static constexpr int kBits = 8;
  static constexpr double kBitsPerWeight = 8.0 + 32.0 / Block_;  // + one float scale per block
  using Element = fp8_e4m3;
};
template <int Group_>
struct Int4RTN {
  static_assert(Group_ == 32 || Group_ == 64 || Group_ == 128,
                "Int4RTN<Group>: the group size must be 32, 64 or 128 (Int4Block's sizes)");
  static constexpr int kGroup = Group_;
  static constexpr const char* kName = "int4_rtn";
  static constexpr int kBits = 4;
  static constexpr double kBitsPerWeight = 4.0 + 64.0 / Group_;  // + float scale and min
  static constexpr bool kActivationAware = false;
  using Element = Int4Block<Group_>;
};
template <int Group_>
struct Int4AWQ : Int4RTN<Group_> {
  static constexpr const char* kName = "int4_awq";
  static constexpr bool kActivationAware = true;
};

template <class F>
inline constexpr bool is_int4_v = requires { F::kGroup; };
template <class F>
inline constexpr bool is_fp8_block_v = requires { F::kBlock; };
// FP8 codes with scales (per row or per block): the formats whose row_scales() are set.
template <class F>
inline constexpr bool is_fp8_v = std::is_same_v<typename F::Element, fp8_e4m3>;
// K must be a multiple of this (INT4's group, FP8BlockWeights' block; 1 otherwise).
template <class F>
constexpr int k_multiple() {
  if constexpr (is_int4_v<F>) {
    return F::kGroup;
  } else if constexpr (is_fp8_block_v<F>) {
    return F::kBlock;
  } else {
    return 1;
  }
}
template <class F>
inline constexpr bool is_awq_v = requires {
  requires F::kActivationAware;
};

template <class F>
concept WeightFormat = std::same_as<F, FP32Weights> || std::same_as<F, BF16Weights> ||
                       std::same_as<F, FP8Weights> || std::same_as<F, FP8BlockWeights<32>> ||
                       std::same_as<F, FP8BlockWeights<64>> || std::same_as<F, FP8BlockWeights<128>> ||
                       std::same_as<F, Int4RTN<32>> || std::same_as<F, Int4RTN<64>> ||
                       std::same_as<F, Int4RTN<128>> || std::same_as<F, Int4AWQ<32>> ||
                       std::same_as<F, Int4AWQ<64>> || std::same_as<F, Int4AWQ<128>>;

// Sample rows of a product's input, for AWQ's scale search.
struct Calibration {
  Tensor<float> x;  // (S, K)
};

// The grid of AWQ's exponent search (llm-awq's n_grid).
inline constexpr int kAwqGrid = 20;

// ---- the matrix -------------------------------------------------------------------------------
template <WeightFormat Format>
class QuantizedMatrix;

// W (N, K) row-major into Format. cal: calibration rows (S, K), required by AWQ, ignored else.
template <WeightFormat Format>
QuantizedMatrix<Format> quantize(TensorView<const float, Cpu> w, const Calibration* cal = nullptr);

// AWQ with the input scales s (K values > 0) given instead of searched: the blocks of W·diag(s)
// and 1/s, then, when clip_rows (S, K) are given, the clip search on them (detail::awq_clip).
// alpha is what awq_alpha() reports. quant/model_quant.hpp uses it to give every product that
// reads one input (q, k, v; gate, up) the one scale vector searched on their module's output.
template <WeightFormat Format>
QuantizedMatrix<Format> quantize_awq_with_scales(TensorView<const float, Cpu> w,
                                                 std::span<const float> s, float alpha,
                                                 const Calibration* clip_rows = nullptr);

template <WeightFormat Format>
class QuantizedMatrix {
 public:
  using format = Format;
  using Element = typename Format::Element;

  QuantizedMatrix() = default;

  // From stored arrays (a file written from data() / row_scales() / input_scales_inv()).
  // Checks the sizes and that the values can be decoded.
  static QuantizedMatrix from_parts(std::int64_t rows, std::int64_t cols, std::vector<Element> data,
                                    std::vector<float> row_scales = {},
                                    std::vector<float> input_scales_inv = {}) {
    check_shape("QuantizedMatrix::from_parts", rows, cols);
    QuantizedMatrix m;
    m.rows_ = rows;
    m.cols_ = cols;
    const std::int64_t want = is_int4_v<Format> ? rows * cols / group() : rows * cols;
    TESSERA_CHECK(static_cast<std::int64_t>(data.size()) == want, "QuantizedMatrix<",
                  Format::kName, ">::from_parts: a (", rows, ", ", cols, ") matrix needs ", want,
                  " elements, got ", data.size());
    if constexpr (is_fp8_v<Format>) {
      const std::int64_t scales = rows * (is_fp8_block_v<Format> ? cols / k_multiple<Format>() : 1);
      TESSERA_CHECK(static_cast<std::int64_t>(row_scales.size()) == scales, "QuantizedMatrix<",
                    Format::kName, ">::from_parts: needs ", scales, " scales, got ", row_scales.size());
      for (const fp8_e4m3 c : data)
        TESSERA_CHECK((c.bits & 0x7F) != 0x7F, "QuantizedMatrix<", Format::kName,
                      ">::from_parts: a code is NaN (0x7F/0xFF)");
    } else {
      TESSERA_CHECK(row_scales.empty(), "QuantizedMatrix<", Format::kName,
                    ">::from_parts: this format has no row scales");
    }
    if constexpr (is_awq_v<Format>) {
      TESSERA_CHECK(static_cast<std::int64_t>(input_scales_inv.size()) == cols,
                    "QuantizedMatrix<int4_awq>::from_parts: needs ", cols,
                    " input scales, got ", input_scales_inv.size());
    } else {
      TESSERA_CHECK(input_scales_inv.empty(), "QuantizedMatrix<", Format::kName,
                    ">::from_parts: this format has no input scales");
    }
    for (const float s : row_scales)
      TESSERA_CHECK(std::isfinite(s), "QuantizedMatrix::from_parts: a row scale is ", s);
    for (const float s : input_scales_inv)
      TESSERA_CHECK(std::isfinite(s) && s > 0.0f,
                    "QuantizedMatrix::from_parts: an input scale is ", s);
    if constexpr (is_int4_v<Format>) {
      for (const Element& b : data)
        TESSERA_CHECK(std::isfinite(b.scale) && std::isfinite(b.zero_point),
                      "QuantizedMatrix::from_parts: a block has scale ", b.scale,
                      " and zero point ", b.zero_point);
    }
    m.data_ = std::move(data);
    m.row_scales_ = std::move(row_scales);
    m.input_scales_inv_ = std::move(input_scales_inv);
    return m;
  }

  std::int64_t rows() const { return rows_; }  // N, output features
  std::int64_t cols() const { return cols_; }  // K, input features
  static constexpr int group() {
    if constexpr (is_int4_v<Format>) {
      return Format::kGroup;
    } else {
      return 1;
    }
  }

  // Bytes a product reads: codes, scales, zero points, input scales.
  std::size_t bytes() const {
    return data_.size() * sizeof(Element) + (row_scales_.size() + input_scales_inv_.size()) * sizeof(float);
  }

  std::span<const Element> data() const { return data_; }
  std::span<const float> row_scales() const { return row_scales_; }
  std::span<const float> input_scales_inv() const { return input_scales_inv_; }
  // AWQ: the exponent the search chose (0 = plain RTN). -1 when not searched here.
  float awq_alpha() const { return alpha_; }

  // The weight the product multiplies by, (N, K). For AWQ: Q(W·diag(s))·diag(1/s).
  Tensor<float> dequantize() const {
    auto out = Tensor<float>::empty(Shape{rows_, cols_});
    for (std::int64_t n = 0; n < rows_; ++n) dequantize_row(n, out.data() + n * cols_);
    return out;
  }
  void dequantize_row(std::int64_t n, float* out) const {
    TESSERA_CHECK(n >= 0 && n < rows_, "QuantizedMatrix::dequantize_row: row ", n,
                  " out of range [0, ", rows_, ")");
    if constexpr (is_int4_v<Format>) {
      const std::int64_t per_row = cols_ / group();
      dequantize_int4(std::span<const Element>(data_).subspan(
                          static_cast<std::size_t>(n * per_row), static_cast<std::size_t>(per_row)),
                      out);
      if constexpr (Format::kActivationAware)
        for (std::int64_t k = 0; k < cols_; ++k) out[k] *= input_scales_inv_[static_cast<std::size_t>(k)];
    } else if constexpr (std::is_same_v<Format, FP8Weights>) {
      const float s = row_scales_[static_cast<std::size_t>(n)];
      for (std::int64_t k = 0; k < cols_; ++k)
        out[k] = static_cast<float>(data_[static_cast<std::size_t>(n * cols_ + k)]) * s;
    } else if constexpr (is_fp8_block_v<Format>) {
      constexpr std::int64_t B = Format::kBlock;
      const float* s = row_scales_.data() + n * (cols_ / B);
      for (std::int64_t k = 0; k < cols_; ++k)
        out[k] = static_cast<float>(data_[static_cast<std::size_t>(n * cols_ + k)]) * s[k / B];
    } else {
      for (std::int64_t k = 0; k < cols_; ++k)
        out[k] = to_float(data_[static_cast<std::size_t>(n * cols_ + k)]);
    }
  }

 private:
  template <WeightFormat F>
  friend QuantizedMatrix<F> quantize(TensorView<const float, Cpu> w, const Calibration* cal);
  template <WeightFormat F>
  friend QuantizedMatrix<F> quantize_awq_with_scales(TensorView<const float, Cpu> w,
                                                     std::span<const float> s, float alpha,
                                                     const Calibration* clip_rows);

  static void check_shape(const char* who, std::int64_t rows, std::int64_t cols) {
    TESSERA_CHECK(rows > 0 && cols > 0, who, "<", Format::kName, ">: the matrix is (", rows, ", ",
                  cols, "); an empty weight matrix has nothing to quantise");
    if constexpr (is_int4_v<Format>) {
      TESSERA_CHECK(cols % Format::kGroup == 0, who, "<", Format::kName, "<", Format::kGroup,
                    ">>: K = ", cols, " is not a multiple of the group size ", Format::kGroup,
                    " (pick a group that divides K, or pad K)");
    } else if constexpr (is_fp8_block_v<Format>) {
      TESSERA_CHECK(cols % Format::kBlock == 0, who, "<", Format::kName, "<", Format::kBlock,
                    ">>: K = ", cols, " is not a multiple of the block size ", Format::kBlock,
                    " (pick a block that divides K, or pad K)");
    }
  }

  std::int64_t rows_ = 0;
  std::int64_t cols_ = 0;
  std::vector<Element> data_;
  std::vector<float> row_scales_;
  std::vector<float> input_scales_inv_;
  float alpha_ = -1.0f;
};

namespace detail {

// sum_c x[c] d[c] in double, in eight interleaved partial sums added in a fixed order at the end:
// one long dependent chain of additions was most of AWQ's search time, and a fixed order keeps the
// result independent of the machine.
inline double dot_double(const float* x, const double* d, std::int64_t k) {
  double p[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::int64_t c = 0;
  for (; c + 8 <= k; c += 8)
    for (int j = 0; j < 8; ++j) p[j] += static_cast<double>(x[c + j]) * d[c + j];
  const std::int64_t rest = k - c;  // 0..7
  for (std::int64_t j = 0; j < rest; ++j) p[j & 7] += static_cast<double>(x[c + j]) * d[c + j];
  return ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
}

// AWQ's second step (llm-awq's auto_clip): after the scales, each group of each output row may
// clip its range before rounding. Shrinking the range to r·max|w| (r = 1, 0.95, ..., 0.5) makes
// the grid finer for the many small weights at the price of the few largest; the ratio kept is the
// one whose group contributes the least output error on the calibration rows,
//   sum_s (sum_{k in group} xs[s, k] (q_r(ws)[k] - ws[k]))²,
// xs = x / s the product's input and ws = W·diag(s) the scaled weights. r = 1 (no clipping) is
// tried first and kept on ties, so clipping never raises a group's calibration error.
inline constexpr int kAwqClipSteps = 11;  // r = 1 - i/20 for i = 0 .. 10: down to half the range

template <int G>
void awq_clip(const float* ws, std::int64_t n, std::int64_t k, const float* xs,
              std::int64_t samples, std::vector<Int4Block<G>>& blocks) {
  const std::int64_t groups = k / G;
#pragma omp parallel for schedule(dynamic, 4) if (n * k * samples > (1 << 16))
  for (std::int64_t row = 0; row < n; ++row) {
    float clamped[G], decoded[G];
    double diff[G];
    for (std::int64_t g = 0; g < groups; ++g) {
      const float* wg = ws + row * k + g * G;
      float amax = 0;
      for (int j = 0; j < G; ++j) amax = std::max(amax, std::abs(wg[j]));
      if (amax == 0) continue;
      double best_err = 0;
      Int4Block<G> best{};
      for (int i = 0; i < kAwqClipSteps; ++i) {
        const float lim = amax * (1.0f - static_cast<float>(i) / 20.0f);
        for (int j = 0; j < G; ++j) clamped[j] = std::clamp(wg[j], -lim, lim);
        const Int4Block<G> blk = tessera::detail::quantize_int4_group<G>(clamped, Int4Mode::kAsymmetric);
        for (int j = 0; j < G; ++j) decoded[j] = static_cast<float>(blk.nibble(j)) * blk.scale + blk.zero_point;
        for (int j = 0; j < G; ++j) diff[j] = static_cast<double>(decoded[j]) - static_cast<double>(wg[j]);
        double err = 0;
        for (std::int64_t s = 0; s < samples; ++s) {
          const double dot = dot_double(xs + s * k + g * G, diff, G);
          err += dot * dot;
        }
        if (i == 0 || err < best_err) {
          best_err = err;
          best = blk;
        }
      }
      blocks[static_cast<std::size_t>(row * groups + g)] = best;
    }
  }
}

// The calibration error of an effective weight: sum over rows s and outputs n of
// (x_s · (W_n - Weff_n))², in double. Each output row's part is summed alone and the parts are
// added in row order, so the number does not depend on the thread count.
inline double awq_output_error(const float* w, const float* weff, std::int64_t n_rows,
                               std::int64_t k, const float* x, std::int64_t samples) {
  std::vector<double> per_row(static_cast<std::size_t>(n_rows), 0.0);
#pragma omp parallel for schedule(static) if (n_rows * k * samples > (1 << 16))
  for (std::int64_t n = 0; n < n_rows; ++n) {
    std::vector<double> d(static_cast<std::size_t>(k));
    for (std::int64_t c = 0; c < k; ++c)
      d[static_cast<std::size_t>(c)] =
          static_cast<double>(w[n * k + c]) - static_cast<double>(weff[n * k + c]);
    double e = 0;
    for (std::int64_t s = 0; s < samples; ++s) {
      const double dot = dot_double(x + s * k, d.data(), k);
      e += dot * dot;
    }
    per_row[static_cast<std::size_t>(n)] = e;
  }
  double total = 0;
  for (const double e : per_row) total += e;
  return total;
}

// s = a^α normalised by sqrt(max·min); writes s and 1/s. α = 0 gives exactly 1 and 1.
inline void awq_scales(const std::vector<float>& a, float alpha, std::vector<float>& s,
                       std::vector<float>& s_inv) {
  const std::size_t k = a.size();
  s.resize(k);
  s_inv.resize(k);
  float lo = 0, hi = 0;
  for (std::size_t c = 0; c < k; ++c) {
    s[c] = std::pow(a[c], alpha);
    lo = c == 0 ? s[c] : std::min(lo, s[c]);
    hi = c == 0 ? s[c] : std::max(hi, s[c]);
  }
  const float norm = std::sqrt(hi * lo);
  for (std::size_t c = 0; c < k; ++c) {
    s[c] /= norm;
    s_inv[c] = 1.0f / s[c];
  }
}

// a_c = mean over the rows of |x_c| (x (samples, k)), in double, clamped at 1e-4 as the reference
// does, so that a silent channel still gets a finite scale.
inline std::vector<float> awq_channel_means(const float* x, std::int64_t samples, std::int64_t k,
                                            const char* who) {
  std::vector<double> sum(static_cast<std::size_t>(k), 0.0);
  for (std::int64_t r = 0; r < samples; ++r)
    for (std::int64_t c = 0; c < k; ++c) {
      const float v = x[r * k + c];
      TESSERA_CHECK(std::isfinite(v), who, ": calibration x[", r, ", ", c, "] = ", v,
                    " is not finite");
      sum[static_cast<std::size_t>(c)] += std::abs(static_cast<double>(v));
    }
  std::vector<float> a(static_cast<std::size_t>(k));
  for (std::int64_t c = 0; c < k; ++c)
    a[static_cast<std::size_t>(c)] = std::max(
        static_cast<float>(sum[static_cast<std::size_t>(c)] / static_cast<double>(samples)), 1e-4f);
  return a;
}

// The weight a product with input scales s multiplies by, Q(W·diag(s))·diag(1/s), into out
// (n, k): the value QuantizedMatrix<Int4AWQ>::dequantize() gives for those scales without clipping.
template <int G>
void awq_effective(const float* w, std::int64_t n, std::int64_t k, std::span<const float> s,
                   float* out) {
  std::vector<float> scaled(static_cast<std::size_t>(n * k));
  for (std::int64_t i = 0; i < n * k; ++i)
    scaled[static_cast<std::size_t>(i)] = w[i] * s[static_cast<std::size_t>(i % k)];
  const std::vector<Int4Block<G>> blocks = quantize_int4<G>(scaled.data(), n * k, Int4Mode::kAsymmetric);
  dequantize_int4(blocks, out);
  for (std::int64_t i = 0; i < n * k; ++i) out[i] *= 1.0f / s[static_cast<std::size_t>(i % k)];
}

}  // namespace detail

template <WeightFormat Format>
QuantizedMatrix<Format> quantize(TensorView<const float, Cpu> w, const Calibration* cal) {
  using M = QuantizedMatrix<Format>;
  TESSERA_CHECK(w.rank() == 2, "quantize<", Format::kName, ">: W has shape ", w.shape(),
                "; expected (N, K) = (out, in)");
  const std::int64_t n = w.dim(0), k = w.dim(1);
  M::check_shape("quantize", n, k);
  const Tensor<float> dense = w.contiguous();
  const float* pw = dense.data();
  for (std::int64_t i = 0; i < n * k; ++i)
    TESSERA_CHECK(std::isfinite(pw[i]), "quantize<", Format::kName, ">: W[", i / k, ", ", i % k,
                  "] = ", pw[i], " is not finite; a weight with inf or NaN cannot be quantised");
  M m;
  m.rows_ = n;
  m.cols_ = k;
  if constexpr (std::is_same_v<Format, FP32Weights>) {
    m.data_.assign(pw, pw + n * k);
  } else if constexpr (std::is_same_v<Format, BF16Weights>) {
    m.data_.resize(static_cast<std::size_t>(n * k));
    for (std::int64_t i = 0; i < n * k; ++i) m.data_[static_cast<std::size_t>(i)] = bf16(pw[i]);
  } else if constexpr (std::is_same_v<Format, FP8Weights>) {
    m.data_.resize(static_cast<std::size_t>(n * k));
    m.row_scales_.resize(static_cast<std::size_t>(n));
    tessera::detail::quantize_tiled<fp8_e4m3>("quantize<fp8_e4m3>", pw, n, k, 1, k, m.data_.data(),
                                              m.row_scales_.data());
  } else if constexpr (is_fp8_block_v<Format>) {
    m.data_.resize(static_cast<std::size_t>(n * k));
    m.row_scales_.resize(static_cast<std::size_t>(n * (k / Format::kBlock)));
    tessera::detail::quantize_tiled<fp8_e4m3>("quantize<fp8_e4m3_block>", pw, n, k, 1, Format::kBlock,
                                              m.data_.data(), m.row_scales_.data());
  } else if constexpr (!Format::kActivationAware) {
    m.data_ = quantize_int4<Format::kGroup>(pw, n * k, Int4Mode::kAsymmetric);
  } else {
    TESSERA_CHECK(cal != nullptr, "quantize<int4_awq>: AWQ needs calibration rows of this "
                  "product's input (pass a Calibration with x of shape (S, ", k,
                  ")); without them use Int4RTN");
    const Tensor<float>& x = cal->x;
    TESSERA_CHECK(x.rank() == 2 && x.dim(1) == k && x.dim(0) > 0, "quantize<int4_awq>: "
                  "calibration x has shape ", x.shape(), "; expected (S, ", k, ") with S > 0");
    const std::int64_t samples = x.dim(0);
    const std::vector<float> a = detail::awq_channel_means(x.data(), samples, k, "quantize<int4_awq>");
    std::vector<float> s, s_inv, weff(static_cast<std::size_t>(n * k));
    double best = 0;
    float best_alpha = 0;
    std::vector<float> best_s;
    for (int g = 0; g < kAwqGrid; ++g) {
      const float alpha = static_cast<float>(g) / kAwqGrid;
      detail::awq_scales(a, alpha, s, s_inv);
      detail::awq_effective<Format::kGroup>(pw, n, k, s, weff.data());
      const double err = detail::awq_output_error(pw, weff.data(), n, k, x.data(), samples);
      // Strictly better only: ties keep the smaller α (α = 0 is plain RTN).
      if (g == 0 || err < best) {
        best = err;
        best_alpha = alpha;
        best_s = s;
      }
    }
    // Then the clipping search on the chosen scales (see detail::awq_clip).
    return quantize_awq_with_scales<Format>(w, best_s, best_alpha, cal);
  }
  return m;
}

template <WeightFormat Format>
QuantizedMatrix<Format> quantize_awq_with_scales(TensorView<const float, Cpu> w,
                                                 std::span<const float> s, float alpha,
                                                 const Calibration* clip_rows) {
  using M = QuantizedMatrix<Format>;
  static_assert(is_awq_v<Format>, "quantize_awq_with_scales: the format must be Int4AWQ<G>");
  constexpr int G = Format::kGroup;
  TESSERA_CHECK(w.rank() == 2, "quantize_awq_with_scales: W has shape ", w.shape(),
                "; expected (N, K) = (out, in)");
  const std::int64_t n = w.dim(0), k = w.dim(1);
  M::check_shape("quantize_awq_with_scales", n, k);
  TESSERA_CHECK(static_cast<std::int64_t>(s.size()) == k, "quantize_awq_with_scales: ", s.size(),
                " input scales for K = ", k);
  for (std::size_t c = 0; c < s.size(); ++c)
    TESSERA_CHECK(std::isfinite(s[c]) && s[c] > 0.0f, "quantize_awq_with_scales: s[", c, "] = ",
                  s[c], " must be finite and > 0");
  const Tensor<float> dense = w.contiguous();
  const float* pw = dense.data();
  for (std::int64_t i = 0; i < n * k; ++i)
    TESSERA_CHECK(std::isfinite(pw[i]), "quantize_awq_with_scales: W[", i / k, ", ", i % k, "] = ",
                  pw[i], " is not finite; a weight with inf or NaN cannot be quantised");
  M m;
  m.rows_ = n;
  m.cols_ = k;
  m.alpha_ = alpha;
  m.input_scales_inv_.resize(static_cast<std::size_t>(k));
  for (std::int64_t c = 0; c < k; ++c)
    m.input_scales_inv_[static_cast<std::size_t>(c)] = 1.0f / s[static_cast<std::size_t>(c)];
  std::vector<float> scaled(static_cast<std::size_t>(n * k));
  for (std::int64_t i = 0; i < n * k; ++i)
    scaled[static_cast<std::size_t>(i)] = pw[i] * s[static_cast<std::size_t>(i % k)];
  m.data_ = quantize_int4<G>(scaled.data(), n * k, Int4Mode::kAsymmetric);
  if (clip_rows) {
    const Tensor<float>& x = clip_rows->x;
    TESSERA_CHECK(x.rank() == 2 && x.dim(1) == k && x.dim(0) > 0, "quantize_awq_with_scales: "
                  "clip rows have shape ", x.shape(), "; expected (S, ", k, ") with S > 0");
    const std::int64_t samples = x.dim(0);
    std::vector<float> xs(static_cast<std::size_t>(samples * k));
    for (std::int64_t i = 0; i < samples * k; ++i)
      xs[static_cast<std::size_t>(i)] = x.data()[i] * m.input_scales_inv_[static_cast<std::size_t>(i % k)];
    detail::awq_clip<G>(scaled.data(), n, k, xs.data(), samples, m.data_);
  }
  return m;
}

// GGUF Q4_1 block (fp16 d and m, then 16 bytes: element j in the low nibble of byte j and
// element j + 16 in its high nibble) as an Int4Block<32>: value = nibble · d + m either way, and
// both fp16 numbers are exact in float, so the block decodes to the same floats as GGUF's own
// dequantisation (a product then a sum, io/gguf.hpp).
inline Int4Block<32> repack_q4_1(std::uint16_t d_bits, std::uint16_t m_bits, const std::uint8_t* qs) {
  Int4Block<32> b{};
  b.scale = to_float(fp16::from_bits(d_bits));
  b.zero_point = to_float(fp16::from_bits(m_bits));
  for (int j = 0; j < 16; ++j) {
    b.set_nibble(j, static_cast<std::uint8_t>(qs[j] & 0x0F));
    b.set_nibble(j + 16, static_cast<std::uint8_t>(qs[j] >> 4));
  }
  return b;
}

// Already-quantised rows (rows · cols/32 blocks, row-major), e.g. repacked Q4_1, as shipped.
inline QuantizedMatrix<Int4RTN<32>> from_int4_blocks(std::int64_t rows, std::int64_t cols,
                                                     std::vector<Int4Block<32>> blocks) {
  return QuantizedMatrix<Int4RTN<32>>::from_parts(rows, cols, std::move(blocks));
}

// A DeepSeek-V3 style FP8 weight: E4M3 codes (rows, cols) and one dequantisation scale per
// 128 x 128 block (block_scales: ceil(rows/128) x cols/128, row-major; the checkpoints call them
// weight_scale_inv), as FP8BlockWeights<128>: every row of a block gets the block's scale, so
// each weight decodes to exactly code · scale as in the checkpoint.
inline QuantizedMatrix<FP8BlockWeights<128>> fp8_from_square_blocks(std::int64_t rows, std::int64_t cols,
                                                                    std::vector<fp8_e4m3> codes,
                                                                    std::span<const float> block_scales) {
  TESSERA_CHECK(rows > 0 && cols > 0 && cols % 128 == 0, "fp8_from_square_blocks: a (", rows, ", ",
                cols, ") matrix; K must be a positive multiple of 128");
  const std::int64_t across = cols / 128, down = (rows + 127) / 128;
  TESSERA_CHECK(static_cast<std::int64_t>(block_scales.size()) == down * across,
                "fp8_from_square_blocks: a (", rows, ", ", cols, ") matrix has ", down, " x ", across,
                " blocks of 128 x 128; got ", block_scales.size(), " scales");
  std::vector<float> per_row(static_cast<std::size_t>(rows * across));
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t b = 0; b < across; ++b)
      per_row[static_cast<std::size_t>(r * across + b)] = block_scales[static_cast<std::size_t>((r / 128) * across + b)];
  return QuantizedMatrix<FP8BlockWeights<128>>::from_parts(rows, cols, std::move(codes), std::move(per_row));
}

}  // namespace tessera::quant
