// tessera/nn/window.hpp — attention-window policies: which keys each query may read.
//
// Why policies are types: the window is part of a model's structure (an ablation swaps
// `SlidingWindow<512>` for `CausalFull` in the config), and the attention kernel specialises on
// it at compile time — no virtual call per tile, and the compiler removes the mask test where a
// policy can never mask (Bidirectional).
//
// Every policy is a small struct (an empty tag plus static constexpr members and static
// functions) with the same interface, used by nn::Attention:
//
//   kCausal                          whether a query never reads a later key
//   kAdaptive                        whether the window is chosen per query block at run time
//   key_span(q0, q1, seq, window)    the keys a query block [q0, q1) may read, as a union of
//                                    two intervals [0, global_end) ∪ [lo, hi). The kernel visits
//                                    only the key tiles that meet it: that is how a window
//                                    saves work.
//   allowed(i, j, seq, window)       the exact mask for query i and key j, applied inside a tile
//                                    that is partly outside the window.
//   reachable_keys(q0, seq)          the keys that any query at q0 or later may read, whatever
//                                    window it gets: key_span of the block [q0, seq) at the
//                                    policy's widest window. Decoding (infer/kv_cache.hpp) gives
//                                    back the cache blocks outside it.
//
// `window` is the run-time window of the query block: the policy's own W for the fixed
// policies (they ignore the argument), the size the selector picked for VariableWindow.
//
// VariableWindow is the R1 design's adaptive window: queries are grouped in blocks, and each
// block picks its window from a compile-time ascending set (kFull = full causal) through a
// Selector — HeuristicSelector (parameter-free content-complexity signal), LearnedSelector (a
// gate trained with a straight-through estimator and a compute penalty) or ForcedSelector<I>
// (tests); they are defined below, before VariableWindow.
#pragma once

#include <algorithm>
#include <array>
#include <climits>
#include <cmath>
#include <cstdint>
#include <concepts>
#include <span>
#include <string_view>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/core/number.hpp"
#include "tessera/core/rng.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/nn/parameter.hpp"

