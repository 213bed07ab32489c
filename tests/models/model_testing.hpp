// tests/models/model_testing.hpp — helpers shared by the model tests: sampled finite-difference
// checks of every parameter, a record of the discrete decisions a forward made, and the
// straight-through surrogate of a transformer block.
//
// Why a surrogate: the learned window selector trains with a straight-through estimator. Its
// forward uses the hard argmax (piecewise constant in the gate), so central differences of the
// real loss see no gradient for the gate and miss the gate's path into x. The gradient the
// library computes is, by construction, the exact gradient of a surrogate in which each query
// block's attention output is multiplied by g = p_c / p_c0 (p = softmax of the gate logits at
// the current parameters, c and p_c0 the choice and its probability at the base point, so
// g = 1 there) and the compute penalty is replaced by its expectation
// penalty / blocks * sum_s p_s cost_s. block_surrogate() evaluates that function from the
// layers' public forwards and its own gate arithmetic (the signal-row means, the softmax), so
// finite differences of it check the whole backward, gate included. For every other window
// policy the surrogate is the plain block forward.
//
// Finite differences are meaningful only while no discrete decision (window choice, expert
// choice) flips under the 1e-6 probes; every probe records its decisions and the checks
// REQUIRE that none differs from the base point.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <vector>

#include <boost/test/unit_test.hpp>

#include "../ops/finite_difference.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/nn/parameter.hpp"
#include "tessera/nn/transformer_block.hpp"
#include "tessera/ops/elementwise.hpp"

