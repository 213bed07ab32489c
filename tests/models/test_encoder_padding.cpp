// tests/models/test_encoder_padding.cpp — a right-padded batch through the Encoder (key padding in
// attention, pooling over the real tokens) gives each document exactly what it gives alone:
//   * logits and pooled states equal each document's own forward (to rounding: the batch's
//     matrix products block their rows differently);
//   * the loss is the mean of the documents' losses, and every parameter gradient the mean of
//     their gradients;
//   * what the padding holds changes nothing, bit for bit: no real token reads a padded key;
//   * without the lengths the short documents' logits do change (the check can fail);
//   * bad lengths and key padding under an adaptive window are refused with a message.
// Two configs: the default bidirectional window with dense FFNs, and Longformer-style
// LocalGlobal<3, 1, false> layers with a top-2 MoE (no capacity, so routing is per token).
#define BOOST_TEST_MODULE test_encoder_padding
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "model_testing.hpp"
#include "tessera/core/error.hpp"
#include "tessera/models/encoder.hpp"

namespace ts = tessera;
namespace nn = tessera::nn;
using ts::Seed;
using ts::Tensor;

namespace {

struct Dense {
  static constexpr int vocab = 23, d_model = 8, layers = 2, heads = 2, classes = 3;
  static constexpr int max_seq = 32, attention_block = 4;
  using Scalar = double;
};
struct LocalMoE : Dense {
  static constexpr int kv_heads = 1;
  using Window = ts::LocalGlobal<3, 1, false>;
  using Ffn = ts::MoE<ts::Experts<4>, ts::TopK<2>, ts::TopKSoftmax>;
};
struct Variable : Dense {
  using Window = ts::VariableWindow<ts::Sizes<4, ts::kFull>, ts::HeuristicSelector, 4>;
};

constexpr int64_t kT = 13;
const std::vector<int64_t> kLengths = {13, 7, 10, 1};

// Every gradient, flattened in visiting order.
template <class Model>
std::vector<double> grads(Model& m) {
  std::vector<double> g;
  m.visit_parameters([&](std::string_view, nn::Parameter<double>& p) {
    g.insert(g.end(), p.grad.data(), p.grad.data() + p.grad.numel());
  });
  return g;
}

double max_abs(const std::vector<double>& v) {
  double m = 0.0;
  for (double x : v) m = std::max(m, std::fabs(x));
  return m;
}

template <class Config>
void check_padding(const char* what) {
  using Model = ts::Encoder<Config>;
  const int64_t B = static_cast<int64_t>(kLengths.size());
  Model m{Seed{11}};
  // The batch: document b is ids[b, 0 .. len_b), then padding (random valid ids).
  const Tensor<int32_t> ids = models_test::random_ids({B, kT}, Config::vocab, 21);
  const Tensor<int32_t> labels = Tensor<int32_t>::from({B}, {0, 2, 1, 2});

  typename Model::Saved batch;
  const ts::models::ModelStats st = m.forward(ids, kLengths, labels, batch);
  m.zero_grad();
  m.backward(batch);
  const std::vector<double> batch_grads = grads(m);

  // Each document alone: its logits, and the mean of the documents' gradients and losses.
  std::vector<double> mean_grads(batch_grads.size(), 0.0);
  double mean_loss = 0.0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = kLengths[size_t(b)];
    auto doc = Tensor<int32_t>::empty({1, n});
    std::copy_n(ids.data() + b * kT, n, doc.data());
    auto label = Tensor<int32_t>::from({1}, {labels.data()[b]});
    typename Model::Saved alone;
    const double loss = m.forward(doc, label, alone).loss;
    mean_loss += loss / double(B);
    for (int64_t k = 0; k < Config::classes; ++k)
      BOOST_TEST(batch.logits.data()[b * Config::classes + k] == alone.logits.data()[k],
                 boost::test_tools::tolerance(1e-12));
    for (int64_t c = 0; c < Config::d_model; ++c)
      BOOST_TEST(batch.pooled.data()[b * Config::d_model + c] == alone.pooled.data()[c],
                 boost::test_tools::tolerance(1e-12));
    m.zero_grad();
    m.backward(alone);
    const std::vector<double> g = grads(m);
    for (size_t i = 0; i < g.size(); ++i) mean_grads[i] += g[i] / double(B);
  }
  BOOST_TEST(st.loss == mean_loss, boost::test_tools::tolerance(1e-12));
  const double scale = max_abs(mean_grads);
  BOOST_REQUIRE(scale > 0.0);
  int64_t off = 0;
  for (size_t i = 0; i < mean_grads.size(); ++i)
    off += !(std::fabs(batch_grads[i] - mean_grads[i]) <= 1e-12 * scale);
  BOOST_TEST(off == 0, what << ": " << off << " of " << mean_grads.size()
                            << " gradient elements differ from the documents' mean");

