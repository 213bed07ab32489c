// tessera/nn/feed_forward.hpp — the dense SwiGLU feed-forward layer (SwiGluFfn) and its spec
// tag DenseFfn.
//
// Why SwiGLU: it is the FFN of the DeepSeek / Llama stacks, y = W_down (silu(W_gate x) * W_up x).
// It is also the expert of the mixture-of-experts layer (tessera/nn/moe.hpp), which runs one
// SwiGluFfn per expert on the rows routed to it, so this class is written to be cheap on a
// handful of gathered rows as much as on a whole batch.
//
// How it is built:
//   * Three separate projections without bias, stored as nn.Linear stores them (out, in):
//     w_gate (hidden, d_model), w_up (hidden, d_model), w_down (d_model, hidden). Checkpoints of
//     DeepSeek / Llama name them gate_proj, up_proj, down_proj; we use w_gate, w_up, w_down.
//   * Every product is ops::linear, so the matrix-product back end (OpenBLAS, oneDNN, ...) is
//     the one the ops layer chooses; the non-linearity is ops::swiglu. The products go through
//     recipe_linear (quant/fp8_training.hpp), which is ops::linear unless a trainer installed
//     an FP8 recipe's products.
//   * Saved keeps the layer's input and the three hidden activations (gate, up and their SwiGLU
//     product); a recompute policy may drop gate/up/act and rebuild them from x with
//     `recompute(saved)`.
//   * Initialisation: N(0, 1/fan_in) for each matrix (std = 1/sqrt(in)), all three drawn from
//     one RNG stream (seed, subsequence) laid end to end from `first_index`: w_gate, then w_up,
//     then w_down. `parameter_count()` says how many stream elements a layer uses, so an owner
//     of many layers (the MoE experts) can place them one after another on a single stream.
#pragma once

#include <cmath>
#include <cstdint>
#include <string_view>
#include <type_traits>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/core/number.hpp"
#include "tessera/core/rng.hpp"
#include "tessera/core/shape.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/nn/parameter.hpp"
#include "tessera/ops/activation.hpp"
#include "tessera/ops/cast.hpp"
#include "tessera/ops/matmul.hpp"
#include "tessera/quant/fp8_training.hpp"

namespace tessera::nn {

namespace detail {

// Fills `t` with N(0, stddev) from element `first_index` on of stream (seed, subsequence).
// float and double are drawn directly; other types draw float and round once, so a bf16 layer
// holds the rounded float layer's weights.
template <class T>
void init_normal(Tensor<T>& t, Seed seed, uint64_t subsequence, int64_t first_index,
                 double stddev) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    fill_normal<T>(t.data(), t.numel(), seed, subsequence, T(0), static_cast<T>(stddev),
                   first_index);
  } else {
    std::vector<float> buf(static_cast<size_t>(t.numel()));
    fill_normal<float>(buf.data(), t.numel(), seed, subsequence, 0.0f,
                       static_cast<float>(stddev), first_index);
    for (int64_t i = 0; i < t.numel(); ++i) t.data()[i] = from_float<T>(buf[static_cast<size_t>(i)]);
  }
}

// into += g, element by element (same shape), in the arithmetic type of T.
template <class T>
void accumulate(Tensor<T>& into, std::type_identity_t<TensorView<const T, Cpu>> g, const char* what) {
  using A = ops::cast_detail::acc_t<T>;
  check_shape("accumulate", what, g.shape(), into.shape());
  // A weight gradient is nearly always contiguous already; copying it first would add a full
  // read and write of the tensor to every backward (block_bench's profile saw it).
  Tensor<T> gc;
  const T* q = g.data();
  if (!g.is_contiguous()) {
    gc = g.contiguous();
    q = gc.data();
  }
  T* p = into.data();
  for (int64_t i = 0; i < into.numel(); ++i)
    p[i] = ops::cast_detail::store<T>(ops::cast_detail::load<A>(p[i]) +
                                      ops::cast_detail::load<A>(q[i]));
}

template <class T>
Parameter<T> make_parameter(Shape shape) {
  return Parameter<T>{Tensor<T>::zeros(shape), Tensor<T>::zeros(shape)};
}

}  // namespace detail

// SwiGLU feed-forward: y = w_down (silu(w_gate x) * (w_up x)), no bias.
template <class T>
class SwiGluFfn {
 public:
  // What backward needs. gate/up/act may be dropped by a recompute policy and rebuilt with
  // recompute(); x may not.
  struct Saved {
    Tensor<T> x;     // (rows, d_model) the input, flattened to rows
    Tensor<T> gate;  // (rows, hidden)  w_gate x
    Tensor<T> up;    // (rows, hidden)  w_up x
    Tensor<T> act;   // (rows, hidden)  silu(gate) * up
    Shape x_shape;   // the input's original shape (..., d_model)
  };

  // Stream elements a layer of these sizes draws (three matrices laid end to end).
  static constexpr int64_t parameter_count(int64_t d_model, int64_t hidden) {
    return 3 * d_model * hidden;
  }

