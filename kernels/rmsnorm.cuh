// kernels/rmsnorm.cuh — RMSNorm over the last axis on the GPU, forward and backward; the CUDA
// twin of ops::rms_norm / ops::rms_norm_backward (tessera/ops/norm.hpp), same shapes, same
// saved statistics (rstd per row), same formulas:
//   y  = x * rstd * w,                               rstd = 1 / sqrt(mean(x^2) + eps)
//   dx = rstd * (dy * w - x * c),                    c = sum(dy * w * x) * rstd^2 / n
//   dw = sum over rows of dy * x * rstd
//
// How it is built, and why:
//   * Forward: one block per row (threads per block grow with the row length, common.cuh's
//     row_threads), one block-wide sum of squares, then one element-wise pass. rstd is
//     1 / sqrt(.) with IEEE division and square root, as on the CPU (not rsqrtf, which is
//     approximate).
//   * Backward: dx is a per-row computation like the forward pass, but dw is a sum over rows.
//     It is reduced deterministically, without floating-point atomics: a fixed number of
//     blocks (kBackwardBlocks, or fewer when there are fewer rows; never the GPU's SM count,
//     so every GPU gives the same bits) each take a contiguous range of rows in order and
//     accumulate dy * x * rstd into their own row of a (blocks, n) partial buffer (each column
//     owned by one thread, so no races). A second pass (common.cuh's column_sum) adds the
//     partials in block order and rounds once to T.
//   * float, bf16 and fp16 compute in float, double in double; outputs round once.
//
// Shapes: x (..., n); weight (n); rstd (rows) with rows = numel / n.
#pragma once

#include <cstdint>
#include <type_traits>

#include "kernels/common.cuh"
#include "tessera/ops/norm.hpp"

namespace tessera::cuda {

using ops::row_acc_t;

template <class T>
struct RmsNormOutput {
  Tensor<T, Cuda> y;                // (..., n), x's shape
  Tensor<row_acc_t<T>, Cuda> rstd;  // (rows) 1 / sqrt(mean(x^2) + eps)
};

template <class T>
struct RmsNormGrads {
  Tensor<T, Cuda> dx;       // (..., n)
  Tensor<T, Cuda> dweight;  // (n)
};

namespace rmsnorm_detail {

// Blocks of the backward pass: enough to fill a large GPU several times over, and a fixed
// number, so the dw partials (and thus dw's bits) do not depend on the device.
inline constexpr int64_t kBackwardBlocks = 512;

template <class T>
__global__ void rms_forward_kernel(const T* __restrict__ x, const T* __restrict__ w, int64_t n,
                                   acc_t<T> eps, T* __restrict__ y,
                                   acc_t<T>* __restrict__ rstd_out) {
  using A = acc_t<T>;
  const int64_t row = blockIdx.x;
  const T* xr = x + row * n;
  T* yr = y + row * n;
  A ss = A(0);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const A v = load_acc<A>(xr[i]);
    ss += v * v;
  }
  ss = block_sum(ss);
  const A rstd = A(1) / sqrt_acc(ss / static_cast<A>(n) + eps);
  if (threadIdx.x == 0) rstd_out[row] = rstd;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
    yr[i] = store_acc<T, A>(load_acc<A>(xr[i]) * rstd * load_acc<A>(w[i]));
}

// Block b handles rows [rows * b / blocks, rows * (b + 1) / blocks) in order; its dw partial
// is row b of `partial` (blocks, n).
template <class T>
__global__ void rms_backward_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                    const T* __restrict__ w, const acc_t<T>* __restrict__ rstd,
                                    int64_t rows, int64_t n, T* __restrict__ dx,
                                    acc_t<T>* __restrict__ partial) {
  using A = acc_t<T>;
  const int64_t blocks = gridDim.x;
  const int64_t b = blockIdx.x;
  const int64_t begin = rows * b / blocks, end = rows * (b + 1) / blocks;
  A* dw = partial + b * n;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) dw[i] = A(0);
  for (int64_t r = begin; r < end; ++r) {
    const T* dyr = dy + r * n;
    const T* xr = x + r * n;
    T* dxr = dx + r * n;
    const A rs = rstd[r];
    A dot = A(0);  // sum(g * x), g = dy * w
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
      dot += load_acc<A>(dyr[i]) * load_acc<A>(w[i]) * load_acc<A>(xr[i]);
    dot = block_sum(dot);
    const A c = dot * rs * rs / static_cast<A>(n);
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const A d = load_acc<A>(dyr[i]);
      const A v = load_acc<A>(xr[i]);
      dxr[i] = store_acc<T, A>(rs * (d * load_acc<A>(w[i]) - v * c));
      dw[i] += d * v * rs;  // column i belongs to this thread in every row
    }
  }
}

}  // namespace rmsnorm_detail

