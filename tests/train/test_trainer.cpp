// tests/train/test_trainer.cpp — the trainer's step on a real decoder and real text:
//   * gradient accumulation: two micro-batches of 2 sequences (backward with loss_scale 1/2
//     each, accumulating) give the gradient of one batch of 4 (computed in one backward), and a
//     Trainer step with micro_batches = 2 lands where a step with the whole batch lands;
//   * BF16Mixed: the model's bf16 weights are always the rounding of the optimizer's fp32
//     masters, and training on English text lowers the loss;
//   * FP16Mixed: a step whose loss overflows is skipped (weights untouched, reported, the loss
//     scale halves), and the next good step proceeds.
#define BOOST_TEST_MODULE test_trainer
#include <boost/test/unit_test.hpp>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <iostream>
#include <string>
#include <vector>

#include "tessera/train/schedule.hpp"
#include "tessera/train/trainer.hpp"
#include "tiny_model.hpp"

namespace ts = tessera;
namespace tr = tessera::train;
namespace fs = std::filesystem;

namespace {

struct TinyDense {
  static constexpr int vocab = 256, d_model = 32, layers = 2, heads = 4, max_seq = 64;
};

bool have_text() {
  if (fs::is_regular_file(ts::test::kEnglishFortunes)) return true;
  std::cout << "TESSERA_SKIP: " << ts::test::kEnglishFortunes << " is missing (apt-get install fortunes)"
            << std::endl;
  return false;
}

fs::path shard(const std::string& tag) {
  const fs::path p = fs::temp_directory_path() / ("tessera_trainer_" + tag + "_" + std::to_string(::getpid()) + ".tok");
  const std::string text = ts::test::read_fortunes(ts::test::kEnglishFortunes).substr(0, 100000);
  std::vector<std::int32_t> ids;
  for (unsigned char c : text) ids.push_back(c);
  tr::TokenShardWriter w(p, 256);
  w.append(ids);
  w.finish();
  return p;
}

template <class Model>
std::vector<float> grads(Model& m) {
  std::vector<float> g;
  m.visit_parameters([&](std::string_view, auto& p) {
    for (int64_t i = 0; i < p.grad.numel(); ++i) g.push_back(ts::to_float(p.grad.data()[i]));
  });
  return g;
}
template <class Model>
std::vector<float> values(Model& m) {
  std::vector<float> v;
  m.visit_parameters([&](std::string_view, auto& p) {
    for (int64_t i = 0; i < p.value.numel(); ++i) v.push_back(ts::to_float(p.value.data()[i]));
  });
  return v;
}

double max_abs(const std::vector<float>& v) {
  double m = 0;
  for (float x : v) m = std::max(m, std::fabs(static_cast<double>(x)));
  return m;
}

}  // namespace

BOOST_AUTO_TEST_CASE(two_micro_batches_equal_one_batch) {
  if (!have_text()) return;
  const fs::path p = shard("accum");
  const tr::TokenDataset data({p});
  using Model = ts::Decoder<TinyDense>;

  // By hand: one backward on (4, T) vs two accumulating backwards on its halves at scale 1/2.
  auto seq4 = tr::BatchLoader(data, 48, 4, ts::Seed{9}).next();  // (4, 49)
  Model a{ts::Seed{2}}, b{ts::Seed{2}};
  Model::Saved s;
  const auto whole = ts::models::next_token_batch(seq4);
  a.zero_grad();
  a.forward(whole.tokens, whole.targets, s);
  a.backward(s);
  b.zero_grad();
  for (int h = 0; h < 2; ++h) {
    const auto half = ts::models::next_token_batch(seq4.slice(0, 2 * h, 2 * h + 2).contiguous());
    b.forward(half.tokens, half.targets, s);
    b.backward(s, 0.5);
  }
  const auto ga = grads(a), gb = grads(b);
  BOOST_TEST_REQUIRE(ga.size() == gb.size());
  const double scale = max_abs(ga);
  BOOST_TEST(scale > 0);
  double worst = 0;
  for (std::size_t i = 0; i < ga.size(); ++i) worst = std::max(worst, std::fabs(double(ga[i]) - gb[i]));
  BOOST_TEST(worst <= 1e-5 * scale, "worst gradient difference " << worst << " of scale " << scale);

  // Through the Trainer: micro_batches = 2 of 2 vs 1 of 4, same loader seed (same window order).
  Model c{ts::Seed{2}}, d{ts::Seed{2}};
  tr::SgdOptions so;
  so.momentum = 0;
  tr::Sgd<float> oc(so), od(so);
  tr::BatchLoader lc(data, 48, 2, ts::Seed{9}), ld(data, 48, 4, ts::Seed{9});
  tr::TrainerOptions two, one;
  two.micro_batches = 2;
  two.max_grad_norm = 0;
  one.max_grad_norm = 0;
  tr::Trainer<Model, tr::FP32, tr::Sgd<float>, tr::ConstantLr> tc(c, oc, lc, tr::ConstantLr{0.5}, two);
  tr::Trainer<Model, tr::FP32, tr::Sgd<float>, tr::ConstantLr> td(d, od, ld, tr::ConstantLr{0.5}, one);
  const auto before = values(c);
  const tr::StepReport rc = tc.step(), rd = td.step();
  BOOST_TEST(rc.tokens == rd.tokens);
  BOOST_TEST(std::fabs(rc.cross_entropy - rd.cross_entropy) < 1e-5);
  BOOST_TEST(std::fabs(rc.grad_norm - rd.grad_norm) < 1e-5 * rd.grad_norm);
  const auto vc = values(c), vd = values(d);
  double moved = 0, diff = 0;
  for (std::size_t i = 0; i < vc.size(); ++i) {
    moved = std::max(moved, std::fabs(double(vd[i]) - before[i]));
    diff = std::max(diff, std::fabs(double(vc[i]) - vd[i]));
  }
  BOOST_TEST(moved > 1e-3);
  BOOST_TEST(diff <= 1e-5 * moved, "difference " << diff << " of a move of " << moved);
  fs::remove(p);
}