  SwiGluFfn(int64_t d_model, int64_t hidden, Seed seed, uint64_t subsequence,
            int64_t first_index = 0)
      : d_model_(d_model), hidden_(hidden) {
    TESSERA_CHECK(d_model >= 1 && hidden >= 1, "SwiGluFfn: d_model = ", d_model,
                  " and hidden = ", hidden, " must both be >= 1");
    w_gate = detail::make_parameter<T>(Shape{hidden, d_model});
    w_up = detail::make_parameter<T>(Shape{hidden, d_model});
    w_down = detail::make_parameter<T>(Shape{d_model, hidden});
    const int64_t block = d_model * hidden;
    detail::init_normal(w_gate.value, seed, subsequence, first_index, 1.0 / std::sqrt(double(d_model)));
    detail::init_normal(w_up.value, seed, subsequence, first_index + block,
                        1.0 / std::sqrt(double(d_model)));
    detail::init_normal(w_down.value, seed, subsequence, first_index + 2 * block,
                        1.0 / std::sqrt(double(hidden)));
  }

  int64_t d_model() const { return d_model_; }
  int64_t hidden() const { return hidden_; }

  // x (..., d_model) -> y (..., d_model)
  Tensor<T> forward(TensorView<const T, Cpu> x, Saved& saved) const {
    TESSERA_CHECK(x.rank() >= 1 && x.dim(-1) == d_model_, "SwiGluFfn::forward: tensor 'x' has shape ",
                  x.shape(), "; expected (..., ", d_model_, ")");
    saved.x_shape = x.shape();
    const int64_t rows = x.numel() / d_model_;
    saved.x = x.contiguous();
    saved.x = Tensor<T>::from(Shape{rows, d_model_}, saved.x.span());  // (rows, d_model)
    recompute(saved);
    Tensor<T> y = recipe_linear<T>(saved.act, w_down.value);  // (rows, d_model)
    return Tensor<T>::from(x.shape(), y.span());              // (..., d_model)
  }

  // Rebuilds gate, up and act from saved.x (what a recompute policy calls after dropping them).
  void recompute(Saved& saved) const {
    saved.gate = recipe_linear<T>(saved.x, w_gate.value);  // (rows, hidden)
    saved.up = recipe_linear<T>(saved.x, w_up.value);      // (rows, hidden)
    saved.act = ops::swiglu<T>(saved.gate, saved.up);      // (rows, hidden)
  }

  // dy (..., d_model) -> dx (..., d_model); accumulates into every parameter's grad.
  Tensor<T> backward(TensorView<const T, Cpu> dy, const Saved& saved) {
    check_shape("SwiGluFfn::backward", "dy", dy.shape(), saved.x_shape);
    TESSERA_CHECK(saved.act.numel() == saved.x.numel() / d_model_ * hidden_,
                  "SwiGluFfn::backward: saved state lacks the activations; call recompute() first");
    const int64_t rows = saved.x.dim(0);
    const Tensor<T> dyc = dy.contiguous();
    const TensorView<const T, Cpu> dy2(dyc.data(), Shape{rows, d_model_});  // (rows, d_model)
    auto g_down = recipe_linear_backward<T>(dy2, saved.act, w_down.value);
    detail::accumulate(w_down.grad, g_down.dweight, "w_down.grad");
    auto g_act = ops::swiglu_backward<T>(g_down.dx, saved.gate, saved.up);  // (rows, hidden) x2
    auto g_gate = recipe_linear_backward<T>(g_act.dgate, saved.x, w_gate.value);
    auto g_up = recipe_linear_backward<T>(g_act.dup, saved.x, w_up.value);
    detail::accumulate(w_gate.grad, g_gate.dweight, "w_gate.grad");
    detail::accumulate(w_up.grad, g_up.dweight, "w_up.grad");
    detail::accumulate(g_gate.dx, g_up.dx, "dx");  // (rows, d_model)
    return Tensor<T>::from(saved.x_shape, g_gate.dx.span());
  }

  template <class F>
  void visit_parameters(F&& f) {
    f(std::string_view("w_gate"), w_gate);
    f(std::string_view("w_up"), w_up);
    f(std::string_view("w_down"), w_down);
  }

  Parameter<T> w_gate;  // (hidden, d_model)
  Parameter<T> w_up;    // (hidden, d_model)
  Parameter<T> w_down;  // (d_model, hidden)

 private:
  int64_t d_model_;
  int64_t hidden_;
};

// The dense FFN as a spec tag, next to nn::MoE<...> (tessera/nn/moe.hpp): a config names one of
// them as its `Ffn`, and the decoder builds `typename Config::Ffn::template Layer<T>` with
// (d_model, hidden, seed, subsequence).
struct DenseFfn {
  template <class T>
  using Layer = SwiGluFfn<T>;
};

}  // namespace tessera::nn
