// tessera/ops/norm.hpp — RMSNorm and LayerNorm over the last axis, forward and backward.
//
// RMSNorm is the normalisation of the DeepSeek / Llama decoders (before attention, before the
// FFN, before the head); LayerNorm that of the encoders (BERT, ViT). Both are row ops: each
// row of features is scaled by statistics of that row alone.
//   RMSNorm:   y = x * rstd * w,                   rstd = 1 / sqrt(mean(x^2) + eps)
//   LayerNorm: y = (x - mean) * rstd * w + b,      rstd = 1 / sqrt(var(x) + eps),
//              var is the biased variance (divides by n), as torch.nn.LayerNorm.
//
// How they are built:
//   * The forward pass returns the per-row statistics (rstd; for LayerNorm also mean) next to
//     the output, so backward need not recompute them; they are tiny ((rows) floats), so the
//     recompute policy keeps them even when it drops the activations.
//   * Statistics and arithmetic are in float for float, bf16 and fp16 (inputs widened on load,
//     outputs rounded once), in double for double. LayerNorm's variance is the two-pass
//     mean((x - mean)^2): rows stay in cache, and it does not cancel catastrophically for rows
//     with a large mean as E[x^2] - E[x]^2 does.
//   * Backward, with xhat the normalised input and g = dy * w:
//       RMSNorm    dx = rstd * (g - xhat * mean(g * xhat)),            dw = sum_rows dy * xhat
//       LayerNorm  dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  dw = sum_rows dy * xhat,
//                                                                      db = sum_rows dy
//     The weight gradients are sums over rows. To keep them independent of the thread count,
//     the rows are cut into a number of chunks that depends only on the row count; each chunk
//     sums its rows into its own partial (in row order), and the partials are then added in
//     chunk order.
//   * Every loop is a contiguous row loop compiled for baseline x86-64, AVX2 and AVX-512 and
//     picked per call (detail/rows.hpp); rows are split over OpenMP threads statically.
//
// Shapes: x (..., n); weight and bias (n); statistics (rows) with rows = numel / n.
#pragma once

#include <cmath>
#include <cstdint>
#include <span>
#include <type_traits>

#include "tessera/core/error.hpp"
#include "tessera/core/number.hpp"
#include "tessera/core/shape.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/ops/detail/rows.hpp"

