// tests/nn/test_attention.cpp — nn::Attention under every window policy:
//   * backward against central finite differences in double (every parameter and x);
//   * forward against a naive reference that materialises the masked T x T scores in double;
//   * properties: causal attention never reads the future, a sliding window ignores tokens
//     outside it, VariableWindow forced to full equals CausalFull, LocalGlobal's global tokens;
//   * unusual sizes, work fractions, a 16k-token sequence, bf16 forward;
//   * the core alone (core_forward, core_backward) on every compiled instruction-set path, in
//     float and double, with blockings that pad, against the textbook formulas.
#define BOOST_TEST_MODULE test_attention
#include <algorithm>
#include <boost/test/unit_test.hpp>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "../ops/finite_difference.hpp"
#include "tessera/nn/attention.hpp"

namespace nn = tessera::nn;
namespace ts = tessera;
using ts::Seed;
using ts::Shape;
using ts::Tensor;
using ts::TensorView;
using ts::testing::check_close;
using ts::testing::random_tensor;

namespace {

constexpr int64_t kB = 2, kT = 13, kC = 16, kHeads = 4, kKv = 2, kBlock = 4;
constexpr uint64_t kSeed = 1234;

nn::AttentionOptions small_options(int64_t block = kBlock, int rotary_dim = -1) {
  nn::AttentionOptions o;
  o.block = block;
  o.max_seq = 256;
  o.rope.rotary_dim = rotary_dim;
  return o;
}

using Var2 = nn::Sizes<2, 5, nn::kFull>;
using VarHeuristic = nn::VariableWindow<Var2, nn::HeuristicSelector, kBlock>;
using VarForced1 = nn::VariableWindow<Var2, nn::ForcedSelector<1>, kBlock>;
using VarFull = nn::VariableWindow<Var2, nn::ForcedSelector<2>, kBlock>;
using VarLearned = nn::VariableWindow<Var2, nn::LearnedSelector, kBlock>;
using LG52 = nn::LocalGlobal<5, 2>;          // (aliases: BOOST_TEST is a macro, commas split it)
using LG52E = nn::LocalGlobal<5, 2, false>;

// The window query row i of sequence b used (kFull for every fixed policy's own W).
template <class W>
int64_t window_of_row(const nn::WindowChoice& c, int64_t b, int64_t i) {
  if constexpr (W::kAdaptive) {
    return W::kSizes[static_cast<size_t>(c.index[b * c.blocks + i / c.block])];
  } else {
    return 0;
  }
}

// y = softmax(mask(q k^T / sqrt(hd))) v wo^T with the T x T scores materialised, in double,
// from the layer's own weights, with q, k computed by plain loops and rotated by ops::rope.
template <class W>
struct Reference {
  Tensor<double> o;  // (B, T, H, hd)
  Tensor<double> y;  // (B, T, C)
};

template <class W>
Reference<W> naive(nn::Attention<double, W>& layer, const Tensor<double>& x,
                   const nn::WindowChoice& choice) {
  const int64_t B = x.dim(0), S = x.dim(1), C = x.dim(2);
  const int64_t H = layer.heads(), KV = layer.kv_heads(), D = layer.head_dim();
  auto project = [&](const Tensor<double>& w) {  // x w^T, plain loops
    const int64_t out = w.dim(0);
    auto r = Tensor<double>::zeros({B, S, out});
    for (int64_t t = 0; t < B * S; ++t)
      for (int64_t o = 0; o < out; ++o) {
        double s = 0;
        for (int64_t c = 0; c < C; ++c) s += x.data()[t * C + c] * w.data()[o * C + c];
        r.data()[t * out + o] = s;
      }
    return r;
  };
  const Tensor<double> q0 = project(layer.wq().value), k0 = project(layer.wk().value);
  const Tensor<double> v = project(layer.wv().value);
  const Tensor<double> q = ts::ops::rope<double>(q0.reshape({B, S, H, D}), layer.rope_table());
  const Tensor<double> k = ts::ops::rope<double>(k0.reshape({B, S, KV, D}), layer.rope_table());
  Reference<W> ref;
  ref.o = Tensor<double>::zeros({B, S, H, D});
  std::vector<double> scores(static_cast<size_t>(S * S));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t g = h / (H / KV);
      for (int64_t i = 0; i < S; ++i) {
        double mx = -HUGE_VAL;
        for (int64_t j = 0; j < S; ++j) {
          double s = -HUGE_VAL;
          if (W::allowed(i, j, S, window_of_row<W>(choice, b, i))) {
            s = 0;
            for (int64_t d = 0; d < D; ++d)
              s += q.data()[((b * S + i) * H + h) * D + d] * k.data()[((b * S + j) * KV + g) * D + d];
            s /= std::sqrt(static_cast<double>(D));
          }
          scores[i * S + j] = s;
          mx = std::max(mx, s);
        }
        double sum = 0;
        for (int64_t j = 0; j < S; ++j) sum += (scores[i * S + j] = std::exp(scores[i * S + j] - mx));
        for (int64_t j = 0; j < S; ++j)
          for (int64_t d = 0; d < D; ++d)
            ref.o.data()[((b * S + i) * H + h) * D + d] +=
                scores[i * S + j] / sum * v.data()[((b * S + j) * KV + g) * D + d];
      }
    }
  ref.y = Tensor<double>::zeros({B, S, C});
  const int64_t HD = H * D;
  for (int64_t t = 0; t < B * S; ++t)
    for (int64_t c = 0; c < C; ++c) {
      double s = 0;
      for (int64_t e = 0; e < HD; ++e)
        s += ref.o.data()[t * HD + e] * layer.wo().value.data()[c * HD + e];
      ref.y.data()[t * C + c] = s;
    }
  return ref;
}

