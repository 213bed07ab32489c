// tests/train/test_optimizer.cpp — AdamW, SGD with momentum, the warm-up + cosine schedule,
// global-norm clipping and the fp32 master weights, each against values computed another way:
//   * closed forms: with a constant gradient g, AdamW's bias-corrected moments are exactly g and
//     g^2, so every step moves w by lr * g / (|g| + eps) (plus decay); SGD's momentum buffer is
//     g (1 - mu^t) / (1 - mu);
//   * a plain double implementation of the textbook update (m_hat / (sqrt(v_hat) + eps)) on
//     random gradients, for many steps;
//   * hand-computed schedule values;
//   * the norm as a long double sum written out in the test, and clipping checked against a
//     step on gradients scaled by hand.
#define BOOST_TEST_MODULE test_optimizer
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <numbers>
#include <string>
#include <vector>

#include "tessera/core/rng.hpp"
#include "tessera/train/optimizer.hpp"
#include "tessera/train/precision.hpp"
#include "tessera/train/schedule.hpp"

namespace ts = tessera;
namespace tr = tessera::train;
namespace nn = tessera::nn;

namespace {

// The smallest "model": a (2, 3) matrix and a (3) bias.
template <class T>
struct Toy {
  nn::Parameter<T> w, b;
  Toy() {
    w.value = ts::Tensor<T>::empty({2, 3});
    b.value = ts::Tensor<T>::empty({3});
    for (int i = 0; i < 6; ++i) w.value.data()[i] = ts::from_float<T>(0.25f * static_cast<float>(i) - 0.6f);
    for (int i = 0; i < 3; ++i) b.value.data()[i] = ts::from_float<T>(0.1f * static_cast<float>(i + 1));
    w.zero_grad();
    b.zero_grad();
  }
  template <class F>
  void visit_parameters(F&& f) {
    f(std::string_view("w"), w);
    f(std::string_view("b"), b);
  }
  static T of(double x) {
    if constexpr (std::is_same_v<T, double>) {
      return x;
    } else {
      return ts::from_float<T>(static_cast<float>(x));
    }
  }
  void set_grads(const std::vector<double>& gw, const std::vector<double>& gb) {
    for (int i = 0; i < 6; ++i) w.grad.data()[i] = of(gw[i]);
    for (int i = 0; i < 3; ++i) b.grad.data()[i] = of(gb[i]);
  }
};

struct Other {
  nn::Parameter<float> x;
  template <class F>
  void visit_parameters(F&& f) {
    f(std::string_view("x"), x);
  }
};

double rel(double a, double b) { return std::fabs(a - b) / std::max(1e-30, std::fabs(b)); }

}  // namespace

BOOST_AUTO_TEST_CASE(adamw_constant_gradient_closed_form) {
  // Constant g: m_hat_t = g, v_hat_t = g^2 exactly (in exact arithmetic), so each step is
  // w <- w (1 - lr wd) - lr g / (|g| + eps). Double parameters, so rounding is ~1e-16.
  Toy<double> toy;
  const std::vector<double> gw = {0.3, -1.5, 2.0, 1e-3, -0.02, 7.0}, gb = {0.5, -0.5, 0.05};
  tr::AdamWOptions o;
  o.weight_decay = 0.1;
  o.eps = 1e-8;
  tr::AdamW<double> opt(o);
  std::vector<double> w0(toy.w.value.data(), toy.w.value.data() + 6);
  std::vector<double> b0(toy.b.value.data(), toy.b.value.data() + 3);
  const double lr = 0.01;
  for (int t = 1; t <= 25; ++t) {
    toy.set_grads(gw, gb);
    opt.step(toy, lr);
    for (int i = 0; i < 6; ++i) w0[i] = w0[i] * (1 - lr * 0.1) - lr * gw[i] / (std::fabs(gw[i]) + 1e-8);
    for (int i = 0; i < 3; ++i) b0[i] = b0[i] - lr * gb[i] / (std::fabs(gb[i]) + 1e-8);  // rank 1: no decay
  }
  for (int i = 0; i < 6; ++i) BOOST_TEST(rel(toy.w.value.data()[i], w0[i]) < 1e-12, "w[" << i << "]");
  for (int i = 0; i < 3; ++i) BOOST_TEST(rel(toy.b.value.data()[i], b0[i]) < 1e-12, "b[" << i << "]");
  BOOST_TEST(opt.steps() == 25);
}