// RMSNorm over the last axis: x (..., n), weight (n) -> y (..., n) and rstd (rows).
template <ops::RowOpType T>
RmsNormOutput<T> rms_norm(TensorView<const T, Cuda> x, TensorView<const T, Cuda> weight,
                          double eps = 1e-6, cudaStream_t stream = nullptr) {
  using A = row_acc_t<T>;
  constexpr const char* kOp = "rms_norm";
  const auto g = ops::norm_detail::check_x(kOp, x.shape());
  check_shape(kOp, "weight", weight.shape(), Shape{g.cols});
  ops::norm_detail::check_eps(kOp, eps);
  RmsNormOutput<T> out{Tensor<T, Cuda>::empty(x.shape()), Tensor<A, Cuda>::empty(Shape{g.rows})};
  if (g.rows == 0) return out;
  const Dense<T> xd(x, stream), wd(weight, stream);
  rmsnorm_detail::rms_forward_kernel<T><<<row_grid(g.rows), row_threads(g.cols), 0, stream>>>(
      xd.data, wd.data, g.cols, static_cast<A>(eps), out.y.data(), out.rstd.data());
  TESSERA_CUDA_CHECK_LAUNCH("rms_forward_kernel");
  return out;
}

// Gradients of rms_norm: dy and x (..., n), weight (n), rstd (rows) from the forward pass.
template <ops::RowOpType T>
RmsNormGrads<T> rms_norm_backward(TensorView<const T, Cuda> dy, TensorView<const T, Cuda> x,
                                  TensorView<const T, Cuda> weight,
                                  TensorView<const row_acc_t<T>, Cuda> rstd,
                                  cudaStream_t stream = nullptr) {
  using A = row_acc_t<T>;
  constexpr const char* kOp = "rms_norm_backward";
  const auto g = ops::norm_detail::check_x(kOp, x.shape());
  check_same_shape(kOp, "dy", dy.shape(), "x", x.shape());
  check_shape(kOp, "weight", weight.shape(), Shape{g.cols});
  check_shape(kOp, "rstd", rstd.shape(), Shape{g.rows});
  const int64_t n = g.cols, rows = g.rows;
  RmsNormGrads<T> out{Tensor<T, Cuda>::empty(x.shape()), Tensor<T, Cuda>::empty(Shape{n})};
  if (rows == 0) {
    out.dweight = zeros_on<T>(Shape{n}, stream);
    return out;
  }
  const int64_t blocks =
      rows < rmsnorm_detail::kBackwardBlocks ? rows : rmsnorm_detail::kBackwardBlocks;
  auto partial = Tensor<A, Cuda>::empty(Shape{blocks, n});  // (blocks, n) dw partials
  const Dense<T> dyd(dy, stream), xd(x, stream), wd(weight, stream);
  const Dense<A> rd(rstd, stream);
  rmsnorm_detail::rms_backward_kernel<T>
      <<<static_cast<unsigned>(blocks), row_threads(n), 0, stream>>>(
          dyd.data, xd.data, wd.data, rd.data, rows, n, out.dx.data(), partial.data());
  TESSERA_CUDA_CHECK_LAUNCH("rms_backward_kernel");
  column_sum<A, T, A>(partial.data(), blocks, n, out.dweight.data(), stream);
  return out;
}

}  // namespace tessera::cuda
