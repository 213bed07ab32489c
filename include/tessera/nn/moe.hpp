// tessera/nn/moe.hpp — the mixture-of-experts feed-forward layer, chosen by type:
//
//   using Ffn = nn::MoE<nn::Experts<16>, nn::TopK<2>, nn::GroupLimited<4, 2>, nn::BiasBalance,
//                       nn::SharedExperts<1>>;
//   Ffn::Layer<float> moe(d_model, hidden, Seed{42}, /*subsequence=*/7);   // = MoELayer<float, Ffn>
//
// Why a spec type plus a layer template: a model config names its FFN without naming the number
// type (the precision recipe picks that), exactly as DenseFfn does; the decoder then builds
// `Config::Ffn::Layer<T>`. The five parameters are the ones the R1 design varies in ablations.
//
// What the layer computes, per token x (d_model):
//   y = sum_{s < S} shared_s(x) + sum_{j < k, kept} w_j * expert_{c_j}(x)
// where (c_j, w_j) come from the Router (tessera/nn/router.hpp: scoring, grouping, balancing)
// and every expert (shared or routed) is a SwiGluFfn of the same hidden size.
//
// How dispatch works (the part that makes MoE fast and deterministic):
//   * The tokens*k assignments are grouped by expert with a stable counting sort (count, prefix
//     sum, place in token order), so each expert sees its tokens in increasing token order.
//   * Each expert gathers its rows into one (rows_e, d_model) matrix and runs its FFN once on
//     it: one ops::linear per projection per expert, instead of one small product per token.
//   * Outputs are scattered back, multiplied by the routing weight, in expert order then row
//     order: a fixed summation order, so results do not depend on threads.
//   * Capacity (MoEOptions::capacity_factor > 0): an expert takes at most
//     ceil(capacity_factor * tokens * k / experts) rows; the assignments after that (the later
//     tokens, by the counting sort's order) are dropped: they contribute nothing and get no
//     gradient, and are counted in MoEStats::dropped. The weights of the token's other experts
//     are NOT renormalised (as in GShard / Switch). capacity_factor = 0 means no limit.
//   * MoEStats (in Saved) reports the load per expert, the rows each expert ran, the dropped
//     count, the aux loss, and the fraction of FFN parameters (routed + shared experts; the
//     gate is not counted) that each token actually used, and its nominal value (k+S)/(N+S).
//
// Backward: through each expert on its gathered rows, through the routing weights
// (dL/dw_j = <dy, expert_{c_j}(x)>) into the gate, and through the aux loss, which counts as
// added to the training loss with coefficient aux_grad (default 1).
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/core/rng.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/nn/feed_forward.hpp"
#include "tessera/nn/parameter.hpp"
#include "tessera/nn/router.hpp"
#include "tessera/ops/cast.hpp"

namespace tessera::nn {

template <int N>
struct Experts {
  static_assert(N >= 1, "Experts<N>: a mixture needs at least one routed expert");
  static constexpr int kCount = N;
};

template <int K>
struct TopK {
  static_assert(K >= 1, "TopK<K>: each token must go to at least one expert (K >= 1)");
  static constexpr int kK = K;
};

template <int S>
struct SharedExperts {
  static_assert(S >= 0, "SharedExperts<S>: S must be >= 0");
  static constexpr int kCount = S;
};

struct MoEOptions {
  double capacity_factor = 0.0;  // 0: no capacity limit; > 0: see the file header
};

// What one forward pass reports.
struct MoEStats {
  std::vector<int64_t> load;       // (experts) assignments the router made to each expert
  std::vector<int64_t> processed;  // (experts) rows each expert ran on, after capacity
  int64_t tokens = 0;
  int64_t capacity = -1;  // rows per expert; -1 when unlimited
  int64_t dropped = 0;    // assignments dropped by capacity
  double aux_loss = 0.0;  // the balance loss (0 unless an aux-loss balance)
  double active_fraction = 0.0;          // mean over tokens of experts used / (experts + shared)
  double nominal_active_fraction = 0.0;  // (k + shared) / (experts + shared)

  // max load / mean load: 1 when perfectly balanced.
  double load_imbalance() const {
    if (load.empty()) return 1.0;
    double mx = 0.0, sum = 0.0;
    for (int64_t v : load) {
      mx = std::max(mx, double(v));
      sum += double(v);
    }
    return sum == 0.0 ? 1.0 : mx / (sum / double(load.size()));
  }
};

template <class T, class Spec>
class MoELayer;

template <class Experts_, class TopK_, class Router_, class Balance_ = NoBalance,
          class Shared_ = SharedExperts<0>>
struct MoE {
  static constexpr int kExperts = Experts_::kCount;
  static constexpr int kTopK = TopK_::kK;
  static constexpr int kShared = Shared_::kCount;
  using RouterPolicy = Router_;
  using Balance = Balance_;

