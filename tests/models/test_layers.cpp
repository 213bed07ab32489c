// tests/models/test_layers.cpp — the thin layers of tessera/nn/layers.hpp (Embedding, RMSNorm,
// Linear with and without bias): forward against plain loops, backward against central
// differences in double (inputs and every parameter), gradient accumulation, initialisation
// (determinism, scale), names, and errors. Odd sizes (7 x 5, a vocabulary of 13 with repeated
// ids) so nothing assumes powers of two.
#define BOOST_TEST_MODULE test_layers
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <string>
#include <vector>

#include "../ops/finite_difference.hpp"
#include "model_testing.hpp"
#include "tessera/core/error.hpp"
#include "tessera/nn/layers.hpp"

namespace ts = tessera;
namespace nn = tessera::nn;
using ts::Seed;
using ts::Shape;
using ts::Tensor;
using ts::TensorView;
using ts::testing::check_close;
using ts::testing::dot;
using ts::testing::numeric_gradient;
using ts::testing::random_tensor;

namespace {

// Finite differences of loss() for every element of every parameter of `layer`.
template <class Layer, class Loss>
void check_layer_parameters(Layer& layer, Loss&& loss, const char* what) {
  models_test::check_parameters([&](auto f) { layer.visit_parameters(f); }, loss, what, 1 << 20,
                                1e-7, 1e-9);
}

template <class Layer>
void zero(Layer& layer) {
  layer.visit_parameters([](std::string_view, nn::Parameter<double>& p) { p.zero_grad(); });
}

}  // namespace

BOOST_AUTO_TEST_SUITE(embedding)

BOOST_AUTO_TEST_CASE(forward_gathers_rows) {
  nn::Embedding<double> e(13, 5, Seed{3}, 0);
  const auto ids = Tensor<int32_t>::from({2, 4}, {12, 0, 7, 7, 3, 12, 1, 0});
  nn::Embedding<double>::Saved s;
  const Tensor<double> y = e.forward(ids, s);
  BOOST_REQUIRE(y.shape() == Shape({2, 4, 5}));
  for (int64_t t = 0; t < 8; ++t)
    for (int64_t c = 0; c < 5; ++c)
      BOOST_TEST(y.data()[t * 5 + c] == e.weight.value.data()[ids.data()[t] * 5 + c]);
}

BOOST_AUTO_TEST_CASE(backward_matches_central_differences) {
  nn::Embedding<double> e(13, 5, Seed{3}, 0);
  const auto ids = Tensor<int32_t>::from({2, 4}, {12, 0, 7, 7, 3, 12, 1, 0});  // repeats
  const auto g = random_tensor({2, 4, 5}, 9);
  auto loss = [&] {
    nn::Embedding<double>::Saved s;
    return dot(e.forward(ids, s), g);
  };
  nn::Embedding<double>::Saved s;
  (void)e.forward(ids, s);
  zero(e);
  e.backward(g, s);
  check_layer_parameters(e, loss, "Embedding");
  // Rows no id selects get no gradient.
  for (int64_t c = 0; c < 5; ++c) BOOST_TEST(e.weight.grad.data()[2 * 5 + c] == 0.0);
  // A second backward accumulates.
  const Tensor<double> once = e.weight.grad.clone();
  e.backward(g, s);
  for (int64_t i = 0; i < once.numel(); ++i) BOOST_TEST(e.weight.grad.data()[i] == 2 * once.data()[i]);
}

