// tests/train/test_recompute.cpp — the activation recompute policies (nn/transformer_block.hpp)
// change what a training step holds, never what it computes; and the tensor-byte counter
// (core/memory.hpp) that measures the difference.
//
//   * bit_identical_*: one forward + backward of a decoder with a dense block and an MoE block
//     (top-2 of 4 experts, a shared expert, the aux-loss balance so the router's backward has
//     two sources) under VariableWindow<..., LearnedSelector> (its gate reads the norm output
//     that Selective drops), in float and bf16. The loss, the aux loss and every parameter
//     gradient must be equal BIT FOR BIT under StoreAll, Selective and RecomputeBlock: a
//     rebuild runs the same ops on the same inputs, so any difference is a bug (a stale or
//     wrongly gathered row, a tensor read after it was freed), not rounding. A second backward
//     on the same saved state must again match StoreAll's (backward leaves the state as forward
//     left it).
//   * counter_is_exact: known allocations move live_bytes() by exactly their size.
//   * peak_memory_orders_the_policies: a 4-layer decoder's forward + backward peaks lowest under
//     RecomputeBlock, then Selective, then StoreAll; and the expected savings are large enough
//     that the order says something (see the test).
#define BOOST_TEST_MODULE test_recompute
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

#include "tessera/core/memory.hpp"
#include "tessera/core/rng.hpp"
#include "tessera/models/decoder.hpp"

namespace ts = tessera;

namespace {

constexpr uint64_t kSeed = 20261129;

template <class Scalar_>
struct Mixed {
  static constexpr int vocab = 64, d_model = 32, layers = 2, heads = 4, kv_heads = 2;
  static constexpr int max_seq = 64, dense_layers = 1, ffn_hidden = 48;
  using Scalar = Scalar_;
  using Window = ts::VariableWindow<ts::Sizes<8, 16, ts::kFull>, ts::LearnedSelector, 8>;
  using Ffn = ts::MoE<ts::Experts<4>, ts::TopK<2>, ts::GroupLimited<2, 1>,
                      ts::AuxLossBalanceOf<0.05>, ts::SharedExperts<1>>;
};
template <class Base, class Policy>
struct With : Base {
  using Recompute = Policy;
};

struct Grads {
  ts::models::ModelStats stats;
  std::vector<std::string> names;
  std::vector<std::vector<unsigned char>> bytes;  // each gradient's raw bytes
  double norm = 0;
};

template <class Config>
Grads run(const ts::Tensor<int32_t>& tokens, const ts::Tensor<int32_t>& targets, int backwards) {
  ts::Decoder<Config> model{ts::Seed{kSeed}};
  typename ts::Decoder<Config>::Saved saved;
  Grads g;
  g.stats = model.forward(tokens, targets, saved);
  model.zero_grad();
  for (int i = 0; i < backwards; ++i) model.backward(saved);
  model.visit_parameters([&](std::string_view name, auto& p) {
    const auto* b = reinterpret_cast<const unsigned char*>(p.grad.data());
    g.names.emplace_back(name);
    g.bytes.emplace_back(b, b + p.grad.size_bytes());
    for (int64_t i = 0; i < p.grad.numel(); ++i) {
      const double v = ts::to_float(p.grad.data()[i]);
      g.norm += v * v;
    }
  });
  return g;
}

ts::Tensor<int32_t> random_ids(int64_t b, int64_t t, int64_t vocab, uint64_t stream) {
  ts::Philox rng(ts::Seed{kSeed}, stream);
  auto ids = ts::Tensor<int32_t>::empty({b, t});
  for (int64_t i = 0; i < ids.numel(); ++i) ids.data()[i] = static_cast<int32_t>(rng.next_u32() % vocab);
  return ids;
}

template <class Scalar>
void check_bit_identical() {
  std::cout << "seed " << kSeed << std::endl;
  using Base = Mixed<Scalar>;
  // T = 40: five query blocks of 8, so the selector has choices and the last block is whole.
  const auto tokens = random_ids(2, 40, Base::vocab, 1), targets = random_ids(2, 40, Base::vocab, 2);
  for (int backwards : {1, 2}) {
    const Grads all = run<With<Base, ts::StoreAll>>(tokens, targets, backwards);
    const Grads sel = run<With<Base, ts::Selective>>(tokens, targets, backwards);
    const Grads blk = run<With<Base, ts::RecomputeBlock>>(tokens, targets, backwards);
    const Grads def = run<Base>(tokens, targets, backwards);  // no Recompute: StoreAll
    BOOST_TEST(all.norm > 0.0);
    BOOST_TEST(all.stats.aux_loss > 0.0);  // the balance loss is on, so the router has 2 sources
    BOOST_TEST(all.names.size() > 20u);
    for (const Grads* other : {&sel, &blk, &def}) {
      BOOST_TEST(std::memcmp(&other->stats.loss, &all.stats.loss, sizeof(double)) == 0,
                 "loss " << other->stats.loss << " vs " << all.stats.loss);
      BOOST_TEST(std::memcmp(&other->stats.aux_loss, &all.stats.aux_loss, sizeof(double)) == 0);
      BOOST_TEST(other->stats.attention_work_fraction == all.stats.attention_work_fraction);
      BOOST_TEST_REQUIRE(other->names == all.names);
      for (size_t i = 0; i < all.names.size(); ++i)
        BOOST_TEST(other->bytes[i] == all.bytes[i],
                   all.names[i] << ": gradient differs (backwards " << backwards << ")");
    }
  }
}

template <class Policy>
struct Deep : Mixed<float> {
  static constexpr int layers = 4, vocab = 32;
  using Recompute = Policy;
};

template <class Config>
int64_t step_peak(const ts::Tensor<int32_t>& tokens, const ts::Tensor<int32_t>& targets,
                  int64_t* after_forward) {
  ts::Decoder<Config> model{ts::Seed{kSeed}};
  model.zero_grad();
  const int64_t base = ts::memory::live_bytes();
  ts::memory::reset_peak();
  typename ts::Decoder<Config>::Saved saved;
  model.forward(tokens, targets, saved);
  *after_forward = ts::memory::live_bytes() - base;
  model.backward(saved);
  return ts::memory::peak_bytes() - base;
}

}  // namespace

