// kernels/softmax.cuh — softmax and log-softmax over the last axis on the GPU, forward and
// backward; the CUDA twin of tessera/ops/softmax.hpp (same functions, shapes and semantics).
//
// How it is built, and why:
//   * One block per row; the block's threads stride over the row. Rows are independent, so a
//     (tokens, vocab) or (heads * queries, keys) tensor gives one block per row and the GPU
//     fills up with rows. Threads per block grow with the row length (32 to 1024; see
//     row_threads in common.cuh), so short rows do not leave most of a block idle.
//   * Forward is "online" (Milakov & Gimelshein 2018): each thread keeps a running maximum m
//     and a running sum s of exp(x - m), rescaling s whenever m grows, so the row is read once
//     for the statistics (and once more to write y) instead of twice. The per-thread (m, s)
//     pairs merge in a fixed butterfly-then-tree order:
//         (m, s) + (m', s') = (max(m, m'), s e^(m - M) + s' e^(m' - M)),  M = max(m, m').
//   * Semantics as on the CPU: a NaN anywhere in a row gives a NaN row; a row that is all -inf
//     gives NaN (0/0); a single -inf entry (a mask) gives exactly 0. A side whose maximum is
//     -inf has an empty sum and is skipped, so masked stretches never produce exp(-inf + inf).
//   * float, bf16 and fp16 compute in float, double in double; each output rounds once. exp is
//     CUDA's expf (within 2 ulp), the CPU uses its own polynomial (within 2 ulp) and sums in
//     another order, so results agree to a few float ulps, not bit for bit.
//   * Backward passes take the forward output y, as on the CPU:
//       softmax:      dx = y * (dy - sum(dy * y))
//       log_softmax:  dx = dy - exp(y) * sum(dy)
//     one block-wide sum per row, then one element-wise pass.
//
// Shapes: any rank >= 1; the last axis is the feature axis, all leading axes are rows.
#pragma once

#include <cstdint>
#include <type_traits>

#include "kernels/common.cuh"
#include "tessera/ops/softmax.hpp"

