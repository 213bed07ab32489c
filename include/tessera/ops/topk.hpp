// tessera/ops/topk.hpp — the k largest values along the last axis, with their indices.
//
// Used by the mixture-of-experts routers (top-k experts per token, top groups per token) and
// the samplers (top-k sampling), so the order must be fully specified and reproducible:
//   * values are sorted in descending order;
//   * equal values are ordered by the lower index first (so a router's choice never depends
//     on the sort algorithm or the thread count);
//   * NaN ranks above every number (as in PyTorch), so a NaN logit is selected and shows up
//     instead of hiding; NaNs among themselves are ordered by index; -0.0 equals +0.0.
// Each row is independent: OpenMP-parallel over rows, std::partial_sort within a row
// (O(n log k)). Comparisons are made on the exact widened values, so bf16/fp16 ties are
// real ties of the stored numbers.
//
// topk_backward scatters the value gradients back to the positions they came from; every
// other position gets zero.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/core/number.hpp"
#include "tessera/core/shape.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/ops/cast.hpp"

namespace tessera::ops {

template <class T>
struct TopK {
  Tensor<T> values;        // (..., k), descending along the last axis
  Tensor<int32_t> indices;  // (..., k), positions in [0, n) along the last axis of x
};

namespace topk_detail {
inline Shape with_last(const Shape& s, int64_t last) {
  Shape out = s;
  out[-1] = last;
  return out;
}
}  // namespace topk_detail

// The k largest entries of every row of x (..., n); k must be in [1, n].
template <class T>
TopK<T> topk(TensorView<const T, Cpu> x, int64_t k) {
  using A = cast_detail::acc_t<T>;
  TESSERA_CHECK(x.rank() >= 1, "topk: tensor 'x' has rank 0; expected rank >= 1 (..., n)");
  const int64_t n = x.dim(-1);
  TESSERA_CHECK(n <= std::numeric_limits<int32_t>::max(), "topk: last axis of 'x' ", x.shape(),
                " has ", n, " entries; int32 indices hold at most ",
                std::numeric_limits<int32_t>::max());
  TESSERA_CHECK(1 <= k && k <= n, "topk: k = ", k, " is out of range [1, ", n,
                "] for tensor 'x' of shape ", x.shape());
  Tensor<T> owned;
  const T* px = x.data();
  if (!x.is_contiguous()) {
    owned = x.contiguous();
    px = owned.data();
  }
  const Shape out_shape = topk_detail::with_last(x.shape(), k);
  TopK<T> r{Tensor<T>::empty(out_shape), Tensor<int32_t>::empty(out_shape)};
  const int64_t rows = x.numel() / n;
  T* pv = r.values.data();
  int32_t* pi = r.indices.data();
#pragma omp parallel if (rows > 1 && rows * n >= (int64_t{1} << 14))
  {
    std::vector<A> v(static_cast<size_t>(n));
    std::vector<int32_t> idx(static_cast<size_t>(n));
#pragma omp for schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
      const T* in = px + row * n;
      for (int64_t j = 0; j < n; ++j) v[j] = cast_detail::load<A>(in[j]);
      std::iota(idx.begin(), idx.end(), 0);
      // "i ranks before j": NaN first, then larger values, then the lower index.
      auto before = [&v](int32_t i, int32_t j) {
        const A a = v[i], b = v[j];
        const bool na = std::isnan(a), nb = std::isnan(b);
        if (na != nb) return na;
        if (!na && a != b) return a > b;
        return i < j;
      };
      std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), before);
      for (int64_t j = 0; j < k; ++j) {
        pv[row * k + j] = in[idx[j]];
        pi[row * k + j] = idx[j];
      }
    }
  }
  return r;
}

// Gradient of topk: dx (..., n) is zero except dx[..., indices[..., j]] += dvalues[..., j].
// dvalues and indices have the same shape (..., k); every index must be in [0, n).
template <class T>
Tensor<T> topk_backward(TensorView<const T, Cpu> dvalues, TensorView<const int32_t, Cpu> indices,
                        int64_t n) {
  using A = cast_detail::acc_t<T>;
  check_same_shape("topk_backward", "dvalues", dvalues.shape(), "indices", indices.shape());
  TESSERA_CHECK(dvalues.rank() >= 1, "topk_backward: tensor 'dvalues' has rank 0; expected rank >= 1 (..., k)");
  TESSERA_CHECK(n >= 1, "topk_backward: n = ", n, " must be >= 1");
  const int64_t k = dvalues.dim(-1);
  const Tensor<T> dv = dvalues.contiguous();
  const Tensor<int32_t> ids = indices.contiguous();
  const int64_t rows = k == 0 ? 0 : dv.numel() / k;
  // Validate everything first: an exception cannot leave an OpenMP region.
  for (int64_t i = 0; i < ids.numel(); ++i) {
    const int32_t id = ids.data()[i];
    TESSERA_CHECK(0 <= id && id < n, "topk_backward: tensor 'indices' holds ", id, " at row ",
                  i / k, ", position ", i % k, "; expected an index in [0, ", n, ")");
  }
  auto dx = Tensor<T>::zeros(topk_detail::with_last(dvalues.shape(), n));  // (..., n)
  T* pd = dx.data();
  const T* pv = dv.data();
  const int32_t* pi = ids.data();
#pragma omp parallel for schedule(static) if (rows > 1 && rows * n >= (int64_t{1} << 14))
  for (int64_t row = 0; row < rows; ++row) {
    T* out = pd + row * n;
    for (int64_t j = 0; j < k; ++j) {
      const int32_t id = pi[row * k + j];
      out[id] = cast_detail::store<T>(cast_detail::load<A>(out[id]) + cast_detail::load<A>(pv[row * k + j]));
    }
  }
  return dx;
}

}  // namespace tessera::ops
