// tessera/nn/attention.hpp — multi-head attention with grouped-query heads, RoPE, and a
// compile-time window policy (tessera/nn/window.hpp).
//
// How it is built, and why:
//   * Projections wq, wk, wv, wo without bias (as DeepSeek / Llama); heads and kv_heads are
//     run-time numbers checked in the constructor (kv_heads must divide heads; query head h
//     reads kv head h / (heads / kv_heads)). They are run-time because a config's numbers
//     reach the layer as constructor arguments anyway, and nothing in the kernel gets faster
//     by knowing them at compile time; the window policy, which does change the kernel, is
//     the type parameter.
//   * RoPE (ops::rope, half-split layout by default) is applied to q and k after the
//     projections; scores are scaled by 1/sqrt(head_dim).
//   * The CPU kernel is tiled with an online softmax (flash-attention style): for each
//     (batch, head, query block) it walks the key tiles the window policy allows, keeping a
//     running max, sum and output per row. The T x T score matrix is never materialised, so
//     memory is O(T * head_dim) and 16k-token sequences run; and key tiles outside the query
//     block's window are never visited, so the cost follows the window, not T^2. Inside a tile
//     that is partly outside the window the policy's exact mask is applied per element.
//   * Saved for backward: x, q and k after RoPE, v, the attention output o (before wo), and
//     the per-row logsumexp. Backward recomputes each tile's probabilities from the saved
//     logsumexp (P = exp(s - lse)) as flash attention does, in two race-free passes: one over
//     (batch, head, query block) for dq, one over (batch, kv head, key block) for dk and dv.
//     Each output element is summed in a fixed order, so results do not depend on the thread
//     count.
//   * Accumulation is in double for T = double (finite-difference tests) and in float for
//     float / bf16 / fp16 (low-precision values are widened on load, rounded once on store).
//   * Stats: key tiles visited over the tiles full causal attention would visit with the same
//     block size (so 1 for CausalFull, > 1 for Bidirectional, about 2 (W + block) / T for a
//     sliding window W), plus VariableWindow's choices.
//
// Shapes: x (B, T, C); q (B, T, heads, head_dim); k, v (B, T, kv_heads, head_dim); o like q;
// lse (B, heads, T); y (B, T, C).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/core/number.hpp"
#include "tessera/core/rng.hpp"
#include "tessera/core/shape.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/nn/parameter.hpp"
#include "tessera/nn/window.hpp"
#include "tessera/ops/matmul.hpp"
#include "tessera/ops/rope.hpp"

