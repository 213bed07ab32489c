// tessera/models/trunk.hpp — what a decoder and an encoder share: token embedding, the stack
// of transformer blocks, the final RMSNorm, and the statistics they report.
//
// Why a shared trunk: the R1 decoder and the BERT-like encoder differ only in their window
// (causal or bidirectional) and their head (next-token LM head, or pooled classifier). Keeping
// the stack in one place means the block layout, the weight names and the stats are the same
// in both, and a fix to one is a fix to the other.
//
// Layout, from a resolved config R (models/config.hpp):
//   embed                    Embedding (vocab, d_model), stream (seed, 0)
//   layers.0 .. dense_layers-1    TransformerBlock<T, Window, DenseFfn>, FFN width ffn_hidden
//   layers.dense_layers .. layers-1   TransformerBlock<T, Window, Ffn>, expert width moe_hidden
//                            (the same dense block type when Ffn is DenseFfn)
//   norm                     RMSNorm (d_model)
// Block l has index l + 1 for its random streams (nn/transformer_block.hpp): subsequences
// 8(l+1) .. 8(l+1)+5; subsequences 0..7 belong to the embedding (0) and the heads (1).
//
// Shapes: ids (B, T) int32; hidden states (B, T, C).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/core/rng.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/models/config.hpp"
#include "tessera/nn/layers.hpp"
#include "tessera/nn/transformer_block.hpp"

namespace tessera::models {

// One block's share of a forward, as a model reports it.
struct LayerStats {
  bool moe = false;                       // whether the block's FFN is a mixture of experts
  double attention_work_fraction = 0.0;   // key tiles visited / tiles of full causal attention
  std::vector<int64_t> window_histogram;  // VariableWindow: query blocks per window size
  double window_penalty = 0.0;            // LearnedSelector's compute penalty (else 0)
  double moe_aux_loss = 0.0;              // the MoE balance loss (aux-loss balance, else 0)
  double moe_active_fraction = 0.0;       // experts used per token / (experts + shared)
  std::vector<int64_t> expert_load;       // assignments per routed expert
  int64_t dropped = 0;                    // assignments dropped by the capacity limit
  double aux_loss() const { return window_penalty + moe_aux_loss; }
};

// What one forward of a model reports.
struct ModelStats {
  double loss = 0.0;           // cross_entropy + aux_loss: exactly what backward differentiates
  double cross_entropy = 0.0;  // mean over the counted targets
  double aux_loss = 0.0;       // sum over blocks of LayerStats::aux_loss()
  int64_t targets = 0;         // targets counted (ignore_index excluded)
  std::vector<LayerStats> layers;
  double attention_work_fraction = 0.0;  // all blocks: tiles visited / full-causal tiles
  // Parameters a token actually used, over all parameters: every parameter except the routed
  // experts counts as used; a routed expert counts for the tokens it ran on (after capacity).
  double active_parameter_fraction = 0.0;
};

namespace detail {

template <class R>
class Trunk {
 public:
  using T = typename R::Scalar;
  using Window = typename R::Window;
  using Ffn = typename R::Ffn;
  using DenseBlock = nn::TransformerBlock<T, Window, nn::DenseFfn>;
  using MoEBlock = nn::TransformerBlock<T, Window, Ffn>;

  struct Saved {
    typename nn::Embedding<T>::Saved embed;
    std::vector<typename DenseBlock::Saved> dense;  // layers [0, dense_layers)
    std::vector<typename MoEBlock::Saved> moe;      // layers [dense_layers, layers)
    typename nn::RMSNorm<T>::Saved norm;
  };

