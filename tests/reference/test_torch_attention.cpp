// LibTorch cross-checks of nn::Attention under every window policy: output, dx and every weight
// gradient, in float (and bf16 for a few policies).
//
// What the reference is: torch_ref::attention computes attention the plain way, as the
// definition reads: projections, RoPE (written from the paper in torch_ref.cpp), kv heads
// repeated with repeat_interleave, the full T x T score matrix, -inf where an explicit boolean
// mask forbids a key, softmax, P v, the output projection; autograd derives every gradient.
// tessera's kernel is tiled with an online softmax and skips key tiles outside the window, and
// its backward is hand-written (flash-attention style), so the two share nothing but the
// definition.
//
// Where the mask comes from: this file's own statement of each policy's rule (the table in
// docs/attention.md, `Rule<W>` below), not window.hpp. Each test also checks that rule against
// the policy's `allowed` predicate for every (query, key) pair, so a predicate that disagrees
// with its documentation fails here, and a kernel that skips a tile the predicate allows, or
// reads one it forbids, fails the value comparison. VariableWindow's per-block sizes are a
// run-time decision: the mask uses the choice tessera recorded in Saved::choice (the selectors'
// signals are not what is cross-checked; the attention under the chosen windows is).
//
// LearnedSelector: the reference also implements the gate from its documented definition
// (torch_ref::AttentionGate: mean of the block's signal rows, linear gate in double, softmax,
// straight-through factor p_c / stopgrad(p_c) on the block's output, compute penalty
// penalty * mean(cost_c + E[cost] - stopgrad(E[cost]))), so dx, the four weight gradients, the
// gate's weight and bias gradients and the penalty's value are all compared. The argmax of the
// reference's gate logits must equal tessera's choice (inputs have no ties with probability
// ~1). What is not compared: the hard choice has no gradient on either side (a
// straight-through estimator is not the derivative of the piecewise-constant forward, so finite
// differences cannot check it either; tests/nn/test_attention.cpp checks it against the
// surrogate's finite differences).
#define BOOST_TEST_MODULE torch_attention
#include <algorithm>
#include <boost/test/unit_test.hpp>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "cross_check.hpp"
#include "tessera/nn/attention.hpp"

using namespace tessera;
using namespace tessera::cross_check;
namespace nn = tessera::nn;

BOOST_TEST_GLOBAL_FIXTURE(TorchSetup);

