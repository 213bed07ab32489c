// kernels/cross_entropy.cuh — fused log-softmax + cross-entropy from logits on the GPU, with
// ignore_index, label smoothing and mean/sum/none reduction; the CUDA twin of
// ops::cross_entropy / ops::cross_entropy_backward (tessera/ops/cross_entropy.hpp), with the
// same options struct, semantics (PyTorch's) and saved state (the per-row log-sum-exp):
//   nll_i  = lse_i - x[i, t_i],  smooth_i = lse_i - mean_c x[i, c]
//   loss_i = (1 - eps) nll_i + eps smooth_i;  ignored rows: loss 0, gradient 0
//   dlogits[i, c] = g_i (p[i, c] - eps / C - (1 - eps) [c == t_i])
//
// How it is built, and why:
//   * Forward: one block per row. The row's log-sum-exp is computed online (running max and
//     rescaled sum, merged across the block in a fixed order; softmax.cuh's MaxSum), so the
//     logits are read once; nothing of size (rows, vocab) is written. Each block writes its
//     row's lse and loss (in float, double for double logits).
//   * The reduction (kMean, kSum) is a second, single-block kernel that sums the row losses in
//     double in a fixed order and divides by the number of non-ignored rows (NaN when there
//     are none, as PyTorch): deterministic, and within double rounding of the CPU's row-order
//     double sum.
//   * Backward: one block per row writes p - onehot, scaled, exactly as the CPU expresses it
//     (exp(x - lse) rather than a stored softmax). For kMean the scale dloss / valid_rows is
//     formed on the device from a device-side count, so nothing waits for the host.
//   * Targets are checked on the device: a target that is neither ignore_index nor a class
//     is reported (the lowest such row) and the call throws naming the row and the value, as
//     the CPU does. This costs one small read-back and a stream synchronisation per call;
//     the forward pass also reads back valid_rows (the CPU output carries it as a host int).
//
// Shapes: logits (..., C), targets (...) int32 (the logits' shape without its last axis).
#pragma once

#include <cstdint>
#include <limits>
#include <type_traits>

#include "kernels/common.cuh"
#include "kernels/softmax.cuh"
#include "tessera/ops/cross_entropy.hpp"

namespace tessera::cuda {

using ops::CrossEntropyOptions;
using ops::Reduction;

template <class T>
struct CrossEntropyOutput {
  Tensor<T, Cuda> loss;                       // [] for kMean and kSum; the targets' shape for kNone
  Tensor<ops::row_acc_t<T>, Cuda> logsumexp;  // (rows); 0 on ignored rows
  int64_t valid_rows = 0;                     // rows whose target is not ignore_index
};

namespace cross_entropy_detail {

using softmax_detail::MaxSum;
using softmax_detail::MergeMaxSum;

__device__ __forceinline__ bool bad_target(int32_t t, int64_t vocab, int32_t ignore) {
  return t != ignore && (t < 0 || t >= vocab);
}

template <class T>
__global__ void forward_kernel(const T* __restrict__ logits, const int32_t* __restrict__ targets,
                               int64_t vocab, int32_t ignore, acc_t<T> eps, bool smoothing,
                               acc_t<T>* __restrict__ lse_out, acc_t<T>* __restrict__ loss_out,
                               unsigned long long* valid_count, unsigned long long* bad_row) {
  using A = acc_t<T>;
  const int64_t row = blockIdx.x;
  const int32_t t = targets[row];
  if (t == ignore || bad_target(t, vocab, ignore)) {
    if (threadIdx.x == 0) {
      lse_out[row] = A(0);
      loss_out[row] = A(0);
      if (t != ignore) report_bad_index(bad_row, row);
    }
    return;
  }
  const T* x = logits + row * vocab;
  MaxSum<A> st{neg_infinity<A>(), A(0)};
  A sum_x = A(0);
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
    const A v = load_acc<A>(x[i]);
    softmax_detail::push(st, v);
    sum_x += v;
  }
  st = block_reduce(st, MergeMaxSum{}, MaxSum<A>{neg_infinity<A>(), A(0)});
  if (smoothing) sum_x = block_sum(sum_x);
  if (threadIdx.x == 0) {
    const A lse = st.m + log_acc(st.s);
    const A nll = lse - load_acc<A>(x[t]);
    lse_out[row] = lse;
    loss_out[row] =
        smoothing ? (A(1) - eps) * nll + eps * (lse - sum_x / static_cast<A>(vocab)) : nll;
    atomicAdd(valid_count, 1ull);  // an integer count: the order of additions cannot matter
  }
}

// loss[0] = sum of row losses (in double, fixed order), divided by the valid count for kMean.
template <class T>
__global__ void reduce_loss_kernel(const acc_t<T>* __restrict__ row_loss, int64_t rows, bool mean,
                                   const unsigned long long* valid_count, T* __restrict__ loss) {
  double part = 0.0;
  for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) part += static_cast<double>(row_loss[r]);
  const double total = block_sum(part);
  if (threadIdx.x == 0) {
    double v = total;
    if (mean) {
      const unsigned long long valid = *valid_count;
      v = valid > 0 ? total / static_cast<double>(valid)
                    : __longlong_as_double(0x7FF8000000000000ll);
    }
    loss[0] = store_acc<T, acc_t<T>>(static_cast<acc_t<T>>(v));
  }
}

