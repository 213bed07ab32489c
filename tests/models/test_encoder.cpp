// tests/models/test_encoder.cpp — the Encoder (bidirectional blocks, mean pooling, a linear
// classification head) in double: the loss against an independent computation (pooling, head
// and cross-entropy in plain loops over the layers' forwards), every parameter's gradient
// (sampled) against central differences, that every token reads every other (bidirectional),
// a save/load round trip, training on a toy task, and errors.
#define BOOST_TEST_MODULE test_encoder
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <string>
#include <unistd.h>
#include <vector>

#include "model_testing.hpp"
#include "tessera/core/error.hpp"
#include "tessera/models/encoder.hpp"

namespace ts = tessera;
namespace nn = tessera::nn;
using models_test::Decisions;
using ts::Seed;
using ts::Tensor;

namespace {

struct Enc {
  static constexpr int vocab = 13, d_model = 8, layers = 2, heads = 2, classes = 3;
  static constexpr int max_seq = 32, ffn_hidden = 6, attention_block = 4;
  using Scalar = double;
};
using Model = ts::Encoder<Enc>;
static_assert(std::is_same_v<Model::Window, ts::Bidirectional>);  // the encoder's default

constexpr int64_t kB = 3, kT = 9;

// Pooling, head and cross-entropy in plain loops over the trunk's output.
double reference_loss(Model& m, const Tensor<int32_t>& tokens, const Tensor<int32_t>& labels,
                      const Model::Saved& base, Decisions& dec, double& ce) {
  double aux = 0.0;
  const Tensor<double> hn = models_test::trunk_surrogate(m, tokens, base, aux, dec);  // (B, T, C)
  auto pooled = Tensor<double>::zeros({kB, Enc::d_model});
  for (int64_t b = 0; b < kB; ++b)
    for (int64_t t = 0; t < kT; ++t)
      for (int64_t c = 0; c < Enc::d_model; ++c)
        pooled.data()[b * Enc::d_model + c] += hn.data()[(b * kT + t) * Enc::d_model + c] / kT;
  Tensor<double> logits = models_test::times_transposed(pooled.data(), kB, m.head().weight.value);
  for (int64_t b = 0; b < kB; ++b)
    for (int64_t k = 0; k < Enc::classes; ++k) logits.data()[b * Enc::classes + k] += m.head().bias.value.data()[k];
  ce = models_test::mean_cross_entropy(logits, labels.data(), kB, Enc::classes);
  return ce + aux;
}

}  // namespace

BOOST_AUTO_TEST_CASE(every_parameter_matches_central_differences) {
  Model m{Seed{51}};
  for (int k = 0; k < Enc::classes; ++k) m.head().bias.value.data()[k] = 0.1 * k;
  const auto tokens = models_test::random_ids({kB, kT}, Enc::vocab, 52);
  const auto labels = Tensor<int32_t>::from({kB}, {2, 0, 1});
  Model::Saved saved;
  const auto st = m.forward(tokens, labels, saved);
  m.zero_grad();
  m.backward(saved);
  Decisions base;
  double ce = 0.0;
  (void)reference_loss(m, tokens, labels, saved, base, ce);
  BOOST_TEST(st.cross_entropy == ce, boost::test_tools::tolerance(1e-12));
  BOOST_TEST(st.loss == st.cross_entropy);  // dense blocks, fixed window: no aux loss
  BOOST_TEST(st.targets == kB);
  models_test::check_parameters(
      [&](auto f) { m.visit_parameters(f); },
      [&] {
        Decisions d;
        double c = 0.0;
        return reference_loss(m, tokens, labels, saved, d, c);
      },
      "encoder", 6, 1e-6, 3e-9);
  BOOST_TEST(models_test::gradient_mass([&](auto f) { m.visit_parameters(f); }) > 0.0);
}

// Bidirectional: changing the last token changes every position's final hidden state, the
// first one included.
BOOST_AUTO_TEST_CASE(every_position_reads_every_token) {
  Model m{Seed{3}};
  auto tokens = models_test::random_ids({1, kT}, Enc::vocab, 4);
  Model::Saved s;
  (void)m.forward(tokens, s);
  const Tensor<double> before = s.hidden.clone();
  tokens.data()[kT - 1] = (tokens.data()[kT - 1] + 1) % Enc::vocab;
  (void)m.forward(tokens, s);
  for (int64_t t = 0; t < kT; ++t)
    BOOST_TEST(std::memcmp(before.data() + t * Enc::d_model, s.hidden.data() + t * Enc::d_model,
                           sizeof(double) * Enc::d_model) != 0,
               "position " << t << " did not read the last token");
  BOOST_TEST(s.stats.attention_work_fraction > 1.0);  // more than causal: every key tile
}

