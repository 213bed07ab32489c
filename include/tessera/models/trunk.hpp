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
// With per-layer windows (the config declares `template <int Layer> using WindowAt`), layer l is
// TransformerBlock<T, WindowAt<l>, DenseFfn or Ffn>: the same layout, names and random streams,
// each block with its own window type (TrunkBlocks below keeps them in a tuple).
// Block l has index l + 1 for its random streams (nn/transformer_block.hpp): subsequences
// 8(l+1) .. 8(l+1)+5; subsequences 0..7 belong to the embedding (0) and the heads (1).
//
// Activation recompute: Trunk<R, Recompute> applies one policy of nn/transformer_block.hpp to
// every block: release<Recompute> after each block's forward, rebuild<Recompute> before its
// backward and release again after it, so at most one block holds its full state during
// backward. The block states live in `mutable` members of Saved for that reason: backward takes
// the saved state by const reference and leaves it as forward left it.
//
// Shapes: ids (B, T) int32; hidden states (B, T, C).
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
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

// The config's activation recompute policy: `using Recompute = ts::Selective;` (or StoreAll,
// RecomputeBlock); StoreAll when the config names none. Resolved here rather than in
// ResolvedConfig because it changes only what a model keeps, never its layout.
template <class C>
struct recompute_of {
  using type = nn::StoreAll;
};
template <class C>
  requires requires { typename C::Recompute; }
struct recompute_of<C> {
  using type = typename C::Recompute;
};
template <class C>
using recompute_t = typename recompute_of<C>::type;

namespace detail {

// Layer l's block type: its window (the config's WindowAt<l>, else Window) and its FFN (dense
// for the first dense_layers layers, the config's Ffn after).
template <class R, int Layer>
using BlockAt = nn::TransformerBlock<
    typename R::Scalar, typename R::template WindowAt<Layer>,
    std::conditional_t<(Layer < R::dense_layers), nn::DenseFfn, typename R::Ffn>>;

// The blocks of a stack and their saved state, in one of two layouts; the Trunk below reaches
// them only through the iteration functions, so both layouts share every other line.
//   * one window for every layer (the default): at most two block types, kept in two vectors
//     (dense_ for layers [0, dense_layers), moe_ for the rest);
//   * per-layer windows (the config declares WindowAt<Layer>): each layer may have its own type,
//     so the blocks are a std::tuple, one element per layer, and so is their saved state.
template <class R, bool PerLayer = R::kPerLayerWindow>
class TrunkBlocks {
 public:
  using T = typename R::Scalar;
  using DenseBlock = nn::TransformerBlock<T, typename R::Window, nn::DenseFfn>;
  using MoEBlock = nn::TransformerBlock<T, typename R::Window, typename R::Ffn>;

  struct SavedBlocks {
    // mutable: backward rebuilds what a recompute policy dropped (trunk's header).
    mutable std::vector<typename DenseBlock::Saved> dense;  // layers [0, dense_layers)
    mutable std::vector<typename MoEBlock::Saved> moe;      // layers [dense_layers, layers)
  };

  TrunkBlocks(Seed seed, const nn::BlockOptions& options) {
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

  // f(layer index, block&) for every block in order.
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

  // Forward order: f(const block&, block's Saved&), after sizing `saved` for every layer.
  template <class F>
  void forward_pairs(SavedBlocks& saved, F&& f) const {
    saved.dense.resize(dense_.size());
    saved.moe.resize(moe_.size());
    for (size_t l = 0; l < dense_.size(); ++l) f(dense_[l], saved.dense[l]);
    for (size_t l = 0; l < moe_.size(); ++l) f(moe_[l], saved.moe[l]);
  }

  // Backward order (last layer first): f(block&, block's Saved&).
  template <class F>
  void backward_pairs(const SavedBlocks& saved, F&& f) {
    check_saved(saved, "backward");
    for (size_t l = moe_.size(); l-- > 0;) f(moe_[l], saved.moe[l]);
    for (size_t l = dense_.size(); l-- > 0;) f(dense_[l], saved.dense[l]);
  }

  // f(const BlockStats&) for every layer in order.
  template <class F>
  static void for_each_stats(const SavedBlocks& saved, F&& f) {
    for (const auto& s : saved.dense) f(s.stats);
    for (const auto& s : saved.moe) f(s.stats);
  }

 protected:
  void check_saved(const SavedBlocks& saved, const char* what) const {
    TESSERA_CHECK(saved.dense.size() == dense_.size() && saved.moe.size() == moe_.size(), what,
                  ": the saved state holds ", saved.dense.size() + saved.moe.size(),
                  " blocks, the model has ", dense_.size() + moe_.size());
  }

 private:
  std::vector<DenseBlock> dense_;
  std::vector<MoEBlock> moe_;
};

template <class R>
class TrunkBlocks<R, true> {
  static constexpr int kLayers = static_cast<int>(R::layers);
  template <int... L>
  static std::tuple<BlockAt<R, L>...> blocks_type(std::integer_sequence<int, L...>);
  template <int... L>
  static std::tuple<typename BlockAt<R, L>::Saved...> saved_type(std::integer_sequence<int, L...>);
  using Seq = std::make_integer_sequence<int, kLayers>;
  using Blocks = decltype(blocks_type(Seq{}));

