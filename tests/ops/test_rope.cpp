// RoPE: forward against a complex-number reference in double (z = x0 + i*x1 times
// a*e^(i*angle)), the closed-form properties (position 0 is the identity, pair norms are kept,
// q.k depends only on m - n), the cos/sin table at position 16383 against double closed forms,
// every scaling kind against its formula (YaRN against a line-by-line transcription of the
// reference Python and against known DeepSeek-V3 numbers), both pair layouts, partial rotary,
// backward against central finite differences in double, bf16/fp16 and the errors.
#define BOOST_TEST_MODULE rope
#include <algorithm>
#include <boost/test/unit_test.hpp>
#include <cmath>
#include <complex>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "finite_difference.hpp"
#include "tessera/ops/rope.hpp"

using namespace tessera;
using ops::RopeConfig;
using ops::RopeLayout;
using ops::RopeScalingKind;
using ops::RopeTable;
using tessera::testing::check_close;
using tessera::testing::dot;
using tessera::testing::numeric_gradient;
using tessera::testing::random_tensor;

namespace {

constexpr uint64_t kSeed = 7340033;

template <class To, class From>
Tensor<To> cast(TensorView<const From> x) {
  const Tensor<From> c = x.contiguous();
  auto out = Tensor<To>::empty(x.shape());
  for (int64_t i = 0; i < c.numel(); ++i) {
    if constexpr (std::is_same_v<To, double>) {
      if constexpr (std::is_same_v<From, double> || std::is_same_v<From, float>) {
        out.data()[i] = c.data()[i];
      } else {
        out.data()[i] = static_cast<double>(to_float(c.data()[i]));
      }
    } else if constexpr (std::is_same_v<To, float>) {
      out.data()[i] = static_cast<float>(c.data()[i]);
    } else {
      out.data()[i] = from_float<To>(static_cast<float>(c.data()[i]));
    }
  }
  return out;
}

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

Tensor<int32_t> random_positions(Shape s, int32_t max, uint64_t seed) {
  std::mt19937_64 gen(seed);
  auto p = Tensor<int32_t>::empty(s);
  for (int32_t& v : p.span()) v = static_cast<int32_t>(gen() % static_cast<uint64_t>(max));
  return p;
}

// Reference RoPE: x is (B, S, H, D) or (S, H, D); pos(b, s) the position of token (b, s);
// freq(i) the angular frequency of pair i; amp the attention factor.
template <class Pos, class Freq>
Tensor<double> ref_rope(const Tensor<double>& x, int64_t rotary_dim, RopeLayout layout, Pos pos,
                        Freq freq, double amp = 1.0) {
  const Shape& s = x.shape();
  const int64_t B = s.rank() == 4 ? s[0] : 1, S = s[-3], H = s[-2], D = s[-1];
  auto y = x.clone();
  const double* px = x.data();
  double* py = y.data();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < S; ++t)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t base = ((b * S + t) * H + h) * D;
        for (int64_t i = 0; i < rotary_dim / 2; ++i) {
          const int64_t j0 = layout == RopeLayout::kInterleaved ? 2 * i : i;
          const int64_t j1 = layout == RopeLayout::kInterleaved ? 2 * i + 1 : i + rotary_dim / 2;
          const std::complex<double> z(px[base + j0], px[base + j1]);
          const std::complex<double> r =
              z * std::polar(amp, static_cast<double>(pos(b, t)) * freq(i));
          py[base + j0] = r.real();
          py[base + j1] = r.imag();
        }
      }
  return y;
}

auto plain_freq(double theta, int64_t rotary_dim) {
  return [=](int64_t i) { return std::pow(theta, -2.0 * static_cast<double>(i) / rotary_dim); };
}

const RopeLayout kLayouts[] = {RopeLayout::kHalfSplit, RopeLayout::kInterleaved};

const char* name(RopeLayout l) {
  return l == RopeLayout::kHalfSplit ? "half-split" : "interleaved";
}