template <class W>
void check_against_reference(int64_t heads, int64_t kv, int64_t S, int64_t C, int64_t block,
                             const char* what, int rotary_dim = -1) {
  nn::Attention<double, W> layer(C, heads, kv, Seed{kSeed}, 3, small_options(block, rotary_dim));
  const Tensor<double> x = random_tensor({kB, S, C}, 77);
  typename nn::Attention<double, W>::Saved saved;
  const Tensor<double> y = layer.forward(x, saved);
  const Reference<W> ref = naive<W>(layer, x, saved.choice);
  check_close(saved.o, ref.o, 1e-11, 1e-12, what);
  check_close(y, ref.y, 1e-11, 1e-12, what);
  double norm = 0;
  for (int64_t i = 0; i < y.numel(); ++i) norm += y.data()[i] * y.data()[i];
  BOOST_TEST(norm > 0.0);  // guard against an all-zero output passing a comparison
}

// loss = <forward(x), g> (+ the selector's compute penalty); checks dx and every parameter.
template <class W>
void check_gradients(const char* what, bool check_gate_and_x = true) {
  std::printf("gradient check %s (seed %llu)\n", what, static_cast<unsigned long long>(kSeed));
  using Layer = nn::Attention<double, W>;
  Layer layer(kC, kHeads, kKv, Seed{kSeed}, 5, small_options());
  const Tensor<double> x = random_tensor({kB, kT, kC}, 11);
  const Tensor<double> g = random_tensor({kB, kT, kC}, 12);
  auto loss_of = [&](TensorView<const double> xv) {
    typename Layer::Saved s;
    const Tensor<double> y = layer.forward(xv, s);
    return ts::testing::dot(y, g);
  };
  typename Layer::Saved saved;
  (void)layer.forward(x, saved);
  layer.visit_parameters([](std::string_view, nn::Parameter<double>& p) { p.zero_grad(); });
  const Tensor<double> dx = layer.backward(g, saved);
  if (check_gate_and_x) {
    const Tensor<double> ndx = ts::testing::numeric_gradient(loss_of, x);
    check_close(dx, ndx, 1e-6, 1e-8, (std::string(what) + " dx").c_str());
  }
  layer.visit_parameters([&](std::string_view name, nn::Parameter<double>& p) {
    if (name.starts_with("gate.")) return;  // straight-through: checked separately
    auto num = Tensor<double>::empty(p.value.shape());
    double* v = p.value.data();
    for (int64_t i = 0; i < p.value.numel(); ++i) {
      const double keep = v[i];
      v[i] = keep + 1e-6;
      const double up = loss_of(x);
      v[i] = keep - 1e-6;
      const double down = loss_of(x);
      v[i] = keep;
      num.data()[i] = (up - down) / 2e-6;
    }
    check_close(p.grad, num, 1e-6, 1e-8, (std::string(what) + " d" + std::string(name)).c_str());
  });
}

}  // namespace

BOOST_AUTO_TEST_SUITE(gradients)
BOOST_AUTO_TEST_CASE(causal_full) { check_gradients<nn::CausalFull>("CausalFull"); }
BOOST_AUTO_TEST_CASE(bidirectional) { check_gradients<nn::Bidirectional>("Bidirectional"); }
BOOST_AUTO_TEST_CASE(sliding_window) { check_gradients<nn::SlidingWindow<5>>("SlidingWindow<5>"); }
BOOST_AUTO_TEST_CASE(local_global) { check_gradients<nn::LocalGlobal<5, 2>>("LocalGlobal<5,2>"); }
BOOST_AUTO_TEST_CASE(local_global_encoder) {
  check_gradients<nn::LocalGlobal<5, 2, false>>("LocalGlobal<5,2,bidirectional>");
}
BOOST_AUTO_TEST_CASE(variable_heuristic) { check_gradients<VarHeuristic>("VariableWindow<Heuristic>"); }
BOOST_AUTO_TEST_CASE(variable_forced) { check_gradients<VarForced1>("VariableWindow<Forced<1>>"); }
// The learned gate's straight-through gradient is not the derivative of the (piecewise
// constant) forward, so x and the gate are checked against the STE formula below; the
// projections' gradients are exact.
BOOST_AUTO_TEST_CASE(variable_learned_projections) {
  check_gradients<VarLearned>("VariableWindow<Learned>", false);
}
BOOST_AUTO_TEST_SUITE_END()