namespace tessera::ops {

template <class T>
struct RmsNormOutput {
  Tensor<T> y;                // (..., n), x's shape
  Tensor<row_acc_t<T>> rstd;  // (rows) 1 / sqrt(mean(x^2) + eps)
};

template <class T>
struct RmsNormGrads {
  Tensor<T> dx;       // (..., n)
  Tensor<T> dweight;  // (n)
};

template <class T>
struct LayerNormOutput {
  Tensor<T> y;                // (..., n), x's shape
  Tensor<row_acc_t<T>> mean;  // (rows)
  Tensor<row_acc_t<T>> rstd;  // (rows) 1 / sqrt(var(x) + eps)
};

template <class T>
struct LayerNormGrads {
  Tensor<T> dx;       // (..., n)
  Tensor<T> dweight;  // (n)
  Tensor<T> dbias;    // (n)
};

namespace norm_detail {

using rows_detail::load;
using rows_detail::store;

// The row count above which the weight-gradient partials are capped: chunks = min(rows,
// kMaxChunks). Enough chunks to keep 16+ threads busy, few enough that the partials
// ((chunks, n) floats) stay small.
inline constexpr int64_t kMaxChunks = 64;

inline rows_detail::RowGeometry check_x(const char* op, const Shape& x) {
  const auto g = rows_detail::row_geometry(op, "x", x);
  TESSERA_CHECK(g.cols >= 1, op, ": tensor 'x' has shape ", x,
                ", expected at least one feature in the last axis");
  return g;
}

inline void check_eps(const char* op, double eps) {
  TESSERA_CHECK(eps >= 0.0 && std::isfinite(eps), op, ": eps is ", eps,
                ", expected a finite value >= 0");
}

// A parameter vector (n) as A values: borrowed for float and double, widened for bf16/fp16
// (once per call, so the row loops read plain floats).
template <class T, class A = row_acc_t<T>>
struct Params {
  Tensor<A> owned;
  const A* data = nullptr;
  explicit Params(TensorView<const T, Cpu> v) {
    if constexpr (std::is_same_v<T, A>) {
      if (v.is_contiguous()) {
        data = v.data();
        return;
      }
      owned = v.contiguous();
    } else {
      const Tensor<T> dense = v.contiguous();
      owned = Tensor<A>::empty(v.shape());
      for (int64_t i = 0; i < dense.numel(); ++i) owned.data()[i] = load(dense.data()[i]);
    }
    data = owned.data();
  }
};

// Adds the chunk partials (chunks, width) in chunk order and stores them as T. Parallel over
// column ranges; each range is summed a block of columns at a time, so the running sums stay
// in registers/L1 and every inner loop is a contiguous, vectorised row of a partial.
template <class T, class A = row_acc_t<T>>
void reduce_partials(rows_detail::Isa isa, const A* partial, int64_t chunks, int64_t width,
                     T* out) {
  rows_detail::parallel_rows(isa, width, chunks * width, [=](int64_t begin, int64_t end) {
    constexpr int64_t kBlock = 512;
    A acc[kBlock];
    for (int64_t c0 = begin; c0 < end; c0 += kBlock) {
      const int64_t m = end - c0 < kBlock ? end - c0 : kBlock;
      const A* p0 = partial + c0;
#pragma omp simd
      for (int64_t i = 0; i < m; ++i) acc[i] = p0[i];
      for (int64_t k = 1; k < chunks; ++k) {
        const A* pk = partial + k * width + c0;
#pragma omp simd
        for (int64_t i = 0; i < m; ++i) acc[i] += pk[i];
      }
#pragma omp simd
      for (int64_t i = 0; i < m; ++i) out[c0 + i] = store<T>(acc[i]);
    }
  });
}

template <class T, class A = row_acc_t<T>>
TESSERA_FORCE_INLINE A rms_row_forward(const T* x, const A* w, T* y, int64_t n, A eps) {
  A ss = 0;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) {
    const A v = load(x[i]);
    ss += v * v;
  }
  const A rstd = A(1) / std::sqrt(ss / static_cast<A>(n) + eps);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = store<T>(load(x[i]) * rstd * w[i]);
  return rstd;
}

// dx for one row; adds dy * xhat into dw.
template <class T, class A = row_acc_t<T>>
TESSERA_FORCE_INLINE void rms_row_backward(const T* dy, const T* x, const A* w, A rstd, T* dx,
                                           A* dw, int64_t n) {
  A dot = 0;  // sum(g * x) = sum(g * xhat) / rstd
#pragma omp simd reduction(+ : dot)
  for (int64_t i = 0; i < n; ++i) dot += load(dy[i]) * w[i] * load(x[i]);
  const A c = dot * rstd * rstd / static_cast<A>(n);  // xhat * mean(g * xhat) = x * c
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const A d = load(dy[i]);
    const A v = load(x[i]);
    dx[i] = store<T>(rstd * (d * w[i] - v * c));
    dw[i] += d * v * rstd;
  }
}

template <class T, class A = row_acc_t<T>>
TESSERA_FORCE_INLINE void layer_row_forward(const T* x, const A* w, const A* b, T* y, int64_t n,
                                            A eps, A& mean_out, A& rstd_out) {
  A s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += load(x[i]);
  const A mean = s / static_cast<A>(n);
  A ss = 0;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) {
    const A d = load(x[i]) - mean;
    ss += d * d;
  }
  const A rstd = A(1) / std::sqrt(ss / static_cast<A>(n) + eps);
  // (x - mean) * rstd, not PyTorch's x * rstd - mean * rstd: the subtraction comes first, so
  // a row equal to its mean gives exactly b, even where the compiler fuses multiply-adds.
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = store<T>((load(x[i]) - mean) * rstd * w[i] + b[i]);
  mean_out = mean;
  rstd_out = rstd;
}

// dx for one row; adds dy * xhat into dw and dy into db.
template <class T, class A = row_acc_t<T>>
TESSERA_FORCE_INLINE void layer_row_backward(const T* dy, const T* x, const A* w, A mean, A rstd,
                                             T* dx, A* dw, A* db, int64_t n) {
  A sg = 0;   // sum(g)
  A sgx = 0;  // sum(g * xhat)
#pragma omp simd reduction(+ : sg, sgx)
  for (int64_t i = 0; i < n; ++i) {
    const A gi = load(dy[i]) * w[i];
    sg += gi;
    sgx += gi * ((load(x[i]) - mean) * rstd);
  }
  const A mg = sg / static_cast<A>(n);
  const A mgx = sgx / static_cast<A>(n);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const A d = load(dy[i]);
    const A xhat = (load(x[i]) - mean) * rstd;
    dx[i] = store<T>(rstd * (d * w[i] - mg - xhat * mgx));
    dw[i] += d * xhat;
    db[i] += d;
  }
}

}  // namespace norm_detail

