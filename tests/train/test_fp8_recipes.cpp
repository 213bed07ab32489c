// tests/train/test_fp8_recipes.cpp — the FP8 recipes' products (quant/fp8_training.hpp) against
// references written here from the FP8 conversions of core/number.hpp alone (own tiling, own
// scales, products summed in double), and the recipes in training:
//   * FP8Tile forward, dgrad and wgrad on ragged shapes (K = 300: slices of 128, 128, 44;
//     out = 200: weight blocks of 128 and 72 rows; 130 rows: token tiles of 128 and 2);
//   * FP8Delayed forward with a known amax history (saturating an operand above it), dgrad and
//     wgrad with E5M2 dy, the first step's just-in-time scales, and a history that moves only in
//     end_step() (and not while recording is off);
//   * a tiny R1 decoder (variable window, MoE with a shared expert) trained 30 steps with FP32,
//     FP8Tile and FP8Delayed on English text: the FP8 losses fall and stay near FP32's; exactly
//     the attention projections and the FFN / expert matrices are quantised (not the embedding,
//     LM head, router, selector or norms); the Delayed histories survive state() / restore();
//   * a forward run twice under each recipe gives bit-identical results (recompute-safe).
//   * the products' float-domain FP8 rounding and tiling give the codes and scales of
//     core/number.hpp and quant/fp8_scaling.hpp bit for bit;
// Tolerances: the library sums fp32 partial products per 128-slice and scales them in fp32, the
// references sum dequantised values in double, so each element may differ by a few fp32
// roundings of the sum of |terms| (seen: 2.4e-7 of it; allowed: 4e-6); one FP8 code one step
// off moves an element by about 1/16 of one term, ~2e-4 of the sum of 300 similar terms.
#define BOOST_TEST_MODULE test_fp8_recipes
#include <boost/test/unit_test.hpp>

#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <limits>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "tessera/quant/fp8_training.hpp"
#include "tessera/train/schedule.hpp"
#include "tessera/train/trainer.hpp"
#include "tiny_model.hpp"

namespace ts = tessera;
namespace tr = tessera::train;
namespace fs = std::filesystem;

namespace {

constexpr unsigned kSeed = 20261129;
constexpr int64_t kRows = 130, kIn = 300, kOut = 200;

// Normal values with a few outliers, so that tiles and blocks get different scales.
std::vector<float> fill(int64_t n, unsigned seed, float stddev) {
  std::mt19937 g(seed);
  std::normal_distribution<float> d(0.0f, stddev);
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& x : v) x = d(g);
  for (int64_t i = 0; i < n; i += 97) v[size_t(i)] *= 40.0f;
  return v;
}

// ---- the reference quantisers: dequantised values, in double -----------------------------
template <ts::Fp8Type Fp8>
double dq(float v, float mult, float deq) {
  return static_cast<double>(static_cast<float>(Fp8::from_float(v * mult, ts::Fp8Saturation::kSatFinite))) *
         static_cast<double>(deq);
}

// m (rows, cols) in tiles of (tr_, tc): each tile's amax a gives q = fp8(v · (max / a)) and
// v ≈ q · (a / max), DeepSeek-V3's pair.
template <ts::Fp8Type Fp8>
std::vector<double> ref_tiled(const std::vector<float>& m, int64_t rows, int64_t cols, int64_t tr_,
                              int64_t tc) {
  const float kMax = ts::number_traits<Fp8>::max_finite;
  std::vector<double> out(m.size());
  for (int64_t r0 = 0; r0 < rows; r0 += tr_)
    for (int64_t c0 = 0; c0 < cols; c0 += tc) {
      float a = 0;
      for (int64_t r = r0; r < std::min(rows, r0 + tr_); ++r)
        for (int64_t c = c0; c < std::min(cols, c0 + tc); ++c) a = std::max(a, std::fabs(m[size_t(r * cols + c)]));
      if (a == 0) a = kMax;
      for (int64_t r = r0; r < std::min(rows, r0 + tr_); ++r)
        for (int64_t c = c0; c < std::min(cols, c0 + tc); ++c)
          out[size_t(r * cols + c)] = dq<Fp8>(m[size_t(r * cols + c)], kMax / a, a / kMax);
    }
  return out;
}

