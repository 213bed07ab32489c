// tessera/infer/generate.hpp — sampling, streaming generation and chat prompts.
//
//   ts::infer::GenerateOptions opt;              // greedy unless sampling.temperature > 0
//   opt.max_new_tokens = 64;  opt.stop_tokens = {tok.eos};
//   auto out = ts::infer::generate(model, prompt_ids, opt, [&](int32_t id) {
//     std::cout << tokenizer.decode({id}) << std::flush;   // streamed as produced
//     return true;                                         // false stops early
//   });
//
// Stop tokens end generation in generate(); stop strings (which may span tokens) with
// StopStrings in the callback. generate(model, weights, prompt, opt, on_token) decodes through
// another Weights object (infer/quantized_weights.hpp: INT4, FP8 or BF16 matrices).
//
// Sampling (Sampler): the logits are transformed in a fixed order, each step optional:
//   1. repetition penalty (the CTRL paper's, as Hugging Face and llama.cpp apply it): a token
//      already in the history has its logit divided by the penalty when positive, multiplied
//      when negative;
//   2. temperature 0 (the default) means greedy: the arg max, ties to the lowest id;
//   3. otherwise logits / temperature, then top-k (keep the k largest; ties at the boundary
//      keep the lower ids), then top-p (keep the smallest prefix of the sorted distribution
//      whose mass reaches p; at least one token), softmax over what is kept, and one draw.
// The draw is reproducible: the uniform of step s is uniform01(philox_u32(seed, 0, s)), so a
// seed fixes the whole continuation, on any machine.
//
// Chat prompts (render_chat): ChatML, the template family of SmolLM2, Qwen and others
// ("<|im_start|>role\ncontent<|im_end|>\n" per message, then "<|im_start|>assistant\n").
// tessera does not run Jinja; it recognises ChatML templates and reads from the template the
// default system message some of them insert when the conversation has none (SmolLM2's
// "You are a helpful AI assistant named SmolLM, trained by Hugging Face"). Any other template is
// refused with a message. tests/infer compares the rendering with jinja2 on the real template.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/core/rng.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/infer/kv_cache.hpp"

namespace tessera::infer {

struct SamplingOptions {
  float temperature = 0.0f;         // 0: greedy
  int64_t top_k = 0;                // 0: all tokens
  float top_p = 1.0f;               // 1: no nucleus cut
  float repetition_penalty = 1.0f;  // 1: none
  uint64_t seed = 0;
};

// Index of the largest value; ties go to the lowest index.
inline int32_t argmax(std::span<const float> x) {
  TESSERA_CHECK(!x.empty(), "argmax: empty logits");
  std::size_t best = 0;
  for (std::size_t i = 1; i < x.size(); ++i)
    if (x[i] > x[best]) best = i;
  return static_cast<int32_t>(best);
}

class Sampler {
 public:
  explicit Sampler(SamplingOptions o = {}) : o_(o) {
    TESSERA_CHECK(std::isfinite(o.temperature) && o.temperature >= 0.0f,
                  "Sampler: temperature = ", o.temperature, " must be >= 0");
    TESSERA_CHECK(o.top_k >= 0, "Sampler: top_k = ", o.top_k, " must be >= 0");
    TESSERA_CHECK(o.top_p > 0.0f && o.top_p <= 1.0f, "Sampler: top_p = ", o.top_p,
                  " must be in (0, 1]");
    TESSERA_CHECK(o.repetition_penalty > 0.0f, "Sampler: repetition_penalty = ",
                  o.repetition_penalty, " must be > 0");
  }

  const SamplingOptions& options() const { return o_; }

