// tessera/ops/softmax.hpp — softmax and log-softmax over the last axis, forward and backward.
//
// Softmax turns attention scores and logits into probabilities; log-softmax is its
// numerically safe logarithm (the cross-entropy loss in cross_entropy.hpp fuses it away).
//
// How they are built:
//   * Stable: every row is shifted by its maximum before exp(), so exp() never overflows and
//     logits of 1e4 work as well as logits of 1. A row containing NaN gives a NaN row; a row
//     whose entries are all -inf gives NaN (0/0), as in PyTorch. Single -inf entries (masks)
//     give exactly 0 probability.
//   * Three passes per row, each a contiguous loop the compiler vectorises: max, exp-and-sum
//     (the exps are kept), scale. A row of a large vocabulary stays in the core's cache
//     between passes, so the input is read from memory once and the output written once.
//   * Rows are independent: OpenMP splits them statically over threads, each row is reduced
//     in one fixed order, so the result does not depend on the thread count. The loops are
//     compiled for baseline x86-64, AVX2 and AVX-512 and picked per call (detail/rows.hpp).
//   * float, bf16 and fp16 compute in float (bf16/fp16 widened on load, rounded once on
//     store); double computes in double with libm's exp (it is the reference precision of
//     the finite-difference tests).
//   * Backward passes take the forward *output* y (not x): both gradients are functions of
//     y alone, so the input need not be kept.
//       softmax:      dx = y * (dy - sum(dy * y))
//       log_softmax:  dx = dy - exp(y) * sum(dy)
//
// Shapes: any rank >= 1; the last axis is the feature axis, all leading axes are rows.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <type_traits>

#include "tessera/core/error.hpp"
#include "tessera/core/number.hpp"
#include "tessera/core/shape.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/ops/detail/rows.hpp"

namespace tessera::ops {

namespace softmax_detail {

using rows_detail::exp_acc;
using rows_detail::load;
using rows_detail::store;

template <class T, class A = row_acc_t<T>>
TESSERA_FORCE_INLINE A row_max(const T* x, int64_t n) {
  A m = -std::numeric_limits<A>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) {
    const A v = load(x[i]);
    m = v > m ? v : m;
  }
  return m;
}

// y = softmax(x) for one row. The exps go to `buf`, which may be y itself when T is the
// accumulation type (each element is read before it is overwritten).
template <class T, class A = row_acc_t<T>>
TESSERA_FORCE_INLINE void softmax_row(const T* x, T* y, A* buf, int64_t n) {
  const A m = row_max<T>(x, n);
  A s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    const A e = exp_acc<A>(load(x[i]) - m);
    buf[i] = e;
    s += e;
  }
  const A inv = A(1) / s;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = store<T>(buf[i] * inv);
}

template <class T, class A = row_acc_t<T>>
TESSERA_FORCE_INLINE void softmax_backward_row(const T* dy, const T* y, T* dx, int64_t n) {
  A s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += load(dy[i]) * load(y[i]);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dx[i] = store<T>(load(y[i]) * (load(dy[i]) - s));
}

template <class T, class A = row_acc_t<T>>
TESSERA_FORCE_INLINE void log_softmax_row(const T* x, T* y, int64_t n) {
  const A m = row_max<T>(x, n);
  A s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += exp_acc<A>(load(x[i]) - m);
  // (x - m) - log(s), not x - (m + log(s)): x - m is exact near the maximum, so a row with
  // a large offset keeps its log-probabilities' small differences.
  const A log_s = std::log(s);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = store<T>((load(x[i]) - m) - log_s);
}

template <class T, class A = row_acc_t<T>>
TESSERA_FORCE_INLINE void log_softmax_backward_row(const T* dy, const T* y, T* dx, int64_t n) {
  A s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += load(dy[i]);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dx[i] = store<T>(load(dy[i]) - exp_acc<A>(load(y[i])) * s);
}