namespace models_test {

namespace ts = tessera;
namespace nn = tessera::nn;
using ts::Shape;
using ts::Tensor;
using ts::TensorView;

// The discrete decisions of one forward, in visiting order.
struct Decisions {
  std::vector<int64_t> values;
  void add(int64_t v) { values.push_back(v); }
  bool operator==(const Decisions&) const = default;
};

template <class Block>
void record(const typename Block::Saved& s, Decisions& d) {
  for (int v : s.attn.choice.index) d.add(v);
  if constexpr (Block::kMoE) {
    const auto& chosen = s.ffn.route.chosen;
    for (int64_t i = 0; i < chosen.numel(); ++i) d.add(chosen.data()[i]);
  }
}

// Ids drawn uniformly from [0, vocab) with mt19937_64(seed).
inline Tensor<int32_t> random_ids(Shape shape, int32_t vocab, uint64_t seed) {
  std::mt19937_64 gen(seed);
  auto t = Tensor<int32_t>::empty(shape);
  for (int64_t i = 0; i < t.numel(); ++i) t.data()[i] = static_cast<int32_t>(gen() % uint64_t(vocab));
  return t;
}

// The block's output under the straight-through surrogate (see the file header); adds the
// block's surrogate auxiliary loss to `aux` and its decisions to `dec`. `base` is the saved
// state of the forward the backward ran on.
template <class Block>
Tensor<double> block_surrogate(const Block& blk, TensorView<const double> x,
                               const typename Block::Saved& base, double& aux, Decisions& dec) {
  typename Block::Saved s;
  const Tensor<double> h1 = blk.norm1().forward(x, s.norm1);  // (B, T, C)
  Tensor<double> a = blk.attn().forward(h1, s.attn);          // (B, T, C)
  record<Block>(s, dec);
  const int64_t B = x.dim(0), S = x.dim(1), C = x.dim(2);
  if constexpr (Block::kLearnedWindow) {
    const auto& gate = blk.attn().selector();
    const nn::WindowChoice& ch = base.attn.choice;
    const int64_t n = gate.weight.value.dim(0), bs = ch.block, nb = ch.batch * ch.blocks;
    std::vector<double> m(static_cast<size_t>(C)), p(static_cast<size_t>(n));
    for (int64_t b = 0; b < B; ++b)
      for (int64_t qb = 0; qb < ch.blocks; ++qb) {
        // Signal rows: the block-length span ending at the block's first token.
        const int64_t q0 = qb * bs, r0 = std::max<int64_t>(0, q0 - bs + 1), r1 = q0 + 1;
        std::fill(m.begin(), m.end(), 0.0);
        for (int64_t t = r0; t < r1; ++t)
          for (int64_t c = 0; c < C; ++c) m[c] += h1.data()[(b * S + t) * C + c] / double(r1 - r0);
        double mx = -HUGE_VAL;
        for (int64_t k = 0; k < n; ++k) {
          double z = gate.bias.value.data()[k];
          for (int64_t c = 0; c < C; ++c) z += gate.weight.value.data()[k * C + c] * m[c];
          mx = std::max(mx, p[k] = z);
        }
        double sum = 0.0;
        for (auto& v : p) sum += (v = std::exp(v - mx));
        for (auto& v : p) v /= sum;
        const int64_t g = b * ch.blocks + qb;
        const int c = ch.index[g];
        const double factor = p[c] / ch.prob[g * n + c];
        for (int64_t t = q0; t < std::min(S, q0 + bs); ++t)
          for (int64_t cc = 0; cc < C; ++cc) a.data()[(b * S + t) * C + cc] *= factor;
        for (int64_t k = 0; k < n; ++k) aux += gate.penalty / double(nb) * p[k] * ch.cost[k];
      }
  } else {
    aux += s.attn.stats.aux_loss;
  }
  const Tensor<double> h = ts::ops::add<double>(x, a);
  const Tensor<double> h2 = blk.norm2().forward(h, s.norm2);
  const Tensor<double> f = blk.ffn().forward(h2, s.ffn);
  if constexpr (Block::kMoE) aux += s.ffn.stats.aux_loss;
  return ts::ops::add<double>(h, f);
}

// Compares sampled elements of every visited parameter's gradient with central differences of
// `loss()` (which reads the parameters in place). Per tensor: the element of largest |grad|
// and `samples - 1` others drawn from mt19937_64(seed); every element when the tensor is small.
// A difference passes when |analytic - numeric| <= atol + rtol * max(|analytic|, |numeric|).
template <class Visit, class Loss>
void check_parameters(Visit&& visit, Loss&& loss, const std::string& what, int samples = 6,
                      double rtol = 1e-5, double atol = 1e-9, double h = 1e-6) {
  std::mt19937_64 gen(20240601);
  int tensors = 0, failures = 0;
  double worst = 0.0;
  std::string worst_at;
  visit([&](std::string_view name, nn::Parameter<double>& p) {
    ++tensors;
    const int64_t n = p.value.numel();
    std::vector<int64_t> idx;
    if (n <= samples) {
      for (int64_t i = 0; i < n; ++i) idx.push_back(i);
    } else {
      int64_t best = 0;
      for (int64_t i = 1; i < n; ++i)
        if (std::fabs(p.grad.data()[i]) > std::fabs(p.grad.data()[best])) best = i;
      idx.push_back(best);
      while (static_cast<int>(idx.size()) < samples) idx.push_back(static_cast<int64_t>(gen() % uint64_t(n)));
    }
    for (int64_t i : idx) {
      double& v = p.value.data()[i];
      const double keep = v;
      v = keep + h;
      const double up = loss();
      v = keep - h;
      const double down = loss();
      v = keep;
      const double numeric = (up - down) / (2 * h), analytic = p.grad.data()[i];
      const double allowed = atol + rtol * std::max(std::fabs(numeric), std::fabs(analytic));
      const double excess = std::fabs(numeric - analytic) / allowed;
      if (!(excess <= 1.0)) {
        ++failures;
        BOOST_ERROR(what << ": " << name << "[" << i << "] analytic " << analytic << ", numeric "
                         << numeric);
      }
      if (excess > worst) {
        worst = excess;
        worst_at = std::string(name) + "[" + std::to_string(i) + "]";
      }
    }
  });
  std::printf("%s: %d tensors checked, worst |diff|/allowed %.3g at %s\n", what.c_str(), tensors,
              worst, worst_at.c_str());
  BOOST_TEST(tensors > 0);
  BOOST_TEST(failures == 0);
}

// Sum of |grad| over every visited parameter: guards against a check passing on all zeros.
template <class Visit>
double gradient_mass(Visit&& visit) {
  double s = 0.0;
  visit([&](std::string_view, nn::Parameter<double>& p) {
    for (int64_t i = 0; i < p.grad.numel(); ++i) s += std::fabs(p.grad.data()[i]);
  });
  return s;
}

}  // namespace models_test

