// tessera/infer/batching.hpp — continuous batching: many generation requests served by one model
// and one KV block pool, one forward_batch per step.
//
//   auto pool = ts::infer::make_pool(model, /*max_tokens=*/4096);
//   ts::infer::Engine engine(model, pool, {.max_step_tokens = 256});
//   ts::infer::Request r;  r.prompt = ids;  r.max_new_tokens = 64;  r.stop_tokens = {eos};
//   r.on_token = [&](int32_t id) { std::cout << tok.decode({id}); return true; };  // streamed
//   const int64_t id = engine.submit(std::move(r));     // at any time between steps
//   engine.run_until_idle();                            // or engine.step() in your own loop
//   engine.output(id);                                  // the new tokens
//
// Why: decoding one sequence reads every weight once per token; a step that decodes 16
// sequences reads them once for all 16 (infer/kv_cache.hpp's forward_batch). Continuous
// batching keeps that step full: a request joins as soon as the pool has room and leaves as
// soon as it finishes, instead of a batch waiting for its longest member.
//
// How a step is scheduled (one forward_batch of at most max_step_tokens tokens):
//   1. every running request that is decoding feeds its last sampled token (admission order);
//   2. running requests still in their prompt get the rest of the budget, in admission order,
//      each a chunk of at most what is left (a long prompt is prefilled over several steps,
//      so decoding requests are never stalled behind it);
//   3. while budget is left, waiting requests are admitted in arrival order and prefill a chunk.
// Memory (no preemption): each request has a peak, the most blocks its cache ever holds
// (kv_cache.hpp's peak_blocks over its life of prompt + max_new_tokens - 1 positions, prefilled
// in chunks of at most max_step_tokens). With a CausalFull layer that is its whole life; with
// windows only, forward_batch gives back after each step the blocks no layer reads any more, so
// the peak is about the window plus one step's chunk, whatever the length. The engine promises
// each running request its peak: the blocks it holds plus those it may still draw (owed). A
// request is admitted when its peak fits in the pool's free blocks minus everything owed to the
// running requests, and fewer than max_running requests run (max_running <= max_step_tokens, so
// step 1 always fits); at admission its cache reserves its first min(peak, whole life) blocks.
// So the free blocks always cover what the running requests are owed, a running request never
// runs out of blocks and nothing is ever preempted. The price: blocks held or owed for tokens a
// request may not generate (it frees them when it stops early). The rule counts the blocks that
// other caches hold at admission, but not ones they draw from the shared pool while requests run:
// share a pool with caches outside the engine only between runs. Admission is strictly first
// come, first served: a request that does not fit now waits and holds back later arrivals. One
// that can never fit (a peak above the whole pool, or longer than max_seq) is refused by submit()
// with an error.
// After the forward, each request whose logits were computed (a decode token, or the chunk
// that ends its prompt) samples its next token with its own Sampler, streams it to its
// on_token, and finishes on a stop token, max_new_tokens, on_token returning false, or
// cancel(); its blocks go back to the pool at once.
//
// Determinism: the schedule is a function of the submissions and the steps they arrive between,
// and each request's sampler is seeded by the request alone, so the same arrival order gives the
// same batches and bit-identical outputs. Against the request run alone (generate()) the tokens
// are the same, and the logits agree to float rounding: forward_batch's weight products see a
// different number of rows (kv_cache.hpp's "batch invariance"), and a token can only differ
// where two candidates are that close (tests/infer/test_batching).
#pragma once

#include <algorithm>
#include <concepts>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <utility>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/infer/generate.hpp"
#include "tessera/infer/kv_cache.hpp"
#include "tessera/models/decoder.hpp"

