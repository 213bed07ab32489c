// tests/nn/test_feed_forward.cpp — SwiGluFfn: forward against plain loops, backward against
// central finite differences in double, parameter names, bf16 forward, bad shapes.
#define BOOST_TEST_MODULE test_feed_forward
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <string>
#include <vector>

#include "../ops/finite_difference.hpp"
#include "tessera/nn/feed_forward.hpp"

namespace ts = tessera;
using ts::Shape;
using ts::Tensor;
using ts::TensorView;
using ts::nn::SwiGluFfn;
using ts::testing::check_close;
using ts::testing::dot;
using ts::testing::numeric_gradient;
using ts::testing::random_tensor;

namespace {

// y = W_down (silu(W_gate x) * W_up x), row by row, in plain loops.
Tensor<double> reference(const SwiGluFfn<double>& f, const Tensor<double>& x) {
  const int64_t d = f.d_model(), h = f.hidden(), rows = x.numel() / d;
  auto y = Tensor<double>::zeros(x.shape());
  std::vector<double> act(static_cast<size_t>(h));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < h; ++j) {
      double g = 0, u = 0;
      for (int64_t c = 0; c < d; ++c) {
        g += f.w_gate.value(j, c) * x.data()[r * d + c];
        u += f.w_up.value(j, c) * x.data()[r * d + c];
      }
      act[size_t(j)] = g / (1.0 + std::exp(-g)) * u;
    }
    for (int64_t c = 0; c < d; ++c)
      for (int64_t j = 0; j < h; ++j) y.data()[r * d + c] += f.w_down.value(c, j) * act[size_t(j)];
  }
  return y;
}

}  // namespace

BOOST_AUTO_TEST_CASE(forward_matches_loops_odd_shapes) {
  BOOST_TEST_MESSAGE("seeds: layer 11, input 101");
  for (auto [d, h] : std::vector<std::pair<int64_t, int64_t>>{{6, 5}, {1, 1}, {13, 7}, {5, 11}}) {
    SwiGluFfn<double> f(d, h, ts::Seed{11}, 3);
    const auto x = random_tensor(Shape{2, 7, d}, 101);  // (B, T, C)
    SwiGluFfn<double>::Saved saved;
    const auto y = f.forward(x, saved);
    BOOST_TEST((y.shape() == x.shape()));
    check_close(y, reference(f, x), 1e-12, 1e-12, "SwiGluFfn forward vs loops");
  }
}

BOOST_AUTO_TEST_CASE(backward_matches_finite_differences) {
  BOOST_TEST_MESSAGE("seeds: layer 5, input 202, upstream 203");
  const int64_t d = 6, h = 5;
  SwiGluFfn<double> f(d, h, ts::Seed{5}, 0);
  const auto x = random_tensor(Shape{7, d}, 202);
  const auto g = random_tensor(Shape{7, d}, 203);  // upstream gradient: L = <y, g>
  SwiGluFfn<double>::Saved saved;
  (void)f.forward(x, saved);
  const auto dx = f.backward(g, saved);

  auto loss_x = [&](TensorView<const double> xv) {
    SwiGluFfn<double>::Saved s;
    return dot(f.forward(xv, s), g);
  };
  check_close(dx, numeric_gradient(loss_x, x), 1e-6, 1e-8, "dx");

  f.visit_parameters([&](std::string_view name, ts::nn::Parameter<double>& p) {
    const Tensor<double> analytic = p.grad.clone();
    const Tensor<double> original = p.value.clone();
    auto loss_w = [&](TensorView<const double> wv) {
      std::copy_n(wv.data(), wv.numel(), p.value.data());  // numeric_gradient's probe is contiguous
      SwiGluFfn<double>::Saved s;
      return dot(f.forward(x, s), g);
    };
    const auto numeric = numeric_gradient(loss_w, original);
    std::copy_n(original.data(), original.numel(), p.value.data());
    check_close(analytic, numeric, 1e-6, 1e-8, std::string(name).c_str());
  });
}