namespace tessera::nn {

// The keys a query block may read: [0, global_end) ∪ [lo, hi). Either part may be empty.
struct KeySpan {
  int64_t global_end = 0;
  int64_t lo = 0;
  int64_t hi = 0;
};

// The "full causal" entry of a VariableWindow size set: larger than any sequence, so the
// ascending-order check needs no special case and `min(window, seq)` is its cost.
inline constexpr int kFull = INT_MAX;

namespace window_detail {

// Causal band: query i reads keys j with i - w < j <= i (the w most recent, itself included).
inline KeySpan causal_band(int64_t q0, int64_t q1, int64_t w) {
  return {0, std::max<int64_t>(0, q0 - w + 1), q1};
}
inline bool in_causal_band(int64_t i, int64_t j, int64_t w) { return j <= i && i - j < w; }

}  // namespace window_detail

// Every query reads every earlier key and itself: the decoder's default.
struct CausalFull {
  static constexpr bool kCausal = true;
  static constexpr bool kAdaptive = false;
  static constexpr std::string_view kName = "CausalFull";
  static KeySpan key_span(int64_t /*q0*/, int64_t q1, int64_t /*seq*/, int64_t /*window*/) {
    return {0, 0, q1};
  }
  static bool allowed(int64_t i, int64_t j, int64_t /*seq*/, int64_t /*window*/) { return j <= i; }
  static KeySpan reachable_keys(int64_t q0, int64_t seq) { return key_span(q0, seq, seq, 0); }
};

// Every query reads every key: the encoder's attention (BERT-like, ViT).
struct Bidirectional {
  static constexpr bool kCausal = false;
  static constexpr bool kAdaptive = false;
  static constexpr std::string_view kName = "Bidirectional";
  static KeySpan key_span(int64_t, int64_t, int64_t seq, int64_t) { return {0, 0, seq}; }
  static bool allowed(int64_t, int64_t, int64_t, int64_t) { return true; }
  static KeySpan reachable_keys(int64_t q0, int64_t seq) { return key_span(q0, seq, seq, 0); }
};

// Each query reads the W most recent keys, itself included (Mistral-style sliding window).
template <int W>
struct SlidingWindow {
  static_assert(W > 0, "SlidingWindow<W>: the window W must be positive (it counts the query itself)");
  static constexpr bool kCausal = true;
  static constexpr bool kAdaptive = false;
  static constexpr int kWindow = W;
  static constexpr std::string_view kName = "SlidingWindow";
  static KeySpan key_span(int64_t q0, int64_t q1, int64_t, int64_t) {
    return window_detail::causal_band(q0, q1, W);
  }
  static bool allowed(int64_t i, int64_t j, int64_t, int64_t) {
    return window_detail::in_causal_band(i, j, W);
  }
  static KeySpan reachable_keys(int64_t q0, int64_t seq) { return key_span(q0, seq, seq, W); }
};

// Sliding window plus G global tokens, as Longformer: the first G tokens are read by every
// query, and a global query reads every key.
//   Causal = true (decoder): "every key" stops at the query itself, so query i reads
//     j <= i with (i - j < W or j < G); a global query (i < G) thereby reads all of its past.
//   Causal = false (encoder, Longformer proper): the band is symmetric, |i - j| < W, and
//     global tokens read and are read by all: i < G or j < G.
template <int W, int G, bool Causal = true>
struct LocalGlobal {
  static_assert(W > 0, "LocalGlobal<W, G>: the local window W must be positive");
  static_assert(G >= 0, "LocalGlobal<W, G>: the number of global tokens G must be >= 0");
  static constexpr bool kCausal = Causal;
  static constexpr bool kAdaptive = false;
  static constexpr int kWindow = W;
  static constexpr int kGlobal = G;
  static constexpr std::string_view kName = "LocalGlobal";
  static KeySpan key_span(int64_t q0, int64_t q1, int64_t seq, int64_t) {
    const int64_t g = std::min<int64_t>(G, seq);
    if constexpr (Causal) {
      KeySpan s = window_detail::causal_band(q0, q1, W);
      s.global_end = g;
      return s;
    } else {
      if (q0 < G) return {0, 0, seq};  // a global query reads everything
      return {g, std::max<int64_t>(0, q0 - W + 1), std::min<int64_t>(seq, q1 + W - 1)};
    }
  }
  static bool allowed(int64_t i, int64_t j, int64_t, int64_t) {
    if constexpr (Causal) {
      return j <= i && (i - j < W || j < G);
    } else {
      return i < G || j < G || (i - j < W && j - i < W);
    }
  }
  static KeySpan reachable_keys(int64_t q0, int64_t seq) { return key_span(q0, seq, seq, W); }
};

// The compile-time set of window sizes a VariableWindow chooses from (ascending; kFull last).
template <int... S>
struct Sizes {
  static constexpr int kCount = sizeof...(S);
  static constexpr std::array<int, sizeof...(S)> kValues{S...};
  static constexpr bool positive() { return ((S > 0) && ...); }
  static constexpr bool ascending() {
    for (std::size_t i = 1; i < kValues.size(); ++i)
      if (kValues[i - 1] >= kValues[i]) return false;
    return true;
  }
};

// ---------------------------------------------------------------------------------------------
// Selectors. A selector is a tag with a nested `State<T>` that the attention layer owns:
//   State(d_model, n_sizes, Seed, subsequence)
//   void choose(const T* x /*(B, T, C)*/, B, seq, C, block, std::span<const int> sizes,
//               Choice& out) const        — fills out.index (B * query blocks) and its own saved
//                                             state in out (gate inputs and probabilities)
//   static constexpr bool kLearned          — whether backward has anything to do
//   for learned selectors: backward(dgate, x, choice, dx) and visit_parameters(f).
// ---------------------------------------------------------------------------------------------

// One forward's window choices, with what the learned selector's backward needs.
struct WindowChoice {
  int64_t batch = 0, blocks = 0, block = 0;  // query blocks per sequence, tokens per block
  std::vector<int> index;                    // (batch, blocks): index into the size set
  std::vector<double> signal;                // (batch, blocks): heuristic signal, if any
  std::vector<double> mean;                  // (batch, blocks, C): learned gate input
  std::vector<double> prob;                  // (batch, blocks, n_sizes): learned gate softmax
  std::vector<double> cost;                  // (n_sizes): cost of each size, in [0, 1]
  double aux_loss = 0.0;                     // learned: the compute penalty (add it to the loss)
};

namespace window_detail {

// The fraction of a full-causal row that a window of size w reads at sequence length seq,
// averaged over the rows: the compute cost the learned selector's penalty charges.
inline double window_cost(int64_t w, int64_t seq) {
  if (seq <= 0) return 0.0;
  const double s = static_cast<double>(seq);
  const double ww = static_cast<double>(std::min<int64_t>(w, seq));
  // Rows 0..seq-1 read min(i + 1, w) keys; full causal reads i + 1.
  const double read = ww * (ww + 1) / 2 + (s - ww) * ww;
  return read / (s * (s + 1) / 2);
}

template <class T>
double load(T v) {
  if constexpr (std::is_same_v<T, double> || std::is_same_v<T, float>) {
    return static_cast<double>(v);
  } else {
    return static_cast<double>(to_float(v));
  }
}

// The rows a query block's choice is computed from: the block-length span that ENDS at the
// block's first token, [q0 - block + 1, q0] clipped at 0. Every query of the block can already
// see those tokens, so the choice leaks nothing from the future — a causal model trained with it
// never reads ahead, and in decoding the choice is known when the block's first token arrives.
// (Using the block's own tokens would let token q0 + 3's content change token q0's window.)
struct SignalRows {
  int64_t begin, end;
};
inline SignalRows signal_rows(int64_t qb, int64_t block) {
  const int64_t q0 = qb * block;
  return {std::max<int64_t>(0, q0 - block + 1), q0 + 1};
}

inline void init_choice(WindowChoice& c, int64_t batch, int64_t seq, int64_t block) {
  c.batch = batch;
  c.block = block;
  c.blocks = (seq + block - 1) / block;
  c.index.assign(static_cast<size_t>(batch * c.blocks), 0);
  c.signal.clear();
  c.mean.clear();
  c.prob.clear();
  c.cost.clear();
  c.aux_loss = 0.0;
}

}  // namespace window_detail

// Always size index I: for tests (forcing every block to kFull must equal CausalFull) and for
// measuring one size's cost inside a VariableWindow model.
template <int I>
struct ForcedSelector {
  static_assert(I >= 0, "ForcedSelector<I>: the size index I must be >= 0");
  static constexpr int kIndex = I;
  template <class T>
  struct State {
    static constexpr bool kLearned = false;
    State(int64_t, int, Seed, uint64_t) {}
    void choose(const T*, int64_t batch, int64_t seq, int64_t, int64_t block,
                std::span<const int>, WindowChoice& out) const {
      window_detail::init_choice(out, batch, seq, block);
      std::fill(out.index.begin(), out.index.end(), I);
    }
  };
};

// Parameter-free content-complexity signal, from the normalised dispersion of the block's
// signal rows (the block-length span ending at its first token, see signal_rows: causal)
//
//   d = mean_t |x_t - mu|^2 / mean_t |x_t|^2  in [0, 1],   mu = their mean hidden state,
//
// turned into an effective number of distinct tokens N = 1 / (1 - d) (in [1, rows]) and put on
// a log scale relative to the span: signal = log N / log rows in [0, 1]. Equal-width bins of
// the signal pick the size: index = min(n - 1, floor(signal * n)).
//
// Why this signal: for nearly orthogonal token embeddings (random, or trained at high
// dimension) d is close to the Gini–Simpson diversity 1 - sum_k f_k^2 of the span's tokens
// (f_k the frequency of token k), so N is the inverse Simpson index — the "effective number"
// of different tokens. A span that repeats few symbols (whitespace, ASCII art, rulers, runs of
// digits, a repeated phrase at byte level) carries little information and is well served by
// its neighbours: short window. A span of varied content gets a long one. The log scale
// matters: natural text already has d ≈ 0.9 (N ≈ 10 of 64), so bins on d itself would put all
// prose in the top bin; on log N / log rows, byte-level prose sits mid-range, ASCII art low,
// and i.i.d. noise (N ≈ rows) at the top. It costs one pass over the span (O(block * C)), is
// scale-invariant (a norm's gain does not move it), and needs no training, so it works from
// step 0 and in models trained without it.
struct HeuristicSelector {
  template <class T>
  struct State {
    static constexpr bool kLearned = false;
    State(int64_t, int, Seed, uint64_t) {}

