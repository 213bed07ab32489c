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
//   * Speed: each visited tile costs a few (block x head_dim) by (head_dim x block) products,
//     too small for a BLAS call, so they run on a register-blocked micro-kernel over GCC
//     vector types (attention_detail::gemm), compiled for 16-, 32- and 64-byte vectors and
//     picked per call from CPUID like the row ops (ops/detail/rows.hpp; TESSERA_ROW_ISA forces
//     a path). q, k, v (and dO in backward) are packed once per call into padded tiles, K and
//     V transposed where the product streams their rows, so the tile loops read contiguous
//     memory; packing is O(T * head_dim) memory and time. Softmax statistics are kept per
//     vector lane, exp is the vectorisable float polynomial of the row ops (libm's in double).
//     The results' contract does not depend on any of this: one summation order per element,
//     independent of the thread count (it may differ between instruction-set paths, as the
//     row ops' does).
//   * The projections are recipe_linear products (quant/fp8_training.hpp: ops::linear, or an
//     FP8 recipe's quantised product when a trainer installed one); the score, softmax and
//     value products of the kernel below stay in T.
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
#include "tessera/ops/detail/rows.hpp"
#include "tessera/ops/matmul.hpp"
#include "tessera/ops/rope.hpp"
#include "tessera/quant/fp8_training.hpp"

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

// ---- vectorised tile products ----------------------------------------------------------------
// The per-tile products (Q K^T, P V and the backward's four) are small matrix products, (block x
// head_dim) by (head_dim x block) and back, too small for a BLAS call (its overhead is of the
// order of the product) but large enough that scalar loops waste most of the core. So they are
// written here as a register-blocked micro-kernel on GCC/Clang vector types: C (rows x n) =
// init + A (rows x k) B (k x n), each C element kept in a register while k runs in ascending
// order. B's rows are contiguous and n is padded to whole vectors; A's elements are broadcast.
// The same code is compiled for 16-, 32- and 64-byte vectors (baseline x86-64 / NEON, AVX2+FMA,
// AVX-512) and one is picked per call from CPUID, as the row ops do (ops/detail/rows.hpp):
// tessera is built with the compiler's baseline flags.

template <class A, int kBytes>
struct VecOf {
  typedef A type __attribute__((vector_size(kBytes)));
};

// What C starts from: 0 (a fresh product), C itself (accumulate), or C times a per-row factor
// (the online softmax's rescaling of the running output).
enum class Init { kZero, kAdd, kScale };