// One TE scale for the whole tensor: q = fp8(v · scale), v ≈ q · (1 / scale).
template <ts::Fp8Type Fp8>
std::vector<double> ref_per_tensor(const std::vector<float>& m, float scale) {
  std::vector<double> out(m.size());
  for (size_t i = 0; i < m.size(); ++i) out[i] = dq<Fp8>(m[i], scale, 1.0f / scale);
  return out;
}

// c[i][j] = sum_k a(i, k) b(j, k), with a(i, k) = a[i * sai + k * sak] (likewise b); also the
// sum of |terms| per element, the scale of its rounding error.
struct Product {
  std::vector<double> c, abs;
};
Product ref_product(const std::vector<double>& a, int64_t sai, int64_t sak, const std::vector<double>& b,
                    int64_t sbj, int64_t sbk, int64_t I, int64_t J, int64_t K) {
  Product p{std::vector<double>(size_t(I * J)), std::vector<double>(size_t(I * J))};
  for (int64_t i = 0; i < I; ++i)
    for (int64_t j = 0; j < J; ++j) {
      double s = 0, t = 0;
      for (int64_t k = 0; k < K; ++k) {
        const double x = a[size_t(i * sai + k * sak)] * b[size_t(j * sbj + k * sbk)];
        s += x;
        t += std::fabs(x);
      }
      p.c[size_t(i * J + j)] = s;
      p.abs[size_t(i * J + j)] = t;
    }
  return p;
}

// Every element within 4e-6 of its sum of |terms| (seen: 2.4e-7); and the result is not all zeros.
void check_close(const char* what, const float* got, const Product& want) {
  double worst = 0, norm = 0;
  size_t bad = 0;
  for (size_t i = 0; i < want.c.size(); ++i) {
    const double err = std::fabs(double(got[i]) - want.c[i]);
    norm = std::max(norm, std::fabs(want.c[i]));
    worst = std::max(worst, err / (want.abs[i] + 1e-30));
    if (err > 4e-6 * want.abs[i] + 1e-30) ++bad;
  }
  BOOST_TEST(norm > 0, what << ": the reference is all zeros");
  BOOST_TEST(bad == 0u, what << ": " << bad << " of " << want.c.size()
                             << " elements off; worst error / sum|terms| = " << worst);
  std::cout << what << ": worst error / sum|terms| = " << worst << "\n";
}

// The largest |a - b| over |b|'s max: how far the FP8 product is from the fp32 one.
double relative_distance(const float* a, const float* b, size_t n) {
  double d = 0, m = 0;
  for (size_t i = 0; i < n; ++i) {
    d = std::max(d, std::fabs(double(a[i]) - b[i]));
    m = std::max(m, std::fabs(double(b[i])));
  }
  return d / m;
}

struct Operands {
  std::vector<float> x = fill(kRows * kIn, kSeed, 1.0f);          // (rows, in)
  std::vector<float> w = fill(kOut * kIn, kSeed + 1, 0.05f);      // (out, in)
  std::vector<float> dy = fill(kRows * kOut, kSeed + 2, 1e-3f);   // (rows, out)
  ts::Tensor<float> xt() const { return ts::Tensor<float>::from({kRows, kIn}, x); }
  ts::Tensor<float> wt() const { return ts::Tensor<float>::from({kOut, kIn}, w); }
  ts::Tensor<float> dyt() const { return ts::Tensor<float>::from({kRows, kOut}, dy); }
};

