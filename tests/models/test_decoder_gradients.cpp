// tests/models/test_decoder_gradients.cpp — a two-layer Decoder end to end in double: the loss
// against an independent computation (plain-loop head and cross-entropy over the layers'
// forwards) and every parameter's gradient, sampled elements of every tensor, against central
// differences of that loss (the straight-through surrogate where the window is learned, see
// model_testing.hpp). Two configs cover the model's options between them:
//   A: untied head, 1 dense + 1 MoE block, VariableWindow with the heuristic selector, softmax
//      top-2 of 4 experts with the aux-loss balance and a shared expert;
//   B: tied head, 2 MoE blocks, VariableWindow with the learned selector (penalty 0.05),
//      group-limited sigmoid routing with the bias balance (a non-zero bias).
// Also: loss_scale (exactly scales every gradient), accumulation, determinism, errors.
#define BOOST_TEST_MODULE test_decoder_gradients
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <string>
#include <vector>

#include "model_testing.hpp"
#include "tessera/core/error.hpp"
#include "tessera/models/decoder.hpp"

namespace ts = tessera;
namespace nn = tessera::nn;
using models_test::Decisions;
using ts::Seed;
using ts::Tensor;
using ts::TensorView;

namespace {

struct ConfigA {
  static constexpr int vocab = 11, d_model = 8, layers = 2, heads = 2, kv_heads = 1;
  static constexpr int max_seq = 32, dense_layers = 1, ffn_hidden = 6, attention_block = 4;
  using Window = ts::VariableWindow<ts::Sizes<3, ts::kFull>, ts::HeuristicSelector, 4>;
  using Ffn = ts::MoE<ts::Experts<4>, ts::TopK<2>, ts::TopKSoftmax, ts::AuxLossBalanceOf<0.1>,
                      ts::SharedExperts<1>>;
  using Scalar = double;
};

struct ConfigB : ConfigA {
  static constexpr int dense_layers = 0;
  static constexpr bool tie_embeddings = true;
  static constexpr double window_penalty = 0.05;
  using Window = ts::VariableWindow<ts::Sizes<3, ts::kFull>, ts::LearnedSelector, 4>;
  using Ffn = ts::MoE<ts::Experts<6>, ts::TopK<2>, ts::GroupLimited<3, 2>, ts::BiasBalance>;
};

constexpr int64_t kB = 2, kT = 10;

Tensor<int32_t> tokens_for(int32_t vocab) { return models_test::random_ids({kB, kT}, vocab, 31); }
Tensor<int32_t> targets_for(int32_t vocab) {
  Tensor<int32_t> t = models_test::random_ids({kB, kT}, vocab, 32);
  t.data()[3] = ts::models::kIgnoreIndex;  // one ignored position
  return t;
}

template <class Config>
void prepare(ts::Decoder<Config>& m) {
  // A non-zero selection bias, so the bias balance's path is exercised.
  int k = 0;
  m.visit_buffers([&](std::string_view, auto& b) {
    for (int64_t i = 0; i < b.numel(); ++i) b.data()[i] = 0.02f * float((i + k) % 3 - 1);
    ++k;
  });
}

// The surrogate loss of the model at its current parameters; decisions into `dec`, the
// cross-entropy part into `ce`.
template <class Config>
double surrogate_loss(ts::Decoder<Config>& m, const Tensor<int32_t>& tokens,
                      const Tensor<int32_t>& targets,
                      const typename ts::Decoder<Config>::Saved& base, Decisions& dec,
                      double& ce) {
  double aux = 0.0;
  const Tensor<double> hn = models_test::trunk_surrogate(m, tokens, base, aux, dec);  // (B, T, C)
  const Tensor<double> logits =
      models_test::times_transposed(hn.data(), kB * kT, m.lm_head_weight().value);  // (B*T, V)
  ce = models_test::mean_cross_entropy(logits, targets.data(), kB * kT, Config::vocab);
  return ce + aux;
}

template <class Config>
void check_decoder(const char* what, uint64_t seed) {
  using Model = ts::Decoder<Config>;
  std::printf("%s: model seed %llu, tokens seed 31, targets seed 32\n", what,
              (unsigned long long)seed);
  Model m{Seed{seed}};
  prepare(m);
  const Tensor<int32_t> tokens = tokens_for(Config::vocab), targets = targets_for(Config::vocab);
  typename Model::Saved saved;
  const ts::models::ModelStats st = m.forward(tokens, targets, saved);
  m.zero_grad();
  m.backward(saved);

  // The reported loss: cross-entropy computed another way, plus the blocks' aux losses.
  Decisions base;
  double ce = 0.0;
  (void)surrogate_loss(m, tokens, targets, saved, base, ce);
  BOOST_TEST(st.cross_entropy == ce, boost::test_tools::tolerance(1e-12));
  double aux = 0.0;
  for (const auto& l : st.layers) aux += l.window_penalty + l.moe_aux_loss;
  BOOST_TEST(st.aux_loss == aux, boost::test_tools::tolerance(1e-14));
  BOOST_TEST(st.loss == st.cross_entropy + st.aux_loss, boost::test_tools::tolerance(1e-14));
  BOOST_TEST(st.targets == kB * kT - 1);
  BOOST_TEST(st.layers.size() == 2u);

  int flips = 0, probes = 0;
  auto loss = [&] {
    Decisions d;
    double c = 0.0;
    const double l = surrogate_loss(m, tokens, targets, saved, d, c);
    ++probes;
    if (!(d == base)) ++flips;
    return l;
  };
  models_test::check_parameters([&](auto f) { m.visit_parameters(f); }, loss, what, 6, 1e-6, 3e-9);
  BOOST_TEST(models_test::gradient_mass([&](auto f) { m.visit_parameters(f); }) > 0.0);
  BOOST_TEST_MESSAGE(what << ": " << probes << " probes, " << flips << " decision flips");
  BOOST_REQUIRE_MESSAGE(flips == 0, what << ": a probe flipped a window or expert choice");
}

// Every gradient, flattened in visiting order.
template <class Model>
std::vector<double> grads(Model& m) {
  std::vector<double> g;
  m.visit_parameters([&](std::string_view, nn::Parameter<double>& p) {
    g.insert(g.end(), p.grad.data(), p.grad.data() + p.grad.numel());
  });
  return g;
}

}  // namespace