namespace tessera::nn {

struct AttentionOptions {
  int64_t block = 64;          // query/key tile size (VariableWindow uses its own BlockSize)
  int64_t max_seq = 16384;     // positions in the RoPE table
  ops::RopeConfig rope{};      // theta, scaling, layout
};

// What one forward did.
struct AttentionStats {
  int64_t visited_tiles = 0;      // (query block, key tile) pairs visited, over batch and heads
  int64_t full_causal_tiles = 0;  // the same count for full causal attention
  std::vector<int64_t> window_histogram;  // VariableWindow: query blocks per size index
  double aux_loss = 0.0;                  // LearnedSelector's compute penalty (add to the loss)
  double work_fraction() const {
    return full_causal_tiles > 0
               ? static_cast<double>(visited_tiles) / static_cast<double>(full_causal_tiles)
               : 0.0;
  }
};

namespace attention_detail {

template <class T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <class A, class T>
inline A load(T v) {
  if constexpr (std::is_same_v<T, double> || std::is_same_v<T, float>) {
    return static_cast<A>(v);
  } else {
    return static_cast<A>(to_float(v));
  }
}

template <class T, class A>
inline T store(A v) {
  if constexpr (std::is_same_v<T, double> || std::is_same_v<T, float>) {
    return static_cast<T>(v);
  } else {
    return from_float<T>(static_cast<float>(v));
  }
}

// The key tiles [k0, k1) = [t * block, min(seq, (t + 1) * block)) a query block reads, in
// ascending order: those meeting [0, global_end) and those meeting [lo, hi).
struct TileRange {
  int64_t first_global_end;  // tiles [0, first_global_end)
  int64_t band_begin, band_end;  // then tiles [band_begin, band_end)
  int64_t count() const { return first_global_end + std::max<int64_t>(0, band_end - band_begin); }
  bool contains(int64_t t) const {
    return t < first_global_end || (t >= band_begin && t < band_end);
  }
};

template <class Window>
TileRange tiles_for(int64_t q0, int64_t q1, int64_t seq, int64_t window, int64_t block) {
  KeySpan s = Window::key_span(q0, q1, seq, window);
  const int64_t g = std::clamp<int64_t>(s.global_end, 0, seq);
  const int64_t lo = std::clamp<int64_t>(s.lo, 0, seq), hi = std::clamp<int64_t>(s.hi, 0, seq);
  TileRange r;
  r.first_global_end = (g + block - 1) / block;
  if (lo < hi) {
    r.band_begin = std::max(r.first_global_end, lo / block);
    r.band_end = (hi + block - 1) / block;
  } else {
    r.band_begin = r.band_end = 0;
  }
  return r;
}

template <class F>
void for_each_tile(const TileRange& r, F&& f) {
  for (int64_t t = 0; t < r.first_global_end; ++t) f(t);
  for (int64_t t = r.band_begin; t < r.band_end; ++t) f(t);
}

struct NoSelector {
  static constexpr bool kLearned = false;
};
template <class W, class T, bool = W::kAdaptive>
struct selector_state {
  using type = NoSelector;
};
template <class W, class T>
struct selector_state<W, T, true> {
  using type = typename W::SelectorType::template State<T>;
};

}  // namespace attention_detail

template <class T, WindowPolicy Window>
class Attention {
 public:
  using value_type = T;
  using window_policy = Window;
  using A = attention_detail::acc_t<T>;  // accumulation type

  // The selector's state: gate parameters for LearnedSelector, an empty type (NoSelector) when
  // the window is fixed.
  using NoSelector = attention_detail::NoSelector;
  using SelectorState = typename attention_detail::selector_state<Window, T>::type;

  struct Saved {
    Tensor<T> x;          // (B, T, C)
    Tensor<T> q;          // (B, T, heads, head_dim), after RoPE
    Tensor<T> k;          // (B, T, kv_heads, head_dim), after RoPE
    Tensor<T> v;          // (B, T, kv_heads * head_dim), read as (B, T, kv_heads, head_dim)
    Tensor<T> o;          // (B, T, heads, head_dim), attention output before wo
    Tensor<A> lse;        // (B, heads, T), logsumexp of each row's scaled scores
    WindowChoice choice;  // VariableWindow: each query block's window
    AttentionStats stats;
  };

  Attention(int64_t d_model, int64_t heads, int64_t kv_heads, Seed seed,
            uint64_t subsequence = 0, AttentionOptions options = {})
      : d_model_(d_model),
        heads_(heads),
        kv_heads_(kv_heads),
        head_dim_(checked_head_dim(d_model, heads, kv_heads)),
        block_(Window::kAdaptive ? block_of_window() : options.block),
        options_(options),
        rope_(options.rope, head_dim_, options.max_seq),
        selector_(make_selector(d_model, seed, subsequence)) {
    TESSERA_CHECK(block_ > 0, "Attention: options.block must be > 0, got ", options.block);
    const int64_t hd = heads * head_dim_, kvd = kv_heads * head_dim_;
    init(wq_, {hd, d_model}, seed, subsequence * 8 + 0, d_model);
    init(wk_, {kvd, d_model}, seed, subsequence * 8 + 1, d_model);
    init(wv_, {kvd, d_model}, seed, subsequence * 8 + 2, d_model);
    init(wo_, {d_model, hd}, seed, subsequence * 8 + 3, hd);
  }

  int64_t d_model() const { return d_model_; }
  int64_t heads() const { return heads_; }
  int64_t kv_heads() const { return kv_heads_; }
  int64_t head_dim() const { return head_dim_; }
  int64_t block() const { return block_; }
  const AttentionOptions& options() const { return options_; }
  const ops::RopeTable<A>& rope_table() const { return rope_; }
  Parameter<T>& wq() { return wq_; }
  Parameter<T>& wk() { return wk_; }
  Parameter<T>& wv() { return wv_; }
  Parameter<T>& wo() { return wo_; }
  SelectorState& selector() { return selector_; }
  const SelectorState& selector() const { return selector_; }

