// tessera/models/decoder.hpp — the R1 decoder language model, built from a config type:
//
//   ts::Decoder<TinyR1> model{ts::Seed{42}};
//   ts::Decoder<TinyR1>::Saved saved;
//   ts::models::ModelStats st = model.forward(tokens, targets, saved);   // (B, T) ids each
//   model.zero_grad();  model.backward(saved);                          // d(st.loss)/d(every weight)
//   ts::save(model, "tiny_r1.safetensors");
//
// Structure (docs/models.md): token embedding -> `layers` pre-norm blocks (the first
// `dense_layers` with a dense SwiGLU FFN, the rest with the config's Ffn, as DeepSeek keeps its
// first blocks dense; every block with the config's Window) -> final RMSNorm -> LM head
// (its own (vocab, d_model) matrix, or the embedding table itself when tie_embeddings) ->
// next-token cross-entropy.
//
// The loss, and how the auxiliary losses enter it. forward(tokens, targets) returns
//   loss = cross_entropy + aux_loss,
//   cross_entropy = mean over targets != ignore_index (-100) of -log p(target | prefix),
//   aux_loss = sum over blocks of (LearnedSelector's compute penalty + MoE balance loss),
// and backward(saved) computes the gradient of exactly that `loss` (times loss_scale) with
// respect to every parameter: the CE gradient flows down the stack, and each block's backward
// receives aux_grad = loss_scale, so the MoE balance loss contributes its exact gradient and the
// selector its straight-through one (the gradient of the expected cost, penalty * sum_s p_s
// cost_s; the reported penalty is that of the hard choice). The strengths of the two terms are
// set where they live: AuxLossBalanceOf<alpha> in the Ffn spec, `window_penalty` in the config.
// The aux-loss-free BiasBalance adds nothing to the loss; call update_balance(saved) after each
// optimizer step instead.
//
// Activation recompute: the config may name `using Recompute = ts::Selective;` (or
// ts::RecomputeBlock; StoreAll when it names none) to keep less of each block between forward
// and backward (nn/transformer_block.hpp, models/trunk.hpp). Every policy gives bit-identical
// gradients; docs/training.md has what each keeps and its memory and time.
//
// Why the whole (B, T, vocab) logits are kept in Saved: the fused cross-entropy backward needs
// them, and recomputing the head would cost another (B*T) x d_model x vocab product.
//
// Device: Cpu only for now. Decoder<Config, Cuda> stops at compile time with a message that
// says what is missing.
#pragma once

#include <cmath>
#include <concepts>
#include <cstdint>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "tessera/core/device.hpp"
#include "tessera/core/error.hpp"
#include "tessera/core/rng.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/models/config.hpp"
#include "tessera/models/trunk.hpp"
#include "tessera/models/weights.hpp"
#include "tessera/nn/layers.hpp"
#include "tessera/ops/cross_entropy.hpp"
#include "tessera/ops/matmul.hpp"

namespace tessera::models {

// Targets with this value are not predicted (padding): as PyTorch's ignore_index.
inline constexpr int32_t kIgnoreIndex = -100;

// A (B, T + 1) token sequence split into inputs (its first T columns) and next-token targets
// (its last T columns).
struct NextTokenBatch {
  Tensor<int32_t> tokens;   // (B, T)
  Tensor<int32_t> targets;  // (B, T)
};

inline NextTokenBatch next_token_batch(TensorView<const int32_t, Cpu> sequence) {
  TESSERA_CHECK(sequence.rank() == 2 && sequence.dim(1) >= 2,
                "next_token_batch: tensor 'sequence' must be (batch, T + 1) with T >= 1, got "
                "shape ",
                sequence.shape());
  const int64_t T = sequence.dim(1) - 1;
  return {sequence.slice(1, 0, T).contiguous(), sequence.slice(1, 1, T + 1).contiguous()};
}

template <class Config, class Device = Cpu>
class Decoder : public detail::ModelCommon<Decoder<Config, Device>> {
  static_assert(std::same_as<Device, Cpu>,
                "Decoder<Config, Cuda> is not available yet: the decoder runs on Cpu only (the "
                "CUDA attention, MoE dispatch and layer kernels are missing); use "
                "Decoder<Config, Cpu>");
  static_assert(check_decoder_config<Config>());

