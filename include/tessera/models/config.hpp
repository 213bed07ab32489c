// tessera/models/config.hpp — what a model config is, the rules it must follow, and the
// defaults of the members it may leave out.
//
// A config is a plain struct of `static constexpr` numbers and `using` aliases for policies:
//
//   struct TinyR1 {
//     static constexpr int vocab = 8192, d_model = 256, layers = 6;
//     static constexpr int heads = 8, kv_heads = 2, max_seq = 16384, dense_layers = 1;
//     using Window = ts::VariableWindow<ts::Sizes<128, 512, 2048, ts::kFull>, ts::LearnedSelector>;
//     using Ffn    = ts::MoE<ts::Experts<16>, ts::TopK<2>, ts::GroupLimited<4, 2>,
//                            ts::BiasBalance, ts::SharedExperts<1>>;
//   };
//   struct TinyR1Sliding : TinyR1 { using Window = ts::SlidingWindow<512>; };   // an ablation
//
// Why a struct of constants and not a run-time object: the window and the FFN layout change
// the code that runs (they are template parameters of the layers), so they must be types; and
// keeping the numbers beside them in one type lets a variant be one line of inheritance, lets
// the compiler reject a bad combination before anything runs, and makes `Decoder<TinyR1>` and
// `Decoder<TinyR1Sliding>` two different types that a test or an ablation grid can hold side
// by side.
//
// How the rules are checked, and why twice:
//   * `DecoderConfig<C>` / `EncoderConfig<C>` are concepts made of one named concept per rule
//     (rules::HeadsDivideDModel, rules::KvHeadsDivideHeads, ...), so when
//     `static_assert(ts::DecoderConfig<X>)` fails, the compiler's note names the broken rule.
//   * `check_decoder_config<C>()` / `check_encoder_config<C>()` hold one `static_assert` per
//     rule with a message that says what to change; Decoder and Encoder call them, so a model
//     built from a bad config stops with that message. Each check is guarded by the ones it
//     depends on (`if constexpr`), so one mistake gives one message, not a cascade.
//   The rules about the window and the MoE spec are read off the template arguments by pattern
//   matching, before the policy types are instantiated, so they can speak about the config.
//
// Members (docs/models.md has the table): required vocab, d_model, layers, heads (and classes
// for an encoder); optional, with defaults, kv_heads (= heads), ffn_hidden (SwiGLU's 8/3 *
// d_model rounded up to a multiple of 8), moe_hidden (ffn_hidden / (top_k + shared), rounded
// up, so an MoE layer's active FFN width equals the dense one, as DeepSeek-V3 sizes its
// experts), max_seq (4096), dense_layers (0), tie_embeddings (false), rope_theta (10000),
// norm_eps (1e-6), attention_block (64), capacity_factor (0: no limit), window_penalty
// (LearnedSelector's default 0.01), `using Window` (CausalFull for a decoder, Bidirectional
// for an encoder), `template <int Layer> using WindowAt` (per-layer windows; default: every
// layer uses Window), `using Ffn` (DenseFfn), `using Scalar` (float; double for gradient checks).
#pragma once

#include <concepts>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "tessera/core/number.hpp"
#include "tessera/nn/feed_forward.hpp"
#include "tessera/nn/moe.hpp"
#include "tessera/nn/router.hpp"
#include "tessera/nn/window.hpp"