  template <class F>
  void visit_parameters(F&& f) {
    f(std::string_view("wq"), wq_);
    f(std::string_view("wk"), wk_);
    f(std::string_view("wv"), wv_);
    f(std::string_view("wo"), wo_);
    if constexpr (SelectorState::kLearned) {
      selector_.visit_parameters([&](std::string_view name, Parameter<T>& p) {
        const std::string full = "gate." + std::string(name);
        f(std::string_view(full), p);
      });
    }
  }

  // x (B, T, C) -> y (B, T, C).
  Tensor<T> forward(TensorView<const T, Cpu> x, Saved& saved) const {
    TESSERA_CHECK(x.rank() == 3, "Attention::forward: tensor 'x' must be (B, T, C), got shape ",
                  x.shape());
    TESSERA_CHECK(x.dim(2) == d_model_, "Attention::forward: tensor 'x' has C = ", x.dim(2),
                  " (shape ", x.shape(), "), expected d_model = ", d_model_);
    const int64_t B = x.dim(0), S = x.dim(1);
    TESSERA_CHECK(S <= rope_.max_positions(), "Attention::forward: sequence length ", S,
                  " exceeds options.max_seq = ", rope_.max_positions(), " (the RoPE table size)");
    saved.x = x.contiguous();  // (B, T, C)
    const TensorView<const T, Cpu> xv = saved.x.view();

    Tensor<T> q = ops::linear<T>(xv, wq_.value);  // (B, T, heads * head_dim)
    Tensor<T> k = ops::linear<T>(xv, wk_.value);  // (B, T, kv_heads * head_dim)
    saved.v = ops::linear<T>(xv, wv_.value);      // (B, T, kv_heads * head_dim)
    saved.q = ops::rope<T>(q.reshape({B, S, heads_, head_dim_}), rope_);      // (B, T, H, hd)
    saved.k = ops::rope<T>(k.reshape({B, S, kv_heads_, head_dim_}), rope_);   // (B, T, KV, hd)

    // Each query block's window.
    const int64_t nqb = (S + block_ - 1) / block_;
    saved.choice = WindowChoice{};
    if constexpr (Window::kAdaptive) {
      constexpr auto sizes = Window::kSizes;
      selector_.choose(saved.x.data(), B, S, d_model_, block_,
                       std::span<const int>(sizes.data(), sizes.size()), saved.choice);
    }

    saved.o = Tensor<T>::empty({B, S, heads_, head_dim_});
    saved.lse = Tensor<A>::empty({B, heads_, S});
    forward_kernel(B, S, saved);

    // Work done, counted once per (batch, query block) and multiplied by the heads.
    AttentionStats& st = saved.stats;
    st = AttentionStats{};
    if constexpr (Window::kAdaptive) st.window_histogram.assign(Window::kSizes.size(), 0);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t qb = 0; qb < nqb; ++qb) {
        const int64_t q0 = qb * block_, q1 = std::min(S, q0 + block_);
        st.visited_tiles += heads_ * attention_detail::tiles_for<Window>(
                                         q0, q1, S, window_of(saved.choice, b, qb), block_)
                                         .count();
        st.full_causal_tiles += heads_ * (qb + 1);
        if constexpr (Window::kAdaptive) ++st.window_histogram[saved.choice.index[b * nqb + qb]];
      }
    st.aux_loss = saved.choice.aux_loss;

    // (B, T, heads * head_dim) x wo^T -> (B, T, C)
    return ops::linear<T>(saved.o.reshape({B, S, heads_ * head_dim_}), wo_.value);
  }

