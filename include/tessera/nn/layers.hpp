// tessera/nn/layers.hpp — the thin layers a model is assembled from: Embedding, RMSNorm and
// Linear (bias optional), each a forward/backward pair over one op of tessera/ops.
//
// Why layers on top of the ops: an op is a pure function (inputs -> outputs, gradients ->
// gradients); a layer owns its parameters and their gradients (nn::Parameter), keeps what its
// backward needs in an explicit `Saved` struct, and hands its parameters out by name through
// visit_parameters(f), which is all that optimizers, checkpoints and safetensors need. The
// Saved struct is a plain value the caller owns, so one layer can run several forwards before
// their backwards (micro-batches, recompute) and a layer object stays const during forward.
//
// Conventions shared with nn::Attention, nn::SwiGluFfn and nn::MoELayer:
//   forward(x, Saved&) -> y              fills Saved; the layer itself is not modified
//   backward(dy, const Saved&) -> dx     ACCUMULATES into every parameter's grad
//   visit_parameters(f)                  f(std::string_view name, Parameter<T>&), fixed order
// Initialisation draws from the counter-based RNG stream (seed, subsequence), so the same seed
// gives the same weights on any machine and thread count.
//
// Shapes: x (..., features); ids int32 of any shape (rank <= 5).
#pragma once

#include <cmath>
#include <cstdint>
#include <optional>
#include <string_view>

#include "tessera/core/error.hpp"
#include "tessera/core/rng.hpp"
#include "tessera/core/shape.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/nn/feed_forward.hpp"  // detail::init_normal, detail::accumulate, make_parameter
#include "tessera/nn/parameter.hpp"
#include "tessera/ops/detail/rows.hpp"
#include "tessera/ops/embedding.hpp"
#include "tessera/ops/matmul.hpp"
#include "tessera/ops/norm.hpp"

namespace tessera::nn {

// Token embedding: a (vocab, dim) table whose rows are looked up by id.
//
// Initialised N(0, stddev^2); the default 0.02 is the `initializer_range` of the Llama /
// DeepSeek configurations. A small table keeps the initial logits of a tied LM head small, so
// a fresh model's loss starts at about ln(vocab).
template <class T>
class Embedding {
 public:
  struct Saved {
    Tensor<int32_t> ids;  // the ids looked up (any shape); backward scatters into their rows
  };

  static constexpr double kDefaultStddev = 0.02;

  Embedding(int64_t vocab, int64_t dim, Seed seed, uint64_t subsequence,
            double stddev = kDefaultStddev) {
    TESSERA_CHECK(vocab >= 1 && dim >= 1, "Embedding: vocab = ", vocab, " and dim = ", dim,
                  " must both be >= 1");
    TESSERA_CHECK(stddev >= 0.0 && std::isfinite(stddev), "Embedding: stddev = ", stddev,
                  " must be finite and >= 0");
    weight = detail::make_parameter<T>(Shape{vocab, dim});
    detail::init_normal(weight.value, seed, subsequence, 0, stddev);
  }

  int64_t vocab() const { return weight.value.dim(0); }
  int64_t dim() const { return weight.value.dim(1); }

  // ids (...) -> (..., dim). Throws when an id is outside [0, vocab), naming its position.
  Tensor<T> forward(TensorView<const int32_t, Cpu> ids, Saved& saved) const {
    saved.ids = ids.contiguous();
    return ops::embedding<T>(weight.value, saved.ids);  // (..., dim)
  }

  // dy (..., dim): scatter-adds each token's row into weight.grad (ids have no gradient).
  void backward(TensorView<const T, Cpu> dy, const Saved& saved) {
    const Tensor<T> g = ops::embedding_backward<T>(dy, saved.ids, vocab());  // (vocab, dim)
    detail::accumulate(weight.grad, g, "Embedding weight.grad");
  }

  template <class F>
  void visit_parameters(F&& f) {
    f(std::string_view("weight"), weight);
  }

  Parameter<T> weight;  // (vocab, dim)
};

// RMSNorm over the last axis with a learned gain (initialised to ones, so a fresh layer only
// normalises): y = x / sqrt(mean(x^2) + eps) * weight.
template <class T>
class RMSNorm {
 public:
  struct Saved {
    Tensor<T> x;                      // (..., dim) the input
    Tensor<ops::row_acc_t<T>> rstd;   // (rows) 1 / sqrt(mean(x^2) + eps) per row
  };