  // One token from `logits` (vocab), given the tokens so far (for the repetition penalty).
  int32_t sample(std::span<const float> logits, std::span<const int32_t> history) {
    std::vector<float> z(logits.begin(), logits.end());
    if (o_.repetition_penalty != 1.0f) {
      std::vector<char> seen(z.size(), 0);
      for (int32_t t : history)
        if (t >= 0 && static_cast<std::size_t>(t) < z.size()) seen[static_cast<std::size_t>(t)] = 1;
      for (std::size_t i = 0; i < z.size(); ++i)
        if (seen[i]) z[i] = z[i] > 0 ? z[i] / o_.repetition_penalty : z[i] * o_.repetition_penalty;
    }
    const uint64_t step = step_++;
    if (o_.temperature == 0.0f) return argmax(z);
    std::vector<int32_t> order(z.size());
    std::iota(order.begin(), order.end(), 0);
    // Descending by logit, ties to the lower id: a deterministic order for the cuts.
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return z[a] > z[b]; });
    std::size_t keep = order.size();
    if (o_.top_k > 0) keep = std::min<std::size_t>(keep, static_cast<std::size_t>(o_.top_k));
    const double mx = z[order[0]];
    std::vector<double> p(keep);
    double sum = 0;
    for (std::size_t i = 0; i < keep; ++i) {
      p[i] = std::exp((static_cast<double>(z[order[i]]) - mx) / o_.temperature);
      sum += p[i];
    }
    if (o_.top_p < 1.0f) {
      double mass = 0;
      std::size_t cut = keep;
      for (std::size_t i = 0; i < keep; ++i) {
        mass += p[i] / sum;
        if (mass >= o_.top_p) {
          cut = i + 1;
          break;
        }
      }
      keep = cut;
      sum = std::accumulate(p.begin(), p.begin() + static_cast<std::ptrdiff_t>(keep), 0.0);
    }
    const double u = uniform01(philox_u32(Seed{o_.seed}, 0, step)) * sum;
    double c = 0;
    for (std::size_t i = 0; i < keep; ++i) {
      c += p[i];
      if (u < c) return order[i];
    }
    return order[keep - 1];
  }

 private:
  SamplingOptions o_;
  uint64_t step_ = 0;
};

struct GenerateOptions {
  int64_t max_new_tokens = 128;
  std::vector<int32_t> stop_tokens;  // generation ends after emitting one of these
  SamplingOptions sampling{};
};

namespace detail {
// The loop of generate(); step(tokens, cache) runs forward_cached with the caller's weights.
template <class Config, class OnToken, class Step>
std::vector<int32_t> generate_loop(models::Decoder<Config, Cpu>& model, std::span<const int32_t> prompt,
                                   const GenerateOptions& opt, OnToken&& on_token, Step&& step) {
  using R = typename models::Decoder<Config, Cpu>::Resolved;
  TESSERA_CHECK(!prompt.empty(), "generate: the prompt is empty");
  TESSERA_CHECK(opt.max_new_tokens >= 0, "generate: max_new_tokens = ", opt.max_new_tokens);
  TESSERA_CHECK(static_cast<int64_t>(prompt.size()) + opt.max_new_tokens <= R::max_seq,
                "generate: ", prompt.size(), " prompt + ", opt.max_new_tokens,
                " new tokens exceed max_seq = ", R::max_seq);
  auto cache = make_cache(model);
  Sampler sampler(opt.sampling);
  std::vector<int32_t> history(prompt.begin(), prompt.end());
  std::vector<int32_t> out;
  if (opt.max_new_tokens == 0) return out;
  auto logits = step(prompt, cache);
  for (int64_t i = 0; i < opt.max_new_tokens; ++i) {
    std::vector<float> lf(logits.data(), logits.data() + logits.numel());
    const int32_t next = sampler.sample(lf, history);
    out.push_back(next);
    history.push_back(next);
    const bool go_on = on_token(next);
    if (!go_on || std::find(opt.stop_tokens.begin(), opt.stop_tokens.end(), next) !=
                      opt.stop_tokens.end())
      break;
    if (i + 1 < opt.max_new_tokens) logits = step(std::span<const int32_t>(&next, 1), cache);
  }
  return out;
}
}  // namespace detail

// Generates after `prompt` with a KV cache; on_token(id) is called for each new token as soon
// as it is chosen and may return false to stop. Returns the new tokens (a stop token included).
template <class Config, class OnToken>
std::vector<int32_t> generate(models::Decoder<Config, Cpu>& model, std::span<const int32_t> prompt,
                              const GenerateOptions& opt, OnToken&& on_token) {
  using T = typename models::Decoder<Config, Cpu>::T;
  return detail::generate_loop(model, prompt, opt, std::forward<OnToken>(on_token),
                               [&](std::span<const int32_t> tokens, KvCache<T>& cache) {
                                 return forward_cached(model, tokens, cache);
                               });
}

template <class Config>
std::vector<int32_t> generate(models::Decoder<Config, Cpu>& model, std::span<const int32_t> prompt,
                              const GenerateOptions& opt) {
  return generate(model, prompt, opt, [](int32_t) { return true; });
}