  // dy (B, T, C) -> dx (B, T, C); accumulates into every parameter's grad.
  Tensor<T> backward(TensorView<const T, Cpu> dy, const Saved& saved) {
    const int64_t B = saved.x.dim(0), S = saved.x.dim(1);
    check_shape("Attention::backward", "dy", dy.shape(), Shape{B, S, d_model_});
    const int64_t hd_all = heads_ * head_dim_;
    const auto o2 = saved.o.reshape({B, S, hd_all});  // (B, T, H * hd)

    ops::LinearGrads<T> go = ops::linear_backward<T>(dy, o2, wo_.value, false);
    accumulate(wo_, go.dweight);
    const Tensor<T>& d_o = go.dx;  // (B, T, H * hd)

    auto dq = Tensor<T>::empty({B, S, heads_, head_dim_});
    auto dk = Tensor<T>::empty({B, S, kv_heads_, head_dim_});
    auto dv = Tensor<T>::empty({B, S, kv_heads_, head_dim_});
    backward_kernel(B, S, saved, d_o.data(), dq.data(), dk.data(), dv.data());

    Tensor<T> dq_pre = ops::rope_backward<T>(dq.view(), rope_);  // (B, T, H, hd)
    Tensor<T> dk_pre = ops::rope_backward<T>(dk.view(), rope_);  // (B, T, KV, hd)
    const auto xv = saved.x.view();
    ops::LinearGrads<T> gq = ops::linear_backward<T>(dq_pre.reshape({B, S, hd_all}), xv, wq_.value, false);
    ops::LinearGrads<T> gk =
        ops::linear_backward<T>(dk_pre.reshape({B, S, kv_heads_ * head_dim_}), xv, wk_.value, false);
    ops::LinearGrads<T> gv =
        ops::linear_backward<T>(dv.reshape({B, S, kv_heads_ * head_dim_}), xv, wv_.value, false);
    accumulate(wq_, gq.dweight);
    accumulate(wk_, gk.dweight);
    accumulate(wv_, gv.dweight);

    Tensor<T> dx = std::move(gq.dx);  // (B, T, C)
    {
      T* px = dx.data();
      const T* pk = gk.dx.data();
      const T* pv = gv.dx.data();
      for (int64_t i = 0; i < dx.numel(); ++i)
        px[i] = attention_detail::store<T, A>(attention_detail::load<A>(px[i]) +
                                              attention_detail::load<A>(pk[i]) +
                                              attention_detail::load<A>(pv[i]));
    }

    if constexpr (SelectorState::kLearned) {
      // dL/dg for each query block's straight-through gate factor: <dO_block, O_block>.
      const int64_t nqb = saved.choice.blocks;
      std::vector<double> dgate(static_cast<size_t>(B * nqb), 0.0);
      const T* po = saved.o.data();
      const T* pd = d_o.data();
      for (int64_t b = 0; b < B; ++b)
        for (int64_t t = 0; t < S; ++t) {
          double s = 0.0;
          const int64_t base = (b * S + t) * hd_all;
          for (int64_t c = 0; c < hd_all; ++c)
            s += attention_detail::load<double>(po[base + c]) *
                 attention_detail::load<double>(pd[base + c]);
          dgate[b * nqb + t / block_] += s;
        }
      selector_.backward(dgate, S, d_model_, saved.choice, dx.data());
    }
    return dx;
  }

 private:
  static int64_t checked_head_dim(int64_t d_model, int64_t heads, int64_t kv_heads) {
    TESSERA_CHECK(heads > 0 && kv_heads > 0, "Attention: heads and kv_heads must be positive, got ",
                  heads, " and ", kv_heads);
    TESSERA_CHECK(d_model > 0 && d_model % heads == 0, "Attention: heads (", heads,
                  ") must divide d_model (", d_model, ")");
    TESSERA_CHECK(heads % kv_heads == 0, "Attention: kv_heads (", kv_heads,
                  ") must divide heads (", heads, ")");
    return d_model / heads;
  }

  static int64_t block_of_window() {
    if constexpr (Window::kAdaptive) {
      return Window::kBlockSize;
    } else {
      return 0;
    }
  }

  static SelectorState make_selector(int64_t d_model, Seed seed, uint64_t subsequence) {
    if constexpr (Window::kAdaptive) {
      return SelectorState(d_model, static_cast<int>(Window::kSizes.size()), seed,
                           subsequence * 8 + 4);
    } else {
      return NoSelector{};
    }
  }