// The gate's gradient is that of the straight-through surrogate
//   S(W, b) = sum_g dgate_g * p_{c_g}(W, b) / p_{c_g}(W0, b0)
//           + penalty / nb * sum_g sum_s p_s(W, b) cost_s,
// with the choices c_g and dgate_g = <dO_g, O_g> fixed at (W0, b0): checked by finite
// differences of S, computed here independently of the layer's backward.
BOOST_AUTO_TEST_CASE(learned_gate_straight_through_gradient) {
  using Layer = nn::Attention<double, VarLearned>;
  Layer layer(kC, kHeads, kKv, Seed{kSeed}, 5, small_options());
  const Tensor<double> x = random_tensor({kB, kT, kC}, 11);
  const Tensor<double> g = random_tensor({kB, kT, kC}, 12);
  Layer::Saved saved;
  (void)layer.forward(x, saved);
  layer.visit_parameters([](std::string_view, nn::Parameter<double>& p) { p.zero_grad(); });
  (void)layer.backward(g, saved);
  const nn::WindowChoice& ch = saved.choice;
  const int64_t nb = ch.batch * ch.blocks, n = 3, C = kC, HD = kHeads * layer.head_dim();
  // dgate = <dO, O> per block, dO = g wo.
  std::vector<double> dgate(static_cast<size_t>(nb), 0.0);
  for (int64_t b = 0; b < kB; ++b)
    for (int64_t t = 0; t < kT; ++t)
      for (int64_t e = 0; e < HD; ++e) {
        double dO = 0;
        for (int64_t c = 0; c < C; ++c)
          dO += g.data()[(b * kT + t) * C + c] * layer.wo().value.data()[c * HD + e];
        dgate[b * ch.blocks + t / kBlock] += dO * saved.o.data()[(b * kT + t) * HD + e];
      }
  auto& gate = layer.selector();
  auto surrogate = [&]() {
    double s = 0;
    for (int64_t k = 0; k < nb; ++k) {
      std::vector<double> z(n);
      for (int64_t r = 0; r < n; ++r) {
        z[r] = gate.bias.value.data()[r];
        for (int64_t c = 0; c < C; ++c) z[r] += gate.weight.value.data()[r * C + c] * ch.mean[k * C + c];
      }
      const double mx = *std::max_element(z.begin(), z.end());
      double sum = 0;
      for (double& v : z) sum += (v = std::exp(v - mx));
      const int c = ch.index[k];
      s += dgate[k] * (z[c] / sum) / ch.prob[k * n + c];
      for (int64_t r = 0; r < n; ++r) s += gate.penalty / nb * z[r] / sum * ch.cost[r];
    }
    return s;
  };
  for (nn::Parameter<double>* p : {&gate.weight, &gate.bias}) {
    auto num = Tensor<double>::empty(p->value.shape());
    for (int64_t i = 0; i < p->value.numel(); ++i) {
      double& v = p->value.data()[i];
      const double keep = v;
      v = keep + 1e-6;
      const double up = surrogate();
      v = keep - 1e-6;
      const double down = surrogate();
      v = keep;
      num.data()[i] = (up - down) / 2e-6;
    }
    check_close(p->grad, num, 1e-6, 1e-9, "LearnedSelector gate gradient");
  }
  double gnorm = 0;
  for (int64_t i = 0; i < gate.weight.grad.numel(); ++i) gnorm += std::abs(gate.weight.grad.data()[i]);
  BOOST_TEST(gnorm > 0.0);
  BOOST_TEST(saved.stats.aux_loss > 0.0);
}

