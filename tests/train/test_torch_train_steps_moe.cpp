// tests/train/test_torch_train_steps_moe.cpp — 20 AdamW steps of the small decoder of
// test_torch_train_steps with its second block a mixture of experts, tessera against LibTorch
// (label torch; the loop is torch_train_steps.hpp).
//
// The MoE: 4 experts, top-2 of softmax scores (TopKSoftmax, weights not renormalised), one
// shared expert, the aux-loss balance (alpha 0.01, so the loss and every step's router gradient
// carry it), no capacity limit: every part torch_ref::decoder's MoE spells out. The aux-loss-
// free bias balance is left out on purpose: its bias moves between steps by update_balance, a
// rule torch_ref does not model.
//
// Routing is compared before the losses at every step: tessera's chosen experts must be
// LibTorch's. A near-tie decided differently by rounding would otherwise send the runs apart,
// and the message then says which step and layer it was (the seed and the text are fixed, so
// a failure repeats).
#define BOOST_TEST_MODULE test_torch_train_steps_moe
#include <boost/test/unit_test.hpp>

#include "torch_train_steps.hpp"

namespace ts = tessera;

namespace {

struct SmallMoE {
  static constexpr int vocab = 256, d_model = 32, layers = 2, heads = 4, kv_heads = 2, max_seq = 64;
  static constexpr int dense_layers = 1;
  using Ffn = ts::MoE<ts::Experts<4>, ts::TopK<2>, ts::TopKSoftmax, ts::AuxLossBalanceOf<0.01>,
                      ts::SharedExperts<1>>;
};
using Model = ts::Decoder<SmallMoE>;
using R = Model::Resolved;

}  // namespace

BOOST_AUTO_TEST_CASE(twenty_adamw_steps_of_an_moe_decoder_match_libtorch) {
  const ts::test::TrainStepsOptions opt;
  Model model{ts::Seed{11}};
  torch_ref::DecoderSpec spec = ts::test::decoder_spec<Model>();
  for (int l = 0; l < R::layers; ++l) {
    torch_ref::DecoderLayerSpec ls{ts::test::causal_mask(opt.batch, opt.seq), std::nullopt, 0, 0};
    if (l >= R::dense_layers) {
      torch_ref::MoESpec m;
      m.score = torch_ref::RouterScore::kSoftmax;
      m.renormalize = false;
      m.top_k = R::top_k;
      m.aux_alpha = 0.01;
      ls.moe = m;
      ls.experts = R::experts;
      ls.shared = R::shared_experts;
    }
    spec.layers.push_back(std::move(ls));
  }
  double aux = 0;
  int64_t assignments = 0;
  ts::test::check_train_steps(
      model, spec, opt,
      [&](int step, const Model::Saved& saved, const torch_ref::DecoderResult& ref) {
        BOOST_TEST_REQUIRE(saved.trunk.moe.size() == 1u);
        const auto& chosen = saved.trunk.moe[0].ffn.route.chosen;
        const torch_ref::IndexArray& expected = ref.chosen[size_t(R::dense_layers)];
        BOOST_TEST_REQUIRE(expected.data.size() == size_t(chosen.numel()));
        int64_t differ = 0;
        for (int64_t i = 0; i < chosen.numel(); ++i)
          differ += chosen.data()[i] != expected.data[size_t(i)];
        BOOST_TEST_REQUIRE(differ == 0, "step " << step << ": " << differ << " of "
                                                << chosen.numel()
                                                << " expert choices differ from LibTorch's");
        BOOST_TEST(std::fabs(saved.stats.aux_loss - ref.aux_loss) <= 1e-4 * ref.aux_loss,
                   "step " << step << ": aux loss " << saved.stats.aux_loss << ", LibTorch "
                           << ref.aux_loss);
        aux += ref.aux_loss;
        assignments += chosen.numel();
      });
  BOOST_TEST(aux > 0.0);  // the balance loss was in every step's loss
  BOOST_TEST(assignments == 20 * opt.batch * opt.seq * R::top_k);
}
