// tests/nn/moe_reference.hpp — the per-token MoE reference shared by test_moe and
// test_moe_gradients: loop over tokens, compute the logits, scores, group choice and expert
// choice by full sorts, then each chosen expert's SwiGLU FFN directly in loops (no dispatch, no
// counting sort, no ops). It also reports the smallest winning margin of every routing choice,
// so finite-difference tests can require inputs away from ties.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <set>
#include <string>
#include <vector>

#include <boost/test/unit_test.hpp>

#include "../ops/finite_difference.hpp"
#include "tessera/nn/moe.hpp"

namespace moe_test {

namespace ts = tessera;
namespace nn = tessera::nn;
using ts::Shape;
using ts::Tensor;
using ts::TensorView;

// One SwiGLU FFN applied to one token, in plain loops.
inline void ffn_row(const nn::SwiGluFfn<double>& f, const double* x, double scale, double* y) {
  const int64_t d = f.d_model(), h = f.hidden();
  for (int64_t j = 0; j < h; ++j) {
    double g = 0, u = 0;
    for (int64_t c = 0; c < d; ++c) {
      g += f.w_gate.value(j, c) * x[c];
      u += f.w_up.value(j, c) * x[c];
    }
    const double a = g / (1.0 + std::exp(-g)) * u;
    for (int64_t c = 0; c < d; ++c) y[c] += scale * f.w_down.value(c, j) * a;
  }
}

struct Reference {
  Tensor<double> y;
  std::vector<std::vector<int>> chosen;  // per token, best first
  std::vector<std::set<int>> groups;     // per token, the groups kept (GroupLimited)
  double aux_loss = 0;
  double min_margin = std::numeric_limits<double>::infinity();  // smallest winning gap
  int64_t dropped = 0;
};

// Indices of v sorted by value descending, ties to the lower index.
inline std::vector<int> ranked(const std::vector<double>& v) {
  std::vector<int> idx(v.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return v[size_t(a)] > v[size_t(b)]; });
  return idx;
}