BOOST_AUTO_TEST_SUITE(reference)
BOOST_AUTO_TEST_CASE(every_policy) {
  check_against_reference<nn::CausalFull>(kHeads, kKv, kT, kC, kBlock, "CausalFull");
  check_against_reference<nn::Bidirectional>(kHeads, kKv, kT, kC, kBlock, "Bidirectional");
  check_against_reference<nn::SlidingWindow<5>>(kHeads, kKv, kT, kC, kBlock, "SlidingWindow<5>");
  check_against_reference<nn::LocalGlobal<5, 2>>(kHeads, kKv, kT, kC, kBlock, "LocalGlobal<5,2>");
  check_against_reference<nn::LocalGlobal<5, 2, false>>(kHeads, kKv, kT, kC, kBlock,
                                                         "LocalGlobal<5,2,false>");
  check_against_reference<VarHeuristic>(kHeads, kKv, kT, kC, kBlock, "VariableWindow<Heuristic>");
  check_against_reference<VarLearned>(kHeads, kKv, kT, kC, kBlock, "VariableWindow<Learned>");
}
// Odd head counts, one kv head, window 37, T not a multiple of the block, block 7, odd
// head_dim (RoPE needs an even rotary_dim: partial rotary over the first 2 features).
BOOST_AUTO_TEST_CASE(unusual_sizes) {
  check_against_reference<nn::SlidingWindow<37>>(5, 1, 101, 20, 7, "SlidingWindow<37> h5 kv1");
  check_against_reference<nn::CausalFull>(3, 3, 11, 9, 5, "CausalFull h3 kv3 head_dim 3", 2);
  check_against_reference<nn::LocalGlobal<37, 3>>(7, 1, 53, 28, 16, "LocalGlobal<37,3> h7 kv1");
  using V = nn::VariableWindow<nn::Sizes<5, 37, nn::kFull>, nn::HeuristicSelector, 7>;
  check_against_reference<V>(5, 1, 61, 20, 7, "VariableWindow<5,37,full> block 7");
}
BOOST_AUTO_TEST_SUITE_END()

namespace {

template <class T>
Tensor<double> widen(TensorView<const T> t) {
  auto d = Tensor<double>::empty(t.shape());
  const Tensor<T> c = t.contiguous();
  for (int64_t i = 0; i < c.numel(); ++i) d.data()[i] = static_cast<double>(c.data()[i]);
  return d;
}

template <class T>
Tensor<T> narrow(const Tensor<double>& d) {
  auto t = Tensor<T>::empty(d.shape());
  for (int64_t i = 0; i < d.numel(); ++i) t.data()[i] = static_cast<T>(d.data()[i]);
  return t;
}

// The attention core by the textbook formulas, in double, with the T x T matrices materialised:
// from the layer's saved q, k (after RoPE), v and window choices, and a gradient d_o,
//   P = softmax(mask(q k^T / sqrt(hd))), o = P v,
//   dP = dO v^T, dS = P (dP - rowsum(P dP)), dq = dS k / sqrt(hd), dk = dS^T q / sqrt(hd),
//   dv = P^T dO.
struct CoreReference {
  Tensor<double> o, dq, dk, dv;
};

template <class W>
CoreReference naive_core(const Tensor<double>& q, const Tensor<double>& k, const Tensor<double>& v,
                         const Tensor<double>& d_o, const nn::WindowChoice& choice) {
  const int64_t B = q.dim(0), S = q.dim(1), H = q.dim(2), D = q.dim(3), KV = k.dim(2);
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  CoreReference r{Tensor<double>::zeros(q.shape()), Tensor<double>::zeros(q.shape()),
                  Tensor<double>::zeros(k.shape()), Tensor<double>::zeros(k.shape())};
  auto at = [&](int64_t b, int64_t t, int64_t heads, int64_t h) {
    return ((b * S + t) * heads + h) * D;
  };
  std::vector<double> p(static_cast<size_t>(S * S)), dp(static_cast<size_t>(S * S));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t g = h / (H / KV);
      for (int64_t i = 0; i < S; ++i) {
        double mx = -HUGE_VAL;
        for (int64_t j = 0; j < S; ++j) {
          double s = -HUGE_VAL;
          if (W::allowed(i, j, S, window_of_row<W>(choice, b, i))) {
            s = 0;
            for (int64_t d = 0; d < D; ++d)
              s += q.data()[at(b, i, H, h) + d] * k.data()[at(b, j, KV, g) + d];
            s *= scale;
          }
          p[i * S + j] = s;
          mx = std::max(mx, s);
        }
        double sum = 0;
        for (int64_t j = 0; j < S; ++j) sum += (p[i * S + j] = std::exp(p[i * S + j] - mx));
        double delta = 0;
        for (int64_t j = 0; j < S; ++j) {
          p[i * S + j] /= sum;
          double dpij = 0;
          for (int64_t d = 0; d < D; ++d) {
            r.o.data()[at(b, i, H, h) + d] += p[i * S + j] * v.data()[at(b, j, KV, g) + d];
            dpij += d_o.data()[at(b, i, H, h) + d] * v.data()[at(b, j, KV, g) + d];
          }
          dp[i * S + j] = dpij;
          delta += p[i * S + j] * dpij;
        }
        for (int64_t j = 0; j < S; ++j) {
          const double pij = p[i * S + j], ds = pij * (dp[i * S + j] - delta);
          for (int64_t d = 0; d < D; ++d) {
            r.dq.data()[at(b, i, H, h) + d] += ds * k.data()[at(b, j, KV, g) + d] * scale;
            r.dk.data()[at(b, j, KV, g) + d] += ds * q.data()[at(b, i, H, h) + d] * scale;
            r.dv.data()[at(b, j, KV, g) + d] += pij * d_o.data()[at(b, i, H, h) + d];
          }
        }
      }
    }
  return r;
}