namespace tessera::models {

namespace config_detail {

// ---- optional members and their defaults -----------------------------------------------------

template <class C>
constexpr int64_t kv_heads() {
  if constexpr (requires { C::kv_heads; }) {
    return C::kv_heads;
  } else {
    return C::heads;
  }
}

// SwiGLU keeps the dense FFN's parameter count at that of a 4x GELU FFN with hidden = 8/3 *
// d_model (three matrices instead of two); rounded up to a multiple of 8 for the vector units.
constexpr int64_t default_ffn_hidden(int64_t d_model) {
  const int64_t h = (8 * d_model + 2) / 3;  // ceil(8 d / 3)
  return (h + 7) / 8 * 8;
}

template <class C>
constexpr int64_t ffn_hidden() {
  if constexpr (requires { C::ffn_hidden; }) {
    return C::ffn_hidden;
  } else {
    return default_ffn_hidden(C::d_model);
  }
}

template <class C>
constexpr int64_t max_seq() {
  if constexpr (requires { C::max_seq; }) {
    return C::max_seq;
  } else {
    return 4096;
  }
}

template <class C>
constexpr int64_t dense_layers() {
  if constexpr (requires { C::dense_layers; }) {
    return C::dense_layers;
  } else {
    return 0;
  }
}

template <class C>
constexpr bool tie_embeddings() {
  if constexpr (requires { C::tie_embeddings; }) {
    return C::tie_embeddings;
  } else {
    return false;
  }
}

template <class C>
constexpr double rope_theta() {
  if constexpr (requires { C::rope_theta; }) {
    return C::rope_theta;
  } else {
    return 10000.0;
  }
}

template <class C>
constexpr double norm_eps() {
  if constexpr (requires { C::norm_eps; }) {
    return C::norm_eps;
  } else {
    return 1e-6;
  }
}

template <class C>
constexpr int64_t attention_block() {
  if constexpr (requires { C::attention_block; }) {
    return C::attention_block;
  } else {
    return 64;
  }
}

template <class C>
constexpr double capacity_factor() {
  if constexpr (requires { C::capacity_factor; }) {
    return C::capacity_factor;
  } else {
    return 0.0;
  }
}

// A negative value means "keep LearnedSelector's own default".
template <class C>
constexpr double window_penalty() {
  if constexpr (requires { C::window_penalty; }) {
    return C::window_penalty;
  } else {
    return -1.0;
  }
}

template <class C>
constexpr int64_t classes() {
  if constexpr (requires { C::classes; }) {
    return C::classes;
  } else {
    return 0;
  }
}

template <class C, class Default>
struct window_of {
  using type = Default;
};
template <class C, class Default>
  requires requires { typename C::Window; }
struct window_of<C, Default> {
  using type = typename C::Window;
};

// Per-layer windows: a config may declare `template <int Layer> using WindowAt = ...;` to give
// each block its own window policy (alternating local and global layers, as Gemma 2 and
// Longformer-style stacks do). Without it every layer uses the config's Window.
template <class C>
concept HasWindowAt = requires { typename C::template WindowAt<0>; };

template <class C, class Default, int Layer>
struct window_at {
  using type = typename window_of<C, Default>::type;
};
template <class C, class Default, int Layer>
  requires HasWindowAt<C>
struct window_at<C, Default, Layer> {
  using type = typename C::template WindowAt<Layer>;
};

// Whether pred<window of layer l> holds for every layer l in [0, layers).
template <class C, class Default, template <class> class Pred, int... L>
constexpr bool every_layer_window(std::integer_sequence<int, L...>) {
  return (Pred<typename window_at<C, Default, L>::type>::value && ...);
}
template <class C, class Default, template <class> class Pred>
constexpr bool every_layer_window() {
  if constexpr (HasWindowAt<C>) {
    return every_layer_window<C, Default, Pred>(
        std::make_integer_sequence<int, static_cast<int>(C::layers)>{});
  } else {
    return Pred<typename window_of<C, Default>::type>::value;
  }
}

template <class C>
struct ffn_of {
  using type = nn::DenseFfn;
};
template <class C>
  requires requires { typename C::Ffn; }
struct ffn_of<C> {
  using type = typename C::Ffn;
};

template <class C>
struct scalar_of {
  using type = float;
};
template <class C>
  requires requires { typename C::Scalar; }
struct scalar_of<C> {
  using type = typename C::Scalar;
};

// ---- reading policy arguments without instantiating the policies ------------------------------

// The MoE spec's numbers, matched from its template arguments (MoE<E, K, R> already carries
// the defaulted balance and shared-expert arguments, so the five-argument pattern matches it).
template <class F>
struct moe_spec : std::false_type {
  static constexpr int experts = 0, top_k = 0, shared = 0;
  static constexpr int groups = 1, top_groups = 1;
};
template <class R>
struct router_groups {
  static constexpr int groups = 1, top_groups = 1;
};
template <int G, int TG, class Base>
struct router_groups<nn::GroupLimited<G, TG, Base>> {
  static constexpr int groups = G, top_groups = TG;
};
template <int N, int K, class R, class B, int S>
struct moe_spec<nn::MoE<nn::Experts<N>, nn::TopK<K>, R, B, nn::SharedExperts<S>>>
    : std::true_type {
  static constexpr int experts = N, top_k = K, shared = S;
  static constexpr int groups = router_groups<R>::groups;
  static constexpr int top_groups = router_groups<R>::top_groups;
};

template <class F>
inline constexpr bool is_ffn_spec = std::is_same_v<F, nn::DenseFfn> || moe_spec<F>::value;

// VariableWindow's size set, matched from its template arguments.
template <class W>
struct variable_window : std::false_type {
  static constexpr bool sizes_ok = true;
};
template <int... S, class Selector, int Block>
struct variable_window<nn::VariableWindow<nn::Sizes<S...>, Selector, Block>> : std::true_type {
  static constexpr bool sizes_ok = [] {
    constexpr int v[] = {S..., 0};
    for (int i = 0; i + 1 < static_cast<int>(sizeof...(S)); ++i)
      if (v[i] >= v[i + 1]) return false;
    return sizeof...(S) > 0 && ((S > 0) && ...);
  }();
};

template <class T>
inline constexpr bool is_supported_scalar = std::is_same_v<T, float> || std::is_same_v<T, double> ||
                                            std::is_same_v<T, bf16> || std::is_same_v<T, fp16>;

// The window rules as class templates, for every_layer_window. Each is guarded by the ones
// before it, so a policy is instantiated only after its arguments were found sound.
template <class W>
struct window_sizes_ok : std::bool_constant<variable_window<W>::sizes_ok> {};
template <class W>
struct window_is_policy {
  static constexpr bool value = [] {
    if constexpr (variable_window<W>::sizes_ok) {
      return nn::WindowPolicy<W>;
    } else {
      return false;
    }
  }();
};
template <class W>
struct window_is_causal {
  static constexpr bool value = [] {
    if constexpr (window_is_policy<W>::value) {
      return W::kCausal;
    } else {
      return false;
    }
  }();
};

}  // namespace config_detail

// The default policies of each model kind.
using DecoderDefaultWindow = nn::CausalFull;
using EncoderDefaultWindow = nn::Bidirectional;

template <class C>
using decoder_window_t = typename config_detail::window_of<C, DecoderDefaultWindow>::type;
template <class C>
using encoder_window_t = typename config_detail::window_of<C, EncoderDefaultWindow>::type;
template <class C>
using ffn_t = typename config_detail::ffn_of<C>::type;
template <class C>
using scalar_t = typename config_detail::scalar_of<C>::type;

// One concept per rule, so that a failed `static_assert(DecoderConfig<X>)` names the rule.
// Each assumes the rules listed before it (the conjunctions below check them in order).
namespace rules {

template <class C>
concept HasModelNumbers = requires {
  { C::vocab } -> std::convertible_to<int64_t>;
  { C::d_model } -> std::convertible_to<int64_t>;
  { C::layers } -> std::convertible_to<int64_t>;
  { C::heads } -> std::convertible_to<int64_t>;
};
template <class C>
concept VocabAtLeastOne = (C::vocab >= 1);
template <class C>
concept DModelAtLeastOne = (C::d_model >= 1);
template <class C>
concept LayersAtLeastOne = (C::layers >= 1);
template <class C>
concept HeadsDivideDModel = (C::heads >= 1) && (C::d_model % C::heads == 0);
template <class C>
concept KvHeadsDivideHeads =
    (config_detail::kv_heads<C>() >= 1) && (C::heads % config_detail::kv_heads<C>() == 0);
template <class C>
concept HeadDimEven = ((C::d_model / C::heads) % 2 == 0);
template <class C>
concept MaxSeqAtLeastOne = (config_detail::max_seq<C>() >= 1);
template <class C>
concept DenseLayersInRange =
    (config_detail::dense_layers<C>() >= 0) && (config_detail::dense_layers<C>() <= C::layers);
template <class C>
concept FfnHiddenAtLeastOne = (config_detail::ffn_hidden<C>() >= 1);
template <class C>
concept AttentionBlockAtLeastOne = (config_detail::attention_block<C>() >= 1);
template <class C>
concept NormEpsNonNegative = (config_detail::norm_eps<C>() >= 0.0);
template <class C>
concept CapacityFactorNonNegative = (config_detail::capacity_factor<C>() >= 0.0);
template <class C>
concept ScalarSupported = config_detail::is_supported_scalar<scalar_t<C>>;

template <class C>
concept FfnIsSpec = config_detail::is_ffn_spec<ffn_t<C>>;
template <class C>
concept TopKWithinExperts =
    (config_detail::moe_spec<ffn_t<C>>::top_k <= config_detail::moe_spec<ffn_t<C>>::experts);
template <class C>
concept GroupsDivideExperts = (config_detail::moe_spec<ffn_t<C>>::experts %
                                   config_detail::moe_spec<ffn_t<C>>::groups ==
                               0);
template <class C>
concept TopKWithinTopGroups =
    (config_detail::moe_spec<ffn_t<C>>::top_k <=
     config_detail::moe_spec<ffn_t<C>>::top_groups *
         (config_detail::moe_spec<ffn_t<C>>::experts / config_detail::moe_spec<ffn_t<C>>::groups));

template <class W>
concept WindowSizesIncreasing = config_detail::variable_window<W>::sizes_ok;
template <class W>
concept WindowIsPolicy = nn::WindowPolicy<W>;
template <class W>
concept WindowIsCausal = (W::kCausal == true);

template <class C>
concept ClassesAtLeastTwo = (config_detail::classes<C>() >= 2);

// Per-layer windows (`WindowAt<Layer>`): the window rules, for every layer. D is the model
// kind's default window. Without WindowAt they hold trivially (the config's Window is checked
// by the rules above).
template <class C, class D>
concept LayerWindowSizesIncreasing =
    !config_detail::HasWindowAt<C> ||
    config_detail::every_layer_window<C, D, config_detail::window_sizes_ok>();
template <class C, class D>
concept LayerWindowsArePolicies =
    !config_detail::HasWindowAt<C> ||
    config_detail::every_layer_window<C, D, config_detail::window_is_policy>();
template <class C, class D>
concept LayerWindowsCausal = !config_detail::HasWindowAt<C> ||
                             config_detail::every_layer_window<C, D, config_detail::window_is_causal>();

// Everything a decoder and an encoder share, given the window the model kind defaults to.
template <class C, class W>
concept ModelConfig =
    HasModelNumbers<C> && VocabAtLeastOne<C> && DModelAtLeastOne<C> && LayersAtLeastOne<C> &&
    HeadsDivideDModel<C> && KvHeadsDivideHeads<C> && HeadDimEven<C> && MaxSeqAtLeastOne<C> &&
    DenseLayersInRange<C> && FfnHiddenAtLeastOne<C> && AttentionBlockAtLeastOne<C> &&
    NormEpsNonNegative<C> && CapacityFactorNonNegative<C> && ScalarSupported<C> &&
    FfnIsSpec<C> && TopKWithinExperts<C> && GroupsDivideExperts<C> && TopKWithinTopGroups<C> &&
    WindowSizesIncreasing<W> && WindowIsPolicy<W> && LayerWindowSizesIncreasing<C, W> &&
    LayerWindowsArePolicies<C, W>;

}  // namespace rules

// A decoder (language model) config: the shared rules plus a causal window.
template <class C>
concept DecoderConfig = rules::ModelConfig<C, decoder_window_t<C>> &&
                        rules::WindowIsCausal<decoder_window_t<C>> &&
                        rules::LayerWindowsCausal<C, decoder_window_t<C>>;

// An encoder (classifier) config: the shared rules plus `classes >= 2`.
template <class C>
concept EncoderConfig =
    rules::ModelConfig<C, encoder_window_t<C>> && rules::ClassesAtLeastTwo<C>;

namespace config_detail {

// The shared rules, one static_assert each; W is the model kind's window.
template <class C, class W>
constexpr bool check_model_config() {
  static_assert(requires { C::vocab; },
                "tessera config: missing `static constexpr int vocab` (the vocabulary size)");
  static_assert(requires { C::d_model; },
                "tessera config: missing `static constexpr int d_model` (the hidden width)");
  static_assert(requires { C::layers; },
                "tessera config: missing `static constexpr int layers` (the number of blocks)");
  static_assert(requires { C::heads; },
                "tessera config: missing `static constexpr int heads` (attention query heads)");
  if constexpr (rules::HasModelNumbers<C>) {
    static_assert(rules::VocabAtLeastOne<C>, "tessera config: vocab must be >= 1");
    static_assert(rules::DModelAtLeastOne<C>, "tessera config: d_model must be >= 1");
    static_assert(rules::LayersAtLeastOne<C>, "tessera config: layers must be >= 1");
    static_assert(rules::HeadsDivideDModel<C>,
                  "tessera config: heads must divide d_model (head_dim = d_model / heads); "
                  "change heads or d_model");
    static_assert(rules::KvHeadsDivideHeads<C>,
                  "tessera config: kv_heads must divide heads (grouped-query attention shares "
                  "each kv head among heads / kv_heads query heads)");
    if constexpr (rules::HeadsDivideDModel<C>) {
      static_assert(rules::HeadDimEven<C>,
                    "tessera config: head_dim = d_model / heads must be even (RoPE rotates pairs "
                    "of features)");
    }
    static_assert(rules::MaxSeqAtLeastOne<C>, "tessera config: max_seq must be >= 1");
    static_assert(rules::DenseLayersInRange<C>,
                  "tessera config: dense_layers must be in [0, layers] (the first dense_layers "
                  "blocks use a dense FFN)");
    static_assert(rules::FfnHiddenAtLeastOne<C>, "tessera config: ffn_hidden must be >= 1");
    static_assert(rules::AttentionBlockAtLeastOne<C>,
                  "tessera config: attention_block must be >= 1");
    static_assert(rules::NormEpsNonNegative<C>, "tessera config: norm_eps must be >= 0");
    static_assert(rules::CapacityFactorNonNegative<C>,
                  "tessera config: capacity_factor must be >= 0 (0 = no capacity limit)");
  }
  static_assert(rules::ScalarSupported<C>,
                "tessera config: Scalar must be float, double, bf16 or fp16");
  static_assert(rules::FfnIsSpec<C>,
                "tessera config: Ffn must be DenseFfn or MoE<Experts<N>, TopK<K>, Router, "
                "Balance, SharedExperts<S>>");
  if constexpr (rules::FfnIsSpec<C>) {
    static_assert(rules::TopKWithinExperts<C>,
                  "tessera config: MoE top-k must not exceed the number of experts "
                  "(TopK<K> with K <= Experts<N>)");
    static_assert(rules::GroupsDivideExperts<C>,
                  "tessera config: GroupLimited<Groups, TopGroups>: Groups must divide the "
                  "number of experts");
    if constexpr (rules::TopKWithinExperts<C> && rules::GroupsDivideExperts<C>) {
      static_assert(rules::TopKWithinTopGroups<C>,
                    "tessera config: MoE top-k exceeds the experts inside the TopGroups chosen "
                    "groups (TopGroups * Experts / Groups)");
    }
  }
  static_assert(rules::WindowSizesIncreasing<W>,
                "tessera config: VariableWindow sizes must be positive and strictly increasing, "
                "e.g. Sizes<128, 512, kFull>");
  if constexpr (rules::WindowSizesIncreasing<W>) {
    static_assert(rules::WindowIsPolicy<W>,
                  "tessera config: Window must be a window policy (CausalFull, Bidirectional, "
                  "SlidingWindow<W>, LocalGlobal<W, G>, VariableWindow<...>)");
  }
  if constexpr (rules::HasModelNumbers<C> && rules::LayersAtLeastOne<C> &&
                config_detail::HasWindowAt<C>) {
    static_assert(rules::LayerWindowSizesIncreasing<C, W>,
                  "tessera config: WindowAt<Layer>: a layer's VariableWindow sizes must be "
                  "positive and strictly increasing, e.g. Sizes<128, 512, kFull>");
    if constexpr (rules::LayerWindowSizesIncreasing<C, W>) {
      static_assert(rules::LayerWindowsArePolicies<C, W>,
                    "tessera config: WindowAt<Layer> must name a window policy for every layer "
                    "0 .. layers-1 (CausalFull, Bidirectional, SlidingWindow<W>, LocalGlobal<W, "
                    "G>, VariableWindow<...>)");
    }
  }
  return true;
}

}  // namespace config_detail

// Checks a decoder config with one readable static_assert per rule; true when it passes.
template <class C>
constexpr bool check_decoder_config() {
  using W = decoder_window_t<C>;
  config_detail::check_model_config<C, W>();
  // Nested, not `&&`: naming WindowIsPolicy<W> instantiates W, whose own static_asserts would
  // then repeat what check_model_config already said.
  if constexpr (rules::WindowSizesIncreasing<W>) {
    if constexpr (rules::WindowIsPolicy<W>) {
      static_assert(rules::WindowIsCausal<W>,
                    "tessera config: a decoder's Window must be causal (with Bidirectional a "
                    "token reads the token it is trained to predict)");
    }
  }
  if constexpr (rules::HasModelNumbers<C> && rules::LayersAtLeastOne<C> &&
                config_detail::HasWindowAt<C>) {
    if constexpr (rules::LayerWindowsArePolicies<C, W>) {
      static_assert(rules::LayerWindowsCausal<C, W>,
                    "tessera config: a decoder's WindowAt<Layer> must be causal for every layer "
                    "(with Bidirectional a token reads the token it is trained to predict)");
    }
  }
  return DecoderConfig<C>;
}

// Checks an encoder config with one readable static_assert per rule; true when it passes.
template <class C>
constexpr bool check_encoder_config() {
  config_detail::check_model_config<C, encoder_window_t<C>>();
  static_assert(rules::ClassesAtLeastTwo<C>,
                "tessera config: an encoder needs `static constexpr int classes` >= 2 (the "
                "outputs of its classification head)");
  return EncoderConfig<C>;
}

// A config with every optional member resolved: what the models read. Instantiate it only
// for a config that passed its check.
template <class C, class DefaultWindow>
struct ResolvedConfig {
  static constexpr int64_t vocab = C::vocab;
  static constexpr int64_t d_model = C::d_model;
  static constexpr int64_t layers = C::layers;
  static constexpr int64_t heads = C::heads;
  static constexpr int64_t kv_heads = config_detail::kv_heads<C>();
  static constexpr int64_t head_dim = C::d_model / C::heads;
  static constexpr int64_t ffn_hidden = config_detail::ffn_hidden<C>();
  static constexpr int64_t max_seq = config_detail::max_seq<C>();
  static constexpr int64_t dense_layers = config_detail::dense_layers<C>();
  static constexpr bool tie_embeddings = config_detail::tie_embeddings<C>();
  static constexpr double rope_theta = config_detail::rope_theta<C>();
  static constexpr double norm_eps = config_detail::norm_eps<C>();
  static constexpr int64_t attention_block = config_detail::attention_block<C>();
  static constexpr double capacity_factor = config_detail::capacity_factor<C>();
  static constexpr double window_penalty = config_detail::window_penalty<C>();
  static constexpr int64_t classes = config_detail::classes<C>();
  using Window = typename config_detail::window_of<C, DefaultWindow>::type;
  // Layer l's window: the config's WindowAt<l> when it has one, else Window.
  static constexpr bool kPerLayerWindow = config_detail::HasWindowAt<C>;
  template <int Layer>
  using WindowAt = typename config_detail::window_at<C, DefaultWindow, Layer>::type;
  using Ffn = ffn_t<C>;
  using Scalar = scalar_t<C>;