  static_assert(kTopK <= kExperts, "MoE: TopK<K> must not exceed Experts<N>");
  static_assert(kExperts % RouterPolicy::kGroups == 0,
                "MoE: GroupLimited<Groups, ...>: Groups must divide Experts<N>");
  static_assert(kTopK <= RouterPolicy::kTopGroups * (kExperts / RouterPolicy::kGroups),
                "MoE: TopK<K> exceeds the experts inside the TopGroups chosen groups "
                "(TopGroups * Experts / Groups); raise TopGroups or lower K");
  static_assert(!(Balance::kAuxLoss && Balance::kBias), "MoE: choose one balance policy");

  template <class T>
  using Layer = MoELayer<T, MoE>;
};

template <class T, class Spec>
class MoELayer {
 public:
  using A = ops::cast_detail::acc_t<T>;
  using RouterT = Router<T, typename Spec::RouterPolicy, typename Spec::Balance>;
  using Expert = SwiGluFfn<T>;
  static constexpr int kExperts = Spec::kExperts;
  static constexpr int kTopK = Spec::kTopK;
  static constexpr int kShared = Spec::kShared;

  struct Saved {
    Shape x_shape;                        // (..., d_model)
    typename RouterT::Saved route;        // holds x as (tokens, d_model)
    std::vector<int64_t> begin;           // (experts + 1) each expert's rows in `order`
    std::vector<int32_t> order;           // (kept) assignment ids t * k + j, grouped by expert
    std::vector<typename Expert::Saved> expert_saved;  // (experts)
    std::vector<Tensor<T>> expert_out;                 // (experts) (rows_e, d_model)
    std::vector<typename Expert::Saved> shared_saved;  // (shared)
    MoEStats stats;
  };

  // Parameters are drawn from stream (seed, subsequence), laid end to end: the gate, the routed
  // experts 0..N-1, then the shared experts.
  MoELayer(int64_t d_model, int64_t hidden, Seed seed, uint64_t subsequence, MoEOptions options = {})
      : router_(d_model, kExperts, kTopK, seed, subsequence, 0),
        d_model_(d_model),
        hidden_(hidden),
        options_(options) {
    TESSERA_CHECK(options.capacity_factor >= 0.0 && std::isfinite(options.capacity_factor),
                  "MoE: capacity_factor = ", options.capacity_factor,
                  " must be finite and >= 0 (0 = no limit)");
    int64_t offset = RouterT::parameter_count(d_model, kExperts);
    const int64_t each = Expert::parameter_count(d_model, hidden);
    experts_.reserve(kExperts);
    for (int e = 0; e < kExperts; ++e, offset += each)
      experts_.emplace_back(d_model, hidden, seed, subsequence, offset);
    shared_.reserve(kShared);
    for (int e = 0; e < kShared; ++e, offset += each)
      shared_.emplace_back(d_model, hidden, seed, subsequence, offset);
  }

  int64_t d_model() const { return d_model_; }
  int64_t hidden() const { return hidden_; }
  const MoEOptions& options() const { return options_; }

  // x (..., d_model) -> y (..., d_model)
  Tensor<T> forward(TensorView<const T, Cpu> x, Saved& saved) const {
    return forward(x, saved, [&](bool shared, int e, TensorView<const T, Cpu> xe) {
      auto& slot = shared ? saved.shared_saved[size_t(e)] : saved.expert_saved[size_t(e)];
      return (shared ? shared_[size_t(e)] : experts_[size_t(e)]).forward(xe, slot);
    });
  }