// core_forward and core_backward of Attention<T, W> against naive_core on the layer's own q, k,
// v. Tolerances: double computes the same sums in another order (1e-12); float accumulates
// about T products of O(1) terms with 24-bit mantissas (a few 1e-6) plus the float exp.
template <class T, class W>
void check_core(int64_t heads, int64_t kv, int64_t S, int64_t C, int64_t block, const char* what) {
  nn::Attention<T, W> layer(C, heads, kv, Seed{kSeed}, 7, small_options(block));
  const Tensor<T> x = narrow<T>(random_tensor({kB, S, C}, 31));
  typename nn::Attention<T, W>::Saved s;
  (void)layer.forward(x, s);
  const Tensor<double> d_o = random_tensor(s.o.shape(), 32);
  const auto g = layer.core_backward(s, narrow<T>(d_o));
  const Tensor<double> q = widen<T>(s.q), k = widen<T>(s.k);
  const Tensor<double> v = widen<T>(s.v).reshape(k.shape()).contiguous();
  const CoreReference ref = naive_core<W>(q, k, v, d_o, s.choice);
  const double rtol = std::is_same_v<T, double> ? 1e-11 : 2e-4;
  const double atol = std::is_same_v<T, double> ? 1e-12 : 2e-5;
  const std::string name = std::string(what) + (std::is_same_v<T, double> ? " double" : " float");
  check_close(widen<T>(s.o), ref.o, rtol, atol, (name + " o").c_str());
  check_close(widen<T>(g.dq), ref.dq, rtol, atol, (name + " dq").c_str());
  check_close(widen<T>(g.dk), ref.dk, rtol, atol, (name + " dk").c_str());
  check_close(widen<T>(g.dv), ref.dv, rtol, atol, (name + " dv").c_str());
  double norm = 0;
  for (int64_t i = 0; i < g.dk.numel(); ++i) norm += std::abs(static_cast<double>(g.dk.data()[i]));
  BOOST_TEST(norm > 0.0);
}

template <class T>
void check_core_blockings() {
  // head_dim 18: not a multiple of any vector width (2, 4, 8 or 16 lanes); T = 150: not a
  // multiple of the blocks. Block 64 runs the widest register blocks (4 vectors of columns)
  // and a 22-row last block (4-row blocks plus single rows); block 40 pads every tile.
  using V = nn::VariableWindow<nn::Sizes<16, 50, nn::kFull>, nn::LearnedSelector, 64>;
  check_core<T, nn::CausalFull>(4, 2, 150, 72, 64, "CausalFull block 64");
  check_core<T, nn::CausalFull>(4, 2, 150, 72, 40, "CausalFull block 40");
  check_core<T, nn::SlidingWindow<37>>(3, 1, 150, 54, 64, "SlidingWindow<37> block 64 kv 1");
  check_core<T, LG52E>(4, 4, 150, 72, 40, "LocalGlobal<5,2,false> block 40");
  check_core<T, V>(4, 2, 150, 72, 64, "VariableWindow<16,50,full> learned, block 64");
}

}  // namespace

// The tile products are compiled for three vector widths (baseline, AVX2, AVX-512) and picked
// at run time; each path the processor has runs here (TESSERA_ROW_ISA forces one), in float
// and double, against the textbook formulas.
BOOST_AUTO_TEST_CASE(every_kernel_path_matches_the_textbook_core) {
  namespace rows = ts::ops::rows_detail;
  const char* old = std::getenv("TESSERA_ROW_ISA");
  const std::string keep = old ? old : "";
  std::vector<rows::Isa> done;
  for (const char* isa : {"baseline", "avx2", "avx512"}) {
    setenv("TESSERA_ROW_ISA", isa, 1);
    const rows::Isa path = rows::row_isa();  // a path the processor lacks falls back
    if (std::find(done.begin(), done.end(), path) != done.end()) continue;
    done.push_back(path);
    std::printf("attention kernel path %s\n", rows::to_string(path));
    check_core_blockings<double>();
    check_core_blockings<float>();
  }
  if (old) {
    setenv("TESSERA_ROW_ISA", keep.c_str(), 1);
  } else {
    unsetenv("TESSERA_ROW_ISA");
  }
}

