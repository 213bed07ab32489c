// tessera/nn/transformer_block.hpp — the pre-norm transformer block of the R1 stack:
//
//   h = x + attn(norm1(x))          attention with the block's window policy
//   y = h + ffn(norm2(h))           a dense SwiGLU FFN or a mixture of experts
//
// Why pre-norm: every block reads a normalised copy of the residual stream and adds its result
// back, so the stream itself is never rescaled and gradients reach the embedding through the
// identity path of every block; this is what lets deep stacks train without warm-up tricks, and
// it is the layout of DeepSeek-V3 / Llama.
//
// The block is a type: `TransformerBlock<T, Window, FfnSpec>` with Window a policy of
// tessera/nn/window.hpp and FfnSpec `DenseFfn` or an `MoE<...>` spec (tessera/nn/moe.hpp). A
// model picks one per layer from its config; nothing is dispatched at run time.
//
// What it forwards upward (BlockStats in Saved): the attention's work as a fraction of full
// causal attention and its window choices, the selector's compute penalty, the MoE layer's
// load, dropped tokens, active fraction and balance loss, and their sum `aux_loss()`. A model
// adds aux_loss() of every block to its training loss; backward(dy, saved, aux_grad) then
// differentiates `aux_grad * aux_loss()` along with the main path (aux_grad = dLoss/dAux, 1 when
// the aux losses are simply added). The MoE layer takes aux_grad as an argument; the
// LearnedSelector's backward reads its `penalty` member, so the block scales that member by
// aux_grad for the duration of the call (restored on exit, also on an exception).
//
// Random streams: a block with index i draws its attention weights from subsequences
// 8i..8i+4 (nn::Attention's layout for subsequence i) and its FFN (router and experts, end to
// end) from subsequence 8i+5, so the blocks of a model never share a stream; the norms start at
// ones.
//
// Parameter names: "norm1.weight", "attn.wq", "attn.wk", "attn.wv", "attn.wo",
// "attn.gate.weight", "attn.gate.bias" (LearnedSelector), "norm2.weight", then the FFN's names
// under "ffn.": "ffn.w_gate", "ffn.w_up", "ffn.w_down" (dense) or "ffn.router.gate",
// "ffn.experts.<e>.w_gate|w_up|w_down", "ffn.shared_experts.<s>.w_..." (MoE). Buffers (not
// trained by gradient): "ffn.router.expert_bias" under a bias balance.
//
// Shapes: x, y (B, T, C).
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

#include "tessera/core/error.hpp"
#include "tessera/core/rng.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/nn/attention.hpp"
#include "tessera/nn/feed_forward.hpp"
#include "tessera/nn/layers.hpp"
#include "tessera/nn/moe.hpp"
#include "tessera/nn/parameter.hpp"
#include "tessera/nn/window.hpp"
#include "tessera/ops/elementwise.hpp"

namespace tessera::nn {

struct BlockOptions {
  AttentionOptions attention{};  // tile size, RoPE table length and scaling
  MoEOptions moe{};              // capacity factor (MoE blocks only)
  double norm_eps = 1e-6;
  double window_penalty = -1.0;  // LearnedSelector's compute penalty; < 0 keeps its default
};

// What one block's forward reports.
struct BlockStats {
  AttentionStats attention;  // work fraction, window histogram, selector penalty
  bool has_moe = false;
  MoEStats moe;              // only meaningful when has_moe
  // The block's share of the training loss beyond cross-entropy: the selector's compute
  // penalty plus the MoE balance loss.
  double aux_loss() const { return attention.aux_loss + (has_moe ? moe.aux_loss : 0.0); }
};

namespace block_detail {
template <class L>
struct is_moe_layer : std::false_type {};
template <class T, class Spec>
struct is_moe_layer<MoELayer<T, Spec>> : std::true_type {};
}  // namespace block_detail

template <class T, WindowPolicy Window, class FfnSpec>
class TransformerBlock {
 public:
  using value_type = T;
  using window_policy = Window;
  using ffn_spec = FfnSpec;
  using AttentionLayer = Attention<T, Window>;
  using FfnLayer = typename FfnSpec::template Layer<T>;
  static constexpr bool kMoE = block_detail::is_moe_layer<FfnLayer>::value;
  static constexpr bool kLearnedWindow = AttentionLayer::SelectorState::kLearned;

  struct Saved {
    typename RMSNorm<T>::Saved norm1;
    typename AttentionLayer::Saved attn;  // holds norm1's output as its input
    typename RMSNorm<T>::Saved norm2;     // holds h = x + attn(...) as its input
    typename FfnLayer::Saved ffn;
    BlockStats stats;
  };

  // hidden: the dense FFN's width, or each expert's width in an MoE block.
  TransformerBlock(int64_t d_model, int64_t heads, int64_t kv_heads, int64_t hidden, Seed seed,
                   uint64_t index, const BlockOptions& options = {})
      : norm1_(d_model, options.norm_eps),
        attn_(d_model, heads, kv_heads, seed, index, options.attention),
        norm2_(d_model, options.norm_eps),
        ffn_(make_ffn(d_model, hidden, seed, index, options)) {
    if constexpr (kLearnedWindow) {
      if (options.window_penalty >= 0.0) attn_.selector().penalty = options.window_penalty;
    }
  }

