// tests/infer/test_kv_cache_windows.cpp — the KV cache under every causal window policy and MoE:
// forward_cached fed in chunks (1, 3, the rest; blocks of 16 and of 4 positions) gives
// Decoder::forward's logits at every position for CausalFull, SlidingWindow<5> and
// LocalGlobal<4, 3>, for a config whose layers have different windows, for VariableWindow with
// the heuristic and the learned selector (query blocks of 4, so the chunks begin blocks with
// their signal rows split between the cache and the chunk), and for a model with MoE blocks
// (GroupLimited routing, a shared expert, a non-zero selection bias; a capacity limit is refused),
// and several sequences through one forward_batch against each alone. The full forward runs
// tessera's tiled attention kernel, which skips key tiles outside the window; the cache path
// masks each key with the policy's `allowed`. (Its own program: eight Decoder instantiations.)
#define BOOST_TEST_MODULE kv_cache_windows
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <iostream>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "cache_check.hpp"

namespace ts = tessera;

namespace {

struct Tiny {
  static constexpr int vocab = 97, d_model = 48, layers = 3, heads = 6, kv_heads = 2;
  static constexpr int ffn_hidden = 40, max_seq = 64, attention_block = 8;
  static constexpr bool tie_embeddings = true;
  static constexpr double rope_theta = 500.0, norm_eps = 1e-5;
};
struct TinySliding : Tiny {
  using Window = ts::nn::SlidingWindow<5>;
};
struct TinyLocalGlobal : Tiny {
  using Window = ts::nn::LocalGlobal<4, 3>;
};
// Per-layer windows (models/config.hpp's WindowAt): sliding, local-global, full.
struct TinyPerLayer : Tiny {
  template <int Layer>
  using WindowAt = std::conditional_t<
      Layer == 0, ts::nn::SlidingWindow<3>,
      std::conditional_t<Layer == 1, ts::nn::LocalGlobal<6, 2>, ts::nn::CausalFull>>;
};

// VariableWindow: query blocks of 4 tokens choose among windows 2, 5 and full causal.
using Sizes3 = ts::nn::Sizes<2, 5, ts::nn::kFull>;
struct TinyVariableHeuristic : Tiny {
  using Window = ts::nn::VariableWindow<Sizes3, ts::nn::HeuristicSelector, 4>;
};
struct TinyVariableLearned : Tiny {
  using Window = ts::nn::VariableWindow<Sizes3, ts::nn::LearnedSelector, 4>;
};
// One dense block, then two MoE blocks: 6 experts in 3 groups, the top 2 groups, top-2 experts,
// a shared expert, bias balancing (its bias is set below so it moves the selection).
struct TinyMoE : Tiny {
  static constexpr int dense_layers = 1, moe_hidden = 16;
  using Ffn = ts::nn::MoE<ts::nn::Experts<6>, ts::nn::TopK<2>, ts::nn::GroupLimited<3, 2>,
                          ts::nn::BiasBalance, ts::nn::SharedExperts<1>>;
};

// The same blocks with a capacity limit: which tokens an expert drops depends on every token of
// a forward, so the cache refuses it. (Same block types as TinyMoE: capacity is a run-time option.)
struct TinyMoECapped : TinyMoE {
  static constexpr double capacity_factor = 1.25;
};

// Runs of repeated tokens between varied ones, so the heuristic selector (whose signal is the
// number of distinct rows in a block's span) picks short windows for some blocks and long ones
// for others.
std::vector<int32_t> mixed_sequence() {
  return {5, 5, 5, 5, 5, 5, 12, 40, 71, 3, 9, 9, 9, 9, 9, 9, 9, 9, 60, 61,
          62, 63, 64, 20, 20, 33, 20, 33, 20, 33, 88, 1, 2, 50, 50, 50, 50};
}

template <class Config>
void check() {
  ts::Decoder<Config> model{ts::Seed{11}};
  // Larger weights than the default init, so attention is far from uniform and a wrong mask
  // shows.
  model.visit_parameters([](std::string_view, ts::nn::Parameter<float>& p) {
    for (int64_t i = 0; i < p.value.numel(); ++i) p.value.data()[i] *= 4.0f;
  });
  std::vector<int32_t> seq;
  for (int i = 0; i < 29; ++i) seq.push_back((i * 37 + 11) % Config::vocab);
  ts::test::check_cache_against_full(model, seq, 2e-5);
  ts::test::check_cache_against_full(model, seq, 2e-5, 4);
}

}  // namespace