namespace {

// Output rows [0, upto) for input x and for x with rows `changed` replaced.
template <class W>
double max_change(const Tensor<double>& x, const std::vector<int64_t>& changed, int64_t rows_from,
                  int64_t rows_to, int64_t block = kBlock) {
  nn::Attention<double, W> layer(kC, kHeads, kKv, Seed{kSeed}, 1, small_options(block));
  typename nn::Attention<double, W>::Saved s1, s2;
  const Tensor<double> y1 = layer.forward(x, s1);
  Tensor<double> x2 = x.clone();
  for (int64_t b = 0; b < x.dim(0); ++b)
    for (int64_t t : changed)
      for (int64_t c = 0; c < x.dim(2); ++c) x2(b, t, c) += 3.0 + 0.1 * static_cast<double>(c);
  const Tensor<double> y2 = layer.forward(x2, s2);
  double worst = 0;
  for (int64_t b = 0; b < x.dim(0); ++b)
    for (int64_t t = rows_from; t < rows_to; ++t)
      for (int64_t c = 0; c < x.dim(2); ++c)
        worst = std::max(worst, std::abs(y1(b, t, c) - y2(b, t, c)));
  return worst;
}

}  // namespace

BOOST_AUTO_TEST_CASE(causal_attention_never_reads_the_future) {
  const int64_t S = 29;
  const Tensor<double> x = random_tensor({kB, S, kC}, 5);
  for (int64_t t : {3, 10, 17, 28}) {
    const std::vector<int64_t> changed{t};
    BOOST_TEST(max_change<nn::CausalFull>(x, changed, 0, t) == 0.0);
    BOOST_TEST(max_change<nn::SlidingWindow<5>>(x, changed, 0, t) == 0.0);
    BOOST_TEST(max_change<LG52>(x, changed, 0, t) == 0.0);
    BOOST_TEST(max_change<VarHeuristic>(x, changed, 0, t) == 0.0);
    BOOST_TEST(max_change<VarLearned>(x, changed, 0, t) == 0.0);
    // ...and the change is seen from t on (the test can fail).
    BOOST_TEST(max_change<nn::CausalFull>(x, changed, t, S) > 1e-6);
  }
  // Bidirectional does read the future.
  BOOST_TEST(max_change<nn::Bidirectional>(x, {20}, 0, 20) > 1e-6);
}

BOOST_AUTO_TEST_CASE(sliding_window_ignores_tokens_outside_it) {
  // W = 5: query i reads i-4..i. Changing tokens 0..9 cannot move outputs 14.. onwards.
  const int64_t S = 29;
  const Tensor<double> x = random_tensor({kB, S, kC}, 6);
  std::vector<int64_t> early;
  for (int64_t t = 0; t < 10; ++t) early.push_back(t);
  BOOST_TEST(max_change<nn::SlidingWindow<5>>(x, early, 14, S) == 0.0);
  BOOST_TEST(max_change<nn::SlidingWindow<5>>(x, early, 10, 14) > 1e-6);  // inside: it moves
  BOOST_TEST(max_change<nn::CausalFull>(x, early, 14, S) > 1e-6);        // full causal: it moves
}

BOOST_AUTO_TEST_CASE(local_global_tokens_are_read_by_all) {
  const int64_t S = 29;
  const Tensor<double> x = random_tensor({kB, S, kC}, 7);
  // Token 1 is global (G = 2): every later output changes, although it is far outside W = 5.
  BOOST_TEST(max_change<LG52>(x, {1}, 28, 29) > 1e-6);
  BOOST_TEST(max_change<nn::SlidingWindow<5>>(x, {1}, 28, 29) == 0.0);
  // Token 4 is not global: outputs beyond its window do not change.
  BOOST_TEST(max_change<LG52>(x, {4}, 9, 29) == 0.0);
  // Encoder form: a global query (row 0) reads the last token.
  BOOST_TEST(max_change<LG52E>(x, {28}, 0, 1) > 1e-6);
  BOOST_TEST(max_change<LG52E>(x, {28}, 5, 20) == 0.0);
}

BOOST_AUTO_TEST_CASE(variable_window_forced_to_full_equals_causal_full) {
  const Tensor<double> x = random_tensor({kB, kT, kC}, 8);
  const Tensor<double> g = random_tensor({kB, kT, kC}, 9);
  nn::Attention<double, nn::CausalFull> full(kC, kHeads, kKv, Seed{kSeed}, 2, small_options());
  nn::Attention<double, VarFull> var(kC, kHeads, kKv, Seed{kSeed}, 2, small_options());
  nn::Attention<double, nn::CausalFull>::Saved sf;
  nn::Attention<double, VarFull>::Saved sv;
  const Tensor<double> yf = full.forward(x, sf), yv = var.forward(x, sv);
  check_close(yv, yf, 0.0, 0.0, "forward");  // same tiles, same order: bit-identical
  const Tensor<double> dxf = full.backward(g, sf), dxv = var.backward(g, sv);
  check_close(dxv, dxf, 0.0, 0.0, "backward dx");
  check_close(var.wq().grad, full.wq().grad, 0.0, 0.0, "backward dwq");
  BOOST_TEST(sv.stats.work_fraction() == 1.0);
  BOOST_TEST(sv.stats.window_histogram[2] == kB * ((kT + kBlock - 1) / kBlock));
}