// YaRN inv_freq, transcribed line by line from DeepSeek-V3 inference/model.py
// precompute_freqs_cis (which matches jquesnelle/yarn's LlamaYaRNScaledRotaryEmbedding).
std::vector<double> yarn_reference(int64_t dim, double base, double factor, double beta_fast,
                                   double beta_slow, int64_t original_seq_len) {
  auto find_correction_dim = [&](double num_rotations) {
    return dim * std::log(original_seq_len / (num_rotations * 2 * M_PI)) / (2 * std::log(base));
  };
  double low = std::floor(find_correction_dim(beta_fast));
  double high = std::ceil(find_correction_dim(beta_slow));
  low = std::max(low, 0.0);
  high = std::min(high, static_cast<double>(dim - 1));
  if (low == high) high += 0.001;
  std::vector<double> freqs(dim / 2);
  for (int64_t i = 0; i < dim / 2; ++i) {
    const double f = 1.0 / std::pow(base, static_cast<double>(2 * i) / dim);
    const double ramp = std::clamp((i - low) / (high - low), 0.0, 1.0);
    const double smooth = 1 - ramp;
    freqs[i] = f / factor * (1 - smooth) + f * smooth;
  }
  return freqs;
}

}  // namespace

BOOST_AUTO_TEST_CASE(forward_matches_complex_reference) {
  BOOST_TEST_MESSAGE("seed " << kSeed);
  uint64_t seed = kSeed;
  for (RopeLayout layout : kLayouts) {
    // (batch, seq, heads, head_dim) with per-batch positions; odd sizes everywhere.
    {
      RopeConfig cfg;
      cfg.layout = layout;
      const Tensor<double> x = random_tensor({2, 5, 3, 8}, seed++);
      const Tensor<int32_t> pos = random_positions({2, 5}, 97, seed++);
      const RopeTable<double> table(cfg, 8, 97);
      auto expected = ref_rope(
          x, 8, layout, [&](int64_t b, int64_t s) { return pos(b, s); }, plain_freq(10000.0, 8));
      check_close(ops::rope<double>(x, table, pos), expected, 1e-13, 1e-14,
                  (std::string("rope double (2,5,3,8) ") + name(layout)).c_str());
      // float input with a float table.
      const RopeTable<float> table_f(cfg, 8, 97);
      const Tensor<float> xf = cast<float, double>(x);
      check_close(cast<double, float>(ops::rope<float>(xf, table_f, pos)),
                  ref_rope(
                      cast<double, float>(xf), 8, layout,
                      [&](int64_t b, int64_t s) { return pos(b, s); }, plain_freq(10000.0, 8)),
                  0.0, 4e-7, (std::string("rope float (2,5,3,8) ") + name(layout)).c_str());
    }
    // (seq, heads, head_dim) with a start offset; odd head_dim, partial rotary, other theta.
    {
      RopeConfig cfg;
      cfg.layout = layout;
      cfg.theta = 500000.0f;
      cfg.rotary_dim = 6;
      const Tensor<double> x = random_tensor({7, 3, 13}, seed++);
      const RopeTable<double> table(cfg, 13, 40);
      auto expected = ref_rope(
          x, 6, layout, [](int64_t, int64_t s) { return 11 + s; }, plain_freq(500000.0, 6));
      check_close(ops::rope<double>(x, table, 11), expected, 1e-13, 1e-14,
                  (std::string("rope double (7,3,13) rotary 6 ") + name(layout)).c_str());
    }
  }
}

BOOST_AUTO_TEST_CASE(position_zero_is_identity_and_norms_are_kept) {
  const Tensor<float> x = cast<float, double>(random_tensor({3, 11, 5, 16}, kSeed + 1));
  const RopeTable<float> table(RopeConfig{}, 16, 20000);
  const Tensor<float> y0 = ops::rope<float>(x, table, Tensor<int32_t>::zeros({3, 11}));
  BOOST_TEST(std::memcmp(y0.data(), x.data(), x.size_bytes()) == 0);  // cos 0 = 1, sin 0 = 0

  for (RopeLayout layout : kLayouts) {
    RopeConfig cfg;
    cfg.layout = layout;
    const RopeTable<float> t(cfg, 16, 20000);
    const Tensor<int32_t> pos = random_positions({3, 11}, 20000, kSeed + 2);
    const Tensor<float> y = ops::rope<float>(x, t, pos);
    double worst = 0.0;
    for (int64_t v = 0; v < x.numel() / 16; ++v) {
      for (int64_t i = 0; i < 8; ++i) {
        const int64_t a = layout == RopeLayout::kHalfSplit ? i : 2 * i;
        const int64_t b = layout == RopeLayout::kHalfSplit ? i + 8 : 2 * i + 1;
        const double nx = std::hypot(x.data()[v * 16 + a], x.data()[v * 16 + b]);
        const double ny = std::hypot(y.data()[v * 16 + a], y.data()[v * 16 + b]);
        worst = std::max(worst, std::fabs(nx - ny) / std::max(nx, 1e-3));
      }
    }
    BOOST_TEST_INFO(name(layout));
    BOOST_TEST(worst < 1e-6);
  }
}