bool have_text() {
  if (fs::is_regular_file(ts::test::kEnglishFortunes)) return true;
  std::cout << "TESSERA_SKIP: " << ts::test::kEnglishFortunes << " is missing (apt-get install fortunes)"
            << std::endl;
  return false;
}

}  // namespace

// The products round with fp8_round (float arithmetic) instead of core/number.hpp's encoder:
// the two must agree bit for bit (sign of zero included) on every code, every midpoint between
// neighbouring codes and one float step either side of both, around saturation, and on 4M
// random float bit patterns (all exponents).
template <ts::Fp8Type Fp8>
void check_rounding() {
  auto want = [](float v) { return static_cast<float>(Fp8::from_float(v, ts::Fp8Saturation::kSatFinite)); };
  std::vector<float> codes;
  for (int c = 0; c < 256; ++c) {
    const float v = static_cast<float>(Fp8::from_bits(static_cast<std::uint8_t>(c)));
    if (std::isfinite(v)) codes.push_back(v);
  }
  std::sort(codes.begin(), codes.end());
  std::vector<float> probes;
  const float inf = std::numeric_limits<float>::infinity();
  for (size_t i = 0; i < codes.size(); ++i) {
    for (float v : {codes[i], std::nextafter(codes[i], inf), std::nextafter(codes[i], -inf)}) probes.push_back(v);
    if (i + 1 < codes.size()) {
      const float mid = (codes[i] + codes[i + 1]) / 2;  // exact: FP8 values have few bits
      for (float v : {mid, std::nextafter(mid, inf), std::nextafter(mid, -inf)}) probes.push_back(v);
    }
  }
  const float m = ts::number_traits<Fp8>::max_finite;
  for (float v : {m * 1.0625f, m * 1.0625f + 1, m * 1.125f, m * 1.2f, 1e30f, std::numeric_limits<float>::max(),
                  std::numeric_limits<float>::denorm_min(), 0.0f})
    for (float sgn : {1.0f, -1.0f}) probes.push_back(sgn * v);
  std::mt19937 g(kSeed);
  for (int i = 0; i < (1 << 22); ++i) {
    const float v = std::bit_cast<float>(static_cast<std::uint32_t>(g()));
    if (std::isfinite(v)) probes.push_back(v);
  }
  size_t bad = 0;
  for (float v : probes)
    if (std::bit_cast<std::uint32_t>(ts::fp8_round<Fp8>(v)) != std::bit_cast<std::uint32_t>(want(v)) && bad++ < 5)
      std::cout << ts::number_traits<Fp8>::name << " " << v << ": " << ts::fp8_round<Fp8>(v) << " vs " << want(v) << "\n";
  BOOST_TEST(bad == 0u, ts::number_traits<Fp8>::name << ": " << bad << " of " << probes.size() << " differ");
}

template <class Fp8, class Q>
void check_same_as_library(const ts::Fp8Matrix& m, const std::vector<float>& want_scales, Q&& quantise) {
  std::vector<Fp8> q(m.codes.size());
  quantise(q.data());
  size_t bad = 0;
  for (size_t i = 0; i < q.size(); ++i)
    bad += std::bit_cast<std::uint32_t>(static_cast<float>(q[i])) != std::bit_cast<std::uint32_t>(m.codes[i]);
  BOOST_TEST(bad == 0u);
  BOOST_TEST(m.scales == want_scales);
}

