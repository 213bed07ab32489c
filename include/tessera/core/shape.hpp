// tessera/core/shape.hpp — the extents of a tensor, as a small fixed-capacity array.
//
// Shapes are tiny (rank <= 6) and copied everywhere, so they live inline (no heap).
// Negative axis indices count from the end, as in NumPy and PyTorch, because layer code
// reads more naturally as "the last axis" than as "axis rank-1".
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <initializer_list>
#include <ostream>
#include <span>
#include <string>

#include "tessera/core/error.hpp"

namespace tessera {

class Shape {
 public:
  static constexpr int kMaxRank = 6;

  Shape() = default;  // rank 0: a scalar
  Shape(std::initializer_list<int64_t> dims) : Shape(std::span<const int64_t>(dims.begin(), dims.size())) {}
  explicit Shape(std::span<const int64_t> dims) {
    TESSERA_CHECK(dims.size() <= static_cast<size_t>(kMaxRank), "Shape: rank ", dims.size(),
                  " exceeds the maximum rank ", kMaxRank);
    rank_ = static_cast<int>(dims.size());
    for (int i = 0; i < rank_; ++i) {
      TESSERA_CHECK(dims[i] >= 0, "Shape: extent ", dims[i], " of axis ", i, " is negative");
      dims_[i] = dims[i];
    }
  }

  int rank() const { return rank_; }
  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < rank_; ++i) n *= dims_[i];
    return n;
  }

  // Maps a possibly negative axis to [0, rank); throws when out of range.
  int axis(int i) const {
    const int a = i < 0 ? i + rank_ : i;
    TESSERA_CHECK(a >= 0 && a < rank_, "Shape: axis ", i, " is out of range for shape ", str());
    return a;
  }
  int64_t dim(int i) const { return dims_[axis(i)]; }
  int64_t operator[](int i) const { return dims_[axis(i)]; }
  int64_t& operator[](int i) { return dims_[axis(i)]; }

  const int64_t* begin() const { return dims_.data(); }
  const int64_t* end() const { return dims_.data() + rank_; }
  std::span<const int64_t> span() const { return {dims_.data(), static_cast<size_t>(rank_)}; }

  friend bool operator==(const Shape& a, const Shape& b) {
    return a.rank_ == b.rank_ && std::equal(a.begin(), a.end(), b.begin());
  }

  std::string str() const {
    std::string s = "[";
    for (int i = 0; i < rank_; ++i) s += (i ? ", " : "") + std::to_string(dims_[i]);
    return s + "]";
  }
  friend std::ostream& operator<<(std::ostream& out, const Shape& s) { return out << s.str(); }

 private:
  std::array<int64_t, kMaxRank> dims_{};
  int rank_ = 0;
};

// Element strides use the same container: strides[i] is the distance, in elements, between
// neighbours along axis i.
using Strides = Shape;

// Row-major (C order) strides of a contiguous tensor of `shape`.
inline Strides contiguous_strides(const Shape& shape) {
  std::array<int64_t, Shape::kMaxRank> s{};
  int64_t step = 1;
  for (int i = shape.rank() - 1; i >= 0; --i) {
    s[i] = step;
    step *= shape[i];
  }
  return Strides(std::span<const int64_t>(s.data(), static_cast<size_t>(shape.rank())));
}

// Throws a tessera::Error naming the operation and the tensor when `actual` != `expected`.
inline void check_shape(const char* op, const char* tensor, const Shape& actual,
                        const Shape& expected) {
  TESSERA_CHECK(actual == expected, op, ": tensor '", tensor, "' has shape ", actual,
                ", expected ", expected);
}

inline void check_rank(const char* op, const char* tensor, const Shape& actual, int expected) {
  TESSERA_CHECK(actual.rank() == expected, op, ": tensor '", tensor, "' has rank ", actual.rank(),
                " (shape ", actual, "), expected rank ", expected);
}

inline void check_same_shape(const char* op, const char* name_a, const Shape& a, const char* name_b,
                             const Shape& b) {
  TESSERA_CHECK(a == b, op, ": tensors '", name_a, "' ", a, " and '", name_b, "' ", b,
                " must have the same shape");
}

}  // namespace tessera