// The window sizes the full forward chose, summed over layers: the test means something only
// when more than one size is used.
template <class Config>
std::vector<int64_t> window_histogram(ts::Decoder<Config>& model, const std::vector<int32_t>& seq) {
  ts::Tensor<int32_t> ids(ts::Shape{1, static_cast<int64_t>(seq.size())});
  std::copy(seq.begin(), seq.end(), ids.data());
  typename ts::Decoder<Config>::Saved saved;
  model.forward(ids, saved);
  std::vector<int64_t> total(3, 0);
  for (const auto& layer : saved.stats.layers)
    for (std::size_t i = 0; i < layer.window_histogram.size(); ++i) total[i] += layer.window_histogram[i];
  return total;
}

template <class Config>
void check_variable() {
  ts::Decoder<Config> model{ts::Seed{11}};
  model.visit_parameters([](std::string_view, ts::nn::Parameter<float>& p) {
    for (int64_t i = 0; i < p.value.numel(); ++i) p.value.data()[i] *= 4.0f;
  });
  const std::vector<int32_t> seq = mixed_sequence();
  const std::vector<int64_t> hist = window_histogram(model, seq);
  std::cout << "query blocks per window size (2, 5, full), all layers: " << hist[0] << " "
            << hist[1] << " " << hist[2] << std::endl;
  BOOST_TEST(std::count_if(hist.begin(), hist.end(), [](int64_t v) { return v > 0; }) >= 2);
  ts::test::check_cache_against_full(model, seq, 2e-5);
  ts::test::check_cache_against_full(model, seq, 2e-5, 4);
  // Each sequence keeps its own window history when several decode together (bit for bit with
  // scalar products).
  std::vector<int32_t> other(seq.rbegin(), seq.rend());
  ts::test::check_batch_against_alone(model, {seq, other, {seq.begin(), seq.begin() + 11}}, 3e-5);
}

BOOST_AUTO_TEST_CASE(causal_full) { check<Tiny>(); }
BOOST_AUTO_TEST_CASE(variable_window_heuristic) { check_variable<TinyVariableHeuristic>(); }
BOOST_AUTO_TEST_CASE(variable_window_learned) { check_variable<TinyVariableLearned>(); }

BOOST_AUTO_TEST_CASE(moe_blocks) {
  ts::Decoder<TinyMoE> model{ts::Seed{11}};
  model.visit_parameters([](std::string_view, ts::nn::Parameter<float>& p) {
    for (int64_t i = 0; i < p.value.numel(); ++i) p.value.data()[i] *= 4.0f;
  });
  int64_t biases = 0;
  model.visit_buffers([&](std::string_view, auto& bias) {
    for (int64_t i = 0; i < bias.numel(); ++i) bias.data()[i] = 0.05f * static_cast<float>((i * 7) % 5 - 2);
    ++biases;
  });
  BOOST_TEST(biases == 2);
  std::vector<int32_t> seq;
  for (int i = 0; i < 29; ++i) seq.push_back((i * 37 + 11) % TinyMoE::vocab);
  // 2.3e-5 of the largest logit: the attention's rounding (tiled kernel vs the cache's plain
  // loop), amplified by the scaled experts (the same with TESSERA_CPU_PATH=scalar, whose products
  // sum every row in one order, so it is not the MoE dispatch). A token routed to another expert
  // would move the logits by O(1).
  ts::test::check_cache_against_full(model, seq, 5e-5);
  ts::test::check_cache_against_full(model, seq, 5e-5, 4);
  // Routing is per token (no capacity limit): a token's experts do not depend on the others of
  // the step (bit for bit with scalar products; 1e-5 of the largest logit with BLAS).
  std::vector<int32_t> other(seq.rbegin(), seq.rend());
  ts::test::check_batch_against_alone(model, {seq, other, {seq.begin(), seq.begin() + 11}}, 3e-5);
}
BOOST_AUTO_TEST_CASE(sliding_window_5) { check<TinySliding>(); }
BOOST_AUTO_TEST_CASE(local_global_4_3) { check<TinyLocalGlobal>(); }
BOOST_AUTO_TEST_CASE(per_layer_windows) { check<TinyPerLayer>(); }

BOOST_AUTO_TEST_CASE(moe_capacity_limit_is_refused) {
  ts::Decoder<TinyMoECapped> model{ts::Seed{11}};
  auto cache = ts::infer::make_cache(model);
  const std::vector<int32_t> seq = {1, 2, 3};
  BOOST_CHECK_EXCEPTION(ts::infer::forward_cached(model, seq, cache), ts::Error,
                        [](const ts::Error& e) {
                          std::cout << "refused: " << e.what() << std::endl;
                          return std::string(e.what()).find("capacity_factor = 0") !=
                                 std::string::npos;
                        });
  BOOST_TEST(cache.length == 0);
  BOOST_TEST(cache.block_table().empty());
}