  int64_t d_model() const { return attn_.d_model(); }

  // x (B, T, C) -> y (B, T, C)
  Tensor<T> forward(TensorView<const T, Cpu> x, Saved& saved) const {
    return forward_impl(x, saved, nullptr);
  }

  // The same with key padding (Attention::forward with key_lengths): sequence b's tokens
  // [key_lengths[b], T) are padding that no token's attention reads. The norms and the FFN work
  // per token, so every real token's output is the unpadded sequence's. An MoE block still
  // routes the padded tokens (their outputs are discarded downstream), so they count in its
  // load, capacity and balance loss.
  Tensor<T> forward(TensorView<const T, Cpu> x, Saved& saved,
                    std::span<const int64_t> key_lengths) const {
    return forward_impl(x, saved, &key_lengths);
  }

 private:
  Tensor<T> forward_impl(TensorView<const T, Cpu> x, Saved& saved,
                         const std::span<const int64_t>* key_lengths) const {
    const Tensor<T> h1 = norm1_.forward(x, saved.norm1);          // (B, T, C)
    const Tensor<T> a = key_lengths ? attn_.forward(h1, saved.attn, *key_lengths)
                                    : attn_.forward(h1, saved.attn);  // (B, T, C)
    const Tensor<T> h = ops::add<T>(saved.norm1.x, a);            // (B, T, C) residual
    const Tensor<T> h2 = norm2_.forward(h, saved.norm2);          // (B, T, C)
    const Tensor<T> f = ffn_.forward(h2, saved.ffn);              // (B, T, C)
    saved.stats = BlockStats{};
    saved.stats.attention = saved.attn.stats;
    if constexpr (kMoE) {
      saved.stats.has_moe = true;
      saved.stats.moe = saved.ffn.stats;
    }
    return ops::add<T>(saved.norm2.x, f);                         // (B, T, C)
  }

 public:
  // dy (B, T, C) -> dx (B, T, C); accumulates into every parameter's grad. aux_grad is the
  // loss gradient with respect to stats.aux_loss() (see the file header).
  Tensor<T> backward(TensorView<const T, Cpu> dy, const Saved& saved, double aux_grad = 1.0) {
    Tensor<T> dh2;  // (B, T, C) gradient at norm2's output
    if constexpr (kMoE) {
      dh2 = ffn_.backward(dy, saved.ffn, aux_grad);
    } else {
      dh2 = ffn_.backward(dy, saved.ffn);
    }
    const Tensor<T> dh = ops::add<T>(dy, norm2_.backward(dh2, saved.norm2));  // (B, T, C)
    Tensor<T> dh1;  // (B, T, C) gradient at norm1's output
    if constexpr (kLearnedWindow) {
      // The selector's penalty gradient is penalty * d(expected cost); scale it by aux_grad.
      struct Restore {
        double& penalty;
        double kept;
        ~Restore() { penalty = kept; }
      } restore{attn_.selector().penalty, attn_.selector().penalty};
      attn_.selector().penalty = restore.kept * aux_grad;
      dh1 = attn_.backward(dh, saved.attn);
    } else {
      dh1 = attn_.backward(dh, saved.attn);
    }
    return ops::add<T>(dh, norm1_.backward(dh1, saved.norm1));              // (B, T, C)
  }

  template <class F>
  void visit_parameters(F&& f) {
    visit_prefixed("norm1.", norm1_, f);
    visit_prefixed("attn.", attn_, f);
    visit_prefixed("norm2.", norm2_, f);
    visit_prefixed("ffn.", ffn_, f);
  }

  // Non-gradient state a checkpoint keeps: f(name, Tensor&) ("ffn.router.expert_bias").
  template <class F>
  void visit_buffers(F&& f) {
    if constexpr (kMoE) {
      ffn_.visit_buffers([&](std::string_view name, auto& buffer) {
        const std::string full = "ffn." + std::string(name);
        f(std::string_view(full), buffer);
      });
    }
  }

  RMSNorm<T>& norm1() { return norm1_; }
  const RMSNorm<T>& norm1() const { return norm1_; }
  AttentionLayer& attn() { return attn_; }
  const AttentionLayer& attn() const { return attn_; }
  RMSNorm<T>& norm2() { return norm2_; }
  const RMSNorm<T>& norm2() const { return norm2_; }
  FfnLayer& ffn() { return ffn_; }
  const FfnLayer& ffn() const { return ffn_; }

 private:
  static FfnLayer make_ffn(int64_t d_model, int64_t hidden, Seed seed, uint64_t index,
                           const BlockOptions& options) {
    const uint64_t subsequence = index * 8 + 5;  // beside the attention's 8i..8i+4
    if constexpr (kMoE) {
      return FfnLayer(d_model, hidden, seed, subsequence, options.moe);
    } else {
      return FfnLayer(d_model, hidden, seed, subsequence);
    }
  }

  template <class Layer, class F>
  static void visit_prefixed(const char* prefix, Layer& layer, F& f) {
    layer.visit_parameters([&](std::string_view name, Parameter<T>& p) {
      const std::string full = prefix + std::string(name);
      f(std::string_view(full), p);
    });
  }

  RMSNorm<T> norm1_;
  AttentionLayer attn_;
  RMSNorm<T> norm2_;
  FfnLayer ffn_;
};

}  // namespace tessera::nn