BOOST_AUTO_TEST_CASE(codes_and_scales_are_those_of_the_library) {
  check_rounding<ts::fp8_e4m3>();
  check_rounding<ts::fp8_e5m2>();
  const Operands o;
  {
    std::vector<float> s(size_t(ts::tile_scale_count_1x128(kRows, kIn)));
    const ts::Fp8Matrix m = ts::fp8_tiles_1x128<ts::fp8_e4m3>(o.x.data(), kRows, kIn);
    check_same_as_library<ts::fp8_e4m3>(m, s, [&](ts::fp8_e4m3* q) {
      ts::quantize_tiles_1x128<ts::fp8_e4m3>(o.x.data(), kRows, kIn, q, s.data());
    });
  }
  {
    std::vector<float> s(size_t(ts::block_scale_count_128x128(kOut, kIn)));
    const ts::Fp8Matrix m = ts::fp8_blocks_128x128<ts::fp8_e4m3>(o.w.data(), kOut, kIn);
    check_same_as_library<ts::fp8_e4m3>(m, s, [&](ts::fp8_e4m3* q) {
      ts::quantize_blocks_128x128<ts::fp8_e4m3>(o.w.data(), kOut, kIn, q, s.data());
    });
  }
  {
    const float scale = 57344.0f / (3 * ts::amax(o.dy));
    const ts::Fp8Matrix m = ts::fp8_per_tensor<ts::fp8_e5m2>(o.dy.data(), kRows, kOut, scale);
    check_same_as_library<ts::fp8_e5m2>(m, {1.0f / scale}, [&](ts::fp8_e5m2* q) {
      ts::quantize_per_tensor<ts::fp8_e5m2>(o.dy.data(), kRows * kOut, scale, q);
    });
  }
}

BOOST_AUTO_TEST_CASE(tile_forward_and_backward_match_the_reference) {
  std::cout << "seed " << kSeed << "\n";
  const Operands o;
  const ts::Tensor<float> x = o.xt(), w = o.wt(), dy = o.dyt();
  ts::Fp8TileProducts products;
  ts::Fp8Scope scope(products);
  const ts::Tensor<float> y = ts::recipe_linear<float>(x, w);                 // (rows, out)
  const ts::ops::LinearGrads<float> g = ts::recipe_linear_backward<float>(dy, x, w);

  // Forward: x in 1x128 tiles along K, w in 128x128 blocks.
  const auto xq = ref_tiled<ts::fp8_e4m3>(o.x, kRows, kIn, 1, 128);
  const auto wq = ref_tiled<ts::fp8_e4m3>(o.w, kOut, kIn, 128, 128);
  check_close("tile forward", y.data(), ref_product(xq, kIn, 1, wq, kIn, 1, kRows, kOut, kIn));
  // dgrad: dy in 1x128 tiles along out (the reduction), w's forward blocks.
  const auto dyq_out = ref_tiled<ts::fp8_e4m3>(o.dy, kRows, kOut, 1, 128);
  check_close("tile dgrad", g.dx.data(), ref_product(dyq_out, kOut, 1, wq, 1, kIn, kRows, kIn, kOut));
  // wgrad: dy and x in 128x1 tiles along the rows (the reduction).
  const auto dyq_tok = ref_tiled<ts::fp8_e4m3>(o.dy, kRows, kOut, 128, 1);
  const auto xq_tok = ref_tiled<ts::fp8_e4m3>(o.x, kRows, kIn, 128, 1);
  check_close("tile wgrad", g.dweight.data(), ref_product(dyq_tok, 1, kOut, xq_tok, 1, kIn, kOut, kIn, kRows));

  // A non-finite operand is refused, naming the tile (an overflowed step), under both recipes.
  std::vector<float> bad = o.x;
  bad[size_t(2 * kIn + 200)] = std::numeric_limits<float>::quiet_NaN();
  const ts::Tensor<float> xbad = ts::Tensor<float>::from({kRows, kIn}, bad);
  BOOST_CHECK_THROW(ts::recipe_linear<float>(xbad, w), ts::Error);
  {
    ts::Fp8DelayedProducts delayed;
    ts::Fp8Scope inner(delayed);
    BOOST_CHECK_THROW(ts::recipe_linear<float>(xbad, w), ts::Error);
  }

  // It did quantise: about E4M3's 2^-4 relative step away from the fp32 product.
  const ts::Tensor<float> y32 = ts::ops::linear<float>(x, w);
  const double d = relative_distance(y.data(), y32.data(), size_t(y.numel()));
  BOOST_TEST((d > 1e-3 && d < 0.1), "FP8Tile vs fp32 forward: " << d);
}

