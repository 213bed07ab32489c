// LibTorch cross-checks of the mixture-of-experts layer (nn::MoE<...>::Layer): the routing
// (chosen experts, weights, capacity drops, aux loss), the output, dx, the gate's gradient and
// every expert's three weight gradients, for every router and balance policy, in float and bf16.
//
// What the reference is: torch_ref::moe writes the layer as the definition reads, with no
// dispatch: gate logits, softmax or sigmoid scores, the selection scores (+ the balance bias),
// group-limited selection (a group scores the sum of its two best), a stable descending sort for
// the top k (ties to the lower index, tessera's rule), the weights (renormalised or not), then a
// loop over experts: the tokens routed to expert e (in token order, the first `capacity` of them
// under a capacity limit) go through its SwiGLU FFN and are added back times their weight;
// shared experts are added for every token; the aux loss alpha N sum_i f_i P_i is added to the
// loss. Autograd derives every gradient. tessera's layer dispatches with a counting sort, runs
// each expert once on gathered rows and back-propagates by hand (router.hpp, moe.hpp): the two
// share only the definition.
//
// The routing rule of each policy is stated here (`RuleOf`, from docs/moe.md's table), not read
// from the policy's constants, so a policy whose constants disagree with its documentation fails.
// The choice is discrete: if LibTorch's chosen experts differ from tessera's, the test says so
// (with the gap between the k-th and (k+1)-th selection scores) and compares nothing else, since
// the outputs would then differ by design. Inputs are random floats, so exact ties have
// probability ~0 in float; in bf16 the logits are rounded to 8 bits and do tie, which is why the
// reference orders ties as tessera documents (lower index first).
#define BOOST_TEST_MODULE torch_moe
#include <algorithm>
#include <boost/test/unit_test.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "cross_check.hpp"
#include "tessera/nn/moe.hpp"

using namespace tessera;
using namespace tessera::cross_check;
namespace nn = tessera::nn;

BOOST_TEST_GLOBAL_FIXTURE(TorchSetup);