BOOST_AUTO_TEST_CASE(initialisation_and_errors) {
  nn::Embedding<float> a(300, 40, Seed{11}, 0), b(300, 40, Seed{11}, 0), c(300, 40, Seed{12}, 0);
  double sq = 0.0;
  bool same = true, differs = false;
  for (int64_t i = 0; i < a.weight.value.numel(); ++i) {
    sq += double(a.weight.value.data()[i]) * a.weight.value.data()[i];
    same = same && a.weight.value.data()[i] == b.weight.value.data()[i];
    differs = differs || a.weight.value.data()[i] != c.weight.value.data()[i];
  }
  BOOST_TEST(same);
  BOOST_TEST(differs);
  // 12000 draws of N(0, 0.02^2): the sample std is within 3% of 0.02.
  BOOST_TEST(std::sqrt(sq / 12000.0) == 0.02, boost::test_tools::tolerance(0.03));
  nn::Embedding<float>::Saved s;
  const auto bad = Tensor<int32_t>::from({3}, {1, 300, 2});
  BOOST_CHECK_EXCEPTION((void)a.forward(bad, s), ts::Error, [](const ts::Error& e) {
    return std::string(e.what()).find("300 is out of range for vocab size 300") != std::string::npos;
  });
  BOOST_CHECK_THROW(nn::Embedding<float>(0, 4, Seed{1}, 0), ts::Error);
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(rms_norm)

BOOST_AUTO_TEST_CASE(forward_matches_formula) {
  nn::RMSNorm<double> n(5, 1e-6);
  for (int i = 0; i < 5; ++i) n.weight.value.data()[i] = 0.5 + 0.25 * i;  // a non-trivial gain
  const auto x = random_tensor({3, 7, 5}, 4);
  nn::RMSNorm<double>::Saved s;
  const Tensor<double> y = n.forward(x, s);
  auto want = Tensor<double>::empty(x.shape());
  for (int64_t r = 0; r < 21; ++r) {
    double ms = 0.0;
    for (int64_t c = 0; c < 5; ++c) ms += x.data()[r * 5 + c] * x.data()[r * 5 + c] / 5.0;
    for (int64_t c = 0; c < 5; ++c)
      want.data()[r * 5 + c] = x.data()[r * 5 + c] / std::sqrt(ms + 1e-6) * (0.5 + 0.25 * c);
  }
  check_close(y, want, 1e-14, 1e-15, "RMSNorm forward");
}

BOOST_AUTO_TEST_CASE(backward_matches_central_differences) {
  nn::RMSNorm<double> n(5, 1e-6);
  for (int i = 0; i < 5; ++i) n.weight.value.data()[i] = 0.5 + 0.25 * i;
  const auto x = random_tensor({3, 7, 5}, 4);
  const auto g = random_tensor({3, 7, 5}, 5);
  auto loss_x = [&](TensorView<const double> xv) {
    nn::RMSNorm<double>::Saved s;
    return dot(n.forward(xv, s), g);
  };
  nn::RMSNorm<double>::Saved s;
  (void)n.forward(x, s);
  zero(n);
  const Tensor<double> dx = n.backward(g, s);
  check_close(dx, numeric_gradient(loss_x, x), 1e-7, 1e-9, "RMSNorm dx");
  check_layer_parameters(n, [&] { return loss_x(x); }, "RMSNorm");
  std::vector<std::string> names;
  n.visit_parameters([&](std::string_view name, nn::Parameter<double>&) { names.emplace_back(name); });
  BOOST_TEST(names == std::vector<std::string>{"weight"}, boost::test_tools::per_element());
}

BOOST_AUTO_TEST_CASE(starts_at_ones_and_checks_shapes) {
  nn::RMSNorm<float> n(7);
  for (int i = 0; i < 7; ++i) BOOST_TEST(n.weight.value.data()[i] == 1.0f);
  nn::RMSNorm<float>::Saved s;
  BOOST_CHECK_THROW((void)n.forward(Tensor<float>::zeros({2, 6}), s), ts::Error);
  BOOST_CHECK_THROW(nn::RMSNorm<float>(7, -1.0), ts::Error);
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(linear)

void check_linear(bool bias) {
  const char* what = bias ? "Linear with bias" : "Linear without bias";
  nn::Linear<double> l(5, 3, bias, Seed{21}, 4);
  if (bias)
    for (int i = 0; i < 3; ++i) l.bias.value.data()[i] = 0.1 * (i + 1);
  const auto x = random_tensor({2, 7, 5}, 6);
  const auto g = random_tensor({2, 7, 3}, 7);
  nn::Linear<double>::Saved s;
  const Tensor<double> y = l.forward(x, s);
  auto want = Tensor<double>::empty({2, 7, 3});
  for (int64_t r = 0; r < 14; ++r)
    for (int64_t o = 0; o < 3; ++o) {
      double v = bias ? 0.1 * (o + 1) : 0.0;
      for (int64_t i = 0; i < 5; ++i) v += x.data()[r * 5 + i] * l.weight.value.data()[o * 5 + i];
      want.data()[r * 3 + o] = v;
    }
  check_close(y, want, 1e-14, 1e-15, what);
  auto loss_x = [&](TensorView<const double> xv) {
    nn::Linear<double>::Saved s2;
    return dot(l.forward(xv, s2), g);
  };
  zero(l);
  const Tensor<double> dx = l.backward(g, s);
  check_close(dx, numeric_gradient(loss_x, x), 1e-7, 1e-9, what);
  check_layer_parameters(l, [&] { return loss_x(x); }, what);
  int count = 0;
  l.visit_parameters([&](std::string_view name, nn::Parameter<double>&) {
    BOOST_TEST(name == (count == 0 ? "weight" : "bias"));
    ++count;
  });
  BOOST_TEST(count == (bias ? 2 : 1));
}

BOOST_AUTO_TEST_CASE(with_bias) { check_linear(true); }
BOOST_AUTO_TEST_CASE(without_bias) { check_linear(false); }

BOOST_AUTO_TEST_CASE(default_scale_and_errors) {
  nn::Linear<float> l(400, 30, false, Seed{2}, 0);
  double sq = 0.0;
  for (int64_t i = 0; i < l.weight.value.numel(); ++i)
    sq += double(l.weight.value.data()[i]) * l.weight.value.data()[i];
  // 12000 draws of N(0, 1/400): the sample std is within 3% of 0.05.
  BOOST_TEST(std::sqrt(sq / 12000.0) == 0.05, boost::test_tools::tolerance(0.03));
  nn::Linear<float>::Saved s;
  BOOST_CHECK_EXCEPTION((void)l.forward(Tensor<float>::zeros({2, 399}), s), ts::Error,
                        [](const ts::Error& e) {
                          return std::string(e.what()).find("'weight'") != std::string::npos;
                        });
  BOOST_CHECK_THROW(nn::Linear<float>(0, 3, true, Seed{1}, 0), ts::Error);
}

BOOST_AUTO_TEST_SUITE_END()