BOOST_AUTO_TEST_CASE(dot_product_depends_only_on_relative_position) {
  RopeConfig cfg;
  const int64_t D = 32;
  const RopeTable<double> table(cfg, D, 17000);
  const Tensor<double> q = random_tensor({1, 3, D}, kSeed + 3);
  const Tensor<double> k = random_tensor({1, 3, D}, kSeed + 4);
  auto score = [&](int32_t m, int32_t n) {
    auto qm = ops::rope<double>(q, table, int64_t{m});
    auto kn = ops::rope<double>(k, table, int64_t{n});
    return dot(qm, kn);
  };
  for (int32_t delta : {0, 1, 7, 1000, 16000}) {
    const double base = score(17 + delta, 17);
    for (int32_t shift : {1, 123, 980}) {
      BOOST_TEST_INFO("m - n = " << delta << ", shift " << shift);
      BOOST_TEST(score(17 + delta - 17 + shift, shift) == base,
                 boost::test_tools::tolerance(1e-11));
    }
  }
  // And it does depend on m - n (guards against a rope that does nothing).
  BOOST_TEST(std::fabs(score(5, 0) - score(0, 0)) > 1e-3);
}

BOOST_AUTO_TEST_CASE(table_is_accurate_at_position_16383) {
  RopeConfig cfg;
  const int64_t D = 128, P = 16384;
  const RopeTable<float> table(cfg, D, P);
  BOOST_TEST(table.cos().shape() == (Shape{P, D / 2}));
  double worst = 0.0, naive_float_worst = 0.0;
  for (int64_t i = 0; i < D / 2; ++i) {
    const double angle = 16383.0 * std::pow(10000.0, -2.0 * static_cast<double>(i) / D);
    worst = std::max(worst, std::fabs(table.cos()(P - 1, i) - std::cos(angle)));
    worst = std::max(worst, std::fabs(table.sin()(P - 1, i) - std::sin(angle)));
    // What an all-float computation would give (to show this test can tell them apart).
    const float inv_f = 1.0f / std::pow(10000.0f, static_cast<float>(2 * i) / D);
    naive_float_worst =
        std::max(naive_float_worst, std::fabs(std::cos(16383.0f * inv_f) - std::cos(angle)));
  }
  BOOST_TEST_MESSAGE("position 16383: table error " << worst << ", all-float error "
                                                    << naive_float_worst);
  BOOST_TEST(worst <= 0x1.0p-25 + 1e-12);  // one float rounding of a value in [-1, 1]
  BOOST_TEST(naive_float_worst > 1e-4);

  // The op at the last position, against the double reference.
  const Tensor<float> x = cast<float, double>(random_tensor({2, 3, 4, D}, kSeed + 5));
  const Tensor<float> y = ops::rope<float>(x, table, int64_t{P - 3});
  check_close(cast<double, float>(y),
              ref_rope(
                  cast<double, float>(x), D, RopeLayout::kHalfSplit,
                  [&](int64_t, int64_t s) { return P - 3 + s; }, plain_freq(10000.0, D)),
              0.0, 1e-6, "rope float at positions 16381..16383");
}

