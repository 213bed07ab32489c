// tessera/nn/router.hpp — mixture-of-experts routing: which experts each token goes to, with
// what weight, and how the load is kept balanced.
//
// Why routing is its own class: the MoE layer (tessera/nn/moe.hpp) only needs, per token, the
// chosen experts and their weights, and gives back the gradient of those weights. Everything
// about scoring, grouping and balancing lives here, chosen by two policies:
//
//   Router policy (how experts are scored and chosen)
//     TopKSoftmax        s = softmax(logits); the k largest s; weight = s (not renormalised,
//                        as Switch / GShard / Mixtral-before-renorm do).
//     TopKSoftmaxRenorm  the same with the weights renormalised over the chosen k.
//     TopKSigmoid        s = sigmoid(logits); the k largest; weights = s / sum of the chosen s
//                        (DeepSeek-V3).
//     GroupLimited<G, TG, Base = TopKSigmoid>
//                        hierarchical (DeepSeek-V3 "node-limited" / R1 "hierarchical MoE"):
//                        the N experts are split into G consecutive groups of N/G; a group's
//                        score is the sum of its two highest selection scores (its one score
//                        when a group holds one expert), as DeepSeek-V3's reference code does;
//                        each token keeps its TG best groups and takes its top k experts inside
//                        them. Scores and weights follow Base.
//   Balance policy (how the load is kept even)
//     NoBalance
//     AuxLossBalanceOf<alpha> (AuxLossBalance = alpha 0.01): the Switch / GShard auxiliary loss
//                        L_aux = alpha * N * sum_i f_i * P_i, f_i = (assignments to i)/(tokens*k),
//                        P_i = mean over tokens of p_i, where p = s for softmax scores and
//                        p = s / sum(s) for sigmoid scores (DeepSeek-V3's normalisation). f is a
//                        count and carries no gradient; P does, into the gate.
//     BiasBalanceOf<gamma> (BiasBalance = gamma 0.001): DeepSeek-V3's auxiliary-loss-free
//                        method. A per-expert bias b is added to the scores for SELECTION only
//                        (top groups and top k use s + b; the weights use s). After a step the
//                        caller runs update_bias(load): b_i += gamma * sign(mean_load - load_i).
//                        b is not a gradient parameter; it is visited by visit_buffers so that
//                        checkpoints keep it.
//
// Determinism: the choice is made by ops::topk, which orders ties by the lower index, so the
// routing never depends on thread count or sort algorithm. The choice itself is discrete and has
// no gradient; the gradient reaches the gate through the chosen weights and the aux loss.
//
// Arithmetic: scores, weights and the aux loss are computed in double for double and in float
// otherwise (also for bf16 layers, whose logits are widened once).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <string_view>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/core/rng.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/nn/feed_forward.hpp"  // detail::init_normal, detail::accumulate
#include "tessera/nn/parameter.hpp"
#include "tessera/ops/cast.hpp"
#include "tessera/ops/matmul.hpp"
#include "tessera/ops/topk.hpp"