template <class Spec>
Reference reference(const nn::MoELayer<double, Spec>& m, const Tensor<double>& x) {
  using P = typename Spec::RouterPolicy;
  using B = typename Spec::Balance;
  const int n = Spec::kExperts, k = Spec::kTopK;
  const int64_t d = m.d_model(), tokens = x.numel() / d;
  Reference r;
  r.y = Tensor<double>::zeros(x.shape());
  std::vector<double> load(static_cast<size_t>(n), 0.0), pmean(static_cast<size_t>(n), 0.0);
  std::vector<std::vector<double>> weights(static_cast<size_t>(tokens));
  r.chosen.resize(size_t(tokens));
  r.groups.resize(size_t(tokens));
  for (int64_t t = 0; t < tokens; ++t) {
    const double* xt = x.data() + t * d;
    std::vector<double> s(static_cast<size_t>(n)), q(static_cast<size_t>(n));
    for (int i = 0; i < n; ++i) {
      double z = 0;
      for (int64_t c = 0; c < d; ++c) z += m.router().gate.value(i, c) * xt[c];
      s[size_t(i)] = z;
    }
    if constexpr (P::kScore == nn::RouterScore::kSoftmax) {
      const double mx = *std::max_element(s.begin(), s.end());
      double sum = 0;
      for (auto& v : s) sum += (v = std::exp(v - mx));
      for (auto& v : s) v /= sum;
    } else {
      for (auto& v : s) v = 1.0 / (1.0 + std::exp(-v));
    }
    double ssum = std::accumulate(s.begin(), s.end(), 0.0);
    for (int i = 0; i < n; ++i) {
      q[size_t(i)] = s[size_t(i)];
      if constexpr (B::kBias) q[size_t(i)] += m.router().expert_bias.data()[i];
      pmean[size_t(i)] += (P::kScore == nn::RouterScore::kSoftmax ? s[size_t(i)] : s[size_t(i)] / ssum) / double(tokens);
    }
    std::vector<int> allowed;
    if constexpr (P::kGroupLimited) {
      const int per = n / P::kGroups;
      std::vector<double> gs(static_cast<size_t>(P::kGroups));
      for (int g = 0; g < P::kGroups; ++g) {
        std::vector<double> in(q.begin() + g * per, q.begin() + (g + 1) * per);
        std::sort(in.rbegin(), in.rend());
        gs[size_t(g)] = in[0] + (per > 1 ? in[1] : 0.0);
      }
      const auto order = ranked(gs);
      if (P::kTopGroups < P::kGroups)
        r.min_margin = std::min(r.min_margin, gs[size_t(order[P::kTopGroups - 1])] -
                                                  gs[size_t(order[P::kTopGroups])]);
      for (int j = 0; j < P::kTopGroups; ++j) r.groups[size_t(t)].insert(order[size_t(j)]);
      for (int i = 0; i < n; ++i)
        if (r.groups[size_t(t)].count(i / per)) allowed.push_back(i);
    } else {
      allowed.resize(static_cast<size_t>(n));
      std::iota(allowed.begin(), allowed.end(), 0);
    }
    std::vector<double> qa;
    for (int i : allowed) qa.push_back(q[size_t(i)]);
    const auto order = ranked(qa);
    if (int(allowed.size()) > k)
      r.min_margin = std::min(r.min_margin, qa[size_t(order[size_t(k - 1)])] - qa[size_t(order[size_t(k)])]);
    double wsum = 0;
    for (int j = 0; j < k; ++j) {
      const int e = allowed[size_t(order[size_t(j)])];
      r.chosen[size_t(t)].push_back(e);
      weights[size_t(t)].push_back(s[size_t(e)]);
      wsum += s[size_t(e)];
      load[size_t(e)] += 1;
    }
    if (P::kRenormalize)
      for (auto& w : weights[size_t(t)]) w /= wsum;
  }
  // Capacity: each expert serves the earliest tokens first.
  const double cf = m.options().capacity_factor;
  const double cap = cf > 0 ? std::ceil(cf * double(tokens) * k / n) : 1e300;
  std::vector<double> used(static_cast<size_t>(n), 0.0);
  for (int64_t t = 0; t < tokens; ++t) {
    double* yt = r.y.data() + t * d;
    for (int j = 0; j < k; ++j) {
      const int e = r.chosen[size_t(t)][size_t(j)];
      if (used[size_t(e)] >= cap) {
        ++r.dropped;
        continue;
      }
      used[size_t(e)] += 1;
      ffn_row(m.expert(e), x.data() + t * d, weights[size_t(t)][size_t(j)], yt);
    }
    for (int s = 0; s < Spec::kShared; ++s) ffn_row(m.shared_expert(s), x.data() + t * d, 1.0, yt);
  }
  if constexpr (B::kAuxLoss) {
    double l = 0;
    for (int i = 0; i < n; ++i) l += load[size_t(i)] / double(tokens * k) * pmean[size_t(i)];
    r.aux_loss = B::kAlpha * n * l;
  }
  return r;
}

template <class Spec>
void check_forward(nn::MoELayer<double, Spec>& m, const Tensor<double>& x, const char* what) {
  typename nn::MoELayer<double, Spec>::Saved saved;
  const auto y = m.forward(x, saved);
  const Reference r = reference(m, x);
  ts::testing::check_close(y, r.y, 1e-11, 1e-12, what);
  BOOST_TEST(saved.stats.aux_loss == r.aux_loss, boost::test_tools::tolerance(1e-12));
  BOOST_TEST(saved.stats.dropped == r.dropped);
  const int64_t tokens = saved.route.chosen.dim(0);
  for (int64_t t = 0; t < tokens; ++t)
    for (int j = 0; j < Spec::kTopK; ++j)
      BOOST_TEST(saved.route.chosen(t, j) == r.chosen[size_t(t)][size_t(j)]);
}
}  // namespace moe_test

// The names both MoE test programs use unqualified (`using namespace moe_test::prelude;`), in one
// place so that the two programs cannot drift apart.
namespace moe_test::prelude {
namespace ts = tessera;
namespace nn = tessera::nn;
using ts::Shape;
using ts::Tensor;
using ts::TensorView;
using ts::testing::check_close;
using ts::testing::dot;
using ts::testing::numeric_gradient;
using ts::testing::random_tensor;
using moe_test::check_forward;
using moe_test::ranked;
using moe_test::reference;
using moe_test::Reference;
}  // namespace moe_test::prelude