BOOST_AUTO_TEST_CASE(config_a_every_parameter_matches_central_differences) {
  check_decoder<ConfigA>("decoder A (heuristic window, softmax MoE + aux loss, untied)", 41);
}

BOOST_AUTO_TEST_CASE(config_b_every_parameter_matches_central_differences) {
  check_decoder<ConfigB>("decoder B (learned window, group-limited MoE + bias, tied)", 42);
}

// backward(saved, s) is s times backward(saved): exactly, for s a power of two (every
// gradient is linear in the upstream one, and halving commutes with rounding), which includes
// the aux losses' gradients; and a second backward accumulates onto the first.
BOOST_AUTO_TEST_CASE(loss_scale_and_accumulation) {
  ts::Decoder<ConfigB> m{Seed{42}};
  prepare(m);
  const auto tokens = tokens_for(ConfigB::vocab), targets = targets_for(ConfigB::vocab);
  ts::Decoder<ConfigB>::Saved s;
  (void)m.forward(tokens, targets, s);
  m.zero_grad();
  m.backward(s);
  const std::vector<double> full = grads(m);
  m.zero_grad();
  m.backward(s, 0.5);
  const std::vector<double> half = grads(m);
  m.backward(s, 0.5);
  const std::vector<double> twice_half = grads(m);
  BOOST_REQUIRE(full.size() == half.size());
  int64_t mismatched = 0;
  for (size_t i = 0; i < full.size(); ++i) {
    mismatched += half[i] != 0.5 * full[i];
    // Accumulation adds in another order where a tensor receives two contributions (the tied
    // table: head and embedding), so only to within rounding there.
    mismatched += !(std::fabs(twice_half[i] - full[i]) <= 1e-15 * std::fabs(full[i]));
  }
  BOOST_TEST(mismatched == 0);
}