namespace tessera::nn {

// ---- router policies -----------------------------------------------------------------------

enum class RouterScore { kSoftmax, kSigmoid };

struct TopKSoftmax {
  static constexpr RouterScore kScore = RouterScore::kSoftmax;
  static constexpr bool kRenormalize = false;
  static constexpr bool kGroupLimited = false;
  static constexpr int kGroups = 1;
  static constexpr int kTopGroups = 1;
};

struct TopKSoftmaxRenorm : TopKSoftmax {
  static constexpr bool kRenormalize = true;
};

struct TopKSigmoid {
  static constexpr RouterScore kScore = RouterScore::kSigmoid;
  static constexpr bool kRenormalize = true;
  static constexpr bool kGroupLimited = false;
  static constexpr int kGroups = 1;
  static constexpr int kTopGroups = 1;
};

template <int Groups, int TopGroups, class Base = TopKSigmoid>
struct GroupLimited : Base {
  static_assert(Groups >= 1, "GroupLimited<Groups, TopGroups>: Groups must be >= 1");
  static_assert(1 <= TopGroups && TopGroups <= Groups,
                "GroupLimited<Groups, TopGroups>: TopGroups must be in [1, Groups]");
  static constexpr bool kGroupLimited = true;
  static constexpr int kGroups = Groups;
  static constexpr int kTopGroups = TopGroups;
};

// ---- balance policies ----------------------------------------------------------------------

struct NoBalance {
  static constexpr bool kAuxLoss = false;
  static constexpr bool kBias = false;
};

template <double Alpha>
struct AuxLossBalanceOf {
  static_assert(Alpha >= 0, "AuxLossBalanceOf<alpha>: alpha must be >= 0");
  static constexpr bool kAuxLoss = true;
  static constexpr bool kBias = false;
  static constexpr double kAlpha = Alpha;
};
using AuxLossBalance = AuxLossBalanceOf<0.01>;

template <double Gamma>
struct BiasBalanceOf {
  static_assert(Gamma > 0, "BiasBalanceOf<gamma>: gamma must be > 0");
  static constexpr bool kAuxLoss = false;
  static constexpr bool kBias = true;
  static constexpr double kGamma = Gamma;
};
using BiasBalance = BiasBalanceOf<0.001>;

// ---- the router ----------------------------------------------------------------------------

namespace router_detail {
template <class A>
A sigmoid(A x) {  // exp() only of a non-positive argument: no overflow
  if (x >= 0) return A(1) / (A(1) + std::exp(-x));
  const A e = std::exp(x);
  return e / (A(1) + e);
}
}  // namespace router_detail

// Routes tokens (rows of x) to `top_k` of `experts` experts. Owns the gate (experts, d_model)
// and, under a bias balance, the selection bias (experts).
template <class T, class Policy, class Balance>
class Router {
 public:
  using A = ops::cast_detail::acc_t<T>;

  struct Saved {
    Tensor<T> x;              // (tokens, d_model) the router's input
    Tensor<A> scores;         // (tokens, experts) s = softmax or sigmoid of the logits
    Tensor<int32_t> chosen;   // (tokens, top_k) experts, best selection score first
    Tensor<A> weights;        // (tokens, top_k) the chosen experts' weights
    std::vector<int64_t> load;  // (experts) assignments per expert
    double aux_loss = 0.0;      // alpha * N * sum f_i P_i under an aux-loss balance, else 0
  };

  Router(int64_t d_model, int64_t experts, int64_t top_k, Seed seed, uint64_t subsequence,
         int64_t first_index = 0)
      : d_model_(d_model), experts_(experts), top_k_(top_k) {
    TESSERA_CHECK(d_model >= 1, "Router: d_model = ", d_model, " must be >= 1");
    TESSERA_CHECK(1 <= top_k && top_k <= experts, "Router: top_k = ", top_k,
                  " must be in [1, experts = ", experts, "]");
    TESSERA_CHECK(experts % Policy::kGroups == 0, "Router: ", experts,
                  " experts do not split into ", Policy::kGroups, " equal groups");
    TESSERA_CHECK(top_k <= Policy::kTopGroups * (experts / Policy::kGroups), "Router: top_k = ",
                  top_k, " exceeds the ", Policy::kTopGroups * (experts / Policy::kGroups),
                  " experts inside the ", Policy::kTopGroups, " chosen groups");
    gate = detail::make_parameter<T>(Shape{experts, d_model});
    detail::init_normal(gate.value, seed, subsequence, first_index,
                        1.0 / std::sqrt(double(d_model)));
    if constexpr (Balance::kBias) expert_bias = Tensor<A>::zeros(Shape{experts});
  }

  static constexpr int64_t parameter_count(int64_t d_model, int64_t experts) {
    return d_model * experts;
  }

