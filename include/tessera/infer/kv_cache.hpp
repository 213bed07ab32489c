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
// computed here from its three products (swiglu_ffn). MoE blocks run their own layer (routing,
// dispatch, weighted sum) on the stacked rows; a Weights with expert_ffn (ExpertWeights) does
// the experts' products, otherwise the layer's own parameters do. Products that read one input
// (q/k/v, gate/up) are asked for together (`linears`), which a Weights may answer with one
// call (GroupedLinearWeights).
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
// pool; a sequence's blocks return to the pool when its cache is cleared or destroyed.
//
// A window keeps only its window: after each step, forward_batch gives back the blocks that no
// layer can read from any later query. Each policy says which keys a query at q0 or later may
// read (nn/window.hpp's reachable_keys: its key_span at its widest window), and since a block
// holds every layer's keys, a block goes back only when it is outside every layer's span: with
// a CausalFull layer (or a VariableWindow whose sizes end with kFull) nothing is given back,
// LocalGlobal keeps the blocks of its global tokens, SlidingWindow<W> the blocks of the last
// W - 1 positions. The table keeps its position -> block mapping (a given-back entry is marked),
// keys()/values() of a given-back position are an error, and attention reads only each query's
// key span ([0, global_end) then [lo, pos]), so a decode step costs the window, not the length.
// peak_blocks bounds what a sequence holds at once; infer::Engine admits requests against it.
//
// Scope (see docs/inference.md): every causal window policy (CausalFull, SlidingWindow,
// LocalGlobal, VariableWindow, per layer too), each query masked by its block's policy exactly
// as the full forward masks it. VariableWindow chooses a query block's window when the block's
// first token arrives, from the selector input rows that end at that token (nn/window.hpp's
// signal_rows), which the cache keeps per layer. Dense and MoE blocks; an MoE layer with a
// capacity limit is refused at run time (which tokens it drops depends on all the tokens of a
// forward). Float or double Scalar.
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
  // The most blocks in use at once since the pool was made or reset_high_water() was called.
  int64_t high_water() const { return high_water_; }
  void reset_high_water() { high_water_ = blocks_in_use(); }
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
      high_water_ = std::max(high_water_, blocks_in_use());
      return b;
    }
    TESSERA_CHECK(static_cast<int64_t>(blocks_.size()) < max_blocks_, "KvBlockPool: all ",
                  max_blocks_, " blocks of ", block_tokens_,
                  " tokens are in use; free a sequence's cache or make a larger pool");
    blocks_.emplace_back(static_cast<std::size_t>(block_elements()));
    high_water_ = std::max(high_water_, blocks_in_use());
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
  int64_t high_water_ = 0;
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
// pool when it is cleared or destroyed, and, during decoding, as soon as no layer's window can
// read them from a later query (forward_batch calls drop_unreachable after each step). The table
// keeps one entry per block of positions [0, length): a block given back stays in it as
// kFreedBlock, so position p stays in entry p / block_tokens.
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

  static constexpr int32_t kFreedBlock = -1;

  void clear() {
    if (pool_)
      for (int32_t b : table_)
        if (b != kFreedBlock) pool_->release(b);
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
  // Gives back the blocks that hold only positions in [global_end, lo): those that no later
  // query reads, when every layer's reachable keys (nn/window.hpp's reachable_keys) lie in
  // [0, global_end) ∪ [lo, ...). Returns how many blocks went back.
  int64_t drop_unreachable(int64_t global_end, int64_t lo) {
    const int64_t bt = pool_->block_tokens();
    const int64_t from = (std::max<int64_t>(global_end, 0) + bt - 1) / bt;
    const int64_t to = std::min<int64_t>(std::max<int64_t>(lo, 0) / bt,
                                         static_cast<int64_t>(table_.size()));
    int64_t dropped = 0;
    for (int64_t b = from; b < to; ++b) {
      int32_t& id = table_[static_cast<std::size_t>(b)];
      if (id == kFreedBlock) continue;
      pool_->release(id);
      id = kFreedBlock;
      ++dropped;
    }
    return dropped;
  }
  // Blocks this cache holds (reserved ones included, given-back ones not).
  int64_t blocks_held() const {
    return static_cast<int64_t>(std::count_if(table_.begin(), table_.end(),
                                              [](int32_t b) { return b != kFreedBlock; }));
  }
  // Whether position pos has a block (reserved and not given back).
  bool holds(int64_t pos) const {
    const int64_t bt = pool_->block_tokens();
    return pos >= 0 && pos / bt < static_cast<int64_t>(table_.size()) &&
           table_[static_cast<std::size_t>(pos / bt)] != kFreedBlock;
  }
  T* keys(int64_t l, int64_t pos) {
    return pool_->keys(block_of(pos), l, pos % pool_->block_tokens());
  }
  T* values(int64_t l, int64_t pos) {
    return pool_->values(block_of(pos), l, pos % pool_->block_tokens());
  }

 private:
  int32_t block_of(int64_t pos) const {
    const int64_t bt = pool_->block_tokens();
    TESSERA_CHECK(pos >= 0 && pos / bt < static_cast<int64_t>(table_.size()), "KvCache: position ",
                  pos, " has no block (", table_.size(), " blocks of ", bt, " reserved)");
    const int32_t b = table_[static_cast<std::size_t>(pos / bt)];
    TESSERA_CHECK(b != kFreedBlock, "KvCache: position ", pos,
                  " was given back to the pool: no layer's window reads it from a query at "
                  "position ", length, " or later (kv_cache.hpp, drop_unreachable)");
    return b;
  }

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

// Weights that multiply several matrices reading the same input in one call. Why: a decode step
// is ~7 products per layer, most of them small (SmolLM2's k and v are 576 x 192), and each
// product is a parallel region and a pass over x of its own; the fused call is one of each for
// q/k/v and one for gate/up. `linear_group` returns one (rows, out_i) tensor per id, each equal
// to what linear(layer, id, x) returns for it.
template <class W, class T>
concept GroupedLinearWeights =
    LinearWeights<W, T> && requires(const W& w, int64_t layer, std::span<const WeightId> ids,
                                    TensorView<const T, Cpu> x) {
      { w.linear_group(layer, ids, x) } -> std::convertible_to<std::vector<Tensor<T>>>;
    };

// The products of `ids` (all reading x) for layer `layer`: through linear_group when the
// Weights has it, else one linear() each.
template <class T, class Weights, std::size_t N>
  requires LinearWeights<Weights, T>
std::array<Tensor<T>, N> linears(const Weights& weights, int64_t layer,
                                 const std::array<WeightId, N>& ids, TensorView<const T, Cpu> x) {
  std::array<Tensor<T>, N> out;
  if constexpr (GroupedLinearWeights<Weights, T>) {
    std::vector<Tensor<T>> ys = weights.linear_group(layer, std::span<const WeightId>(ids), x);
    TESSERA_CHECK(ys.size() == N, "linears: linear_group returned ", ys.size(),
                  " tensors for ", N, " weights");
    for (std::size_t i = 0; i < N; ++i) out[i] = std::move(ys[i]);
  } else {
    for (std::size_t i = 0; i < N; ++i) out[i] = weights.linear(layer, ids[i], x);
  }
  return out;
}

// An expert of an MoE block: routed expert `index` or, when `shared`, shared expert `index`.
struct ExpertId {
  bool shared = false;
  int index = 0;
};

// Weights that also hold an MoE block's experts: `expert_ffn` is the expert's whole SwiGLU FFN,
// w_down(silu(w_gate x) * (w_up x)), on the rows routed to it. With it, forward_batch runs an
// MoE layer's routing and weighted sum as nn::MoE does and the experts' products through the
// Weights; without it, the layer runs with the model's own expert parameters.
template <class W, class T>
concept ExpertWeights = requires(const W& w, int64_t layer, ExpertId e,
                                 TensorView<const T, Cpu> x) {
  { w.expert_ffn(layer, e, x) } -> std::convertible_to<Tensor<T>>;
};

// The dense SwiGLU FFN of layer `layer` from its three products, as nn::SwiGluFfn computes it:
// w_down (silu(w_gate x) * (w_up x)). x (rows, C) -> (rows, C).
template <class T, class Weights>
  requires LinearWeights<Weights, T>
Tensor<T> swiglu_ffn(const Weights& weights, int64_t layer, TensorView<const T, Cpu> x) {
  auto [gate, up] = linears<T>(weights, layer, std::array{WeightId::kFfnGate, WeightId::kFfnUp},
                               x);                                      // (rows, hidden) each
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

// The keys a layer with this policy may read from a query at q0 or later (nn/window.hpp); a
// policy that does not say keeps every key.
template <class Window>
nn::KeySpan reachable_keys(int64_t q0, int64_t seq) {
  if constexpr (requires { Window::reachable_keys(q0, seq); }) {
    return Window::reachable_keys(q0, seq);
  } else {
    return {0, 0, seq};
  }
}

// The same for every layer of a model together: [0, global_end) ∪ [lo, max_seq), the union of
// the layers' spans (each a prefix and a suffix, so their union is one too). A block is given
// back only when it is outside every layer's span: the block holds all layers' keys.
template <class R, int... L>
nn::KeySpan reachable_keys_all(int64_t q0, std::integer_sequence<int, L...>) {
  nn::KeySpan u{0, R::max_seq, R::max_seq};  // nothing yet
  const auto merge = [&](nn::KeySpan s) {
    u.global_end = std::max(u.global_end, s.global_end);
    u.lo = std::min(u.lo, s.lo);
  };
  (merge(reachable_keys<typename R::template WindowAt<L>>(q0, R::max_seq)), ...);
  return u;
}
template <class R>
nn::KeySpan model_reachable_keys(int64_t q0) {
  return reachable_keys_all<R>(q0, std::make_integer_sequence<int, static_cast<int>(R::layers)>{});
}

// Blocks of block_tokens positions that a cache holds for positions [0, end) once
// KvCache::drop_unreachable(span.global_end, span.lo) has run.
inline int64_t live_blocks(nn::KeySpan span, int64_t end, int64_t block_tokens) {
  const int64_t hi = (end + block_tokens - 1) / block_tokens;
  const int64_t lo = std::min(std::max<int64_t>(span.lo, 0) / block_tokens, hi);
  const int64_t prefix = (std::max<int64_t>(span.global_end, 0) + block_tokens - 1) / block_tokens;
  return hi - lo + std::min(prefix, lo);
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
  // Each row reads only its policy's key span, [0, g) then [lo, pos]: decoding costs the
  // window, not the sequence. The keys skipped are exactly those the mask would zero, so the
  // sums are the ones a loop from key 0 computes. The span is checked here, outside the parallel
  // loop (an exception must not leave an OpenMP region): it reads no block given back.
  std::vector<std::array<int64_t, 3>> spans(static_cast<std::size_t>(n));  // g, lo, keys
  for (int64_t r = 0; r < n; ++r) {
    const RowTask<T>& task = rows[static_cast<std::size_t>(r)];
    const nn::KeySpan span = Window::key_span(task.pos, task.pos + 1, task.seq, task.window);
    const int64_t keys = task.pos + 1;
    const int64_t g = std::clamp<int64_t>(span.global_end, 0, keys);
    const int64_t lo = std::clamp<int64_t>(span.lo, g, keys);
    spans[static_cast<std::size_t>(r)] = {g, lo, keys};
    const int64_t bt = task.cache->pool().block_tokens();
    for (int64_t j = 0; j < keys; j = (j / bt + 1) * bt) {
      if (j >= g && j < lo) j = lo;
      if (j < keys)
        TESSERA_CHECK(task.cache->holds(j), "forward_batch: the query at position ", task.pos,
                      " reads key ", j, ", whose block was given back to the pool");
    }
  }
  // Multiply-adds of the layer's attention: only a toy model's step is too small to split (a
  // SmolLM2 decode step over 16-64 cached positions, 18K-74K, ran 6-16% faster per token with
  // its heads split over two threads than alone).
  int64_t work = 0;
  for (const auto& [g, lo, keys] : spans) work += 2 * (g + keys - lo) * H * hd;
#pragma omp parallel if (work >= (int64_t{1} << 12))
  {
    std::vector<A> s, acc;  // per thread: scores, output accumulator
    std::vector<char> ok;
#pragma omp for collapse(2) schedule(static)
    for (int64_t r = 0; r < n; ++r) {
      for (int64_t h = 0; h < H; ++h) {
        const RowTask<T>& task = rows[static_cast<std::size_t>(r)];
        KvCache<T>& cache = *task.cache;
        const auto [g, lo, keys] = spans[static_cast<std::size_t>(r)];
        const int64_t count = g + keys - lo;  // keys read: [0, g) then [lo, keys)
        const auto key = [g = g, lo = lo](int64_t k) { return k < g ? k : lo + (k - g); };
        const int64_t kvh = h / group;
        const T* qi = q + (r * H + h) * hd;
        s.assign(static_cast<std::size_t>(count), A(0));
        A mx = -std::numeric_limits<A>::infinity();
        // The window's own mask (the query itself is always allowed, so mx is finite).
        ok.assign(static_cast<std::size_t>(count), 0);
        for (int64_t k = 0; k < count; ++k) {
          const int64_t j = key(k);
          ok[k] = Window::allowed(task.pos, j, task.seq, task.window);
          if (!ok[k]) continue;
          // One running sum in d order, as the full forward's attention sums a score: cached
        // logits then track Decoder::forward's closely even where softmax is sharp (16
        // interleaved partial sums moved SmolLM2-shaped logits 10x further from it).
        const T* kj = cache.keys(l, j) + kvh * hd;
        A dot = 0;
        for (int64_t d = 0; d < hd; ++d) dot += static_cast<A>(qi[d]) * static_cast<A>(kj[d]);
        s[k] = dot * scale;
          mx = std::max(mx, s[k]);
        }
        A sum = 0;
        for (int64_t k = 0; k < count; ++k) {
          s[k] = ok[k] ? std::exp(s[k] - mx) : A(0);
          sum += s[k];
        }
        acc.assign(static_cast<std::size_t>(hd), A(0));
        for (int64_t k = 0; k < count; ++k) {
          if (!ok[k]) continue;
          const int64_t j = key(k);
          const T* vj = cache.values(l, j) + kvh * hd;
          const A p = s[k];
          for (int64_t d = 0; d < hd; ++d) acc[d] += p * static_cast<A>(vj[d]);
        }
        T* oi = o + (r * H + h) * hd;
        for (int64_t d = 0; d < hd; ++d) oi[d] = static_cast<T>(acc[d] / sum);
      }
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

// The most blocks one sequence's cache of `model` holds at once, in blocks of block_tokens
// positions, when positions [0, prompt) are fed in chunks of at most `chunk` tokens and then one
// token per step until `positions` positions are cached, forward_batch giving back after each
// step the blocks that no later query reads. A step that starts at length L with n tokens holds
// the blocks of [0, L + n) that meet the keys reachable from L; the peak is the largest of these
// over every L (any prefill chunking, since a chunk of at most `chunk` tokens may start at any
// L). With a CausalFull layer it is blocks_for(positions); with SlidingWindow<W> layers only,
// about (W - 1 + chunk) / block_tokens + 1. infer::Engine admits a request against it.
template <class Config>
int64_t peak_blocks(const models::Decoder<Config, Cpu>&, int64_t block_tokens, int64_t prompt,
                    int64_t positions, int64_t chunk) {
  using R = typename models::Decoder<Config, Cpu>::Resolved;
  TESSERA_CHECK(block_tokens >= 1 && prompt >= 0 && positions >= prompt && chunk >= 1,
                "peak_blocks: block_tokens ", block_tokens, ", prompt ", prompt, ", positions ",
                positions, ", chunk ", chunk, " (need block_tokens, chunk >= 1 and "
                "0 <= prompt <= positions)");
  int64_t peak = 0;
  for (int64_t L = 0; L < positions; ++L) {
    const int64_t n = L < prompt ? std::min(chunk, prompt - L) : 1;
    peak = std::max(peak, kv_detail::live_blocks(kv_detail::model_reachable_keys<R>(L), L + n,
                                                 block_tokens));
  }
  return peak;
}

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
    // q0 (rows, H*hd), k0 and v0 (rows, KV*hd)
    const auto [q0, k0, v0] =
        linears<T>(weights, l, std::array{WeightId::kQ, WeightId::kK, WeightId::kV}, x1);
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
      if constexpr (ExpertWeights<Weights, T>) {
        f = block.ffn().forward(x2, fs, [&](bool shared, int e, TensorView<const T, Cpu> xe) {
          return Tensor<T>(weights.expert_ffn(l, ExpertId{shared, e}, xe));
        });
      } else {
        f = block.ffn().forward(x2, fs);
      }
    } else {
      f = swiglu_ffn<T>(weights, l, x2);
    }
    h = ops::add<T>(h1, f);                                            // (rows, C)
  });
  for (int64_t e = 0; e < E; ++e) entries[static_cast<std::size_t>(e)].cache.length += first[e + 1] - first[e];
  // Blocks that no layer reads from any later query go back to the pool now.
  for (int64_t e = 0; e < E; ++e) {
    KvCache<T>& cache = entries[static_cast<std::size_t>(e)].cache;
    const nn::KeySpan live = kv_detail::model_reachable_keys<R>(cache.length);
    cache.drop_unreachable(live.global_end, live.lo);
  }

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