    static double dispersion(const T* x, int64_t rows, int64_t C) {
      std::vector<double> mu(static_cast<size_t>(C), 0.0);
      double sq = 0.0;
      for (int64_t t = 0; t < rows; ++t)
        for (int64_t c = 0; c < C; ++c) {
          const double v = window_detail::load(x[t * C + c]);
          mu[c] += v;
          sq += v * v;
        }
      double mu_sq = 0.0;
      for (double& m : mu) {
        m /= static_cast<double>(rows);
        mu_sq += m * m;
      }
      const double mean_sq = sq / static_cast<double>(rows);
      // mean |x - mu|^2 = mean |x|^2 - |mu|^2
      return mean_sq > 0.0 ? std::clamp((mean_sq - mu_sq) / mean_sq, 0.0, 1.0) : 0.0;
    }

    // log(1 / (1 - d)) / log(rows), in [0, 1]; 0 for a single row.
    static double signal(const T* x, int64_t rows, int64_t C) {
      if (rows < 2) return 0.0;
      const double d = dispersion(x, rows, C);
      const double n_eff = std::clamp(1.0 / std::max(1.0 - d, 1e-12), 1.0, static_cast<double>(rows));
      return std::log(n_eff) / std::log(static_cast<double>(rows));
    }

    void choose(const T* x, int64_t batch, int64_t seq, int64_t C, int64_t block,
                std::span<const int> sizes, WindowChoice& out) const {
      window_detail::init_choice(out, batch, seq, block);
      out.signal.assign(out.index.size(), 0.0);
      const int n = static_cast<int>(sizes.size());
      for (int64_t b = 0; b < batch; ++b)
        for (int64_t qb = 0; qb < out.blocks; ++qb) {
          const window_detail::SignalRows r = window_detail::signal_rows(qb, block);
          const double d = signal(x + (b * seq + r.begin) * C, r.end - r.begin, C);
          const int idx = std::min(n - 1, static_cast<int>(std::floor(d * n)));
          out.signal[b * out.blocks + qb] = d;
          out.index[b * out.blocks + qb] = idx;
        }
    }
  };
};

// A learned gate: logits = W m + b over the size set, m the mean hidden state of the block's
// signal rows (the block-length span ending at its first token, see signal_rows: causal).
//
// Forward takes the hard argmax (the block really runs with that window, so the saving is real)
// and multiplies the block's attention output by the straight-through factor
//   g = p_c / stopgrad(p_c)  (= 1 in the forward),  p = softmax(logits), c = argmax,
// so backward sends dL/dp_c = <dO_block, O_block> into the gate (and through the mean into x):
// if the chosen window's output helps the loss, p_c is raised, otherwise lowered.
// The compute penalty is penalty * mean over blocks of cost(c), cost in [0, 1] the fraction of
// full-causal work that size does (window_cost); its value is reported as WindowChoice::aux_loss
// (add it to the loss) and its gradient is the straight-through one, that of the expected cost
// penalty * mean over blocks of sum_s p_s cost(s). So the gate learns to pay for a long window
// only where the output gain exceeds the price.
struct LearnedSelector {
  template <class T>
  struct State {
    static constexpr bool kLearned = true;
    Parameter<T> weight;  // (n_sizes, C)
    Parameter<T> bias;    // (n_sizes)
    double penalty = 1e-2;