BOOST_AUTO_TEST_CASE(adamw_random_gradients_vs_textbook_double) {
  // Float parameters against the textbook formulas in double, on random gradients. Float's
  // rounding over 50 steps stays below 1e-5 relative to the total movement.
  Toy<float> toy;
  Toy<double> start;
  tr::AdamWOptions o;
  o.weight_decay = 0.05;
  o.beta1 = 0.8;
  o.beta2 = 0.95;
  tr::AdamW<float> opt(o);
  std::vector<double> w(9), m(9, 0.0), v(9, 0.0);
  for (int i = 0; i < 6; ++i) w[i] = toy.w.value.data()[i];
  for (int i = 0; i < 3; ++i) w[6 + i] = toy.b.value.data()[i];
  ts::Philox rng(ts::Seed{7}, 0);
  for (int t = 1; t <= 50; ++t) {
    const double lr = 1e-2 * (1.0 + 0.5 * std::sin(t));
    std::vector<double> g(9);
    for (auto& x : g) x = static_cast<double>(rng.next_normal());
    toy.set_grads({g.begin(), g.begin() + 6}, {g.begin() + 6, g.end()});
    for (auto& x : g) x = static_cast<double>(static_cast<float>(x));
    opt.step(toy, lr);
    for (int i = 0; i < 9; ++i) {
      const bool decay = i < 6;
      if (decay) w[i] -= lr * o.weight_decay * w[i];
      m[i] = o.beta1 * m[i] + (1 - o.beta1) * g[i];
      v[i] = o.beta2 * v[i] + (1 - o.beta2) * g[i] * g[i];
      const double mh = m[i] / (1 - std::pow(o.beta1, t)), vh = v[i] / (1 - std::pow(o.beta2, t));
      w[i] -= lr * mh / (std::sqrt(vh) + o.eps);
    }
  }
  for (int i = 0; i < 9; ++i) {
    const double got = i < 6 ? toy.w.value.data()[i] : toy.b.value.data()[i - 6];
    BOOST_TEST(std::fabs(got - w[i]) < 2e-6, "element " << i << ": " << got << " vs " << w[i]);
  }
}

BOOST_AUTO_TEST_CASE(sgd_momentum_closed_form) {
  // torch.optim.SGD with momentum mu, dampening 0: buf_1 = g, buf_t = mu buf + g, so with a
  // constant g the displacement after t steps is lr g sum_{s=1..t} (1 - mu^s) / (1 - mu).
  Toy<double> toy;
  const std::vector<double> gw = {1, -2, 3, -4, 5, -6}, gb = {0.5, 0.25, -1};
  tr::SgdOptions o;
  o.momentum = 0.9;
  tr::Sgd<double> opt(o);
  std::vector<double> w0(toy.w.value.data(), toy.w.value.data() + 6);
  const double lr = 0.003;
  const int T = 30;
  for (int t = 0; t < T; ++t) {
    toy.set_grads(gw, gb);
    opt.step(toy, lr);
  }
  double factor = 0.0;
  for (int s = 1; s <= T; ++s) factor += (1 - std::pow(0.9, s)) / (1 - 0.9);
  for (int i = 0; i < 6; ++i)
    BOOST_TEST(rel(toy.w.value.data()[i] - w0[i], -lr * gw[i] * factor) < 1e-12, "w[" << i << "]");

  // Nesterov: d = g + mu buf; plain loop in the test.
  Toy<double> a;
  tr::SgdOptions on;
  on.momentum = 0.5;
  on.nesterov = true;
  on.weight_decay = 0.01;
  tr::Sgd<double> nes(on);
  std::vector<double> w(a.w.value.data(), a.w.value.data() + 6), buf(6, 0.0);
  for (int t = 0; t < 10; ++t) {
    a.set_grads(gw, gb);
    nes.step(a, 0.01);
    for (int i = 0; i < 6; ++i) {
      const double d = gw[i] + 0.01 * w[i];
      buf[i] = t == 0 ? d : 0.5 * buf[i] + d;
      w[i] -= 0.01 * (d + 0.5 * buf[i]);
    }
  }
  for (int i = 0; i < 6; ++i) BOOST_TEST(rel(a.w.value.data()[i], w[i]) < 1e-12);
}

