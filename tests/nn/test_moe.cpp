// tests/nn/test_moe.cpp — the mixture-of-experts layer and its routers (forward side; the
// finite-difference gradient checks are in test_moe_gradients.cpp).
//
// What is checked, and how:
//   * forward against a per-token reference written differently (moe_reference.hpp): loop over
//     tokens, compute the logits, scores, group choice and expert choice by full sorts, then
//     each chosen expert's SwiGLU FFN directly in loops (no dispatch, no counting sort, no ops);
//   * GroupLimited never picks experts outside the groups it chose (and does restrict);
//   * BiasBalance reduces the load imbalance over repeated update_bias calls on a fixed skewed
//     input, and never changes the weights;
//   * capacity drops are counted exactly on a constructed case;
//   * unusual sizes: all experts chosen, one expert, zero tokens, d_model 1, rank-3 input;
//   * bf16 forward, parameter names, determinism, error messages.
// Seeds are fixed and printed.
#define BOOST_TEST_MODULE test_moe
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cmath>
#include <set>
#include <string>
#include <vector>

#include "../ops/finite_difference.hpp"
#include "moe_reference.hpp"
#include "tessera/nn/moe.hpp"

using namespace moe_test::prelude;  // ts, nn, Tensor, the reference and check helpers

// ---- routing properties -------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(group_limited_stays_inside_chosen_groups) {
  BOOST_TEST_MESSAGE("seeds: layer 31/32, input 131/132");
  // The API sketch's layout.
  using Spec = nn::MoE<nn::Experts<16>, nn::TopK<2>, nn::GroupLimited<4, 2>, nn::BiasBalance,
                       nn::SharedExperts<1>>;
  nn::MoELayer<double, Spec> m(8, 4, ts::Seed{31}, 0);
  for (int i = 0; i < 16; ++i) m.router().expert_bias.data()[i] = 0.02 * (i % 3);
  const auto x = random_tensor(Shape{300, 8}, 131);
  typename nn::MoELayer<double, Spec>::Saved saved;
  (void)m.forward(x, saved);
  const Reference r = reference(m, x);
  for (int64_t t = 0; t < 300; ++t) {
    std::set<int> used;
    for (int j = 0; j < 2; ++j) {
      const int e = saved.route.chosen(t, j);
      used.insert(e / 4);
      BOOST_TEST(r.groups[size_t(t)].count(e / 4) == 1u, "token " << t << " expert " << e);
    }
    BOOST_TEST(used.size() <= 2u);
  }

  // One group per token: the restriction must bite (plain top-2 would often span two groups).
  using Spec1 = nn::MoE<nn::Experts<8>, nn::TopK<2>, nn::GroupLimited<4, 1>>;
  nn::MoELayer<double, Spec1> m1(8, 4, ts::Seed{32}, 0);
  const auto x1 = random_tensor(Shape{300, 8}, 132);
  typename nn::MoELayer<double, Spec1>::Saved s1;
  (void)m1.forward(x1, s1);
  int differs_from_plain = 0;
  for (int64_t t = 0; t < 300; ++t) {
    const int a = s1.route.chosen(t, 0), b = s1.route.chosen(t, 1);
    BOOST_TEST(a / 2 == b / 2, "token " << t << " picked experts " << a << ", " << b);
    std::vector<double> srow(s1.route.scores.data() + t * 8, s1.route.scores.data() + t * 8 + 8);
    const auto plain = ranked(srow);
    if (std::set<int>{plain[0], plain[1]} != std::set<int>{a, b}) ++differs_from_plain;
  }
  BOOST_TEST(differs_from_plain > 0);
}