BOOST_AUTO_TEST_CASE(linear_scaling_is_position_interpolation) {
  RopeConfig plain, lin;
  lin.scaling.kind = RopeScalingKind::kLinear;
  lin.scaling.factor = 4.0;
  const RopeTable<double> t0(plain, 16, 100), t1(lin, 16, 400);
  for (int64_t p = 0; p < 100; ++p)
    for (int64_t i = 0; i < 8; ++i) {
      BOOST_TEST(t1.cos()(4 * p, i) == t0.cos()(p, i), boost::test_tools::tolerance(1e-12));
      BOOST_TEST(t1.sin()(4 * p, i) == t0.sin()(p, i), boost::test_tools::tolerance(1e-12));
    }
  BOOST_TEST(t1.attention_factor() == 1.0);
}

BOOST_AUTO_TEST_CASE(ntk_scaling_scales_theta) {
  for (int64_t r : {8, 64, 128}) {
    RopeConfig plain, ntk;
    ntk.scaling.kind = RopeScalingKind::kNtk;
    ntk.scaling.factor = 8.0;
    const auto f0 = ops::rope_inv_freq(plain, r);
    const auto f1 = ops::rope_inv_freq(ntk, r);
    const double theta2 = 10000.0 * std::pow(8.0, static_cast<double>(r) / (r - 2));
    for (int64_t i = 0; i < r / 2; ++i)
      BOOST_TEST(f1[i] == std::pow(theta2, -2.0 * i / r), boost::test_tools::tolerance(1e-13));
    // The property NTK-aware scaling is built for: the fastest pair is untouched and the
    // slowest is slowed by exactly `factor`.
    BOOST_TEST(f1.front() == 1.0);
    BOOST_TEST(f1.back() == f0.back() / 8.0, boost::test_tools::tolerance(1e-13));
  }
}

BOOST_AUTO_TEST_CASE(yarn_matches_reference_and_deepseek_numbers) {
  // DeepSeek-V3: qk_rope_head_dim 64, theta 10000, factor 40, original 4096, betas 32 / 1.
  const auto r64 = ops::yarn_correction_range(32, 1, 64, 10000.0, 4096);
  BOOST_TEST(r64.low == 10.0);
  BOOST_TEST(r64.high == 23.0);
  const auto r128 = ops::yarn_correction_range(32, 1, 128, 10000.0, 4096);
  BOOST_TEST(r128.low == 20.0);
  BOOST_TEST(r128.high == 46.0);

  for (int64_t r : {64, 128, 10}) {
    RopeConfig cfg;
    cfg.scaling.kind = RopeScalingKind::kYarn;
    cfg.scaling.factor = 40.0;
    cfg.scaling.original_max_position = 4096;
    const auto got = ops::rope_inv_freq(cfg, r);
    const auto want = yarn_reference(r, 10000.0, 40.0, 32.0, 1.0, 4096);
    for (int64_t i = 0; i < r / 2; ++i) {
      BOOST_TEST_INFO("rotary_dim " << r << ", pair " << i);
      BOOST_TEST(got[i] == want[i], boost::test_tools::tolerance(1e-14));
    }
  }
  // Ramp ends: pairs <= low keep the trained frequency, pairs >= high are interpolated.
  RopeConfig cfg;
  cfg.scaling.kind = RopeScalingKind::kYarn;
  cfg.scaling.factor = 40.0;
  const auto plain = ops::rope_inv_freq(RopeConfig{}, 64);
  const auto yarn = ops::rope_inv_freq(cfg, 64);
  for (int i = 0; i <= 10; ++i) BOOST_TEST(yarn[i] == plain[i]);
  for (int i = 23; i < 32; ++i)
    BOOST_TEST(yarn[i] == plain[i] / 40.0, boost::test_tools::tolerance(1e-15));
  BOOST_TEST(yarn[16] < plain[16]);
  BOOST_TEST(yarn[16] > plain[16] / 40.0);

  // Attention factor: 0.1 ln(40) + 1 by default; 1 with DeepSeek-V3's mscale = mscale_all_dim;
  // an explicit value wins; multiplied into cos and sin.
  const RopeTable<float> t(cfg, 64, 8);
  BOOST_TEST(t.attention_factor() == 1.3688879454113936, boost::test_tools::tolerance(1e-15));
  BOOST_TEST(t.cos()(0, 5) == static_cast<float>(1.3688879454113936));
  BOOST_TEST(t.sin()(0, 5) == 0.0f);
  RopeConfig ds = cfg;
  ds.scaling.mscale = 1.0;
  ds.scaling.mscale_all_dim = 1.0;
  BOOST_TEST(ops::rope_attention_factor(ds.scaling) == 1.0);
  ds.scaling.mscale_all_dim = 0.707;
  BOOST_TEST(ops::rope_attention_factor(ds.scaling) ==
                 (0.1 * std::log(40.0) + 1) / (0.1 * 0.707 * std::log(40.0) + 1),
             boost::test_tools::tolerance(1e-15));
  ds.scaling.attention_factor = 0.7;
  BOOST_TEST(ops::rope_attention_factor(ds.scaling) == 0.7);
  BOOST_TEST(ops::yarn_get_mscale(1.0) == 1.0);

  // The op applies the scaled frequencies and the factor.
  const Tensor<double> x = random_tensor({2, 3, 2, 64}, kSeed + 6);
  const RopeTable<double> td(cfg, 64, 20000);
  check_close(ops::rope<double>(x, td, int64_t{19990}),
              ref_rope(
                  x, 64, RopeLayout::kHalfSplit, [](int64_t, int64_t s) { return 19990 + s; },
                  [&](int64_t i) { return yarn[i]; }, 1.3688879454113936),
              1e-12, 1e-13, "rope yarn double");
}