BOOST_AUTO_TEST_CASE(work_fractions) {
  // SlidingWindow W = 128 at T = 1024, tiles of 64: each query block reads (W + 64) / 64 = 3
  // tiles out of (qb + 1); the fraction is about 2 (W + block) / (T + block), near 2 W / T.
  constexpr int64_t T = 1024, C = 16;
  nn::AttentionOptions o;
  o.max_seq = T;
  const Tensor<float> x = [&] {
    const Tensor<double> xd = random_tensor({1, T, C}, 3);
    auto xf = Tensor<float>::empty(xd.shape());
    for (int64_t i = 0; i < xd.numel(); ++i) xf.data()[i] = static_cast<float>(xd.data()[i]);
    return xf;
  }();
  auto fraction = [&]<class W>(W*) {
    nn::Attention<float, W> layer(C, 1, 1, Seed{1}, 0, o);
    typename nn::Attention<float, W>::Saved s;
    (void)layer.forward(x, s);
    std::printf("work fraction %-16s T=%lld: %.4f (%lld of %lld tiles)\n", std::string(W::kName).c_str(),
                static_cast<long long>(T), s.stats.work_fraction(),
                static_cast<long long>(s.stats.visited_tiles),
                static_cast<long long>(s.stats.full_causal_tiles));
    return s.stats.work_fraction();
  };
  const double sw = fraction(static_cast<nn::SlidingWindow<128>*>(nullptr));
  BOOST_TEST(sw == (3.0 * 16 - 3) / (16.0 * 17 / 2), boost::test_tools::tolerance(1e-12));
  BOOST_TEST(sw > 2.0 * 128 / T);
  BOOST_TEST(sw < 2.0 * (128 + 64) / T);
  BOOST_TEST(fraction(static_cast<nn::CausalFull*>(nullptr)) == 1.0);
  BOOST_TEST(fraction(static_cast<nn::Bidirectional*>(nullptr)) == 256.0 / 136.0,
             boost::test_tools::tolerance(1e-12));
  using V = nn::VariableWindow<nn::Sizes<128, nn::kFull>, nn::ForcedSelector<0>, 64>;
  BOOST_TEST(fraction(static_cast<V*>(nullptr)) == sw, boost::test_tools::tolerance(1e-12));
}

BOOST_AUTO_TEST_CASE(long_sequence_sliding_window_16k) {
  // T = 16384, SlidingWindow<512>, one head of dim 16, forward only, float.
  constexpr int64_t T = 16384, C = 16;
  nn::AttentionOptions o;
  o.max_seq = T;
  nn::Attention<float, nn::SlidingWindow<512>> layer(C, 1, 1, Seed{9}, 0, o);
  auto x = Tensor<float>::empty({1, T, C});
  ts::fill_normal<float>(x.data(), x.numel(), Seed{9}, 1, 0.0f, 1.0f);
  nn::Attention<float, nn::SlidingWindow<512>>::Saved s;
  const auto t0 = std::chrono::steady_clock::now();
  const Tensor<float> y = layer.forward(x, s);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("T=16384 SlidingWindow<512> forward: %.3f s, work fraction %.4f\n", secs,
              s.stats.work_fraction());
  bool finite = true;
  for (int64_t i = 0; i < y.numel(); ++i) finite = finite && std::isfinite(y.data()[i]);
  BOOST_TEST(finite);
  BOOST_TEST(s.stats.work_fraction() < 0.08);
  BOOST_TEST(secs < 5.0);
}

BOOST_AUTO_TEST_CASE(bf16_forward_follows_float) {
  // bf16 storage, float accumulation: within a few bf16 ulps of the float layer on the same
  // (bf16-representable) weights and inputs.
  constexpr int64_t S = 21, C = 16;
  nn::AttentionOptions o = small_options();
  nn::Attention<ts::bf16, nn::SlidingWindow<5>> lb(C, 4, 2, Seed{kSeed}, 0, o);
  nn::Attention<float, nn::SlidingWindow<5>> lf(C, 4, 2, Seed{kSeed}, 0, o);
  lf.visit_parameters([&](std::string_view name, nn::Parameter<float>& p) {
    lb.visit_parameters([&](std::string_view nb, nn::Parameter<ts::bf16>& q) {
      if (nb != name) return;
      for (int64_t i = 0; i < p.value.numel(); ++i) p.value.data()[i] = ts::to_float(q.value.data()[i]);
    });
  });
  const Tensor<double> xd = random_tensor({2, S, C}, 4);
  auto xb = Tensor<ts::bf16>::empty(xd.shape());
  auto xf = Tensor<float>::empty(xd.shape());
  for (int64_t i = 0; i < xd.numel(); ++i) {
    xb.data()[i] = ts::from_float<ts::bf16>(static_cast<float>(xd.data()[i]));
    xf.data()[i] = ts::to_float(xb.data()[i]);
  }
  decltype(lb)::Saved sb;
  decltype(lf)::Saved sf;
  const Tensor<ts::bf16> yb = lb.forward(xb, sb);
  const Tensor<float> yf = lf.forward(xf, sf);
  double worst = 0, scale = 0;
  for (int64_t i = 0; i < yf.numel(); ++i) {
    worst = std::max(worst, std::abs(static_cast<double>(ts::to_float(yb.data()[i]) - yf.data()[i])));
    scale = std::max(scale, std::abs(static_cast<double>(yf.data()[i])));
  }
  // q, k, v, o are each rounded to bf16 (eps 2^-8) once: a few percent of the scale at most.
  BOOST_TEST(worst <= 0.05 * scale);
  BOOST_TEST(scale > 0.0);
}