  explicit Trunk(Seed seed) : embed_(R::vocab, R::d_model, seed, 0), norm_(R::d_model, R::norm_eps) {
    nn::BlockOptions options;
    options.attention.block = R::attention_block;
    options.attention.max_seq = R::max_seq;
    options.attention.rope.theta = static_cast<float>(R::rope_theta);
    options.moe.capacity_factor = R::capacity_factor;
    options.norm_eps = R::norm_eps;
    options.window_penalty = R::window_penalty;
    dense_.reserve(static_cast<size_t>(R::dense_layers));
    moe_.reserve(static_cast<size_t>(R::layers - R::dense_layers));
    for (int64_t l = 0; l < R::layers; ++l) {
      const uint64_t index = static_cast<uint64_t>(l) + 1;
      if (l < R::dense_layers) {
        dense_.emplace_back(R::d_model, R::heads, R::kv_heads, R::ffn_hidden, seed, index, options);
      } else {
        moe_.emplace_back(R::d_model, R::heads, R::kv_heads, R::moe_hidden, seed, index, options);
      }
    }
  }

  // ids (B, T) -> final-normed hidden states (B, T, C).
  Tensor<T> forward(TensorView<const int32_t, Cpu> ids, Saved& saved, const char* model) const {
    TESSERA_CHECK(ids.rank() == 2, model, ": tensor 'tokens' must be (batch, seq), got shape ",
                  ids.shape());
    TESSERA_CHECK(ids.dim(0) >= 1 && ids.dim(1) >= 1, model,
                  ": tensor 'tokens' must hold at least one token, got shape ", ids.shape());
    TESSERA_CHECK(ids.dim(1) <= R::max_seq, model, ": sequence length ", ids.dim(1),
                  " exceeds the config's max_seq = ", R::max_seq);
    Tensor<T> h = embed_.forward(ids, saved.embed);  // (B, T, C)
    saved.dense.resize(dense_.size());
    saved.moe.resize(moe_.size());
    for (size_t l = 0; l < dense_.size(); ++l) h = dense_[l].forward(h, saved.dense[l]);
    for (size_t l = 0; l < moe_.size(); ++l) h = moe_[l].forward(h, saved.moe[l]);
    return norm_.forward(h, saved.norm);  // (B, T, C)
  }

  // dhn (B, T, C), the gradient at the final norm's output, back to the embedding.
  void backward(TensorView<const T, Cpu> dhn, const Saved& saved, double aux_grad) {
    Tensor<T> dh = norm_.backward(dhn, saved.norm);  // (B, T, C)
    for (size_t l = moe_.size(); l-- > 0;) dh = moe_[l].backward(dh, saved.moe[l], aux_grad);
    for (size_t l = dense_.size(); l-- > 0;) dh = dense_[l].backward(dh, saved.dense[l], aux_grad);
    embed_.backward(dh, saved.embed);
  }

  // "embed.weight", "layers.<l>.<block name>", "norm.weight".
  template <class F>
  void visit_parameters(F&& f) {
    embed_.visit_parameters([&](std::string_view name, nn::Parameter<T>& p) {
      f(std::string_view("embed." + std::string(name)), p);
    });
    for_each_block([&](int64_t l, auto& block) {
      const std::string prefix = "layers." + std::to_string(l) + ".";
      block.visit_parameters([&](std::string_view name, nn::Parameter<T>& p) {
        f(std::string_view(prefix + std::string(name)), p);
      });
    });
    norm_.visit_parameters([&](std::string_view name, nn::Parameter<T>& p) {
      f(std::string_view("norm." + std::string(name)), p);
    });
  }

  // "layers.<l>.ffn.router.expert_bias" under a bias balance.
  template <class F>
  void visit_buffers(F&& f) {
    for_each_block([&](int64_t l, auto& block) {
      const std::string prefix = "layers." + std::to_string(l) + ".";
      block.visit_buffers([&](std::string_view name, auto& buffer) {
        f(std::string_view(prefix + std::string(name)), buffer);
      });
    });
  }