BOOST_AUTO_TEST_CASE(bit_identical_float) { check_bit_identical<float>(); }
BOOST_AUTO_TEST_CASE(bit_identical_bf16) { check_bit_identical<ts::bf16>(); }

// Key padding (the encoder's path): RecomputeBlock must replay the forward with the same key
// lengths, and Selective's rebuild must not disturb them. One bidirectional block (VariableWindow
// refuses padding), float, a padded batch.
BOOST_AUTO_TEST_CASE(bit_identical_with_key_padding) {
  using Block = ts::nn::TransformerBlock<float, ts::nn::Bidirectional, ts::DenseFfn>;
  const int64_t B = 2, T = 40, C = Mixed<float>::d_model;
  const std::vector<int64_t> lengths{40, 29};
  auto x = ts::Tensor<float>::empty({B, T, C}), dy = ts::Tensor<float>::empty({B, T, C});
  ts::fill_normal<float>(x.data(), x.numel(), ts::Seed{kSeed}, 5, 0.0f, 1.0f);
  ts::fill_normal<float>(dy.data(), dy.numel(), ts::Seed{kSeed}, 6, 0.0f, 1.0f);
  auto run_block = [&]<class Policy>(Policy) {
    Block block(C, Mixed<float>::heads, Mixed<float>::kv_heads, 48, ts::Seed{kSeed}, 1);
    typename Block::Saved saved;
    const ts::Tensor<float> y = block.forward(x, saved, lengths);
    block.template release<Policy>(saved);
    block.template rebuild<Policy>(saved);
    const ts::Tensor<float> dx = block.backward(dy, saved);
    std::vector<float> out(y.data(), y.data() + y.numel());
    out.insert(out.end(), dx.data(), dx.data() + dx.numel());
    block.visit_parameters([&](std::string_view, auto& p) {
      out.insert(out.end(), p.grad.data(), p.grad.data() + p.grad.numel());
    });
    return out;
  };
  const std::vector<float> all = run_block(ts::StoreAll{});
  BOOST_TEST(std::memcmp(run_block(ts::Selective{}).data(), all.data(), all.size() * 4) == 0);
  BOOST_TEST(std::memcmp(run_block(ts::RecomputeBlock{}).data(), all.data(), all.size() * 4) == 0);
  // The padding mattered: without it the output differs.
  Block block(C, Mixed<float>::heads, Mixed<float>::kv_heads, 48, ts::Seed{kSeed}, 1);
  typename Block::Saved saved;
  const ts::Tensor<float> y = block.forward(x, saved);
  BOOST_TEST(std::memcmp(y.data(), all.data(), y.size_bytes()) != 0);
}

