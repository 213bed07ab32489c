// tessera/models/weights.hpp — save a model's weights to safetensors and load them back.
//
//   ts::save(model, "tiny_r1.safetensors");
//   ts::load(model, "tiny_r1.safetensors");   // refuses a file that does not fit, untouched
//
// Why through names: a model hands out every tensor it owns under a dotted name
// (visit_weights: parameters, then non-gradient buffers such as the MoE selection bias), and
// the file is a map from those names to tensors. Nothing depends on the order of tensors in the
// file, a file written by another tool loads when its names and shapes agree, and a mismatch
// is reported by name: io::load_parameters checks every visited tensor first (present, same
// shape, same dtype) and that the file holds nothing else, and only then reads, so a refused
// file leaves the model exactly as it was. Messages look like
//   load_parameters 'm.safetensors': tensor 'layers.1.attn.wq' is missing from the file
//   load_parameters 'm.safetensors': the file holds tensor 'lm_head.weight', which the model does not have
//   load_parameters 'm.safetensors': tensor 'norm.weight' has shape [8] in the file, the model expects [16]
//   load_parameters 'm.safetensors': tensor 'embed.weight' is stored as F64, the model expects F32
// The file is untrusted input (io/safetensors.hpp validates all of it) and is written
// atomically (a crash mid-save leaves the old file).
//
// The metadata records the model kind ("tessera.model": "decoder" / "encoder") and a one-line
// summary of the config ("tessera.config"); load refuses a file whose kind differs (before
// naming tensors, because then nothing would match), and otherwise only informs: a model with
// another window policy but the same weights (an ablation, fine-tuning with a sliding window)
// loads on purpose.
#pragma once

#include <filesystem>
#include <map>
#include <string>
#include <string_view>

#include "tessera/core/error.hpp"
#include "tessera/io/safetensors.hpp"

namespace tessera::models {

// A model whose tensors can be saved: visit_weights(f) calls f(name, Tensor<T>&) for each one,
// kind() names it, metadata() describes it.
template <class M>
concept SavableModel = requires(M& m, const M& cm) {
  m.visit_weights([](std::string_view, auto&) {});
  { cm.metadata() } -> std::convertible_to<std::map<std::string, std::string>>;
  { M::kind() } -> std::convertible_to<std::string_view>;
};

// Writes every weight of `model` to `path` (safetensors, atomically).
template <SavableModel Model>
void save(const Model& model, const std::filesystem::path& path) {
  // visit_weights hands out mutable references because load uses the same walk; saving only
  // reads them.
  Model& m = const_cast<Model&>(model);
  io::save_parameters(path, [&](auto f) { m.visit_weights(f); }, model.metadata());
}

// Reads every weight of `model` from `path`. The file must hold exactly the model's tensors,
// with the model's shapes and dtypes; otherwise it throws tessera::Error naming the tensor and
// leaves the model untouched.
template <SavableModel Model>
void load(Model& model, const std::filesystem::path& path) {
  {
    const io::SafetensorsFile file = io::SafetensorsFile::open(path);
    const auto& meta = file.metadata();
    const auto it = meta.find("tessera.model");
    TESSERA_CHECK(it == meta.end() || it->second == Model::kind(), "load '", path.string(),
                  "': the file holds a tessera ", it == meta.end() ? "" : it->second,
                  ", not a ", Model::kind());
  }
  io::load_parameters(path, [&](auto f) { model.visit_weights(f); });
}

}  // namespace tessera::models

namespace tessera {
using models::load;
using models::save;
}  // namespace tessera
