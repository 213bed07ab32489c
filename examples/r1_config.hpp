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

#include <filesystem>
#include <map>
#include <memory>
#include <string>

#include <tessera/models/weights.hpp>
#include <tessera/train/precision.hpp>

namespace r1 {

// Reads a train_r1 checkpoint (step-N/model.safetensors) into an fp32 model. train_r1's default
// recipe (bf16-mixed) stores bf16 weights: they are widened exactly (every bf16 is a float);
// an fp32 or FP8-recipe run stores float. Returns "fp32" or "bf16", what the file held.
inline std::string load_checkpoint(tessera::Decoder<R1Small>& model,
                                   const std::filesystem::path& file) {
  namespace ts = tessera;
  try {
    ts::load(model, file);
    return "fp32";
  } catch (const ts::Error&) {
    // Not float: try bf16 (its error, if any, is the one to report).
  }
  auto bf = std::make_unique<ts::Decoder<ts::train::WithRecipe<R1Small, ts::train::BF16Mixed>>>(
      ts::Seed{1});
  ts::load(*bf, file);
  std::map<std::string, ts::Tensor<float>> w;
  bf->visit_weights([&](std::string_view name, auto& x) {
    ts::Tensor<float> f(x.shape());
    for (int64_t i = 0; i < x.numel(); ++i) f.data()[i] = ts::to_float(x.data()[i]);
    w.emplace(std::string(name), std::move(f));
  });
  model.visit_weights([&](std::string_view name, auto& x) { x = w.at(std::string(name)).clone(); });
  return "bf16";
}

// The newest step-N/model.safetensors under a train_r1 run directory ("" when there is none).
inline std::filesystem::path newest_checkpoint(const std::filesystem::path& run_dir) {
  std::filesystem::path best;
  long best_step = -1;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(run_dir / "checkpoints", ec)) {
    const std::string n = e.path().filename().string();
    if (n.rfind("step-", 0) != 0) continue;
    const long step = std::atol(n.c_str() + 5);
    if (step > best_step && std::filesystem::exists(e.path() / "model.safetensors"))
      best_step = step, best = e.path() / "model.safetensors";
  }
  return best;
}

}  // namespace r1