  // Other padding content: the real tokens' results are bit for bit the same.
  Tensor<int32_t> other = ids.clone();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = kLengths[size_t(b)]; t < kT; ++t)
      other.data()[b * kT + t] = (other.data()[b * kT + t] + 5) % Config::vocab;
  typename Model::Saved s2;
  const Tensor<double> logits2 = m.forward(other, kLengths, s2);
  int64_t differ = 0;
  for (int64_t i = 0; i < logits2.numel(); ++i) differ += logits2.data()[i] != batch.logits.data()[i];
  BOOST_TEST(differ == 0);

  // Without the lengths the padding is read, and the short documents' logits move.
  typename Model::Saved s3;
  const Tensor<double> unmasked = m.forward(ids, s3);
  double moved = 0.0;
  for (int64_t k = 0; k < Config::classes; ++k)
    moved = std::max(moved, std::fabs(unmasked.data()[1 * Config::classes + k] -
                                      batch.logits.data()[1 * Config::classes + k]));
  BOOST_TEST(moved > 1e-6);
  BOOST_TEST_MESSAGE(what << ": loss " << st.loss << ", unmasked logits moved by " << moved);
}

BOOST_AUTO_TEST_CASE(bidirectional_dense_padded_batch_equals_each_document) {
  check_padding<Dense>("bidirectional, dense");
}

BOOST_AUTO_TEST_CASE(local_global_moe_padded_batch_equals_each_document) {
  check_padding<LocalMoE>("LocalGlobal<3, 1, false>, MoE top-2");
}

BOOST_AUTO_TEST_CASE(bad_lengths_are_refused) {
  auto has = [](const std::string& what) {
    return [what](const ts::Error& e) {
      const bool ok = std::string(e.what()).find(what) != std::string::npos;
      if (!ok) std::printf("unexpected message: %s\n", e.what());
      return ok;
    };
  };
  ts::Encoder<Dense> m{Seed{1}};
  ts::Encoder<Dense>::Saved s;
  const Tensor<int32_t> ids = models_test::random_ids({2, kT}, Dense::vocab, 3);
  BOOST_CHECK_EXCEPTION((void)m.forward(ids, std::vector<int64_t>{4}, s), ts::Error,
                        has("expected one per sequence"));
  BOOST_CHECK_EXCEPTION((void)m.forward(ids, std::vector<int64_t>{4, 0}, s), ts::Error,
                        has("key_lengths[1] = 0 must be in [1, T = 13]"));
  BOOST_CHECK_EXCEPTION((void)m.forward(ids, std::vector<int64_t>{14, 3}, s), ts::Error,
                        has("key_lengths[0] = 14"));
  ts::Encoder<Variable> v{Seed{1}};
  ts::Encoder<Variable>::Saved sv;
  BOOST_CHECK_EXCEPTION((void)v.forward(ids, std::vector<int64_t>{4, 13}, sv), ts::Error,
                        has("key padding is not supported with VariableWindow"));
}

}  // namespace
