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
// Padding: documents of different lengths share a batch by right padding. The overloads that
// take `lengths` (one per sequence) treat tokens [lengths[b], T) of sequence b as padding: no
// attention layer reads them as keys (Attention::forward with key_lengths) and the pooling
// averages the real positions only, so each document's logits, loss share and gradients are
// what it gives alone (tests/models/test_encoder_padding.cpp). The padded positions' token ids
// must still be valid ids (any, e.g. 0); their states are computed and ignored. With an MoE FFN
// the padded tokens are routed too, and count in its load, capacity and balance loss.
// Without `lengths` every position is a real token.
//
// Loss: mean cross-entropy over the labels that are not kIgnoreIndex, plus the blocks'
// auxiliary losses (as in the decoder: see decoder.hpp); backward differentiates exactly that.
#pragma once

#include <cmath>
#include <concepts>
#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

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
class Encoder : public detail::ModelCommon<Encoder<Config, Device>> {
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
    std::vector<int64_t> lengths;        // (B) real tokens per sequence; empty: all T
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
    saved.lengths.clear();
    saved.hidden = trunk_.forward(tokens, saved.trunk, "Encoder::forward");  // (B, T, C)
    return pool_and_classify(saved);
  }

  // The same for a right-padded batch: sequence b's real tokens are [0, lengths[b]) (see the
  // file header).
  Tensor<T> forward(TensorView<const int32_t, Cpu> tokens, std::span<const int64_t> lengths,
                    Saved& saved) const {
    TESSERA_CHECK(tokens.rank() == 2 && static_cast<int64_t>(lengths.size()) == tokens.dim(0),
                  "Encoder::forward: 'lengths' holds ", lengths.size(),
                  " lengths, expected one per sequence of 'tokens' (shape ", tokens.shape(), ")");
    saved.lengths.assign(lengths.begin(), lengths.end());
    saved.hidden = trunk_.forward(tokens, saved.trunk, "Encoder::forward", lengths);  // (B, T, C)
    return pool_and_classify(saved);
  }

  // A right-padded batch with labels (B).
  ModelStats forward(TensorView<const int32_t, Cpu> tokens, std::span<const int64_t> lengths,
                     TensorView<const int32_t, Cpu> labels, Saved& saved) const {
    return with_loss(tokens, labels, saved, forward(tokens, lengths, saved));
  }

 private:
  // Mean over each sequence's real positions (all T without lengths), then the head.
  Tensor<T> pool_and_classify(Saved& saved) const {
    saved.has_loss = false;
    saved.labels = Tensor<int32_t>();
    const int64_t B = saved.hidden.dim(0), S = saved.hidden.dim(1), C = Resolved::d_model;
    saved.pooled = Tensor<T>::empty(Shape{B, C});  // (B, C)
    const T* h = saved.hidden.data();
    for (int64_t b = 0; b < B; ++b) {
      const int64_t n = real_tokens(saved, b, S);
      for (int64_t c = 0; c < C; ++c) {
        A s = 0;
        for (int64_t t = 0; t < n; ++t) s += ops::cast_detail::load<A>(h[(b * S + t) * C + c]);
        saved.pooled.data()[b * C + c] = ops::cast_detail::store<T>(s / static_cast<A>(n));
      }
    }
    Tensor<T> logits = head_.forward(saved.pooled, saved.head);  // (B, classes)
    saved.stats = ModelStats{};
    trunk_.fill_stats(saved.trunk, saved.stats, parameters_);
    return logits;
  }

  static int64_t real_tokens(const Saved& saved, int64_t b, int64_t S) {
    return saved.lengths.empty() ? S : saved.lengths[size_t(b)];
  }

  ModelStats with_loss(TensorView<const int32_t, Cpu> tokens, TensorView<const int32_t, Cpu> labels,
                       Saved& saved, Tensor<T> logits) const {
    check_shape("Encoder::forward", "labels", labels.shape(), Shape{tokens.dim(0)});
    saved.logits = std::move(logits);  // (B, classes)
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

 public:
  // tokens (B, T), labels (B) in [0, classes) or kIgnoreIndex. Returns the stats, whose `loss`
  // backward(saved) differentiates.
  ModelStats forward(TensorView<const int32_t, Cpu> tokens, TensorView<const int32_t, Cpu> labels,
                     Saved& saved) const {
    TESSERA_CHECK(tokens.rank() == 2, "Encoder::forward: tensor 'tokens' must be (batch, seq), got shape ",
                  tokens.shape());
    check_shape("Encoder::forward", "labels", labels.shape(), Shape{tokens.dim(0)});
    return with_loss(tokens, labels, saved, forward(tokens, saved));
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
    Tensor<T> dhidden = Tensor<T>::zeros(saved.hidden.shape());  // (B, T, C); 0 at padding
    for (int64_t b = 0; b < B; ++b) {
      const int64_t n = real_tokens(saved, b, S);
      for (int64_t c = 0; c < C; ++c) {
        const T v = ops::cast_detail::store<T>(ops::cast_detail::load<A>(dpooled.data()[b * C + c]) /
                                               static_cast<A>(n));
        for (int64_t t = 0; t < n; ++t) dhidden.data()[(b * S + t) * C + c] = v;
      }
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

  int64_t parameter_count() const { return parameters_; }

  std::map<std::string, std::string> metadata() const {
    return {{"tessera.model", std::string(kind())},
            {"tessera.config",
             "vocab=" + std::to_string(Resolved::vocab) + " d_model=" +
                 std::to_string(Resolved::d_model) + " layers=" + std::to_string(Resolved::layers) +
                 " heads=" + std::to_string(Resolved::heads) + " kv_heads=" +
                 std::to_string(Resolved::kv_heads) + " classes=" +
                 std::to_string(Resolved::classes) + " window=" + Trunk::window_names()}};
  }

  nn::Linear<T>& head() { return head_; }

 private:
  friend class detail::ModelCommon<Encoder>;  // visit_buffers, update_balance, ...
  Trunk trunk_;
  nn::Linear<T> head_;  // (classes, d_model) + bias
  int64_t parameters_ = 0;
};

}  // namespace tessera::models

namespace tessera {
using models::Encoder;
}  // namespace tessera