  int64_t experts() const { return experts_; }
  int64_t top_k() const { return top_k_; }

  // x (tokens, d_model): fills saved with the scores, the choice, the weights, the load and
  // the aux loss.
  void forward(TensorView<const T, Cpu> x, Saved& saved) const {
    check_rank("Router::forward", "x", x.shape(), 2);
    TESSERA_CHECK(x.dim(1) == d_model_, "Router::forward: tensor 'x' has shape ", x.shape(),
                  "; expected (tokens, ", d_model_, ")");
    const int64_t tokens = x.dim(0), n = experts_, k = top_k_;
    saved.x = x.contiguous();
    saved.scores = Tensor<A>::empty(Shape{tokens, n});
    saved.chosen = Tensor<int32_t>::empty(Shape{tokens, k});
    saved.weights = Tensor<A>::empty(Shape{tokens, k});
    saved.load.assign(static_cast<size_t>(n), 0);
    saved.aux_loss = 0.0;
    if (tokens == 0) return;

    const Tensor<T> logits = ops::linear<T>(saved.x, gate.value);  // (tokens, experts)
    A* s = saved.scores.data();
    for (int64_t t = 0; t < tokens; ++t) {
      const T* z = logits.data() + t * n;
      A* st = s + t * n;
      if constexpr (Policy::kScore == RouterScore::kSoftmax) {
        A mx = -std::numeric_limits<A>::infinity();
        for (int64_t i = 0; i < n; ++i) mx = std::max(mx, load(z[i]));
        A sum = 0;
        for (int64_t i = 0; i < n; ++i) sum += (st[i] = std::exp(load(z[i]) - mx));
        for (int64_t i = 0; i < n; ++i) st[i] /= sum;
      } else {
        for (int64_t i = 0; i < n; ++i) st[i] = router_detail::sigmoid(load(z[i]));
      }
    }

    // Selection scores q = s (+ bias). Outside the chosen groups q becomes -inf.
    Tensor<A> q = saved.scores.clone();  // (tokens, experts)
    if constexpr (Balance::kBias) {
      for (int64_t t = 0; t < tokens; ++t)
        for (int64_t i = 0; i < n; ++i) q.data()[t * n + i] += expert_bias.data()[i];
    }
    if constexpr (Policy::kGroupLimited) mask_to_top_groups(q);
    const ops::TopK<A> top = ops::topk<A>(q, k);  // (tokens, k), ties to the lower index
    std::copy_n(top.indices.data(), tokens * k, saved.chosen.data());

    for (int64_t t = 0; t < tokens; ++t) {
      const int32_t* c = saved.chosen.data() + t * k;
      A* w = saved.weights.data() + t * k;
      A sum = 0;
      for (int64_t j = 0; j < k; ++j) sum += (w[j] = s[t * n + c[j]]);
      if constexpr (Policy::kRenormalize)
        for (int64_t j = 0; j < k; ++j) w[j] /= sum;
      for (int64_t j = 0; j < k; ++j) ++saved.load[static_cast<size_t>(c[j])];
    }

    if constexpr (Balance::kAuxLoss) {
      const std::vector<A> p_mean = mean_probabilities(saved.scores);
      double l = 0.0;
      for (int64_t i = 0; i < n; ++i)
        l += double(saved.load[size_t(i)]) / double(tokens * k) * double(p_mean[size_t(i)]);
      saved.aux_loss = Balance::kAlpha * double(n) * l;
    }
  }

