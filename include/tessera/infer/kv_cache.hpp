// tessera/infer/kv_cache.hpp — incremental decoding: a per-sequence key/value cache and a
// forward over new tokens that reads it.
//
//   ts::infer::KvCache cache = ts::infer::make_cache(model);
//   Tensor<float> logits = ts::infer::forward_cached(model, prompt, cache);  // (vocab), last token
//   logits = ts::infer::forward_cached(model, {next}, cache);                // one more token
//
// Why: Decoder::forward runs the whole sequence, so generating N tokens after a P-token prompt
// costs sum (P + k) positions of work; with the keys and values of earlier positions kept, each
// new token costs one position plus attention over the cache. The new tokens go through exactly
// the Decoder's layers (its embedding, RMSNorms, projections, RoPE table at the right positions,
// FFN, final norm and head), so only the attention over the cache is computed here. Its result
// equals Decoder::forward's logits to float rounding (tests/infer: every position of a sequence
// fed in chunks of 1, 3 and the rest).
//
// Memory is paged: a KvBlockPool hands out fixed-size blocks (block_tokens positions of every
// layer), a KvCache is one sequence's block table into a pool, and several caches may share one
// pool; a sequence's blocks return to the pool when its cache is cleared or destroyed. Scope
// (see docs/inference.md): dense blocks with a fixed causal window (CausalFull, SlidingWindow,
// LocalGlobal, per layer too), each query masked by its block's policy exactly as the full
// forward masks it; a sliding window still keeps every position's keys (dropping the blocks
// that fell out of every layer's window is not done). VariableWindow, whose window depends on
// the whole query block, and MoE blocks are refused by a static_assert. Float or double Scalar.
//
// Shapes: per block and layer, keys and values (block_tokens, kv_heads, head_dim); new tokens (n).
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <cstdint>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/models/decoder.hpp"
#include "tessera/nn/window.hpp"
#include "tessera/ops/elementwise.hpp"
#include "tessera/ops/matmul.hpp"
#include "tessera/ops/rope.hpp"

namespace tessera::infer {

// Fixed-size blocks of keys and values, shared by the sequences that draw from it. A block holds
// `block_tokens` positions of every layer: for each layer, keys (block_tokens, kv_heads,
// head_dim) then values of the same shape. Blocks are allocated on first use and recycled
// through a free list, so many sequences of different lengths share the memory without
// fragmentation and a finished sequence's blocks serve the next one.
template <class T = float>
class KvBlockPool {
 public:
  KvBlockPool(int64_t layers, int64_t kv_heads, int64_t head_dim, int64_t block_tokens,
              int64_t max_blocks)
      : layers_(layers), kv_heads_(kv_heads), head_dim_(head_dim), block_tokens_(block_tokens),
        max_blocks_(max_blocks) {
    TESSERA_CHECK(layers >= 1 && kv_heads >= 1 && head_dim >= 1 && block_tokens >= 1 &&
                      max_blocks >= 1,
                  "KvBlockPool: layers ", layers, ", kv_heads ", kv_heads, ", head_dim ",
                  head_dim, ", block_tokens ", block_tokens, ", max_blocks ", max_blocks,
                  " must all be >= 1");
  }

  int64_t layers() const { return layers_; }
  int64_t kv_heads() const { return kv_heads_; }
  int64_t head_dim() const { return head_dim_; }
  int64_t block_tokens() const { return block_tokens_; }
  int64_t max_blocks() const { return max_blocks_; }
  int64_t blocks_in_use() const {
    return static_cast<int64_t>(blocks_.size() - free_.size());
  }
  // Elements of one block: every layer's keys and values for block_tokens positions.
  int64_t block_elements() const { return 2 * layers_ * block_tokens_ * kv_heads_ * head_dim_; }

  int32_t allocate() {
    if (!free_.empty()) {
      const int32_t b = free_.back();
      free_.pop_back();
      return b;
    }
    TESSERA_CHECK(static_cast<int64_t>(blocks_.size()) < max_blocks_, "KvBlockPool: all ",
                  max_blocks_, " blocks of ", block_tokens_,
                  " tokens are in use; free a sequence's cache or make a larger pool");
    blocks_.emplace_back(static_cast<std::size_t>(block_elements()));
    return static_cast<int32_t>(blocks_.size() - 1);
  }
  void release(int32_t b) { free_.push_back(b); }