 public:
  using T = typename R::Scalar;
  // The blocks of the layers that use the config's Window (tests and tools name these types).
  using DenseBlock = nn::TransformerBlock<T, typename R::Window, nn::DenseFfn>;
  using MoEBlock = nn::TransformerBlock<T, typename R::Window, typename R::Ffn>;
  template <int Layer>
  using Block = BlockAt<R, Layer>;

  struct SavedBlocks {
    // std::get<l>(layers): layer l's Block<l>::Saved; mutable as in the vector layout.
    mutable decltype(saved_type(Seq{})) layers;
    bool filled = false;
  };

  TrunkBlocks(Seed seed, const nn::BlockOptions& options)
      : blocks_(make(seed, options, Seq{})) {}

  // f(layer index, block&) in order; the index is a std::integral_constant<int64_t, l>, which
  // converts to int64_t and also lets a caller pick std::get<l>(saved.layers).
  template <class F>
  void for_each_block(F&& f) {
    each(Seq{}, [&]<int L>(std::integral_constant<int, L>) {
      f(std::integral_constant<int64_t, L>{}, std::get<L>(blocks_));
    });
  }
  template <class F>
  void for_each_block(F&& f) const {
    each(Seq{}, [&]<int L>(std::integral_constant<int, L>) {
      f(std::integral_constant<int64_t, L>{}, std::get<L>(blocks_));
    });
  }

  template <class F>
  void forward_pairs(SavedBlocks& saved, F&& f) const {
    each(Seq{}, [&]<int L>(std::integral_constant<int, L>) {
      f(std::get<L>(blocks_), std::get<L>(saved.layers));
    });
    saved.filled = true;
  }

  template <class F>
  void backward_pairs(const SavedBlocks& saved, F&& f) {
    check_saved(saved, "backward");
    each(Seq{}, [&]<int I>(std::integral_constant<int, I>) {
      constexpr int L = kLayers - 1 - I;
      f(std::get<L>(blocks_), std::get<L>(saved.layers));
    });
  }

  template <class F>
  static void for_each_stats(const SavedBlocks& saved, F&& f) {
    if (!saved.filled) return;
    each(Seq{}, [&]<int L>(std::integral_constant<int, L>) { f(std::get<L>(saved.layers).stats); });
  }

 protected:
  void check_saved(const SavedBlocks& saved, const char* what) const {
    TESSERA_CHECK(saved.filled, what, ": the saved state holds no forward of this model");
  }

 private:
  template <int... L>
  static Blocks make(Seed seed, const nn::BlockOptions& options, std::integer_sequence<int, L...>) {
    return Blocks(BlockAt<R, L>(R::d_model, R::heads, R::kv_heads,
                                L < R::dense_layers ? R::ffn_hidden : R::moe_hidden, seed,
                                static_cast<uint64_t>(L) + 1, options)...);
  }
  // f(integral_constant<int, L>) for L = 0, 1, ..., in order.
  template <int... L, class F>
  static void each(std::integer_sequence<int, L...>, F&& f) {
    (f(std::integral_constant<int, L>{}), ...);
  }