namespace tessera::infer {

struct Request {
  std::vector<int32_t> prompt;
  SamplingOptions sampling{};  // greedy unless sampling.temperature > 0
  int64_t max_new_tokens = 128;
  std::vector<int32_t> stop_tokens;       // the request ends after emitting one of these
  std::function<bool(int32_t)> on_token;  // each new token as it is chosen; false ends the request
};

enum class RequestState { kWaiting, kPrefill, kDecode, kFinished };
enum class FinishReason { kNone, kStopToken, kMaxTokens, kCallback, kCancelled };

inline constexpr const char* to_string(RequestState s) {
  switch (s) {
    case RequestState::kWaiting:
      return "waiting";
    case RequestState::kPrefill:
      return "prefill";
    case RequestState::kDecode:
      return "decode";
    case RequestState::kFinished:
      return "finished";
  }
  return "?";
}
inline constexpr const char* to_string(FinishReason r) {
  switch (r) {
    case FinishReason::kNone:
      return "none";
    case FinishReason::kStopToken:
      return "stop token";
    case FinishReason::kMaxTokens:
      return "max_new_tokens";
    case FinishReason::kCallback:
      return "on_token returned false";
    case FinishReason::kCancelled:
      return "cancelled";
  }
  return "?";
}

struct EngineOptions {
  int64_t max_step_tokens = 256;  // tokens per step, decode and prefill together
  int64_t max_running = 0;        // requests in flight at once; 0: max_step_tokens
};

// What a request has done so far.
struct RequestInfo {
  RequestState state = RequestState::kWaiting;
  FinishReason reason = FinishReason::kNone;
  std::vector<int32_t> output;  // new tokens (a stop token included)
  int64_t prompt_done = 0;      // prompt tokens prefilled
  int64_t prefill_chunks = 0;   // steps its prompt was spread over
  int64_t submitted_step = 0, admitted_step = -1, finished_step = -1;
};

// What one step did.
struct StepStats {
  int64_t step = 0;
  int64_t decode_tokens = 0;
  int64_t prefill_tokens = 0;
  int64_t sequences = 0;  // entries of the forward
  std::vector<int64_t> admitted, finished;
  int64_t tokens() const { return decode_tokens + prefill_tokens; }
};

template <class Config, class Weights = DenseWeights<models::Decoder<Config, Cpu>>>
requires LinearWeights<Weights, typename models::Decoder<Config, Cpu>::T>
class Engine {
 public:
  using Model = models::Decoder<Config, Cpu>;
  using R = typename Model::Resolved;
  using T = typename Model::T;

  Engine(Model& model, std::shared_ptr<KvBlockPool<T>> pool,
         EngineOptions options = {}) requires std::same_as<Weights, DenseWeights<Model>>
      : Engine(model, std::move(pool), Weights(model), options) {}

  Engine(Model& model, std::shared_ptr<KvBlockPool<T>> pool, Weights weights, EngineOptions options)
      : model_(model), pool_(std::move(pool)), weights_(std::move(weights)), options_(options) {
    TESSERA_CHECK(pool_ != nullptr, "Engine: no block pool");
    TESSERA_CHECK(pool_->layers() == R::layers && pool_->kv_heads() == R::kv_heads &&
                      pool_->head_dim() == R::head_dim,
                  "Engine: the pool was made for another model shape");
    TESSERA_CHECK(options_.max_step_tokens >= 1,
                  "Engine: max_step_tokens = ", options_.max_step_tokens, " must be >= 1");
    if (options_.max_running <= 0) options_.max_running = options_.max_step_tokens;
    TESSERA_CHECK(options_.max_running <= options_.max_step_tokens,
                  "Engine: max_running = ", options_.max_running,
                  " exceeds max_step_tokens = ", options_.max_step_tokens,
                  " (every running request decodes one token per step)");
  }

  // Queues a request; returns its id (0, 1, ... in submission order). Throws if it can never
  // run: empty prompt, longer than max_seq, or more blocks than the whole pool.
  int64_t submit(Request request) {
    const auto p = static_cast<int64_t>(request.prompt.size());
    TESSERA_CHECK(p >= 1, "Engine::submit: the prompt is empty");
    TESSERA_CHECK(request.max_new_tokens >= 0,
                  "Engine::submit: max_new_tokens = ", request.max_new_tokens, " must be >= 0");
    TESSERA_CHECK(p + request.max_new_tokens <= R::max_seq, "Engine::submit: ", p, " prompt + ",
                  request.max_new_tokens, " new tokens exceed max_seq = ", R::max_seq);
    for (int32_t t : request.prompt)
      TESSERA_CHECK(t >= 0 && t < R::vocab, "Engine::submit: token id ", t,
                    " is outside the vocabulary [0, ", R::vocab, ")");
    const int64_t need = blocks_needed(request);
    TESSERA_CHECK(need <= pool_->max_blocks(), "Engine::submit: the request needs ", need,
                  " blocks of ", pool_->block_tokens(), " positions at once (", p, " prompt + ",
                  request.max_new_tokens, " new tokens), but the pool has only ",
                  pool_->max_blocks(), ": it can never fit; make a larger pool");
    const auto id = static_cast<int64_t>(slots_.size());
    auto slot = std::make_unique<Slot>(std::move(request));
    slot->peak = need;
    slot->info.submitted_step = step_;
    slot->history = slot->request.prompt;
    if (slot->request.max_new_tokens == 0) {
      finish(*slot, FinishReason::kMaxTokens);
    } else {
      waiting_.push_back(id);
    }
    slots_.push_back(std::move(slot));
    return id;
  }