  // Position `slot` (< block_tokens) of block b, layer l: kv_heads * head_dim keys / values.
  T* keys(int32_t b, int64_t l, int64_t slot) {
    return blocks_[static_cast<std::size_t>(b)].data() +
           ((2 * l) * block_tokens_ + slot) * kv_heads_ * head_dim_;
  }
  T* values(int32_t b, int64_t l, int64_t slot) {
    return blocks_[static_cast<std::size_t>(b)].data() +
           ((2 * l + 1) * block_tokens_ + slot) * kv_heads_ * head_dim_;
  }

 private:
  int64_t layers_, kv_heads_, head_dim_, block_tokens_, max_blocks_;
  std::vector<std::vector<T>> blocks_;
  std::vector<int32_t> free_;
};

// One sequence's cache: a block table into a (possibly shared) pool. Its blocks go back to the
// pool when it is cleared or destroyed.
template <class T = float>
class KvCache {
 public:
  KvCache() = default;
  KvCache(std::shared_ptr<KvBlockPool<T>> pool, int64_t capacity)
      : pool_(std::move(pool)), capacity_(capacity) {
    TESSERA_CHECK(pool_ != nullptr, "KvCache: no block pool");
  }
  KvCache(KvCache&&) noexcept = default;
  KvCache& operator=(KvCache&& o) noexcept {
    if (this != &o) {
      clear();
      pool_ = std::move(o.pool_);
      table_ = std::move(o.table_);
      length = o.length;
      capacity_ = o.capacity_;
      o.length = 0;
    }
    return *this;
  }
  KvCache(const KvCache&) = delete;
  KvCache& operator=(const KvCache&) = delete;
  ~KvCache() { clear(); }

  int64_t length = 0;  // positions cached

  int64_t capacity() const { return capacity_; }
  KvBlockPool<T>& pool() { return *pool_; }
  const std::vector<int32_t>& block_table() const { return table_; }

  void clear() {
    if (pool_)
      for (int32_t b : table_) pool_->release(b);
    table_.clear();
    length = 0;
  }
  // Makes room for positions [0, n): allocates the missing blocks, all or none.
  void reserve(int64_t n) {
    const int64_t bt = pool_->block_tokens();
    const std::size_t before = table_.size();
    try {
      while (static_cast<int64_t>(table_.size()) * bt < n) table_.push_back(pool_->allocate());
    } catch (...) {
      while (table_.size() > before) {
        pool_->release(table_.back());
        table_.pop_back();
      }
      throw;
    }
  }
  T* keys(int64_t l, int64_t pos) {
    const int64_t bt = pool_->block_tokens();
    return pool_->keys(table_[static_cast<std::size_t>(pos / bt)], l, pos % bt);
  }
  T* values(int64_t l, int64_t pos) {
    const int64_t bt = pool_->block_tokens();
    return pool_->values(table_[static_cast<std::size_t>(pos / bt)], l, pos % bt);
  }