    State(int64_t d_model, int n_sizes, Seed seed, uint64_t subsequence) {
      std::vector<double> w(static_cast<size_t>(n_sizes * d_model));
      fill_normal<double>(w.data(), static_cast<int64_t>(w.size()), seed, subsequence, 0.0,
                          1.0 / std::sqrt(static_cast<double>(d_model)));
      weight.value = Tensor<T>::empty({n_sizes, d_model});
      for (size_t i = 0; i < w.size(); ++i) weight.value.data()[i] = store(w[i]);
      weight.grad = Tensor<T>::zeros({n_sizes, d_model});
      bias.value = Tensor<T>::zeros({n_sizes});
      bias.grad = Tensor<T>::zeros({n_sizes});
    }

    template <class F>
    void visit_parameters(F&& f) {
      f(std::string_view("weight"), weight);
      f(std::string_view("bias"), bias);
    }

    static T store(double v) {
      if constexpr (std::is_same_v<T, double> || std::is_same_v<T, float>) {
        return static_cast<T>(v);
      } else {
        return from_float<T>(static_cast<float>(v));
      }
    }

    void choose(const T* x, int64_t batch, int64_t seq, int64_t C, int64_t block,
                std::span<const int> sizes, WindowChoice& out) const {
      window_detail::init_choice(out, batch, seq, block);
      const int n = static_cast<int>(sizes.size());
      TESSERA_CHECK(weight.value.dim(0) == n && weight.value.dim(1) == C,
                    "LearnedSelector: gate weight has shape ", weight.value.shape(), ", expected [",
                    n, ", ", C, "]");
      const int64_t nb = batch * out.blocks;
      out.mean.assign(static_cast<size_t>(nb * C), 0.0);
      out.prob.assign(static_cast<size_t>(nb * n), 0.0);
      out.cost.resize(static_cast<size_t>(n));
      for (int s = 0; s < n; ++s) out.cost[s] = window_detail::window_cost(sizes[s], seq);
      double penalty_sum = 0.0;
      for (int64_t b = 0; b < batch; ++b)
        for (int64_t qb = 0; qb < out.blocks; ++qb) {
          const window_detail::SignalRows r = window_detail::signal_rows(qb, block);
          const int64_t g = b * out.blocks + qb;
          double* m = out.mean.data() + g * C;
          for (int64_t t = r.begin; t < r.end; ++t)
            for (int64_t c = 0; c < C; ++c) m[c] += window_detail::load(x[(b * seq + t) * C + c]);
          for (int64_t c = 0; c < C; ++c) m[c] /= static_cast<double>(r.end - r.begin);
          double* p = out.prob.data() + g * n;
          double mx = -HUGE_VAL;
          int best = 0;
          for (int s = 0; s < n; ++s) {
            double z = window_detail::load(bias.value.data()[s]);
            for (int64_t c = 0; c < C; ++c)
              z += window_detail::load(weight.value.data()[s * C + c]) * m[c];
            p[s] = z;
            if (z > mx) {  // first maximum wins: deterministic ties
              mx = z;
              best = s;
            }
          }
          double sum = 0.0;
          for (int s = 0; s < n; ++s) sum += (p[s] = std::exp(p[s] - mx));
          for (int s = 0; s < n; ++s) p[s] /= sum;
          out.index[g] = best;
          penalty_sum += out.cost[best];
        }
      out.aux_loss = nb > 0 ? penalty * penalty_sum / static_cast<double>(nb) : 0.0;
    }

