// tests/bert/torch_reference.hpp — runs tests/bert/bert_reference.py (PyTorch, float64) on
// token ids and returns its output; shared by test_bert and test_bert_double.
#pragma once

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <vector>

#include "bert_test_common.hpp"
#include "tessera/data/wordpiece.hpp"
#include "tessera/models/bert.hpp"

namespace tessera::test::bert {

// The interpreter with Debian's python3-torch and numpy, or "".
inline std::string torch_python() {
  return python_with({"torch", "numpy"}, {"/usr/bin/python3", "python3"});
}

// Runs the reference on the encodings; returns its JSON output.
// `hidden` lists the texts whose last hidden state is returned too; `secs` gets the run time.
inline nlohmann::json reference(const std::string& py, const std::filesystem::path& model_dir,
                                const std::vector<tessera::data::WordPieceEncoding>& encs,
                                const std::vector<int>& hidden, const std::string& tag,
                                double* secs = nullptr) {
  const auto tmp = scratch_dir(tag);
  nlohmann::json req;
  req["sentences"] = nlohmann::json::array();
  for (const auto& e : encs) req["sentences"].push_back({{"ids", e.ids}, {"type_ids", e.type_ids}});
  req["hidden"] = hidden;
  std::ofstream(tmp / "in.json") << req.dump();
  const std::string cmd =
      openblas_env() + py + " " TESSERA_BERT_TEST_DIR "/bert_reference.py --model-dir " +
      shell_quote(model_dir.string()) + " --in " + shell_quote((tmp / "in.json").string()) +
      " --out " + shell_quote((tmp / "out.json").string());
  const auto t0 = std::chrono::steady_clock::now();
  const int rc = std::system(cmd.c_str());
  if (secs) *secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  // Thrown, not a Boost.Test assertion: the tests run this on a second thread (std::async),
  // and get() carries the exception to the test's thread.
  if (rc != 0)
    throw std::runtime_error("reference script failed (" + std::to_string(rc) + "): " + cmd);
  nlohmann::json out = nlohmann::json::parse(std::ifstream(tmp / "out.json"));
  std::filesystem::remove_all(tmp);
  return out;
}

// Inputs for the tiny random BERT of tiny_bert.hpp: short, with token type 1, empty
// ([CLS] [SEP]) and as long as max_position_embeddings.
inline std::vector<tessera::data::WordPieceEncoding> tiny_encodings() {
  return {
      {{2, 5, 6, 7, 3}, {0, 0, 0, 0, 0}},
      {{2, 30, 31, 3, 8, 9, 10, 11, 3}, {0, 0, 0, 0, 1, 1, 1, 1, 1}},
      {{2, 3}, {0, 0}},
      {std::vector<int32_t>(40, 17), std::vector<int32_t>(40, 1)},
  };
}

// Largest difference between the model's last hidden states and mean-pooled, normalised
// embeddings (each text alone) and the reference's.
template <class T>
double worst_difference(const tessera::models::BertEncoder<T>& m,
                        const std::vector<tessera::data::WordPieceEncoding>& encs,
                        const nlohmann::json& ref) {
  using tessera::Shape;
  using tessera::Tensor;
  double worst = 0;
  const int64_t h = m.config().hidden_size;
  for (std::size_t s = 0; s < encs.size(); ++s) {
    const auto len = static_cast<int64_t>(encs[s].ids.size());
    const Tensor<int32_t> ids =
        Tensor<int32_t>::from(Shape{1, len}, std::span<const int32_t>(encs[s].ids));
    const Tensor<int32_t> types =
        Tensor<int32_t>::from(Shape{1, len}, std::span<const int32_t>(encs[s].type_ids));
    const Tensor<int32_t> mask = Tensor<int32_t>::full(Shape{1, len}, 1);
    const Tensor<T> hs = m.forward(ids, mask, types.view());
    const Tensor<T> pooled = tessera::models::mean_pool<T>(hs, mask, true);
    const auto& rh = ref["hidden"][std::to_string(s)];
    for (int64_t t = 0; t < len; ++t)
      for (int64_t j = 0; j < h; ++j)
        worst = std::max(
            worst,
            std::abs(static_cast<double>(hs(0, t, j)) -
                     rh[static_cast<std::size_t>(t)][static_cast<std::size_t>(j)].get<double>()));
    for (int64_t j = 0; j < h; ++j)
      worst = std::max(worst,
                       std::abs(static_cast<double>(pooled(0, j)) -
                                ref["embeddings"][s][static_cast<std::size_t>(j)].get<double>()));
  }
  return worst;
}

}  // namespace tessera::test::bert
