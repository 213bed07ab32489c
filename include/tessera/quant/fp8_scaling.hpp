// tessera/quant/fp8_scaling.hpp — moving float values into FP8's narrow range and back.
//
// FP8 has few significant bits and, worse, a narrow range: E4M3 ends at 448 and its normal
// numbers start at 2^-6. Values must therefore be scaled so that the largest magnitude
// (amax) lands near the top of the format before they are rounded. Two granularities:
//
//  * Per tensor (Transformer Engine's recipe): one scale for the whole tensor, usually taken
//    from the amax of previous steps ("delayed scaling"). Cheap, but one outlier squeezes
//    every other value towards the subnormals.
//  * Fine-grained (DeepSeek-V3, section 3.3): activations get one scale per 1x128 tile along
//    each row, weights one per 128x128 block. An outlier then only affects its own tile, and
//    a GEMM can apply the scales to its fp32 partial sums per 128-wide slice of K.
//
// The two keep their sources' scale conventions, so that each matches the kernels and papers
// a reader will compare it with:
//  * per tensor: `scale` is the QUANTISATION multiplier (TE's `scale`):
//        q = fp8(x · scale),      x ≈ float(q) · (1 / scale),      scale = fp8_max / amax
//  * tiles and blocks: the stored scales are the DEQUANTISATION multipliers (DeepSeek-V3's,
//    and what a GEMM multiplies its partial sums by):
//        s = amax / fp8_max,      q = fp8(x · (fp8_max / amax)),   x ≈ float(q) · s
//
// Rounding is always to nearest even with saturation to the largest finite value
// (Fp8Saturation::kSatFinite), as the FP8 casts of CUDA kernels do.
//
// Degenerate ranges: an all-zero tensor or tile gets scale 1 (its codes are all zero).
// An amax below fp8_min_scaled_amax<Fp8>() = fp8_max · 2^-125 is raised to it, so that
// fp8_max / amax cannot overflow float: the multipliers are then exactly 2^125 and 2^-125,
// the extremes at which both are still normal floats. (DeepGEMM's casts clamp amax at 1e-4 to the
// same end, far more coarsely.) Such tiles hold values around 1e-35 and below; they still
// round-trip, only with fewer significant FP8 bits. A non-finite amax is the caller's bug (an
// overflowed step) and throws.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>

#include "tessera/core/error.hpp"
#include "tessera/core/number.hpp"