  // f(layer index, block&) for every block in order (the blocks have up to two types).
  template <class F>
  void for_each_block(F&& f) {
    for (size_t l = 0; l < dense_.size(); ++l) f(static_cast<int64_t>(l), dense_[l]);
    for (size_t l = 0; l < moe_.size(); ++l) f(static_cast<int64_t>(dense_.size() + l), moe_[l]);
  }
  template <class F>
  void for_each_block(F&& f) const {
    for (size_t l = 0; l < dense_.size(); ++l) f(static_cast<int64_t>(l), dense_[l]);
    for (size_t l = 0; l < moe_.size(); ++l) f(static_cast<int64_t>(dense_.size() + l), moe_[l]);
  }

  // Aux-loss-free balancing after a step: nudges each bias-balanced MoE block's selection bias
  // against the load it saw in `saved`.
  void update_balance(const Saved& saved) {
    if constexpr (MoEBlock::kMoE) {
      if constexpr (Ffn::Balance::kBias) {
        TESSERA_CHECK(saved.moe.size() == moe_.size(),
                      "update_balance: the saved state holds ", saved.moe.size(),
                      " MoE blocks, the model has ", moe_.size());
        for (size_t l = 0; l < moe_.size(); ++l) moe_[l].ffn().update_bias(saved.moe[l].stats.moe);
      }
    }
    (void)saved;
  }

  // Fills the per-layer part of `stats` (layers, aux_loss, work and active fractions);
  // total_parameters: the whole model's, heads included.
  void fill_stats(const Saved& saved, ModelStats& stats, int64_t total_parameters) const {
    stats.layers.clear();
    stats.aux_loss = 0.0;
    int64_t visited = 0, full = 0;
    double routed_active = 0.0;  // routed-expert parameters used per token, summed over blocks
    auto add = [&](const nn::BlockStats& b) {
      LayerStats s;
      s.moe = b.has_moe;
      s.attention_work_fraction = b.attention.work_fraction();
      s.window_histogram = b.attention.window_histogram;
      s.window_penalty = b.attention.aux_loss;
      visited += b.attention.visited_tiles;
      full += b.attention.full_causal_tiles;
      if (b.has_moe) {
        s.moe_aux_loss = b.moe.aux_loss;
        s.moe_active_fraction = b.moe.active_fraction;
        s.expert_load = b.moe.load;
        s.dropped = b.moe.dropped;
        int64_t kept = 0;
        for (int64_t v : b.moe.processed) kept += v;
        if (b.moe.tokens > 0)
          routed_active += static_cast<double>(kept) / static_cast<double>(b.moe.tokens) *
                           static_cast<double>(expert_parameters());
      }
      stats.aux_loss += s.aux_loss();
      stats.layers.push_back(std::move(s));
    };
    for (const auto& s : saved.dense) add(s.stats);
    for (const auto& s : saved.moe) add(s.stats);
    stats.attention_work_fraction =
        full > 0 ? static_cast<double>(visited) / static_cast<double>(full) : 0.0;
    const double total = static_cast<double>(total_parameters);
    double routed_total = 0.0;
    for (const auto& s : saved.moe)
      if (s.stats.has_moe)
        routed_total += static_cast<double>(R::experts) * static_cast<double>(expert_parameters());
    stats.active_parameter_fraction = (total - routed_total + routed_active) / total;
  }

  // Parameters of the trunk (every tensor counted once).
  int64_t parameter_count() const {
    int64_t n = 0;
    const_cast<Trunk&>(*this).visit_parameters(
        [&](std::string_view, nn::Parameter<T>& p) { n += p.value.numel(); });
    return n;
  }

  // Parameters of one routed expert (its three matrices).
  static constexpr int64_t expert_parameters() { return 3 * R::d_model * R::moe_hidden; }

  nn::Embedding<T>& embedding() { return embed_; }
  const nn::Embedding<T>& embedding() const { return embed_; }
  nn::RMSNorm<T>& norm() { return norm_; }
  const nn::RMSNorm<T>& norm() const { return norm_; }

 private:
  nn::Embedding<T> embed_;
  std::vector<DenseBlock> dense_;
  std::vector<MoEBlock> moe_;
  nn::RMSNorm<T> norm_;
};

}  // namespace detail

}  // namespace tessera::models
