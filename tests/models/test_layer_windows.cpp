// tests/models/test_layer_windows.cpp — per-layer window policies (`template <int Layer> using
// WindowAt = ...;` in a config, docs/models.md):
//   * a two-layer Decoder whose layer 0 reads a sliding window and layer 1 full causal
//     attention gives, bit for bit, the logits of the same stack built by hand from two
//     TransformerBlocks of those two types (same seeds, same streams);
//   * its reported per-layer work matches each policy (sliding window < 1, full = 1);
//   * the loss and every parameter's gradient (sampled elements) match central differences in
//     double (the same check as test_decoder_gradients);
//   * an Encoder with alternating LocalGlobal / Bidirectional layers runs and names its windows;
//   * a WindowAt that gives every layer the config's Window is the default model, bit for bit.
#define BOOST_TEST_MODULE test_layer_windows
#include <boost/test/unit_test.hpp>

#include <cstdio>
#include <string>
#include <type_traits>
#include <vector>

#include "model_testing.hpp"
#include "tessera/models/decoder.hpp"
#include "tessera/models/encoder.hpp"

namespace ts = tessera;
namespace nn = tessera::nn;
using models_test::Decisions;
using ts::Seed;
using ts::Tensor;

namespace {

struct Alternating {
  static constexpr int vocab = 11, d_model = 8, layers = 2, heads = 2, kv_heads = 1;
  static constexpr int max_seq = 32, dense_layers = 1, ffn_hidden = 6, attention_block = 4;
  template <int Layer>
  using WindowAt = std::conditional_t<Layer % 2 == 0, ts::SlidingWindow<3>, ts::CausalFull>;
  using Ffn = ts::MoE<ts::Experts<4>, ts::TopK<2>, ts::TopKSoftmax, ts::AuxLossBalanceOf<0.1>,
                      ts::SharedExperts<1>>;
  using Scalar = double;
};
static_assert(ts::DecoderConfig<Alternating>);

// The same numbers without WindowAt, and with a WindowAt that repeats Window on every layer.
struct Uniform : Alternating {
  template <int Layer>
  using WindowAt = ts::CausalFull;  // the decoder's default Window, on every layer
};
struct BothSliding : Alternating {
  template <int Layer>
  using WindowAt = ts::SlidingWindow<3>;
};
struct Enc {
  static constexpr int vocab = 11, d_model = 8, layers = 3, heads = 2, classes = 3;
  static constexpr int max_seq = 32, attention_block = 4;
  template <int Layer>
  using WindowAt = std::conditional_t<Layer == 1, ts::Bidirectional, ts::LocalGlobal<3, 1, false>>;
  using Scalar = double;
};
struct Default {
  static constexpr int vocab = 11, d_model = 8, layers = 2, heads = 2, kv_heads = 1;
  static constexpr int max_seq = 32, dense_layers = 1, ffn_hidden = 6, attention_block = 4;
  using Ffn = Alternating::Ffn;
  using Scalar = double;
};

constexpr int64_t kB = 2, kT = 10;

BOOST_AUTO_TEST_CASE(layers_are_the_hand_built_blocks) {
  using Model = ts::Decoder<Alternating>;
  using R = Model::Resolved;
  static_assert(std::is_same_v<R::WindowAt<0>, ts::SlidingWindow<3>> &&
                std::is_same_v<R::WindowAt<1>, ts::CausalFull>);
  const uint64_t seed = 17;
  Model m{Seed{seed}};
  const Tensor<int32_t> tokens = models_test::random_ids({kB, kT}, R::vocab, 5);
  Model::Saved saved;
  const Tensor<double> logits = m.forward(tokens, saved);

  // By hand: the trunk's documented layout and streams (models/trunk.hpp, docs/models.md).
  nn::BlockOptions o;
  o.attention.block = R::attention_block;
  o.attention.max_seq = R::max_seq;
  o.norm_eps = R::norm_eps;
  nn::Embedding<double> embed(R::vocab, R::d_model, Seed{seed}, 0);
  nn::TransformerBlock<double, ts::SlidingWindow<3>, nn::DenseFfn> b0(
      R::d_model, R::heads, R::kv_heads, R::ffn_hidden, Seed{seed}, 1, o);
  nn::TransformerBlock<double, ts::CausalFull, R::Ffn> b1(R::d_model, R::heads, R::kv_heads,
                                                          R::moe_hidden, Seed{seed}, 2, o);
  nn::RMSNorm<double> norm(R::d_model, R::norm_eps);
  nn::Linear<double> head(R::d_model, R::vocab, false, Seed{seed}, 1,
                          nn::Embedding<double>::kDefaultStddev);
  nn::Embedding<double>::Saved es;
  decltype(b0)::Saved s0;
  decltype(b1)::Saved s1;
  nn::RMSNorm<double>::Saved ns;
  nn::Linear<double>::Saved hs;
  const Tensor<double> expected =
      head.forward(norm.forward(b1.forward(b0.forward(embed.forward(tokens, es), s0), s1), ns), hs);
  BOOST_REQUIRE(logits.shape() == expected.shape());
  int64_t differ = 0;
  for (int64_t i = 0; i < logits.numel(); ++i) differ += logits.data()[i] != expected.data()[i];
  BOOST_TEST(differ == 0);

  // The sliding window visits fewer key tiles than full causal attention; layer 1 all of them.
  const auto& st = saved.stats;
  BOOST_REQUIRE(st.layers.size() == 2u);
  BOOST_TEST(st.layers[0].attention_work_fraction < 1.0);
  BOOST_TEST(st.layers[1].attention_work_fraction == 1.0);
  BOOST_TEST(!st.layers[0].moe);
  BOOST_TEST(st.layers[1].moe);
  BOOST_TEST(m.metadata().at("tessera.config").find("window=SlidingWindow") != std::string::npos);

  // The names are the default model's: a checkpoint does not depend on the windows.
  std::vector<std::string> names, default_names;
  m.visit_parameters([&](std::string_view n, nn::Parameter<double>&) { names.emplace_back(n); });
  ts::Decoder<Default> d{Seed{seed}};
  d.visit_parameters(
      [&](std::string_view n, nn::Parameter<double>&) { default_names.emplace_back(n); });
  BOOST_TEST(names == default_names, boost::test_tools::per_element());
}

// Layer 0's sliding window really is per layer: with SlidingWindow<3> first and full causal
// attention second, the last position reads every earlier token (through layer 1), but a
// model whose layers are both SlidingWindow<3> reaches back only 2 (W - 1) positions per layer.
BOOST_AUTO_TEST_CASE(reach_follows_each_layers_window) {
  auto moved_last = [](auto& model, int64_t changed) {
    const Tensor<int32_t> a = models_test::random_ids({1, kT}, Alternating::vocab, 9);
    Tensor<int32_t> b = a.clone();
    b.data()[changed] = (b.data()[changed] + 1) % Alternating::vocab;
    typename std::remove_cvref_t<decltype(model)>::Saved sa, sb;
    const Tensor<double> la = model.forward(a, sa), lb = model.forward(b, sb);
    bool moved = false;
    for (int64_t v = 0; v < Alternating::vocab; ++v)
      moved |= la.data()[(kT - 1) * Alternating::vocab + v] !=
               lb.data()[(kT - 1) * Alternating::vocab + v];
    return moved;
  };
  ts::Decoder<Alternating> alt{Seed{3}};
  ts::Decoder<BothSliding> both{Seed{3}};
  BOOST_TEST(moved_last(alt, 0));    // through layer 1's full causal attention
  BOOST_TEST(!moved_last(both, 0));  // 9 positions back: beyond 2 layers x 2
  BOOST_TEST(moved_last(both, kT - 5));
}

BOOST_AUTO_TEST_CASE(every_parameter_matches_central_differences) {
  using Model = ts::Decoder<Alternating>;
  Model m{Seed{41}};
  const Tensor<int32_t> tokens = models_test::random_ids({kB, kT}, Alternating::vocab, 31);
  Tensor<int32_t> targets = models_test::random_ids({kB, kT}, Alternating::vocab, 32);
  targets.data()[3] = ts::models::kIgnoreIndex;
  Model::Saved saved;
  const ts::models::ModelStats st = m.forward(tokens, targets, saved);
  m.zero_grad();
  m.backward(saved);
  auto surrogate = [&](Decisions& dec, double& ce) {
    double aux = 0.0;
    const Tensor<double> hn = models_test::trunk_surrogate(m, tokens, saved, aux, dec);
    const Tensor<double> logits =
        models_test::times_transposed(hn.data(), kB * kT, m.lm_head_weight().value);
    ce = models_test::mean_cross_entropy(logits, targets.data(), kB * kT, Alternating::vocab);
    return ce + aux;
  };
  Decisions base;
  double ce = 0.0;
  const double loss = surrogate(base, ce);
  BOOST_TEST(st.cross_entropy == ce, boost::test_tools::tolerance(1e-12));
  BOOST_TEST(st.loss == loss, boost::test_tools::tolerance(1e-12));
  int flips = 0;
  auto probe = [&] {
    Decisions d;
    double c = 0.0;
    const double l = surrogate(d, c);
    if (!(d == base)) ++flips;
    return l;
  };
  models_test::check_parameters([&](auto f) { m.visit_parameters(f); }, probe,
                                "decoder with SlidingWindow<3>, CausalFull layers", 6, 1e-6, 3e-9);
  BOOST_TEST(models_test::gradient_mass([&](auto f) { m.visit_parameters(f); }) > 0.0);
  BOOST_REQUIRE_MESSAGE(flips == 0, "a probe flipped an expert choice");
}

BOOST_AUTO_TEST_CASE(window_at_repeating_window_is_the_default_model) {
  ts::Decoder<Uniform> u{Seed{5}};
  ts::Decoder<Default> d{Seed{5}};
  const Tensor<int32_t> tokens = models_test::random_ids({kB, kT}, Default::vocab, 6);
  Tensor<int32_t> targets = models_test::random_ids({kB, kT}, Default::vocab, 7);
  ts::Decoder<Uniform>::Saved su;
  ts::Decoder<Default>::Saved sd;
  BOOST_TEST(u.forward(tokens, targets, su).loss == d.forward(tokens, targets, sd).loss);
  u.zero_grad();
  d.zero_grad();
  u.backward(su);
  d.backward(sd);
  std::vector<double> gu, gd;
  u.visit_parameters([&](std::string_view, nn::Parameter<double>& p) {
    gu.insert(gu.end(), p.grad.data(), p.grad.data() + p.grad.numel());
  });
  d.visit_parameters([&](std::string_view, nn::Parameter<double>& p) {
    gd.insert(gd.end(), p.grad.data(), p.grad.data() + p.grad.numel());
  });
  BOOST_TEST(gu == gd);
}

BOOST_AUTO_TEST_CASE(encoder_with_alternating_local_and_global_layers) {
  static_assert(ts::EncoderConfig<Enc>);
  ts::Encoder<Enc> e{Seed{8}};
  // 30 tokens in tiles of 4: a local window of 3 (+ the global token's tile) reads about 3 of
  // the 8 key tiles, bidirectional attention all 8.
  const Tensor<int32_t> tokens = models_test::random_ids({kB, 30}, Enc::vocab, 4);
  const Tensor<int32_t> labels = Tensor<int32_t>::from({kB}, {0, 2});
  ts::Encoder<Enc>::Saved s;
  const auto st = e.forward(tokens, labels, s);
  BOOST_TEST(std::isfinite(st.loss));
  BOOST_REQUIRE(st.layers.size() == 3u);
  BOOST_TEST(st.layers[0].attention_work_fraction < st.layers[1].attention_work_fraction);
  e.zero_grad();
  e.backward(s);
  BOOST_TEST(models_test::gradient_mass([&](auto f) { e.visit_parameters(f); }) > 0.0);
  const std::string summary = e.metadata().at("tessera.config");
  BOOST_TEST_MESSAGE(summary);
  BOOST_TEST(summary.find("window=LocalGlobal,Bidirectional,LocalGlobal") != std::string::npos);
}

}  // namespace