  explicit RMSNorm(int64_t dim, double eps = 1e-6) : eps_(eps) {
    TESSERA_CHECK(dim >= 1, "RMSNorm: dim = ", dim, " must be >= 1");
    TESSERA_CHECK(eps >= 0.0 && std::isfinite(eps), "RMSNorm: eps = ", eps,
                  " must be finite and >= 0");
    weight = detail::make_parameter<T>(Shape{dim});
    for (int64_t i = 0; i < dim; ++i) weight.value.data()[i] = ops::cast_detail::store<T>(1.0f);
  }

  int64_t dim() const { return weight.value.dim(0); }
  double eps() const { return eps_; }

  // x (..., dim) -> y (..., dim)
  Tensor<T> forward(TensorView<const T, Cpu> x, Saved& saved) const {
    saved.x = x.contiguous();
    ops::RmsNormOutput<T> out = ops::rms_norm<T>(saved.x, weight.value, eps_);
    saved.rstd = std::move(out.rstd);
    return std::move(out.y);
  }

  // dy (..., dim) -> dx (..., dim); accumulates into weight.grad.
  Tensor<T> backward(TensorView<const T, Cpu> dy, const Saved& saved) {
    ops::RmsNormGrads<T> g = ops::rms_norm_backward<T>(dy, saved.x, weight.value, saved.rstd);
    detail::accumulate(weight.grad, g.dweight, "RMSNorm weight.grad");
    return std::move(g.dx);
  }

  template <class F>
  void visit_parameters(F&& f) {
    f(std::string_view("weight"), weight);
  }

  Parameter<T> weight;  // (dim)

 private:
  double eps_;
};

// Fully connected layer y = x weight^T (+ bias), weight stored (out, in) as nn.Linear does.
// Weight initialised N(0, stddev^2), by default stddev = 1 / sqrt(in) (the output then has
// about the input's scale); bias zeros.
template <class T>
class Linear {
 public:
  struct Saved {
    Tensor<T> x;  // (..., in) the input
  };

  Linear(int64_t in, int64_t out, bool bias, Seed seed, uint64_t subsequence,
         std::optional<double> stddev = std::nullopt)
      : has_bias_(bias) {
    TESSERA_CHECK(in >= 1 && out >= 1, "Linear: in = ", in, " and out = ", out,
                  " must both be >= 1");
    const double s = stddev.value_or(1.0 / std::sqrt(static_cast<double>(in)));
    TESSERA_CHECK(s >= 0.0 && std::isfinite(s), "Linear: stddev = ", s, " must be finite and >= 0");
    weight = detail::make_parameter<T>(Shape{out, in});
    detail::init_normal(weight.value, seed, subsequence, 0, s);
    if (bias) this->bias = detail::make_parameter<T>(Shape{out});
  }

  int64_t in_features() const { return weight.value.dim(1); }
  int64_t out_features() const { return weight.value.dim(0); }
  bool has_bias() const { return has_bias_; }

  // x (..., in) -> y (..., out)
  Tensor<T> forward(TensorView<const T, Cpu> x, Saved& saved) const {
    saved.x = x.contiguous();
    if (has_bias_) return ops::linear<T>(saved.x, weight.value, bias.value.view());
    return ops::linear<T>(saved.x, weight.value);
  }

  // dy (..., out) -> dx (..., in); accumulates into weight.grad (and bias.grad).
  Tensor<T> backward(TensorView<const T, Cpu> dy, const Saved& saved) {
    ops::LinearGrads<T> g = ops::linear_backward<T>(dy, saved.x, weight.value, has_bias_);
    detail::accumulate(weight.grad, g.dweight, "Linear weight.grad");
    if (has_bias_) detail::accumulate(bias.grad, g.dbias, "Linear bias.grad");
    return std::move(g.dx);
  }

  // "weight", then "bias" when the layer has one.
  template <class F>
  void visit_parameters(F&& f) {
    f(std::string_view("weight"), weight);
    if (has_bias_) f(std::string_view("bias"), bias);
  }

  Parameter<T> weight;  // (out, in)
  Parameter<T> bias;    // (out); empty when the layer has no bias

 private:
  bool has_bias_;
};

}  // namespace tessera::nn
