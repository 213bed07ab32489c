// tessera/models/encoder.hpp — a BERT-like encoder with a pooled classification head, built
// from a config type (used by the data-quality filter to score documents):
//
//   struct Quality { static constexpr int vocab = 256, d_model = 64, layers = 2, heads = 4,
//                    max_seq = 512, classes = 2; };        // Window defaults to Bidirectional
//   ts::Encoder<Quality> clf{ts::Seed{7}};
//   ts::Encoder<Quality>::Saved saved;
//   auto st = clf.forward(tokens /*(B, T)*/, labels /*(B)*/, saved);   // st.loss
//   clf.backward(saved);
//
// Structure: token embedding -> `layers` pre-norm blocks (window from the config, by default
// Bidirectional: every token reads every other) -> final RMSNorm -> mean over the T positions
// -> a Linear head with bias, (classes, d_model) -> cross-entropy against one label per
// sequence. The trunk (embedding, blocks, final norm, stats, weight names) is the decoder's
// (models/trunk.hpp).
//
// Why mean pooling and not a [CLS] token: a byte- or BPE-level input has no reserved class
// token, and the mean of the final states is what sentence encoders such as MiniLM use for
// classification and similarity.
//
// Padding: every sequence of a batch has the same length T and every position is pooled. The
// attention layer has no key mask yet, so padding tokens would change what real tokens read;
// batch documents of one length (or one at a time) instead of padding them.
//
// Loss: mean cross-entropy over the labels that are not kIgnoreIndex, plus the blocks'
// auxiliary losses (as in the decoder: see decoder.hpp); backward differentiates exactly that.
#pragma once

#include <cmath>
#include <concepts>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>

#include "tessera/core/device.hpp"
#include "tessera/core/error.hpp"
#include "tessera/core/rng.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/models/config.hpp"
#include "tessera/models/decoder.hpp"  // kIgnoreIndex
#include "tessera/models/trunk.hpp"
#include "tessera/models/weights.hpp"
#include "tessera/nn/layers.hpp"
#include "tessera/ops/cast.hpp"
#include "tessera/ops/cross_entropy.hpp"

namespace tessera::models {

template <class Config, class Device = Cpu>
class Encoder {
  static_assert(std::same_as<Device, Cpu>,
                "Encoder<Config, Cuda> is not available yet: the encoder runs on Cpu only (the "
                "CUDA attention, MoE dispatch and layer kernels are missing); use "
                "Encoder<Config, Cpu>");
  static_assert(check_encoder_config<Config>());

 public:
  using config_type = Config;
  using Resolved = ResolvedConfig<Config, EncoderDefaultWindow>;
  using T = typename Resolved::Scalar;
  using value_type = T;
  using Window = typename Resolved::Window;
  using Ffn = typename Resolved::Ffn;
  using Trunk = detail::Trunk<Resolved>;
  using DenseBlock = typename Trunk::DenseBlock;
  using MoEBlock = typename Trunk::MoEBlock;
  using A = ops::row_acc_t<T>;

  struct Saved {
    typename Trunk::Saved trunk;
    Tensor<T> hidden;                    // (B, T, C) final-normed hidden states
    Tensor<T> pooled;                    // (B, C) their mean over T
    typename nn::Linear<T>::Saved head;
    Tensor<T> logits;                    // (B, classes)
    Tensor<int32_t> labels;              // (B); empty when forward ran without labels
    Tensor<A> logsumexp;                 // (B)
    bool has_loss = false;
    ModelStats stats;
  };

  static constexpr std::string_view kind() { return "encoder"; }

  explicit Encoder(Seed seed)
      : trunk_(seed), head_(Resolved::d_model, Resolved::classes, true, seed, 1) {
    parameters_ = trunk_.parameter_count() + Resolved::classes * (Resolved::d_model + 1);
  }

  // tokens (B, T) -> class logits (B, classes).
  Tensor<T> forward(TensorView<const int32_t, Cpu> tokens, Saved& saved) const {
    saved.has_loss = false;
    saved.labels = Tensor<int32_t>();
    saved.hidden = trunk_.forward(tokens, saved.trunk, "Encoder::forward");  // (B, T, C)
    const int64_t B = saved.hidden.dim(0), S = saved.hidden.dim(1), C = Resolved::d_model;
    saved.pooled = Tensor<T>::empty(Shape{B, C});  // (B, C)
    const T* h = saved.hidden.data();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c = 0; c < C; ++c) {
        A s = 0;
        for (int64_t t = 0; t < S; ++t) s += ops::cast_detail::load<A>(h[(b * S + t) * C + c]);
        saved.pooled.data()[b * C + c] = ops::cast_detail::store<T>(s / static_cast<A>(S));
      }
    Tensor<T> logits = head_.forward(saved.pooled, saved.head);  // (B, classes)
    saved.stats = ModelStats{};
    trunk_.fill_stats(saved.trunk, saved.stats, parameters_);
    return logits;
  }

