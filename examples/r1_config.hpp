// examples/r1_config.hpp — the flagship R1 model of train_r1, as a type: variable-window attention
// (each 32-token query block picks a window of 32, 64 or all earlier tokens through a learned
// gate), a first dense block, then hierarchical mixture-of-experts blocks (8 routed experts in 4
// groups; each token to its best 2 groups, then its top 2 experts; 1 shared expert; aux-loss-free
// bias balance). Shared by train_r1 and the programs that read its checkpoints (quantize_model,
// benchmarks/quant_quality, benchmarks/train_bench).
#pragma once

#include <tessera/models/decoder.hpp>

namespace r1 {

// vocab is a compile-time member of the config, so the BPE vocabulary is trained to exactly it.
inline constexpr int kVocab = 4096;

struct R1Small {
  static constexpr int vocab = kVocab, d_model = 128, layers = 4;
  static constexpr int heads = 4, kv_heads = 2, max_seq = 512, dense_layers = 1;
  using Window = tessera::VariableWindow<tessera::Sizes<32, 64, tessera::kFull>,
                                         tessera::LearnedSelector, 32>;
  using Ffn = tessera::MoE<tessera::Experts<8>, tessera::TopK<2>, tessera::GroupLimited<4, 2>,
                           tessera::BiasBalance, tessera::SharedExperts<1>>;
};

}  // namespace r1
