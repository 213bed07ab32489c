// LibTorch cross-checks of RoPE (every layout x scaling, explicit / per-batch / offset
// positions) and of the embedding gather with its scatter-add backward, in float and bf16.
//
// LibTorch 1.13 has no rotary embedding, so torch_ref.cpp writes one with torch ops from the
// papers' formulas, frequencies included (computed in double with torch, not with tessera's
// rope_inv_freq); autograd supplies its backward. That makes it a real cross-check of both
// directions: tessera's backward is a hand-written inverse rotation, LibTorch's is derived.
#define BOOST_TEST_MODULE torch_rope_embedding
#include <boost/test/unit_test.hpp>
#include <cstdint>
#include <string>
#include <vector>

#include "cross_check.hpp"
#include "tessera/ops/embedding.hpp"
#include "tessera/ops/rope.hpp"

using namespace tessera;
using namespace tessera::cross_check;

BOOST_TEST_GLOBAL_FIXTURE(TorchSetup);

namespace {

using Types = std::tuple<float, bf16>;

// ---- tolerances ---------------------------------------------------------------------------------
// RoPE forward and backward are one 2x2 rotation per pair with the same float cos/sin table on
// both sides (both evaluate the angle in double and round cos, sin once), so the float results
// differ only by the contraction of a*c - b*s into an fma (a few float ulps: 8 eps).
// In bf16 both sides compute in float and round once: the float difference plus one bf16 ulp
// of the element (for_type in cross_check.hpp).
template <class T>
Tolerance rope_tol() {
  return for_type<T>({8 * kFloatEps, 8 * kFloatEps});
}

torch_ref::RopeSpec spec_of(const ops::RopeConfig& c, int64_t head_dim) {
  torch_ref::RopeSpec s;
  s.rotary_dim = c.rotary_dim == -1 ? head_dim : c.rotary_dim;
  s.base = c.theta;
  s.layout = c.layout == ops::RopeLayout::kHalfSplit ? torch_ref::RopeLayout::kHalfSplit
                                                     : torch_ref::RopeLayout::kInterleaved;
  switch (c.scaling.kind) {
    case ops::RopeScalingKind::kNone:
      s.scaling = torch_ref::RopeScaling::kNone;
      break;
    case ops::RopeScalingKind::kLinear:
      s.scaling = torch_ref::RopeScaling::kLinear;
      break;
    case ops::RopeScalingKind::kNtk:
      s.scaling = torch_ref::RopeScaling::kNtk;
      break;
    case ops::RopeScalingKind::kYarn:
      s.scaling = torch_ref::RopeScaling::kYarn;
      break;
  }
  s.factor = c.scaling.factor;
  s.original_max_positions = c.scaling.original_max_position;
  s.beta_fast = c.scaling.beta_fast;
  s.beta_slow = c.scaling.beta_slow;
  s.mscale = c.scaling.mscale;
  s.mscale_all_dim = c.scaling.mscale_all_dim;
  s.attention_factor = c.scaling.attention_factor;
  return s;
}

struct RopeCase {
  std::string name;
  ops::RopeConfig config;
  int64_t head_dim;
};

// Odd extents (batch 2, seq 7, heads 3) and, for partial rotary, a head_dim the rotation does
// not fill. theta 10000 with rotary_dim 16 puts YaRN's ramp at pairs 2..6 of 8, so all three
// of its regions (extrapolated, blended, interpolated) are exercised.
std::vector<RopeCase> rope_cases() {
  std::vector<RopeCase> cases;
  for (auto layout : {ops::RopeLayout::kHalfSplit, ops::RopeLayout::kInterleaved}) {
    const std::string lname = layout == ops::RopeLayout::kHalfSplit ? "half_split" : "interleaved";
    auto add = [&](std::string name, ops::RopeScaling scaling, int rotary_dim, int64_t head_dim) {
      ops::RopeConfig c;
      c.theta = 10000.0f;
      c.rotary_dim = rotary_dim;
      c.scaling = scaling;
      c.layout = layout;
      cases.push_back({lname + "/" + name, c, head_dim});
    };
    add("plain", {}, -1, 16);
    add("partial_rotary", {}, 8, 14);
    add("linear_x4", {ops::RopeScalingKind::kLinear, 4.0}, -1, 16);
    add("ntk_x8", {ops::RopeScalingKind::kNtk, 8.0}, -1, 16);
    ops::RopeScaling yarn{ops::RopeScalingKind::kYarn, 4.0};
    yarn.original_max_position = 4096;
    add("yarn_x4", yarn, -1, 16);
    ops::RopeScaling yarn_ds = yarn;  // DeepSeek-style mscale ratio (0.707 / 1), partial rotary
    yarn_ds.factor = 40.0;
    yarn_ds.mscale = 0.707;
    yarn_ds.mscale_all_dim = 1.0;
    add("yarn_x40_mscale", yarn_ds, 12, 18);
  }
  return cases;
}

template <class T>
void check_rope(const std::string& name, const ops::RopeTable<float>& table, const Input<T>& x,
                const IndexArray& positions, const Input<T>& dy, const Tensor<T>& y,
                const Tensor<T>& dx) {
  const auto ref = torch_ref::rope(x.array, positions, spec_of(table.config(), table.head_dim()),
                                   dy.array, precision_of<T>);
  check_close(name + " y", y, ref.y, rope_tol<T>());
  check_close(name + " dx", dx, ref.dx, rope_tol<T>());
}

}  // namespace