  // tokens (B, T), labels (B) in [0, classes) or kIgnoreIndex. Returns the stats, whose `loss`
  // backward(saved) differentiates.
  ModelStats forward(TensorView<const int32_t, Cpu> tokens, TensorView<const int32_t, Cpu> labels,
                     Saved& saved) const {
    TESSERA_CHECK(tokens.rank() == 2, "Encoder::forward: tensor 'tokens' must be (batch, seq), got shape ",
                  tokens.shape());
    check_shape("Encoder::forward", "labels", labels.shape(), Shape{tokens.dim(0)});
    saved.logits = forward(tokens, saved);  // (B, classes)
    saved.labels = labels.contiguous();
    ops::CrossEntropyOptions options;
    options.ignore_index = kIgnoreIndex;
    const ops::CrossEntropyOutput<T> ce = ops::cross_entropy<T>(saved.logits, saved.labels, options);
    TESSERA_CHECK(ce.valid_rows > 0, "Encoder::forward: every label is ignore_index (",
                  kIgnoreIndex, "); there is nothing to classify");
    saved.logsumexp = ce.logsumexp.clone();
    double sum = 0.0;
    for (int64_t b = 0; b < saved.labels.numel(); ++b) {
      const int32_t y = saved.labels.data()[b];
      if (y == kIgnoreIndex) continue;
      sum += static_cast<double>(saved.logsumexp.data()[b]) -
             static_cast<double>(
                 ops::cast_detail::load<A>(saved.logits.data()[b * Resolved::classes + y]));
    }
    ModelStats& st = saved.stats;
    st.targets = ce.valid_rows;
    st.cross_entropy = sum / static_cast<double>(ce.valid_rows);
    st.loss = st.cross_entropy + st.aux_loss;
    saved.has_loss = true;
    return st;
  }

  // Accumulates loss_scale * d(stats.loss)/d(parameter) into every parameter's grad.
  void backward(const Saved& saved, double loss_scale = 1.0) {
    TESSERA_CHECK(saved.has_loss,
                  "Encoder::backward: the saved state has no loss; call forward(tokens, labels, "
                  "saved) first");
    TESSERA_CHECK(std::isfinite(loss_scale), "Encoder::backward: loss_scale = ", loss_scale,
                  " must be finite");
    ops::CrossEntropyOptions options;
    options.ignore_index = kIgnoreIndex;
    const Tensor<T> dloss = Tensor<T>::full(Shape{}, ops::cast_detail::store<T>(loss_scale));
    const Tensor<T> dlogits = ops::cross_entropy_backward<T>(dloss, saved.logits, saved.labels,
                                                             saved.logsumexp, options);  // (B, K)
    const Tensor<T> dpooled = head_.backward(dlogits, saved.head);                       // (B, C)
    const int64_t B = saved.hidden.dim(0), S = saved.hidden.dim(1), C = Resolved::d_model;
    Tensor<T> dhidden = Tensor<T>::empty(saved.hidden.shape());  // (B, T, C)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c = 0; c < C; ++c) {
        const T v = ops::cast_detail::store<T>(ops::cast_detail::load<A>(dpooled.data()[b * C + c]) /
                                               static_cast<A>(S));
        for (int64_t t = 0; t < S; ++t) dhidden.data()[(b * S + t) * C + c] = v;
      }
    trunk_.backward(dhidden, saved.trunk, loss_scale);
  }

  // "embed.weight", "layers.<l>...", "norm.weight", "head.weight", "head.bias".
  template <class F>
  void visit_parameters(F&& f) {
    trunk_.visit_parameters(f);
    head_.visit_parameters([&](std::string_view name, nn::Parameter<T>& p) {
      f(std::string_view("head." + std::string(name)), p);
    });
  }

  template <class F>
  void visit_buffers(F&& f) {
    trunk_.visit_buffers(f);
  }

  template <class F>
  void visit_weights(F&& f) {
    visit_parameters([&](std::string_view name, nn::Parameter<T>& p) { f(name, p.value); });
    visit_buffers(f);
  }

  void zero_grad() {
    visit_parameters([](std::string_view, nn::Parameter<T>& p) { p.zero_grad(); });
  }

  void update_balance(const Saved& saved) { trunk_.update_balance(saved.trunk); }

  int64_t parameter_count() const { return parameters_; }

  std::map<std::string, std::string> metadata() const {
    return {{"tessera.model", std::string(kind())},
            {"tessera.config",
             "vocab=" + std::to_string(Resolved::vocab) + " d_model=" +
                 std::to_string(Resolved::d_model) + " layers=" + std::to_string(Resolved::layers) +
                 " heads=" + std::to_string(Resolved::heads) + " kv_heads=" +
                 std::to_string(Resolved::kv_heads) + " classes=" +
                 std::to_string(Resolved::classes) + " window=" + std::string(Window::kName)}};
  }

  template <class F>
  void for_each_block(F&& f) {
    trunk_.for_each_block(f);
  }
  nn::Embedding<T>& embedding() { return trunk_.embedding(); }
  nn::RMSNorm<T>& final_norm() { return trunk_.norm(); }
  nn::Linear<T>& head() { return head_; }

 private:
  Trunk trunk_;
  nn::Linear<T> head_;  // (classes, d_model) + bias
  int64_t parameters_ = 0;
};

}  // namespace tessera::models

namespace tessera {
using models::Encoder;
}  // namespace tessera