// RMSNorm over the last axis: x (..., n), weight (n) -> y (..., n) and rstd (rows).
// eps: 1e-6 is the DeepSeek-V3 / Llama setting.
template <RowOpType T>
RmsNormOutput<T> rms_norm(TensorView<const T, Cpu> x, TensorView<const T, Cpu> weight,
                          double eps = 1e-6) {
  using A = row_acc_t<T>;
  constexpr const char* kOp = "rms_norm";
  const auto g = norm_detail::check_x(kOp, x.shape());
  check_shape(kOp, "weight", weight.shape(), Shape{g.cols});
  norm_detail::check_eps(kOp, eps);
  RmsNormOutput<T> out;
  out.y = Tensor<T>::empty(x.shape());
  out.rstd = Tensor<A>::empty(Shape{g.rows});
  const rows_detail::Dense<T> xd(x);
  const norm_detail::Params<T> wd(weight);
  const T* xp = xd.data;
  const A* wp = wd.data;
  T* yp = out.y.data();
  A* rp = out.rstd.data();
  const int64_t n = g.cols;
  const A e = static_cast<A>(eps);
  rows_detail::parallel_rows(rows_detail::row_isa(), g.rows, g.rows * n,
                             [=](int64_t begin, int64_t end) {
                               for (int64_t r = begin; r < end; ++r)
                                 rp[r] = norm_detail::rms_row_forward<T>(xp + r * n, wp,
                                                                         yp + r * n, n, e);
                             });
  return out;
}

// Gradients of rms_norm: dy and x (..., n), weight (n), rstd (rows) from the forward pass.
template <RowOpType T>
RmsNormGrads<T> rms_norm_backward(TensorView<const T, Cpu> dy, TensorView<const T, Cpu> x,
                                  TensorView<const T, Cpu> weight,
                                  TensorView<const row_acc_t<T>, Cpu> rstd) {
  using A = row_acc_t<T>;
  constexpr const char* kOp = "rms_norm_backward";
  const auto g = norm_detail::check_x(kOp, x.shape());
  check_same_shape(kOp, "dy", dy.shape(), "x", x.shape());
  check_shape(kOp, "weight", weight.shape(), Shape{g.cols});
  check_shape(kOp, "rstd", rstd.shape(), Shape{g.rows});
  RmsNormGrads<T> out;
  out.dx = Tensor<T>::empty(x.shape());
  const int64_t n = g.cols;
  const int64_t rows = g.rows;
  const int64_t chunks = rows < norm_detail::kMaxChunks ? rows : norm_detail::kMaxChunks;
  if (chunks == 0) {
    out.dweight = Tensor<T>::zeros(Shape{n});
    return out;
  }
  auto partial = Tensor<A>::zeros(Shape{chunks, n});  // (chunks, n)
  const rows_detail::Dense<T> dyd(dy), xd(x);
  const rows_detail::Dense<A> rd(rstd);
  const norm_detail::Params<T> wd(weight);
  const T* dyp = dyd.data;
  const T* xp = xd.data;
  const A* rp = rd.data;
  const A* wp = wd.data;
  T* dxp = out.dx.data();
  A* pp = partial.data();
  const auto isa = rows_detail::row_isa();
  rows_detail::parallel_rows(isa, chunks, rows * n, [=](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      for (int64_t r = rows * k / chunks; r < rows * (k + 1) / chunks; ++r)
        norm_detail::rms_row_backward<T>(dyp + r * n, xp + r * n, wp, rp[r], dxp + r * n,
                                         pp + k * n, n);
    }
  });
  out.dweight = Tensor<T>::empty(Shape{n});
  norm_detail::reduce_partials<T>(isa, pp, chunks, n, out.dweight.data());
  return out;
}

