// tests/train/test_torch_train_steps.cpp — 20 AdamW steps of a small decoder, tessera against
// LibTorch, on the same batches of real English text (label torch).
//
// tessera: Decoder<Small> (float; CausalFull, dense SwiGLU, 2 layers) + train::AdamW, the
// learning rate from train::WarmupCosine; LibTorch: torch_ref::decoder and PyTorch's AdamW
// written out (torch_train_steps.hpp, shared with the MoE version). Compared: the loss at every
// step, relative error under 1e-4, and every final weight, error under 1e-4 of its tensor's
// largest value.
//
// The MoE version (test_torch_train_steps_moe) trains the same decoder with an MoE block; it
// checks the routing at every step, because a near-tie decided differently by rounding would
// send the two runs down different paths.
#define BOOST_TEST_MODULE test_torch_train_steps
#include <boost/test/unit_test.hpp>

#include "torch_train_steps.hpp"

namespace ts = tessera;

namespace {

struct Small {
  static constexpr int vocab = 256, d_model = 32, layers = 2, heads = 4, kv_heads = 2, max_seq = 64;
};
using Model = ts::Decoder<Small>;

}  // namespace

BOOST_AUTO_TEST_CASE(twenty_adamw_steps_match_libtorch) {
  const ts::test::TrainStepsOptions opt;
  Model model{ts::Seed{11}};
  torch_ref::DecoderSpec spec = ts::test::decoder_spec<Model>();
  for (int l = 0; l < Small::layers; ++l)
    spec.layers.push_back({ts::test::causal_mask(opt.batch, opt.seq), std::nullopt, 0, 0});
  ts::test::check_train_steps(model, spec, opt);
}