BOOST_AUTO_TEST_CASE(interleaved_is_half_split_of_permuted_features) {
  const int64_t D = 12;
  const Tensor<float> x = cast<float, double>(random_tensor({3, 5, 2, D}, kSeed + 7));
  auto xh = Tensor<float>::empty(x.shape());  // x rearranged into half-split order
  for (int64_t v = 0; v < x.numel() / D; ++v)
    for (int64_t i = 0; i < D / 2; ++i) {
      xh.data()[v * D + i] = x.data()[v * D + 2 * i];
      xh.data()[v * D + i + D / 2] = x.data()[v * D + 2 * i + 1];
    }
  RopeConfig ci, ch;
  ci.layout = RopeLayout::kInterleaved;
  const Tensor<int32_t> pos = random_positions({5}, 500, kSeed + 8);
  const auto yi = ops::rope<float>(x, RopeTable<float>(ci, D, 500), pos);
  const auto yh = ops::rope<float>(xh, RopeTable<float>(ch, D, 500), pos);
  for (int64_t v = 0; v < x.numel() / D; ++v)
    for (int64_t i = 0; i < D / 2; ++i) {
      BOOST_TEST(yi.data()[v * D + 2 * i] == yh.data()[v * D + i]);
      BOOST_TEST(yi.data()[v * D + 2 * i + 1] == yh.data()[v * D + i + D / 2]);
    }
}

BOOST_AUTO_TEST_CASE(partial_rotary_passes_the_tail_through) {
  for (RopeLayout layout : kLayouts) {
    RopeConfig cfg;
    cfg.rotary_dim = 4;
    cfg.layout = layout;
    const Tensor<float> x = cast<float, double>(random_tensor({5, 3, 11}, kSeed + 9));
    const auto y = ops::rope<float>(x, RopeTable<float>(cfg, 11, 64), int64_t{50});
    for (int64_t v = 0; v < x.numel() / 11; ++v)
      for (int64_t j = 4; j < 11; ++j) BOOST_TEST(y.data()[v * 11 + j] == x.data()[v * 11 + j]);
    BOOST_TEST(y.data()[0] != x.data()[0]);
  }
}