  static void init(Parameter<T>& p, Shape shape, Seed seed, uint64_t subsequence, int64_t fan_in) {
    std::vector<double> w(static_cast<size_t>(shape.numel()));
    fill_normal<double>(w.data(), shape.numel(), seed, subsequence, 0.0,
                        1.0 / std::sqrt(static_cast<double>(fan_in)));
    p.value = Tensor<T>::empty(shape);
    for (size_t i = 0; i < w.size(); ++i) p.value.data()[i] = attention_detail::store<T, double>(w[i]);
    p.grad = Tensor<T>::zeros(shape);
  }

  static void accumulate(Parameter<T>& p, const Tensor<T>& g) {
    T* pg = p.grad.data();
    const T* d = g.data();
    for (int64_t i = 0; i < g.numel(); ++i)
      pg[i] = attention_detail::store<T, A>(attention_detail::load<A>(pg[i]) +
                                            attention_detail::load<A>(d[i]));
  }

  // The run-time window of query block qb of sequence b (ignored by the fixed policies).
  static int64_t window_of(const WindowChoice& c, int64_t b, int64_t qb) {
    if constexpr (Window::kAdaptive) {
      return Window::kSizes[static_cast<size_t>(c.index[b * c.blocks + qb])];
    } else {
      (void)c, (void)b, (void)qb;
      return 0;
    }
  }

  // Threads pay off once a call has a few hundred thousand multiply-adds; below that (the
  // finite-difference tests run thousands of tiny forwards) starting them costs more.
  bool parallel_worth_it(int64_t B, int64_t S) const {
    return B * heads_ * S * std::min<int64_t>(S, 4 * block_) * head_dim_ >= (int64_t{1} << 18);
  }