namespace {

// ---- each policy's rule, as documented
// ------------------------------------------------------------- Query i reads key j when sees(i, j,
// window) (window: the block's size for VariableWindow).
template <class W>
struct Rule;
template <>
struct Rule<nn::CausalFull> {
  static bool sees(int64_t i, int64_t j, int64_t) { return j <= i; }
};
template <>
struct Rule<nn::Bidirectional> {
  static bool sees(int64_t, int64_t, int64_t) { return true; }
};
template <int W>
struct Rule<nn::SlidingWindow<W>> {  // the W most recent keys, itself included
  static bool sees(int64_t i, int64_t j, int64_t) { return i - W < j && j <= i; }
};
template <int W, int G>
struct Rule<nn::LocalGlobal<W, G, true>> {  // causal band, plus the first G keys for everyone
  static bool sees(int64_t i, int64_t j, int64_t) { return j <= i && (i - j < W || j < G); }
};
template <int W, int G>
struct Rule<nn::LocalGlobal<W, G, false>> {  // Longformer: symmetric band, global rows and columns
  static bool sees(int64_t i, int64_t j, int64_t) {
    return (i - j < W && j - i < W) || i < G || j < G;
  }
};
template <class S, class Sel, int Block>
struct Rule<nn::VariableWindow<S, Sel, Block>> {  // the causal band of the block's size
  static bool sees(int64_t i, int64_t j, int64_t w) { return j <= i && i - j < w; }
};

// The fraction of full-causal work a causal window of w keys does over T rows (LearnedSelector's
// cost): row i reads min(i + 1, w) keys instead of i + 1.
[[maybe_unused]] double window_cost(int64_t w, int64_t T) {
  double read = 0.0, full = 0.0;
  for (int64_t i = 0; i < T; ++i) {
    read += static_cast<double>(std::min(i + 1, w));
    full += static_cast<double>(i + 1);
  }
  return read / full;
}

// ---- tolerances
// ------------------------------------------------------------------------------------ Float. The
// layer is a chain of sums: the projections over C, the scores over head_dim, the softmax
// normaliser and P v over up to T keys, the output projection over heads * head_dim. Each sum of K
// products computed in another order (blocked BLAS against torch's kernels, an online softmax with
// rescaling against a two-pass one, q scaled before the product against the scores after it)
// differs by about sqrt(K) eps of the sum of |terms| (rounding errors of random sign), and the
// links' errors add: the softmax turns a score error into a relative error of P of the same
// absolute size, and the scores are O(1) here. So the unit is
//   chain = sqrt(C) + sqrt(head_dim) + sqrt(T) + sqrt(heads * head_dim)  (34 and 31 here),
// and the forward's tolerance is 2 chain eps (about 4e-6). The backward walks the chain both
// ways (dO -> dP -> dS -> dq, dk -> RoPE -> projections), so 4 chain eps. Over 100 seeds the
// largest float differences were 14 eps (y) and 37 eps (gradients), at most 0.27 of these.
// The scale-relative term covers elements that are small because terms cancelled (a weight
// gradient summed over rows of random sign, a difference of rotated pairs).
// The learned gate's gradient starts from dL/dg = <dO, O> over a block (32 rows x heads *
// head_dim, 2048 products of random sign, which cancel to ~1/45 of their absolute sum): dO and
// O carry the backward's relative error, which that cancellation amplifies relative to the
// result. 4x the backward's tolerance (largest seen: 96 eps, a fifth of it).
struct Dims {
  int64_t C, heads, hd, T;
  double chain() const {
    return std::sqrt(double(C)) + std::sqrt(double(hd)) + std::sqrt(double(T)) +
           std::sqrt(double(heads * hd));
  }
};
Tolerance forward_tol(const Dims& d) {
  return {2 * d.chain() * kFloatEps, 2 * d.chain() * kFloatEps};
}
Tolerance backward_tol(const Dims& d) {
  return {4 * d.chain() * kFloatEps, 4 * d.chain() * kFloatEps};
}
Tolerance gate_tol(const Dims& d) {
  return {16 * d.chain() * kFloatEps, 16 * d.chain() * kFloatEps};
}
// bf16. Both sides compute in float from the same bf16 numbers and round to bf16 at the same
// points (each projection, RoPE, the attention output, y; and, on the way back, the gradients
// at those points). An intermediate that lands within the float difference of a rounding
// boundary rounds to neighbouring bf16 values on the two sides (one ulp, 2 eps_b relative), and
// that difference propagates through the rest of the chain. So on top of the float tolerance
// and one ulp of the element itself (for_type), the scale-relative term allows a few
// propagated ulps: 4 eps_b x the tensor's scale (largest seen over 100 seeds: 0.39 of the
// total). An accumulator left in bf16 in any of the sums (16 to 200 terms) would be off by
// sqrt(K) to K ulps of the terms and fail.
template <class T>
Tolerance for_attention(Tolerance float_tol) {
  if constexpr (std::is_same_v<T, float>) {
    return float_tol;
  } else {
    const Tolerance t = for_type<T>(float_tol);
    return {t.rtol, t.atol + 4 * kBf16Eps, t.scale};
  }
}

// ---- inputs
// ----------------------------------------------------------------------------------------

template <class T>
void set(nn::Parameter<T>& p, const Input<T>& in) {
  BOOST_REQUIRE(p.value.shape() == in.tensor.shape());
  std::copy_n(in.tensor.data(), in.tensor.numel(), p.value.data());
}

// Content for the heuristic selector: regions of 64 tokens that repeat one symbol, mix five
// symbols, or are noise, so that blocks' signal spans differ in diversity (the selector picks
// short windows for repetitive spans, long ones for varied spans; docs/attention.md).
template <class T>
Input<T> structured(Gen& gen, int64_t B, int64_t S, int64_t C) {
  std::vector<std::vector<double>> vocab(5, std::vector<double>(static_cast<size_t>(C)));
  for (auto& row : vocab)
    for (double& v : row) v = gen.normal();
  std::vector<double> values;
  values.reserve(static_cast<size_t>(B * S * C));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < S; ++t) {
      const int64_t region = (t / 64) % 3;
      const int64_t symbol = region == 0 ? 0 : gen.integer(0, 4);
      for (int64_t c = 0; c < C; ++c)
        values.push_back(region == 2 ? gen.normal() : vocab[size_t(symbol)][size_t(c)]);
    }
  size_t next = 0;
  return make_input<T>({B, S, C}, [&] { return values[next++]; });
}

