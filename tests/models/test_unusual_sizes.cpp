// tests/models/test_unusual_sizes.cpp — decoders with sizes that powers of two would hide bugs
// behind: 3 query heads sharing 1 kv head, vocabulary 23, d_model 12, 5 experts with top-3
// plus a shared one, windows of 5 and 37 tokens, query blocks of 7 over T = 45 (not a
// multiple), tiles of 16 over T = 100. Checked: every parameter's gradient (sampled) against
// central differences, the stats' counts, causality (a token changes no earlier logit) and the
// sliding window's reach (a token changes no logit more than layers * (W - 1) positions later),
// both bit for bit.
#define BOOST_TEST_MODULE test_unusual_sizes
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <cstring>
#include <numeric>

#include "model_testing.hpp"
#include "tessera/models/decoder.hpp"

namespace ts = tessera;
namespace nn = tessera::nn;
using models_test::Decisions;
using ts::Seed;
using ts::Tensor;

namespace {

struct Odd {
  static constexpr int vocab = 23, d_model = 12, layers = 3, heads = 3, kv_heads = 1;
  static constexpr int max_seq = 128, dense_layers = 1, ffn_hidden = 10;
  using Window = ts::VariableWindow<ts::Sizes<5, 37, ts::kFull>, ts::HeuristicSelector, 7>;
  using Ffn = ts::MoE<ts::Experts<5>, ts::TopK<3>, ts::TopKSoftmaxRenorm, ts::AuxLossBalance,
                      ts::SharedExperts<1>>;
  using Scalar = double;
};

struct Slide {
  static constexpr int vocab = 23, d_model = 12, layers = 2, heads = 3, kv_heads = 1;
  static constexpr int max_seq = 128, attention_block = 16;
  using Window = ts::SlidingWindow<37>;
  using Scalar = double;
};

constexpr int64_t kB = 3, kT = 45;

// Positions (over the batch's first sequence) whose logits differ between two forwards.
std::vector<bool> changed_positions(const Tensor<double>& a, const Tensor<double>& b, int64_t T,
                                    int64_t V) {
  std::vector<bool> changed(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t)
    changed[t] = std::memcmp(a.data() + t * V, b.data() + t * V, sizeof(double) * V) != 0;
  return changed;
}

}  // namespace

BOOST_AUTO_TEST_CASE(gradients_match_central_differences) {
  using Model = ts::Decoder<Odd>;
  static_assert(Model::Resolved::moe_hidden == 3);  // ceil(10 / (3 + 1))
  Model m{Seed{77}};
  const auto tokens = models_test::random_ids({kB, kT}, Odd::vocab, 78);
  const auto targets = models_test::random_ids({kB, kT}, Odd::vocab, 79);
  Model::Saved saved;
  const ts::models::ModelStats st = m.forward(tokens, targets, saved);
  m.zero_grad();
  m.backward(saved);

  Decisions base;
  auto loss = [&](Decisions& d, double& ce) {
    double aux = 0.0;
    const Tensor<double> hn = models_test::trunk_surrogate(m, tokens, saved, aux, d);
    const Tensor<double> logits =
        models_test::times_transposed(hn.data(), kB * kT, m.lm_head_weight().value);
    ce = models_test::mean_cross_entropy(logits, targets.data(), kB * kT, Odd::vocab);
    return ce + aux;
  };
  double ce = 0.0;
  const double l0 = loss(base, ce);
  BOOST_TEST(st.cross_entropy == ce, boost::test_tools::tolerance(1e-12));
  BOOST_TEST(st.loss == l0, boost::test_tools::tolerance(1e-12));  // no learned penalty here
  int flips = 0;
  models_test::check_parameters(
      [&](auto f) { m.visit_parameters(f); },
      [&] {
        Decisions d;
        double c = 0.0;
        const double v = loss(d, c);
        flips += !(d == base);
        return v;
      },
      "decoder Odd (3 heads / 1 kv, 5 experts top-3, windows 5/37/full in blocks of 7, T = 45)", 4,
      1e-6, 3e-9);
  BOOST_REQUIRE_MESSAGE(flips == 0, "a probe flipped a window or expert choice");

  // Counts: every layer saw 3 x ceil(45 / 7) = 21 query blocks, each MoE layer 135 tokens x 3.
  BOOST_REQUIRE(st.layers.size() == 3u);
  for (const auto& l : st.layers) {
    BOOST_TEST(std::accumulate(l.window_histogram.begin(), l.window_histogram.end(), int64_t{0}) == 21);
    BOOST_TEST(l.attention_work_fraction > 0.0);
    BOOST_TEST(l.attention_work_fraction <= 1.0);
  }
  BOOST_TEST(!st.layers[0].moe);
  for (int i = 1; i < 3; ++i) {
    BOOST_TEST(st.layers[i].moe);
    BOOST_TEST(std::accumulate(st.layers[i].expert_load.begin(), st.layers[i].expert_load.end(),
                               int64_t{0}) == kB * kT * 3);
    BOOST_TEST(st.layers[i].moe_active_fraction == 4.0 / 6.0, boost::test_tools::tolerance(1e-12));
  }
  // Active parameters: everything but the routed experts, plus 3 of the 5 per MoE layer.
  const double expert = 3.0 * 12 * 3;
  const double total = static_cast<double>(m.parameter_count());
  BOOST_TEST(st.active_parameter_fraction == (total - 2 * 2 * expert) / total,
             boost::test_tools::tolerance(1e-12));
}

