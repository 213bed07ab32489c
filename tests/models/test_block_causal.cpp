// tests/models/test_block_causal.cpp — nn::TransformerBlock with a dense FFN under the causal
// fixed windows (CausalFull, SlidingWindow): backward against central differences in double
// (dx and every parameter element), the stats the block forwards, its random streams.
// One executable per pair of window policies keeps each translation unit short to compile.
#define BOOST_TEST_MODULE test_block_causal
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
}  // namespace

BOOST_AUTO_TEST_SUITE(gradients)

BOOST_AUTO_TEST_CASE(causal_full) {
  check_block_gradients<nn::CausalFull, nn::DenseFfn>("block<CausalFull>", 101, 1.0, {}, kNothing);
}
BOOST_AUTO_TEST_CASE(sliding_window) {
  check_block_gradients<nn::SlidingWindow<5>, nn::DenseFfn>("block<SlidingWindow<5>>", 103, 1.0,
                                                            {}, kNothing);
}

BOOST_AUTO_TEST_SUITE_END()

// The block's stats are the attention's, and its work fraction is the kernel's tile count.
BOOST_AUTO_TEST_CASE(stats_forward_the_attention_work) {
  using Block = nn::TransformerBlock<double, nn::SlidingWindow<5>, nn::DenseFfn>;
  Block blk(8, 2, 1, 6, ts::Seed{7}, 1, models_test::block_options());
  Block::Saved s;
  (void)blk.forward(ts::testing::random_tensor({2, 40, 8}, 8), s);
  BOOST_TEST(!s.stats.has_moe);
  BOOST_TEST(s.stats.aux_loss() == 0.0);
  BOOST_TEST(s.stats.attention.visited_tiles == s.attn.stats.visited_tiles);
  // T = 40 in tiles of 4: 10 query blocks; a window of 5 reads keys [q0 - 4, q1): its own tile
  // and the one before (only its own for the first block): 1 + 2 * 9 = 19 of the 55 tiles full
  // causal attention reads.
  BOOST_TEST(s.stats.attention.work_fraction() == 19.0 / 55.0, boost::test_tools::tolerance(1e-12));
}

// Blocks with different indices draw different weights; the same index, the same weights.
BOOST_AUTO_TEST_CASE(streams_are_per_block) {
  using Block = nn::TransformerBlock<double, nn::CausalFull, nn::DenseFfn>;
  Block a(8, 2, 1, 6, ts::Seed{5}, 1), b(8, 2, 1, 6, ts::Seed{5}, 1), c(8, 2, 1, 6, ts::Seed{5}, 2);
  const double* pa = a.attn().wq().value.data();
  const double* pb = b.attn().wq().value.data();
  const double* pc = c.attn().wq().value.data();
  BOOST_TEST(std::equal(pa, pa + 64, pb));
  BOOST_TEST(!std::equal(pa, pa + 64, pc));
  BOOST_TEST(!std::equal(a.ffn().w_gate.value.data(), a.ffn().w_gate.value.data() + 48,
                         c.ffn().w_gate.value.data()));
}