BOOST_AUTO_TEST_CASE(delayed_scales_come_from_the_history_and_roll_at_end_of_step) {
  const Operands o;
  const ts::Tensor<float> x = o.xt(), w = o.wt(), dy = o.dyt();
  ts::Fp8DelayedProducts products({.history = 4, .margin = 0});
  const void* key = w.data();
  using Op = ts::Fp8Operand;
  const float ax = ts::amax(o.x), aw = ts::amax(o.w), ady = ts::amax(o.dy);

  // First step: no history, each operand scaled by its own amax.
  {
    ts::Fp8Scope scope(products);
    const ts::Tensor<float> y = ts::recipe_linear<float>(x, w);
    const auto xq = ref_per_tensor<ts::fp8_e4m3>(o.x, 448.0f / ax);
    const auto wq = ref_per_tensor<ts::fp8_e4m3>(o.w, 448.0f / aw);
    check_close("delayed first-step forward", y.data(), ref_product(xq, kIn, 1, wq, kIn, 1, kRows, kOut, kIn));
    const ts::Tensor<float> again = ts::recipe_linear<float>(x, w);
    BOOST_TEST(std::memcmp(y.data(), again.data(), sizeof(float) * size_t(y.numel())) == 0);
    const ts::ops::LinearGrads<float> g = ts::recipe_linear_backward<float>(dy, x, w);
    const auto dyq = ref_per_tensor<ts::fp8_e5m2>(o.dy, 57344.0f / ady);
    check_close("delayed first-step dgrad", g.dx.data(), ref_product(dyq, kOut, 1, wq, 1, kIn, kRows, kIn, kOut));
    check_close("delayed first-step wgrad", g.dweight.data(), ref_product(dyq, 1, kOut, xq, 1, kIn, kOut, kIn, kRows));
  }
  // Recorded, not yet rolled: the history is empty until end_step.
  const auto& site = products.sites().at(key);
  for (int i = 0; i < ts::kFp8Operands; ++i) BOOST_TEST(site.history[size_t(i)].empty());
  BOOST_TEST(site.pending[0] == ax);
  BOOST_TEST(site.pending[1] == aw);
  BOOST_TEST(site.pending[2] == ady);
  products.end_step();
  BOOST_TEST(site.history[0] == std::vector<float>{ax});
  BOOST_TEST(site.history[2] == std::vector<float>{ady});

  // A known history: x's is below x's amax (x saturates), dy's above dy's amax.
  products.set_history(key, Op::kInput, {1.0f, 3.5f, 2.0f});
  products.set_history(key, Op::kWeight, {0.1f, aw});
  // dy's: 3x its amax (not a power of two, which would give the same dequantised values).
  products.set_history(key, Op::kGradOutput, {0.02f, 3 * ady});
  const float sx = 448.0f / 3.5f, sw = 448.0f / aw, sdy = 57344.0f / (3 * ady);
  BOOST_TEST(products.scale<ts::fp8_e4m3>(key, Op::kInput, 123.0f) == sx);
  BOOST_TEST(ax > 3.5f);
  {
    ts::Fp8Scope scope(products);
    const ts::Tensor<float> y = ts::recipe_linear<float>(x, w);
    const ts::ops::LinearGrads<float> g = ts::recipe_linear_backward<float>(dy, x, w);
    const auto xq = ref_per_tensor<ts::fp8_e4m3>(o.x, sx);
    const auto wq = ref_per_tensor<ts::fp8_e4m3>(o.w, sw);
    const auto dyq = ref_per_tensor<ts::fp8_e5m2>(o.dy, sdy);
    check_close("delayed forward", y.data(), ref_product(xq, kIn, 1, wq, kIn, 1, kRows, kOut, kIn));
    check_close("delayed dgrad", g.dx.data(), ref_product(dyq, kOut, 1, wq, 1, kIn, kRows, kIn, kOut));
    check_close("delayed wgrad", g.dweight.data(), ref_product(dyq, 1, kOut, xq, 1, kIn, kOut, kIn, kRows));
    // Still inside the step: the scale has not moved, although x's amax (above) was recorded.
    BOOST_TEST(products.scale<ts::fp8_e4m3>(key, Op::kInput, 0.0f) == sx);
  }
  products.end_step();
  BOOST_TEST(site.history[0] == (std::vector<float>{1.0f, 3.5f, 2.0f, ax}));
  BOOST_TEST(products.scale<ts::fp8_e4m3>(key, Op::kInput, 0.0f) == 448.0f / ax);

  // Evaluation (recording off) leaves the history alone; length 4 drops the oldest.
  const ts::Tensor<float> half = ts::Tensor<float>::from({kRows, kIn}, fill(kRows * kIn, kSeed + 3, 0.5f));
  {
    ts::Fp8Scope scope(products, /*record=*/false);
    (void)ts::recipe_linear<float>(x, w);
  }
  products.end_step();
  BOOST_TEST(site.history[0] == (std::vector<float>{1.0f, 3.5f, 2.0f, ax}));
  {
    ts::Fp8Scope scope(products);
    (void)ts::recipe_linear<float>(half, w);
  }
  products.end_step();
  BOOST_TEST(site.history[0] == (std::vector<float>{3.5f, 2.0f, ax, ts::amax(half.span())}));
  BOOST_TEST(ts::active_fp8_products() == nullptr);
}