  // Ends a request now (waiting or running); its blocks go back to the pool.
  void cancel(int64_t id) {
    Slot& s = slot(id);
    if (s.info.state == RequestState::kFinished) return;
    std::erase(waiting_, id);
    std::erase(running_, id);
    finish(s, FinishReason::kCancelled);
  }

  // One forward_batch over the running and newly admitted requests (see the file header).
  StepStats step() {
    StepStats st;
    st.step = step_;
    int64_t budget = options_.max_step_tokens;
    std::vector<BatchEntry<T>> entries;
    std::vector<int64_t> ids;  // the request of each entry
    entries.reserve(running_.size() + waiting_.size());
    for (int64_t id : running_) {
      Slot& s = slot(id);
      if (s.info.state != RequestState::kDecode) continue;
      entries.push_back({s.cache, std::span<const int32_t>(&s.pending, 1), Logits::kLast});
      ids.push_back(id);
      --budget;
      ++st.decode_tokens;
    }
    auto prefill = [&](int64_t id) {
      Slot& s = slot(id);
      const auto p = static_cast<int64_t>(s.request.prompt.size());
      const int64_t n = std::min(budget, p - s.info.prompt_done);
      const bool ends = s.info.prompt_done + n == p;
      entries.push_back({s.cache,
                         std::span<const int32_t>(s.request.prompt.data() + s.info.prompt_done,
                                                  static_cast<std::size_t>(n)),
                         ends ? Logits::kLast : Logits::kNone});
      ids.push_back(id);
      budget -= n;
      st.prefill_tokens += n;
    };
    for (int64_t id : running_) {
      if (budget == 0) break;
      if (slot(id).info.state == RequestState::kPrefill) prefill(id);
    }
    while (budget > 0 && !waiting_.empty() &&
           static_cast<int64_t>(running_.size()) < options_.max_running &&
           slot(waiting_.front()).peak <= pool_->blocks_free() - owed()) {
      const int64_t id = waiting_.front();
      waiting_.erase(waiting_.begin());
      admit(id);
      st.admitted.push_back(id);
      prefill(id);
    }
    st.sequences = static_cast<int64_t>(entries.size());
    if (!entries.empty()) {
      std::vector<Tensor<T>> logits = forward_batch(
          model_, std::span<const BatchEntry<T>>(entries.data(), entries.size()), weights_);
      for (std::size_t i = 0; i < entries.size(); ++i) {
        Slot& s = slot(ids[i]);
        if (s.info.state == RequestState::kPrefill) {
          s.info.prompt_done += static_cast<int64_t>(entries[i].tokens.size());
          ++s.info.prefill_chunks;
          if (s.info.prompt_done < static_cast<int64_t>(s.request.prompt.size())) continue;
          s.info.state = RequestState::kDecode;
        }
        if (const FinishReason r = emit(s, logits[i]); r != FinishReason::kNone) {
          finish(s, r);
          st.finished.push_back(ids[i]);
        }
      }
      std::erase_if(running_,
                    [&](int64_t id) { return slot(id).info.state == RequestState::kFinished; });
    }
    ++step_;
    return st;
  }

  // Steps until every submitted request has finished. Throws if waiting requests can never be
  // admitted because blocks are held outside the engine.
  void run_until_idle() {
    while (!idle()) {
      const StepStats st = step();
      TESSERA_CHECK(st.sequences > 0 || !running_.empty(), "Engine::run_until_idle: request ",
                    waiting_.front(), " needs ", slot(waiting_.front()).peak,
                    " blocks but the pool has ", pool_->blocks_free(),
                    " free and the engine holds none: other caches hold the pool's blocks");
    }
  }

  bool idle() const { return waiting_.empty() && running_.empty(); }
  int64_t waiting() const { return static_cast<int64_t>(waiting_.size()); }
  int64_t running() const { return static_cast<int64_t>(running_.size()); }
  int64_t steps() const { return step_; }
  const EngineOptions& options() const { return options_; }
  const RequestInfo& info(int64_t id) const { return slot(id).info; }
  const std::vector<int32_t>& output(int64_t id) const { return slot(id).info.output; }
  KvBlockPool<T>& pool() { return *pool_; }