BOOST_AUTO_TEST_CASE(warmup_cosine_hand_values) {
  const tr::WarmupCosine s(1.0, 4, 14, 0.1);
  BOOST_TEST(s(0) == 0.25);
  BOOST_TEST(s(1) == 0.5);
  BOOST_TEST(s(3) == 1.0);
  BOOST_TEST(s(4) == 1.0);  // cos(0): the peak
  // step 9: p = 5/10, cos(pi/2) = 0: halfway between floor and peak.
  BOOST_TEST(std::fabs(s(9) - 0.55) < 1e-15);
  // step 6: p = 0.2: 0.1 + 0.9 * (1 + cos(0.2 pi)) / 2 = 0.1 + 0.45 * 1.809016994...
  BOOST_TEST(std::fabs(s(6) - (0.1 + 0.45 * (1 + 0.80901699437494742))) < 1e-15);
  BOOST_TEST(s(14) == 0.1);
  BOOST_TEST(s(1000) == 0.1);
  // Monotone decay after warm-up.
  for (int k = 4; k < 14; ++k) BOOST_TEST(s(k + 1) <= s(k));
  BOOST_CHECK_THROW(tr::WarmupCosine(1.0, 5, 4), ts::Error);
  BOOST_CHECK_THROW(s(-1), ts::Error);
}

BOOST_AUTO_TEST_CASE(global_norm_in_double_and_clipping) {
  Toy<float> toy;
  const std::vector<double> gw = {3e3, -4e3, 1e-4, 2.5, -7.25, 1e-7}, gb = {12, -0.125, 3.5};
  toy.set_grads(gw, gb);
  tr::AdamW<float> opt;
  long double sum = 0;
  for (double g : gw) sum += static_cast<long double>(static_cast<float>(g)) * static_cast<float>(g);
  for (double g : gb) sum += static_cast<long double>(static_cast<float>(g)) * static_cast<float>(g);
  const double expect = static_cast<double>(std::sqrt(sum));
  const double norm = opt.grad_norm(toy);
  BOOST_TEST(rel(norm, expect) < 1e-15, norm << " vs " << expect);

  // clip_scale as torch: max / (norm + 1e-6), capped at 1; off for max <= 0.
  BOOST_TEST(tr::clip_scale(norm, 1.0) == 1.0 / (norm + 1e-6));
  BOOST_TEST(tr::clip_scale(0.5, 1.0) == 1.0);
  BOOST_TEST(tr::clip_scale(1e9, 0.0) == 1.0);
  BOOST_CHECK_THROW(tr::clip_scale(INFINITY, 1.0), ts::Error);

  // A step with grad_scale c equals a step on gradients multiplied by c by hand (SGD: exact).
  const double c = tr::clip_scale(norm, 1.0);
  Toy<double> a, b;
  tr::SgdOptions so;
  so.momentum = 0;
  tr::Sgd<double> sa(so), sb(so);
  a.set_grads(gw, gb);
  std::vector<double> sw(6), sbias(3);
  for (int i = 0; i < 6; ++i) sw[i] = gw[i] * c;
  for (int i = 0; i < 3; ++i) sbias[i] = gb[i] * c;
  b.set_grads(sw, sbias);
  sa.step(a, 0.1, c);
  sb.step(b, 0.1);
  for (int i = 0; i < 6; ++i) BOOST_TEST(rel(a.w.value.data()[i], b.w.value.data()[i]) < 1e-15);
  // The clipped gradient has norm max_norm (up to the 1e-6 guard).
  double clipped = 0;
  for (double x : sw) clipped += x * x;
  for (double x : sbias) clipped += x * x;
  BOOST_TEST(std::fabs(std::sqrt(clipped) - 1.0) < 1e-6);
}