template <class T>
__global__ void store_rows_kernel(const acc_t<T>* __restrict__ row_loss, int64_t rows,
                                  T* __restrict__ loss) {
  for (int64_t r = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; r < rows;
       r += int64_t{gridDim.x} * blockDim.x)
    loss[r] = store_acc<T, acc_t<T>>(row_loss[r]);
}

// Counts the non-ignored rows and records the first bad target (for the backward pass).
__global__ void count_targets_kernel(const int32_t* __restrict__ targets, int64_t rows,
                                     int64_t vocab, int32_t ignore, unsigned long long* valid_count,
                                     unsigned long long* bad_row) {
  unsigned long long local = 0;
  for (int64_t r = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; r < rows;
       r += int64_t{gridDim.x} * blockDim.x) {
    const int32_t t = targets[r];
    if (t == ignore) continue;
    if (bad_target(t, vocab, ignore)) {
      report_bad_index(bad_row, r);
      continue;
    }
    ++local;
  }
  if (local) atomicAdd(valid_count, local);
}

template <class T>
__global__ void backward_kernel(const T* __restrict__ dloss, const T* __restrict__ logits,
                                const int32_t* __restrict__ targets,
                                const acc_t<T>* __restrict__ lse_in, int64_t vocab, int32_t ignore,
                                acc_t<T> eps, int reduction, const unsigned long long* valid_count,
                                T* __restrict__ dx) {
  using A = acc_t<T>;
  const int64_t row = blockIdx.x;
  const int32_t t = targets[row];
  T* d = dx + row * vocab;
  if (t == ignore || bad_target(t, vocab, ignore)) {
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) d[i] = store_acc<T, A>(A(0));
    return;
  }
  A g;
  if (reduction == static_cast<int>(Reduction::kNone)) {
    g = load_acc<A>(dloss[row]);
  } else if (reduction == static_cast<int>(Reduction::kMean)) {
    const unsigned long long valid = *valid_count;
    g = valid > 0 ? load_acc<A>(dloss[0]) / static_cast<A>(valid) : A(0);
  } else {
    g = load_acc<A>(dloss[0]);
  }
  const T* x = logits + row * vocab;
  const A lse = lse_in[row];
  const A smooth = eps / static_cast<A>(vocab);
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
    const A p = exp_acc(load_acc<A>(x[i]) - lse);
    d[i] = store_acc<T, A>(i == t ? g * (p - smooth - (A(1) - eps)) : g * (p - smooth));
  }
}

inline void throw_bad_target(const char* op, unsigned long long row, const int32_t* targets,
                             int64_t vocab, int32_t ignore, cudaStream_t stream) {
  const auto r = static_cast<int64_t>(row);
  fail(op, ": target ", read_element(targets, r, stream), " at row ", r, " is out of range [0, ",
       vocab, ") and is not ignore_index (", ignore, ")");
}

}  // namespace cross_entropy_detail