// LayerNorm over the last axis: x (..., n), weight and bias (n) -> y (..., n), mean and rstd
// (rows). eps: 1e-5 is torch.nn.LayerNorm's default.
template <RowOpType T>
LayerNormOutput<T> layer_norm(TensorView<const T, Cpu> x, TensorView<const T, Cpu> weight,
                              TensorView<const T, Cpu> bias, double eps = 1e-5) {
  using A = row_acc_t<T>;
  constexpr const char* kOp = "layer_norm";
  const auto g = norm_detail::check_x(kOp, x.shape());
  check_shape(kOp, "weight", weight.shape(), Shape{g.cols});
  check_shape(kOp, "bias", bias.shape(), Shape{g.cols});
  norm_detail::check_eps(kOp, eps);
  LayerNormOutput<T> out;
  out.y = Tensor<T>::empty(x.shape());
  out.mean = Tensor<A>::empty(Shape{g.rows});
  out.rstd = Tensor<A>::empty(Shape{g.rows});
  const rows_detail::Dense<T> xd(x);
  const norm_detail::Params<T> wd(weight), bd(bias);
  const T* xp = xd.data;
  const A* wp = wd.data;
  const A* bp = bd.data;
  T* yp = out.y.data();
  A* mp = out.mean.data();
  A* rp = out.rstd.data();
  const int64_t n = g.cols;
  const A e = static_cast<A>(eps);
  rows_detail::parallel_rows(rows_detail::row_isa(), g.rows, g.rows * n,
                             [=](int64_t begin, int64_t end) {
                               for (int64_t r = begin; r < end; ++r)
                                 norm_detail::layer_row_forward<T>(xp + r * n, wp, bp,
                                                                   yp + r * n, n, e, mp[r], rp[r]);
                             });
  return out;
}

// Gradients of layer_norm: dy and x (..., n), weight (n), mean and rstd (rows) from the
// forward pass.
template <RowOpType T>
LayerNormGrads<T> layer_norm_backward(TensorView<const T, Cpu> dy, TensorView<const T, Cpu> x,
                                      TensorView<const T, Cpu> weight,
                                      TensorView<const row_acc_t<T>, Cpu> mean,
                                      TensorView<const row_acc_t<T>, Cpu> rstd) {
  using A = row_acc_t<T>;
  constexpr const char* kOp = "layer_norm_backward";
  const auto g = norm_detail::check_x(kOp, x.shape());
  check_same_shape(kOp, "dy", dy.shape(), "x", x.shape());
  check_shape(kOp, "weight", weight.shape(), Shape{g.cols});
  check_shape(kOp, "mean", mean.shape(), Shape{g.rows});
  check_shape(kOp, "rstd", rstd.shape(), Shape{g.rows});
  LayerNormGrads<T> out;
  out.dx = Tensor<T>::empty(x.shape());
  const int64_t n = g.cols;
  const int64_t rows = g.rows;
  const int64_t chunks = rows < norm_detail::kMaxChunks ? rows : norm_detail::kMaxChunks;
  if (chunks == 0) {
    out.dweight = Tensor<T>::zeros(Shape{n});
    out.dbias = Tensor<T>::zeros(Shape{n});
    return out;
  }
  // (chunks, 2n): each chunk's dweight partial, then its dbias partial.
  auto partial = Tensor<A>::zeros(Shape{chunks, 2 * n});
  const rows_detail::Dense<T> dyd(dy), xd(x);
  const rows_detail::Dense<A> md(mean), rd(rstd);
  const norm_detail::Params<T> wd(weight);
  const T* dyp = dyd.data;
  const T* xp = xd.data;
  const A* mp = md.data;
  const A* rp = rd.data;
  const A* wp = wd.data;
  T* dxp = out.dx.data();
  A* pp = partial.data();
  const auto isa = rows_detail::row_isa();
  rows_detail::parallel_rows(isa, chunks, rows * n, [=](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      A* dw = pp + k * 2 * n;
      for (int64_t r = rows * k / chunks; r < rows * (k + 1) / chunks; ++r)
        norm_detail::layer_row_backward<T>(dyp + r * n, xp + r * n, wp, mp[r], rp[r],
                                           dxp + r * n, dw, dw + n, n);
    }
  });
  // Both partials at once: row k of `partial` is [dw_k, db_k], so the sum is [dw, db].
  auto both = Tensor<T>::empty(Shape{2 * n});
  norm_detail::reduce_partials<T>(isa, pp, chunks, 2 * n, both.data());
  out.dweight = Tensor<T>::from(Shape{n}, std::span<const T>(both.data(), static_cast<size_t>(n)));
  out.dbias = Tensor<T>::from(Shape{n}, std::span<const T>(both.data() + n, static_cast<size_t>(n)));
  return out;
}

}  // namespace tessera::ops