// One register block: rows [0, kR) and columns [0, kNV vectors) of C.
template <class A, int kBytes, int kR, int kNV, Init kInit>
TESSERA_FORCE_INLINE void gemm_block(int64_t k, const A* a, int64_t lda, const A* b, int64_t ldb,
                                     A* c, int64_t ldc, const A* row_scale) {
  using V = typename VecOf<A, kBytes>::type;
  constexpr int kLanes = kBytes / static_cast<int>(sizeof(A));
  V acc[kR][kNV];
#pragma GCC unroll 8
  for (int r = 0; r < kR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < kNV; ++v) {
      if constexpr (kInit == Init::kZero) {
        acc[r][v] = V{};
      } else {
        __builtin_memcpy(&acc[r][v], c + r * ldc + v * kLanes, sizeof(V));
        if constexpr (kInit == Init::kScale) acc[r][v] *= row_scale[r];
      }
    }
  for (int64_t p = 0; p < k; ++p) {
    V bv[kNV];
#pragma GCC unroll 8
    for (int v = 0; v < kNV; ++v) __builtin_memcpy(&bv[v], b + p * ldb + v * kLanes, sizeof(V));
#pragma GCC unroll 8
    for (int r = 0; r < kR; ++r) {
      const A s = a[r * lda + p];
#pragma GCC unroll 8
      for (int v = 0; v < kNV; ++v) acc[r][v] += s * bv[v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < kNV; ++v) __builtin_memcpy(c + r * ldc + v * kLanes, &acc[r][v], sizeof(V));
}

template <class A, int kBytes, int kR, Init kInit>
TESSERA_FORCE_INLINE void gemm_rows(int64_t n, int64_t k, const A* a, int64_t lda, const A* b,
                                    int64_t ldb, A* c, int64_t ldc, const A* row_scale) {
  constexpr int kLanes = kBytes / static_cast<int>(sizeof(A));
  // 4 x 4 vectors fill half of AVX-512's 32 registers; 4 x 2 fit the 16 of AVX2 and SSE.
  constexpr int kNV = kBytes == 64 ? 4 : 2;
  int64_t j = 0;
  for (; j + kNV * kLanes <= n; j += kNV * kLanes)
    gemm_block<A, kBytes, kR, kNV, kInit>(k, a, lda, b + j, ldb, c + j, ldc, row_scale);
  for (; j < n; j += kLanes)
    gemm_block<A, kBytes, kR, 1, kInit>(k, a, lda, b + j, ldb, c + j, ldc, row_scale);
}

template <class A, int kBytes, Init kInit>
TESSERA_FORCE_INLINE void gemm_body(int64_t rows, int64_t n, int64_t k, const A* a, int64_t lda,
                                    const A* b, int64_t ldb, A* c, int64_t ldc,
                                    const A* row_scale) {
  constexpr int kR = 4;
  int64_t r = 0;
  for (; r + kR <= rows; r += kR)
    gemm_rows<A, kBytes, kR, kInit>(n, k, a + r * lda, lda, b, ldb, c + r * ldc, ldc,
                                    kInit == Init::kScale ? row_scale + r : nullptr);
  for (; r < rows; ++r)
    gemm_rows<A, kBytes, 1, kInit>(n, k, a + r * lda, lda, b, ldb, c + r * ldc, ldc,
                                   kInit == Init::kScale ? row_scale + r : nullptr);
}

// One out-of-line product per (type, init, instruction set), shared by every window policy and
// element type. Inlined into each policy's tile loops it was compiled again for each: a test
// instantiating a dozen layer types took 126 s to compile instead of 69 s (40 s with the old
// scalar loops). A call per tile product costs nothing next to the product.
template <class A, Init kInit>
__attribute__((noinline)) TESSERA_ROWS_FLATTEN void gemm_baseline(int64_t rows, int64_t n,
                                                                  int64_t k, const A* a,
                                                                  int64_t lda, const A* b,
                                                                  int64_t ldb, A* c, int64_t ldc,
                                                                  const A* row_scale) {
  gemm_body<A, 16, kInit>(rows, n, k, a, lda, b, ldb, c, ldc, row_scale);
}
#if defined(TESSERA_ROWS_MULTI_ISA)
template <class A, Init kInit>
__attribute__((noinline)) TESSERA_ROWS_TARGET_AVX2 void gemm_avx2(int64_t rows, int64_t n,
                                                                  int64_t k, const A* a,
                                                                  int64_t lda, const A* b,
                                                                  int64_t ldb, A* c, int64_t ldc,
                                                                  const A* row_scale) {
  gemm_body<A, 32, kInit>(rows, n, k, a, lda, b, ldb, c, ldc, row_scale);
}
template <class A, Init kInit>
__attribute__((noinline)) TESSERA_ROWS_TARGET_AVX512 void gemm_avx512(
    int64_t rows, int64_t n, int64_t k, const A* a, int64_t lda, const A* b, int64_t ldb, A* c,
    int64_t ldc, const A* row_scale) {
  gemm_body<A, 64, kInit>(rows, n, k, a, lda, b, ldb, c, ldc, row_scale);
}
#endif

// C (rows x n, row stride ldc) = init + A (rows x k, stride lda) B (k x n, stride ldb), with n a
// multiple of the vector's lanes. Every C element is summed in one order (its initial value, then
// p = 0, 1, ..., k - 1), whatever the row and column blocking.
template <class A, int kBytes, Init kInit>
TESSERA_FORCE_INLINE void gemm(int64_t rows, int64_t n, int64_t k, const A* a, int64_t lda,
                               const A* b, int64_t ldb, A* c, int64_t ldc,
                               const A* row_scale = nullptr) {
#if defined(TESSERA_ROWS_MULTI_ISA)
  if constexpr (kBytes == 64) {
    gemm_avx512<A, kInit>(rows, n, k, a, lda, b, ldb, c, ldc, row_scale);
    return;
  } else if constexpr (kBytes == 32) {
    gemm_avx2<A, kInit>(rows, n, k, a, lda, b, ldb, c, ldc, row_scale);
    return;
  }
#endif
  if constexpr (kBytes == 16)
    gemm_baseline<A, kInit>(rows, n, k, a, lda, b, ldb, c, ldc, row_scale);
}

// The largest of v[0, n), by halving (exact: max does not round, so the order is free).
template <class A, int64_t n>
TESSERA_FORCE_INLINE A max_of(const A* v) {
  A m[n];
  for (int64_t e = 0; e < n; ++e) m[e] = v[e];
#pragma GCC unroll 8
  for (int64_t w = n / 2; w > 0; w /= 2)
    for (int64_t e = 0; e < w; ++e) m[e] = m[e + w] > m[e] ? m[e + w] : m[e];
  return m[0];
}

// The vector width (bytes) of an instruction-set path.
inline int vector_bytes(ops::rows_detail::Isa isa) {
  switch (isa) {
    case ops::rows_detail::Isa::kAvx512:
      return 64;
    case ops::rows_detail::Isa::kAvx2:
      return 32;
    case ops::rows_detail::Isa::kBaseline:
      break;
  }
  return 16;
}

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Calls f(std::integral_constant<int, vector bytes>) from a function compiled for `isa`, which
// inlines f and everything it calls (flatten), so a whole tile loop runs on that path.
template <class F>
TESSERA_ROWS_FLATTEN void call_baseline(const F& f) {
  f(std::integral_constant<int, 16>{});
}
#if defined(TESSERA_ROWS_MULTI_ISA)
template <class F>
TESSERA_ROWS_TARGET_AVX2 void call_avx2(const F& f) {
  f(std::integral_constant<int, 32>{});
}
template <class F>
TESSERA_ROWS_TARGET_AVX512 void call_avx512(const F& f) {
  f(std::integral_constant<int, 64>{});
}
#endif

template <class F>
void with_isa(ops::rows_detail::Isa isa, const F& f) {
#if defined(TESSERA_ROWS_MULTI_ISA)
  switch (isa) {
    case ops::rows_detail::Isa::kAvx512:
      call_avx512(f);
      return;
    case ops::rows_detail::Isa::kAvx2:
      call_avx2(f);
      return;
    case ops::rows_detail::Isa::kBaseline:
      break;
  }
#endif
  (void)isa;
  call_baseline(f);
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

  // The selector's state (gate parameters for LearnedSelector), or an empty placeholder.
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
    // Key padding: sequence b's keys are [0, key_lengths[b]); the rest are padding, never read
    // (and get zero dk, dv). Empty: every key is real.
    std::vector<int64_t> key_lengths;
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
    saved.key_lengths.clear();
    return forward_impl(x, saved);
  }

  // The same with key padding: sequence b holds key_lengths[b] real tokens followed by padding
  // (right padding, as a batch of documents of different lengths is laid out). No query reads a
  // padded key, so every real token's output is what the sequence alone would give; the padded
  // positions' own outputs are computed from the real keys and mean nothing (mask them out
  // downstream). Key tiles wholly inside the padding are skipped. Not with an adaptive window:
  // its selector reads whole query blocks of x, padding included.
  Tensor<T> forward(TensorView<const T, Cpu> x, Saved& saved,
                    std::span<const int64_t> key_lengths) const {
    TESSERA_CHECK(x.rank() == 3, "Attention::forward: tensor 'x' must be (B, T, C), got shape ",
                  x.shape());
    TESSERA_CHECK(static_cast<int64_t>(key_lengths.size()) == x.dim(0),
                  "Attention::forward: key_lengths holds ", key_lengths.size(),
                  " lengths, expected one per sequence: ", x.dim(0));
    for (size_t b = 0; b < key_lengths.size(); ++b)
      TESSERA_CHECK(key_lengths[b] >= 1 && key_lengths[b] <= x.dim(1),
                    "Attention::forward: key_lengths[", b, "] = ", key_lengths[b],
                    " must be in [1, T = ", x.dim(1), "]");
    TESSERA_CHECK(!Window::kAdaptive, "Attention::forward: key padding is not supported with ",
                  Window::kName, " (its selector reads whole query blocks, padding included)");
    saved.key_lengths.assign(key_lengths.begin(), key_lengths.end());
    return forward_impl(x, saved);
  }

 private:
  Tensor<T> forward_impl(TensorView<const T, Cpu> x, Saved& saved) const {
    TESSERA_CHECK(x.rank() == 3, "Attention::forward: tensor 'x' must be (B, T, C), got shape ",
                  x.shape());
    TESSERA_CHECK(x.dim(2) == d_model_, "Attention::forward: tensor 'x' has C = ", x.dim(2),
                  " (shape ", x.shape(), "), expected d_model = ", d_model_);
    const int64_t B = x.dim(0), S = x.dim(1);
    TESSERA_CHECK(S <= rope_.max_positions(), "Attention::forward: sequence length ", S,
                  " exceeds options.max_seq = ", rope_.max_positions(), " (the RoPE table size)");
    saved.x = x.contiguous();  // (B, T, C)
    const TensorView<const T, Cpu> xv = saved.x.view();

    Tensor<T> q = recipe_linear<T>(xv, wq_.value);  // (B, T, heads * head_dim)
    Tensor<T> k = recipe_linear<T>(xv, wk_.value);  // (B, T, kv_heads * head_dim)
    saved.v = recipe_linear<T>(xv, wv_.value);      // (B, T, kv_heads * head_dim)
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

    core_forward(saved);

    // Work done, counted once per (batch, query block) and multiplied by the heads.
    AttentionStats& st = saved.stats;
    st = AttentionStats{};
    if constexpr (Window::kAdaptive) st.window_histogram.assign(Window::kSizes.size(), 0);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t qb = 0; qb < nqb; ++qb) {
        const int64_t q0 = qb * block_, q1 = std::min(S, q0 + block_);
        const attention_detail::TileRange tiles =
            attention_detail::tiles_for<Window>(q0, q1, S, window_of(saved.choice, b, qb), block_);
        int64_t visited = tiles.count();
        if (!saved.key_lengths.empty()) {  // tiles inside the padding are skipped
          visited = 0;
          attention_detail::for_each_tile(tiles, [&](int64_t t) {
            visited += t * block_ < saved.key_lengths[size_t(b)];
          });
        }
        st.visited_tiles += heads_ * visited;
        st.full_causal_tiles += heads_ * (qb + 1);
        if constexpr (Window::kAdaptive) ++st.window_histogram[saved.choice.index[b * nqb + qb]];
      }
    st.aux_loss = saved.choice.aux_loss;

    // (B, T, heads * head_dim) x wo^T -> (B, T, C)
    return recipe_linear<T>(saved.o.reshape({B, S, heads_ * head_dim_}), wo_.value);
  }

 public:
  // The gradients of the attention core: dq (B, T, heads, hd) and dk, dv (B, T, kv_heads, hd),
  // with respect to q and k after RoPE.
  struct CoreGrads {
    Tensor<T> dq;
    Tensor<T> dk;
    Tensor<T> dv;
  };

  // The attention core alone, the part of forward between the projections: fills saved.o and
  // saved.lse from saved.q, saved.k, saved.v and saved.choice (forward sets those first). Public
  // because it is useful by itself: a recompute policy can rebuild o from the saved q, k, v
  // without redoing the projections, and benchmarks/attention_bench times the kernel alone.
  void core_forward(Saved& saved) const {
    const Shape qs = saved.q.shape();
    TESSERA_CHECK(qs.rank() == 4 && qs[2] == heads_ && qs[3] == head_dim_,
                  "Attention::core_forward: tensor 'saved.q' must be (B, T, ", heads_, ", ",
                  head_dim_, "), got shape ", qs);
    const int64_t B = qs[0], S = qs[1];
    check_shape("Attention::core_forward", "saved.k", saved.k.shape(),
                Shape{B, S, kv_heads_, head_dim_});
    TESSERA_CHECK(saved.v.numel() == B * S * kv_heads_ * head_dim_,
                  "Attention::core_forward: tensor 'saved.v' has shape ", saved.v.shape(),
                  ", expected ", B * S * kv_heads_ * head_dim_, " elements (B, T, kv_heads * hd)");
    if constexpr (Window::kAdaptive) {
      const int64_t nqb = (S + block_ - 1) / block_;
      TESSERA_CHECK(
          saved.choice.blocks == nqb && saved.choice.index.size() == static_cast<size_t>(B * nqb),
          "Attention::core_forward: saved.choice holds ", saved.choice.index.size(),
          " window choices, expected one per query block: ", B * nqb);
    }
    TESSERA_CHECK(saved.key_lengths.empty() || static_cast<int64_t>(saved.key_lengths.size()) == B,
                  "Attention::core_forward: saved.key_lengths holds ", saved.key_lengths.size(),
                  " lengths, expected one per sequence: ", B);
    saved.o = Tensor<T>::empty({B, S, heads_, head_dim_});
    saved.lse = Tensor<A>::empty({B, heads_, S});
    forward_kernel(B, S, saved);
  }

  // The core's backward, from d_o (the gradient of o: (B, T, heads * hd) or (B, T, heads, hd))
  // and what forward saved.
  CoreGrads core_backward(const Saved& saved, TensorView<const T, Cpu> d_o) const {
    TESSERA_CHECK(saved.o.rank() == 4 && saved.lse.rank() == 3,
                  "Attention::core_backward: 'saved' holds no forward (saved.o has shape ",
                  saved.o.shape(), "); call forward or core_forward first");
    const int64_t B = saved.o.dim(0), S = saved.o.dim(1);
    const bool flat =
        d_o.rank() == 3 && d_o.dim(0) == B && d_o.dim(1) == S && d_o.dim(2) == heads_ * head_dim_;
    if (!flat) check_shape("Attention::core_backward", "d_o", d_o.shape(), saved.o.shape());
    Tensor<T> copy;
    const T* pdo = d_o.data();
    if (!d_o.is_contiguous()) {
      copy = d_o.contiguous();
      pdo = copy.data();
    }
    CoreGrads g;
    g.dq = Tensor<T>::empty({B, S, heads_, head_dim_});
    g.dk = Tensor<T>::empty({B, S, kv_heads_, head_dim_});
    g.dv = Tensor<T>::empty({B, S, kv_heads_, head_dim_});
    backward_kernel(B, S, saved, pdo, g.dq.data(), g.dk.data(), g.dv.data());
    return g;
  }

  // dy (B, T, C) -> dx (B, T, C); accumulates into every parameter's grad.
  Tensor<T> backward(TensorView<const T, Cpu> dy, const Saved& saved) {
    const int64_t B = saved.x.dim(0), S = saved.x.dim(1);
    check_shape("Attention::backward", "dy", dy.shape(), Shape{B, S, d_model_});
    const int64_t hd_all = heads_ * head_dim_;
    const auto o2 = saved.o.reshape({B, S, hd_all});  // (B, T, H * hd)

    ops::LinearGrads<T> go = recipe_linear_backward<T>(dy, o2, wo_.value);
    accumulate(wo_, go.dweight);
    const Tensor<T>& d_o = go.dx;  // (B, T, H * hd)

    const CoreGrads core = core_backward(saved, d_o);
    const Tensor<T>& dv = core.dv;  // (B, T, KV, hd)

    Tensor<T> dq_pre = ops::rope_backward<T>(core.dq.view(), rope_);  // (B, T, H, hd)
    Tensor<T> dk_pre = ops::rope_backward<T>(core.dk.view(), rope_);  // (B, T, KV, hd)
    const auto xv = saved.x.view();
    ops::LinearGrads<T> gq =
        recipe_linear_backward<T>(dq_pre.reshape({B, S, hd_all}), xv, wq_.value);
    ops::LinearGrads<T> gk =
        recipe_linear_backward<T>(dk_pre.reshape({B, S, kv_heads_ * head_dim_}), xv, wk_.value);
    ops::LinearGrads<T> gv =
        recipe_linear_backward<T>(dv.reshape({B, S, kv_heads_ * head_dim_}), xv, wv_.value);
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

  // Tiles of q, k, v and dO widened to A and laid out for the tile products, built once per call
  // (every query block that reads a key tile, every key tile that reads a query block, reuses
  // them), so the tile loops read contiguous, aligned, padded rows. O(T * head_dim) each.
  //   pack_rows: rows [0, n) of a tile as (Bp, Dp), row j = src row j times `mul`;
  //   pack_cols: the same transposed, (D, Bp), column j = src row j times `mul`.
  // Padding (rows n..Bp, columns D..Dp) is zero, so it adds nothing to a product.
  static void pack_rows(const T* src, int64_t stride, int64_t n, int64_t D, int64_t Dp, int64_t Bp,
                        A mul, A* dst) {
    for (int64_t j = 0; j < n; ++j) {
      const T* s = src + j * stride;
      A* d = dst + j * Dp;
      for (int64_t e = 0; e < D; ++e) d[e] = attention_detail::load<A>(s[e]) * mul;
      std::fill(d + D, d + Dp, A(0));
    }
    std::fill(dst + n * Dp, dst + Bp * Dp, A(0));
  }
  // Source rows are read whole (contiguous) and scattered down the columns: the (D, Bp) tile
  // is at most a few KiB and stays in L1 while it is written.
  static void pack_cols(const T* src, int64_t stride, int64_t n, int64_t D, int64_t Bp, A mul,
                        A* dst) {
    for (int64_t j = 0; j < n; ++j) {
      const T* s = src + j * stride;
      for (int64_t e = 0; e < D; ++e) dst[e * Bp + j] = attention_detail::load<A>(s[e]) * mul;
    }
    if (n < Bp)
      for (int64_t e = 0; e < D; ++e) std::fill(dst + e * Bp + n, dst + (e + 1) * Bp, A(0));
  }

  // Every tile of x (B, S, heads, D), for every head, packed: tile (b, head, t) starts at
  // ((b * heads + head) * ntiles + t) * tile_size, tile_size = Bp * Dp (rows) or D * Bp (cols).
  // packed() allocates, pack_into() fills; its loop is an orphaned `omp for nowait`, so inside
  // a parallel region the team shares the tiles (the caller places the barrier), and outside
  // one it runs serially. The kernels run everything in one parallel region: each region and
  // barrier costs a scheduling round trip, and a loaded machine makes those expensive.
  Tensor<A> packed(int64_t B, int64_t S, int64_t heads, bool transposed, int64_t Bp,
                   int64_t Dp) const {
    const int64_t nt = (S + block_ - 1) / block_;
    return Tensor<A>::empty({B * heads * nt * (transposed ? head_dim_ * Bp : Bp * Dp)});
  }
  void pack_into(const T* x, int64_t B, int64_t S, int64_t heads, bool transposed, A mul,
                 int64_t Bp, int64_t Dp, A* out) const {
    const int64_t D = head_dim_, blk = block_, nt = (S + blk - 1) / blk;
    const int64_t tile = transposed ? D * Bp : Bp * Dp;
#pragma omp for schedule(static) nowait
    for (int64_t task = 0; task < B * heads * nt; ++task) {
      const int64_t t = task % nt, h = (task / nt) % heads, b = task / (nt * heads);
      const int64_t j0 = t * blk, n = std::min(S, j0 + blk) - j0;
      const T* src = x + ((b * S + j0) * heads + h) * D;
      if (transposed) {
        pack_cols(src, heads * D, n, D, Bp, mul, out + task * tile);
      } else {
        pack_rows(src, heads * D, n, D, Dp, Bp, mul, out + task * tile);
      }
    }
  }

  // Online-softmax forward over the allowed key tiles; fills saved.o and saved.lse.
  //
  // One task per (batch, head, query block). Per allowed key tile: S = (scale Q) K^T from the
  // packed K^T tile (so Q is broadcast and K^T's rows stream), the exact mask and the running
  // max, P = exp(S - m_new) in place, acc = acc * exp(m_old - m_new) + P V. Per-thread scratch
  // is O(block * head_dim); head_dim and the key tile are padded to whole vectors (padded keys
  // are masked, padded features are zero).
  void forward_kernel(int64_t B, int64_t S, Saved& saved) const {
    using attention_detail::Init;
    using attention_detail::load;
    using attention_detail::store;
    using ops::rows_detail::exp_acc;
    constexpr A kNegInf = -std::numeric_limits<A>::infinity();
    const int64_t H = heads_, KV = kv_heads_, D = head_dim_, blk = block_;
    const int64_t group = H / KV;
    const int64_t nqb = (S + blk - 1) / blk;
    const A scale = A(1) / std::sqrt(static_cast<A>(D));
    const ops::rows_detail::Isa isa = ops::rows_detail::row_isa();
    const int64_t lanes = attention_detail::vector_bytes(isa) / static_cast<int64_t>(sizeof(A));
    const int64_t Bp = attention_detail::round_up(blk, lanes);  // a tile of keys, padded
    const int64_t Dp = attention_detail::round_up(D, lanes);    // head_dim, padded
    const bool threaded = parallel_worth_it(B, S);
    Tensor<A> kt_all = packed(B, S, KV, true, Bp, Dp);
    Tensor<A> v_all = packed(B, S, KV, false, Bp, Dp);
    const T* pq = saved.q.data();
    T* po = saved.o.data();
    A* plse = saved.lse.data();
    const WindowChoice& choice = saved.choice;
    const int64_t tasks = B * H * nqb;
#pragma omp parallel if (threaded)
    {
      pack_into(saved.k.data(), B, S, KV, true, A(1), Bp, Dp, kt_all.data());
      pack_into(saved.v.data(), B, S, KV, false, A(1), Bp, Dp, v_all.data());
      std::vector<A> qs(static_cast<size_t>(blk * D));    // (rows, D), scaled
      std::vector<A> sp(static_cast<size_t>(blk * Bp));   // (rows, Bp): S, then P
      std::vector<A> acc(static_cast<size_t>(blk * Dp));  // (rows, Dp): unnormalised output
      std::vector<A> m(static_cast<size_t>(blk)), corr(static_cast<size_t>(blk));
      std::vector<A> tile_max(static_cast<size_t>(blk));   // then the exponent base
      std::vector<A> l(static_cast<size_t>(blk * lanes));  // (rows, lanes): running sums
#pragma omp barrier
#pragma omp for schedule(dynamic, 1)
      for (int64_t task = 0; task < tasks; ++task) {
        attention_detail::with_isa(isa, [&](auto bytes) {
          constexpr int kBytes = decltype(bytes)::value;
          // Last query blocks first: under a causal policy they read the most tiles, and
          // starting the long tasks first keeps a thread from finishing alone.
          const int64_t qb = nqb - 1 - task % nqb, h = (task / nqb) % H, b = task / (nqb * H);
          const int64_t kvh = h / group;
          const int64_t q0 = qb * blk, q1 = std::min(S, q0 + blk), rows = q1 - q0;
          const int64_t window = window_of(choice, b, qb);
          const int64_t key_end = saved.key_lengths.empty() ? S : saved.key_lengths[size_t(b)];
          const A* kt_head = kt_all.data() + (b * KV + kvh) * nqb * D * Bp;
          const A* v_head = v_all.data() + (b * KV + kvh) * nqb * Bp * Dp;
          for (int64_t r = 0; r < rows; ++r) {
            const T* src = pq + ((b * S + q0 + r) * H + h) * D;
            for (int64_t d = 0; d < D; ++d) qs[r * D + d] = load<A>(src[d]) * scale;
          }
          constexpr int64_t kLanes = kBytes / static_cast<int64_t>(sizeof(A));
          std::fill(m.begin(), m.end(), kNegInf);
          std::fill(l.begin(), l.end(), A(0));
          std::fill(acc.begin(), acc.end(), A(0));
          const attention_detail::TileRange tiles =
              attention_detail::tiles_for<Window>(q0, q1, S, window, blk);
          attention_detail::for_each_tile(tiles, [&](int64_t t) {
            // Keys past the sequence's real length are padding: never read.
            const int64_t k0 = t * blk, cols = std::min(key_end, k0 + blk) - k0;
            if (cols <= 0) return;
            attention_detail::gemm<A, kBytes, Init::kZero>(rows, Bp, D, qs.data(), D,
                                                           kt_head + t * D * Bp, Bp, sp.data(), Bp);
            // Padded columns and keys the policy forbids become -inf: exp gives them 0. Max and
            // sum are kept per vector lane (a reduction to one number per tile would be a chain
            // of kLanes dependent operations per row), and the rows go through three flat
            // passes rather than one branchy loop, so every pass vectorises.
            for (int64_t r = 0; r < rows; ++r) {
              const int64_t i = q0 + r;
              A* sr = sp.data() + r * Bp;
              A mx[kLanes];
              std::fill(mx, mx + kLanes, kNegInf);
              for (int64_t j0 = 0; j0 < Bp; j0 += kLanes) {
#pragma omp simd
                for (int64_t e = 0; e < kLanes; ++e) {
                  const int64_t j = j0 + e;
                  const bool ok = (j < cols) & Window::allowed(i, k0 + j, S, window);
                  const A v = ok ? sr[j] : kNegInf;
                  sr[j] = v;
                  mx[e] = v > mx[e] ? v : mx[e];
                }
              }
              tile_max[r] = attention_detail::max_of<A, kLanes>(mx);
            }
            // New running max; the exponent base stays finite (0) for a row that has met no
            // allowed key yet, whose scores are all -inf: its P is 0 and its acc, l stay 0.
#pragma omp simd
            for (int64_t r = 0; r < rows; ++r) {
              const A m_new = std::max(m[r], tile_max[r]);
              const A base = m_new == kNegInf ? A(0) : m_new;
              corr[r] = exp_acc<A>(m[r] - base);  // exp(-inf) = 0 on the row's first keys
              m[r] = m_new;
              tile_max[r] = base;
            }
            for (int64_t r = 0; r < rows; ++r) {
              A* sr = sp.data() + r * Bp;
              A* lr = l.data() + r * kLanes;
              const A c = corr[r], base = tile_max[r];
#pragma omp simd
              for (int64_t e = 0; e < kLanes; ++e) lr[e] *= c;
              for (int64_t j0 = 0; j0 < Bp; j0 += kLanes) {
#pragma omp simd
                for (int64_t e = 0; e < kLanes; ++e) {
                  const A p = exp_acc<A>(sr[j0 + e] - base);
                  sr[j0 + e] = p;
                  lr[e] += p;
                }
              }
            }
            attention_detail::gemm<A, kBytes, Init::kScale>(rows, Dp, cols, sp.data(), Bp,
                                                            v_head + t * Bp * Dp, Dp, acc.data(),
                                                            Dp, corr.data());
          });
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t i = q0 + r;
            A sum = 0;  // the lanes in a fixed order
            for (int64_t e = 0; e < kLanes; ++e) sum += l[r * kLanes + e];
            const A inv = sum > A(0) ? A(1) / sum : A(0);  // a row with no key outputs 0
            T* dst = po + ((b * S + i) * H + h) * D;
            for (int64_t d = 0; d < D; ++d) dst[d] = store<T, A>(acc[r * Dp + d] * inv);
            plse[(b * H + h) * S + i] = sum > A(0) ? m[r] + std::log(sum) : kNegInf;
          }
        });
      }
    }
  }

  // Flash-attention backward: P recomputed from the saved logsumexp, tile by tile.
  //   dV_j = sum_i P_ij dO_i;  dP_ij = dO_i . v_j;  dS_ij = P_ij (dP_ij - Delta_i),
  //   Delta_i = dO_i . O_i;  dq_i = scale sum_j dS_ij k_j;  dk_j = sum_i dS_ij (scale q_i).
  // S is recomputed exactly as the forward computed it ((scale q) . k, d ascending), so P is
  // the forward's probability up to the rounding of exp(s - lse).
  void backward_kernel(int64_t B, int64_t S, const Saved& saved, const T* pdo, T* pdq, T* pdk,
                       T* pdv) const {
    using attention_detail::Init;
    using attention_detail::load;
    using attention_detail::store;
    using ops::rows_detail::exp_acc;
    const int64_t H = heads_, KV = kv_heads_, D = head_dim_, blk = block_;
    const int64_t group = H / KV;
    const int64_t nqb = (S + blk - 1) / blk, nkb = nqb;
    const A scale = A(1) / std::sqrt(static_cast<A>(D));
    const ops::rows_detail::Isa isa = ops::rows_detail::row_isa();
    const int64_t lanes = attention_detail::vector_bytes(isa) / static_cast<int64_t>(sizeof(A));
    const int64_t Bp = attention_detail::round_up(blk, lanes);  // a tile (keys or queries), padded
    const int64_t Dp = attention_detail::round_up(D, lanes);    // head_dim, padded
    const int64_t rows_tile = Bp * Dp, cols_tile = D * Bp;      // packed tile sizes
    const T* po = saved.o.data();
    const A* plse = saved.lse.data();
    const WindowChoice& choice = saved.choice;
    const bool threaded = parallel_worth_it(B, S);

    // (scale q) and dO as rows (A operands of pass 1, B operands of pass 2) and transposed
    // (B operands of pass 2); k and v as rows (B operands of pass 1, A operands of pass 2) and
    // transposed (B operands of pass 1).
    Tensor<A> q_rows = packed(B, S, H, false, Bp, Dp), qt_all = packed(B, S, H, true, Bp, Dp);
    Tensor<A> do_rows = packed(B, S, H, false, Bp, Dp), dot_all = packed(B, S, H, true, Bp, Dp);
    Tensor<A> k_rows = packed(B, S, KV, false, Bp, Dp), kt_all = packed(B, S, KV, true, Bp, Dp);
    Tensor<A> v_rows = packed(B, S, KV, false, Bp, Dp), vt_all = packed(B, S, KV, true, Bp, Dp);
    std::vector<A> delta(static_cast<size_t>(B * H * S));  // Delta_i = dO_i . O_i, (B, H, T)

#pragma omp parallel if (threaded)
    {
#pragma omp for schedule(static) nowait
      for (int64_t bh = 0; bh < B * H; ++bh) {
        const int64_t b = bh / H, h = bh % H;
        for (int64_t i = 0; i < S; ++i) {
          const T* dor = pdo + ((b * S + i) * H + h) * D;
          const T* orow = po + ((b * S + i) * H + h) * D;
          A sum = 0;
          for (int64_t d = 0; d < D; ++d) sum += load<A>(dor[d]) * load<A>(orow[d]);
          delta[bh * S + i] = sum;
        }
      }
      pack_into(saved.q.data(), B, S, H, false, scale, Bp, Dp, q_rows.data());
      pack_into(saved.q.data(), B, S, H, true, scale, Bp, Dp, qt_all.data());
      pack_into(pdo, B, S, H, false, A(1), Bp, Dp, do_rows.data());
      pack_into(pdo, B, S, H, true, A(1), Bp, Dp, dot_all.data());
      pack_into(saved.k.data(), B, S, KV, false, A(1), Bp, Dp, k_rows.data());
      pack_into(saved.k.data(), B, S, KV, true, A(1), Bp, Dp, kt_all.data());
      pack_into(saved.v.data(), B, S, KV, false, A(1), Bp, Dp, v_rows.data());
      pack_into(saved.v.data(), B, S, KV, true, A(1), Bp, Dp, vt_all.data());
      // Per-thread scratch of pass 1 ...
      std::vector<A> sp(static_cast<size_t>(blk * Bp)), dp(static_cast<size_t>(blk * Bp));
      std::vector<A> acc(static_cast<size_t>(blk * Dp));
      // ... and of pass 2.
      std::vector<A> st(static_cast<size_t>(blk * Bp)), dpt(static_cast<size_t>(blk * Bp));
      std::vector<A> lse_r(static_cast<size_t>(Bp), A(0)), delta_r(static_cast<size_t>(Bp), A(0));
      std::vector<A> dk(static_cast<size_t>(blk * Dp)), dv(static_cast<size_t>(blk * Dp));
#pragma omp barrier

      // Pass 1: dq, one task per (batch, head, query block); per key tile S = (scale Q) K^T,
      // dP = dO V^T, dS = P (dP - Delta) in place of S, dq += dS K. No barrier after it: pass
      // 2 writes other outputs, so a thread done here goes on to pass 2.
#pragma omp for schedule(dynamic, 1) nowait
      for (int64_t task = 0; task < B * H * nqb; ++task) {
        attention_detail::with_isa(isa, [&](auto bytes) {
          constexpr int kBytes = decltype(bytes)::value;
          const int64_t qb = nqb - 1 - task % nqb, h = (task / nqb) % H, b = task / (nqb * H);
          const int64_t kvh = h / group;
          const int64_t q0 = qb * blk, q1 = std::min(S, q0 + blk), rows = q1 - q0;
          const int64_t window = window_of(choice, b, qb);
          const int64_t key_end = saved.key_lengths.empty() ? S : saved.key_lengths[size_t(b)];
          const A* qs = q_rows.data() + ((b * H + h) * nqb + qb) * rows_tile;
          const A* dos = do_rows.data() + ((b * H + h) * nqb + qb) * rows_tile;
          const int64_t kv_tiles = (b * KV + kvh) * nkb;
          std::fill(acc.begin(), acc.end(), A(0));
          attention_detail::for_each_tile(
              attention_detail::tiles_for<Window>(q0, q1, S, window, blk), [&](int64_t t) {
                const int64_t k0 = t * blk, cols = std::min(key_end, k0 + blk) - k0;
                if (cols <= 0) return;  // padding
                attention_detail::gemm<A, kBytes, Init::kZero>(
                    rows, Bp, D, qs, Dp, kt_all.data() + (kv_tiles + t) * cols_tile, Bp, sp.data(),
                    Bp);
                attention_detail::gemm<A, kBytes, Init::kZero>(
                    rows, Bp, D, dos, Dp, vt_all.data() + (kv_tiles + t) * cols_tile, Bp, dp.data(),
                    Bp);
                for (int64_t r = 0; r < rows; ++r) {
                  const int64_t i = q0 + r;
                  const A lse = plse[(b * H + h) * S + i], dl = delta[(b * H + h) * S + i];
                  A* sr = sp.data() + r * Bp;
                  const A* dpr = dp.data() + r * Bp;
#pragma omp simd
                  for (int64_t j = 0; j < Bp; ++j) {
                    // exp first, then the select: under the default -ftrapping-math GCC
                    // does not if-convert a float operation behind a condition, and the
                    // loop would stay scalar. Masked lanes are finite (stale or padding).
                    const A e = exp_acc<A>(sr[j] - lse);
                    const bool ok = (j < cols) & Window::allowed(i, k0 + j, S, window);
                    const A p = ok ? e : A(0);
                    sr[j] = p * (dpr[j] - dl);
                  }
                }
                attention_detail::gemm<A, kBytes, Init::kAdd>(
                    rows, Dp, cols, sp.data(), Bp, k_rows.data() + (kv_tiles + t) * rows_tile, Dp,
                    acc.data(), Dp);
              });
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t d = 0; d < D; ++d)
              pdq[((b * S + q0 + r) * H + h) * D + d] = store<T, A>(acc[r * Dp + d] * scale);
        });
      }

      // Pass 2: dk, dv, one task per (batch, kv head, key tile); it visits every query block
      // whose window reads this tile, for every query head of the group, in a fixed order.
      // Here the products run transposed, keys as rows: S^T = K (scale Q)^T, dP^T = V dO^T,
      // P^T and dS^T in their place, dv += P^T dO, dk += dS^T (scale Q).
#pragma omp for schedule(dynamic, 1)
      for (int64_t task = 0; task < B * KV * nkb; ++task) {
        attention_detail::with_isa(isa, [&](auto bytes) {
          constexpr int kBytes = decltype(bytes)::value;
          const int64_t t = task % nkb, kvh = (task / nkb) % KV, b = task / (nkb * KV);
          const int64_t k0 = t * blk, k1 = std::min(S, k0 + blk), cols = k1 - k0;
          // The tile's real keys [k0, k0 + live); padded keys were never read: dk = dv = 0.
          const int64_t key_end = saved.key_lengths.empty() ? S : saved.key_lengths[size_t(b)];
          const int64_t live = std::min(k1, key_end) - k0;
          const A* ks = k_rows.data() + task * rows_tile;
          const A* vs = v_rows.data() + task * rows_tile;
          std::fill(dk.begin(), dk.end(), A(0));
          std::fill(dv.begin(), dv.end(), A(0));
          for (int64_t qb = 0; qb < (live > 0 ? nqb : 0); ++qb) {
            const int64_t q0 = qb * blk, q1 = std::min(S, q0 + blk), rows = q1 - q0;
            const int64_t window = window_of(choice, b, qb);
            if (!attention_detail::tiles_for<Window>(q0, q1, S, window, blk).contains(t)) continue;
            for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
              const int64_t q_tile = (b * H + h) * nqb + qb;
              for (int64_t r = 0; r < rows; ++r) {
                lse_r[r] = plse[(b * H + h) * S + q0 + r];
                delta_r[r] = delta[(b * H + h) * S + q0 + r];
              }
              attention_detail::gemm<A, kBytes, Init::kZero>(
                  live, Bp, D, ks, Dp, qt_all.data() + q_tile * cols_tile, Bp, st.data(), Bp);
              attention_detail::gemm<A, kBytes, Init::kZero>(
                  live, Bp, D, vs, Dp, dot_all.data() + q_tile * cols_tile, Bp, dpt.data(), Bp);
              for (int64_t c = 0; c < live; ++c) {
                const int64_t j = k0 + c;
                A* sr = st.data() + c * Bp;
                A* dr = dpt.data() + c * Bp;
#pragma omp simd
                for (int64_t r = 0; r < Bp; ++r) {
                  const A e = exp_acc<A>(sr[r] - lse_r[r]);  // before the select, as in pass 1
                  const bool ok = (r < rows) & Window::allowed(q0 + r, j, S, window);
                  const A p = ok ? e : A(0);
                  sr[r] = p;
                  dr[r] = p * (dr[r] - delta_r[r]);
                }
              }
              attention_detail::gemm<A, kBytes, Init::kAdd>(live, Dp, rows, st.data(), Bp,
                                                            do_rows.data() + q_tile * rows_tile, Dp,
                                                            dv.data(), Dp);
              attention_detail::gemm<A, kBytes, Init::kAdd>(live, Dp, rows, dpt.data(), Bp,
                                                            q_rows.data() + q_tile * rows_tile, Dp,
                                                            dk.data(), Dp);
            }
          }
          for (int64_t j = 0; j < cols; ++j)
            for (int64_t d = 0; d < D; ++d) {
              pdk[((b * S + k0 + j) * KV + kvh) * D + d] = store<T, A>(dk[j * Dp + d]);
              pdv[((b * S + k0 + j) * KV + kvh) * D + d] = store<T, A>(dv[j * Dp + d]);
            }
        });
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