  // dweights (tokens, top_k): the loss gradient with respect to saved.weights. aux_grad: the
  // gradient of the loss with respect to saved.aux_loss (1 when the aux loss is simply added to
  // the training loss). Accumulates into gate.grad and returns dx (tokens, d_model).
  Tensor<T> backward(TensorView<const A, Cpu> dweights, const Saved& saved, double aux_grad = 1.0) {
    const int64_t tokens = saved.x.dim(0), n = experts_, k = top_k_;
    check_shape("Router::backward", "dweights", dweights.shape(), Shape{tokens, k});
    if (tokens == 0) return Tensor<T>::zeros(Shape{0, d_model_});
    const Tensor<A> dwc = dweights.contiguous();
    const A* s = saved.scores.data();
    Tensor<A> ds = Tensor<A>::zeros(Shape{tokens, n});  // (tokens, experts) dL/ds

    // Through the weights: w_j = s_cj / S (S = sum of the chosen s) when renormalised, so
    // dL/ds_cj = (dw_j - sum_l dw_l w_l) / S; else dL/ds_cj = dw_j.
    for (int64_t t = 0; t < tokens; ++t) {
      const int32_t* c = saved.chosen.data() + t * k;
      const A* dw = dwc.data() + t * k;
      const A* w = saved.weights.data() + t * k;
      A* dst = ds.data() + t * n;
      if constexpr (Policy::kRenormalize) {
        A sum = 0, dot = 0;
        for (int64_t j = 0; j < k; ++j) {
          sum += s[t * n + c[j]];
          dot += dw[j] * w[j];
        }
        for (int64_t j = 0; j < k; ++j) dst[c[j]] += (dw[j] - dot) / sum;
      } else {
        for (int64_t j = 0; j < k; ++j) dst[c[j]] += dw[j];
      }
    }

    // Through the aux loss: dL_aux/dp_ti = aux_grad * alpha * N * f_i / tokens.
    if constexpr (Balance::kAuxLoss) {
      std::vector<A> coef(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i)
        coef[size_t(i)] = static_cast<A>(aux_grad * Balance::kAlpha * double(n) *
                                         double(saved.load[size_t(i)]) / double(tokens * k) /
                                         double(tokens));
      for (int64_t t = 0; t < tokens; ++t) {
        A* dst = ds.data() + t * n;
        const A* st = s + t * n;
        if constexpr (Policy::kScore == RouterScore::kSoftmax) {
          for (int64_t i = 0; i < n; ++i) dst[i] += coef[size_t(i)];  // p = s
        } else {
          // p = s / sum(s): dL/ds_i = (dL/dp_i - sum_j dL/dp_j p_j) / sum(s)
          A sum = 0, dot = 0;
          for (int64_t i = 0; i < n; ++i) sum += st[i];
          for (int64_t i = 0; i < n; ++i) dot += coef[size_t(i)] * st[i] / sum;
          for (int64_t i = 0; i < n; ++i) dst[i] += (coef[size_t(i)] - dot) / sum;
        }
      }
    }

    // Through the score function to the logits.
    Tensor<T> dz = Tensor<T>::empty(Shape{tokens, n});  // (tokens, experts)
    for (int64_t t = 0; t < tokens; ++t) {
      const A* st = s + t * n;
      const A* d = ds.data() + t * n;
      T* out = dz.data() + t * n;
      if constexpr (Policy::kScore == RouterScore::kSoftmax) {
        A dot = 0;
        for (int64_t i = 0; i < n; ++i) dot += d[i] * st[i];
        for (int64_t i = 0; i < n; ++i) out[i] = store(st[i] * (d[i] - dot));
      } else {
        for (int64_t i = 0; i < n; ++i) out[i] = store(d[i] * st[i] * (A(1) - st[i]));
      }
    }
    auto g = ops::linear_backward<T>(dz, saved.x, gate.value, false);
    detail::accumulate(gate.grad, g.dweight, "gate.grad");
    return std::move(g.dx);
  }