// The same through another Weights object, e.g. quantised matrices:
//   const ts::infer::QuantizedWeights weights(model, std::move(quantised));
//   ts::infer::generate(model, weights, prompt_ids, opt, on_token);
template <class Config, class Weights, class OnToken>
  requires LinearWeights<Weights, typename models::Decoder<Config, Cpu>::T>
std::vector<int32_t> generate(models::Decoder<Config, Cpu>& model, const Weights& weights,
                              std::span<const int32_t> prompt, const GenerateOptions& opt,
                              OnToken&& on_token) {
  using T = typename models::Decoder<Config, Cpu>::T;
  return detail::generate_loop(model, prompt, opt, std::forward<OnToken>(on_token),
                               [&](std::span<const int32_t> tokens, KvCache<T>& cache) {
                                 return forward_cached(model, tokens, cache, weights);
                               });
}

template <class Config, class Weights>
  requires LinearWeights<Weights, typename models::Decoder<Config, Cpu>::T>
std::vector<int32_t> generate(models::Decoder<Config, Cpu>& model, const Weights& weights,
                              std::span<const int32_t> prompt, const GenerateOptions& opt) {
  return generate(model, weights, prompt, opt, [](int32_t) { return true; });
}

// ---- stop strings ---------------------------------------------------------------------------------

// Watches the generated text for stop strings, which may span tokens ("\n\n" arriving as "\n"
// then "\n"): push() each token's text from the on_token callback and return !push(...) to end
// generation; text() is the reply up to (not including) the first stop string.
//   ts::infer::StopStrings stop({"\nUser:", "\n\n"});
//   generate(model, prompt, opt, [&](int32_t id) { return !stop.push(tok.decode({id})); });
class StopStrings {
 public:
  explicit StopStrings(std::vector<std::string> stops) : stops_(std::move(stops)) {
    for (const auto& s : stops_)
      TESSERA_CHECK(!s.empty(), "StopStrings: an empty stop string would stop at once");
  }
  // Appends a piece; true when the text now contains a stop string.
  bool push(std::string_view piece) {
    if (hit_ != std::string::npos) return true;
    // Only matches that end inside the new piece are new: start the search far enough back.
    std::size_t longest = 0;
    for (const auto& s : stops_) longest = std::max(longest, s.size());
    const std::size_t from = text_.size() > longest ? text_.size() - longest + 1 : 0;
    text_ += piece;
    for (const auto& s : stops_) {
      const std::size_t at = text_.find(s, from);
      if (at != std::string::npos) hit_ = std::min(hit_, at);
    }
    return hit_ != std::string::npos;
  }
  bool stopped() const { return hit_ != std::string::npos; }
  std::string text() const { return text_.substr(0, std::min(hit_, text_.size())); }

 private:
  std::vector<std::string> stops_;
  std::string text_;
  std::size_t hit_ = std::string::npos;
};

// ---- chat prompts -------------------------------------------------------------------------------

struct ChatMessage {
  std::string role;  // "system", "user", "assistant"
  std::string content;
};

// The default system message a ChatML template inserts when the conversation has none, read
// from the template text; "" when it has none.
inline std::string chatml_default_system(std::string_view tmpl) {
  const auto cond = tmpl.find("!= 'system'");
  if (cond == std::string_view::npos) return {};
  const std::string_view open = "'<|im_start|>system\n", close = "<|im_end|>";
  const auto b = tmpl.find(open, cond);
  if (b == std::string_view::npos) return {};
  const auto e = tmpl.find(close, b + open.size());
  TESSERA_CHECK(e != std::string_view::npos, "chat template: unterminated default system message");
  return std::string(tmpl.substr(b + open.size(), e - b - open.size()));
}

// Renders a conversation with a ChatML template (see the file header).
inline std::string render_chat(std::span<const ChatMessage> messages, std::string_view tmpl,
                               bool add_generation_prompt = true) {
  TESSERA_CHECK(tmpl.find("<|im_start|>") != std::string_view::npos &&
                    tmpl.find("<|im_end|>") != std::string_view::npos,
                "render_chat: the chat template is not ChatML (no <|im_start|> / <|im_end|>); "
                "tessera renders only ChatML templates");
  std::string out;
  if (!messages.empty() && messages[0].role != "system") {
    const std::string sys = chatml_default_system(tmpl);
    if (!sys.empty()) out += "<|im_start|>system\n" + sys + "<|im_end|>\n";
  }
  for (const ChatMessage& m : messages)
    out += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
  if (add_generation_prompt) out += "<|im_start|>assistant\n";
  return out;
}

}  // namespace tessera::infer