namespace tessera::cuda {

namespace softmax_detail {

// Running statistics of part of a row: its maximum and the sum of exp(x - max).
template <class A>
struct MaxSum {
  A m;
  A s;
};

template <class A>
__device__ __forceinline__ MaxSum<A> shuffle_xor(MaxSum<A> v, int offset) {
  return {__shfl_xor_sync(kFullMask, v.m, offset), __shfl_xor_sync(kFullMask, v.s, offset)};
}

// Commutative (so every lane of a butterfly ends with the same bits); see the file header.
struct MergeMaxSum {
  template <class A>
  __device__ __forceinline__ MaxSum<A> operator()(MaxSum<A> a, MaxSum<A> b) const {
    const A m = MaxOp{}(a.m, b.m);
    const A ninf = neg_infinity<A>();
    const A sa = a.m == ninf ? A(0) : a.s * exp_acc(a.m - m);
    const A sb = b.m == ninf ? A(0) : b.s * exp_acc(b.m - m);
    return {m, sa + sb};
  }
};

// One more element x into the running (m, s): one exp per element.
template <class A>
__device__ __forceinline__ void push(MaxSum<A>& st, A x) {
  if (x > st.m) {
    // exp(-inf - x) = 0 when the row so far is empty. The new element's own term is
    // exp(x - x): 1, written 1 + (x - x) so that x = +inf gives NaN, as the CPU's
    // exp(inf - inf) does.
    st.s = st.s * exp_acc(st.m - x) + (A(1) + (x - x));
    st.m = x;
  } else if (x == x) {
    if (x != neg_infinity<A>()) st.s += exp_acc(x - st.m);
  } else {  // NaN: the whole row is NaN
    st.m = x;
    st.s = x;
  }
}

template <class A>
__device__ __forceinline__ MaxSum<A> row_stats(const auto* x, int64_t cols) {
  MaxSum<A> st{neg_infinity<A>(), A(0)};
  for (int64_t i = threadIdx.x; i < cols; i += blockDim.x) push(st, load_acc<A>(x[i]));
  const MaxSum<A> identity{neg_infinity<A>(), A(0)};
  return block_reduce(st, MergeMaxSum{}, identity);
}

template <class T, bool kLog>
__global__ void softmax_forward_kernel(const T* __restrict__ x, int64_t cols, T* __restrict__ y) {
  using A = acc_t<T>;
  const int64_t row = blockIdx.x;
  const T* xr = x + row * cols;
  T* yr = y + row * cols;
  const MaxSum<A> st = row_stats<A>(xr, cols);
  if constexpr (kLog) {
    const A lse = st.m + log_acc(st.s);
    for (int64_t i = threadIdx.x; i < cols; i += blockDim.x)
      yr[i] = store_acc<T, A>(load_acc<A>(xr[i]) - lse);
  } else {
    const A inv = A(1) / st.s;
    for (int64_t i = threadIdx.x; i < cols; i += blockDim.x)
      yr[i] = store_acc<T, A>(exp_acc(load_acc<A>(xr[i]) - st.m) * inv);
  }
}

template <class T, bool kLog>
__global__ void softmax_backward_kernel(const T* __restrict__ dy, const T* __restrict__ y,
                                        int64_t cols, T* __restrict__ dx) {
  using A = acc_t<T>;
  const int64_t row = blockIdx.x;
  const T* dyr = dy + row * cols;
  const T* yr = y + row * cols;
  T* dxr = dx + row * cols;
  A part = A(0);
  for (int64_t i = threadIdx.x; i < cols; i += blockDim.x) {
    part += kLog ? load_acc<A>(dyr[i]) : load_acc<A>(dyr[i]) * load_acc<A>(yr[i]);
  }
  const A s = block_sum(part);
  for (int64_t i = threadIdx.x; i < cols; i += blockDim.x) {
    const A g = load_acc<A>(dyr[i]), v = load_acc<A>(yr[i]);
    dxr[i] = store_acc<T, A>(kLog ? g - exp_acc(v) * s : v * (g - s));
  }
}

template <class T, bool kLog>
Tensor<T, Cuda> forward(const char* op, TensorView<const T, Cuda> x, cudaStream_t stream) {
  const auto g = ops::rows_detail::row_geometry(op, "x", x.shape());
  auto y = Tensor<T, Cuda>::empty(x.shape());
  if (y.numel() == 0) return y;
  const Dense<T> xd(x, stream);
  softmax_forward_kernel<T, kLog>
      <<<row_grid(g.rows), row_threads(g.cols), 0, stream>>>(xd.data, g.cols, y.data());
  TESSERA_CUDA_CHECK_LAUNCH("softmax_forward_kernel");
  return y;
}

template <class T, bool kLog>
Tensor<T, Cuda> backward(const char* op, TensorView<const T, Cuda> dy, TensorView<const T, Cuda> y,
                         cudaStream_t stream) {
  const auto g = ops::rows_detail::row_geometry(op, "y", y.shape());
  check_same_shape(op, "dy", dy.shape(), "y", y.shape());
  auto dx = Tensor<T, Cuda>::empty(y.shape());
  if (dx.numel() == 0) return dx;
  const Dense<T> dyd(dy, stream), yd(y, stream);
  softmax_backward_kernel<T, kLog>
      <<<row_grid(g.rows), row_threads(g.cols), 0, stream>>>(dyd.data, yd.data, g.cols, dx.data());
  TESSERA_CUDA_CHECK_LAUNCH("softmax_backward_kernel");
  return dx;
}

}  // namespace softmax_detail

// softmax over the last axis. x: (..., n) -> (..., n).
template <ops::RowOpType T>
Tensor<T, Cuda> softmax(TensorView<const T, Cuda> x, cudaStream_t stream = nullptr) {
  return softmax_detail::forward<T, false>("softmax", x, stream);
}

// Gradient of softmax: dy and y (the forward output) are (..., n); returns dx (..., n).
template <ops::RowOpType T>
Tensor<T, Cuda> softmax_backward(TensorView<const T, Cuda> dy, TensorView<const T, Cuda> y,
                                 cudaStream_t stream = nullptr) {
  return softmax_detail::backward<T, false>("softmax_backward", dy, y, stream);
}

// log(softmax(x)) over the last axis, as x - max - log(sum(exp(x - max))).
template <ops::RowOpType T>
Tensor<T, Cuda> log_softmax(TensorView<const T, Cuda> x, cudaStream_t stream = nullptr) {
  return softmax_detail::forward<T, true>("log_softmax", x, stream);
}

// Gradient of log_softmax: dy and y (the forward output) are (..., n); returns dx (..., n).
template <ops::RowOpType T>
Tensor<T, Cuda> log_softmax_backward(TensorView<const T, Cuda> dy, TensorView<const T, Cuda> y,
                                     cudaStream_t stream = nullptr) {
  return softmax_detail::backward<T, true>("log_softmax_backward", dy, y, stream);
}

}  // namespace tessera::cuda