  // The same with the experts' products done by `run(shared, e, xe)`: (rows_e, d_model) ->
  // (rows_e, d_model) for routed expert e (shared = false) or shared expert e. Why: inference
  // (infer/kv_cache.hpp) multiplies the experts by quantised matrices while the routing, the
  // dispatch and the weighted sum stay these. The saved expert states stay empty unless `run`
  // fills them, so backward() needs the plain forward above.
  template <class RunExpert>
  Tensor<T> forward(TensorView<const T, Cpu> x, Saved& saved, const RunExpert& run) const {
    TESSERA_CHECK(x.rank() >= 1 && x.dim(-1) == d_model_, "MoE::forward: tensor 'x' has shape ",
                  x.shape(), "; expected (..., ", d_model_, ")");
    const int64_t d = d_model_, k = kTopK;
    const int64_t tokens = x.numel() / d;
    saved.x_shape = x.shape();
    {
      const Tensor<T> xc = x.contiguous();
      router_.forward(TensorView<const T, Cpu>(xc.data(), Shape{tokens, d}), saved.route);
    }
    const Tensor<T>& x2 = saved.route.x;  // (tokens, d_model)
    dispatch(saved, tokens);

    Tensor<A> acc = Tensor<A>::zeros(Shape{tokens, d});  // (tokens, d_model)
    saved.expert_saved.resize(kExperts);
    saved.expert_out.clear();  // Tensor is move-only: no assign(n, value)
    saved.expert_out.resize(kExperts);
    for (int e = 0; e < kExperts; ++e) {
      const int64_t b = saved.begin[e], rows = saved.begin[e + 1] - b;
      if (rows == 0) continue;
      Tensor<T> xe = Tensor<T>::empty(Shape{rows, d});  // (rows_e, d_model) gathered
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t t = saved.order[size_t(b + r)] / k;
        std::copy_n(x2.data() + t * d, d, xe.data() + r * d);
      }
      saved.expert_out[e] = run(false, e, TensorView<const T, Cpu>(xe));  // (rows_e, d_model)
      const T* ye = saved.expert_out[e].data();
      for (int64_t r = 0; r < rows; ++r) {
        const int32_t a = saved.order[size_t(b + r)];
        const A w = saved.route.weights.data()[a];
        A* out = acc.data() + (a / k) * d;
        for (int64_t c = 0; c < d; ++c) out[c] += w * load(ye[r * d + c]);
      }
    }
    saved.shared_saved.resize(kShared);
    for (int s = 0; s < kShared; ++s) {
      const Tensor<T> ys = run(true, s, TensorView<const T, Cpu>(x2));  // (tokens, d_model)
      for (int64_t i = 0; i < tokens * d; ++i) acc.data()[i] += load(ys.data()[i]);
    }
    Tensor<T> y = Tensor<T>::empty(x.shape());  // (..., d_model)
    for (int64_t i = 0; i < tokens * d; ++i) y.data()[i] = store(acc.data()[i]);
    return y;
  }

  // dy (..., d_model) -> dx (..., d_model). Accumulates into every parameter's grad. aux_grad is
  // the loss gradient with respect to stats.aux_loss (1: the aux loss is added to the loss).
  Tensor<T> backward(TensorView<const T, Cpu> dy, const Saved& saved, double aux_grad = 1.0) {
    check_shape("MoE::backward", "dy", dy.shape(), saved.x_shape);
    const int64_t d = d_model_, k = kTopK;
    const int64_t tokens = saved.route.x.dim(0);
    const Tensor<T> dyc = dy.contiguous();  // (tokens, d_model) in memory
    const T* g = dyc.data();
    Tensor<A> dx = Tensor<A>::zeros(Shape{tokens, d});  // (tokens, d_model)
    Tensor<A> dw = Tensor<A>::zeros(Shape{tokens, k});  // (tokens, k) dL/dweights; 0 if dropped

    for (int e = 0; e < kExperts; ++e) {
      const int64_t b = saved.begin[e], rows = saved.begin[e + 1] - b;
      if (rows == 0) continue;
      const T* ye = saved.expert_out[e].data();
      Tensor<T> dye = Tensor<T>::empty(Shape{rows, d});  // (rows_e, d_model)
      for (int64_t r = 0; r < rows; ++r) {
        const int32_t a = saved.order[size_t(b + r)];
        const int64_t t = a / k;
        const A w = saved.route.weights.data()[a];
        A dot = 0;
        for (int64_t c = 0; c < d; ++c) {
          const A gv = load(g[t * d + c]);
          dye.data()[r * d + c] = store(w * gv);
          dot += gv * load(ye[r * d + c]);
        }
        dw.data()[a] = dot;
      }
      const Tensor<T> dxe = experts_[e].backward(dye, saved.expert_saved[e]);  // (rows_e, d_model)
      for (int64_t r = 0; r < rows; ++r) {
        A* out = dx.data() + (saved.order[size_t(b + r)] / k) * d;
        for (int64_t c = 0; c < d; ++c) out[c] += load(dxe.data()[r * d + c]);
      }
    }
    const TensorView<const T, Cpu> dy2(g, Shape{tokens, d});
    for (int s = 0; s < kShared; ++s) {
      const Tensor<T> dxs = shared_[s].backward(dy2, saved.shared_saved[s]);
      for (int64_t i = 0; i < tokens * d; ++i) dx.data()[i] += load(dxs.data()[i]);
    }
    const Tensor<T> dxr = router_.backward(dw, saved.route, aux_grad);  // (tokens, d_model)
    for (int64_t i = 0; i < tokens * d; ++i) dx.data()[i] += load(dxr.data()[i]);

    Tensor<T> out = Tensor<T>::empty(saved.x_shape);
    for (int64_t i = 0; i < tokens * d; ++i) out.data()[i] = store(dx.data()[i]);
    return out;
  }