// Changing token j leaves every logit before j bit-identical (causality through embedding,
// windows, selector, MoE and head), and changes the logit at j.
BOOST_AUTO_TEST_CASE(a_token_changes_no_earlier_logit) {
  ts::Decoder<Odd> m{Seed{5}};
  auto tokens = models_test::random_ids({1, kT}, Odd::vocab, 6);
  ts::Decoder<Odd>::Saved s;
  const Tensor<double> before = m.forward(tokens, s);
  for (int64_t j : {0, 20, 44}) {
    auto changed = tokens.clone();
    changed.data()[j] = (changed.data()[j] + 5) % Odd::vocab;
    const std::vector<bool> diff = changed_positions(before, m.forward(changed, s), kT, Odd::vocab);
    for (int64_t t = 0; t < j; ++t) BOOST_TEST(!diff[t], "position " << t << " read token " << j);
    BOOST_TEST(diff[j]);
  }
}

// A sliding window of 37 over 2 layers: token j reaches positions j .. j + 72 and no further.
BOOST_AUTO_TEST_CASE(sliding_window_reach_is_layers_times_window) {
  ts::Decoder<Slide> m{Seed{9}};
  constexpr int64_t T = 100, j = 5, reach = 2 * (37 - 1);
  auto tokens = models_test::random_ids({1, T}, Slide::vocab, 10);
  ts::Decoder<Slide>::Saved s;
  const Tensor<double> before = m.forward(tokens, s);
  const double work = s.stats.attention_work_fraction;
  tokens.data()[j] = (tokens.data()[j] + 7) % Slide::vocab;
  const std::vector<bool> diff = changed_positions(before, m.forward(tokens, s), T, Slide::vocab);
  for (int64_t t = 0; t < T; ++t) {
    if (t < j || t > j + reach) {
      BOOST_TEST(!diff[t], "position " << t << " changed");
    }
  }
  BOOST_TEST(diff[j]);
  BOOST_TEST(diff[j + reach]);  // the farthest position it reaches
  // T = 100 in tiles of 16 (7 query blocks, the last partial): each block reads keys
  // [q0 - 36, q1): 1, 2, 3, then 4 tiles; 22 of the 28 tiles full causal attention reads.
  BOOST_TEST(work == 22.0 / 28.0, boost::test_tools::tolerance(1e-12));
}