namespace {

fs::path shard() {
  const fs::path p = fs::temp_directory_path() / ("tessera_fp8_" + std::to_string(::getpid()) + ".tok");
  const std::string text = ts::test::read_fortunes(ts::test::kEnglishFortunes).substr(0, 60000);
  std::vector<std::int32_t> ids(text.begin(), text.end());
  for (auto& c : ids) c &= 0xff;
  tr::TokenShardWriter wr(p, 256);
  wr.append(ids);
  wr.finish();
  return p;
}

template <class Recipe>
using TinyModel = ts::Decoder<tr::WithRecipe<ts::test::TinyTrainR1, Recipe>>;

struct Run {
  std::vector<double> loss;
  nlohmann::json state;
};

// 30 AdamW steps of 4 x 32 tokens; then the recompute check and, for the FP8 recipes, which
// weights the products quantised.
template <class Recipe>
Run train(const tr::TokenDataset& data) {
  using Model = TinyModel<Recipe>;
  Model model{ts::Seed{3}};
  tr::BatchLoader loader(data, 32, 4, ts::Seed{4});
  tr::AdamW<float> opt({.weight_decay = 0.0});
  tr::Trainer<Model, Recipe, tr::AdamW<float>> trainer(model, opt, loader,
                                                       tr::WarmupCosine(1e-2, 3, 30, 1e-3));
  Run run;
  for (int s = 0; s < 30; ++s) run.loss.push_back(trainer.step().loss);
  run.state = trainer.state();

  if constexpr (tr::Fp8Recipe<Recipe>) {
    // Recompute-safe: the same forward twice, recording, gives the same bits.
    tr::BatchLoader l2(data, 32, 4, ts::Seed{5});
    const auto batch = ts::models::next_token_batch(l2.next());
    typename Model::Saved s1, s2, s3;
    const double fp32_loss = model.forward(batch.tokens, batch.targets, s3).loss;  // no scope
    ts::Fp8Scope scope(trainer.fp8_products());
    const auto a = model.forward(batch.tokens, batch.targets, s1);
    const auto b = model.forward(batch.tokens, batch.targets, s2);
    BOOST_TEST(std::memcmp(&a.loss, &b.loss, sizeof(double)) == 0);
    BOOST_TEST(std::memcmp(s1.logits.data(), s2.logits.data(), sizeof(float) * size_t(s1.logits.numel())) == 0);
    // ... and differs from the fp32 forward of the same weights: the hook is live.
    BOOST_TEST(fp32_loss != a.loss);
  }
  if constexpr (std::is_same_v<Recipe, tr::FP8Delayed>) {
    // Exactly the attention projections and the FFN / expert matrices have scaling state.
    const auto& sites = trainer.fp8_products().sites();
    std::size_t matched = 0;
    model.visit_parameters([&](std::string_view name, auto& p) {
      const std::string n(name);
      const bool projection = n.find(".attn.w") != std::string::npos;
      const bool ffn = n.find(".w_gate") != std::string::npos || n.find(".w_up") != std::string::npos ||
                       n.find(".w_down") != std::string::npos;
      const bool quantised = sites.count(p.value.data()) > 0;
      BOOST_TEST(quantised == (projection || ffn), n << (quantised ? " has" : " lacks") << " FP8 state");
      matched += quantised;
    });
    // 2 layers x 4 projections, 1 dense FFN + 4 routed + 1 shared experts x 3 matrices.
    BOOST_TEST(matched == 2u * 4 + 6u * 3);
    BOOST_TEST(sites.size() == matched);
    for (const auto& [key, site] : sites) BOOST_TEST(site.history[0].size() == 16u);  // 30 steps, kept 16

    // The histories go into state() by name and come back through restore().
    Model other{ts::Seed{3}};
    tr::AdamW<float> o2({.weight_decay = 0.0});
    tr::BatchLoader l3(data, 32, 4, ts::Seed{4});
    tr::Trainer<Model, Recipe, tr::AdamW<float>> resumed(other, o2, l3, tr::WarmupCosine(1e-2, 3, 30, 1e-3));
    tr::CheckpointInfo info;
    info.state = run.state;
    resumed.restore(info);
    BOOST_TEST(resumed.state() == run.state);
  }
  return run;
}

}  // namespace