enum class Content { kNoise, kStructured };

struct Setup {
  std::string label;  // heads / kv heads / rope, for messages
  int64_t B, S, C, heads, kv, block;
  ops::RopeConfig rope;
};

// Two head layouts: 4 heads reading 2 kv heads (C 64, tiles of 24, half-split RoPE), and 3 heads
// sharing 1 kv head (multi-query; C 48, tiles of 64, interleaved partial RoPE with a long
// base). T = 200 is a multiple of neither tile (nor of VariableWindow's 32).
std::vector<Setup> setups() {
  ops::RopeConfig interleaved;
  interleaved.theta = 500000.0f;
  interleaved.rotary_dim = 8;
  interleaved.layout = ops::RopeLayout::kInterleaved;
  return {{"heads 4 kv 2", 2, 200, 64, 4, 2, 24, ops::RopeConfig{}},
          {"heads 3 kv 1 (interleaved partial rope)", 2, 200, 48, 3, 1, 64, interleaved}};
}

torch_ref::RopeSpec spec_of(const ops::RopeConfig& c, int64_t head_dim) {
  BOOST_REQUIRE(c.scaling.kind == ops::RopeScalingKind::kNone);  // the cases here use none
  torch_ref::RopeSpec s;
  s.rotary_dim = c.rotary_dim == -1 ? head_dim : c.rotary_dim;
  s.base = c.theta;
  s.layout = c.layout == ops::RopeLayout::kHalfSplit ? torch_ref::RopeLayout::kHalfSplit
                                                     : torch_ref::RopeLayout::kInterleaved;
  return s;
}

// ---- the check
// -------------------------------------------------------------------------------------

template <class W>
constexpr bool uses_heuristic() {
  if constexpr (W::kAdaptive)
    return std::is_same_v<typename W::SelectorType, nn::HeuristicSelector>;
  else
    return false;
}