    // dgate: (batch, blocks) = <dO_block, O_block> (dL/dg at g = 1). Accumulates into the gate's
    // gradients and adds the gate's share of dx (B, T, C) through the block means.
    void backward(std::span<const double> dgate, int64_t seq, int64_t C, const WindowChoice& ch,
                  T* dx) {
      const int n = static_cast<int>(weight.value.dim(0));
      const int64_t nb = ch.batch * ch.blocks;
      std::vector<double> dw(static_cast<size_t>(n * C), 0.0), db(static_cast<size_t>(n), 0.0);
      std::vector<double> dz(static_cast<size_t>(n));
      for (int64_t g = 0; g < nb; ++g) {
        const double* p = ch.prob.data() + g * n;
        const double* m = ch.mean.data() + g * C;
        const int c = ch.index[g];
        double expected_cost = 0.0;
        for (int s = 0; s < n; ++s) expected_cost += p[s] * ch.cost[s];
        // g = p_c / stopgrad(p_c): dL/dz_s = dgate * (delta_sc - p_s)   (dp_c/dz_s / p_c)
        // penalty: d/dz_s [k * sum_r p_r cost_r] = k * p_s * (cost_s - E[cost])
        const double k = penalty / static_cast<double>(nb);
        for (int s = 0; s < n; ++s)
          dz[s] = dgate[g] * ((s == c ? 1.0 : 0.0) - p[s]) + k * p[s] * (ch.cost[s] - expected_cost);
        for (int s = 0; s < n; ++s) {
          db[s] += dz[s];
          for (int64_t cc = 0; cc < C; ++cc) dw[s * C + cc] += dz[s] * m[cc];
        }
        // dm = W^T dz, spread evenly over the rows the mean was taken of.
        const int64_t b = g / ch.blocks, qb = g % ch.blocks;
        const window_detail::SignalRows r = window_detail::signal_rows(qb, ch.block);
        const double inv_rows = 1.0 / static_cast<double>(r.end - r.begin);
        for (int64_t cc = 0; cc < C; ++cc) {
          double dm = 0.0;
          for (int s = 0; s < n; ++s)
            dm += window_detail::load(weight.value.data()[s * C + cc]) * dz[s];
          dm *= inv_rows;
          for (int64_t t = r.begin; t < r.end; ++t) {
            T& v = dx[(b * seq + t) * C + cc];
            v = store(window_detail::load(v) + dm);
          }
        }
      }
      for (int s = 0; s < n; ++s) {
        bias.grad.data()[s] = store(window_detail::load(bias.grad.data()[s]) + db[s]);
        for (int64_t cc = 0; cc < C; ++cc) {
          T& v = weight.grad.data()[s * C + cc];
          v = store(window_detail::load(v) + dw[s * C + cc]);
        }
      }
    }
  };
};

namespace window_detail {
template <class S, int N>
constexpr bool selector_index_ok() {
  if constexpr (requires { S::kIndex; }) {
    return S::kIndex < N;
  } else {
    return true;
  }
}
}  // namespace window_detail

// Queries in blocks of BlockSize tokens; each block reads the causal band of the size its
// Selector picked from SizeSet (kFull = every earlier key).
template <class SizeSet, class Selector, int BlockSize = 64>
struct VariableWindow {
  static_assert(SizeSet::kCount > 0, "VariableWindow: the size set Sizes<...> must not be empty");
  static_assert(SizeSet::positive(),
                "VariableWindow: every window size must be positive (use kFull for full causal)");
  static_assert(SizeSet::ascending(),
                "VariableWindow: window sizes must be strictly ascending, e.g. Sizes<128, 512, kFull>");
  static_assert(BlockSize > 0, "VariableWindow: the query block size must be > 0");
  static_assert(window_detail::selector_index_ok<Selector, SizeSet::kCount>(),
                "VariableWindow: ForcedSelector<I> needs I < the number of window sizes");
  static constexpr bool kCausal = true;
  static constexpr bool kAdaptive = true;
  static constexpr int kBlockSize = BlockSize;
  static constexpr std::string_view kName = "VariableWindow";
  using SizeSetType = SizeSet;
  using SelectorType = Selector;
  static constexpr auto kSizes = SizeSet::kValues;