BOOST_AUTO_TEST_CASE(save_load_round_trip) {
  const auto dir = std::filesystem::temp_directory_path() / ("tessera_encoder_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const std::string path = (dir / "enc.safetensors").string();
  Model a{Seed{1}}, b{Seed{2}};
  ts::save(a, path);
  ts::load(b, path);
  bool same = true;
  std::vector<std::string> names;
  std::vector<const double*> pa;
  a.visit_parameters([&](std::string_view n, nn::Parameter<double>& p) {
    names.emplace_back(n);
    pa.push_back(p.value.data());
  });
  size_t i = 0;
  b.visit_parameters([&](std::string_view, nn::Parameter<double>& p) {
    same = same && std::memcmp(p.value.data(), pa[i++], p.value.size_bytes()) == 0;
  });
  BOOST_TEST(same);
  BOOST_TEST(names.front() == "embed.weight");
  BOOST_TEST(names[names.size() - 3] == "norm.weight");
  BOOST_TEST(names[names.size() - 2] == "head.weight");
  BOOST_TEST(names.back() == "head.bias");
  BOOST_TEST(ts::io::SafetensorsFile::open(path).metadata().at("tessera.model") == "encoder");
  std::filesystem::remove_all(dir);
}

// A toy task: the label is which of the tokens 1, 2, 3 the sequence is made of (with noise
// tokens); a few SGD steps must fit it.
BOOST_AUTO_TEST_CASE(learns_a_toy_task) {
  Model m{Seed{8}};
  auto tokens = models_test::random_ids({kB * 4, kT}, Enc::vocab, 9);
  auto labels = Tensor<int32_t>::empty({kB * 4});
  for (int64_t b = 0; b < kB * 4; ++b) {
    labels.data()[b] = static_cast<int32_t>(b % 3);
    for (int64_t t = 0; t < kT; t += 2) tokens.data()[b * kT + t] = static_cast<int32_t>(1 + b % 3);
  }
  Model::Saved s;
  const double first = m.forward(tokens, labels, s).loss;
  double last = first;
  for (int step = 0; step < 40; ++step) {
    m.zero_grad();
    m.backward(s);
    m.visit_parameters([](std::string_view, nn::Parameter<double>& p) {
      for (int64_t i = 0; i < p.value.numel(); ++i) p.value.data()[i] -= 0.5 * p.grad.data()[i];
    });
    last = m.forward(tokens, labels, s).loss;
  }
  std::printf("encoder toy task: loss %.4f -> %.4f\n", first, last);
  BOOST_TEST(last < 0.2 * first);
  const Tensor<double> logits = m.forward(tokens, s);
  int correct = 0;
  for (int64_t b = 0; b < kB * 4; ++b) {
    const double* z = logits.data() + b * Enc::classes;
    correct += (std::max_element(z, z + Enc::classes) - z) == labels.data()[b];
  }
  BOOST_TEST(correct == kB * 4);
}

BOOST_AUTO_TEST_CASE(errors_name_the_tensor) {
  Model m{Seed{1}};
  Model::Saved s;
  const auto tokens = models_test::random_ids({kB, kT}, Enc::vocab, 1);
  auto has = [](const char* what) {
    return [what](const ts::Error& e) { return std::string(e.what()).find(what) != std::string::npos; };
  };
  BOOST_CHECK_EXCEPTION((void)m.forward(tokens, Tensor<int32_t>::zeros({kB + 1}), s), ts::Error,
                        has("'labels'"));
  BOOST_CHECK_EXCEPTION((void)m.forward(tokens, Tensor<int32_t>::from({kB}, {0, 3, 1}), s),
                        ts::Error, has("target 3 at row 1 is out of range [0, 3)"));
  BOOST_CHECK_EXCEPTION(m.backward(s), ts::Error, has("call forward(tokens, labels, saved)"));
}