 private:
  std::shared_ptr<KvBlockPool<T>> pool_;
  std::vector<int32_t> table_;
  int64_t capacity_ = 0;
};

inline constexpr int64_t kDefaultKvBlockTokens = 16;

// A pool for `model` with room for `max_tokens` positions in all (default: one max_seq context).
template <class Config>
std::shared_ptr<KvBlockPool<typename models::Decoder<Config, Cpu>::T>> make_pool(
    const models::Decoder<Config, Cpu>&, int64_t max_tokens = 0,
    int64_t block_tokens = kDefaultKvBlockTokens) {
  using R = typename models::Decoder<Config, Cpu>::Resolved;
  if (max_tokens <= 0) max_tokens = R::max_seq;
  return std::make_shared<KvBlockPool<typename models::Decoder<Config, Cpu>::T>>(
      R::layers, R::kv_heads, R::head_dim, block_tokens,
      (max_tokens + block_tokens - 1) / block_tokens);
}

// A cache for one sequence of up to max_seq tokens, from `pool` (a pool of its own when null).
template <class Config>
KvCache<typename models::Decoder<Config, Cpu>::T> make_cache(
    const models::Decoder<Config, Cpu>& model,
    std::shared_ptr<KvBlockPool<typename models::Decoder<Config, Cpu>::T>> pool = nullptr) {
  using R = typename models::Decoder<Config, Cpu>::Resolved;
  if (!pool) pool = make_pool(model);
  TESSERA_CHECK(pool->layers() == R::layers && pool->kv_heads() == R::kv_heads &&
                    pool->head_dim() == R::head_dim,
                "make_cache: the pool was made for another model shape");
  return KvCache<typename models::Decoder<Config, Cpu>::T>(std::move(pool), R::max_seq);
}

namespace kv_detail {

// Attention of n new queries (positions start .. start+n-1) over cached keys 0 .. start+n-1 of
// layer l. q (n, H, hd) -> o (n, H, hd). Scores in float (double for T = double), softmax with
// the row max subtracted, one summation order per element.
// The run-time window argument of a fixed policy (its own W; CausalFull has none).
template <class Window>
constexpr int64_t fixed_window() {
  if constexpr (requires { Window::kWindow; }) {
    return Window::kWindow;
  } else {
    return 0;
  }
}

template <class Window, class T>
void attend(const T* q, KvCache<T>& cache, int64_t l, T* o, int64_t n, int64_t start, int64_t H,
            int64_t KV, int64_t hd) {
  using A = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const A scale = static_cast<A>(1.0 / std::sqrt(static_cast<double>(hd)));
  const int64_t group = H / KV;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t h = 0; h < H; ++h) {
      const int64_t keys = start + t + 1;
      const int64_t kvh = h / group;
      const T* qi = q + (t * H + h) * hd;
      std::vector<A> s(static_cast<std::size_t>(keys));
      A mx = -std::numeric_limits<A>::infinity();
      // The window's own mask (the query itself is always allowed, so mx is finite).
      std::vector<char> ok(static_cast<std::size_t>(keys));
      for (int64_t j = 0; j < keys; ++j) {
        ok[j] = Window::allowed(start + t, j, start + n, fixed_window<Window>());
        if (!ok[j]) continue;
        const T* kj = cache.keys(l, j) + kvh * hd;
        A dot = 0;
        for (int64_t d = 0; d < hd; ++d) dot += static_cast<A>(qi[d]) * static_cast<A>(kj[d]);
        s[j] = dot * scale;
        mx = std::max(mx, s[j]);
      }
      A sum = 0;
      for (int64_t j = 0; j < keys; ++j) {
        s[j] = ok[j] ? std::exp(s[j] - mx) : A(0);
        sum += s[j];
      }
      std::vector<A> acc(static_cast<std::size_t>(hd), A(0));
      for (int64_t j = 0; j < keys; ++j) {
        if (!ok[j]) continue;
        const T* vj = cache.values(l, j) + kvh * hd;
        const A p = s[j];
        for (int64_t d = 0; d < hd; ++d) acc[d] += p * static_cast<A>(vj[d]);
      }
      T* oi = o + (t * H + h) * hd;
      for (int64_t d = 0; d < hd; ++d) oi[d] = static_cast<T>(acc[d] / sum);
    }
  }
}

}  // namespace kv_detail

