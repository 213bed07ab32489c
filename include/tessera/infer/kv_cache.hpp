// tessera/infer/kv_cache.hpp — incremental decoding: a per-sequence key/value cache and a
// forward over new tokens that reads it, for one sequence or many at once.
//
//   ts::infer::KvCache cache = ts::infer::make_cache(model);
//   Tensor<float> logits = ts::infer::forward_cached(model, prompt, cache);  // (vocab), last token
//   logits = ts::infer::forward_cached(model, {next}, cache);                // one more token
//
//   // Many sequences in one step (continuous batching, infer/batching.hpp):
//   std::vector<ts::infer::BatchEntry<float>> step = {{cache_a, chunk_a}, {cache_b, {&tok_b, 1}}};
//   std::vector<Tensor<float>> out = ts::infer::forward_batch(model, step);  // one per entry
//
// Why: Decoder::forward runs the whole sequence, so generating N tokens after a P-token prompt
// costs sum (P + k) positions of work; with the keys and values of earlier positions kept, each
// new token costs one position plus attention over the cache. The new tokens go through exactly
// the Decoder's layers (its embedding, RMSNorms, projections, RoPE table at the right positions,
// FFN, final norm and head), so only the attention over the cache is computed here. Its result
// equals Decoder::forward's logits to float rounding (tests/infer: every position of a sequence
// fed in chunks of 1, 3 and the rest).
//
// Why forward_batch stacks the sequences: a decode step of one sequence is a matrix-vector
// product per weight, bound by reading the weights from memory. Stacking every sequence's new
// tokens into one (rows, C) matrix reads each weight once per step for all of them; only the
// attention, which reads each sequence's own cache, runs per sequence. forward_cached is the
// one-entry case.
//
// Every weight product goes through a Weights object (`linear(layer, WeightId, x)`):
// DenseWeights multiplies by the model's own fp32 parameters; a quantised implementation plugs
// in there without touching the rest (docs/inference.md). The dense SwiGLU FFN is therefore
// computed here from its three products (swiglu_ffn). MoE blocks run their own layer on the
// stacked rows (their expert products are not routed through Weights yet).
//
// Batch invariance: a row's result does not depend on the other rows' values, but ops::linear
// picks its back end and blocking from the number of rows (a plain loop below 16^3
// multiply-adds, BLAS above), so the same row can differ in the last bits between a step of one
// row and a step of many. Results are reproducible for the same batch composition; across
// compositions they agree to float rounding, and with TESSERA_CPU_PATH=scalar (every product a
// plain loop, one summation order per row) bit for bit (tests/infer checks both).
//
// Memory is paged: a KvBlockPool hands out fixed-size blocks (block_tokens positions of every
// layer), a KvCache is one sequence's block table into a pool, and several caches may share one
// pool; a sequence's blocks return to the pool when its cache is cleared or destroyed. Scope
// (see docs/inference.md): every causal window policy (CausalFull, SlidingWindow, LocalGlobal,
// VariableWindow, per layer too), each query masked by its block's policy exactly as the full
// forward masks it; a sliding window still keeps every position's keys (dropping the blocks
// that fell out of every layer's window is not done). VariableWindow chooses a query block's
// window when the block's first token arrives, from the selector input rows that end at that
// token (nn/window.hpp's signal_rows), which the cache keeps per layer. Dense and MoE blocks; an
// MoE layer with a capacity limit is refused at run time (which tokens it drops depends on all
// the tokens of a forward). Float or double Scalar.
//
// Shapes: per block and layer, keys and values (block_tokens, kv_heads, head_dim); new tokens (n);
// stacked rows of a step (rows, C).
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <limits>
#include <memory>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/models/decoder.hpp"
#include "tessera/nn/window.hpp"
#include "tessera/ops/activation.hpp"
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
  int64_t blocks_free() const { return max_blocks_ - blocks_in_use(); }
  // Blocks needed for `positions` positions of one sequence.
  int64_t blocks_for(int64_t positions) const {
    return (positions + block_tokens_ - 1) / block_tokens_;
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

// What a VariableWindow layer's cache keeps besides keys and values: the selector input rows of
// the last positions (enough for the next query block's signal rows, which end at its first
// token) and the window chosen for every query block begun so far.
template <class T>
struct WindowHistory {
  std::vector<T> rows;      // (kept, C): selector inputs of positions [length - kept, length)
  std::vector<int> choice;  // (query blocks begun): index into the policy's size set
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
      windows_ = std::move(o.windows_);
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
    windows_.clear();
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
  // Gives back the blocks after the first `keep` (never those that the cached positions use):
  // undoes the reserve() of a step that failed.
  void release_blocks_after(std::size_t keep) {
    keep = std::max(keep, static_cast<std::size_t>(pool_->blocks_for(length)));
    while (table_.size() > keep) {
      pool_->release(table_.back());
      table_.pop_back();
    }
  }
  // Layer l's VariableWindow state (empty for the other layers).
  WindowHistory<T>& window_history(int64_t l) {
    if (windows_.empty()) windows_.resize(static_cast<std::size_t>(pool_->layers()));
    return windows_[static_cast<std::size_t>(l)];
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
  std::vector<WindowHistory<T>> windows_;  // (layers) once a VariableWindow layer ran
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


// ---- weights: the one place a weight product happens --------------------------------------

// The weight matrices of a decoder that the cached path multiplies by, each (out, in) as
// nn::Linear stores it: per layer the attention projections and the dense FFN's three, and the
// LM head (layer ignored).
enum class WeightId { kQ, kK, kV, kO, kFfnGate, kFfnUp, kFfnDown, kHead };

inline constexpr const char* weight_name(WeightId id) {
  switch (id) {
    case WeightId::kQ: return "attn.wq";
    case WeightId::kK: return "attn.wk";
    case WeightId::kV: return "attn.wv";
    case WeightId::kO: return "attn.wo";
    case WeightId::kFfnGate: return "ffn.w_gate";
    case WeightId::kFfnUp: return "ffn.w_up";
    case WeightId::kFfnDown: return "ffn.w_down";
    case WeightId::kHead: return "lm_head";
  }
  return "?";
}

// What forward_batch needs of a Weights object: y (rows, out) = x (rows, in) W^T for weight `id`
// of layer `layer` (-1 for kHead). A quantised implementation keeps its own packed matrices and
// dequantises or multiplies them directly; it must give a row's result independently of the
// other rows' values.
template <class W, class T>
concept LinearWeights = requires(const W& w, int64_t layer, WeightId id,
                                 TensorView<const T, Cpu> x) {
  { w.linear(layer, id, x) } -> std::convertible_to<Tensor<T>>;
};

// The model's own parameters, multiplied with ops::linear. Holds pointers into the model: it must
// not outlive it, and sees weight updates made in place.
template <class Model>
class DenseWeights {
 public:
  using T = typename Model::T;

  explicit DenseWeights(Model& model) {
    using R = typename Model::Resolved;
    layers_.resize(static_cast<std::size_t>(R::layers));
    model.for_each_block([&](int64_t l, auto& block) {
      auto& w = layers_[static_cast<std::size_t>(l)];
      w.fill(nullptr);
      w[index(WeightId::kQ)] = &block.attn().wq().value;
      w[index(WeightId::kK)] = &block.attn().wk().value;
      w[index(WeightId::kV)] = &block.attn().wv().value;
      w[index(WeightId::kO)] = &block.attn().wo().value;
      if constexpr (!std::decay_t<decltype(block)>::kMoE) {
        w[index(WeightId::kFfnGate)] = &block.ffn().w_gate.value;
        w[index(WeightId::kFfnUp)] = &block.ffn().w_up.value;
        w[index(WeightId::kFfnDown)] = &block.ffn().w_down.value;
      }
    });
    head_ = &model.lm_head_weight().value;
  }

  const Tensor<T>& weight(int64_t layer, WeightId id) const {
    if (id == WeightId::kHead) return *head_;
    TESSERA_CHECK(layer >= 0 && layer < static_cast<int64_t>(layers_.size()),
                  "DenseWeights: layer ", layer, " is outside [0, ", layers_.size(), ")");
    const Tensor<T>* w = layers_[static_cast<std::size_t>(layer)][index(id)];
    TESSERA_CHECK(w != nullptr, "DenseWeights: layer ", layer, " has no ", weight_name(id),
                  " (an MoE block runs its experts itself)");
    return *w;
  }

  // x (rows, in) -> (rows, out)
  Tensor<T> linear(int64_t layer, WeightId id, TensorView<const T, Cpu> x) const {
    return ops::linear<T>(x, weight(layer, id));
  }

 private:
  static constexpr std::size_t index(WeightId id) { return static_cast<std::size_t>(id); }
  std::vector<std::array<const Tensor<T>*, 7>> layers_;  // per layer, by WeightId (not kHead)
  const Tensor<T>* head_ = nullptr;
};

// The dense SwiGLU FFN of layer `layer` from its three products, as nn::SwiGluFfn computes it:
// w_down (silu(w_gate x) * (w_up x)). x (rows, C) -> (rows, C).
template <class T, class Weights>
  requires LinearWeights<Weights, T>
Tensor<T> swiglu_ffn(const Weights& weights, int64_t layer, TensorView<const T, Cpu> x) {
  const Tensor<T> gate = weights.linear(layer, WeightId::kFfnGate, x);  // (rows, hidden)
  const Tensor<T> up = weights.linear(layer, WeightId::kFfnUp, x);      // (rows, hidden)
  const Tensor<T> act = ops::swiglu<T>(gate, up);                       // (rows, hidden)
  return weights.linear(layer, WeightId::kFfnDown, act);                // (rows, C)
}

// ---- forward over many sequences -----------------------------------------------------------

// Which logits an entry of a step wants: its last new token's (vocab), every new token's
// (n, vocab), or none (a prefill chunk that does not end its prompt).
enum class Logits { kLast, kAll, kNone };

// One sequence's share of a step: its cache (positions cache.length ...) and its new tokens, a
// prefill chunk or one decode token.
template <class T = float>
struct BatchEntry {
  KvCache<T>& cache;
  std::span<const int32_t> tokens;
  Logits logits = Logits::kLast;
};

namespace kv_detail {

// The run-time window argument of a fixed policy (its own W; CausalFull has none).
template <class Window>
constexpr int64_t fixed_window() {
  if constexpr (requires { Window::kWindow; }) {
    return Window::kWindow;
  } else {
    return 0;
  }
}

// One stacked row's attention: its query position, the window of its query block, and the
// cache it reads (positions 0 .. pos, this step's keys included).
template <class T>
struct RowTask {
  KvCache<T>* cache;
  int64_t pos;
  int64_t seq;  // the sequence's length after this step (the policies' `seq` argument)
  int64_t window;
};

// Attention of every stacked row over its own sequence's cache, layer l. q (rows, H, hd) ->
// o (rows, H, hd). Scores in float (double for T = double), softmax with the row max subtracted,
// one summation order per element: a row's result depends on nothing but its own cache.
template <class Window, class T>
void attend(const std::vector<RowTask<T>>& rows, const T* q, int64_t l, T* o, int64_t H,
            int64_t KV, int64_t hd) {
  using A = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const A scale = static_cast<A>(1.0 / std::sqrt(static_cast<double>(hd)));
  const int64_t group = H / KV;
  const auto n = static_cast<int64_t>(rows.size());
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t h = 0; h < H; ++h) {
      const RowTask<T>& task = rows[static_cast<std::size_t>(r)];
      KvCache<T>& cache = *task.cache;
      const int64_t keys = task.pos + 1;
      const int64_t kvh = h / group;
      const T* qi = q + (r * H + h) * hd;
      std::vector<A> s(static_cast<std::size_t>(keys));
      A mx = -std::numeric_limits<A>::infinity();
      // The window's own mask (the query itself is always allowed, so mx is finite).
      std::vector<char> ok(static_cast<std::size_t>(keys));
      for (int64_t j = 0; j < keys; ++j) {
        ok[j] = Window::allowed(task.pos, j, task.seq, task.window);
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
      T* oi = o + (r * H + h) * hd;
      for (int64_t d = 0; d < hd; ++d) oi[d] = static_cast<T>(acc[d] / sum);
    }
  }
}

// VariableWindow: the window of every query block that begins among one sequence's new tokens,
// chosen by the layer's selector from the block's signal rows [q0 - block + 1, q0] (the cache
// keeps the earlier ones), as the full forward chooses it. x (n, C): the new tokens' selector
// input (the attention input, norm1's output). Fills window[t] for the n new tokens and updates
// the history. The selector's choice for a block depends only on its signal rows (the
// LearnedSelector's straight-through factor is 1 in the forward), so it is asked about one block
// at a time: block 0 alone (its one signal row), a later block as block 1 of a (block + 1)-row
// span whose rows 1 .. block are its signal rows.
template <class Window, class Selector, class T>
void choose_windows(const Selector& selector, WindowHistory<T>& hist, const T* x, int64_t start,
                    int64_t n, int64_t C, int64_t* window) {
  constexpr int64_t B = Window::kBlockSize;
  constexpr auto sizes = Window::kSizes;
  const std::span<const int> size_span(sizes.data(), sizes.size());
  const int64_t kept = static_cast<int64_t>(hist.rows.size()) / C;
  std::vector<T> span(hist.rows);  // positions [start - kept, start + n)
  span.insert(span.end(), x, x + n * C);
  const int64_t base = start - kept;
  nn::WindowChoice choice;
  for (int64_t p = start; p < start + n; ++p) {
    if (p % B != 0) continue;
    const int64_t qb = p / B;
    TESSERA_CHECK(static_cast<int64_t>(hist.choice.size()) == qb,
                  "forward_batch: the cache's window history holds ", hist.choice.size(),
                  " query blocks at position ", p, " (expected ", qb, ")");
    if (qb == 0) {
      selector.choose(span.data() + (p - base) * C, 1, 1, C, B, size_span, choice);
      hist.choice.push_back(choice.index[0]);
    } else {
      TESSERA_CHECK(p - B + 1 >= base, "forward_batch: the window history lacks position ",
                    p - B + 1);
      std::vector<T> buf(static_cast<std::size_t>((B + 1) * C), T(0));
      std::copy_n(span.data() + (p - B + 1 - base) * C, B * C, buf.data() + C);
      selector.choose(buf.data(), 1, B + 1, C, B, size_span, choice);
      hist.choice.push_back(choice.index[1]);
    }
  }
  for (int64_t t = 0; t < n; ++t)
    window[t] = sizes[static_cast<std::size_t>(hist.choice[static_cast<std::size_t>((start + t) / B)])];
  // The next block's signal rows reach back block - 1 positions before its first token.
  const int64_t keep = std::min<int64_t>(B - 1, start + n);
  hist.rows.assign(span.end() - keep * C, span.end());
}

}  // namespace kv_detail

// Runs every entry's new tokens (positions entry.cache.length ...) through the model in one
// pass, appends their keys and values to each entry's cache, and returns one tensor per entry:
// (vocab) for Logits::kLast, (n, vocab) for kAll, an empty tensor for kNone. The entries' caches
// must be distinct (they may share a pool). Blocks for all entries are reserved before any layer
// runs: a full pool leaves every cache unchanged.
template <class Config, class Weights>
  requires LinearWeights<Weights, typename models::Decoder<Config, Cpu>::T>
std::vector<Tensor<typename models::Decoder<Config, Cpu>::T>> forward_batch(
    models::Decoder<Config, Cpu>& model,
    std::span<const BatchEntry<typename models::Decoder<Config, Cpu>::T>> entries,
    const Weights& weights) {
  using M = models::Decoder<Config, Cpu>;
  using R = typename M::Resolved;
  using T = typename M::T;
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "forward_batch: the cache path runs float or double models");
  constexpr int64_t C = R::d_model, H = R::heads, KV = R::kv_heads, hd = R::head_dim;
  const auto E = static_cast<int64_t>(entries.size());
  TESSERA_CHECK(E >= 1, "forward_batch: no entries");

  // Check everything before changing anything.
  std::vector<int64_t> first(static_cast<std::size_t>(E + 1), 0);  // each entry's stacked rows
  std::vector<const KvCache<T>*> seen;
  for (int64_t e = 0; e < E; ++e) {
    const BatchEntry<T>& en = entries[static_cast<std::size_t>(e)];
    KvCache<T>& cache = en.cache;
    const auto n = static_cast<int64_t>(en.tokens.size());
    TESSERA_CHECK(n >= 1, "forward_batch: entry ", e, " has no tokens");
    TESSERA_CHECK(cache.capacity() > 0 && cache.pool().layers() == R::layers &&
                      cache.pool().kv_heads() == KV && cache.pool().head_dim() == hd,
                  "forward_batch: entry ", e,
                  "'s cache was made for another model shape (or is empty)");
    TESSERA_CHECK(cache.length + n <= cache.capacity() && cache.length + n <= R::max_seq,
                  "forward_batch: entry ", e, ": ", cache.length, " cached + ", n,
                  " new tokens exceed the capacity ",
                  std::min<int64_t>(cache.capacity(), R::max_seq));
    for (int32_t t : en.tokens)
      TESSERA_CHECK(t >= 0 && t < R::vocab, "forward_batch: entry ", e, ": token id ", t,
                    " is outside the vocabulary [0, ", R::vocab, ")");
    TESSERA_CHECK(std::find(seen.begin(), seen.end(), &cache) == seen.end(),
                  "forward_batch: entry ", e, " uses a cache that an earlier entry of the step "
                  "uses; a sequence takes one entry per step");
    seen.push_back(&cache);
    first[static_cast<std::size_t>(e + 1)] = first[static_cast<std::size_t>(e)] + n;
  }
  model.for_each_block([&](int64_t l, auto& block) {
    using Block = std::decay_t<decltype(block)>;
    static_assert(Block::window_policy::kCausal,
                  "forward_batch: the cache runs causal window policies only");
    if constexpr (Block::kMoE) {
      TESSERA_CHECK(block.ffn().options().capacity_factor == 0.0, "forward_batch: layer ", l,
                    " is an MoE layer with capacity_factor = ",
                    block.ffn().options().capacity_factor,
                    "; which tokens it drops depends on every token of a forward, which cached "
                    "decoding cannot reproduce. Run inference with capacity_factor = 0");
    }
  });
  const int64_t rows = first.back();
  {
    std::vector<std::size_t> before;  // each cache's blocks before this step
    try {
      for (int64_t e = 0; e < E; ++e) {
        KvCache<T>& cache = entries[static_cast<std::size_t>(e)].cache;
        before.push_back(cache.block_table().size());
        cache.reserve(cache.length + first[e + 1] - first[e]);
      }
    } catch (...) {
      for (std::size_t e = 0; e < before.size(); ++e)
        entries[e].cache.release_blocks_after(before[e]);
      throw;
    }
  }

  Tensor<int32_t> ids(Shape{rows});
  Tensor<int32_t> positions(Shape{rows});
  std::vector<kv_detail::RowTask<T>> tasks(static_cast<std::size_t>(rows));
  for (int64_t e = 0; e < E; ++e) {
    const BatchEntry<T>& en = entries[static_cast<std::size_t>(e)];
    const int64_t start = en.cache.length, n = first[e + 1] - first[e];
    for (int64_t t = 0; t < n; ++t) {
      const int64_t r = first[e] + t;
      ids.data()[r] = en.tokens[static_cast<std::size_t>(t)];
      positions.data()[r] = static_cast<int32_t>(start + t);
      tasks[static_cast<std::size_t>(r)] = {&en.cache, start + t, start + n, 0};
    }
  }
  typename nn::Embedding<T>::Saved es;
  Tensor<T> h = model.embedding().forward(ids, es);  // (rows, C)
  model.for_each_block([&](int64_t l, auto& block) {
    using Block = std::decay_t<decltype(block)>;
    using Window = typename Block::window_policy;
    typename nn::RMSNorm<T>::Saved ns;
    const Tensor<T> x1 = block.norm1().forward(h, ns);                 // (rows, C)
    const Tensor<T> q0 = weights.linear(l, WeightId::kQ, x1);          // (rows, H*hd)
    const Tensor<T> k0 = weights.linear(l, WeightId::kK, x1);          // (rows, KV*hd)
    const Tensor<T> v0 = weights.linear(l, WeightId::kV, x1);          // (rows, KV*hd)
    const auto& table = block.attn().rope_table();
    const Tensor<T> q = ops::rope<T>(q0.reshape({rows, H, hd}), table, positions);  // (rows, H, hd)
    const Tensor<T> k = ops::rope<T>(k0.reshape({rows, KV, hd}), table, positions);  // (rows, KV, hd)
    for (int64_t r = 0; r < rows; ++r) {
      const kv_detail::RowTask<T>& task = tasks[static_cast<std::size_t>(r)];
      std::copy_n(k.data() + r * KV * hd, KV * hd, task.cache->keys(l, task.pos));
      std::copy_n(v0.data() + r * KV * hd, KV * hd, task.cache->values(l, task.pos));
    }
    if constexpr (Window::kAdaptive) {
      std::vector<int64_t> window(static_cast<std::size_t>(rows));
      for (int64_t e = 0; e < E; ++e) {
        KvCache<T>& cache = entries[static_cast<std::size_t>(e)].cache;
        kv_detail::choose_windows<Window>(block.attn().selector(), cache.window_history(l),
                                          x1.data() + first[e] * C, cache.length,
                                          first[e + 1] - first[e], C, window.data() + first[e]);
      }
      for (int64_t r = 0; r < rows; ++r)
        tasks[static_cast<std::size_t>(r)].window = window[static_cast<std::size_t>(r)];
    } else {
      for (auto& task : tasks) task.window = kv_detail::fixed_window<Window>();
    }
    Tensor<T> o = Tensor<T>::empty(Shape{rows, H * hd});
    kv_detail::attend<Window, T>(tasks, q.data(), l, o.data(), H, KV, hd);
    const Tensor<T> a = weights.linear(l, WeightId::kO, o);            // (rows, C)
    const Tensor<T> h1 = ops::add<T>(h, a);                            // residual
    typename nn::RMSNorm<T>::Saved ns2;
    const Tensor<T> x2 = block.norm2().forward(h1, ns2);               // (rows, C)
    Tensor<T> f;                                                       // (rows, C)
    if constexpr (Block::kMoE) {
      typename Block::FfnLayer::Saved fs;
      f = block.ffn().forward(x2, fs);
    } else {
      f = swiglu_ffn<T>(weights, l, x2);
    }
    h = ops::add<T>(h1, f);                                            // (rows, C)
  });
  for (int64_t e = 0; e < E; ++e) entries[static_cast<std::size_t>(e)].cache.length += first[e + 1] - first[e];

  // The head runs only on the rows whose logits are wanted, gathered into one product.
  std::vector<int64_t> picked;  // stacked row of each wanted logit row
  for (int64_t e = 0; e < E; ++e) {
    const Logits want = entries[static_cast<std::size_t>(e)].logits;
    if (want == Logits::kLast) picked.push_back(first[e + 1] - 1);
    if (want == Logits::kAll)
      for (int64_t r = first[e]; r < first[e + 1]; ++r) picked.push_back(r);
  }
  std::vector<Tensor<T>> out(static_cast<std::size_t>(E));
  if (picked.empty()) return out;
  const auto m = static_cast<int64_t>(picked.size());
  Tensor<T> hs = Tensor<T>::empty(Shape{m, C});  // (m, C)
  for (int64_t i = 0; i < m; ++i)
    std::copy_n(h.data() + picked[static_cast<std::size_t>(i)] * C, C, hs.data() + i * C);
  typename nn::RMSNorm<T>::Saved fn;
  const Tensor<T> hn = model.final_norm().forward(hs, fn);            // (m, C)
  const Tensor<T> logits = weights.linear(-1, WeightId::kHead, hn);   // (m, V)
  int64_t at = 0;
  for (int64_t e = 0; e < E; ++e) {
    const Logits want = entries[static_cast<std::size_t>(e)].logits;
    if (want == Logits::kNone) continue;
    const int64_t n = want == Logits::kAll ? first[e + 1] - first[e] : 1;
    Tensor<T> t = want == Logits::kAll ? Tensor<T>::empty(Shape{n, R::vocab})
                                       : Tensor<T>::empty(Shape{R::vocab});
    std::copy_n(logits.data() + at * R::vocab, n * R::vocab, t.data());
    out[static_cast<std::size_t>(e)] = std::move(t);
    at += n;
  }
  return out;
}

// The same with the model's own fp32 (or fp64) weights.
template <class Config>
std::vector<Tensor<typename models::Decoder<Config, Cpu>::T>> forward_batch(
    models::Decoder<Config, Cpu>& model,
    std::span<const BatchEntry<typename models::Decoder<Config, Cpu>::T>> entries) {
  return forward_batch(model, entries, DenseWeights<models::Decoder<Config, Cpu>>(model));
}

// Runs `tokens` (positions cache.length ...) through the model, appends their keys and values
// to the cache, and returns the logits: (vocab) of the last token, or (n, vocab) of every new
// token when all_logits is true. forward_batch with one entry.
template <class Config>
Tensor<typename models::Decoder<Config, Cpu>::T> forward_cached(
    models::Decoder<Config, Cpu>& model, std::span<const int32_t> tokens,
    KvCache<typename models::Decoder<Config, Cpu>::T>& cache, bool all_logits = false) {
  using T = typename models::Decoder<Config, Cpu>::T;
  TESSERA_CHECK(!tokens.empty(), "forward_cached: no tokens");
  const BatchEntry<T> entry{cache, tokens, all_logits ? Logits::kAll : Logits::kLast};
  return std::move(forward_batch(model, std::span<const BatchEntry<T>>(&entry, 1))[0]);
}

// The same through another Weights object (infer/quantized_weights.hpp: INT4, FP8, BF16).
template <class Config, class Weights>
  requires LinearWeights<Weights, typename models::Decoder<Config, Cpu>::T>
Tensor<typename models::Decoder<Config, Cpu>::T> forward_cached(
    models::Decoder<Config, Cpu>& model, std::span<const int32_t> tokens,
    KvCache<typename models::Decoder<Config, Cpu>::T>& cache, const Weights& weights,
    bool all_logits = false) {
  using T = typename models::Decoder<Config, Cpu>::T;
  TESSERA_CHECK(!tokens.empty(), "forward_cached: no tokens");
  const BatchEntry<T> entry{cache, tokens, all_logits ? Logits::kAll : Logits::kLast};
  return std::move(forward_batch(model, std::span<const BatchEntry<T>>(&entry, 1), weights)[0]);
}

}  // namespace tessera::infer