  Blocks blocks_;
};

template <class R, nn::RecomputePolicy Recompute_ = nn::StoreAll>
class Trunk : public TrunkBlocks<R> {
  using Base = TrunkBlocks<R>;

 public:
  using Recompute = Recompute_;
  using T = typename R::Scalar;
  using Window = typename R::Window;
  using Ffn = typename R::Ffn;
  using DenseBlock = typename Base::DenseBlock;
  using MoEBlock = typename Base::MoEBlock;

  // Default layout: `dense`, `moe` (vectors of block states); per-layer windows: `layers` (a
  // tuple, one block state per layer).
  struct Saved : Base::SavedBlocks {
    typename nn::Embedding<T>::Saved embed;
    typename nn::RMSNorm<T>::Saved norm;
  };

  explicit Trunk(Seed seed)
      : Base(seed, block_options()), embed_(R::vocab, R::d_model, seed, 0),
        norm_(R::d_model, R::norm_eps) {}

  // ids (B, T) -> final-normed hidden states (B, T, C).
  Tensor<T> forward(TensorView<const int32_t, Cpu> ids, Saved& saved, const char* model) const {
    return forward_impl(ids, saved, model, nullptr);
  }

  // The same with key padding: sequence b's tokens [key_lengths[b], T) are padding, read by no
  // attention layer (TransformerBlock::forward with key_lengths).
  Tensor<T> forward(TensorView<const int32_t, Cpu> ids, Saved& saved, const char* model,
                    std::span<const int64_t> key_lengths) const {
    return forward_impl(ids, saved, model, &key_lengths);
  }

 private:
  Tensor<T> forward_impl(TensorView<const int32_t, Cpu> ids, Saved& saved, const char* model,
                         const std::span<const int64_t>* key_lengths) const {
    TESSERA_CHECK(ids.rank() == 2, model, ": tensor 'tokens' must be (batch, seq), got shape ",
                  ids.shape());
    TESSERA_CHECK(ids.dim(0) >= 1 && ids.dim(1) >= 1, model,
                  ": tensor 'tokens' must hold at least one token, got shape ", ids.shape());
    TESSERA_CHECK(ids.dim(1) <= R::max_seq, model, ": sequence length ", ids.dim(1),
                  " exceeds the config's max_seq = ", R::max_seq);
    Tensor<T> h = embed_.forward(ids, saved.embed);  // (B, T, C)
    this->forward_pairs(saved, [&](const auto& block, auto& s) {
      h = key_lengths ? block.forward(h, s, *key_lengths) : block.forward(h, s);
      block.template release<Recompute>(s);
    });
    return norm_.forward(h, saved.norm);  // (B, T, C)
  }

 public:
  // dhn (B, T, C), the gradient at the final norm's output, back to the embedding.
  void backward(TensorView<const T, Cpu> dhn, const Saved& saved, double aux_grad) {
    Tensor<T> dh = norm_.backward(dhn, saved.norm);  // (B, T, C)
    this->backward_pairs(saved, [&](auto& block, auto& s) {
      block.template rebuild<Recompute>(s);
      dh = block.backward(dh, s, aux_grad);
      block.template release<Recompute>(s);  // one block's full state at a time
    });
    embed_.backward(dh, saved.embed);
  }