 private:
  struct Slot {
    explicit Slot(Request r) : request(std::move(r)), sampler(request.sampling) {}
    Request request;
    RequestInfo info;
    Sampler sampler;
    std::vector<int32_t> history;  // prompt + output: the repetition penalty's memory
    KvCache<T> cache;              // from admission to finish
    int32_t pending = 0;           // the sampled token the next decode step feeds
    int64_t peak = 0;              // blocks promised while it runs (blocks_needed)
  };

  Slot& slot(int64_t id) {
    TESSERA_CHECK(id >= 0 && id < static_cast<int64_t>(slots_.size()), "Engine: no request ", id);
    return *slots_[static_cast<std::size_t>(id)];
  }
  const Slot& slot(int64_t id) const { return const_cast<Engine*>(this)->slot(id); }

  // Positions a request ever feeds: its prompt and all but its last new token.
  static int64_t life(const Request& r) {
    return static_cast<int64_t>(r.prompt.size()) + r.max_new_tokens - 1;
  }
  // The most blocks its cache holds at once (see the file header); its whole life with a
  // CausalFull layer.
  int64_t blocks_needed(const Request& r) const {
    // (max_new_tokens = 0 feeds one position less than the prompt; it finishes at submit.)
    return peak_blocks(model_, pool_->block_tokens(),
                       std::min(static_cast<int64_t>(r.prompt.size()), life(r)), life(r),
                       options_.max_step_tokens);
  }
  // Blocks promised to running requests that they do not hold yet.
  int64_t owed() const {
    int64_t n = 0;
    for (int64_t id : running_) {
      const Slot& s = slot(id);
      const int64_t held = s.cache.blocks_held();
      TESSERA_CHECK(held <= s.peak, "Engine: request ", id, " holds ", held,
                    " blocks, more than the peak of ", s.peak, " it was admitted with");
      n += s.peak - held;
    }
    return n;
  }

  void admit(int64_t id) {
    Slot& s = slot(id);
    s.cache = make_cache(model_, pool_);
    s.cache.reserve(std::min(life(s.request), s.peak * pool_->block_tokens()));
    s.info.state = RequestState::kPrefill;
    s.info.admitted_step = step_;
    running_.push_back(id);
  }

  // Samples, records and streams one token; says whether the request ends with it.
  FinishReason emit(Slot& s, const Tensor<T>& logits) {
    std::vector<float> lf(static_cast<std::size_t>(logits.numel()));
    std::transform(logits.data(), logits.data() + logits.numel(), lf.begin(),
                   [](T v) { return static_cast<float>(v); });
    const int32_t next = s.sampler.sample(lf, s.history);
    s.history.push_back(next);
    s.info.output.push_back(next);
    s.pending = next;
    const bool go_on = s.request.on_token ? s.request.on_token(next) : true;
    const auto& stops = s.request.stop_tokens;
    if (std::find(stops.begin(), stops.end(), next) != stops.end()) return FinishReason::kStopToken;
    if (!go_on) return FinishReason::kCallback;
    if (static_cast<int64_t>(s.info.output.size()) >= s.request.max_new_tokens)
      return FinishReason::kMaxTokens;
    return FinishReason::kNone;
  }

  void finish(Slot& s, FinishReason reason) {
    s.info.state = RequestState::kFinished;
    s.info.reason = reason;
    s.info.finished_step = step_;
    s.cache.clear();  // its blocks go back to the pool now
  }

  Model& model_;
  std::shared_ptr<KvBlockPool<T>> pool_;
  Weights weights_;
  EngineOptions options_;
  std::vector<std::unique_ptr<Slot>> slots_;  // by id
  std::vector<int64_t> waiting_;              // arrival order
  std::vector<int64_t> running_;              // admission order
  int64_t step_ = 0;
};

// `Engine engine(model, pool)` names the model's config once.
template <class Config>
Engine(models::Decoder<Config, Cpu>&,
       std::shared_ptr<KvBlockPool<typename models::Decoder<Config, Cpu>::T>>) -> Engine<Config>;
template <class Config>
Engine(models::Decoder<Config, Cpu>&,
       std::shared_ptr<KvBlockPool<typename models::Decoder<Config, Cpu>::T>>, EngineOptions)
    -> Engine<Config>;

}  // namespace tessera::infer