namespace models_test {

// The block every block test builds: B = 2, T = 13 (not a multiple of the tile 4), C = 8,
// 2 query heads sharing 1 kv head, FFN (or expert) width 6.
inline constexpr int64_t kBlockB = 2, kBlockT = 13, kBlockC = 8, kBlockHeads = 2, kBlockKv = 1,
                         kBlockHidden = 6, kBlockTile = 4;

inline nn::BlockOptions block_options(nn::MoEOptions moe = {}) {
  nn::BlockOptions o;
  o.attention.block = kBlockTile;
  o.attention.max_seq = 64;
  o.moe = moe;
  o.window_penalty = 0.05;  // large enough that the penalty's gradient is visible
  return o;
}

// Backward of TransformerBlock<double, Window, FfnSpec> against central differences of
// L = <y, g> + aux_grad * aux (|L| ~ 10, so the differences carry ~1e-9 of rounding noise: atol
// 1e-8, rtol 1e-6) (the straight-through surrogate for a learned window): dx and
// every element of every parameter. `prepare` may adjust the block before the check (e.g. a
// non-zero MoE selection bias). Returns the base forward's saved state for further checks.
template <class Window, class FfnSpec, class Prepare>
typename nn::TransformerBlock<double, Window, FfnSpec>::Saved check_block_gradients(
    const std::string& what, uint64_t seed, double aux_grad, nn::MoEOptions moe, Prepare&& prepare) {
  using Block = nn::TransformerBlock<double, Window, FfnSpec>;
  std::printf("%s: block seed %llu, input seed %llu, upstream seed %llu, aux_grad %g\n",
              what.c_str(), (unsigned long long)seed, (unsigned long long)(seed + 1),
              (unsigned long long)(seed + 2), aux_grad);
  Block blk(kBlockC, kBlockHeads, kBlockKv, kBlockHidden, ts::Seed{seed}, 3, block_options(moe));
  prepare(blk);
  const Tensor<double> x = ts::testing::random_tensor({kBlockB, kBlockT, kBlockC}, seed + 1);
  const Tensor<double> g = ts::testing::random_tensor({kBlockB, kBlockT, kBlockC}, seed + 2);
  typename Block::Saved saved;
  const Tensor<double> y = blk.forward(x, saved);
  blk.visit_parameters([](std::string_view, nn::Parameter<double>& p) { p.zero_grad(); });
  const Tensor<double> dx = blk.backward(g, saved, aux_grad);

  // At the base point the surrogate is the block itself (every straight-through factor is 1).
  Decisions base;
  double aux0 = 0.0;
  const Tensor<double> y0 = block_surrogate(blk, x, saved, aux0, base);
  ts::testing::check_close(y0, y, 1e-13, 1e-14, (what + " surrogate == forward").c_str());

  int probes = 0, flips = 0;
  auto loss_of = [&](TensorView<const double> xv) {
    double aux = 0.0;
    Decisions d;
    const Tensor<double> yv = block_surrogate(blk, xv, saved, aux, d);
    ++probes;
    if (!(d == base)) ++flips;
    return ts::testing::dot(yv, g) + aux_grad * aux;
  };
  ts::testing::check_close(dx, ts::testing::numeric_gradient(loss_of, x), 1e-6, 1e-8,
                           (what + " dx").c_str());
  check_parameters([&](auto f) { blk.visit_parameters(f); }, [&] { return loss_of(x); }, what,
                   1 << 20, 1e-6, 1e-8);
  BOOST_TEST(gradient_mass([&](auto f) { blk.visit_parameters(f); }) > 0.0);
  BOOST_TEST_MESSAGE(what << ": " << probes << " probes, " << flips << " decision flips");
  BOOST_REQUIRE_MESSAGE(flips == 0, what << ": a probe flipped a window or expert choice; the "
                                           "finite differences above are not meaningful");
  return saved;
}

}  // namespace models_test