BOOST_AUTO_TEST_CASE(same_seed_same_model_other_seed_other_model) {
  const auto tokens = tokens_for(ConfigA::vocab), targets = targets_for(ConfigA::vocab);
  ts::Decoder<ConfigA> a{Seed{7}}, b{Seed{7}}, c{Seed{8}};
  ts::Decoder<ConfigA>::Saved sa, sb, sc;
  const double la = a.forward(tokens, targets, sa).loss;
  const double lb = b.forward(tokens, targets, sb).loss;
  const double lc = c.forward(tokens, targets, sc).loss;
  BOOST_TEST(la == lb);
  BOOST_TEST(la != lc);
  a.zero_grad();
  b.zero_grad();
  a.backward(sa);
  b.backward(sb);
  BOOST_TEST(grads(a) == grads(b));
}

BOOST_AUTO_TEST_CASE(errors_name_the_tensor) {
  ts::Decoder<ConfigA> m{Seed{1}};
  ts::Decoder<ConfigA>::Saved s;
  auto has = [](const std::string& what) {
    return [what](const ts::Error& e) {
      const bool ok = std::string(e.what()).find(what) != std::string::npos;
      if (!ok) std::printf("unexpected message: %s\n", e.what());
      return ok;
    };
  };
  const auto tokens = tokens_for(ConfigA::vocab);
  BOOST_CHECK_EXCEPTION(m.backward(s), ts::Error, has("call forward(tokens, targets, saved)"));
  BOOST_CHECK_EXCEPTION((void)m.forward(tokens, Tensor<int32_t>::zeros({kB, kT + 1}), s), ts::Error,
                        has("'targets'"));
  BOOST_CHECK_EXCEPTION(
      (void)m.forward(tokens, Tensor<int32_t>::full({kB, kT}, ts::models::kIgnoreIndex), s),
      ts::Error, has("nothing to predict"));
  auto bad = tokens.clone();
  bad.data()[5] = ConfigA::vocab;
  BOOST_CHECK_EXCEPTION((void)m.forward(bad, s), ts::Error, has("out of range for vocab size 11"));
  BOOST_CHECK_EXCEPTION((void)m.forward(Tensor<int32_t>::zeros({1, 33}), s), ts::Error,
                        has("exceeds the config's max_seq = 32"));
  BOOST_CHECK_EXCEPTION((void)m.forward(Tensor<int32_t>::zeros({6}), s), ts::Error, has("'tokens'"));
  // Inference forward gives the logits and leaves nothing for backward.
  const Tensor<double> logits = m.forward(tokens, s);
  BOOST_TEST(logits.shape() == ts::Shape({kB, kT, ConfigA::vocab}));
  BOOST_CHECK_THROW(m.backward(s), ts::Error);
}

BOOST_AUTO_TEST_CASE(next_token_batch_shifts_by_one) {
  const auto seq = Tensor<int32_t>::from({2, 4}, {1, 2, 3, 4, 5, 6, 7, 8});
  const auto b = ts::models::next_token_batch(seq);
  BOOST_TEST(std::vector<int32_t>(b.tokens.data(), b.tokens.data() + 6) ==
                 std::vector<int32_t>({1, 2, 3, 5, 6, 7}),
             boost::test_tools::per_element());
  BOOST_TEST(std::vector<int32_t>(b.targets.data(), b.targets.data() + 6) ==
                 std::vector<int32_t>({2, 3, 4, 6, 7, 8}),
             boost::test_tools::per_element());
  BOOST_CHECK_THROW((void)ts::models::next_token_batch(Tensor<int32_t>::zeros({2, 1})), ts::Error);
}