BOOST_AUTO_TEST_CASE(bf16_master_weights_keep_small_updates) {
  // lr 1e-4 on weights of size ~0.5 moves each by 1e-4 per step, far below half a bf16 ulp
  // (2^-9 = 0.00195 at 0.5): pure bf16 storage would never move. With fp32 masters the bf16
  // value must equal bf16(master), and the master must follow an fp32 run of the same updates.
  Toy<ts::bf16> low;
  Toy<float> ref;
  std::vector<std::uint16_t> initial;
  for (int i = 0; i < 6; ++i) initial.push_back(low.w.value.data()[i].bits);
  for (int i = 0; i < 6; ++i) ref.w.value.data()[i] = ts::to_float(low.w.value.data()[i]);
  for (int i = 0; i < 3; ++i) ref.b.value.data()[i] = ts::to_float(low.b.value.data()[i]);
  tr::AdamW<ts::bf16> opt;
  tr::AdamW<float> opt_ref;
  const std::vector<double> gw = {1, -1, 0.5, -0.5, 2, -2}, gb = {1, 1, -1};  // exact in bf16
  for (int t = 0; t < 100; ++t) {
    low.set_grads(gw, gb);
    opt.absorb_grads(low);  // bf16 grads -> fp32 accumulators, model grads zeroed
    BOOST_TEST(ts::to_float(low.w.grad.data()[0]) == 0.0f);
    ref.set_grads(gw, gb);
    opt.step(low, 1e-4);
    opt_ref.step(ref, 1e-4);
    opt.zero_grad(low);
  }
  int moved = 0;
  std::vector<float> masters;
  opt.visit_state([&](std::string_view name, ts::Tensor<float>& t) {
    if (name.ends_with(".master")) masters.insert(masters.end(), t.data(), t.data() + t.numel());
  });
  BOOST_TEST_REQUIRE(masters.size() == 9u);
  for (int i = 0; i < 6; ++i) {
    BOOST_TEST(masters[i] == ref.w.value.data()[i], "master w[" << i << "] follows fp32");
    BOOST_TEST(low.w.value.data()[i].bits == ts::bf16(masters[i]).bits, "w[" << i << "] = bf16(master)");
    moved += low.w.value.data()[i].bits != initial[i] ? 1 : 0;
  }
  BOOST_TEST(moved >= 4, "100 updates of 1e-4 moved the bf16 weights (" << moved << " of 6)");

  // Accumulation: two absorbed micro-batch gradients add in fp32.
  Toy<ts::bf16> acc;
  tr::Sgd<ts::bf16> sgd(tr::SgdOptions{.momentum = 0});
  acc.set_grads({1, 1, 1, 1, 1, 1}, {1, 1, 1});
  sgd.absorb_grads(acc);
  acc.set_grads({1.0 / 512, 0, 0, 0, 0, 0}, {0, 0, 0});  // lost if added in bf16 to 1 (ulp 2^-7)
  sgd.absorb_grads(acc);
  BOOST_TEST(sgd.grad_norm(acc) == std::sqrt((1 + 1.0 / 512) * (1 + 1.0 / 512) + 8.0));
}

BOOST_AUTO_TEST_CASE(optimizer_refuses_another_model) {
  Toy<float> toy;
  tr::AdamW<float> opt;
  opt.step(toy, 0.1);
  Other other;
  other.x.value = ts::Tensor<float>::zeros({2, 3});
  other.x.zero_grad();
  BOOST_CHECK_EXCEPTION(opt.step(other, 0.1), ts::Error, [](const ts::Error& e) {
    return std::string(e.what()).find("parameter 0 is 'x', the optimizer's state is for 'w'") !=
           std::string::npos;
  });
}

BOOST_AUTO_TEST_CASE(dynamic_loss_scale_and_recipe_names) {
  tr::DynamicLossScale s;
  s.growth_interval = 3;
  const double s0 = s.scale;
  BOOST_TEST(!s.update(false));
  BOOST_TEST(s.scale == s0 / 2);
  BOOST_TEST(s.skipped == 1);
  BOOST_TEST(s.update(true));
  BOOST_TEST(s.update(true));
  BOOST_TEST(s.update(true));
  BOOST_TEST(s.scale == s0);  // three clean steps: grows back
  BOOST_CHECK_NO_THROW(tr::check_recipe_name("bf16-mixed"));
  BOOST_CHECK_NO_THROW(tr::check_recipe_name("fp8-tile"));
  BOOST_CHECK_NO_THROW(tr::check_recipe_name("fp8-delayed"));
  BOOST_CHECK_EXCEPTION(tr::check_recipe_name("fp4"), ts::Error, [](const ts::Error& e) {
    return std::string(e.what()).find("fp8-delayed, fp8-tile") != std::string::npos;
  });
}