BOOST_AUTO_TEST_SUITE(rope)

// The frequency tables and the YaRN attention factor, tessera's (double) against LibTorch's
// (double, rounded to float by the array interface).
BOOST_AUTO_TEST_CASE(inverse_frequencies) {
  for (const RopeCase& c : rope_cases()) {
    const ops::RopeTable<float> table(c.config, c.head_dim, 1);
    const auto ref = torch_ref::rope_tables(spec_of(c.config, c.head_dim));
    Array ours{{}, {static_cast<int64_t>(table.inv_freq().size())}};
    for (double f : table.inv_freq()) ours.data.push_back(static_cast<float>(f));
    check_close(c.name + " inv_freq", ours, ref.inv_freq, {2 * kFloatEps, 0.0});
    BOOST_TEST(table.attention_factor() == ref.attention_scale,
               boost::test_tools::tolerance(1e-12));
  }
}

BOOST_AUTO_TEST_CASE_TEMPLATE(explicit_positions, T, Types) {
  for (const RopeCase& c : rope_cases()) {
    const std::string name = "rope<" + name_of<T>() + "> " + c.name;
    Gen gen(name);
    // Long-context positions, unsorted and repeated, up to 4x the YaRN training length.
    const int64_t max_positions = 16384;
    const ops::RopeTable<float> table(c.config, c.head_dim, max_positions);
    const int64_t B = 2, S = 7, H = 3;
    auto x = normal<T>(gen, {B, S, H, c.head_dim});
    auto dy = normal<T>(gen, {B, S, H, c.head_dim});
    auto pos = Tensor<int32_t>::empty({S});
    IndexArray pos_ref{{}, {S}};
    for (int64_t s = 0; s < S; ++s) {
      pos.data()[s] =
          static_cast<int32_t>(s == 0 ? max_positions - 1 : gen.integer(0, max_positions - 1));
      pos_ref.data.push_back(pos.data()[s]);
    }
    auto y = ops::rope<T>(x.tensor, table, pos);
    auto dx = ops::rope_backward<T>(dy.tensor, table, pos);
    check_rope<T>(name, table, x, pos_ref, dy, y, dx);
  }
}