 public:
  using config_type = Config;
  using Resolved = ResolvedConfig<Config, DecoderDefaultWindow>;
  using T = typename Resolved::Scalar;
  using value_type = T;
  using Window = typename Resolved::Window;
  using Ffn = typename Resolved::Ffn;
  // The activation recompute policy (nn/transformer_block.hpp): the config's `Recompute`, else
  // StoreAll. Gradients are bit-identical under every policy; memory and time are not.
  using Recompute = recompute_t<Config>;
  static_assert(nn::RecomputePolicy<Recompute>,
                "tessera config: Recompute must be a recompute policy: ts::StoreAll, "
                "ts::Selective or ts::RecomputeBlock");
  // (StoreAll stands in for a bad policy so that the message above is the only one.)
  using Trunk = detail::Trunk<
      Resolved, std::conditional_t<nn::RecomputePolicy<Recompute>, Recompute, nn::StoreAll>>;
  using DenseBlock = typename Trunk::DenseBlock;
  using MoEBlock = typename Trunk::MoEBlock;
  using A = ops::row_acc_t<T>;

  struct Saved {
    typename Trunk::Saved trunk;
    Tensor<T> hidden;          // (B, T, C) final-normed hidden states, the head's input
    typename nn::Linear<T>::Saved head;  // untied head only
    Tensor<T> logits;          // (B, T, vocab)
    Tensor<int32_t> targets;   // (B, T); empty when forward ran without targets
    Tensor<A> logsumexp;       // (B * T) per position, 0 where the target is ignored
    bool has_loss = false;
    ModelStats stats;
  };

  static constexpr std::string_view kind() { return "decoder"; }

  explicit Decoder(Seed seed) : trunk_(seed) {
    if constexpr (!Resolved::tie_embeddings) {
      lm_head_.emplace(Resolved::d_model, Resolved::vocab, false, seed, 1,
                       nn::Embedding<T>::kDefaultStddev);
    }
    parameters_ = trunk_.parameter_count() +
                  (Resolved::tie_embeddings ? 0 : Resolved::d_model * Resolved::vocab);
  }

  // tokens (B, T) -> logits (B, T, vocab). Fills saved (no loss; backward needs the overload
  // with targets).
  Tensor<T> forward(TensorView<const int32_t, Cpu> tokens, Saved& saved) const {
    saved.has_loss = false;
    saved.targets = Tensor<int32_t>();
    saved.hidden = trunk_.forward(tokens, saved.trunk, "Decoder::forward");  // (B, T, C)
    Tensor<T> logits = head_forward(saved);                                  // (B, T, V)
    saved.stats = ModelStats{};
    trunk_.fill_stats(saved.trunk, saved.stats, parameter_count());
    return logits;
  }

  // tokens, targets (B, T): targets[b, t] is the token that follows tokens[b, t] (or
  // kIgnoreIndex). Returns the stats, whose `loss` backward(saved) differentiates.
  ModelStats forward(TensorView<const int32_t, Cpu> tokens, TensorView<const int32_t, Cpu> targets,
                     Saved& saved) const {
    check_shape("Decoder::forward", "targets", targets.shape(), tokens.shape());
    saved.logits = forward(tokens, saved);  // (B, T, V)
    saved.targets = targets.contiguous();
    const int64_t rows = saved.targets.numel();
    const auto logits2 = saved.logits.reshape({rows, Resolved::vocab});  // (B*T, V)
    ops::CrossEntropyOptions options;
    options.ignore_index = kIgnoreIndex;
    const ops::CrossEntropyOutput<T> ce = ops::cross_entropy<T>(logits2, saved.targets.reshape({rows}), options);
    TESSERA_CHECK(ce.valid_rows > 0, "Decoder::forward: every target is ignore_index (",
                  kIgnoreIndex, "); there is nothing to predict");
    saved.logsumexp = ce.logsumexp.clone();
    // The loss in double from the saved log-sum-exp (the op's own scalar has T's precision).
    double sum = 0.0;
    const int32_t* tp = saved.targets.data();
    const T* lp = saved.logits.data();
    for (int64_t r = 0; r < rows; ++r) {
      if (tp[r] == kIgnoreIndex) continue;
      sum += static_cast<double>(saved.logsumexp.data()[r]) -
             static_cast<double>(ops::cast_detail::load<A>(lp[r * Resolved::vocab + tp[r]]));
    }
    ModelStats& st = saved.stats;
    st.targets = ce.valid_rows;
    st.cross_entropy = sum / static_cast<double>(ce.valid_rows);
    st.loss = st.cross_entropy + st.aux_loss;
    saved.has_loss = true;
    return st;
  }