// Runs `tokens` (positions cache.length ...) through the model, appends their keys and values
// to the cache, and returns the logits: (vocab) of the last token, or (n, vocab) of every new
// token when all_logits is true.
template <class Config>
Tensor<typename models::Decoder<Config, Cpu>::T> forward_cached(
    models::Decoder<Config, Cpu>& model, std::span<const int32_t> tokens,
    KvCache<typename models::Decoder<Config, Cpu>::T>& cache, bool all_logits = false) {
  using M = models::Decoder<Config, Cpu>;
  using R = typename M::Resolved;
  using T = typename M::T;
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "forward_cached: the cache path runs float or double models");
  const auto n = static_cast<int64_t>(tokens.size());
  TESSERA_CHECK(n >= 1, "forward_cached: no tokens");
  TESSERA_CHECK(cache.capacity() > 0 && cache.pool().layers() == R::layers &&
                    cache.pool().kv_heads() == R::kv_heads && cache.pool().head_dim() == R::head_dim,
                "forward_cached: the cache was made for another model shape (or is empty)");
  const int64_t start = cache.length;
  TESSERA_CHECK(start + n <= cache.capacity() && start + n <= R::max_seq, "forward_cached: ",
                start, " cached + ", n, " new tokens exceed the capacity ",
                std::min<int64_t>(cache.capacity(), R::max_seq));
  for (int32_t t : tokens)
    TESSERA_CHECK(t >= 0 && t < R::vocab, "forward_cached: token id ", t,
                  " is outside the vocabulary [0, ", R::vocab, ")");
  constexpr int64_t C = R::d_model, H = R::heads, KV = R::kv_heads, hd = R::head_dim;

  Tensor<int32_t> ids(Shape{1, n});
  std::copy(tokens.begin(), tokens.end(), ids.data());
  typename nn::Embedding<T>::Saved es;
  Tensor<T> h = model.embedding().forward(ids, es);  // (1, n, C)
  cache.reserve(start + n);  // before any layer runs: a full pool leaves the cache unchanged
  model.for_each_block([&](int64_t l, auto& block) {
    using Block = std::decay_t<decltype(block)>;
    using Window = typename Block::window_policy;
    static_assert(Window::kCausal && !Window::kAdaptive && !Block::kMoE,
                  "forward_cached: the cache runs dense blocks with a fixed causal window "
                  "(CausalFull, SlidingWindow, LocalGlobal); VariableWindow (its window depends on "
                  "the whole query block) and MoE blocks are not done (docs/inference.md)");
    typename nn::RMSNorm<T>::Saved ns;
    const Tensor<T> x1 = block.norm1().forward(h, ns);                            // (1, n, C)
    auto& attn = block.attn();
    const Tensor<T> q0 = ops::linear<T>(x1, attn.wq().value);                     // (1, n, H*hd)
    const Tensor<T> k0 = ops::linear<T>(x1, attn.wk().value);                     // (1, n, KV*hd)
    const Tensor<T> v0 = ops::linear<T>(x1, attn.wv().value);                     // (1, n, KV*hd)
    const Tensor<T> q = ops::rope<T>(q0.reshape({1, n, H, hd}), attn.rope_table(), start);
    const Tensor<T> k = ops::rope<T>(k0.reshape({1, n, KV, hd}), attn.rope_table(), start);
    for (int64_t t = 0; t < n; ++t) {
      std::copy(k.data() + t * KV * hd, k.data() + (t + 1) * KV * hd, cache.keys(l, start + t));
      std::copy(v0.data() + t * KV * hd, v0.data() + (t + 1) * KV * hd,
                cache.values(l, start + t));
    }
    Tensor<T> o(Shape{1, n, H * hd});
    kv_detail::attend<Window, T>(q.data(), cache, l, o.data(), n, start, H, KV, hd);
    const Tensor<T> a = ops::linear<T>(o, attn.wo().value);                       // (1, n, C)
    const Tensor<T> h1 = ops::add<T>(h, a);                                       // residual
    typename nn::RMSNorm<T>::Saved ns2;
    const Tensor<T> x2 = block.norm2().forward(h1, ns2);
    typename Block::FfnLayer::Saved fs;
    const Tensor<T> f = block.ffn().forward(x2, fs);
    h = ops::add<T>(h1, f);                                                       // (1, n, C)
  });
  cache.length = start + n;
  typename nn::RMSNorm<T>::Saved fn;
  const Tensor<T> hn = model.final_norm().forward(h, fn);  // (1, n, C)
  const auto& head = model.lm_head_weight().value;         // (V, C)
  if (all_logits) return ops::linear<T>(hn.reshape({n, C}), head);  // (n, V)
  const Tensor<T> last = hn.reshape({n, C}).slice(0, n - 1, n).contiguous();  // (1, C)
  return ops::linear<T>(last, head).reshape({R::vocab}).contiguous();          // (V)
}

}  // namespace tessera::infer
