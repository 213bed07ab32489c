// tessera/core/int4.hpp — group-quantised 4-bit integers, for weights at inference time.
//
// A 4-bit weight cannot carry a useful range on its own, so weights are cut into groups of
// 32, 64 or 128 consecutive values along a row, and each group stores one float scale and
// one float offset beside its sixteen-level codes (the scheme of AWQ and of GGUF's Q4_0 and
// Q4_1). The error of a weight is then at most half a step of its own group's grid.
//
// Two ways to choose the grid (Int4Mode):
//   kSymmetric   grid q·scale for q in -8..7, scale = amax/7 (amax = max |x| of the group).
//                A grid symmetric about zero keeps 0 exact and needs no offset; dividing by 7
//                rather than 8 maps both +amax and -amax onto the grid, so the code -8 is
//                never produced (it stays valid to decode, for blocks written elsewhere).
//   kAsymmetric  grid min + q·scale for q in 0..15, scale = (max-min)/15. All sixteen codes
//                span the group's actual range: better for groups that are not centred on
//                zero, but 0 itself is generally not on the grid (as in GGUF Q4_1).
// Codes are rounded to nearest, ties to even.
//
// Every block decodes with one formula, whatever the mode:
//     value = nibble · scale + zero_point
// where the nibble is the stored 4-bit number 0..15. In asymmetric mode zero_point is the
// group's minimum; in symmetric mode the nibble holds q + 8 and zero_point = -8·scale. So a
// block is self-describing and a matrix product decodes every block the same way (one
// multiply-add per weight) without knowing which mode wrote it.
//
// Layout: two values per byte, the earlier one in the low nibble. (GGUF orders a block's
// nibbles differently, so a GGUF reader has to repack.)
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "tessera/core/config.hpp"
#include "tessera/core/error.hpp"

namespace tessera {

enum class Int4Mode { kSymmetric, kAsymmetric };

template <int Group>
struct Int4Block {
  static_assert(Group == 32 || Group == 64 || Group == 128,
                "Int4Block<Group>: the group size must be 32, 64 or 128");
  static constexpr int kGroup = Group;

  float scale;       // grid step
  float zero_point;  // value of nibble 0
  std::uint8_t packed[Group / 2];

  TESSERA_HD constexpr std::uint8_t nibble(int i) const {
    const std::uint8_t byte = packed[i / 2];
    return static_cast<std::uint8_t>(i % 2 == 0 ? byte & 0x0Fu : byte >> 4);
  }
  TESSERA_HD constexpr void set_nibble(int i, std::uint8_t v) {
    std::uint8_t& byte = packed[i / 2];
    byte = static_cast<std::uint8_t>(i % 2 == 0 ? (byte & 0xF0u) | (v & 0x0Fu)
                                                : (byte & 0x0Fu) | ((v & 0x0Fu) << 4));
  }
  TESSERA_HD constexpr float value(int i) const {
    return static_cast<float>(nibble(i)) * scale + zero_point;
  }
};

// Two floats, then the codes: no padding, so blocks can be read from and written to files.
static_assert(sizeof(Int4Block<32>) == 8 + 16);
static_assert(sizeof(Int4Block<64>) == 8 + 32);
static_assert(sizeof(Int4Block<128>) == 8 + 64);

namespace detail {

// One group of `Group` floats into one block.
template <int Group>
Int4Block<Group> quantize_int4_group(const float* x, Int4Mode mode) {
  Int4Block<Group> block{};
  float lo = x[0], hi = x[0];
  for (int i = 0; i < Group; ++i) {
    TESSERA_CHECK(std::isfinite(x[i]), "quantize_int4: value ", x[i], " at offset ", i,
                  " of a group is not finite; a group with inf or NaN has no usable grid");
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
  }
  // Codes are rounded with nearbyint, which honours the default rounding mode: to nearest,
  // ties to even. The clamps only absorb rounding error in x/scale (its last ulp; a little
  // more when the scale itself is a denormal), never a value off the grid's range.
  if (mode == Int4Mode::kSymmetric) {
    const float amax = std::max(-lo, hi);
    block.scale = amax / 7.0f;
    block.zero_point = -8.0f * block.scale;
    for (int i = 0; i < Group; ++i) {
      // A zero (or denormal-tiny) group has scale 0: every code is q = 0, decoding to 0.
      const float q = block.scale > 0.0f ? std::nearbyint(x[i] / block.scale) : 0.0f;
      block.set_nibble(i, static_cast<std::uint8_t>(std::clamp(q, -7.0f, 7.0f) + 8.0f));
    }
  } else {
    block.scale = (hi - lo) / 15.0f;
    block.zero_point = lo;
    TESSERA_CHECK(std::isfinite(block.scale), "quantize_int4: a group spans [", lo, ", ", hi,
                  "], a range wider than float can hold");
    for (int i = 0; i < Group; ++i) {
      // A constant group has scale 0: every code is 0, decoding to the constant exactly.
      const float q = block.scale > 0.0f ? std::nearbyint((x[i] - lo) / block.scale) : 0.0f;
      block.set_nibble(i, static_cast<std::uint8_t>(std::clamp(q, 0.0f, 15.0f)));
    }
  }
  return block;
}

}  // namespace detail

// x[0..n) into n/Group blocks. n must be a multiple of Group; inputs must be finite.
template <int Group>
std::vector<Int4Block<Group>> quantize_int4(const float* x, std::int64_t n, Int4Mode mode) {
  TESSERA_CHECK(n >= 0 && n % Group == 0, "quantize_int4: n = ", n,
                " is not a multiple of the group size ", Group);
  TESSERA_CHECK(n == 0 || x != nullptr, "quantize_int4: x is null but n = ", n);
  std::vector<Int4Block<Group>> blocks(static_cast<std::size_t>(n / Group));
  for (std::size_t b = 0; b < blocks.size(); ++b) {
    blocks[b] = detail::quantize_int4_group<Group>(x + static_cast<std::int64_t>(b) * Group, mode);
  }
  return blocks;
}

// blocks.size() * Group floats into out.
template <int Group>
void dequantize_int4(std::span<const Int4Block<Group>> blocks, float* out) {
  for (const Int4Block<Group>& block : blocks) {
    for (int i = 0; i < Group; ++i) *out++ = block.value(i);
  }
}
template <int Group>
void dequantize_int4(const std::vector<Int4Block<Group>>& blocks, float* out) {
  dequantize_int4(std::span<const Int4Block<Group>>(blocks), out);
}

// A row-major (rows, cols) weight matrix in int4: row r is blocks
// [r·blocks_per_row(), (r+1)·blocks_per_row()), each covering Group consecutive columns.
template <int Group>
class Int4Matrix {
 public:
  using Block = Int4Block<Group>;