BOOST_AUTO_TEST_CASE(counter_is_exact) {
  const int64_t base = ts::memory::live_bytes();
  ts::memory::reset_peak();
  BOOST_TEST(ts::memory::peak_bytes() == base);
  {
    auto a = ts::Tensor<float>::empty({3, 5});  // 60 bytes
    BOOST_TEST(ts::memory::live_bytes() - base == 60);
    auto b = ts::Tensor<ts::bf16>::zeros({7});  // 14 bytes
    BOOST_TEST(ts::memory::live_bytes() - base == 74);
    auto c = std::move(a);  // a move holds the same buffer
    BOOST_TEST(ts::memory::live_bytes() - base == 74);
    {
      const auto d = c.clone();  // 60 more, then freed
      BOOST_TEST(ts::memory::live_bytes() - base == 134);
    }
    BOOST_TEST(ts::memory::live_bytes() - base == 74);
    b = ts::Tensor<ts::bf16>();  // assigning an empty tensor frees the old one
    BOOST_TEST(ts::memory::live_bytes() - base == 60);
    auto e = ts::Tensor<double>::empty({0});  // no elements: no storage
    BOOST_TEST(ts::memory::live_bytes() - base == 60);
  }
  BOOST_TEST(ts::memory::live_bytes() == base);
  BOOST_TEST(ts::memory::peak_bytes() - base == 134);
  ts::memory::reset_peak();
  BOOST_TEST(ts::memory::peak_bytes() == base);
}

BOOST_AUTO_TEST_CASE(peak_memory_orders_the_policies) {
  // B*T = 128 rows: the activations (per block roughly 9 (rows, C) and, per expert share,
  // 3 (rows, hidden) tensors) outweigh the (rows, vocab) logits and their gradient.
  const auto tokens = random_ids(2, 64, 32, 3), targets = random_ids(2, 64, 32, 4);
  int64_t kept_all = 0, kept_sel = 0, kept_blk = 0;
  const int64_t all = step_peak<Deep<ts::StoreAll>>(tokens, targets, &kept_all);
  const int64_t sel = step_peak<Deep<ts::Selective>>(tokens, targets, &kept_sel);
  const int64_t blk = step_peak<Deep<ts::RecomputeBlock>>(tokens, targets, &kept_blk);
  BOOST_TEST_MESSAGE("peak bytes of forward + backward: StoreAll " << all << ", Selective " << sel
                     << ", RecomputeBlock " << blk << "; held after forward: " << kept_all
                     << ", " << kept_sel << ", " << kept_blk);
  BOOST_TEST(blk < sel);
  BOOST_TEST(sel < all);
  BOOST_TEST(kept_blk < kept_sel);
  BOOST_TEST(kept_sel < kept_all);
  // What Selective frees per block is known exactly: the attention's input (rows, C), the
  // dense FFN's input (rows, C) and act (rows, hidden) — or for an MoE block the router's,
  // the shared expert's and the gathered experts' inputs (rows + rows + k rows, C: no capacity
  // limit, so every assignment runs) and their acts ((rows + k rows) (hidden)).
  using R = ts::Decoder<Deep<ts::StoreAll>>::Resolved;
  const int64_t rows = 2 * 64, C = R::d_model, k = R::top_k;
  const int64_t dense = rows * C + rows * C + rows * R::ffn_hidden;
  const int64_t moe = rows * C + (rows + rows + k * rows) * C + (rows + k * rows) * R::moe_hidden;
  const int64_t freed = (R::dense_layers * dense + (R::layers - R::dense_layers) * moe) * 4;
  BOOST_TEST(kept_all - kept_sel == freed);
}