BOOST_AUTO_TEST_CASE(bias_balance_reduces_imbalance) {
  BOOST_TEST_MESSAGE("seeds: layer 41, input 141");
  using Spec = nn::MoE<nn::Experts<8>, nn::TopK<2>, nn::TopKSigmoid, nn::BiasBalanceOf<0.002>>;
  nn::MoELayer<float, Spec> m(8, 4, ts::Seed{41}, 0);
  // Skew: every token carries a common direction c that gate rows 0 and 1 favour.
  const auto noise = random_tensor(Shape{128, 8}, 141);
  auto x = Tensor<float>::empty(Shape{128, 8});
  for (int64_t i = 0; i < x.numel(); ++i) x.data()[i] = float(0.3 * noise.data()[i] + (i % 8 == 0 ? 2.0 : 0.0));
  m.router().gate.value(0, 0) = 2.0f;
  m.router().gate.value(1, 0) = 1.5f;
  typename nn::MoELayer<float, Spec>::Saved saved;
  (void)m.forward(x, saved);
  const double initial = saved.stats.load_imbalance();
  BOOST_TEST_MESSAGE("initial max/mean load " << initial);
  BOOST_TEST(initial > 2.5);
  double late = 0;
  for (int step = 0; step < 1500; ++step) {
    m.update_bias(saved.stats);
    (void)m.forward(x, saved);
    if (step >= 1400) late += saved.stats.load_imbalance() / 100.0;
    // The bias changes selection only: weights are the chosen sigmoid scores, renormalised.
    if (step == 1499) {
      for (int64_t t = 0; t < 128; ++t) {
        float sum = 0;
        for (int j = 0; j < 2; ++j) sum += saved.route.scores(t, saved.route.chosen(t, j));
        for (int j = 0; j < 2; ++j)
          BOOST_TEST(saved.route.weights(t, j) ==
                         saved.route.scores(t, saved.route.chosen(t, j)) / sum,
                     boost::test_tools::tolerance(1e-6f));
      }
    }
  }
  BOOST_TEST_MESSAGE("max/mean load over the last 100 steps " << late);
  BOOST_TEST(late < 1.3);  // 4 at the start; about 1.14 here (sign steps keep it oscillating)
  BOOST_TEST(late < initial / 2);
  BOOST_TEST(saved.stats.aux_loss == 0.0);
  int buffers = 0;
  m.visit_buffers([&](std::string_view name, Tensor<float>& b) {
    BOOST_TEST(name == "router.expert_bias");
    BOOST_TEST(b.numel() == 8);
    ++buffers;
  });
  BOOST_TEST(buffers == 1);
}

BOOST_AUTO_TEST_CASE(capacity_drops_counted_exactly) {
  // Every token prefers experts 0 and 1 (positive inputs, gate rows 0/1 positive, others
  // negative): load [10, 10, 0, 0]; capacity ceil(0.5 * 10 * 2 / 4) = 3 -> 7 + 7 dropped, and
  // tokens 3..9 (no shared expert) come out exactly zero.
  using Spec = nn::MoE<nn::Experts<4>, nn::TopK<2>, nn::TopKSoftmax>;
  nn::MoELayer<double, Spec> m(5, 3, ts::Seed{51}, 0, {.capacity_factor = 0.5});
  for (int i = 0; i < 4; ++i)
    for (int c = 0; c < 5; ++c) m.router().gate.value(i, c) = i == 0 ? 1.0 : i == 1 ? 0.5 : -1.0;
  auto x = random_tensor(Shape{10, 5}, 151);
  for (int64_t i = 0; i < x.numel(); ++i) x.data()[i] = std::fabs(x.data()[i]) + 0.1;
  typename nn::MoELayer<double, Spec>::Saved saved;
  const auto y = m.forward(x, saved);
  BOOST_TEST((saved.stats.load == std::vector<int64_t>{10, 10, 0, 0}));
  BOOST_TEST(saved.stats.capacity == 3);
  BOOST_TEST((saved.stats.processed == std::vector<int64_t>{3, 3, 0, 0}));
  BOOST_TEST(saved.stats.dropped == 14);
  BOOST_TEST(saved.stats.active_fraction == 6.0 / 10.0 / 4.0);
  BOOST_TEST(saved.stats.nominal_active_fraction == 0.5);
  for (int64_t t = 0; t < 10; ++t) {
    double norm = 0;
    for (int c = 0; c < 5; ++c) norm += std::fabs(y(t, c));
    if (t < 3) BOOST_TEST(norm > 0.0, "token " << t);
    else BOOST_TEST(norm == 0.0, "token " << t);
  }
  check_close(y, reference(m, x).y, 1e-11, 1e-12, "capacity forward vs reference");
  // Without a capacity nothing is dropped.
  nn::MoELayer<double, Spec> free(5, 3, ts::Seed{51}, 0);
  typename nn::MoELayer<double, Spec>::Saved s2;
  (void)free.forward(x, s2);
  BOOST_TEST(s2.stats.dropped == 0);
  BOOST_TEST(s2.stats.capacity == -1);
}