  Int4Matrix() = default;
  // From blocks that already exist (a file, another quantiser). Checks the count.
  Int4Matrix(std::int64_t rows, std::int64_t cols, std::vector<Block> blocks)
      : rows_(rows), cols_(cols), blocks_(std::move(blocks)) {
    check_shape(rows, cols, "Int4Matrix");
    TESSERA_CHECK(static_cast<std::int64_t>(blocks_.size()) == rows * (cols / Group),
                  "Int4Matrix: a (", rows, ", ", cols, ") matrix in groups of ", Group, " needs ",
                  rows * (cols / Group), " blocks, got ", blocks_.size());
  }

  // w is row-major (rows, cols); cols must be a multiple of Group.
  static Int4Matrix quantize(const float* w, std::int64_t rows, std::int64_t cols, Int4Mode mode) {
    check_shape(rows, cols, "Int4Matrix::quantize");
    return Int4Matrix(rows, cols, quantize_int4<Group>(w, rows * cols, mode));
  }

  std::int64_t rows() const { return rows_; }
  std::int64_t cols() const { return cols_; }
  std::int64_t blocks_per_row() const { return cols_ / Group; }
  std::span<const Block> blocks() const { return blocks_; }
  std::span<const Block> row_blocks(std::int64_t r) const {
    check_row(r);
    return std::span<const Block>(blocks_).subspan(static_cast<std::size_t>(r * blocks_per_row()),
                                                   static_cast<std::size_t>(blocks_per_row()));
  }

  // Row r as cols() floats.
  void dequantize_row(std::int64_t r, float* out) const { dequantize_int4(row_blocks(r), out); }

 private:
  static void check_shape(std::int64_t rows, std::int64_t cols, const char* who) {
    TESSERA_CHECK(rows >= 0 && cols >= 0, who, ": shape (", rows, ", ", cols, ") is negative");
    TESSERA_CHECK(cols % Group == 0, who, ": cols = ", cols,
                  " is not a multiple of the group size ", Group);
  }
  void check_row(std::int64_t r) const {
    TESSERA_CHECK(r >= 0 && r < rows_, "Int4Matrix: row ", r, " out of range [0, ", rows_, ")");
  }

  std::int64_t rows_ = 0;
  std::int64_t cols_ = 0;
  std::vector<Block> blocks_;
};

}  // namespace tessera
