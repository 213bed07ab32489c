// tests/train/torch_train_steps.hpp — N AdamW steps of a decoder, tessera against LibTorch, on
// the same batches of real English text: the part test_torch_train_steps (dense) and
// test_torch_train_steps_moe share.
//
// tessera: the model + train::AdamW, the learning rate from train::WarmupCosine. LibTorch: the
// same decoder rebuilt from tessera's safetensors file by torch_ref::decoder (tests/reference: a
// LibTorch forward written from the documented definition, autograd for the gradient), and
// PyTorch's AdamW update written out in double from the gradients LibTorch returns (decoupled
// decay on matrices only; torch::optim's own AdamW is compared with tessera's update in
// test_torch_optimizer). Compared: the loss at every step, relative error under `tolerance`, and
// every final weight, error under `tolerance` of its tensor's largest value.
//
// The caller builds the model and the DecoderSpec's per-layer part (causal_mask() below is the
// mask of a causal layer); `on_step` sees each step's tessera state and LibTorch result (the MoE
// test compares the routing there, before a differing choice makes the losses meaningless).
#pragma once

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <iostream>
#include <string>
#include <vector>

#include <boost/test/unit_test.hpp>

#include "tessera/io/safetensors.hpp"
#include "tessera/models/decoder.hpp"
#include "tessera/train/optimizer.hpp"
#include "tessera/train/schedule.hpp"
#include "tiny_model.hpp"
#include "torch_ref.hpp"

namespace tessera::test {

inline torch_ref::IndexArray ids_of(const Tensor<int32_t>& t) {
  return {std::vector<int64_t>(t.data(), t.data() + t.numel()),
          std::vector<int64_t>(t.shape().begin(), t.shape().end())};
}

// Query i of every sequence reads keys 0..i.
inline torch_ref::Mask causal_mask(int64_t batch, int64_t seq) {
  torch_ref::Mask causal{std::vector<uint8_t>(static_cast<size_t>(batch * seq * seq)),
                         {batch, seq, seq}};
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t i = 0; i < seq; ++i)
      for (int64_t j = 0; j <= i; ++j)
        causal.allowed[static_cast<size_t>((b * seq + i) * seq + j)] = 1;
  return causal;
}

// The model-wide part of the spec, from a decoder's resolved config (RoPE half-split over the
// whole head: AttentionOptions' default). The caller appends one DecoderLayerSpec per layer.
template <class Model>
torch_ref::DecoderSpec decoder_spec() {
  using R = typename Model::Resolved;
  torch_ref::DecoderSpec spec;
  spec.vocab = R::vocab;
  spec.d_model = R::d_model;
  spec.heads = R::heads;
  spec.kv_heads = R::kv_heads;
  spec.norm_eps = R::norm_eps;
  spec.rope.base = R::rope_theta;
  spec.rope.rotary_dim = R::head_dim;
  spec.rope.layout = torch_ref::RopeLayout::kHalfSplit;
  spec.tie_embeddings = R::tie_embeddings;
  return spec;
}

struct TrainStepsOptions {
  int64_t batch = 2, seq = 48;
  int steps = 20;
  double tolerance = 1e-4;  // relative: the loss, and each final weight against its tensor's max
  double min_learning = 0.5;  // the LibTorch loss must fall by this much over the run
};

