// tessera/ops/cross_entropy.hpp — fused log-softmax + cross-entropy from logits, with
// ignore_index, label smoothing and mean/sum/none reduction, as PyTorch defines them.
//
// Why fused: a language model's logits are (tokens, vocab) with a vocabulary of 10^5, the
// largest activation of the whole step. The unfused form (log_softmax, then gather) writes
// and re-reads a second tensor of that size. Here the forward pass reads each row of logits
// once (in blocks that stay in L1 between their max and their sum of exps) and keeps one
// number per row, the log-sum-exp; the backward pass reads the row once more and writes the
// gradient, p - onehot, directly. Nothing of size (tokens, vocab) is stored in between.
//
// Semantics (torch.nn.functional.cross_entropy with class-index targets, no class weights):
//   nll_i    = lse_i - x[i, t_i]                          lse_i = log(sum_c exp(x[i, c]))
//   smooth_i = lse_i - mean_c x[i, c]                      (= mean over classes of -log p)
//   loss_i   = (1 - eps) * nll_i + eps * smooth_i          eps = label_smoothing in [0, 1]
//   rows whose target equals ignore_index have loss 0 and gradient 0;
//   kMean divides the sum by the number of non-ignored rows (all ignored, or no rows: NaN,
//   exactly as PyTorch; the gradient is then 0), kSum sums, kNone returns loss_i per row.
//   dlogits[i, c] = g_i * (p[i, c] - eps / C - (1 - eps) * [c == t_i]),  p = softmax(x[i])
//   with g_i = dloss / count (kMean), dloss (kSum) or dloss[i] (kNone).
//
// Numerics: float, bf16 and fp16 logits compute in float, double in double; the per-row
// losses are summed in double, in row order, so the loss does not depend on the thread count.
// The loss tensor has the logits' type (as in PyTorch); the saved log-sum-exp is row_acc_t.
//
// Shapes: logits (..., C), targets (...) int32 — the logits' shape without its last axis
// (usually logits (N, C) and targets (N)).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "tessera/core/error.hpp"
#include "tessera/core/number.hpp"
#include "tessera/core/shape.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/ops/detail/rows.hpp"