BOOST_AUTO_TEST_CASE(bad_configuration_and_input_throw) {
  BOOST_CHECK_EXCEPTION((nn::Attention<float, nn::CausalFull>(16, 4, 3, Seed{1})), ts::Error,
                        [](const ts::Error& e) {
                          return std::string(e.what()).find("kv_heads (3) must divide heads (4)") !=
                                 std::string::npos;
                        });
  BOOST_CHECK_EXCEPTION((nn::Attention<float, nn::CausalFull>(18, 4, 2, Seed{1})), ts::Error,
                        [](const ts::Error& e) {
                          return std::string(e.what()).find("must divide d_model (18)") !=
                                 std::string::npos;
                        });
  nn::Attention<float, nn::CausalFull> layer(16, 4, 2, Seed{1}, 0, small_options());
  nn::Attention<float, nn::CausalFull>::Saved s;
  auto x = Tensor<float>::zeros({1, 5, 12});
  BOOST_CHECK_EXCEPTION(layer.forward(x, s), ts::Error, [](const ts::Error& e) {
    return std::string(e.what()).find("expected d_model = 16") != std::string::npos;
  });
  auto too_long = Tensor<float>::zeros({1, 257, 16});
  BOOST_CHECK_EXCEPTION(layer.forward(too_long, s), ts::Error, [](const ts::Error& e) {
    return std::string(e.what()).find("max_seq") != std::string::npos;
  });
}

BOOST_AUTO_TEST_CASE(parameter_names_are_stable) {
  nn::Attention<float, VarLearned> layer(16, 4, 2, Seed{1}, 0, small_options());
  std::vector<std::string> names;
  layer.visit_parameters([&](std::string_view n, nn::Parameter<float>&) { names.emplace_back(n); });
  const std::vector<std::string> expected{"wq", "wk", "wv", "wo", "gate.weight", "gate.bias"};
  BOOST_TEST(names == expected, boost::test_tools::per_element());
}

// Sizes where the kernels run threaded: one thread and two must give bit-identical results
// (every output element is summed in a fixed order by one task), and the threaded backward
// must still match the serial path the finite-difference tests exercised. The projections'
// BLAS may block its sums by thread count (ops/matmul.hpp), so they run on the plain-loop
// back end here, which leaves only this layer's own kernels to vary.
BOOST_AUTO_TEST_CASE(results_do_not_depend_on_the_thread_count) {
#if defined(_OPENMP)
  const char* old_path = std::getenv("TESSERA_CPU_PATH");
  const std::string keep = old_path ? old_path : "";
  setenv("TESSERA_CPU_PATH", "scalar", 1);
  using W = nn::VariableWindow<nn::Sizes<16, 48, nn::kFull>, nn::HeuristicSelector, 16>;
  constexpr int64_t B = 2, S = 150, C = 32;
  const Tensor<double> x = random_tensor({B, S, C}, 21);
  const Tensor<double> g = random_tensor({B, S, C}, 22);
  auto run = [&](int threads) {
    const int before = omp_get_max_threads();
    omp_set_num_threads(threads);
    nn::Attention<double, W> layer(C, 4, 2, Seed{kSeed}, 0, small_options(16, -1));
    typename nn::Attention<double, W>::Saved s;
    Tensor<double> y = layer.forward(x, s);
    Tensor<double> dx = layer.backward(g, s);
    Tensor<double> dwk = layer.wk().grad.clone();
    omp_set_num_threads(before);
    return std::tuple{std::move(y), std::move(dx), std::move(dwk)};
  };
  const auto [y1, dx1, dwk1] = run(1);
  const auto [y2, dx2, dwk2] = run(2);
  check_close(y2, y1, 0.0, 0.0, "forward, 1 vs 2 threads");
  check_close(dx2, dx1, 0.0, 0.0, "dx, 1 vs 2 threads");
  check_close(dwk2, dwk1, 0.0, 0.0, "dwk, 1 vs 2 threads");
  if (old_path) {
    setenv("TESSERA_CPU_PATH", keep.c_str(), 1);
  } else {
    unsetenv("TESSERA_CPU_PATH");
  }
#else
  BOOST_TEST_MESSAGE("built without OpenMP: nothing to compare");
#endif
}