BOOST_AUTO_TEST_CASE(position_forms_agree) {
  const Tensor<double> x = random_tensor({3, 7, 2, 10}, kSeed + 10);
  const RopeTable<double> table(RopeConfig{}, 10, 64);
  // start offset == explicit (seq) positions == explicit (batch, seq) positions.
  auto by_start = ops::rope<double>(x, table, int64_t{9});
  auto seq_pos = Tensor<int32_t>::empty({7});
  auto batch_pos = Tensor<int32_t>::empty({3, 7});
  for (int s = 0; s < 7; ++s) {
    seq_pos(s) = 9 + s;
    for (int b = 0; b < 3; ++b) batch_pos(b, s) = 9 + s;
  }
  check_close(ops::rope<double>(x, table, seq_pos), by_start, 0.0, 0.0, "(seq) positions");
  check_close(ops::rope<double>(x, table, batch_pos), by_start, 0.0, 0.0, "(batch, seq) positions");
  // Per-batch positions really are per batch row.
  batch_pos(1, 3) = 40;
  auto y = ops::rope<double>(x, table, batch_pos);
  check_close(y.select(0, 0), by_start.select(0, 0), 0.0, 0.0, "batch 0 untouched");
  BOOST_TEST(y(1, 3, 0, 0) != by_start(1, 3, 0, 0));
  // A strided input ((batch, heads, seq, D) storage viewed as (batch, seq, heads, D)).
  const Tensor<double> bhsd = random_tensor({3, 2, 7, 10}, kSeed + 11);
  auto strided = bhsd.transpose(1, 2);
  check_close(ops::rope<double>(strided, table, int64_t{9}),
              ops::rope<double>(strided.contiguous(), table, int64_t{9}), 0.0, 0.0,
              "strided input");
}

BOOST_AUTO_TEST_CASE(backward_matches_finite_differences) {
  BOOST_TEST_MESSAGE("seed " << kSeed);
  uint64_t seed = kSeed + 20;
  for (RopeLayout layout : kLayouts) {
    RopeConfig cfg;
    cfg.layout = layout;
    cfg.rotary_dim = 6;
    cfg.scaling.kind = RopeScalingKind::kYarn;  // attention factor != 1 makes the transpose matter
    cfg.scaling.factor = 4.0;
    cfg.scaling.original_max_position = 16;
    const RopeTable<double> table(cfg, 7, 64);
    const Tensor<double> x = random_tensor({2, 5, 3, 7}, seed++);
    const Tensor<double> g = random_tensor(x.shape(), seed++);
    const Tensor<int32_t> pos = random_positions({2, 5}, 64, seed++);
    auto loss = [&](TensorView<const double> in) {
      return dot(ops::rope<double>(in, table, pos), g);
    };
    check_close(ops::rope_backward<double>(g, table, pos), numeric_gradient(loss, x), 1e-7, 1e-8,
                (std::string("rope dx ") + name(layout)).c_str());
    auto loss3 = [&](TensorView<const double> in) {
      return dot(ops::rope<double>(in, table, int64_t{30}), g.select(0, 1));
    };
    const Tensor<double> x3 = x.select(0, 1).contiguous();
    check_close(ops::rope_backward<double>(g.select(0, 1), table, int64_t{30}),
                numeric_gradient(loss3, x3), 1e-7, 1e-8,
                (std::string("rope dx (seq, heads, dim) ") + name(layout)).c_str());
  }
  // Without an attention factor the backward is the inverse rotation.
  const RopeTable<float> table(RopeConfig{}, 16, 9000);
  const Tensor<float> x = cast<float, double>(random_tensor({2, 3, 16}, seed++));
  auto back =
      ops::rope_backward<float>(ops::rope<float>(x, table, int64_t{8990}), table, int64_t{8990});
  check_close(cast<double, float>(back), cast<double, float>(x), 0.0, 1e-6, "R(-a) R(a) x == x");
}

template <class T>
void check_low_precision(double eps) {
  BOOST_TEST_MESSAGE(number_traits<T>::name << ": seed " << kSeed << ", rtol " << eps);
  for (RopeLayout layout : kLayouts) {
    RopeConfig cfg;
    cfg.layout = layout;
    const RopeTable<float> table(cfg, 14, 20000);
    const Tensor<T> x = cast<T, double>(random_tensor({2, 5, 3, 14}, kSeed + 30));
    const Tensor<int32_t> pos = random_positions({2, 5}, 20000, kSeed + 31);
    const Tensor<double> xd = cast<double, T>(x);
    auto expected = ref_rope(
        xd, 14, layout, [&](int64_t b, int64_t s) { return pos(b, s); }, plain_freq(10000.0, 14));
    // Computed in float, rounded once: eps/2 relative, plus float's ~1e-7 absolute.
    check_close(cast<double, T>(ops::rope<T>(x, table, pos)), expected, eps, 1e-6,
                (std::string(number_traits<T>::name) + " rope " + name(layout)).c_str());
    auto back = ops::rope_backward<T>(x, table, pos);
    auto expected_back = ops::rope_backward<double>(xd, RopeTable<double>(cfg, 14, 20000), pos);
    check_close(cast<double, T>(back), expected_back, eps, 1e-6,
                (std::string(number_traits<T>::name) + " rope_backward " + name(layout)).c_str());
  }
}