namespace tessera::ops {

// How per-row losses become the returned loss (PyTorch's `reduction`).
enum class Reduction { kMean, kSum, kNone };

inline const char* to_string(Reduction r) {
  switch (r) {
    case Reduction::kMean: return "mean";
    case Reduction::kSum: return "sum";
    case Reduction::kNone: return "none";
  }
  return "?";
}

struct CrossEntropyOptions {
  int32_t ignore_index = -100;  // rows with this target contribute nothing
  float label_smoothing = 0;    // eps in [0, 1]
  Reduction reduction = Reduction::kMean;
};

template <class T>
struct CrossEntropyOutput {
  Tensor<T> loss;                   // [] for kMean and kSum; the targets' shape for kNone
  Tensor<row_acc_t<T>> logsumexp;   // (rows) log(sum(exp(logits))) per row; 0 on ignored rows
  int64_t valid_rows = 0;           // rows whose target is not ignore_index
};

namespace cross_entropy_detail {

using rows_detail::exp_acc;
using rows_detail::load;
using rows_detail::store;

struct Geometry {
  int64_t rows = 0;
  int64_t vocab = 0;
};

// Checks the options and the shapes shared by forward and backward.
inline Geometry check_inputs(const char* op, const Shape& logits, const Shape& targets,
                             const CrossEntropyOptions& options) {
  TESSERA_CHECK(logits.rank() >= 1, op, ": tensor 'logits' has shape ", logits,
                " (rank 0), expected (..., vocab)");
  const auto lead = logits.span().first(static_cast<size_t>(logits.rank() - 1));
  check_shape(op, "targets", targets, Shape(lead));
  const float eps = options.label_smoothing;
  TESSERA_CHECK(eps >= 0.0f && eps <= 1.0f, op, ": label_smoothing is ", eps,
                ", expected a value in [0, 1]");
  Geometry g;
  g.vocab = logits[-1];
  TESSERA_CHECK(g.vocab >= 1, op, ": tensor 'logits' has shape ", logits,
                ", expected at least one class in the last axis");
  g.rows = targets.numel();
  return g;
}

// Throws on the first target that is neither ignore_index nor a class; returns the number
// of non-ignored rows. Runs before any parallel loop (nothing may throw inside one).
inline int64_t check_targets(const char* op, const int32_t* targets, int64_t rows, int64_t vocab,
                             int32_t ignore_index) {
  int64_t valid = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t t = targets[r];
    if (t == ignore_index) continue;
    TESSERA_CHECK(t >= 0 && t < vocab, op, ": target ", t, " at row ", r,
                  " is out of range [0, ", vocab, ") and is not ignore_index (", ignore_index,
                  ")");
    ++valid;
  }
  return valid;
}

// Elements per block of the log-sum-exp pass: 16 KiB of floats, so a block read for its
// maximum is still in L1 when its exps are summed.
inline constexpr int64_t kLseBlock = 4096;

// log(sum(exp(x))) of one row, and sum(x) when `want_sum` (label smoothing needs the mean).
// Online over blocks: each block's maximum is found, the running sum is rescaled when the
// maximum grows, then the block's exps are added — one pass over memory for any row length,
// one exp per element.
template <class T, class A = row_acc_t<T>>
TESSERA_FORCE_INLINE A row_logsumexp(const T* x, int64_t n, bool want_sum, A& sum_x) {
  A m = -std::numeric_limits<A>::infinity();
  A s = 0;
  A sx = 0;
  for (int64_t b = 0; b < n; b += kLseBlock) {
    const T* xb = x + b;
    const int64_t nb = n - b < kLseBlock ? n - b : kLseBlock;
    A bm = -std::numeric_limits<A>::infinity();
    if (want_sum) {
      A bsx = 0;
#pragma omp simd reduction(max : bm) reduction(+ : bsx)
      for (int64_t i = 0; i < nb; ++i) {
        const A v = load(xb[i]);
        bm = v > bm ? v : bm;
        bsx += v;
      }
      sx += bsx;
    } else {
#pragma omp simd reduction(max : bm)
      for (int64_t i = 0; i < nb; ++i) {
        const A v = load(xb[i]);
        bm = v > bm ? v : bm;
      }
    }
    // A block of -inf only (masked classes) adds nothing; a NaN maximum propagates through
    // the exps below. exp(-inf - finite) = 0 rescales the still empty sum of a first block.
    if (bm == -std::numeric_limits<A>::infinity()) continue;
    if (bm > m) {
      s *= exp_acc<A>(m - bm);
      m = bm;
    } else if (bm != bm) {
      m = bm;
    }
    A bs = 0;
#pragma omp simd reduction(+ : bs)
    for (int64_t i = 0; i < nb; ++i) bs += exp_acc<A>(load(xb[i]) - m);
    s += bs;
  }
  sum_x = sx;
  return m + std::log(s);
}

// dx = g * (softmax(x) - eps / C - (1 - eps) * onehot(t)) for one row.
template <class T, class A = row_acc_t<T>>
TESSERA_FORCE_INLINE void row_gradient(const T* x, T* dx, int64_t n, int32_t t, A lse, A g,
                                       A eps) {
  const A smooth = eps / static_cast<A>(n);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dx[i] = store<T>(g * (exp_acc<A>(load(x[i]) - lse) - smooth));
  // The target's element once more, from float, so it is rounded once like the others.
  dx[t] = store<T>(g * (exp_acc<A>(load(x[t]) - lse) - smooth - (A(1) - eps)));
}

}  // namespace cross_entropy_detail