namespace tessera {

inline constexpr std::int64_t kFp8TileSize = 128;

// The smallest amax used to derive a scale (see the file comment).
template <Fp8Type Fp8>
constexpr float fp8_min_scaled_amax() {
  return number_traits<Fp8>::max_finite * 0x1p-125f;
}

namespace detail {
// How many tiles of size `tile` cover n elements (the last one possibly ragged).
constexpr std::int64_t tile_count(std::int64_t n, std::int64_t tile) {
  return (n + tile - 1) / tile;
}
}  // namespace detail

// Number of scales each fine-grained layout needs for a (rows, cols) matrix.
constexpr std::int64_t tile_scale_count_1x128(std::int64_t rows, std::int64_t cols) {
  return rows * detail::tile_count(cols, kFp8TileSize);
}
constexpr std::int64_t block_scale_count_128x128(std::int64_t rows, std::int64_t cols) {
  return detail::tile_count(rows, kFp8TileSize) * detail::tile_count(cols, kFp8TileSize);
}

// ---- per tensor ---------------------------------------------------------------------------

// max |x[i]|. A NaN anywhere makes the result NaN (and an inf, inf), so an overflowed step
// cannot hide behind a plausible-looking scale.
inline float amax(const float* x, std::int64_t n) {
  TESSERA_CHECK(n >= 0 && (n == 0 || x != nullptr),
                "amax: bad array (x = ", static_cast<const void*>(x), ", n = ", n, ")");
  float m = 0.0f;
  for (std::int64_t i = 0; i < n; ++i) {
    const float a = std::abs(x[i]);
    if (a > m || std::isnan(a)) m = a;
    if (std::isnan(m)) break;
  }
  return m;
}
inline float amax(std::span<const float> x) {
  return amax(x.data(), static_cast<std::int64_t>(x.size()));
}

// The quantisation multiplier that maps `amax` onto the format's largest value, backed off by
// 2^margin (TE's `margin`, headroom for values that grow before the next amax update).
template <Fp8Type Fp8>
float scale_from_amax(float amax, int margin = 0) {
  TESSERA_CHECK(std::isfinite(amax) && amax >= 0.0f, "scale_from_amax<", number_traits<Fp8>::name,
                ">: amax = ", amax,
                " must be finite and >= 0 (a non-finite amax means the tensor overflowed)");
  TESSERA_CHECK(margin >= 0, "scale_from_amax: margin = ", margin, " must be >= 0");
  if (amax == 0.0f) return 1.0f;
  const float scaled = std::max(amax, fp8_min_scaled_amax<Fp8>());
  return std::ldexp(number_traits<Fp8>::max_finite / scaled, -margin);
}

// out[i] = fp8(x[i] · scale), saturating.
template <Fp8Type Fp8>
void quantize_per_tensor(const float* x, std::int64_t n, float scale, Fp8* out) {
  TESSERA_CHECK(n >= 0 && (n == 0 || (x != nullptr && out != nullptr)),
                "quantize_per_tensor: bad arrays (n = ", n, ")");
  TESSERA_CHECK(std::isfinite(scale) && scale > 0.0f, "quantize_per_tensor: scale = ", scale,
                " must be finite and > 0");
  for (std::int64_t i = 0; i < n; ++i) {
    out[i] = Fp8::from_float(x[i] * scale, Fp8Saturation::kSatFinite);
  }
}

// out[i] = float(q[i]) · (1 / scale), with the reciprocal taken once (TE's scale_inv), so a
// kernel doing the same gets the same bits.
template <Fp8Type Fp8>
void dequantize_per_tensor(const Fp8* q, std::int64_t n, float scale, float* out) {
  TESSERA_CHECK(n >= 0 && (n == 0 || (q != nullptr && out != nullptr)),
                "dequantize_per_tensor: bad arrays (n = ", n, ")");
  TESSERA_CHECK(std::isfinite(scale) && scale > 0.0f, "dequantize_per_tensor: scale = ", scale,
                " must be finite and > 0");
  const float scale_inv = 1.0f / scale;
  for (std::int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(q[i]) * scale_inv;
}

// ---- fine-grained tiles -------------------------------------------------------------------
namespace detail {

// A row-major (rows, cols) matrix cut into (tile_rows, tile_cols) tiles; the last tile row
// and column may be ragged. scales is (ceil(rows/tile_rows), ceil(cols/tile_cols)), row-major.
template <Fp8Type Fp8>
void quantize_tiled(const char* who, const float* x, std::int64_t rows, std::int64_t cols,
                    std::int64_t tile_rows, std::int64_t tile_cols, Fp8* out, float* scales) {
  TESSERA_CHECK(rows >= 0 && cols >= 0, who, ": shape (", rows, ", ", cols, ") is negative");
  TESSERA_CHECK(rows * cols == 0 || (x != nullptr && out != nullptr && scales != nullptr), who,
                ": null array for a (", rows, ", ", cols, ") matrix");
  constexpr float kMax = number_traits<Fp8>::max_finite;
  const std::int64_t tiles_across = tile_count(cols, tile_cols);
  for (std::int64_t r0 = 0; r0 < rows; r0 += tile_rows) {
    const std::int64_t r1 = std::min(rows, r0 + tile_rows);
    for (std::int64_t c0 = 0; c0 < cols; c0 += tile_cols) {
      const std::int64_t c1 = std::min(cols, c0 + tile_cols);
      float tile_amax = 0.0f;
      for (std::int64_t r = r0; r < r1; ++r) {
        tile_amax = std::max(tile_amax, amax(x + r * cols + c0, c1 - c0));
        if (std::isnan(tile_amax)) break;
      }
      TESSERA_CHECK(std::isfinite(tile_amax), who, ": the tile at row ", r0, ", column ", c0,
                    " has amax ", tile_amax, "; FP8 scaling needs finite values");
      // All-zero tile: scale 1. Otherwise the DeepSeek-V3 pair, with a floor so that the
      // quantisation multiplier stays finite.
      const float a = tile_amax == 0.0f ? kMax : std::max(tile_amax, fp8_min_scaled_amax<Fp8>());
      const float multiplier = kMax / a;
      scales[(r0 / tile_rows) * tiles_across + c0 / tile_cols] = a / kMax;
      for (std::int64_t r = r0; r < r1; ++r) {
        for (std::int64_t c = c0; c < c1; ++c) {
          out[r * cols + c] =
              Fp8::from_float(x[r * cols + c] * multiplier, Fp8Saturation::kSatFinite);
        }
      }
    }
  }
}

template <Fp8Type Fp8>
void dequantize_tiled(const char* who, const Fp8* q, const float* scales, std::int64_t rows,
                      std::int64_t cols, std::int64_t tile_rows, std::int64_t tile_cols,
                      float* out) {
  TESSERA_CHECK(rows >= 0 && cols >= 0, who, ": shape (", rows, ", ", cols, ") is negative");
  TESSERA_CHECK(rows * cols == 0 || (q != nullptr && out != nullptr && scales != nullptr), who,
                ": null array for a (", rows, ", ", cols, ") matrix");
  const std::int64_t tiles_across = tile_count(cols, tile_cols);
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* row_scales = scales + (r / tile_rows) * tiles_across;
    for (std::int64_t c = 0; c < cols; ++c) {
      out[r * cols + c] = static_cast<float>(q[r * cols + c]) * row_scales[c / tile_cols];
    }
  }
}

}  // namespace detail

// Activations: x (rows, cols) -> out (rows, cols) and scales (rows, ceil(cols/128)), one per
// 1x128 tile of a row; the last tile of a row may be shorter.
template <Fp8Type Fp8>
void quantize_tiles_1x128(const float* x, std::int64_t rows, std::int64_t cols, Fp8* out,
                          float* scales) {
  detail::quantize_tiled("quantize_tiles_1x128", x, rows, cols, 1, kFp8TileSize, out, scales);
}
template <Fp8Type Fp8>
void dequantize_tiles_1x128(const Fp8* q, const float* scales, std::int64_t rows, std::int64_t cols,
                            float* out) {
  detail::dequantize_tiled("dequantize_tiles_1x128", q, scales, rows, cols, 1, kFp8TileSize, out);
}

// Weights: w (rows, cols) -> out (rows, cols) and scales (ceil(rows/128), ceil(cols/128)),
// one per 128x128 block; blocks on the bottom and right edges may be smaller.
template <Fp8Type Fp8>
void quantize_blocks_128x128(const float* w, std::int64_t rows, std::int64_t cols, Fp8* out,
                             float* scales) {
  detail::quantize_tiled("quantize_blocks_128x128", w, rows, cols, kFp8TileSize, kFp8TileSize, out,
                         scales);
}
template <Fp8Type Fp8>
void dequantize_blocks_128x128(const Fp8* q, const float* scales, std::int64_t rows,
                               std::int64_t cols, float* out) {
  detail::dequantize_tiled("dequantize_blocks_128x128", q, scales, rows, cols, kFp8TileSize,
                           kFp8TileSize, out);
}

}  // namespace tessera