// The shared frame of the two backward passes: checks, contiguous inputs, row loop.
template <class T, class RowFn>
Tensor<T> backward(const char* op, TensorView<const T, Cpu> dy, TensorView<const T, Cpu> y,
                   RowFn row_fn) {
  const auto g = rows_detail::row_geometry(op, "y", y.shape());
  check_same_shape(op, "dy", dy.shape(), "y", y.shape());
  auto dx = Tensor<T>::empty(y.shape());
  if (dx.numel() == 0) return dx;
  const rows_detail::Dense<T> dyd(dy), yd(y);
  const T* dyp = dyd.data;
  const T* yp = yd.data;
  T* dxp = dx.data();
  const int64_t cols = g.cols;
  rows_detail::parallel_rows(rows_detail::row_isa(), g.rows, g.rows * cols,
                             [=](int64_t begin, int64_t end) {
                               for (int64_t r = begin; r < end; ++r)
                                 row_fn(dyp + r * cols, yp + r * cols, dxp + r * cols, cols);
                             });
  return dx;
}

}  // namespace softmax_detail

// softmax over the last axis. x: (..., n) -> (..., n).
template <RowOpType T>
Tensor<T> softmax(TensorView<const T, Cpu> x) {
  using A = row_acc_t<T>;
  const auto g = rows_detail::row_geometry("softmax", "x", x.shape());
  auto y = Tensor<T>::empty(x.shape());
  if (y.numel() == 0) return y;
  const rows_detail::Dense<T> xd(x);
  const T* xp = xd.data;
  T* yp = y.data();
  const int64_t cols = g.cols;
  rows_detail::parallel_rows(
      rows_detail::row_isa(), g.rows, g.rows * cols, [=](int64_t begin, int64_t end) {
        if constexpr (std::is_same_v<T, A>) {
          for (int64_t r = begin; r < end; ++r)
            softmax_detail::softmax_row<T>(xp + r * cols, yp + r * cols, yp + r * cols, cols);
        } else {
          // bf16/fp16: the exps wait in a float row so they are rounded only once.
          const std::unique_ptr<A[]> buf(new A[static_cast<size_t>(cols)]);
          for (int64_t r = begin; r < end; ++r)
            softmax_detail::softmax_row<T>(xp + r * cols, yp + r * cols, buf.get(), cols);
        }
      });
  return y;
}

// Gradient of softmax: dy and y (the forward output) are (..., n); returns dx (..., n).
template <RowOpType T>
Tensor<T> softmax_backward(TensorView<const T, Cpu> dy, TensorView<const T, Cpu> y) {
  return softmax_detail::backward<T>(
      "softmax_backward", dy, y, [](const T* dyr, const T* yr, T* dxr, int64_t n) {
        softmax_detail::softmax_backward_row<T>(dyr, yr, dxr, n);
      });
}

// log(softmax(x)) over the last axis, computed as x - max - log(sum(exp(x - max))).
template <RowOpType T>
Tensor<T> log_softmax(TensorView<const T, Cpu> x) {
  const auto g = rows_detail::row_geometry("log_softmax", "x", x.shape());
  auto y = Tensor<T>::empty(x.shape());
  if (y.numel() == 0) return y;
  const rows_detail::Dense<T> xd(x);
  const T* xp = xd.data;
  T* yp = y.data();
  const int64_t cols = g.cols;
  rows_detail::parallel_rows(rows_detail::row_isa(), g.rows, g.rows * cols,
                             [=](int64_t begin, int64_t end) {
                               for (int64_t r = begin; r < end; ++r)
                                 softmax_detail::log_softmax_row<T>(xp + r * cols, yp + r * cols,
                                                                    cols);
                             });
  return y;
}

// Gradient of log_softmax: dy and y (the forward output) are (..., n); returns dx (..., n).
template <RowOpType T>
Tensor<T> log_softmax_backward(TensorView<const T, Cpu> dy, TensorView<const T, Cpu> y) {
  return softmax_detail::backward<T>(
      "log_softmax_backward", dy, y, [](const T* dyr, const T* yr, T* dxr, int64_t n) {
        softmax_detail::log_softmax_backward_row<T>(dyr, yr, dxr, n);
      });
}

}  // namespace tessera::ops