BOOST_AUTO_TEST_CASE(tiny_decoder_trains_with_each_fp8_recipe) {
  if (!have_text()) return;
  const fs::path p = shard();
  const tr::TokenDataset data({p});
  const Run f32 = train<tr::FP32>(data);
  const Run tile = train<tr::FP8Tile>(data);
  const Run delayed = train<tr::FP8Delayed>(data);
  fs::remove(p);
  auto tail = [](const Run& r) {  // mean of the last 5 steps
    double s = 0;
    for (size_t i = r.loss.size() - 5; i < r.loss.size(); ++i) s += r.loss[i];
    return s / 5;
  };
  for (const auto* r : {&f32, &tile, &delayed}) {
    BOOST_TEST(r->loss.front() > 5.0);              // about ln(256) = 5.55 at the start
    BOOST_TEST(tail(*r) < r->loss.front() - 1.5);   // and learned
  }
  double worst_tile = 0, worst_delayed = 0;
  for (size_t s = 0; s < f32.loss.size(); ++s) {
    worst_tile = std::max(worst_tile, std::fabs(tile.loss[s] - f32.loss[s]));
    worst_delayed = std::max(worst_delayed, std::fabs(delayed.loss[s] - f32.loss[s]));
  }
  std::cout << "loss fp32 " << f32.loss.front() << " -> " << tail(f32) << "; tile " << tail(tile)
            << " (worst step distance " << worst_tile << "); delayed " << tail(delayed)
            << " (worst " << worst_delayed << ")\n";
  BOOST_TEST(worst_tile < 0.1);
  BOOST_TEST(worst_delayed < 0.1);
  BOOST_TEST(std::fabs(tail(tile) - tail(f32)) < 0.05);
  BOOST_TEST(std::fabs(tail(delayed) - tail(f32)) < 0.05);
}