template <class T, class W>
void check_attention(const std::string& policy, const Setup& su, Content content) {
  const std::string name = "attention<" + name_of<T>() + ", " + policy + "> " + su.label;
  Gen gen(name);
  const int64_t B = su.B, S = su.S, C = su.C, hd = C / su.heads;
  nn::AttentionOptions options;
  options.block = su.block;
  options.max_seq = S;
  options.rope = su.rope;
  nn::Attention<T, W> attn(C, su.heads, su.kv, Seed{7}, 0, options);

  // Every parameter drawn here, N(0, 1/fan_in) as the layer's own init, not from tessera's RNG.
  const double in_scale = 1.0 / std::sqrt(static_cast<double>(C));
  auto wq = normal<T>(gen, {su.heads * hd, C}, in_scale);
  auto wk = normal<T>(gen, {su.kv * hd, C}, in_scale);
  auto wv = normal<T>(gen, {su.kv * hd, C}, in_scale);
  auto wo = normal<T>(gen, {C, su.heads * hd}, 1.0 / std::sqrt(static_cast<double>(su.heads * hd)));
  set(attn.wq(), wq);
  set(attn.wk(), wk);
  set(attn.wv(), wv);
  set(attn.wo(), wo);
  auto x = content == Content::kNoise ? normal<T>(gen, {B, S, C}) : structured<T>(gen, B, S, C);
  auto dy = normal<T>(gen, {B, S, C});

  constexpr bool kLearned = nn::Attention<T, W>::SelectorState::kLearned;
  std::optional<Input<T>> gate_w, gate_b;
  if constexpr (kLearned) {
    // Logits W m + b with m the mean of 32 N(0, 1) rows (coordinates ~ N(0, 1/32)): W ~ N(0, 1)
    // gives logits of spread ~1.4, so the blocks' choices vary. A penalty well above the
    // default 0.01 so that its gradient is a visible part of the gate's.
    gate_w = normal<T>(gen, {static_cast<int64_t>(W::kSizes.size()), C});
    gate_b = normal<T>(gen, {static_cast<int64_t>(W::kSizes.size())}, 0.5);
    set(attn.selector().weight, *gate_w);
    set(attn.selector().bias, *gate_b);
    attn.selector().penalty = 0.25;
  }

  typename nn::Attention<T, W>::Saved saved;
  const Tensor<T> y = attn.forward(x.tensor, saved);
  const Tensor<T> dx = attn.backward(dy.tensor, saved);

  // The mask, from this file's rule; and the policy's predicate must agree with it.
  torch_ref::Mask mask{std::vector<uint8_t>(static_cast<size_t>(B * S * S)), {B, S, S}};
  int64_t disagreements = 0, allowed = 0;
  int64_t first_i = -1, first_j = -1;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < S; ++i) {
      int64_t window = 0;
      if constexpr (W::kAdaptive) {
        BOOST_REQUIRE(saved.choice.block == W::kBlockSize &&
                      saved.choice.blocks == (S + W::kBlockSize - 1) / W::kBlockSize &&
                      saved.choice.batch == B);
        window = W::kSizes[size_t(
            saved.choice.index[size_t(b * saved.choice.blocks + i / W::kBlockSize)])];
      }
      for (int64_t j = 0; j < S; ++j) {
        const bool sees = Rule<W>::sees(i, j, window);
        mask.allowed[size_t((b * S + i) * S + j)] = sees;
        allowed += sees;
        if (sees != W::allowed(i, j, S, window) && disagreements++ == 0) first_i = i, first_j = j;
      }
    }
  BOOST_TEST(disagreements == 0, name << ": " << W::kName
                                      << "::allowed disagrees with the documented"
                                      << " rule for " << disagreements << " (query, key) pairs,"
                                      << " first (" << first_i << ", " << first_j << ")");
  BOOST_TEST_MESSAGE(name << ": mask allows " << static_cast<double>(allowed) / double(B * S * S)
                          << " of the pairs, work fraction " << saved.stats.work_fraction());

  std::optional<torch_ref::AttentionGate> gate;
  if constexpr (kLearned) {
    torch_ref::AttentionGate g;
    g.weight = gate_w->array;
    g.bias = gate_b->array;
    g.choice = IndexArray{{saved.choice.index.begin(), saved.choice.index.end()},
                          {B, saved.choice.blocks}};
    g.block = W::kBlockSize;
    for (int w : W::kSizes) g.cost.push_back(window_cost(w, S));
    g.penalty = attn.selector().penalty;
    // The costs tessera charged, against this file's formula.
    BOOST_TEST(saved.choice.cost.size() == g.cost.size());
    for (size_t s = 0; s < g.cost.size() && s < saved.choice.cost.size(); ++s)
      BOOST_TEST(saved.choice.cost[s] == g.cost[s], boost::test_tools::tolerance(1e-12));
    gate = g;
  }

  const auto ref =
      torch_ref::attention(x.array, wq.array, wk.array, wv.array, wo.array, su.heads, su.kv,
                           spec_of(su.rope, hd), mask, gate, dy.array, precision_of<T>);
  const Dims dims{C, su.heads, hd, S};
  const Tolerance ftol = for_attention<T>(forward_tol(dims));
  const Tolerance btol = for_attention<T>(backward_tol(dims));
  check_close(name + " y", y, ref.y, ftol);
  check_close(name + " dx", dx, ref.dx, btol);
  check_close(name + " dwq", attn.wq().grad, ref.dwq, btol);
  check_close(name + " dwk", attn.wk().grad, ref.dwk, btol);
  check_close(name + " dwv", attn.wv().grad, ref.dwv, btol);
  check_close(name + " dwo", attn.wo().grad, ref.dwo, btol);

  if constexpr (kLearned) {
    int64_t differ = 0, first = -1;
    for (size_t g = 0; g < saved.choice.index.size(); ++g)
      if (saved.choice.index[g] != ref.gate_argmax.data[g] && differ++ == 0)
        first = static_cast<int64_t>(g);
    BOOST_TEST(differ == 0,
               name << ": LibTorch's gate picks another window than tessera's in " << differ
                    << " query blocks, first block " << first << " (tessera size index "
                    << (first >= 0 ? saved.choice.index[size_t(first)] : -1) << ", LibTorch "
                    << (first >= 0 ? ref.gate_argmax.data[size_t(first)] : -1) << "; seed "
                    << run_seed() << ")");
    std::string used;
    for (int64_t n : saved.stats.window_histogram) {
      if (!used.empty()) used += ' ';
      used += std::to_string(n);
    }
    BOOST_TEST_MESSAGE(name << ": query blocks per size [" << used << "]");
    // The penalty: both in double from the same choice and costs.
    BOOST_TEST(saved.stats.aux_loss == ref.aux_loss, boost::test_tools::tolerance(1e-12));
    const Tolerance gtol = for_attention<T>(gate_tol(dims));
    check_close(name + " dgate.weight", attn.selector().weight.grad, ref.dgate_weight, gtol);
    check_close(name + " dgate.bias", attn.selector().bias.grad, ref.dgate_bias, gtol);
  }
  if constexpr (uses_heuristic<W>()) {
    // The structured content must make the selector use more than one size, or the variable
    // part of the mask went untested.
    int used = 0;
    for (int64_t n : saved.stats.window_histogram) used += n > 0;
    BOOST_TEST(used >= 2, name << ": the heuristic chose a single size for every block");
  }
}

