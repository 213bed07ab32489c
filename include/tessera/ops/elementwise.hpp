// tessera/ops/elementwise.hpp — add, mul, scale, add_scaled and the row-broadcast bias add,
// forward and backward.
//
// How they are built:
//   * Same-shape only (no general broadcasting): in a transformer every element-wise sum is a
//     residual or a gated product of tensors with identical shapes, and implicit broadcasting
//     turns a shape bug into a silently wrong result. The one broadcast that is needed — a
//     bias vector over the last axis — is its own op, add_bias.
//   * Low-precision inputs are widened to float, computed in float and rounded once; double
//     stays double. Scalars (alpha) are given in double and used in that arithmetic type.
//   * Element loops are OpenMP-parallel; the bias gradient (a sum over rows) is parallel over
//     column blocks with each column summed sequentially in row order, so the result does not
//     depend on the thread count.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>

#include "tessera/core/error.hpp"
#include "tessera/core/number.hpp"
#include "tessera/core/shape.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/ops/cast.hpp"

namespace tessera::ops {

template <class T>
struct BinaryGrads {
  Tensor<T> da;  // same shape as a
  Tensor<T> db;  // same shape as b
};

template <class T>
struct AddBiasGrads {
  Tensor<T> dx;     // same shape as x
  Tensor<T> dbias;  // (features)
};

namespace elementwise_detail {

using cast_detail::acc_t;
using cast_detail::load;
using cast_detail::store;

inline constexpr int64_t kParallelElements = int64_t{1} << 15;

// A contiguous pointer to the input's elements: borrowed when the view already is
// contiguous, copied otherwise.
template <class T>
struct Dense {
  Tensor<T> owned;
  const T* data = nullptr;
  explicit Dense(TensorView<const T, Cpu> v) {
    if (v.is_contiguous()) {
      data = v.data();
    } else {
      owned = v.contiguous();
      data = owned.data();
    }
  }
};

// out[i] = f(x[i]) in the arithmetic type.
template <class T, class F>
Tensor<T> map1(TensorView<const T, Cpu> x, F f) {
  using A = acc_t<T>;
  const Dense<T> dx(x);
  auto out = Tensor<T>::empty(x.shape());
  const int64_t n = x.numel();
  const T* px = dx.data;
  T* po = out.data();
#pragma omp parallel for schedule(static) if (n >= kParallelElements)
  for (int64_t i = 0; i < n; ++i) po[i] = store<T>(f(load<A>(px[i])));
  return out;
}

// out[i] = f(a[i], b[i]) in the arithmetic type; a and b must have the same shape.
template <class T, class F>
Tensor<T> map2(const char* op, TensorView<const T, Cpu> a, TensorView<const T, Cpu> b, F f,
               const char* name_a = "a", const char* name_b = "b") {
  using A = acc_t<T>;
  check_same_shape(op, name_a, a.shape(), name_b, b.shape());
  const Dense<T> da(a), db(b);
  auto out = Tensor<T>::empty(a.shape());
  const int64_t n = a.numel();
  const T* pa = da.data;
  const T* pb = db.data;
  T* po = out.data();
#pragma omp parallel for schedule(static) if (n >= kParallelElements)
  for (int64_t i = 0; i < n; ++i) po[i] = store<T>(f(load<A>(pa[i]), load<A>(pb[i])));
  return out;
}

// Column sums of a contiguous (rows, cols) matrix, in the arithmetic type, rounded once.
// Parallel over blocks of columns; each column is summed in row order.
template <class T>
Tensor<T> sum_over_rows(const T* d, int64_t rows, int64_t cols) {
  using A = acc_t<T>;
  constexpr int64_t kBlock = 64;
  auto out = Tensor<T>::empty({cols});  // (cols)
  T* po = out.data();
  const int64_t blocks = (cols + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) if (rows * cols >= kParallelElements && blocks > 1)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t c0 = blk * kBlock;
    const int64_t w = std::min(kBlock, cols - c0);
    std::array<A, kBlock> s{};
    for (int64_t r = 0; r < rows; ++r) {
      const T* row = d + r * cols + c0;
      for (int64_t j = 0; j < w; ++j) s[j] += load<A>(row[j]);
    }
    for (int64_t j = 0; j < w; ++j) po[c0 + j] = store<T>(s[j]);
  }
  return out;
}

}  // namespace elementwise_detail

// a + b, same shape.
template <class T>
Tensor<T> add(TensorView<const T, Cpu> a, TensorView<const T, Cpu> b) {
  return elementwise_detail::map2<T>("add", a, b, [](auto x, auto y) { return x + y; });
}

