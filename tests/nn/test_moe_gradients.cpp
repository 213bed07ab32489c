// tests/nn/test_moe_gradients.cpp — MoE backward against central finite differences in double
// (tokens 7, d_model 6, hidden 5, 5 experts top-3; 6 experts in 3 groups for the hierarchical
// router), for every router and balance policy, with and without capacity dropping. The loss is
// <y, g> + aux_loss. Finite differences are only meaningful where the discrete choice does not
// flip under a 1e-6 perturbation, so each check first REQUIREs that every token's choice
// (experts and groups) wins by a margin of at least 1e-4 in selection score: the inputs are
// chosen away from routing ties (the margins are printed). Each case also checks the forward
// against the per-token reference (moe_reference.hpp).
// Split from test_moe.cpp to keep each test program's compile time short.
#define BOOST_TEST_MODULE test_moe_gradients
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

namespace {

// Finite-difference check of dx and of every parameter's gradient; loss = <y, g> + aux_loss.
template <class Spec>
void check_gradients(nn::MoELayer<double, Spec>& m, const Tensor<double>& x, uint64_t g_seed,
                     const std::string& what) {
  using Layer = nn::MoELayer<double, Spec>;
  const Reference r = reference(m, x);
  BOOST_TEST_MESSAGE(what << ": smallest routing margin " << r.min_margin);
  BOOST_REQUIRE_MESSAGE(r.min_margin > 1e-4, what << ": inputs too close to a routing tie");
  const auto g = random_tensor(x.shape(), g_seed);
  auto loss = [&](TensorView<const double> xv) {
    typename Layer::Saved s;
    return dot(m.forward(xv, s), g) + s.stats.aux_loss;
  };
  m.visit_parameters([](std::string_view, nn::Parameter<double>& p) { p.zero_grad(); });
  typename Layer::Saved saved;
  (void)m.forward(x, saved);
  const auto dx = m.backward(g, saved);
  check_close(dx, numeric_gradient(loss, x), 1e-6, 1e-8, (what + " dx").c_str());
  m.visit_parameters([&](std::string_view name, nn::Parameter<double>& p) {
    const Tensor<double> original = p.value.clone();
    auto loss_w = [&](TensorView<const double> wv) {
      std::copy_n(wv.data(), wv.numel(), p.value.data());
      return loss(x);
    };
    const auto numeric = numeric_gradient(loss_w, original);
    std::copy_n(original.data(), original.numel(), p.value.data());
    check_close(p.grad, numeric, 1e-6, 1e-8, (what + " " + std::string(name)).c_str());
  });
}

template <class Spec>
void gradient_case(const std::string& what, uint64_t seed, nn::MoEOptions opts = {},
                   int64_t d_model = 6) {
  BOOST_TEST_MESSAGE(what << ": layer seed " << seed << ", input seed " << seed + 100
                          << ", upstream seed " << seed + 200);
  nn::MoELayer<double, Spec> m(d_model, 5, ts::Seed{seed}, 1, opts);
  if constexpr (Spec::Balance::kBias) {  // a non-zero selection bias, so it is exercised
    for (int i = 0; i < Spec::kExperts; ++i)
      m.router().expert_bias.data()[i] = 0.05 * ((i * 7) % 5 - 2);
  }
  const auto x = random_tensor(Shape{7, d_model}, seed + 100);
  check_forward(m, x, (what + " forward").c_str());
  check_gradients(m, x, seed + 200, what);
}

}  // namespace

// ---- forward + gradients under each router --------------------------------------------------

BOOST_AUTO_TEST_CASE(gradients_topk_softmax_aux_loss_shared) {
  using Spec = nn::MoE<nn::Experts<5>, nn::TopK<3>, nn::TopKSoftmax, nn::AuxLossBalanceOf<0.5>,
                       nn::SharedExperts<1>>;
  gradient_case<Spec>("TopKSoftmax+AuxLoss+Shared1", 21);
}

BOOST_AUTO_TEST_CASE(gradients_topk_softmax_renorm) {
  using Spec = nn::MoE<nn::Experts<5>, nn::TopK<3>, nn::TopKSoftmaxRenorm>;
  gradient_case<Spec>("TopKSoftmaxRenorm", 22);
}

BOOST_AUTO_TEST_CASE(gradients_topk_sigmoid_bias_balance) {
  using Spec = nn::MoE<nn::Experts<5>, nn::TopK<3>, nn::TopKSigmoid, nn::BiasBalance,
                       nn::SharedExperts<1>>;
  gradient_case<Spec>("TopKSigmoid+BiasBalance+Shared1", 23);
}

BOOST_AUTO_TEST_CASE(gradients_topk_sigmoid_aux_loss) {
  using Spec = nn::MoE<nn::Experts<5>, nn::TopK<3>, nn::TopKSigmoid, nn::AuxLossBalanceOf<0.5>>;
  gradient_case<Spec>("TopKSigmoid+AuxLoss", 24);
}

BOOST_AUTO_TEST_CASE(gradients_group_limited) {
  // 6 experts in 3 groups of 2, keep 2 groups, top-3 inside: group score = sum of the two.
  using Spec = nn::MoE<nn::Experts<6>, nn::TopK<3>, nn::GroupLimited<3, 2>,
                       nn::AuxLossBalanceOf<0.5>, nn::SharedExperts<1>>;
  gradient_case<Spec>("GroupLimited<3,2>+AuxLoss+Shared1", 25);
  // 5 experts in 5 one-expert groups, keep 4, softmax scores, bias balance.
  using Spec5 = nn::MoE<nn::Experts<5>, nn::TopK<3>, nn::GroupLimited<5, 4, nn::TopKSoftmax>,
                        nn::BiasBalance>;
  gradient_case<Spec5>("GroupLimited<5,4,TopKSoftmax>+BiasBalance", 26);
}

BOOST_AUTO_TEST_CASE(gradients_with_capacity_dropping) {
  using Spec = nn::MoE<nn::Experts<5>, nn::TopK<3>, nn::TopKSoftmaxRenorm, nn::AuxLossBalance,
                       nn::SharedExperts<1>>;
  // capacity = ceil(0.6 * 7 * 3 / 5) = 3 rows per expert: some assignments are dropped.
  gradient_case<Spec>("TopKSoftmaxRenorm+capacity 0.6", 27, nn::MoEOptions{.capacity_factor = 0.6});
  nn::MoELayer<double, Spec> m(6, 5, ts::Seed{27}, 1, {.capacity_factor = 0.6});
  typename nn::MoELayer<double, Spec>::Saved saved;
  (void)m.forward(random_tensor(Shape{7, 6}, 127), saved);
  BOOST_TEST(saved.stats.capacity == 3);
  BOOST_TEST(saved.stats.dropped > 0);
}
