// LibTorch cross-check of a whole small Decoder: the loss, the logits and the gradient of EVERY
// parameter, by name, against a LibTorch reimplementation of the forward from the same weights,
// with autograd for the backward.
//
// The model (float): vocab 61, d_model 48, 4 heads on 2 kv heads, 3 layers with per-layer windows
// (WindowAt): layer 0 a dense SwiGLU block under SlidingWindow<37>, layer 1 an MoE block under
// VariableWindow<Sizes<16, 48, kFull>, HeuristicSelector, 32>, layer 2 an MoE block under
// CausalFull; the MoE is GroupLimited<4, 2> (sigmoid scores, renormalised) over 8 experts, top 2,
// one shared expert, with the aux-loss balance (alpha 0.1) so the loss has an aux part; untied
// LM head. B 2, T 100 (not a multiple of any tile), one ignored target.
//
// How the weights get there: the model is saved with ts::save (safetensors) and the file is read
// back tensor by tensor; torch_ref::decoder finds each weight by its documented name
// (docs/models.md), so the naming scheme is checked along with the arithmetic, and it refuses a
// missing or a left-over tensor. The norm weights are drawn (1 + 0.2 N(0, 1)) before saving, so
// their gradients are not those of all-ones weights.
//
// What the reference shares with tessera: only the definition. Attention is torch_ref's explicit
// mask form (the mask from each layer's documented rule, the VariableWindow's sizes from the
// choice tessera recorded), the MoE torch_ref's per-expert loop (docs/testing.md); the choice of
// experts is compared first, and if it differs (a near-tie decided by rounding), nothing else is.
//
// Tolerances: the chain model of docs/testing.md, summed over the stack. Each link (a sum of K
// terms in another order) contributes about sqrt(K) eps_f of its terms' size; per layer two
// RMSNorms (sqrt(C) each), the attention's c_att = sqrt(C) + sqrt(hd) + sqrt(T) + sqrt(H hd) and
// the FFN's c_ffn (dense: sqrt(C) + sqrt(hidden); MoE: 2 sqrt(C) + sqrt(N) + sqrt(hidden) +
// sqrt(k + S)), then the final norm, the head (sqrt(C)) and the cross-entropy (sqrt(V)):
// c = sum of these (about 190 here). Forward (loss, logits): 2 c eps_f; gradients, the chain
// walked both ways: 4 c eps_f, relative to each tensor's largest element (atol) and to the
// element (rtol), as the layer checks do. That is ~5e-5: a wrong term anywhere (a missed
// residual, a mask off by one, a gradient into the wrong expert) is an O(1) error.
#define BOOST_TEST_MODULE torch_decoder
#include <boost/test/unit_test.hpp>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <set>
#include <string>
#include <type_traits>
#include <vector>

#include <unistd.h>  // getpid

#include "cross_check.hpp"
#include "tessera/io/safetensors.hpp"
#include "tessera/models/decoder.hpp"

using namespace tessera;
using namespace tessera::cross_check;
namespace nn = tessera::nn;

BOOST_TEST_GLOBAL_FIXTURE(TorchSetup);

namespace {

using Variable = nn::VariableWindow<nn::Sizes<16, 48, nn::kFull>, nn::HeuristicSelector, 32>;

struct SmallR1 {
  static constexpr int vocab = 61, d_model = 48, layers = 3, heads = 4, kv_heads = 2;
  static constexpr int max_seq = 128, dense_layers = 1, ffn_hidden = 40, attention_block = 16;
  template <int Layer>
  using WindowAt = std::conditional_t<
      Layer == 0, nn::SlidingWindow<37>, std::conditional_t<Layer == 1, Variable, nn::CausalFull>>;
  using Ffn = MoE<Experts<8>, TopK<2>, GroupLimited<4, 2>, AuxLossBalanceOf<0.1>, SharedExperts<1>>;
};
using Model = Decoder<SmallR1>;
using R = Model::Resolved;
constexpr int64_t kB = 2, kT = 100;

// Each policy's rule, stated here (as in test_torch_attention.cpp): may query i read key j?
template <class W>
bool sees(int64_t i, int64_t j, int64_t window) {
  if constexpr (std::is_same_v<W, nn::CausalFull>) {
    return j <= i;
  } else if constexpr (std::is_same_v<W, nn::SlidingWindow<37>>) {
    return i - 37 < j && j <= i;  // the 37 most recent keys, itself included
  } else {
    static_assert(std::is_same_v<W, Variable>);
    return j <= i && i - j < window;  // the causal band of the block's size (kFull: all)
  }
}

// The layer's (B, T, T) mask; for the variable window from the sizes tessera chose.
template <class Block>
torch_ref::Mask mask_of(const typename Block::Saved& saved) {
  using W = typename Block::window_policy;
  torch_ref::Mask m{std::vector<uint8_t>(static_cast<size_t>(kB * kT * kT)), {kB, kT, kT}};
  for (int64_t b = 0; b < kB; ++b)
    for (int64_t i = 0; i < kT; ++i) {
      int64_t window = 0;
      if constexpr (W::kAdaptive) {
        const auto& c = saved.attn.choice;
        BOOST_REQUIRE(c.block == W::kBlockSize && c.blocks == (kT + W::kBlockSize - 1) / W::kBlockSize);
        window = W::kSizes[size_t(c.index[size_t(b * c.blocks + i / W::kBlockSize)])];
      }
      for (int64_t j = 0; j < kT; ++j) m.allowed[size_t((b * kT + i) * kT + j)] = sees<W>(i, j, window);
    }
  return m;
}

IndexArray ids_of(const Tensor<int32_t>& t) {
  return IndexArray{std::vector<int64_t>(t.data(), t.data() + t.numel()), dims_of(t.shape())};
}

}  // namespace