  // "embed.weight", "layers.<l>.<block name>", "norm.weight".
  template <class F>
  void visit_parameters(F&& f) {
    embed_.visit_parameters([&](std::string_view name, nn::Parameter<T>& p) {
      f(std::string_view("embed." + std::string(name)), p);
    });
    this->for_each_block([&](int64_t l, auto& block) {
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
    this->for_each_block([&](int64_t l, auto& block) {
      const std::string prefix = "layers." + std::to_string(l) + ".";
      block.visit_buffers([&](std::string_view name, auto& buffer) {
        f(std::string_view(prefix + std::string(name)), buffer);
      });
    });
  }

  using Base::for_each_block;  // f(layer index, block&) for every block in order

  // Aux-loss-free balancing after a step: nudges each bias-balanced MoE block's selection bias
  // against the load it saw in `saved`.
  void update_balance(const Saved& saved) {
    if constexpr (MoEBlock::kMoE) {
      if constexpr (Ffn::Balance::kBias) {
        this->check_saved(saved, "update_balance");
        this->backward_pairs(saved, [&](auto& block, const auto& s) {
          if constexpr (std::remove_cvref_t<decltype(block)>::kMoE)
            block.ffn().update_bias(s.stats.moe);
        });
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
    double routed_total = 0.0;   // routed-expert parameters of the MoE blocks
    Base::for_each_stats(saved, [&](const nn::BlockStats& b) {
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
        routed_total += static_cast<double>(R::experts) * static_cast<double>(expert_parameters());
      }
      stats.aux_loss += s.aux_loss();
      stats.layers.push_back(std::move(s));
    });
    stats.attention_work_fraction =
        full > 0 ? static_cast<double>(visited) / static_cast<double>(full) : 0.0;
    const double total = static_cast<double>(total_parameters);
    stats.active_parameter_fraction = (total - routed_total + routed_active) / total;
  }

  // Parameters of the trunk (every tensor counted once).
  int64_t parameter_count() const {
    int64_t n = 0;
    const_cast<Trunk&>(*this).visit_parameters(
        [&](std::string_view, nn::Parameter<T>& p) { n += p.value.numel(); });
    return n;
  }

  // The window policy's name, or with per-layer windows each layer's, comma-separated (the
  // models' config summary).
  static std::string window_names() {
    if constexpr (R::kPerLayerWindow) {
      std::string names;
      [&]<int... L>(std::integer_sequence<int, L...>) {
        ((names += (L == 0 ? "" : ",") + std::string(R::template WindowAt<L>::kName)), ...);
      }(std::make_integer_sequence<int, static_cast<int>(R::layers)>{});
      return names;
    } else {
      return std::string(Window::kName);
    }
  }

  // Parameters of one routed expert (its three matrices).
  static constexpr int64_t expert_parameters() { return 3 * R::d_model * R::moe_hidden; }

  nn::Embedding<T>& embedding() { return embed_; }
  const nn::Embedding<T>& embedding() const { return embed_; }
  nn::RMSNorm<T>& norm() { return norm_; }
  const nn::RMSNorm<T>& norm() const { return norm_; }

 private:
  static nn::BlockOptions block_options() {
    nn::BlockOptions options;
    options.attention.block = R::attention_block;
    options.attention.max_seq = R::max_seq;
    options.attention.rope.theta = static_cast<float>(R::rope_theta);
    options.moe.capacity_factor = R::capacity_factor;
    options.norm_eps = R::norm_eps;
    options.window_penalty = R::window_penalty;
    return options;
  }

  nn::Embedding<T> embed_;
  nn::RMSNorm<T> norm_;
};

// What Decoder and Encoder expose identically about their trunk (CRTP): the buffer and weight
// visitors, zero_grad, update_balance, for_each_block and the embedding / final norm. The model
// keeps its `Trunk trunk_` and its own visit_parameters (the heads differ), and befriends this.
template <class Model>
class ModelCommon {
 public:
  // Non-gradient state: "layers.<l>.ffn.router.expert_bias" under a bias balance.
  template <class F>
  void visit_buffers(F&& f) {
    model().trunk_.visit_buffers(f);
  }

  // Parameter values, then buffers: every tensor a checkpoint holds, f(name, Tensor&).
  template <class F>
  void visit_weights(F&& f) {
    model().visit_parameters([&](std::string_view name, auto& p) { f(name, p.value); });
    visit_buffers(f);
  }

  void zero_grad() {
    model().visit_parameters([](std::string_view, auto& p) { p.zero_grad(); });
  }

  // Aux-loss-free balancing (BiasBalance): call after each optimizer step. No-op otherwise.
  template <class Saved>
  void update_balance(const Saved& saved) {
    model().trunk_.update_balance(saved.trunk);
  }

  // f(layer, block) for every block, in order.
  template <class F>
  void for_each_block(F&& f) {
    model().trunk_.for_each_block(f);
  }
  auto& embedding() { return model().trunk_.embedding(); }
  auto& final_norm() { return model().trunk_.norm(); }

 private:
  Model& model() { return static_cast<Model&>(*this); }
};

}  // namespace detail

}  // namespace tessera::models
