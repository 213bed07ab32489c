// tests/bert/tiny_bert.hpp — a small BERT with random weights, written to disk the way a
// Hugging Face checkpoint is (config.json + model.safetensors), so the tests can load it
// through the same path as the real model, break it on purpose, and hand it to the PyTorch
// reference script.
#pragma once

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "tessera/core/rng.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/io/safetensors.hpp"
#include "tessera/models/bert.hpp"

namespace tessera::test::bert {

struct TinyBertOptions {
  int64_t vocab = 37, hidden = 16, layers = 2, heads = 4, intermediate = 24, positions = 40,
          types = 2;
  std::string prefix;        // "bert." to imitate a task-head checkpoint
  std::string drop;          // a tensor left out
  std::string reshape;       // a tensor written with one row too many
  bool extra_layer = false;  // weights of one layer more than config.json says
  uint64_t seed = 11;
};

inline nlohmann::json tiny_config_json(const TinyBertOptions& o) {
  return {{"model_type", "bert"},
          {"hidden_act", "gelu"},
          {"hidden_size", o.hidden},
          {"num_hidden_layers", o.layers},
          {"num_attention_heads", o.heads},
          {"intermediate_size", o.intermediate},
          {"max_position_embeddings", o.positions},
          {"type_vocab_size", o.types},
          {"vocab_size", o.vocab},
          {"layer_norm_eps", 1e-12},
          {"position_embedding_type", "absolute"}};
}

// Writes dir/config.json and dir/model.safetensors. Weights are N(0, 0.3) (LayerNorm weights
// 1 + N(0, 0.1)), large enough that every layer changes the result visibly.
inline void write_tiny_bert(const std::filesystem::path& dir, const TinyBertOptions& o) {
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "config.json") << tiny_config_json(o).dump(2);
  models::BertConfig c;
  c.vocab_size = o.vocab;
  c.hidden_size = o.hidden;
  c.num_layers = o.layers + (o.extra_layer ? 1 : 0);
  c.num_heads = o.heads;
  c.intermediate_size = o.intermediate;
  c.max_positions = o.positions;
  c.type_vocab_size = o.types;
  std::vector<std::pair<std::string, Tensor<float>>> tensors;
  uint64_t sub = 0;
  auto fill = [&](const std::string& name, const Shape& shape) {
    Shape s = shape;
    if (name == o.reshape) s = s.rank() == 1 ? Shape{s[0] + 1} : Shape{s[0] + 1, s[1]};
    Tensor<float> t = Tensor<float>::empty(s);
    const bool ln_weight = name.find("LayerNorm.weight") != std::string::npos;
    fill_normal(t.data(), t.numel(), Seed(o.seed), sub++, ln_weight ? 1.0f : 0.0f,
                ln_weight ? 0.1f : 0.3f);
    tensors.emplace_back(o.prefix + name, std::move(t));
  };
  // The names and shapes load() asks for, from a zero model of the same config.
  models::BertEncoder<float> shapes = models::BertEncoder<float>::with_config(c);
  shapes.visit_parameters([&](const std::string& name, Tensor<float>& t) {
    if (name != o.drop) fill(name, t.shape());
  });
  std::vector<io::TensorEntry> entries;
  for (const auto& [name, t] : tensors) entries.emplace_back(name, t);
  Tensor<int64_t> position_ids(Shape{1, o.positions});  // present in real files, unused
  for (int64_t i = 0; i < o.positions; ++i) position_ids.data()[i] = i;
  entries.emplace_back(o.prefix + "embeddings.position_ids", position_ids);
  io::save_safetensors(dir / "model.safetensors", entries, {{"format", "pt"}});
}

}  // namespace tessera::test::bert
