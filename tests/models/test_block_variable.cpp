// tests/models/test_block_variable.cpp — nn::TransformerBlock with a dense FFN under
// VariableWindow with the heuristic and the learned selector: backward against central
// differences in double (for the learned selector against its straight-through surrogate, see
// model_testing.hpp), the aux-gradient scaling of the selector's penalty, the parameter names.
#define BOOST_TEST_MODULE test_block_variable
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <string>
#include <vector>

#include "model_testing.hpp"
#include "tessera/nn/transformer_block.hpp"

namespace ts = tessera;
namespace nn = tessera::nn;
using models_test::check_block_gradients;

namespace {
constexpr auto kNothing = [](auto&) {};
using VarSizes = nn::Sizes<2, 5, nn::kFull>;
using VarHeuristic = nn::VariableWindow<VarSizes, nn::HeuristicSelector, 4>;
using VarLearned = nn::VariableWindow<VarSizes, nn::LearnedSelector, 4>;
}  // namespace

BOOST_AUTO_TEST_SUITE(gradients)

BOOST_AUTO_TEST_CASE(variable_window_heuristic) {
  const auto saved = check_block_gradients<VarHeuristic, nn::DenseFfn>(
      "block<VariableWindow<Heuristic>>", 105, 1.0, {}, kNothing);
  BOOST_TEST(saved.stats.attention.window_histogram.size() == 3u);
}
BOOST_AUTO_TEST_CASE(variable_window_learned) {
  const auto saved = check_block_gradients<VarLearned, nn::DenseFfn>(
      "block<VariableWindow<Learned>>", 106, 1.0, {}, kNothing);
  BOOST_TEST(saved.stats.attention.aux_loss > 0.0);
  BOOST_TEST(saved.stats.aux_loss() == saved.stats.attention.aux_loss);
}
// aux_grad scales the selector's penalty gradient: checked against the surrogate with the
// penalty term weighted by 0.5, and the penalty member is restored afterwards.
BOOST_AUTO_TEST_CASE(variable_window_learned_aux_grad_half) {
  double penalty_after = -1.0;
  using Block = nn::TransformerBlock<double, VarLearned, nn::DenseFfn>;
  check_block_gradients<VarLearned, nn::DenseFfn>("block<VariableWindow<Learned>> aux_grad 0.5",
                                                  106, 0.5, {}, [&](Block& b) {
                                                    penalty_after = b.attn().selector().penalty;
                                                  });
  BOOST_TEST(penalty_after == 0.05);
  Block blk(8, 2, 1, 6, ts::Seed{106}, 3, models_test::block_options());
  Block::Saved s;
  const auto x = ts::testing::random_tensor({2, 13, 8}, 107);
  (void)blk.forward(x, s);
  (void)blk.backward(x, s, 0.25);
  BOOST_TEST(blk.attn().selector().penalty == 0.05);  // restored after the scaled backward
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_CASE(parameter_names_and_shapes) {
  nn::TransformerBlock<double, VarLearned, nn::DenseFfn> blk(8, 2, 1, 6, ts::Seed{1}, 2,
                                                            models_test::block_options());
  std::vector<std::string> names, shapes;
  blk.visit_parameters([&](std::string_view n, nn::Parameter<double>& p) {
    names.emplace_back(n);
    shapes.push_back(p.value.shape().str());
    BOOST_TEST(p.grad.shape() == p.value.shape());
  });
  const std::vector<std::string> want_names = {
      "norm1.weight", "attn.wq", "attn.wk", "attn.wv", "attn.wo", "attn.gate.weight",
      "attn.gate.bias", "norm2.weight", "ffn.w_gate", "ffn.w_up", "ffn.w_down"};
  const std::vector<std::string> want_shapes = {"[8]",    "[8, 8]", "[4, 8]", "[4, 8]",
                                                "[8, 8]", "[3, 8]", "[3]",    "[8]",
                                                "[6, 8]", "[6, 8]", "[8, 6]"};
  BOOST_TEST(names == want_names, boost::test_tools::per_element());
  BOOST_TEST(shapes == want_shapes, boost::test_tools::per_element());
  int buffers = 0;
  blk.visit_buffers([&](std::string_view, auto&) { ++buffers; });
  BOOST_TEST(buffers == 0);
}