  // Accumulates loss_scale * d(stats.loss)/d(parameter) into every parameter's grad (see the
  // file header for the aux losses). `saved` must come from forward(tokens, targets, saved).
  void backward(const Saved& saved, double loss_scale = 1.0) {
    TESSERA_CHECK(saved.has_loss,
                  "Decoder::backward: the saved state has no loss; call forward(tokens, targets, "
                  "saved) first");
    TESSERA_CHECK(std::isfinite(loss_scale), "Decoder::backward: loss_scale = ", loss_scale,
                  " must be finite");
    const int64_t rows = saved.targets.numel();
    ops::CrossEntropyOptions options;
    options.ignore_index = kIgnoreIndex;
    const Tensor<T> dloss = Tensor<T>::full(Shape{}, ops::cast_detail::store<T>(loss_scale));
    const Tensor<T> dlogits = ops::cross_entropy_backward<T>(
        dloss, saved.logits.reshape({rows, Resolved::vocab}), saved.targets.reshape({rows}),
        saved.logsumexp, options);  // (B*T, V)
    const Shape hshape = saved.hidden.shape();
    const auto dlogits3 = dlogits.reshape({hshape[0], hshape[1], Resolved::vocab});  // (B, T, V)
    Tensor<T> dhidden;  // (B, T, C)
    if constexpr (Resolved::tie_embeddings) {
      nn::Parameter<T>& table = trunk_.embedding().weight;
      ops::LinearGrads<T> g = ops::linear_backward<T>(dlogits3, saved.hidden, table.value, false);
      nn::detail::accumulate(table.grad, g.dweight, "embed.weight.grad (tied LM head)");
      dhidden = std::move(g.dx);
    } else {
      dhidden = lm_head_->backward(dlogits3, saved.head);
    }
    trunk_.backward(dhidden, saved.trunk, loss_scale);
  }

  // Every parameter, in a fixed order, with its dotted name: "embed.weight",
  // "layers.<l>.norm1.weight", "layers.<l>.attn.wq" ... "layers.<l>.ffn.experts.<e>.w_up" ...,
  // "norm.weight", and "lm_head.weight" unless the head is tied to the embedding.
  template <class F>
  void visit_parameters(F&& f) {
    trunk_.visit_parameters(f);
    if constexpr (!Resolved::tie_embeddings) {
      lm_head_->visit_parameters([&](std::string_view name, nn::Parameter<T>& p) {
        f(std::string_view("lm_head." + std::string(name)), p);
      });
    }
  }

  // Every parameter element, the tied table counted once.
  int64_t parameter_count() const { return parameters_; }

  std::map<std::string, std::string> metadata() const {
    return {{"tessera.model", std::string(kind())}, {"tessera.config", config_summary()}};
  }

  // The LM head's (vocab, d_model) matrix: the embedding table itself when tied.
  nn::Parameter<T>& lm_head_weight() {
    if constexpr (Resolved::tie_embeddings) {
      return trunk_.embedding().weight;
    } else {
      return lm_head_->weight;
    }
  }

 private:
  Tensor<T> head_forward(Saved& saved) const {
    if constexpr (Resolved::tie_embeddings) {
      return ops::linear<T>(saved.hidden, trunk_.embedding().weight.value);  // (B, T, V)
    } else {
      return lm_head_->forward(saved.hidden, saved.head);  // (B, T, V)
    }
  }

  static std::string config_summary() {
    std::string s = "vocab=" + std::to_string(Resolved::vocab) +
                    " d_model=" + std::to_string(Resolved::d_model) +
                    " layers=" + std::to_string(Resolved::layers) +
                    " heads=" + std::to_string(Resolved::heads) +
                    " kv_heads=" + std::to_string(Resolved::kv_heads) +
                    " ffn_hidden=" + std::to_string(Resolved::ffn_hidden) +
                    " dense_layers=" + std::to_string(Resolved::dense_layers) +
                    " max_seq=" + std::to_string(Resolved::max_seq) +
                    " tie_embeddings=" + (Resolved::tie_embeddings ? "true" : "false") +
                    " window=" + Trunk::window_names();
    if constexpr (Resolved::kMoE)
      s += " experts=" + std::to_string(Resolved::experts) +
           " top_k=" + std::to_string(Resolved::top_k) +
           " shared_experts=" + std::to_string(Resolved::shared_experts) +
           " moe_hidden=" + std::to_string(Resolved::moe_hidden);
    return s;
  }

  friend class detail::ModelCommon<Decoder>;  // visit_buffers, update_balance, ...
  Trunk trunk_;
  std::optional<nn::Linear<T>> lm_head_;  // absent when tied
  int64_t parameters_ = 0;
};

}  // namespace tessera::models

namespace tessera {
using models::Decoder;
}  // namespace tessera