template <class T, class W>
void check_every_setup(const std::string& policy, Content content = Content::kNoise) {
  for (const Setup& su : setups()) check_attention<T, W>(policy, su, content);
}

using Sizes3 = nn::Sizes<16, 48, nn::kFull>;

}  // namespace

// One source, several programs (tests/reference/CMakeLists.txt): each Attention<T, Window>
// instantiation costs 4-8 s of -O3 compile time, so one program holding every policy took one to
// two minutes to build. Each program defines one TESSERA_ATTENTION_PART_* and builds in about
// 20 s.
#if defined(TESSERA_ATTENTION_PART_CAUSAL)
BOOST_AUTO_TEST_SUITE(attention_causal)
BOOST_AUTO_TEST_CASE(causal_full) { check_every_setup<float, nn::CausalFull>("CausalFull"); }
// An odd window that straddles the tiles of 24 and 64 at different offsets.
BOOST_AUTO_TEST_CASE(sliding_window_37) {
  check_every_setup<float, nn::SlidingWindow<37>>("SlidingWindow<37>");
}
BOOST_AUTO_TEST_CASE(local_global) {
  check_every_setup<float, nn::LocalGlobal<19, 5>>("LocalGlobal<19, 5>");
}
BOOST_AUTO_TEST_SUITE_END()

#elif defined(TESSERA_ATTENTION_PART_ENCODER)
BOOST_AUTO_TEST_SUITE(attention_encoder)
BOOST_AUTO_TEST_CASE(bidirectional) {
  check_every_setup<float, nn::Bidirectional>("Bidirectional");
}
// Longformer: a symmetric band (key tiles after the query block too), global rows and columns.
BOOST_AUTO_TEST_CASE(local_global_longformer) {
  check_every_setup<float, nn::LocalGlobal<19, 5, false>>("LocalGlobal<19, 5, false>");
}
BOOST_AUTO_TEST_SUITE_END()

#elif defined(TESSERA_ATTENTION_PART_VARIABLE)
BOOST_AUTO_TEST_SUITE(attention_variable)
BOOST_AUTO_TEST_CASE(forced) {
  check_every_setup<float, nn::VariableWindow<Sizes3, nn::ForcedSelector<1>, 32>>(
      "VariableWindow<16/48/full, Forced<1>, 32>");
}
BOOST_AUTO_TEST_CASE(heuristic) {
  check_every_setup<float, nn::VariableWindow<Sizes3, nn::HeuristicSelector, 32>>(
      "VariableWindow<16/48/full, Heuristic, 32>", Content::kStructured);
}
BOOST_AUTO_TEST_CASE(learned) {
  check_every_setup<float, nn::VariableWindow<Sizes3, nn::LearnedSelector, 32>>(
      "VariableWindow<16/48/full, Learned, 32>");
}
BOOST_AUTO_TEST_SUITE_END()

#elif defined(TESSERA_ATTENTION_PART_BF16)
// bf16 (stored in bf16, computed in float): the plain causal kernel, a window that cuts tiles,
// and the learned gate (whose mean and logits tessera computes in double from bf16 inputs).
BOOST_AUTO_TEST_SUITE(attention_bf16)
BOOST_AUTO_TEST_CASE(causal_full) { check_every_setup<bf16, nn::CausalFull>("CausalFull"); }
BOOST_AUTO_TEST_CASE(sliding_window_37) {
  check_every_setup<bf16, nn::SlidingWindow<37>>("SlidingWindow<37>");
}
BOOST_AUTO_TEST_CASE(variable_window_learned) {
  check_every_setup<bf16, nn::VariableWindow<Sizes3, nn::LearnedSelector, 32>>(
      "VariableWindow<16/48/full, Learned, 32>");
}
BOOST_AUTO_TEST_SUITE_END()

#else
#error \
    "test_torch_attention.cpp: define one of TESSERA_ATTENTION_PART_{CAUSAL,ENCODER,VARIABLE,BF16}"
#endif