// Cross-entropy of `logits` (..., C) against class indices `targets` (...); see the file header.
template <ops::RowOpType T>
CrossEntropyOutput<T> cross_entropy(TensorView<const T, Cuda> logits,
                                    TensorView<const int32_t, Cuda> targets,
                                    const CrossEntropyOptions& options = {},
                                    cudaStream_t stream = nullptr) {
  using A = ops::row_acc_t<T>;
  constexpr const char* kOp = "cross_entropy";
  const auto g =
      ops::cross_entropy_detail::check_inputs(kOp, logits.shape(), targets.shape(), options);
  CrossEntropyOutput<T> out;
  out.logsumexp = Tensor<A, Cuda>::empty(Shape{g.rows});  // every row written (0 when ignored)
  out.loss = options.reduction == Reduction::kNone ? Tensor<T, Cuda>::empty(targets.shape())
                                                   : Tensor<T, Cuda>::empty(Shape{});
  auto row_loss = Tensor<A, Cuda>::empty(Shape{g.rows});  // (rows), every row written
  auto valid = zeros_on<unsigned long long>(Shape{1}, stream);
  const Dense<T> xd(logits, stream);
  const Dense<int32_t> td(targets, stream);
  BadIndexFlag bad(stream);
  if (g.rows > 0) {
    cross_entropy_detail::forward_kernel<T><<<row_grid(g.rows), row_threads(g.vocab), 0, stream>>>(
        xd.data, td.data, g.vocab, options.ignore_index, static_cast<A>(options.label_smoothing),
        options.label_smoothing > 0.0f, out.logsumexp.data(), row_loss.data(), valid.data(),
        bad.device());
    TESSERA_CUDA_CHECK_LAUNCH("cross_entropy forward_kernel");
  }
  if (options.reduction == Reduction::kNone) {
    if (g.rows > 0) {
      cross_entropy_detail::store_rows_kernel<T><<<grid_for(g.rows), kThreadsPerBlock, 0, stream>>>(
          row_loss.data(), g.rows, out.loss.data());
      TESSERA_CUDA_CHECK_LAUNCH("cross_entropy store_rows_kernel");
    }
  } else {
    cross_entropy_detail::reduce_loss_kernel<T>
        <<<1, 1024, 0, stream>>>(row_loss.data(), g.rows, options.reduction == Reduction::kMean,
                                 valid.data(), out.loss.data());
    TESSERA_CUDA_CHECK_LAUNCH("cross_entropy reduce_loss_kernel");
  }
  if (const auto first = bad.read(); first != BadIndexFlag::kNone)
    cross_entropy_detail::throw_bad_target(kOp, first, td.data, g.vocab, options.ignore_index,
                                           stream);
  out.valid_rows = static_cast<int64_t>(read_element(valid.data(), 0, stream));
  return out;
}

// Gradient of cross_entropy with respect to the logits; `dloss` has the loss's shape (one
// element for kMean and kSum, the targets' shape for kNone), `logsumexp` is the forward
// output's, `options` the forward's.
template <ops::RowOpType T>
Tensor<T, Cuda> cross_entropy_backward(TensorView<const T, Cuda> dloss,
                                       TensorView<const T, Cuda> logits,
                                       TensorView<const int32_t, Cuda> targets,
                                       TensorView<const ops::row_acc_t<T>, Cuda> logsumexp,
                                       const CrossEntropyOptions& options = {},
                                       cudaStream_t stream = nullptr) {
  using A = ops::row_acc_t<T>;
  constexpr const char* kOp = "cross_entropy_backward";
  const auto g =
      ops::cross_entropy_detail::check_inputs(kOp, logits.shape(), targets.shape(), options);
  check_shape(kOp, "logsumexp", logsumexp.shape(), Shape{g.rows});
  if (options.reduction == Reduction::kNone) {
    check_shape(kOp, "dloss", dloss.shape(), targets.shape());
  } else {
    TESSERA_CHECK(dloss.numel() == 1, kOp, ": tensor 'dloss' has shape ", dloss.shape(),
                  ", expected one element (reduction '", ops::to_string(options.reduction), "')");
  }
  auto dx = Tensor<T, Cuda>::empty(logits.shape());
  if (g.rows == 0) return dx;
  const Dense<int32_t> td(targets, stream);
  const Dense<T> xd(logits, stream), dld(dloss, stream);
  const Dense<A> lsed(logsumexp, stream);
  auto valid = zeros_on<unsigned long long>(Shape{1}, stream);
  BadIndexFlag bad(stream);
  cross_entropy_detail::count_targets_kernel<<<grid_for(g.rows), kThreadsPerBlock, 0, stream>>>(
      td.data, g.rows, g.vocab, options.ignore_index, valid.data(), bad.device());
  TESSERA_CUDA_CHECK_LAUNCH("cross_entropy count_targets_kernel");
  if (g.vocab > 0) {
    cross_entropy_detail::backward_kernel<T><<<row_grid(g.rows), row_threads(g.vocab), 0, stream>>>(
        dld.data, xd.data, td.data, lsed.data, g.vocab, options.ignore_index,
        static_cast<A>(options.label_smoothing), static_cast<int>(options.reduction), valid.data(),
        dx.data());
    TESSERA_CUDA_CHECK_LAUNCH("cross_entropy backward_kernel");
  }
  if (const auto first = bad.read(); first != BadIndexFlag::kNone)
    cross_entropy_detail::throw_bad_target(kOp, first, td.data, g.vocab, options.ignore_index,
                                           stream);
  return dx;
}

}  // namespace tessera::cuda