// ---- unusual sizes --------------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(unusual_sizes) {
  BOOST_TEST_MESSAGE("seeds: layers 61..64, inputs 161..164");
  {  // every expert chosen, two shared experts, rank-3 input (B, T, C)
    using Spec = nn::MoE<nn::Experts<7>, nn::TopK<7>, nn::TopKSoftmax, nn::AuxLossBalance,
                         nn::SharedExperts<2>>;
    nn::MoELayer<double, Spec> m(3, 2, ts::Seed{61}, 0);
    const auto x = random_tensor(Shape{2, 3, 3}, 161);
    check_forward(m, x, "7 experts top-7, 2 shared, rank 3");
    typename nn::MoELayer<double, Spec>::Saved s;
    const auto y = m.forward(x, s);
    BOOST_TEST((y.shape() == x.shape()));
    BOOST_TEST(s.stats.active_fraction == 1.0);
    // all experts used evenly: the aux loss is alpha * N * sum (1/N) P_i = alpha
    BOOST_TEST(s.stats.aux_loss == 0.01, boost::test_tools::tolerance(1e-12));
    const auto dx = m.backward(y, s);
    BOOST_TEST((dx.shape() == x.shape()));
  }
  {  // one expert: weight softmax(one logit) = 1, so the layer is that expert's FFN
    using Spec = nn::MoE<nn::Experts<1>, nn::TopK<1>, nn::TopKSoftmax>;
    nn::MoELayer<double, Spec> m(4, 3, ts::Seed{62}, 0);
    const auto x = random_tensor(Shape{5, 4}, 162);
    typename nn::MoELayer<double, Spec>::Saved s;
    const auto y = m.forward(x, s);
    nn::SwiGluFfn<double>::Saved fs;
    check_close(y, m.expert(0).forward(x, fs), 1e-14, 1e-14, "one expert = its FFN");
  }
  {  // zero tokens
    using Spec = nn::MoE<nn::Experts<5>, nn::TopK<3>, nn::GroupLimited<5, 3>, nn::AuxLossBalance,
                         nn::SharedExperts<1>>;
    nn::MoELayer<double, Spec> m(6, 5, ts::Seed{63}, 0);
    const auto x = Tensor<double>::zeros(Shape{0, 6});
    typename nn::MoELayer<double, Spec>::Saved s;
    const auto y = m.forward(x, s);
    BOOST_TEST((y.shape() == Shape{0, 6}));
    BOOST_TEST(s.stats.tokens == 0);
    BOOST_TEST(s.stats.aux_loss == 0.0);
    const auto dx = m.backward(y, s);
    BOOST_TEST((dx.shape() == Shape{0, 6}));
  }
  {  // d_model 1, hidden 1, 13 tokens, capacity
    using Spec = nn::MoE<nn::Experts<3>, nn::TopK<2>, nn::TopKSigmoid, nn::NoBalance>;
    nn::MoELayer<double, Spec> m(1, 1, ts::Seed{64}, 0, {.capacity_factor = 1.0});
    const auto x = random_tensor(Shape{13, 1}, 164);
    check_forward(m, x, "d_model 1, hidden 1, capacity 1.0");
  }
}

// ---- other types, names, determinism, errors ------------------------------------------------

BOOST_AUTO_TEST_CASE(bf16_forward) {
  using Spec = nn::MoE<nn::Experts<16>, nn::TopK<2>, nn::GroupLimited<4, 2>, nn::BiasBalance,
                       nn::SharedExperts<1>>;
  using Layer = Spec::Layer<ts::bf16>;
  static_assert(std::is_same_v<Layer, nn::MoELayer<ts::bf16, Spec>>);
  Layer mb(16, 8, ts::Seed{71}, 0);
  Spec::Layer<float> mf(16, 8, ts::Seed{71}, 0);  // the same weights before rounding
  const auto x64 = random_tensor(Shape{9, 16}, 171);
  auto xf = Tensor<float>::empty(x64.shape());
  auto xb = Tensor<ts::bf16>::empty(x64.shape());
  for (int64_t i = 0; i < x64.numel(); ++i) {
    xb.data()[i] = ts::from_float<ts::bf16>(float(x64.data()[i]));
    xf.data()[i] = ts::to_float(xb.data()[i]);  // the same (bf16-exact) input on both sides
  }
  Layer::Saved sb;
  Spec::Layer<float>::Saved sf;
  const auto yb = mb.forward(xb, sb);
  const auto yf = mf.forward(xf, sf);
  int compared = 0;
  for (int64_t t = 0; t < 9; ++t) {
    if (sb.route.chosen(t, 0) != sf.route.chosen(t, 0) || sb.route.chosen(t, 1) != sf.route.chosen(t, 1))
      continue;  // rounding may flip a close choice; then the outputs are not comparable
    ++compared;
    for (int c = 0; c < 16; ++c) {
      const double a = ts::to_float(yb(t, c)), b = yf(t, c);
      BOOST_TEST(std::isfinite(a));
      // bf16 eps 2^-8; a handful of roundings per path.
      BOOST_TEST(std::fabs(a - b) <= 0.05 * (1.0 + std::fabs(b)), "token " << t << " col " << c);
    }
  }
  BOOST_TEST(compared >= 5);
  auto dy = Tensor<ts::bf16>::empty(yb.shape());
  for (int64_t i = 0; i < dy.numel(); ++i) dy.data()[i] = ts::from_float<ts::bf16>(0.1f);
  const auto dx = mb.backward(dy, sb);  // runs; values are checked in double above
  BOOST_TEST(std::isfinite(ts::to_float(dx.data()[0])));
}