  static constexpr bool kMoE = config_detail::moe_spec<Ffn>::value;
  static constexpr int64_t experts = config_detail::moe_spec<Ffn>::experts;
  static constexpr int64_t top_k = config_detail::moe_spec<Ffn>::top_k;
  static constexpr int64_t shared_experts = config_detail::moe_spec<Ffn>::shared;
  // Each expert's hidden width: by default the dense width split over the experts a token
  // uses, so an MoE layer does about the dense layer's work per token.
  static constexpr int64_t moe_hidden = [] {
    if constexpr (requires { C::moe_hidden; }) {
      return static_cast<int64_t>(C::moe_hidden);
    } else if constexpr (kMoE) {
      return (ffn_hidden + top_k + shared_experts - 1) / (top_k + shared_experts);
    } else {
      return ffn_hidden;
    }
  }();
  static_assert(moe_hidden >= 1, "tessera config: moe_hidden must be >= 1");
};

}  // namespace tessera::models

// The config vocabulary is reachable from the top-level namespace, as in the API sketch
// (`ts::MoE<ts::Experts<16>, ...>`, `static_assert(ts::DecoderConfig<TinyR1>)`).
namespace tessera {
using models::check_decoder_config;
using models::check_encoder_config;
using models::DecoderConfig;
using models::EncoderConfig;
using nn::AuxLossBalance;
using nn::AuxLossBalanceOf;
using nn::BiasBalance;
using nn::BiasBalanceOf;
using nn::DenseFfn;
using nn::Experts;
using nn::GroupLimited;
using nn::MoE;
using nn::NoBalance;
using nn::SharedExperts;
using nn::TopK;
using nn::TopKSigmoid;
using nn::TopKSoftmax;
using nn::TopKSoftmaxRenorm;
}  // namespace tessera
