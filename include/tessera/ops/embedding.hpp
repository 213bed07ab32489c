// tessera/ops/embedding.hpp — token embedding: a row gather, and its scatter-add backward.
//
// How it is built, and why:
//   * Forward copies rows; it does no arithmetic, so it works for every number type (fp8
//     included) and is bit-exact. The table may be a strided view as long as each row is
//     contiguous (a slice of a larger parameter, say); otherwise it is copied first.
//   * Every id is checked before anything is written: an id outside [0, vocab) is the caller's
//     bug (a tokenizer / vocabulary mismatch) and throws, naming the position, the id and the
//     vocabulary size. It is never clamped or wrapped.
//   * Backward scatter-adds dout rows into a zero (vocab, dim) gradient. Repeated ids make this
//     a reduction, and a float reduction's result depends on its order, so the order is fixed:
//     tokens are bucketed by id with a stable counting sort, then each id's gradient row is
//     the sum of its tokens' rows in token order, computed by one thread. Threads split the
//     distinct ids, never one row, so the result is the same bit for bit at any thread count
//     (no atomics). Sums are accumulated in float (double for double) and rounded once.
//
// Shapes: table (vocab, dim); ids int32 of any shape (rank <= 5); output (*ids.shape, dim).
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/core/number.hpp"
#include "tessera/core/shape.hpp"
#include "tessera/core/tensor.hpp"

namespace tessera::ops {

namespace embedding_detail {

template <class T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <class T>
inline acc_t<T> load(T v) {
  if constexpr (std::is_same_v<T, double> || std::is_same_v<T, float>) {
    return v;
  } else {
    return to_float(v);
  }
}

template <class T>
inline T store(acc_t<T> v) {
  if constexpr (std::is_same_v<T, double> || std::is_same_v<T, float>) {
    return v;
  } else {
    return from_float<T>(v);
  }
}

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

inline std::string index_str(int64_t flat, const Shape& shape) {
  std::string s;
  for (int a = shape.rank() - 1; a >= 0; --a) {
    s = std::to_string(flat % shape[a]) + (s.empty() ? "" : ", ") + s;
    flat /= shape[a];
  }
  return "[" + s + "]";
}

// (*ids.shape, dim)
inline Shape output_shape(const char* op, const Shape& ids, int64_t dim) {
  TESSERA_CHECK(ids.rank() < Shape::kMaxRank, op, ": tensor 'ids' has rank ", ids.rank(),
                " (shape ", ids, "); the output (*ids.shape, dim) would exceed the maximum rank ",
                Shape::kMaxRank);
  std::vector<int64_t> dims(ids.begin(), ids.end());
  dims.push_back(dim);
  return Shape(dims);
}

inline void check_ids(const char* op, const int32_t* ids, const Shape& shape, int64_t vocab) {
  for (int64_t i = 0; i < shape.numel(); ++i) {
    TESSERA_CHECK(ids[i] >= 0 && ids[i] < vocab, op, ": ids", index_str(i, shape), " = ", ids[i],
                  " is out of range for vocab size ", vocab, " (valid ids are 0..", vocab - 1, ")");
  }
}

}  // namespace embedding_detail

// out[..., :] = table[ids[...], :]. table (vocab, dim), ids int32 (any shape, rank <= 5) ->
// (*ids.shape, dim). Throws when an id is outside [0, vocab).
template <class T>
Tensor<T> embedding(TensorView<const T, Cpu> table, TensorView<const int32_t, Cpu> ids) {
  check_rank("embedding", "table", table.shape(), 2);
  const int64_t vocab = table.dim(0), dim = table.dim(1);
  auto out = Tensor<T>::empty(embedding_detail::output_shape("embedding", ids.shape(), dim));
  const embedding_detail::Dense<int32_t> id(ids);
  embedding_detail::check_ids("embedding", id.data, ids.shape(), vocab);

  // Rows must be contiguous to be copied whole; the row stride may be anything.
  Tensor<T> copied;
  const T* rows = table.data();
  int64_t row_stride = table.strides()[0];
  if (table.strides()[1] != 1 && dim > 1) {
    copied = table.contiguous();
    rows = copied.data();
    row_stride = dim;
  }
  const int64_t n = ids.numel();
  const int32_t* pid = id.data;
  T* po = out.data();
#pragma omp parallel for schedule(static) if (n * dim >= (1 << 15))
  for (int64_t t = 0; t < n; ++t) {
    const T* src = rows + pid[t] * row_stride;
    std::copy(src, src + dim, po + t * dim);
  }
  return out;
}

// dtable (vocab, dim): dtable[v, :] = sum over tokens t with ids[t] == v of dout[t, :], summed
// in token order (deterministic at any thread count). dout is (*ids.shape, dim).
template <class T>
Tensor<T> embedding_backward(TensorView<const T, Cpu> dout, TensorView<const int32_t, Cpu> ids,
                             int64_t vocab) {
  using A = embedding_detail::acc_t<T>;
  TESSERA_CHECK(vocab > 0, "embedding_backward: vocab must be positive, got ", vocab);
  TESSERA_CHECK(dout.rank() == ids.rank() + 1, "embedding_backward: tensor 'dout' has shape ",
                dout.shape(), ", expected (*ids.shape, dim) with ids of shape ", ids.shape());
  const int64_t dim = dout.dim(-1);
  check_shape("embedding_backward", "dout", dout.shape(),
              embedding_detail::output_shape("embedding_backward", ids.shape(), dim));
  const embedding_detail::Dense<int32_t> id(ids);
  embedding_detail::check_ids("embedding_backward", id.data, ids.shape(), vocab);
  const embedding_detail::Dense<T> dd(dout);

  auto grad = Tensor<T>::zeros({vocab, dim});  // (vocab, dim); rows no token hit stay zero
  const int64_t n = ids.numel();
  if (n == 0 || dim == 0) return grad;

  // Stable counting sort of token indices by id: bucket v is order[start[v] .. start[v+1]),
  // in increasing token index.
  std::vector<int64_t> start(static_cast<size_t>(vocab) + 1, 0);
  for (int64_t t = 0; t < n; ++t) ++start[id.data[t] + 1];
  for (int64_t v = 0; v < vocab; ++v) start[v + 1] += start[v];
  std::vector<int64_t> order(static_cast<size_t>(n));
  {
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (int64_t t = 0; t < n; ++t) order[next[id.data[t]]++] = t;
  }
  std::vector<int32_t> hit;  // the distinct ids, ascending
  for (int64_t v = 0; v < vocab; ++v) {
    if (start[v + 1] > start[v]) hit.push_back(static_cast<int32_t>(v));
  }

  const T* pd = dd.data;
  T* pg = grad.data();
  const int64_t distinct = static_cast<int64_t>(hit.size());
#pragma omp parallel if (n * dim >= (1 << 15))
  {
    std::vector<A> acc(static_cast<size_t>(dim));
#pragma omp for schedule(dynamic, 16)
    for (int64_t k = 0; k < distinct; ++k) {
      const int64_t v = hit[k];
      std::fill(acc.begin(), acc.end(), A(0));
      for (int64_t j = start[v]; j < start[v + 1]; ++j) {
        const T* src = pd + order[j] * dim;
        for (int64_t c = 0; c < dim; ++c) acc[c] += embedding_detail::load(src[c]);
      }
      T* dst = pg + v * dim;
      for (int64_t c = 0; c < dim; ++c) dst[c] = embedding_detail::store<T>(acc[c]);
    }
  }
  return grad;
}

}  // namespace tessera::ops
