// tests/models/test_block_bidirectional.cpp — nn::TransformerBlock with a dense FFN under
// Bidirectional and LocalGlobal windows: backward against central differences in double (dx
// and every parameter element).
#define BOOST_TEST_MODULE test_block_bidirectional
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

BOOST_AUTO_TEST_CASE(bidirectional) {
  check_block_gradients<nn::Bidirectional, nn::DenseFfn>("block<Bidirectional>", 102, 1.0, {},
                                                         kNothing);
}
BOOST_AUTO_TEST_CASE(local_global) {
  check_block_gradients<nn::LocalGlobal<5, 2>, nn::DenseFfn>("block<LocalGlobal<5,2>>", 104, 1.0,
                                                             {}, kNothing);
}

BOOST_AUTO_TEST_SUITE_END()