namespace {

// ---- each router's rule, as documented
// -------------------------------------------------------------
torch_ref::MoESpec rule(torch_ref::RouterScore score, bool renormalize) {
  torch_ref::MoESpec s;
  s.score = score;
  s.renormalize = renormalize;
  return s;
}
template <class Router>
struct RuleOf;
template <>
struct RuleOf<nn::TopKSoftmax> {  // softmax; weights = s, not renormalised
  static torch_ref::MoESpec spec() { return rule(torch_ref::RouterScore::kSoftmax, false); }
};
template <>
struct RuleOf<nn::TopKSoftmaxRenorm> {  // softmax; weights renormalised over the chosen k
  static torch_ref::MoESpec spec() { return rule(torch_ref::RouterScore::kSoftmax, true); }
};
template <>
struct RuleOf<nn::TopKSigmoid> {  // sigmoid; weights renormalised (DeepSeek-V3)
  static torch_ref::MoESpec spec() { return rule(torch_ref::RouterScore::kSigmoid, true); }
};
template <int G, int TG, class Base>
struct RuleOf<nn::GroupLimited<G, TG, Base>> {  // Base's scores and weights, inside TG of G groups
  static torch_ref::MoESpec spec() {
    torch_ref::MoESpec s = RuleOf<Base>::spec();
    s.groups = G;
    s.top_groups = TG;
    return s;
  }
};

// ---- tolerances
// ------------------------------------------------------------------------------------ Float. The
// output is a chain of sums: the logits over d_model, the softmax normaliser over the experts (or a
// sigmoid), the renormalisation over k, each FFN's gate and up projections over d_model, its down
// projection over hidden, and the combination of k + S expert outputs. Sums in another order (BLAS
// on gathered rows against torch's kernels on index_select-ed rows) differ by about sqrt(K) eps of
// the sum of |terms|, and the links' errors add:
//   chain = sqrt(d) + sqrt(experts) + sqrt(d) + sqrt(hidden) + sqrt(k + S)   (about 20 here);
// forward 2 chain eps (2.4e-6), backward (the chain walked both ways, and the gate's
// dL/dw = <dy, expert output> summed over d_model) 4 chain eps. The scale-relative term covers
// elements that are small because terms cancelled.
// The routing weights and the aux loss are short float computations from the same logits up to
// the logits' own difference: 2 chain eps too (the aux loss also averages over the tokens in
// float on tessera's side: tokens eps).
// bf16: both sides compute in float from the same bf16 numbers and round at the same points (the
// logits, each FFN's gate / up / activation / output, y, and the gradients at those points on
// the way back). An intermediate that lands within the float difference of a rounding boundary
// rounds to neighbouring bf16 values on the two sides, one ulp that propagates: on top of the
// float tolerance and one ulp of the element itself (for_type), 4 eps_b x the tensor's scale.
struct Dims {
  int64_t d, hidden, experts, k, shared, tokens;
  double chain() const {
    return 2 * std::sqrt(double(d)) + std::sqrt(double(experts)) + std::sqrt(double(hidden)) +
           std::sqrt(double(k + shared));
  }
};
Tolerance for_moe(Precision p, Tolerance float_tol) {
  if (p == Precision::kFloat32) return float_tol;
  const Tolerance t = for_type<bf16>(float_tol);
  return {t.rtol, t.atol + 4 * kBf16Eps, t.scale};
}
Tolerance forward_tol(Precision p, const Dims& d) {
  return for_moe(p, {2 * d.chain() * kFloatEps, 2 * d.chain() * kFloatEps});
}
Tolerance backward_tol(Precision p, const Dims& d) {
  return for_moe(p, {4 * d.chain() * kFloatEps, 4 * d.chain() * kFloatEps});
}

// ---- inputs
// ----------------------------------------------------------------------------------------

template <class T>
void set(nn::Parameter<T>& p, const Input<T>& in) {
  BOOST_REQUIRE(p.value.shape() == in.tensor.shape());
  std::copy_n(in.tensor.data(), in.tensor.numel(), p.value.data());
}

struct Case {
  std::string label;
  Shape x_shape;  // (..., d_model)
  int64_t hidden;
  double alpha = 0.0;            // the aux-loss coefficient the Balance policy documents (0: none)
  double capacity_factor = 0.0;  // MoEOptions::capacity_factor
  double aux_grad = 1.0;         // dLoss / d aux_loss passed to backward
};

std::string list(const int64_t* a, int64_t n) {
  std::ostringstream s;
  for (int64_t i = 0; i < n; ++i) s << (i ? " " : "") << a[i];
  return s.str();
}

// What the reference needs (the inputs, as arrays) and what tessera computed, as arrays: the
// comparison below is a plain function, so the per-spec template stays small (eleven MoE
// instantiations of one large check function took 50 s to compile).
struct Run {
  std::string name;
  Precision precision;
  int64_t tokens, d, experts, top_k, shared;
  Array x, gate, dy;  // (tokens, d), (experts, d), (tokens, d)
  std::vector<torch_ref::FfnWeights> expert_w, shared_w;
  torch_ref::MoESpec spec;
  // tessera's results
  Array y, dx, dgate, weights;  // weights (tokens, k), float
  std::vector<torch_ref::FfnGrads> expert_g, shared_g;
  std::vector<int64_t> chosen;  // (tokens, k)
  std::vector<int32_t> order;   // the kept assignments (Saved::order)
  nn::MoEStats stats;
};

void compare(const Run& r, const Case& c) {
  const std::string& name = r.name;
  const int64_t tokens = r.tokens, N = r.experts, K = r.top_k;
  const auto ref = torch_ref::moe(r.x, r.gate, r.expert_w, r.shared_w, r.spec, r.dy, r.precision);

  // The choice first: nothing else is comparable if it differs.
  for (int64_t t = 0; t < tokens; ++t) {
    if (std::equal(r.chosen.begin() + t * K, r.chosen.begin() + (t + 1) * K,
                   ref.chosen.data.begin() + t * K))
      continue;
    // The gap between LibTorch's k-th and (k+1)-th selection scores: ~0 means a near-tie that
    // rounding decided differently, not a wrong rule.
    std::vector<float> row(ref.selection.data.begin() + t * N,
                           ref.selection.data.begin() + (t + 1) * N);
    std::sort(row.begin(), row.end(), std::greater<>());
    const double gap = K < N ? double(row[size_t(K - 1)]) - double(row[size_t(K)]) : INFINITY;
    BOOST_ERROR(name << ": LibTorch chose other experts than tessera for token " << t
                     << ": tessera [" << list(r.chosen.data() + t * K, K) << "], LibTorch ["
                     << list(ref.chosen.data.data() + t * K, K) << "] (gap between the " << K
                     << "th and the next selection score " << gap << "; seed " << run_seed()
                     << ")");
    return;
  }
  BOOST_TEST_MESSAGE(name << ": the " << tokens << " tokens' choices agree");

  // Capacity: the assignments tessera kept against the reference's drop rule; the statistics.
  std::vector<int64_t> kept(size_t(tokens * K), 0);
  for (int32_t a : r.order) kept[size_t(a)] = 1;
  int64_t ref_dropped = 0;
  std::vector<int64_t> rows(size_t(N), 0), load(size_t(N), 0);
  for (int64_t a = 0; a < tokens * K; ++a) {
    const auto e = size_t(ref.chosen.data[size_t(a)]);
    ref_dropped += ref.kept.data[size_t(a)] == 0;
    rows[e] += ref.kept.data[size_t(a)];
    ++load[e];
  }
  BOOST_TEST(kept == ref.kept.data, name << ": the kept assignments differ (tessera dropped "
                                         << r.stats.dropped << ", LibTorch " << ref_dropped
                                         << "; seed " << run_seed() << ")");
  BOOST_TEST(r.stats.capacity == r.spec.capacity);
  BOOST_TEST(r.stats.dropped == ref_dropped);
  BOOST_TEST(r.stats.load == load);
  BOOST_TEST(r.stats.processed == rows);
  if (c.capacity_factor > 0) BOOST_TEST(ref_dropped > 0, name << ": the capacity dropped nothing");
  if (r.spec.selection_bias) {
    // The bias must change some token's choice, or the selection-only bias went untested: the
    // same reference without it chooses differently somewhere.
    torch_ref::MoESpec plain = r.spec;
    plain.selection_bias.reset();
    const auto unbiased =
        torch_ref::moe(r.x, r.gate, r.expert_w, r.shared_w, plain, r.dy, r.precision);
    int64_t changed = 0;
    for (int64_t t = 0; t < tokens; ++t)
      changed += !std::equal(ref.chosen.data.begin() + t * K, ref.chosen.data.begin() + (t + 1) * K,
                             unbiased.chosen.data.begin() + t * K);
    BOOST_TEST(changed > 0, name << ": the selection bias changed no token's choice");
    BOOST_TEST_MESSAGE(name << ": the bias changed " << changed << " tokens' choices");
  }

  const Dims dims{r.d, c.hidden, N, K, r.shared, tokens};
  const Tolerance ftol = forward_tol(r.precision, dims), btol = backward_tol(r.precision, dims);
  // The routing weights are float (acc_t) for every T: the float tolerance.
  check_close(name + " routing weights", r.weights, ref.weights,
              forward_tol(Precision::kFloat32, dims));
  if (c.alpha > 0) {
    const double tol = 2 * dims.chain() * kFloatEps + double(tokens) * kFloatEps;
    BOOST_TEST(r.stats.aux_loss == ref.aux_loss, boost::test_tools::tolerance(tol));
    BOOST_TEST(ref.aux_loss > 0.0);
  } else {
    BOOST_TEST(r.stats.aux_loss == 0.0);
  }
  check_close(name + " y", r.y, ref.y, ftol);
  check_close(name + " dx", r.dx, ref.dx, btol);
  check_close(name + " dgate", r.dgate, ref.dgate, btol);
  auto check_ffn = [&](const std::string& what, const torch_ref::FfnGrads& ours,
                       const torch_ref::FfnGrads& theirs, bool ran) {
    // An expert no kept token reached has zero gradients on both sides (and must be exactly 0).
    check_close(what + " dw_gate", ours.dw_gate, theirs.dw_gate, btol, !ran);
    check_close(what + " dw_up", ours.dw_up, theirs.dw_up, btol, !ran);
    check_close(what + " dw_down", ours.dw_down, theirs.dw_down, btol, !ran);
  };
  for (int64_t e = 0; e < N; ++e)
    check_ffn(name + " experts." + std::to_string(e), r.expert_g[size_t(e)], ref.experts[size_t(e)],
              rows[size_t(e)] > 0);
  for (int64_t s = 0; s < r.shared; ++s)
    check_ffn(name + " shared_experts." + std::to_string(s), r.shared_g[size_t(s)],
              ref.shared[size_t(s)], true);
}

// Builds the layer with parameters drawn here (N(0, 1/fan_in), as the layer's own init, but not
// from tessera's RNG), runs forward and backward, and hands both sides to compare().
template <class Spec, class T = float>
void check_moe(const Case& c) {
  using Layer = typename Spec::template Layer<T>;
  constexpr int64_t N = Spec::kExperts, K = Spec::kTopK, S = Spec::kShared;
  Run r;
  r.name = "moe<" + name_of<T>() + ", " + c.label + ">";
  r.precision = precision_of<T>;
  Gen gen(r.name);
  r.d = c.x_shape[c.x_shape.rank() - 1];
  r.tokens = c.x_shape.numel() / r.d;
  r.experts = N;
  r.top_k = K;
  r.shared = S;
  Layer moe(r.d, c.hidden, Seed{3}, 0, nn::MoEOptions{c.capacity_factor});

  const double in_scale = 1.0 / std::sqrt(double(r.d));
  const double hid_scale = 1.0 / std::sqrt(double(c.hidden));
  auto gate = normal<T>(gen, {N, r.d}, in_scale);
  set(moe.router().gate, gate);
  r.gate = gate.array;
  auto draw_ffn = [&](nn::SwiGluFfn<T>& f, std::vector<torch_ref::FfnWeights>& into) {
    auto wg = normal<T>(gen, {c.hidden, r.d}, in_scale);
    auto wu = normal<T>(gen, {c.hidden, r.d}, in_scale);
    auto wd = normal<T>(gen, {r.d, c.hidden}, hid_scale);
    set(f.w_gate, wg);
    set(f.w_up, wu);
    set(f.w_down, wd);
    into.push_back({wg.array, wu.array, wd.array});
  };
  for (int e = 0; e < N; ++e) draw_ffn(moe.expert(e), r.expert_w);
  for (int s = 0; s < S; ++s) draw_ffn(moe.shared_expert(s), r.shared_w);

  r.spec = RuleOf<typename Spec::RouterPolicy>::spec();
  r.spec.top_k = K;
  r.spec.aux_alpha = c.alpha;
  r.spec.aux_grad = c.aux_grad;
  if constexpr (Spec::Balance::kBias) {
    // A bias of the size of the score differences (sigmoid scores spread ~0.2), so that it
    // changes some choices; it is float (acc_t) for every T.
    auto bias = normal<float>(gen, {N}, 0.1);
    std::copy_n(bias.tensor.data(), N, moe.router().expert_bias.data());
    r.spec.selection_bias = bias.array;
  }
  // Capacity, as documented: ceil(cf * tokens * k / experts) rows per expert.
  r.spec.capacity =
      c.capacity_factor > 0
          ? static_cast<int64_t>(std::ceil(c.capacity_factor * double(r.tokens * K) / double(N)))
          : -1;

  auto x = normal<T>(gen, c.x_shape);
  auto dy = normal<T>(gen, c.x_shape);
  typename Layer::Saved saved;
  const Tensor<T> y = moe.forward(x.tensor, saved);
  const Tensor<T> dx = moe.backward(dy.tensor, saved, c.aux_grad);

  // The reference takes rows: (tokens, d).
  r.x = x.array;
  r.dy = dy.array;
  r.y = to_array(y);
  r.dx = to_array(dx);
  r.x.shape = r.dy.shape = r.y.shape = r.dx.shape = {r.tokens, r.d};
  r.dgate = to_array(moe.router().gate.grad);
  r.weights = to_array(saved.route.weights);
  r.chosen.assign(saved.route.chosen.data(), saved.route.chosen.data() + r.tokens * K);
  r.order = saved.order;
  r.stats = saved.stats;
  auto grads = [](nn::SwiGluFfn<T>& f) {
    return torch_ref::FfnGrads{to_array(f.w_gate.grad), to_array(f.w_up.grad),
                               to_array(f.w_down.grad)};
  };
  for (int e = 0; e < N; ++e) r.expert_g.push_back(grads(moe.expert(e)));
  for (int s = 0; s < S; ++s) r.shared_g.push_back(grads(moe.shared_expert(s)));
  compare(r, c);
}

// 74 tokens as (2, 37, d_model): a rank-3 input, a token count that is no multiple of anything.
const Shape kX{2, 37, 28};
constexpr int64_t kHidden = 20;

}  // namespace