  // Aux-loss-free balancing after a step (only with a bias balance): nudges the selection bias
  // against the load reported in `stats`.
  void update_bias(const MoEStats& stats)
    requires Spec::Balance::kBias
  {
    router_.update_bias(stats.load);
  }

  // Names: "router.gate", "experts.<e>.w_gate|w_up|w_down", "shared_experts.<s>.w_...".
  template <class F>
  void visit_parameters(F&& f) {
    router_.visit_parameters([&](std::string_view name, Parameter<T>& p) {
      f(std::string_view("router." + std::string(name)), p);
    });
    visit_experts("experts.", experts_, f);
    visit_experts("shared_experts.", shared_, f);
  }

  // Non-gradient state: "router.expert_bias" under a bias balance.
  template <class F>
  void visit_buffers(F&& f) {
    router_.visit_buffers([&](std::string_view name, auto& buffer) {
      f(std::string_view("router." + std::string(name)), buffer);
    });
  }

  RouterT& router() { return router_; }
  const RouterT& router() const { return router_; }
  Expert& expert(int e) { return experts_.at(size_t(e)); }
  const Expert& expert(int e) const { return experts_.at(size_t(e)); }
  Expert& shared_expert(int s) { return shared_.at(size_t(s)); }
  const Expert& shared_expert(int s) const { return shared_.at(size_t(s)); }

 private:
  static A load(T v) { return ops::cast_detail::load<A>(v); }
  static T store(A v) { return ops::cast_detail::store<T>(v); }

  template <class F>
  static void visit_experts(const char* prefix, std::vector<Expert>& list, F& f) {
    for (size_t e = 0; e < list.size(); ++e) {
      const std::string base = prefix + std::to_string(e) + ".";
      list[e].visit_parameters([&](std::string_view name, Parameter<T>& p) {
        f(std::string_view(base + std::string(name)), p);
      });
    }
  }

  // Stable counting sort of the tokens * k assignments by expert, then the capacity cut.
  void dispatch(Saved& saved, int64_t tokens) const {
    const int64_t n = kExperts, k = kTopK;
    const int32_t* chosen = saved.route.chosen.data();
    MoEStats& st = saved.stats;
    st = MoEStats{};
    st.tokens = tokens;
    st.load = saved.route.load;
    st.aux_loss = saved.route.aux_loss;
    st.capacity = options_.capacity_factor > 0.0
                      ? static_cast<int64_t>(std::ceil(options_.capacity_factor * double(tokens) *
                                                       double(k) / double(n)))
                      : -1;
    std::vector<int64_t> start(size_t(n + 1), 0);  // counting sort: where each expert starts
    for (int64_t e = 0; e < n; ++e) start[size_t(e + 1)] = start[size_t(e)] + st.load[size_t(e)];
    std::vector<int32_t> sorted(size_t(tokens * k));
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (int64_t a = 0; a < tokens * k; ++a) sorted[size_t(next[size_t(chosen[a])]++)] = int32_t(a);

    saved.begin.assign(size_t(n + 1), 0);
    saved.order.clear();
    st.processed.assign(size_t(n), 0);
    for (int64_t e = 0; e < n; ++e) {
      int64_t rows = st.load[size_t(e)];
      if (st.capacity >= 0 && rows > st.capacity) {
        st.dropped += rows - st.capacity;
        rows = st.capacity;
      }
      st.processed[size_t(e)] = rows;
      saved.order.insert(saved.order.end(), sorted.begin() + start[size_t(e)],
                         sorted.begin() + start[size_t(e)] + rows);
      saved.begin[size_t(e + 1)] = saved.begin[size_t(e)] + rows;
    }
    const double total = double(kExperts + kShared);
    st.nominal_active_fraction = double(kTopK + kShared) / total;
    st.active_fraction =
        tokens == 0 ? 0.0
                    : (double(saved.order.size()) / double(tokens) + double(kShared)) / total;
  }

  RouterT router_;
  std::vector<Expert> experts_;  // (experts) routed
  std::vector<Expert> shared_;   // (shared) every token passes through these
  int64_t d_model_;
  int64_t hidden_;
  MoEOptions options_;
};

}  // namespace tessera::nn