  // Online-softmax forward over the allowed key tiles; fills saved.o and saved.lse.
  void forward_kernel(int64_t B, int64_t S, Saved& saved) const {
    using attention_detail::load;
    using attention_detail::store;
    const int64_t H = heads_, KV = kv_heads_, D = head_dim_, blk = block_;
    const int64_t group = H / KV;
    const int64_t nqb = (S + blk - 1) / blk;
    const A scale = A(1) / std::sqrt(static_cast<A>(D));
    const T* pq = saved.q.data();
    const T* pk = saved.k.data();
    const T* pv = saved.v.data();
    T* po = saved.o.data();
    A* plse = saved.lse.data();
    const WindowChoice& choice = saved.choice;
    const int64_t tasks = B * H * nqb;
#pragma omp parallel for schedule(dynamic, 1) if (parallel_worth_it(B, S))
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t qb = task % nqb, h = (task / nqb) % H, b = task / (nqb * H);
      const int64_t kvh = h / group;
      const int64_t q0 = qb * blk, q1 = std::min(S, q0 + blk), rows = q1 - q0;
      const int64_t window = window_of(choice, b, qb);
      // Per row: running max m, running sum l, unnormalised output acc (rows, D).
      std::vector<A> qs(static_cast<size_t>(rows * D)), acc(static_cast<size_t>(rows * D), A(0));
      std::vector<A> m(static_cast<size_t>(rows), -std::numeric_limits<A>::infinity());
      std::vector<A> l(static_cast<size_t>(rows), A(0));
      std::vector<A> kt(static_cast<size_t>(blk * D)), vt(static_cast<size_t>(blk * D));
      std::vector<A> s(static_cast<size_t>(blk));
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t d = 0; d < D; ++d)
          qs[r * D + d] = load<A>(pq[((b * S + q0 + r) * H + h) * D + d]) * scale;
      const attention_detail::TileRange tiles =
          attention_detail::tiles_for<Window>(q0, q1, S, window, blk);
      attention_detail::for_each_tile(tiles, [&](int64_t t) {
        const int64_t k0 = t * blk, k1 = std::min(S, k0 + blk), cols = k1 - k0;
        for (int64_t j = 0; j < cols; ++j)
          for (int64_t d = 0; d < D; ++d) {
            const int64_t at = ((b * S + k0 + j) * KV + kvh) * D + d;
            kt[j * D + d] = load<A>(pk[at]);
            vt[j * D + d] = load<A>(pv[at]);
          }
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = q0 + r;
          const A* qr = &qs[r * D];
          A tile_max = -std::numeric_limits<A>::infinity();
          for (int64_t j = 0; j < cols; ++j) {
            if (!Window::allowed(i, k0 + j, S, window)) {
              s[j] = -std::numeric_limits<A>::infinity();
              continue;
            }
            A dot = 0;
            for (int64_t d = 0; d < D; ++d) dot += qr[d] * kt[j * D + d];
            s[j] = dot;
            tile_max = std::max(tile_max, dot);
          }
          if (tile_max == -std::numeric_limits<A>::infinity()) continue;  // nothing allowed here
          const A m_new = std::max(m[r], tile_max);
          const A correction = std::exp(m[r] - m_new);  // exp(-inf) = 0 on the first tile
          A* ar = &acc[r * D];
          A sum = 0;
          for (int64_t d = 0; d < D; ++d) ar[d] *= correction;
          for (int64_t j = 0; j < cols; ++j) {
            if (s[j] == -std::numeric_limits<A>::infinity()) continue;
            const A p = std::exp(s[j] - m_new);
            sum += p;
            for (int64_t d = 0; d < D; ++d) ar[d] += p * vt[j * D + d];
          }
          l[r] = l[r] * correction + sum;
          m[r] = m_new;
        }
      });
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = q0 + r;
        const A inv = l[r] > A(0) ? A(1) / l[r] : A(0);  // a row with no key outputs 0
        for (int64_t d = 0; d < D; ++d)
          po[((b * S + i) * H + h) * D + d] = store<T, A>(acc[r * D + d] * inv);
        plse[(b * H + h) * S + i] =
            l[r] > A(0) ? m[r] + std::log(l[r]) : -std::numeric_limits<A>::infinity();
      }
    }
  }

  // Flash-attention backward: P recomputed from the saved logsumexp, tile by tile.
  //   dV_j = sum_i P_ij dO_i;  dP_ij = dO_i . v_j;  dS_ij = P_ij (dP_ij - Delta_i),
  //   Delta_i = dO_i . O_i;  dq_i = scale sum_j dS_ij k_j;  dk_j = scale sum_i dS_ij q_i.
  void backward_kernel(int64_t B, int64_t S, const Saved& saved, const T* pdo, T* pdq, T* pdk,
                       T* pdv) const {
    using attention_detail::load;
    using attention_detail::store;
    const int64_t H = heads_, KV = kv_heads_, D = head_dim_, blk = block_;
    const int64_t group = H / KV;
    const int64_t nqb = (S + blk - 1) / blk;
    const A scale = A(1) / std::sqrt(static_cast<A>(D));
    const T* pq = saved.q.data();
    const T* pk = saved.k.data();
    const T* pv = saved.v.data();
    const T* po = saved.o.data();
    const A* plse = saved.lse.data();
    const WindowChoice& choice = saved.choice;
    auto q_at = [&](int64_t b, int64_t i, int64_t h) { return ((b * S + i) * H + h) * D; };
    auto k_at = [&](int64_t b, int64_t j, int64_t g) { return ((b * S + j) * KV + g) * D; };

    // Delta_i = dO_i . O_i, (B, H, T).
    std::vector<A> delta(static_cast<size_t>(B * H * S));
#pragma omp parallel for schedule(static) if (parallel_worth_it(B, S))
    for (int64_t bh = 0; bh < B * H; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      for (int64_t i = 0; i < S; ++i) {
        A s = 0;
        for (int64_t d = 0; d < D; ++d)
          s += load<A>(pdo[q_at(b, i, h) + d]) * load<A>(po[q_at(b, i, h) + d]);
        delta[bh * S + i] = s;
      }
    }

    // The probability and dS of one allowed (i, j) pair; returns false when masked.
    auto pair = [&](int64_t b, int64_t h, int64_t i, int64_t j, int64_t window, A& p, A& ds) {
      if (!Window::allowed(i, j, S, window)) return false;
      const int64_t kvh = h / group;
      A dot = 0, dp = 0;
      for (int64_t d = 0; d < D; ++d) {
        dot += load<A>(pq[q_at(b, i, h) + d]) * load<A>(pk[k_at(b, j, kvh) + d]);
        dp += load<A>(pdo[q_at(b, i, h) + d]) * load<A>(pv[k_at(b, j, kvh) + d]);
      }
      p = std::exp(dot * scale - plse[(b * H + h) * S + i]);
      ds = p * (dp - delta[(b * H + h) * S + i]);
      return true;
    };

    // Pass 1: dq, one task per (batch, head, query block).
#pragma omp parallel for schedule(dynamic, 1) if (parallel_worth_it(B, S))
    for (int64_t task = 0; task < B * H * nqb; ++task) {
      const int64_t qb = task % nqb, h = (task / nqb) % H, b = task / (nqb * H);
      const int64_t kvh = h / group;
      const int64_t q0 = qb * blk, q1 = std::min(S, q0 + blk), rows = q1 - q0;
      const int64_t window = window_of(choice, b, qb);
      std::vector<A> acc(static_cast<size_t>(rows * D), A(0));
      attention_detail::for_each_tile(
          attention_detail::tiles_for<Window>(q0, q1, S, window, blk), [&](int64_t t) {
            const int64_t k0 = t * blk, k1 = std::min(S, k0 + blk);
            for (int64_t i = q0; i < q1; ++i)
              for (int64_t j = k0; j < k1; ++j) {
                A p, ds;
                if (!pair(b, h, i, j, window, p, ds)) continue;
                for (int64_t d = 0; d < D; ++d)
                  acc[(i - q0) * D + d] += ds * load<A>(pk[k_at(b, j, kvh) + d]);
              }
          });
      for (int64_t i = q0; i < q1; ++i)
        for (int64_t d = 0; d < D; ++d)
          pdq[q_at(b, i, h) + d] = store<T, A>(acc[(i - q0) * D + d] * scale);
    }

    // Pass 2: dk, dv, one task per (batch, kv head, key tile); it visits every query block
    // whose window reads this tile, for every query head of the group, in a fixed order.
    const int64_t nkb = nqb;
#pragma omp parallel for schedule(dynamic, 1) if (parallel_worth_it(B, S))
    for (int64_t task = 0; task < B * KV * nkb; ++task) {
      const int64_t t = task % nkb, kvh = (task / nkb) % KV, b = task / (nkb * KV);
      const int64_t k0 = t * blk, k1 = std::min(S, k0 + blk), cols = k1 - k0;
      std::vector<A> dk(static_cast<size_t>(cols * D), A(0)), dv(static_cast<size_t>(cols * D), A(0));
      for (int64_t qb = 0; qb < nqb; ++qb) {
        const int64_t q0 = qb * blk, q1 = std::min(S, q0 + blk);
        const int64_t window = window_of(choice, b, qb);
        if (!attention_detail::tiles_for<Window>(q0, q1, S, window, blk).contains(t)) continue;
        for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h)
          for (int64_t i = q0; i < q1; ++i)
            for (int64_t j = k0; j < k1; ++j) {
              A p, ds;
              if (!pair(b, h, i, j, window, p, ds)) continue;
              for (int64_t d = 0; d < D; ++d) {
                dv[(j - k0) * D + d] += p * load<A>(pdo[q_at(b, i, h) + d]);
                dk[(j - k0) * D + d] += ds * load<A>(pq[q_at(b, i, h) + d]);
              }
            }
      }
      for (int64_t j = k0; j < k1; ++j)
        for (int64_t d = 0; d < D; ++d) {
          pdk[k_at(b, j, kvh) + d] = store<T, A>(dk[(j - k0) * D + d] * scale);
          pdv[k_at(b, j, kvh) + d] = store<T, A>(dv[(j - k0) * D + d]);
        }
    }
  }

  int64_t d_model_, heads_, kv_heads_, head_dim_, block_;
  AttentionOptions options_;
  ops::RopeTable<A> rope_;
  Parameter<T> wq_, wk_, wv_, wo_;  // (H*hd, C), (KV*hd, C), (KV*hd, C), (C, H*hd)
  SelectorState selector_;
};

}  // namespace tessera::nn