BOOST_AUTO_TEST_SUITE(moe)

BOOST_AUTO_TEST_CASE(top_k_softmax) {
  check_moe<nn::MoE<nn::Experts<8>, nn::TopK<2>, nn::TopKSoftmax>>({"TopKSoftmax", kX, kHidden});
}
BOOST_AUTO_TEST_CASE(top_k_softmax_renorm_aux_loss_shared) {
  check_moe<nn::MoE<nn::Experts<8>, nn::TopK<2>, nn::TopKSoftmaxRenorm, nn::AuxLossBalance,
                    nn::SharedExperts<1>>>(
      {"TopKSoftmaxRenorm, AuxLoss 0.01, shared 1", kX, kHidden, 0.01});
}
BOOST_AUTO_TEST_CASE(top_k_sigmoid_bias_shared) {
  check_moe<
      nn::MoE<nn::Experts<8>, nn::TopK<2>, nn::TopKSigmoid, nn::BiasBalance, nn::SharedExperts<1>>>(
      {"TopKSigmoid, Bias, shared 1", kX, kHidden});
}
// Sigmoid scores normalise to p = s / sum(s) in the aux loss; a large alpha and aux_grad 0.5
// make its gradient a large part of the gate's.
BOOST_AUTO_TEST_CASE(top_k_sigmoid_aux_loss) {
  check_moe<nn::MoE<nn::Experts<8>, nn::TopK<2>, nn::TopKSigmoid, nn::AuxLossBalanceOf<0.3>>>(
      {"TopKSigmoid, AuxLoss 0.3, aux_grad 0.5", kX, kHidden, 0.3, 0.0, 0.5});
}
// DeepSeek-V3's layout: sigmoid scores, 4 groups of 2 of which 2 are kept, bias balance, a shared
// expert; top 3 of the 4 experts the kept groups hold.
BOOST_AUTO_TEST_CASE(group_limited_sigmoid_bias_shared) {
  check_moe<nn::MoE<nn::Experts<8>, nn::TopK<3>, nn::GroupLimited<4, 2>, nn::BiasBalance,
                    nn::SharedExperts<1>>>({"GroupLimited<4, 2>, Bias, shared 1", kX, kHidden});
}
BOOST_AUTO_TEST_CASE(group_limited_softmax_aux_loss) {
  check_moe<nn::MoE<nn::Experts<8>, nn::TopK<2>, nn::GroupLimited<4, 2, nn::TopKSoftmax>,
                    nn::AuxLossBalance>>(
      {"GroupLimited<4, 2, TopKSoftmax>, AuxLoss 0.01", kX, kHidden, 0.01});
}
// Capacity 0.8: ceil(0.8 * 74 * 2 / 8) = 15 rows per expert for an average load of 18.5, so
// several experts drop their latest tokens.
BOOST_AUTO_TEST_CASE(capacity_drops) {
  check_moe<nn::MoE<nn::Experts<8>, nn::TopK<2>, nn::TopKSoftmaxRenorm>>(
      {"TopKSoftmaxRenorm, capacity 0.8", kX, kHidden, 0.0, 0.8});
}
// The aux loss counts the load before capacity (f_i), dropped assignments included.
BOOST_AUTO_TEST_CASE(capacity_drops_aux_loss) {
  check_moe<nn::MoE<nn::Experts<8>, nn::TopK<2>, nn::TopKSigmoid, nn::AuxLossBalance,
                    nn::SharedExperts<1>>>(
      {"TopKSigmoid, AuxLoss 0.01, shared 1, capacity 0.8", kX, kHidden, 0.01, 0.8});
}
// Unusual sizes: 5 experts, top 3, two shared experts, odd d_model and hidden.
BOOST_AUTO_TEST_CASE(five_experts_top_3) {
  check_moe<nn::MoE<nn::Experts<5>, nn::TopK<3>, nn::TopKSoftmax, nn::AuxLossBalance,
                    nn::SharedExperts<2>>>(
      {"5 experts top 3, AuxLoss 0.01, shared 2", Shape{3, 13, 19}, 11, 0.01});
}

// bf16 (stored in bf16, computed in float): the DeepSeek-V3 layout, and capacity with the aux loss.
BOOST_AUTO_TEST_CASE(bf16_group_limited_sigmoid_bias_shared) {
  check_moe<nn::MoE<nn::Experts<8>, nn::TopK<3>, nn::GroupLimited<4, 2>, nn::BiasBalance,
                    nn::SharedExperts<1>>,
            bf16>({"GroupLimited<4, 2>, Bias, shared 1", kX, kHidden});
}
BOOST_AUTO_TEST_CASE(bf16_capacity_aux_loss) {
  check_moe<nn::MoE<nn::Experts<8>, nn::TopK<2>, nn::TopKSoftmaxRenorm, nn::AuxLossBalance>, bf16>(
      {"TopKSoftmaxRenorm, AuxLoss 0.01, capacity 0.8", kX, kHidden, 0.01, 0.8});
}

BOOST_AUTO_TEST_SUITE_END()