BOOST_AUTO_TEST_CASE(decoder_loss_and_every_gradient) {
  Gen gen("decoder_loss_and_every_gradient");
  Model model{Seed{2026}};
  model.visit_parameters([&](std::string_view name, nn::Parameter<float>& p) {
    if (name.find("norm") != std::string_view::npos)
      for (int64_t i = 0; i < p.value.numel(); ++i)
        p.value.data()[i] = static_cast<float>(1.0 + 0.2 * gen.normal());
  });
  auto tokens = Tensor<int32_t>::empty({kB, kT}), targets = Tensor<int32_t>::empty({kB, kT});
  for (int64_t i = 0; i < tokens.numel(); ++i) {
    tokens.data()[i] = static_cast<int32_t>(gen.integer(0, R::vocab - 1));
    targets.data()[i] = static_cast<int32_t>(gen.integer(0, R::vocab - 1));
  }
  targets.data()[17] = models::kIgnoreIndex;

  Model::Saved saved;
  const models::ModelStats st = model.forward(tokens, targets, saved);
  model.zero_grad();
  model.backward(saved);

  // The weights, through the file.
  const std::filesystem::path path =
      std::filesystem::temp_directory_path() /
      ("tessera_torch_decoder_" + std::to_string(::getpid()) + ".safetensors");
  save(model, path);
  std::vector<torch_ref::NamedArray> weights;
  {
    io::SafetensorsFile file = io::SafetensorsFile::open(path);
    for (const std::string& name : file.names())
      weights.push_back({name, to_array(file.read<float>(name))});
  }
  std::filesystem::remove(path);

  torch_ref::DecoderSpec spec;
  spec.vocab = R::vocab;
  spec.d_model = R::d_model;
  spec.heads = R::heads;
  spec.kv_heads = R::kv_heads;
  spec.norm_eps = R::norm_eps;
  spec.rope.base = R::rope_theta;
  spec.rope.rotary_dim = R::head_dim;
  spec.rope.layout = torch_ref::RopeLayout::kHalfSplit;  // AttentionOptions' default
  int64_t moe_layers = 0;
  model.for_each_block([&](auto l, auto& block) {
    using Block = std::remove_cvref_t<decltype(block)>;
    torch_ref::DecoderLayerSpec ls;
    ls.mask = mask_of<Block>(std::get<decltype(l)::value>(saved.trunk.layers));
    if constexpr (Block::kMoE) {
      // GroupLimited<4, 2> over TopKSigmoid (docs/moe.md): sigmoid scores, weights renormalised
      // over the chosen k, groups of two experts scored by the sum of their two best.
      torch_ref::MoESpec m;
      m.score = torch_ref::RouterScore::kSigmoid;
      m.renormalize = true;
      m.top_k = 2;
      m.groups = 4;
      m.top_groups = 2;
      m.aux_alpha = 0.1;
      ls.moe = m;
      ls.experts = 8;
      ls.shared = 1;
      ++moe_layers;
    }
    spec.layers.push_back(std::move(ls));
  });
  BOOST_REQUIRE(spec.layers.size() == 3u && moe_layers == 2);
  const torch_ref::DecoderResult ref = torch_ref::decoder(weights, ids_of(tokens), ids_of(targets), spec);

  // The routing first: a different choice would make every later comparison meaningless.
  bool same_choice = true;
  std::set<std::string> idle_experts;  // "layers.<l>.ffn.experts.<e>." that no token chose
  model.for_each_block([&](auto l, auto& block) {
    using Block = std::remove_cvref_t<decltype(block)>;
    if constexpr (Block::kMoE) {
      const auto& chosen = std::get<decltype(l)::value>(saved.trunk.layers).ffn.route.chosen;
      std::vector<char> used(static_cast<size_t>(R::experts), 0);
      for (int64_t i = 0; i < chosen.numel(); ++i) used[static_cast<size_t>(chosen.data()[i])] = 1;
      for (int e = 0; e < R::experts; ++e)
        if (!used[static_cast<size_t>(e)])
          idle_experts.insert("layers." + std::to_string(int64_t(l)) + ".ffn.experts." +
                              std::to_string(e) + ".");
      const IndexArray& expected = ref.chosen[size_t(l)];
      int64_t differ = 0;
      for (int64_t i = 0; i < chosen.numel(); ++i) differ += chosen.data()[i] != expected.data[size_t(i)];
      BOOST_TEST(differ == 0, "layer " << l << ": " << differ << " of " << chosen.numel()
                                       << " expert choices differ from LibTorch's (seed "
                                       << run_seed() << ")");
      same_choice &= differ == 0;
    }
  });
  BOOST_REQUIRE(same_choice);

  // The chain constant of the header, from the model's sizes.
  auto sq = [](double v) { return std::sqrt(v); };
  const double C = R::d_model, hd = R::head_dim;
  const double c_att = sq(C) + sq(hd) + sq(kT) + sq(R::heads * hd);
  const double c_dense = sq(C) + sq(R::ffn_hidden);
  const double c_moe = 2 * sq(C) + sq(R::experts) + sq(R::moe_hidden) + sq(R::top_k + R::shared_experts);
  const double c = R::dense_layers * (2 * sq(C) + c_att + c_dense) +
                   (R::layers - R::dense_layers) * (2 * sq(C) + c_att + c_moe) + 2 * sq(C) +
                   sq(R::vocab);
  const Tolerance fwd{2 * c * kFloatEps, 2 * c * kFloatEps};
  const Tolerance grad{4 * c * kFloatEps, 4 * c * kFloatEps};
  BOOST_TEST_MESSAGE("chain constant c = " << c << "; forward tolerance " << fwd.rtol
                                           << ", gradient tolerance " << grad.rtol);

  BOOST_TEST(std::fabs(st.loss - ref.loss) <= fwd.rtol * std::fabs(ref.loss),
             "loss: tessera " << st.loss << ", LibTorch " << ref.loss << " (seed " << run_seed() << ")");
  BOOST_TEST(std::fabs(st.cross_entropy - ref.cross_entropy) <= fwd.rtol * ref.cross_entropy);
  BOOST_TEST(ref.aux_loss > 0.0);
  BOOST_TEST(std::fabs(st.aux_loss - ref.aux_loss) <= fwd.rtol * ref.aux_loss,
             "aux loss: tessera " << st.aux_loss << ", LibTorch " << ref.aux_loss);
  check_close("logits", saved.logits, ref.logits, fwd);

  // Every parameter's gradient, by name; the file holds exactly the parameters (no buffers:
  // the aux-loss balance keeps no bias).
  size_t compared = 0;
  model.visit_parameters([&](std::string_view name, nn::Parameter<float>& p) {
    // An expert no token chose (the seed decides) has a zero gradient on both sides, and
    // tessera's must be exactly zero: check_close's allowance is then 0.
    bool idle = false;
    for (const std::string& prefix : idle_experts) idle |= name.rfind(prefix, 0) == 0;
    for (const torch_ref::NamedArray& g : ref.grads)
      if (g.name == name) {
        check_close("d loss / d " + g.name, p.grad, g.array, grad, /*allow_zero=*/idle);
        ++compared;
        return;
      }
    BOOST_ERROR("LibTorch returned no gradient for '" << name << "'");
  });
  BOOST_TEST(compared == ref.grads.size());
  BOOST_TEST(compared == weights.size());
  BOOST_TEST_MESSAGE(compared << " parameter tensors compared; attention work "
                              << st.attention_work_fraction);
}