BOOST_AUTO_TEST_CASE(bf16_matches_double) {
  check_low_precision<bf16>(number_traits<bf16>::epsilon);
}
BOOST_AUTO_TEST_CASE(fp16_matches_double) {
  check_low_precision<fp16>(number_traits<fp16>::epsilon);
}

BOOST_AUTO_TEST_CASE(errors_name_what_is_wrong) {
  const RopeTable<float> table(RopeConfig{}, 8, 16);
  auto x = Tensor<float>::zeros({2, 3, 4, 8});

  std::string msg = error_of([&] {
    (void)ops::rope<float>(Tensor<float>::zeros({2, 3, 4, 6}), table);
  });
  BOOST_TEST(msg.find("head_dim 6") != std::string::npos);
  BOOST_TEST(msg.find("head_dim 8") != std::string::npos);
  BOOST_CHECK_THROW((void)ops::rope<float>(Tensor<float>::zeros({3, 8}), table), Error);

  auto pos = Tensor<int32_t>::zeros({2, 3});
  pos(1, 2) = 16;
  msg = error_of([&] { (void)ops::rope<float>(x, table, pos); });
  BOOST_TEST(msg.find("positions[1, 2] = 16") != std::string::npos);
  BOOST_TEST(msg.find("[0, 16)") != std::string::npos);
  pos(1, 2) = -1;
  BOOST_CHECK_THROW((void)ops::rope<float>(x, table, pos), Error);

  msg = error_of([&] { (void)ops::rope<float>(x, table, int64_t{14}); });
  BOOST_TEST(msg.find("[14, 17)") != std::string::npos);
  BOOST_CHECK_THROW((void)ops::rope<float>(x, table, int64_t{-1}), Error);
  BOOST_CHECK_NO_THROW((void)ops::rope<float>(x, table, int64_t{13}));

  msg = error_of([&] { (void)ops::rope<float>(x, table, Tensor<int32_t>::zeros({4})); });
  BOOST_TEST(msg.find("'positions' has shape [4]") != std::string::npos);
  BOOST_TEST(msg.find("[3] or [2, 3]") != std::string::npos);
  // (batch, seq) positions need a batch axis.
  BOOST_CHECK_THROW((void)ops::rope<float>(Tensor<float>::zeros({3, 4, 8}), table,
                                           Tensor<int32_t>::zeros({1, 3})),
                    Error);

  RopeConfig bad;
  bad.rotary_dim = 5;
  msg = error_of([&] { RopeTable<float> t(bad, 8, 4); });
  BOOST_TEST(msg.find("rotary_dim") != std::string::npos);
  bad.rotary_dim = 10;
  BOOST_CHECK_THROW((RopeTable<float>(bad, 8, 4)), Error);
  BOOST_CHECK_THROW((RopeTable<float>(RopeConfig{}, 7, 4)), Error);  // odd head_dim, all rotary
  bad = RopeConfig{};
  bad.theta = 0.5f;
  BOOST_CHECK_THROW((RopeTable<float>(bad, 8, 4)), Error);
  bad = RopeConfig{};
  bad.scaling.kind = RopeScalingKind::kNtk;
  bad.rotary_dim = 2;
  BOOST_CHECK_THROW((RopeTable<float>(bad, 8, 4)), Error);
  bad = RopeConfig{};
  bad.scaling.kind = RopeScalingKind::kLinear;
  bad.scaling.factor = 0.0;
  BOOST_CHECK_THROW((RopeTable<float>(bad, 8, 4)), Error);
  bad = RopeConfig{};
  bad.scaling.kind = RopeScalingKind::kYarn;
  bad.scaling.original_max_position = 0;
  msg = error_of([&] { RopeTable<float> t(bad, 8, 4); });
  BOOST_TEST(msg.find("original_max_position") != std::string::npos);
  BOOST_CHECK_THROW((RopeTable<float>(RopeConfig{}, 8, -1)), Error);
}
