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
// Activation recompute (docs/training.md, "Activation recompute"). A policy says which parts of
// Saved survive between forward and backward; the model calls release<P>(saved) after forward
// and rebuild<P>(saved) before backward, and each rebuild runs the very ops forward ran on the
// very inputs it read, so backward sees bit-identical state and every gradient is the same under
// every policy. That holds because the forward is a pure function of its input and the
// parameters: no random draw, no state advanced by a forward (the router's balance bias and the
// FP8 recipes' scales move only at explicit end-of-step calls), and every op splits its work the
// same way on every call with the same shapes and thread count.
//   StoreAll        keep everything (what backward reads directly; the default).
//   Selective       keep the matrix-product outputs (q, k, v, the attention output, gate/up and
//                   each expert's output, the router's scores) and the residual stream; drop the
//                   cheap ones: both norms' outputs (the attention's and the FFN's input, every
//                   expert's gathered rows) and SwiGLU's silu(gate) * up. rebuild re-runs two
//                   row norms, the gathers and the SwiGLUs.
//   RecomputeBlock  keep only the block's input (and its stats and key padding); rebuild re-runs
//                   the whole block forward, about a third of the block's training FLOPs.
//
// Shapes: x, y (B, T, C).
#pragma once

#include <algorithm>
#include <concepts>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/core/rng.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/nn/attention.hpp"
#include "tessera/nn/feed_forward.hpp"
#include "tessera/nn/layers.hpp"
#include "tessera/nn/moe.hpp"
#include "tessera/nn/parameter.hpp"
#include "tessera/nn/window.hpp"
#include "tessera/ops/activation.hpp"
#include "tessera/ops/elementwise.hpp"
#include "tessera/ops/norm.hpp"

namespace tessera::nn {

// Activation recompute policies (the file header says what each keeps). A model config names
// one as `using Recompute = ts::Selective;` (models/decoder.hpp); StoreAll when it names none.
struct StoreAll {
  static constexpr std::string_view kName = "store_all";
  static constexpr bool kDropCheap = false;   // drop norm and SwiGLU outputs after forward
  static constexpr bool kInputOnly = false;   // drop everything but the block's input
};
struct Selective {
  static constexpr std::string_view kName = "selective";
  static constexpr bool kDropCheap = true;
  static constexpr bool kInputOnly = false;
};
struct RecomputeBlock {
  static constexpr std::string_view kName = "recompute_block";
  static constexpr bool kDropCheap = false;  // everything but the input goes anyway
  static constexpr bool kInputOnly = true;
};

template <class P>
concept RecomputePolicy = requires {
  { P::kName } -> std::convertible_to<std::string_view>;
  { P::kDropCheap } -> std::convertible_to<bool>;
  { P::kInputOnly } -> std::convertible_to<bool>;
};

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

  // After forward: frees what policy P does not keep. The stats stay (the model reports them).
  template <RecomputePolicy P>
  void release(Saved& saved) const {
    if constexpr (P::kInputOnly) {
      Tensor<T> x = std::move(saved.norm1.x);
      std::vector<int64_t> key_lengths = std::move(saved.attn.key_lengths);
      BlockStats stats = std::move(saved.stats);
      saved = Saved{};
      saved.norm1.x = std::move(x);
      saved.attn.key_lengths = std::move(key_lengths);
      saved.stats = std::move(stats);
    } else if constexpr (P::kDropCheap) {
      saved.attn.x = Tensor<T>();  // norm1's output
      if constexpr (kMoE) {
        saved.ffn.route.x = Tensor<T>();  // norm2's output
        for (auto& e : saved.ffn.expert_saved) drop_swiglu_inputs(e);
        for (auto& e : saved.ffn.shared_saved) drop_swiglu_inputs(e);
      } else {
        drop_swiglu_inputs(saved.ffn);
      }
    }
  }

  // Before backward: rebuilds, bit for bit, what release<P>(saved) freed.
  template <RecomputePolicy P>
  void rebuild(Saved& saved) const {
    if constexpr (P::kInputOnly) {
      // forward_impl overwrites saved.norm1.x and saved.attn.key_lengths: take them out first.
      const Tensor<T> x = std::move(saved.norm1.x);                   // (B, T, C)
      const std::vector<int64_t> key_lengths = std::move(saved.attn.key_lengths);
      const std::span<const int64_t> lengths(key_lengths);
      (void)forward_impl(x, saved, key_lengths.empty() ? nullptr : &lengths);
    } else if constexpr (P::kDropCheap) {
      const int64_t C = d_model(), rows = saved.norm2.x.numel() / C;
      // What norm1_.forward returned: the same op on the same saved input.
      saved.attn.x =
          ops::rms_norm<T>(saved.norm1.x, norm1_.weight.value, norm1_.eps()).y;  // (B, T, C)
      Tensor<T> h2 = ops::rms_norm<T>(saved.norm2.x.reshape({rows, C}), norm2_.weight.value,
                                      norm2_.eps()).y;  // (rows, C)
      if constexpr (kMoE) {
        auto& f = saved.ffn;
        const int64_t k = FfnLayer::kTopK;
        for (size_t e = 0; e < f.expert_saved.size(); ++e) {
          const int64_t b = f.begin[e], n = f.begin[e + 1] - b;
          if (n == 0) continue;  // forward ran no rows there; its state is not read
          Tensor<T> xe = Tensor<T>::empty(Shape{n, C});  // (rows_e, C), MoELayer's gather
          for (int64_t r = 0; r < n; ++r) {
            const int64_t t = f.order[size_t(b + r)] / k;
            std::copy_n(h2.data() + t * C, C, xe.data() + r * C);
          }
          rebuild_swiglu(f.expert_saved[e], std::move(xe));
        }
        for (auto& sh : f.shared_saved) rebuild_swiglu(sh, h2.clone());
        f.route.x = std::move(h2);
      } else {
        rebuild_swiglu(saved.ffn, std::move(h2));
      }
    }
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

  // A SwiGLU's input rows (a norm's output) and silu(gate) * up; gate and up stay.
  static void drop_swiglu_inputs(typename SwiGluFfn<T>::Saved& s) {
    s.x = Tensor<T>();
    s.act = Tensor<T>();
  }
  static void rebuild_swiglu(typename SwiGluFfn<T>::Saved& s, Tensor<T> x) {
    s.x = std::move(x);                          // (rows, C)
    s.act = ops::swiglu<T>(s.gate, s.up);        // (rows, hidden), as SwiGluFfn::recompute
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

namespace tessera {
using nn::RecomputeBlock;
using nn::Selective;
using nn::StoreAll;
}  // namespace tessera