namespace models_test {

// The saved state of block `l` inside a model's saved trunk (the blocks come in up to two types).
// With per-layer windows the layer index is a std::integral_constant and the states a tuple.
template <class Model, class Block, int64_t L>
const typename Block::Saved& block_saved(const typename Model::Saved& base,
                                         std::integral_constant<int64_t, L>) {
  return std::get<L>(base.trunk.layers);
}
template <class Model, class Block>
const typename Block::Saved& block_saved(const typename Model::Saved& base, int64_t l) {
  const int64_t nd = static_cast<int64_t>(base.trunk.dense.size());
  if constexpr (std::is_same_v<Block, typename Model::DenseBlock> &&
                std::is_same_v<Block, typename Model::MoEBlock>) {
    return l < nd ? base.trunk.dense[size_t(l)] : base.trunk.moe[size_t(l - nd)];
  } else if constexpr (std::is_same_v<Block, typename Model::DenseBlock>) {
    return base.trunk.dense[size_t(l)];
  } else {
    return base.trunk.moe[size_t(l - nd)];
  }
}

// A model's trunk under the straight-through surrogate: embedding, every block through
// block_surrogate, final norm. Returns the (B, T, C) normed states; adds the blocks' surrogate
// aux losses to `aux` and their decisions to `dec`.
template <class Model>
Tensor<double> trunk_surrogate(Model& m, TensorView<const int32_t> tokens,
                               const typename Model::Saved& base, double& aux, Decisions& dec) {
  typename nn::Embedding<double>::Saved es;
  Tensor<double> h = m.embedding().forward(tokens, es);
  m.for_each_block([&](auto l, auto& blk) {
    using Block = std::remove_cvref_t<decltype(blk)>;
    h = block_surrogate(blk, h, block_saved<Model, Block>(base, l), aux, dec);
  });
  typename nn::RMSNorm<double>::Saved ns;
  return m.final_norm().forward(h, ns);
}

// Mean over the rows whose target is not -100 of -log softmax(logits)[target], in plain loops.
inline double mean_cross_entropy(const Tensor<double>& logits /*(rows, V)*/,
                                 const int32_t* targets, int64_t rows, int64_t V) {
  double sum = 0.0;
  int64_t n = 0;
  for (int64_t r = 0; r < rows; ++r) {
    if (targets[r] == -100) continue;
    const double* z = logits.data() + r * V;
    double mx = -HUGE_VAL;
    for (int64_t v = 0; v < V; ++v) mx = std::max(mx, z[v]);
    double s = 0.0;
    for (int64_t v = 0; v < V; ++v) s += std::exp(z[v] - mx);
    sum += mx + std::log(s) - z[targets[r]];
    ++n;
  }
  return sum / double(n);
}

// y = x w^T in plain loops: x (rows, C), w (V, C) -> (rows, V).
inline Tensor<double> times_transposed(const double* x, int64_t rows, const Tensor<double>& w) {
  const int64_t V = w.dim(0), C = w.dim(1);
  auto y = Tensor<double>::empty({rows, V});
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t v = 0; v < V; ++v) {
      double s = 0.0;
      for (int64_t c = 0; c < C; ++c) s += x[r * C + c] * w.data()[v * C + c];
      y.data()[r * V + v] = s;
    }
  return y;
}

}  // namespace models_test