// Trains `model` and its LibTorch twin side by side. Returns false when the fortunes file is
// missing (the test then prints TESSERA_SKIP).
template <class Model>
bool check_train_steps(
    Model& model, const torch_ref::DecoderSpec& spec, const TrainStepsOptions& opt,
    const std::function<void(int, const typename Model::Saved&, const torch_ref::DecoderResult&)>&
        on_step = {}) {
  namespace fs = std::filesystem;
  namespace tr = tessera::train;
  if (!fs::is_regular_file(kEnglishFortunes)) {
    std::cout << "TESSERA_SKIP: " << kEnglishFortunes << " is missing" << std::endl;
    return false;
  }
  torch_ref::set_num_threads(2);
  const std::string text = read_fortunes(kEnglishFortunes);
  const int64_t kB = opt.batch, kT = opt.seq;

  // LibTorch's weights: tessera's, through the safetensors file.
  const fs::path path = fs::temp_directory_path() /
                        ("tessera_train_steps_" + std::to_string(::getpid()) + ".safetensors");
  save(model, path);
  std::vector<torch_ref::NamedArray> weights;
  {
    io::SafetensorsFile file = io::SafetensorsFile::open(path);
    for (const std::string& name : file.names()) {
      const auto t = file.read<float>(name);
      weights.push_back({name, {std::vector<float>(t.data(), t.data() + t.numel()),
                                std::vector<int64_t>(t.shape().begin(), t.shape().end())}});
    }
  }
  fs::remove(path);

  tr::AdamWOptions o;
  o.beta1 = 0.9;
  o.beta2 = 0.95;
  o.eps = 1e-8;
  o.weight_decay = 0.1;
  tr::AdamW<float> adamw(o);
  const tr::WarmupCosine schedule(1e-2, 3, opt.steps, 1e-3);
  std::vector<std::vector<double>> m(weights.size()), v(weights.size());
  for (size_t k = 0; k < weights.size(); ++k) {
    m[k].assign(weights[k].array.data.size(), 0.0);
    v[k].assign(weights[k].array.data.size(), 0.0);
  }

  double first_loss = 0, last_loss = 0;
  for (int step = 0; step < opt.steps; ++step) {
    auto seq = Tensor<int32_t>::empty({kB, kT + 1});
    for (int64_t i = 0; i < seq.numel(); ++i)
      seq.data()[i] = static_cast<unsigned char>(
          text[static_cast<size_t>(step * 1000 + (i / (kT + 1)) * 500 + i % (kT + 1))]);
    const auto batch = models::next_token_batch(seq);
    typename Model::Saved saved;
    const double loss = model.forward(batch.tokens, batch.targets, saved).loss;
    model.zero_grad();
    model.backward(saved);
    const double lr = schedule(step);
    adamw.step(model, lr);

    const torch_ref::DecoderResult ref =
        torch_ref::decoder(weights, ids_of(batch.tokens), ids_of(batch.targets), spec);
    if (on_step) on_step(step, saved, ref);
    BOOST_TEST(std::fabs(loss - ref.loss) <= opt.tolerance * ref.loss,
               "step " << step << ": tessera loss " << loss << ", LibTorch " << ref.loss);
    if (step == 0) first_loss = ref.loss;
    last_loss = ref.loss;
    // PyTorch's AdamW on LibTorch's gradients (in the order the weights were given).
    BOOST_TEST_REQUIRE(ref.grads.size() == weights.size());
    const double bc1 = 1 - std::pow(o.beta1, step + 1), bc2 = 1 - std::pow(o.beta2, step + 1);
    for (size_t k = 0; k < weights.size(); ++k) {
      BOOST_TEST_REQUIRE(ref.grads[k].name == weights[k].name);
      const bool decay = weights[k].array.shape.size() >= 2;
      auto& w = weights[k].array.data;
      const auto& g = ref.grads[k].array.data;
      for (size_t i = 0; i < w.size(); ++i) {
        double x = w[i];
        if (decay) x *= 1 - lr * o.weight_decay;
        m[k][i] = o.beta1 * m[k][i] + (1 - o.beta1) * g[i];
        v[k][i] = o.beta2 * v[k][i] + (1 - o.beta2) * double(g[i]) * g[i];
        x -= (lr / bc1) * m[k][i] / (std::sqrt(v[k][i]) / std::sqrt(bc2) + o.eps);
        w[i] = static_cast<float>(x);
      }
    }
  }
  BOOST_TEST(last_loss < first_loss - opt.min_learning,
             "the runs learned: " << first_loss << " -> " << last_loss);

  size_t compared = 0;
  double worst = 0;
  model.visit_parameters([&](std::string_view name, nn::Parameter<float>& p) {
    for (const auto& w : weights) {
      if (w.name != name) continue;
      double scale = 0, err = 0;
      for (float x : w.array.data) scale = std::max(scale, std::fabs(double(x)));
      for (size_t i = 0; i < w.array.data.size(); ++i)
        err = std::max(err, std::fabs(double(p.value.data()[i]) - w.array.data[i]));
      worst = std::max(worst, err / scale);
      BOOST_TEST(err <= opt.tolerance * scale,
                 std::string(name) << ": error " << err << " of scale " << scale);
      ++compared;
    }
  });
  BOOST_TEST(compared == weights.size());
  BOOST_TEST_MESSAGE(opt.steps << " AdamW steps: loss " << first_loss << " -> " << last_loss
                               << "; worst final weight error " << worst
                               << " of its tensor's scale");
  return true;
}

}  // namespace tessera::test
