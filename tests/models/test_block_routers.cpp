// tests/models/test_block_routers.cpp — nn::TransformerBlock with a mixture-of-experts FFN,
// one case per router (top-k softmax, renormalised softmax, sigmoid, group-limited) and balance
// (aux loss, bias), with shared experts and with capacity dropping: backward against central
// differences in double of <y, g> + aux_grad * aux_loss (dx and every parameter element), the
// MoE stats the block forwards, and the parameter and buffer names.
#define BOOST_TEST_MODULE test_block_routers
#include <boost/test/unit_test.hpp>

#include <numeric>
#include <string>
#include <vector>

#include "model_testing.hpp"
#include "tessera/nn/transformer_block.hpp"

namespace ts = tessera;
namespace nn = tessera::nn;
using models_test::check_block_gradients;

namespace {

using SoftmaxAux = nn::MoE<nn::Experts<5>, nn::TopK<3>, nn::TopKSoftmax, nn::AuxLossBalance,
                           nn::SharedExperts<1>>;
using SoftmaxRenorm = nn::MoE<nn::Experts<4>, nn::TopK<2>, nn::TopKSoftmaxRenorm>;
using SigmoidBias = nn::MoE<nn::Experts<4>, nn::TopK<2>, nn::TopKSigmoid, nn::BiasBalance,
                            nn::SharedExperts<1>>;
using Grouped = nn::MoE<nn::Experts<6>, nn::TopK<2>, nn::GroupLimited<3, 2>, nn::AuxLossBalanceOf<0.1>>;

constexpr auto kNothing = [](auto&) {};

template <class Spec>
using Block = nn::TransformerBlock<double, nn::CausalFull, Spec>;

// The MoE stats reach the block's stats, and the load counts every assignment.
template <class Spec>
void check_moe_stats(const typename Block<Spec>::Saved& s) {
  BOOST_TEST(s.stats.has_moe);
  const nn::MoEStats& m = s.stats.moe;
  BOOST_TEST(m.tokens == models_test::kBlockB * models_test::kBlockT);
  BOOST_TEST(std::accumulate(m.load.begin(), m.load.end(), int64_t{0}) == m.tokens * Spec::kTopK);
  BOOST_TEST(m.aux_loss == s.ffn.stats.aux_loss);
  BOOST_TEST(s.stats.aux_loss() == s.stats.attention.aux_loss + m.aux_loss);
}

}  // namespace

BOOST_AUTO_TEST_SUITE(gradients)

BOOST_AUTO_TEST_CASE(topk_softmax_aux_loss_shared) {
  const auto s = check_block_gradients<nn::CausalFull, SoftmaxAux>(
      "block<MoE softmax top-3 of 5, aux loss, 1 shared>", 201, 1.0, {}, kNothing);
  check_moe_stats<SoftmaxAux>(s);
  BOOST_TEST(s.stats.moe.aux_loss > 0.0);
}
// aux_grad weights the balance loss's gradient (a loss scale, or an aux coefficient).
BOOST_AUTO_TEST_CASE(topk_softmax_aux_grad_half) {
  check_block_gradients<nn::CausalFull, SoftmaxAux>("block<MoE softmax, aux loss> aux_grad 0.5",
                                                    201, 0.5, {}, kNothing);
}
BOOST_AUTO_TEST_CASE(topk_softmax_renormalised) {
  const auto s = check_block_gradients<nn::CausalFull, SoftmaxRenorm>(
      "block<MoE softmax-renorm top-2 of 4>", 202, 1.0, {}, kNothing);
  check_moe_stats<SoftmaxRenorm>(s);
}
BOOST_AUTO_TEST_CASE(topk_sigmoid_bias_balance_shared) {
  const auto s = check_block_gradients<nn::CausalFull, SigmoidBias>(
      "block<MoE sigmoid top-2 of 4, bias balance, 1 shared>", 203, 1.0, {},
      [](Block<SigmoidBias>& b) {  // a non-zero selection bias, so it is exercised
        for (int i = 0; i < 4; ++i) b.ffn().router().expert_bias.data()[i] = 0.03 * (i - 1.5);
      });
  check_moe_stats<SigmoidBias>(s);
  BOOST_TEST(s.stats.moe.aux_loss == 0.0);
}
BOOST_AUTO_TEST_CASE(group_limited) {
  const auto s = check_block_gradients<nn::CausalFull, Grouped>(
      "block<MoE GroupLimited<3,2> top-2 of 6, aux loss>", 204, 1.0, {}, kNothing);
  check_moe_stats<Grouped>(s);
}
BOOST_AUTO_TEST_CASE(capacity_dropping) {
  const auto s = check_block_gradients<nn::CausalFull, SoftmaxAux>(
      "block<MoE softmax, capacity 0.5>", 205, 1.0, {.capacity_factor = 0.5}, kNothing);
  check_moe_stats<SoftmaxAux>(s);
  BOOST_TEST(s.stats.moe.dropped > 0);  // the case really drops tokens
  BOOST_TEST(s.stats.moe.active_fraction < s.stats.moe.nominal_active_fraction);
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_CASE(names_of_moe_parameters_and_buffers) {
  Block<SigmoidBias> blk(8, 2, 1, 6, ts::Seed{1}, 2, models_test::block_options());
  std::vector<std::string> names;
  blk.visit_parameters([&](std::string_view n, nn::Parameter<double>&) { names.emplace_back(n); });
  BOOST_REQUIRE(names.size() == 1u + 4u + 1u + 1u + 3u * 5u);
  BOOST_TEST(names[5] == "norm2.weight");
  BOOST_TEST(names[6] == "ffn.router.gate");
  BOOST_TEST(names[7] == "ffn.experts.0.w_gate");
  BOOST_TEST(names[18] == "ffn.experts.3.w_down");
  BOOST_TEST(names[19] == "ffn.shared_experts.0.w_gate");
  std::vector<std::string> buffers;
  blk.visit_buffers([&](std::string_view n, auto& t) {
    buffers.emplace_back(n);
    BOOST_TEST(t.numel() == 4);
  });
  BOOST_TEST(buffers == std::vector<std::string>{"ffn.router.expert_bias"},
             boost::test_tools::per_element());
}