  // Aux-loss-free balancing, one step: b_i += gamma * sign(mean_load - load_i) (no change for
  // an expert exactly at the mean). `load` is Saved::load (or the load summed over the
  // micro-batches of one step).
  void update_bias(std::span<const int64_t> load, double gamma = Balance::kGamma)
    requires Balance::kBias
  {
    TESSERA_CHECK(static_cast<int64_t>(load.size()) == experts_, "Router::update_bias: 'load' has ",
                  load.size(), " entries; expected one per expert (", experts_, ")");
    double mean = 0.0;
    for (int64_t v : load) mean += double(v);
    mean /= double(experts_);
    for (int64_t i = 0; i < experts_; ++i) {
      const double err = mean - double(load[size_t(i)]);
      const double step = err > 0 ? gamma : err < 0 ? -gamma : 0.0;
      expert_bias.data()[i] = static_cast<A>(double(expert_bias.data()[i]) + step);
    }
  }

  template <class F>
  void visit_parameters(F&& f) {
    f(std::string_view("gate"), gate);
  }

  // Non-gradient state a checkpoint must keep: f(name, Tensor&).
  template <class F>
  void visit_buffers(F&& f) {
    if constexpr (Balance::kBias) f(std::string_view("expert_bias"), expert_bias);
  }

  Parameter<T> gate;      // (experts, d_model)
  Tensor<A> expert_bias;  // (experts) selection bias; empty unless Balance::kBias

 private:
  static A load(T v) { return ops::cast_detail::load<A>(v); }
  static T store(A v) { return ops::cast_detail::store<T>(v); }

  // P_i: mean over tokens of p_ti (p = s, or s normalised to sum 1 for sigmoid scores).
  std::vector<A> mean_probabilities(const Tensor<A>& scores) const {
    const int64_t tokens = scores.dim(0), n = experts_;
    std::vector<A> p(static_cast<size_t>(n), A(0));
    for (int64_t t = 0; t < tokens; ++t) {
      const A* st = scores.data() + t * n;
      A norm = 1;
      if constexpr (Policy::kScore == RouterScore::kSigmoid) {
        norm = 0;
        for (int64_t i = 0; i < n; ++i) norm += st[i];
      }
      for (int64_t i = 0; i < n; ++i) p[size_t(i)] += st[i] / norm;
    }
    for (auto& v : p) v /= A(tokens);
    return p;
  }

  // Keeps each token's TopGroups best groups and sets q to -inf elsewhere. A group's score is
  // the sum of its two highest q (its only q for one-expert groups).
  void mask_to_top_groups(Tensor<A>& q) const {
    const int64_t tokens = q.dim(0), n = experts_;
    const int64_t groups = Policy::kGroups, per = n / groups;
    Tensor<A> gscore = Tensor<A>::empty(Shape{tokens, groups});  // (tokens, groups)
    for (int64_t t = 0; t < tokens; ++t) {
      for (int64_t g = 0; g < groups; ++g) {
        const A* qg = q.data() + t * n + g * per;
        A best = -std::numeric_limits<A>::infinity(), second = best;
        for (int64_t i = 0; i < per; ++i) {
          if (qg[i] > best) {
            second = best;
            best = qg[i];
          } else if (qg[i] > second) {
            second = qg[i];
          }
        }
        gscore.data()[t * groups + g] = per == 1 ? best : best + second;
      }
    }
    const ops::TopK<A> top = ops::topk<A>(gscore, Policy::kTopGroups);  // (tokens, TopGroups)
    std::vector<char> keep(static_cast<size_t>(groups));
    for (int64_t t = 0; t < tokens; ++t) {
      std::fill(keep.begin(), keep.end(), char(0));
      for (int64_t j = 0; j < Policy::kTopGroups; ++j)
        keep[size_t(top.indices.data()[t * Policy::kTopGroups + j])] = 1;
      for (int64_t i = 0; i < n; ++i)
        if (!keep[size_t(i / per)]) q.data()[t * n + i] = -std::numeric_limits<A>::infinity();
    }
  }

  int64_t d_model_;
  int64_t experts_;
  int64_t top_k_;
};

}  // namespace tessera::nn
