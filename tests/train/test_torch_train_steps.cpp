// tests/train/test_torch_train_steps.cpp — 20 AdamW steps of a small decoder, tessera against
// LibTorch, on the same batches of real English text (label torch).
//
// tessera: Decoder<Small> (float; CausalFull, dense SwiGLU, 2 layers) + train::AdamW, the
// learning rate from train::WarmupCosine. LibTorch: the same decoder rebuilt from tessera's
// safetensors file by torch_ref::decoder (tests/reference: a LibTorch forward written from the
// documented definition, autograd for the gradient), and PyTorch's AdamW update written out in
// double from the gradients LibTorch returns (decoupled decay on matrices only; torch::optim's
// own AdamW is compared with tessera's update in test_torch_optimizer). Compared: the loss at
// every step, relative error under 1e-4, and every final weight, error under 1e-4 of its
// tensor's largest value.
//
// Why dense: with an MoE a near-tie in routing, decided differently by rounding, would send the
// two runs down different paths within 20 steps; the MoE's forward and backward are
// cross-checked on their own (test_torch_moe, test_torch_decoder).
#define BOOST_TEST_MODULE test_torch_train_steps
#include <boost/test/unit_test.hpp>

#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <iostream>
#include <string>
#include <vector>

#include "tessera/io/safetensors.hpp"
#include "tessera/models/decoder.hpp"
#include "tessera/train/optimizer.hpp"
#include "tessera/train/schedule.hpp"
#include "tiny_model.hpp"
#include "torch_ref.hpp"

namespace ts = tessera;
namespace tr = tessera::train;
namespace fs = std::filesystem;

namespace {

struct Small {
  static constexpr int vocab = 256, d_model = 32, layers = 2, heads = 4, kv_heads = 2, max_seq = 64;
};
using Model = ts::Decoder<Small>;
constexpr int64_t kB = 2, kT = 48;

torch_ref::IndexArray ids_of(const ts::Tensor<int32_t>& t) {
  return {std::vector<int64_t>(t.data(), t.data() + t.numel()),
          std::vector<int64_t>(t.shape().begin(), t.shape().end())};
}

}  // namespace

BOOST_AUTO_TEST_CASE(twenty_adamw_steps_match_libtorch) {
  if (!fs::is_regular_file(ts::test::kEnglishFortunes)) {
    std::cout << "TESSERA_SKIP: " << ts::test::kEnglishFortunes << " is missing" << std::endl;
    return;
  }
  torch_ref::set_num_threads(2);
  const std::string text = ts::test::read_fortunes(ts::test::kEnglishFortunes);
  Model model{ts::Seed{11}};

  // LibTorch's weights: tessera's, through the safetensors file.
  const fs::path path = fs::temp_directory_path() / ("tessera_train20_" + std::to_string(::getpid()) + ".safetensors");
  ts::save(model, path);
  std::vector<torch_ref::NamedArray> weights;
  {
    ts::io::SafetensorsFile file = ts::io::SafetensorsFile::open(path);
    for (const std::string& name : file.names()) {
      const auto t = file.read<float>(name);
      weights.push_back({name, {std::vector<float>(t.data(), t.data() + t.numel()),
                                std::vector<int64_t>(t.shape().begin(), t.shape().end())}});
    }
  }
  fs::remove(path);

  torch_ref::DecoderSpec spec;
  spec.vocab = Small::vocab;
  spec.d_model = Small::d_model;
  spec.heads = Small::heads;
  spec.kv_heads = Small::kv_heads;
  spec.norm_eps = 1e-6;
  spec.rope.base = 10000.0;
  spec.rope.rotary_dim = Small::d_model / Small::heads;
  spec.rope.layout = torch_ref::RopeLayout::kHalfSplit;
  torch_ref::Mask causal{std::vector<uint8_t>(static_cast<size_t>(kB * kT * kT)), {kB, kT, kT}};
  for (int64_t b = 0; b < kB; ++b)
    for (int64_t i = 0; i < kT; ++i)
      for (int64_t j = 0; j <= i; ++j) causal.allowed[static_cast<size_t>((b * kT + i) * kT + j)] = 1;
  for (int l = 0; l < Small::layers; ++l) spec.layers.push_back({causal, std::nullopt, 0, 0});

  tr::AdamWOptions o;
  o.beta1 = 0.9;
  o.beta2 = 0.95;
  o.eps = 1e-8;
  o.weight_decay = 0.1;
  tr::AdamW<float> opt(o);
  const tr::WarmupCosine schedule(1e-2, 3, 20, 1e-3);
  std::vector<std::vector<double>> m(weights.size()), v(weights.size());
  for (size_t k = 0; k < weights.size(); ++k) {
    m[k].assign(weights[k].array.data.size(), 0.0);
    v[k].assign(weights[k].array.data.size(), 0.0);
  }

  double first_loss = 0, last_loss = 0;
  for (int step = 0; step < 20; ++step) {
    auto seq = ts::Tensor<int32_t>::empty({kB, kT + 1});
    for (int64_t i = 0; i < seq.numel(); ++i)
      seq.data()[i] = static_cast<unsigned char>(text[static_cast<size_t>(step * 1000 + (i / (kT + 1)) * 500 + i % (kT + 1))]);
    const auto batch = ts::models::next_token_batch(seq);
    Model::Saved saved;
    const double loss = model.forward(batch.tokens, batch.targets, saved).loss;
    model.zero_grad();
    model.backward(saved);
    const double lr = schedule(step);
    opt.step(model, lr);

    const torch_ref::DecoderResult ref = torch_ref::decoder(weights, ids_of(batch.tokens), ids_of(batch.targets), spec);
    BOOST_TEST(std::fabs(loss - ref.loss) <= 1e-4 * ref.loss,
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
  BOOST_TEST(last_loss < first_loss - 0.5, "the runs learned: " << first_loss << " -> " << last_loss);

  size_t compared = 0;
  double worst = 0;
  model.visit_parameters([&](std::string_view name, ts::nn::Parameter<float>& p) {
    for (const auto& w : weights) {
      if (w.name != name) continue;
      double scale = 0, err = 0;
      for (float x : w.array.data) scale = std::max(scale, std::fabs(double(x)));
      for (size_t i = 0; i < w.array.data.size(); ++i)
        err = std::max(err, std::fabs(double(p.value.data()[i]) - w.array.data[i]));
      worst = std::max(worst, err / scale);
      BOOST_TEST(err <= 1e-4 * scale, std::string(name) << ": error " << err << " of scale " << scale);
      ++compared;
    }
  });
  BOOST_TEST(compared == weights.size());
  BOOST_TEST_MESSAGE("20 AdamW steps: loss " << first_loss << " -> " << last_loss
                                             << "; worst final weight error " << worst << " of its tensor's scale");
}