// Gradients of add: both are dout (copied, so each can be accumulated into independently).
template <class T>
BinaryGrads<T> add_backward(TensorView<const T, Cpu> dout) {
  return {dout.contiguous(), dout.contiguous()};
}

// a * b element-wise, same shape.
template <class T>
Tensor<T> mul(TensorView<const T, Cpu> a, TensorView<const T, Cpu> b) {
  return elementwise_detail::map2<T>("mul", a, b, [](auto x, auto y) { return x * y; });
}

// Gradients of mul: da = dout * b, db = dout * a.
template <class T>
BinaryGrads<T> mul_backward(TensorView<const T, Cpu> dout, TensorView<const T, Cpu> a,
                            TensorView<const T, Cpu> b) {
  check_same_shape("mul_backward", "a", a.shape(), "b", b.shape());
  auto times = [](auto x, auto y) { return x * y; };
  return {elementwise_detail::map2<T>("mul_backward", dout, b, times, "dout", "b"),
          elementwise_detail::map2<T>("mul_backward", dout, a, times, "dout", "a")};
}

// x * alpha.
template <class T>
Tensor<T> scale(TensorView<const T, Cpu> x, double alpha) {
  using A = cast_detail::acc_t<T>;
  const A s = static_cast<A>(alpha);
  return elementwise_detail::map1<T>(x, [s](A v) { return v * s; });
}

// Gradient of scale: dx = dout * alpha.
template <class T>
Tensor<T> scale_backward(TensorView<const T, Cpu> dout, double alpha) {
  return scale<T>(dout, alpha);
}

// a + alpha * b, same shape (the residual-with-scale and the optimiser's axpy).
template <class T>
Tensor<T> add_scaled(TensorView<const T, Cpu> a, TensorView<const T, Cpu> b, double alpha) {
  using A = cast_detail::acc_t<T>;
  const A s = static_cast<A>(alpha);
  return elementwise_detail::map2<T>("add_scaled", a, b, [s](A x, A y) { return x + s * y; });
}

// Gradients of add_scaled: da = dout, db = alpha * dout.
template <class T>
BinaryGrads<T> add_scaled_backward(TensorView<const T, Cpu> dout, double alpha) {
  return {dout.contiguous(), scale<T>(dout, alpha)};
}

// x + bias broadcast over every row: x (..., n), bias (n).
template <class T>
Tensor<T> add_bias(TensorView<const T, Cpu> x, TensorView<const T, Cpu> bias) {
  using A = cast_detail::acc_t<T>;
  TESSERA_CHECK(x.rank() >= 1, "add_bias: tensor 'x' has rank 0; expected rank >= 1 (..., n)");
  const int64_t n = x.dim(-1);
  TESSERA_CHECK(bias.rank() == 1 && bias.dim(0) == n, "add_bias: tensor 'bias' has shape ",
                bias.shape(), ", expected [", n, "] (the last axis of 'x' ", x.shape(), ")");
  const elementwise_detail::Dense<T> dx(x), db(bias);
  auto out = Tensor<T>::empty(x.shape());  // (..., n)
  const int64_t rows = n == 0 ? 0 : x.numel() / n;
  const T* px = dx.data;
  const T* pb = db.data;
  T* po = out.data();
#pragma omp parallel for schedule(static) if (x.numel() >= elementwise_detail::kParallelElements)
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < n; ++j)
      po[r * n + j] = cast_detail::store<T>(cast_detail::load<A>(px[r * n + j]) + cast_detail::load<A>(pb[j]));
  return out;
}

// The bias gradient alone: dout (..., n) summed over every leading axis -> (n).
template <class T>
Tensor<T> bias_grad(TensorView<const T, Cpu> dout) {
  TESSERA_CHECK(dout.rank() >= 1, "bias_grad: tensor 'dout' has rank 0; expected rank >= 1 (..., n)");
  const int64_t n = dout.dim(-1);
  const elementwise_detail::Dense<T> d(dout);
  return elementwise_detail::sum_over_rows(d.data, n == 0 ? 0 : dout.numel() / n, n);
}

// Gradients of add_bias: dx = dout, dbias = dout summed over every leading axis.
template <class T>
AddBiasGrads<T> add_bias_backward(TensorView<const T, Cpu> dout) {
  return {dout.contiguous(), bias_grad<T>(dout)};
}

}  // namespace tessera::ops