  static KeySpan key_span(int64_t q0, int64_t q1, int64_t, int64_t window) {
    return window_detail::causal_band(q0, q1, window);
  }
  static bool allowed(int64_t i, int64_t j, int64_t, int64_t window) {
    return window_detail::in_causal_band(i, j, window);
  }
  // A later query block may pick the largest size (kFull: every key stays reachable).
  static KeySpan reachable_keys(int64_t q0, int64_t seq) {
    return key_span(q0, seq, seq, kSizes.back());
  }
};

// Whether a type is a window policy (has the members nn::Attention uses).
template <class W>
concept WindowPolicy = requires(int64_t i) {
  { W::kCausal } -> std::convertible_to<bool>;
  { W::kAdaptive } -> std::convertible_to<bool>;
  { W::key_span(i, i, i, i) } -> std::same_as<KeySpan>;
  { W::allowed(i, i, i, i) } -> std::convertible_to<bool>;
};

}  // namespace tessera::nn

// The policies are part of a config's vocabulary (`ts::SlidingWindow<512>`, as in the API
// sketch), so they are also reachable from the top-level namespace.
namespace tessera {
using nn::Bidirectional;
using nn::CausalFull;
using nn::ForcedSelector;
using nn::HeuristicSelector;
using nn::kFull;
using nn::LearnedSelector;
using nn::LocalGlobal;
using nn::Sizes;
using nn::SlidingWindow;
using nn::VariableWindow;
}  // namespace tessera