// Cross-entropy of `logits` (..., C) against class indices `targets` (...); see the file
// header for the exact semantics. The result keeps what backward needs.
template <RowOpType T>
CrossEntropyOutput<T> cross_entropy(TensorView<const T, Cpu> logits,
                                    TensorView<const int32_t, Cpu> targets,
                                    const CrossEntropyOptions& options = {}) {
  using A = row_acc_t<T>;
  constexpr const char* kOp = "cross_entropy";
  const auto g = cross_entropy_detail::check_inputs(kOp, logits.shape(), targets.shape(), options);
  const rows_detail::Dense<int32_t> td(targets);
  const int32_t* tp = td.data;
  const int32_t ignore = options.ignore_index;
  CrossEntropyOutput<T> out;
  out.valid_rows = cross_entropy_detail::check_targets(kOp, tp, g.rows, g.vocab, ignore);

  out.logsumexp = Tensor<A>::zeros(Shape{g.rows});
  // Per-row losses in A for every reduction: kMean/kSum sum them afterwards in row order.
  auto row_loss = Tensor<A>::zeros(Shape{g.rows});
  const rows_detail::Dense<T> xd(logits);
  const T* xp = xd.data;
  A* lsep = out.logsumexp.data();
  A* lossp = row_loss.data();
  const int64_t vocab = g.vocab;
  const A eps = static_cast<A>(options.label_smoothing);
  const bool smoothing = options.label_smoothing > 0.0f;
  rows_detail::parallel_rows(
      rows_detail::row_isa(), g.rows, g.rows * vocab, [=](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int32_t t = tp[r];
          if (t == ignore) continue;
          const T* x = xp + r * vocab;
          A sum_x = 0;
          const A lse = cross_entropy_detail::row_logsumexp<T>(x, vocab, smoothing, sum_x);
          const A nll = lse - rows_detail::load(x[t]);
          lsep[r] = lse;
          lossp[r] = smoothing ? (A(1) - eps) * nll + eps * (lse - sum_x / static_cast<A>(vocab))
                               : nll;
        }
      });

  if (options.reduction == Reduction::kNone) {
    out.loss = Tensor<T>::empty(targets.shape());
    for (int64_t r = 0; r < g.rows; ++r) out.loss.data()[r] = rows_detail::store<T>(lossp[r]);
    return out;
  }
  double total = 0.0;
  for (int64_t r = 0; r < g.rows; ++r) total += static_cast<double>(lossp[r]);
  if (options.reduction == Reduction::kMean) {
    total = out.valid_rows > 0 ? total / static_cast<double>(out.valid_rows)
                               : std::numeric_limits<double>::quiet_NaN();
  }
  out.loss = Tensor<T>::empty(Shape{});
  out.loss.data()[0] = rows_detail::store<T>(static_cast<A>(total));
  return out;
}

// Gradient of cross_entropy with respect to the logits. `dloss` has the loss's shape: one
// element for kMean and kSum (shape [] or [1]), the targets' shape for kNone. `logsumexp` is
// the forward output's, (rows). `options` must be the forward's.
template <RowOpType T>
Tensor<T> cross_entropy_backward(TensorView<const T, Cpu> dloss, TensorView<const T, Cpu> logits,
                                 TensorView<const int32_t, Cpu> targets,
                                 TensorView<const row_acc_t<T>, Cpu> logsumexp,
                                 const CrossEntropyOptions& options = {}) {
  using A = row_acc_t<T>;
  constexpr const char* kOp = "cross_entropy_backward";
  const auto g = cross_entropy_detail::check_inputs(kOp, logits.shape(), targets.shape(), options);
  check_shape(kOp, "logsumexp", logsumexp.shape(), Shape{g.rows});
  if (options.reduction == Reduction::kNone) {
    check_shape(kOp, "dloss", dloss.shape(), targets.shape());
  } else {
    TESSERA_CHECK(dloss.numel() == 1, kOp, ": tensor 'dloss' has shape ", dloss.shape(),
                  ", expected one element (reduction '", to_string(options.reduction), "')");
  }
  const rows_detail::Dense<int32_t> td(targets);
  const int32_t* tp = td.data;
  const int32_t ignore = options.ignore_index;
  const int64_t valid = cross_entropy_detail::check_targets(kOp, tp, g.rows, g.vocab, ignore);

  auto dx = Tensor<T>::empty(logits.shape());
  if (dx.numel() == 0) return dx;
  const rows_detail::Dense<T> xd(logits), dld(dloss);
  const rows_detail::Dense<A> lsed(logsumexp);
  const T* xp = xd.data;
  const T* dlp = dld.data;
  const A* lsep = lsed.data;
  T* dxp = dx.data();
  const int64_t vocab = g.vocab;
  const A eps = static_cast<A>(options.label_smoothing);
  const bool per_row = options.reduction == Reduction::kNone;
  // All rows ignored under kMean: the loss is NaN and every row's gradient is 0, as in PyTorch.
  const A scale = options.reduction == Reduction::kMean
                      ? (valid > 0 ? rows_detail::load(dlp[0]) / static_cast<A>(valid) : A(0))
                      : rows_detail::load(dlp[0]);
  rows_detail::parallel_rows(
      rows_detail::row_isa(), g.rows, g.rows * vocab, [=](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          T* d = dxp + r * vocab;
          const int32_t t = tp[r];
          if (t == ignore) {
#pragma omp simd
            for (int64_t i = 0; i < vocab; ++i) d[i] = rows_detail::store<T>(A(0));
            continue;
          }
          const A gr = per_row ? rows_detail::load(dlp[r]) : scale;
          cross_entropy_detail::row_gradient<T>(xp + r * vocab, d, vocab, t, lsep[r], gr, eps);
        }
      });
  return dx;
}

}  // namespace tessera::ops