BOOST_AUTO_TEST_CASE(parameter_names) {
  using Spec = nn::MoE<nn::Experts<3>, nn::TopK<2>, nn::TopKSoftmax, nn::AuxLossBalance,
                       nn::SharedExperts<2>>;
  nn::MoELayer<float, Spec> m(6, 4, ts::Seed{81}, 0);
  std::vector<std::string> names;
  m.visit_parameters([&](std::string_view name, nn::Parameter<float>& p) {
    names.emplace_back(name);
    BOOST_TEST((p.grad.shape() == p.value.shape()));
  });
  BOOST_TEST(names.size() == 1u + 3u * 3u + 2u * 3u);
  BOOST_TEST(names.front() == "router.gate");
  BOOST_TEST(names[1] == "experts.0.w_gate");
  BOOST_TEST(names[9] == "experts.2.w_down");
  BOOST_TEST(names.back() == "shared_experts.1.w_down");
  int buffers = 0;
  m.visit_buffers([&](std::string_view, auto&) { ++buffers; });
  BOOST_TEST(buffers == 0);
  // Experts draw different weights (each its own stretch of the stream).
  BOOST_TEST(m.expert(0).w_up.value.data()[0] != m.expert(1).w_up.value.data()[0]);
  BOOST_TEST(m.shared_expert(0).w_up.value.data()[0] != m.expert(2).w_up.value.data()[0]);
}

BOOST_AUTO_TEST_CASE(deterministic) {
  using Spec = nn::MoE<nn::Experts<8>, nn::TopK<2>, nn::GroupLimited<4, 2>, nn::AuxLossBalance,
                       nn::SharedExperts<1>>;
  nn::MoELayer<float, Spec> a(16, 8, ts::Seed{91}, 3), b(16, 8, ts::Seed{91}, 3);
  auto x = Tensor<float>::empty(Shape{64, 16});
  ts::fill_normal<float>(x.data(), x.numel(), ts::Seed{191}, 0, 0.0f, 1.0f);
  typename nn::MoELayer<float, Spec>::Saved sa, sb;
  const auto ya = a.forward(x, sa);
  const auto yb = b.forward(x, sb);
  BOOST_TEST(std::equal(ya.data(), ya.data() + ya.numel(), yb.data()));
  const auto da = a.backward(ya, sa);
  const auto db = b.backward(yb, sb);
  BOOST_TEST(std::equal(da.data(), da.data() + da.numel(), db.data()));
  BOOST_TEST(std::equal(a.router().gate.grad.data(), a.router().gate.grad.data() + 8 * 16,
                        b.router().gate.grad.data()));
  BOOST_TEST(sa.stats.nominal_active_fraction == 3.0 / 9.0);
  BOOST_TEST(sa.stats.active_fraction == 3.0 / 9.0);
}

BOOST_AUTO_TEST_CASE(errors) {
  using Spec = nn::MoE<nn::Experts<4>, nn::TopK<2>, nn::TopKSoftmax>;
  nn::MoELayer<float, Spec> m(6, 4, ts::Seed{1}, 0);
  typename nn::MoELayer<float, Spec>::Saved saved;
  try {
    (void)m.forward(Tensor<float>::zeros(Shape{3, 5}), saved);
    BOOST_FAIL("expected tessera::Error");
  } catch (const ts::Error& e) {
    const std::string msg = e.what();
    BOOST_TEST(msg.find("MoE") != std::string::npos, msg);
    BOOST_TEST(msg.find("'x'") != std::string::npos, msg);
  }
  (void)m.forward(Tensor<float>::zeros(Shape{3, 6}), saved);
  BOOST_CHECK_THROW((void)m.backward(Tensor<float>::zeros(Shape{4, 6}), saved), ts::Error);
  BOOST_CHECK_THROW((nn::MoELayer<float, Spec>(6, 4, ts::Seed{1}, 0, {.capacity_factor = -1.0})),
                    ts::Error);
  BOOST_CHECK_THROW((nn::MoELayer<float, Spec>(6, 0, ts::Seed{1}, 0)), ts::Error);
}