// Positions (batch, seq): packed sequences with their own offsets per row.
BOOST_AUTO_TEST_CASE_TEMPLATE(per_batch_positions, T, Types) {
  for (const RopeCase& c : rope_cases()) {
    const std::string name = "rope<" + name_of<T>() + "> per-batch " + c.name;
    Gen gen(name);
    const ops::RopeTable<float> table(c.config, c.head_dim, 5000);
    const int64_t B = 3, S = 5, H = 2;
    auto x = normal<T>(gen, {B, S, H, c.head_dim});
    auto dy = normal<T>(gen, {B, S, H, c.head_dim});
    auto pos = Tensor<int32_t>::empty({B, S});
    IndexArray pos_ref{{}, {B, S}};
    for (int64_t i = 0; i < B * S; ++i) {
      pos.data()[i] = static_cast<int32_t>(gen.integer(0, 4999));
      pos_ref.data.push_back(pos.data()[i]);
    }
    auto y = ops::rope<T>(x.tensor, table, pos);
    auto dx = ops::rope_backward<T>(dy.tensor, table, pos);
    check_rope<T>(name, table, x, pos_ref, dy, y, dx);
  }
}

// KV-cache decoding: (seq, heads, head_dim) tokens at start, start + 1, ...
BOOST_AUTO_TEST_CASE_TEMPLATE(start_offset, T, Types) {
  for (const RopeCase& c : rope_cases()) {
    const std::string name = "rope<" + name_of<T>() + "> offset " + c.name;
    Gen gen(name);
    const ops::RopeTable<float> table(c.config, c.head_dim, 20000);
    const int64_t S = 11, H = 3;
    const int64_t start = gen.integer(0, 20000 - S);
    auto x = normal<T>(gen, {S, H, c.head_dim});
    auto dy = normal<T>(gen, {S, H, c.head_dim});
    IndexArray pos_ref{{}, {S}};
    for (int64_t s = 0; s < S; ++s) pos_ref.data.push_back(start + s);
    auto y = ops::rope<T>(x.tensor, table, start);
    auto dx = ops::rope_backward<T>(dy.tensor, table, start);
    check_rope<T>(name, table, x, pos_ref, dy, y, dx);
  }
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(embedding)

// The gather is a copy: bit-exact in every precision. The backward sums the upstream rows of
// repeated ids; tessera sums in token order in float and rounds once, LibTorch's CPU
// embedding_backward sums in its own order. Float: a few ulps of the sum (atol 16 eps x the
// largest gradient element: at most ~12 rows per id here). bf16: see the tolerance below.
BOOST_AUTO_TEST_CASE_TEMPLATE(gather_and_scatter_add, T, Types) {
  Gen gen("embedding<" + name_of<T>() + ">");
  const int64_t vocab = 37, dim = 13;
  auto table = normal<T>(gen, {vocab, dim});
  // (3, 11) ids over a small vocabulary, so many ids repeat (scatter-add collisions), plus
  // ids 0 and vocab - 1 to reach both ends of the table.
  auto ids = Tensor<int32_t>::empty({3, 11});
  IndexArray ids_ref{{}, {3, 11}};
  for (int64_t i = 0; i < ids.numel(); ++i) {
    ids.data()[i] = static_cast<int32_t>(i == 0   ? 0
                                         : i == 1 ? vocab - 1
                                                  : gen.integer(0, vocab - 1));
    ids_ref.data.push_back(ids.data()[i]);
  }
  auto dy = normal<T>(gen, {3, 11, dim});
  auto y = ops::embedding<T>(table.tensor, ids);
  auto dtable = ops::embedding_backward<T>(dy.tensor, ids, vocab);
  const auto ref = torch_ref::embedding(table.array, ids_ref, dy.array, precision_of<T>);
  check_equal("embedding y", to_array(y), ref.y);
  // bf16: the reference sums the repeated rows in float and rounds once, as tessera does, in
  // another order: the float difference plus one bf16 ulp of the element.
  const Tolerance tol = for_type<T>({16 * kFloatEps, 16 * kFloatEps});
  check_close("embedding dtable", dtable, ref.dweight, tol);
}

BOOST_AUTO_TEST_SUITE_END()