BOOST_AUTO_TEST_CASE(backward_accumulates_into_grad) {
  SwiGluFfn<double> f(4, 3, ts::Seed{1}, 0);
  const auto x = random_tensor(Shape{3, 4}, 7);
  const auto g = random_tensor(Shape{3, 4}, 8);
  SwiGluFfn<double>::Saved saved;
  (void)f.forward(x, saved);
  (void)f.backward(g, saved);
  const Tensor<double> once = f.w_up.grad.clone();
  (void)f.backward(g, saved);
  auto twice = Tensor<double>::empty(once.shape());
  for (int64_t i = 0; i < once.numel(); ++i) twice.data()[i] = 2 * once.data()[i];
  check_close(f.w_up.grad, twice, 1e-14, 1e-14, "second backward adds to grad");
  f.w_up.zero_grad();
  BOOST_TEST(f.w_up.grad.data()[0] == 0.0);
}

BOOST_AUTO_TEST_CASE(parameter_names_and_shapes) {
  SwiGluFfn<float> f(6, 5, ts::Seed{2}, 0);
  std::vector<std::string> names;
  std::vector<Shape> shapes;
  f.visit_parameters([&](std::string_view name, ts::nn::Parameter<float>& p) {
    names.emplace_back(name);
    shapes.push_back(p.value.shape());
    BOOST_TEST((p.grad.shape() == p.value.shape()));
  });
  BOOST_TEST((names == std::vector<std::string>{"w_gate", "w_up", "w_down"}));
  BOOST_TEST((shapes == std::vector<Shape>{Shape{5, 6}, Shape{5, 6}, Shape{6, 5}}));
  // Deterministic init: same seed, same weights; another subsequence, other weights.
  SwiGluFfn<float> same(6, 5, ts::Seed{2}, 0), other(6, 5, ts::Seed{2}, 1);
  BOOST_TEST(same.w_down.value.data()[3] == f.w_down.value.data()[3]);
  BOOST_TEST(other.w_down.value.data()[3] != f.w_down.value.data()[3]);
  // The three matrices are distinct stretches of the stream.
  BOOST_TEST(f.w_gate.value.data()[0] != f.w_up.value.data()[0]);
}

BOOST_AUTO_TEST_CASE(bf16_forward_close_to_float) {
  const int64_t d = 8, h = 12;
  SwiGluFfn<float> ff(d, h, ts::Seed{9}, 0);
  SwiGluFfn<ts::bf16> fb(d, h, ts::Seed{9}, 0);  // the same weights, rounded to bf16
  const auto x64 = random_tensor(Shape{5, d}, 31);
  auto xf = Tensor<float>::empty(x64.shape());
  auto xb = Tensor<ts::bf16>::empty(x64.shape());
  for (int64_t i = 0; i < x64.numel(); ++i) {
    xf.data()[i] = static_cast<float>(x64.data()[i]);
    xb.data()[i] = ts::from_float<ts::bf16>(xf.data()[i]);
  }
  SwiGluFfn<float>::Saved sf;
  SwiGluFfn<ts::bf16>::Saved sb;
  const auto yf = ff.forward(xf, sf);
  const auto yb = fb.forward(xb, sb);
  // bf16 keeps 8 significant bits (eps 2^-8 = 0.0039); inputs, weights, two hidden activations
  // and the output are each rounded once: a few eps relative to the output's scale.
  double scale = 0, worst = 0;
  for (int64_t i = 0; i < yf.numel(); ++i) {
    scale = std::max(scale, std::fabs(double(yf.data()[i])));
    worst = std::max(worst, std::fabs(double(yf.data()[i]) - double(ts::to_float(yb.data()[i]))));
  }
  BOOST_TEST(scale > 0.0);
  BOOST_TEST(worst <= 8 * 0.0039 * scale, "worst |bf16 - float| " << worst << ", scale " << scale);
}

BOOST_AUTO_TEST_CASE(bad_shapes_throw) {
  SwiGluFfn<float> f(6, 5, ts::Seed{2}, 0);
  SwiGluFfn<float>::Saved saved;
  auto x = Tensor<float>::zeros(Shape{3, 4});
  try {
    (void)f.forward(x, saved);
    BOOST_FAIL("expected tessera::Error");
  } catch (const ts::Error& e) {
    BOOST_TEST(std::string(e.what()).find("'x'") != std::string::npos, e.what());
    BOOST_TEST(std::string(e.what()).find("6") != std::string::npos, e.what());
  }
  auto ok = Tensor<float>::zeros(Shape{3, 6});
  (void)f.forward(ok, saved);
  auto bad_dy = Tensor<float>::zeros(Shape{2, 6});
  BOOST_CHECK_THROW((void)f.backward(bad_dy, saved), ts::Error);
  BOOST_CHECK_THROW(SwiGluFfn<float>(0, 5, ts::Seed{1}, 0), ts::Error);
}
