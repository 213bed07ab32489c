// tests/train/tiny_model.hpp — the small R1 decoder the training tests and the kill-and-resume
// helper train: byte tokens, a variable window with a learned selector, and a group-limited MoE
// with the aux-loss-free bias (a buffer, so checkpoints must carry non-parameter state too).
#pragma once

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "tessera/models/decoder.hpp"
#include "tessera/train/precision.hpp"

namespace tessera::test {

struct TinyTrainR1 {
  static constexpr int vocab = 256, d_model = 32, layers = 2;
  static constexpr int heads = 4, kv_heads = 2, max_seq = 64, dense_layers = 1;
  using Window = VariableWindow<Sizes<8, 16, kFull>, LearnedSelector, 8>;
  using Ffn = MoE<Experts<4>, TopK<2>, GroupLimited<2, 1>, BiasBalance, SharedExperts<1>>;
};

// Fortune records without the '%' separator lines: real English text.
inline std::string read_fortunes(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::string text, line;
  while (std::getline(in, line))
    if (line != "%") text.append(line).push_back('\n');
  return text;
}

inline const char* kEnglishFortunes = "/usr/share/games/fortunes/fortunes";

}  // namespace tessera::test