BOOST_AUTO_TEST_CASE(bf16_mixed_keeps_masters_and_learns) {
  if (!have_text()) return;
  const fs::path p = shard("bf16");
  const tr::TokenDataset data({p});
  using Model = ts::Decoder<tr::WithRecipe<ts::test::TinyTrainR1, tr::BF16Mixed>>;
  static_assert(std::is_same_v<Model::value_type, ts::bf16>);
  Model m{ts::Seed{6}};
  tr::AdamW<ts::bf16> opt;
  const auto split = tr::split_windows(data.windows(32), 0.1);
  tr::BatchLoader train(data, 32, 8, ts::Seed{1}, split.train);
  tr::Trainer<Model, tr::BF16Mixed, tr::AdamW<ts::bf16>> t(m, opt, train, tr::WarmupCosine(1e-2, 5, 60, 1e-3));
  auto val = tr::BatchLoader::sequential(data, 32, 8, split.validation);
  const double before = t.evaluate(val, 4);
  double first = 0, last = 0;
  for (int k = 0; k < 60; ++k) {
    const tr::StepReport r = t.step();
    BOOST_TEST_REQUIRE(std::isfinite(r.loss));
    if (k == 0) first = r.cross_entropy;
    last = r.cross_entropy;
  }
  auto val2 = tr::BatchLoader::sequential(data, 32, 8, split.validation);
  const double after = t.evaluate(val2, 4);
  BOOST_TEST_MESSAGE("bf16-mixed: train CE " << first << " -> " << last << ", validation " << before << " -> " << after);
  BOOST_TEST(after < before - 1.0, "validation CE " << before << " -> " << after);
  // Every bf16 weight is the rounding of its master.
  std::vector<float> masters;
  opt.visit_state([&](std::string_view name, ts::Tensor<float>& x) {
    if (name.ends_with(".master")) masters.insert(masters.end(), x.data(), x.data() + x.numel());
  });
  std::vector<std::uint16_t> bits;
  m.visit_parameters([&](std::string_view, auto& q) {
    for (int64_t i = 0; i < q.value.numel(); ++i) bits.push_back(q.value.data()[i].bits);
  });
  BOOST_TEST_REQUIRE(masters.size() == bits.size());
  std::size_t bad = 0, off_grid = 0;
  for (std::size_t i = 0; i < bits.size(); ++i) {
    bad += ts::bf16(masters[i]).bits != bits[i];
    off_grid += ts::to_float(ts::bf16(masters[i])) != masters[i];  // masters hold more than bf16
  }
  BOOST_TEST(bad == 0u);
  BOOST_TEST(off_grid > bits.size() / 2, "the masters keep bits bf16 cannot");
  fs::remove(p);
}

BOOST_AUTO_TEST_CASE(fp16_mixed_skips_an_overflowing_step) {
  if (!have_text()) return;
  const fs::path p = shard("fp16");
  const tr::TokenDataset data({p});
  using Model = ts::Decoder<tr::WithRecipe<TinyDense, tr::FP16Mixed>>;
  Model m{ts::Seed{7}};
  tr::AdamW<ts::fp16> opt;
  tr::BatchLoader train(data, 32, 4, ts::Seed{1});
  tr::Trainer<Model, tr::FP16Mixed, tr::AdamW<ts::fp16>, tr::ConstantLr> t(m, opt, train, tr::ConstantLr{1e-3});
  const tr::StepReport ok = t.step();
  BOOST_TEST(!ok.skipped);
  BOOST_TEST(ok.loss_scale == 32768.0);
  // Blow the LM head up: logits overflow fp16 (inf), so the loss is not finite.
  auto& head = m.lm_head_weight();
  std::vector<ts::fp16> saved(head.value.data(), head.value.data() + head.value.numel());
  for (int64_t i = 0; i < head.value.numel(); ++i) head.value.data()[i] = ts::fp16(60000.0f);
  const auto before = values(m);
  const tr::StepReport bad = t.step();
  BOOST_TEST(bad.skipped);
  BOOST_TEST(t.loss_scale().scale == 16384.0);
  BOOST_TEST(t.loss_scale().skipped == 1);
  BOOST_TEST((values(m) == before), "a skipped step changes no weight");
  std::copy(saved.begin(), saved.end(), head.value.data());
  // Masters still hold the pre-blow-up head: one more step rewrites the model from them.
  const tr::StepReport again = t.step();
  BOOST_TEST(!again.skipped);
  BOOST_TEST(std::isfinite(again.loss));
  BOOST_TEST(again.loss_scale == 16384.0);
  fs::remove(p);
}
