// tests/infer/test_batching.cpp — forward_batch and the continuous batching engine on a tiny
// random-weight decoder (no data; well under a second).
//
//   forward_batch       a step of four sequences in different states (decode tokens, prefill
//                       chunks with all / last / no logits) against each sequence run alone
//                       through forward_cached; the next steps too, so the caches it wrote are
//                       checked; to float rounding with the default back ends, bit for bit with
//                       TESSERA_CPU_PATH=scalar; the M-dependence of ops::linear, printed
//   weights             the dense SwiGLU FFN from its three products equals the layer's
//                       forward; a counting Weights sees every product of a step
//   errors              a cache twice in one step; a full pool leaves every cache unchanged
//   engine_*            eight requests (prompts of 1 to 33 tokens, greedy and seeded top-p
//                       samplers, a stop token, a callback that stops, arrivals at different
//                       steps) against generate() alone; blocks back to 0; the token budget
//                       and chunked prefill; a pool too small; the same arrivals twice; an
//                       engine serving through its own Weights
#define BOOST_TEST_MODULE batching
#include <algorithm>
#include <boost/test/unit_test.hpp>
#include <cmath>
#include <cstdint>
#include <iostream>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "cache_check.hpp"
#include "tessera/infer/batching.hpp"
#include "tessera/infer/generate.hpp"
#include "tessera/infer/kv_cache.hpp"

namespace ts = tessera;
namespace inf = tessera::infer;

namespace tessera::infer {  // for BOOST_TEST's messages
inline std::ostream& operator<<(std::ostream& os, RequestState s) { return os << to_string(s); }
inline std::ostream& operator<<(std::ostream& os, FinishReason r) { return os << to_string(r); }
}  // namespace tessera::infer

namespace {

struct Tiny {
  static constexpr int vocab = 97, d_model = 48, layers = 3, heads = 6, kv_heads = 2;
  static constexpr int ffn_hidden = 40, max_seq = 64, attention_block = 8;
  static constexpr bool tie_embeddings = true;
  static constexpr double rope_theta = 500.0, norm_eps = 1e-5;
};
using Model = ts::Decoder<Tiny>;

Model& model() {
  static Model m{ts::Seed{23}};
  static const bool scaled = [] {
    // Larger weights than the default init: peaked distributions, so a wrong row shows.
    m.visit_parameters([](std::string_view, ts::nn::Parameter<float>& p) {
      for (int64_t i = 0; i < p.value.numel(); ++i) p.value.data()[i] *= 3.0f;
    });
    return true;
  }();
  (void)scaled;
  return m;
}

std::vector<int32_t> tokens(int n, int salt) {
  std::vector<int32_t> v;
  for (int i = 0; i < n; ++i) v.push_back((i * 31 + salt * 17 + 5) % Tiny::vocab);
  return v;
}

double max_abs(std::span<const float> a) {
  double m = 0;
  for (float v : a) m = std::max(m, std::abs(static_cast<double>(v)));
  return m;
}

// Largest |a - b| over equal-length spans, and whether they are bit-identical.
struct Diff {
  double worst = 0;
  bool identical = true;
  void add(std::span<const float> a, std::span<const float> b) {
    BOOST_REQUIRE_EQUAL(a.size(), b.size());
    for (std::size_t i = 0; i < a.size(); ++i) {
      worst = std::max(worst, std::abs(static_cast<double>(a[i]) - b[i]));
      identical = identical && a[i] == b[i];
    }
  }
};

std::span<const float> row(const ts::Tensor<float>& t, int64_t r) {
  const int64_t V = Tiny::vocab;
  return {t.data() + r * V, static_cast<std::size_t>(V)};
}

}  // namespace

// A row of ops::linear computed alone and among others. The back end depends on the number of
// rows (a plain loop below 16^3 multiply-adds, BLAS above), and so may the BLAS kernel's
// blocking, so the last bits may differ: here a (48 x 48) projection of one row takes the plain
// loop and of 16 rows BLAS; the (97 x 48) head takes BLAS for both. Printed, not asserted beyond
// rounding: it is a property of the machine's back ends, and the tests below allow for it.
BOOST_AUTO_TEST_CASE(linear_row_dependence_on_rows) {
  ts::Tensor<float> x = ts::Tensor<float>::empty(ts::Shape{16, Tiny::d_model});
  for (int64_t i = 0; i < x.numel(); ++i) x.data()[i] = std::sin(0.37f * static_cast<float>(i));
  int64_t layer0 = -1;
  const ts::Tensor<float>* wq = nullptr;
  model().for_each_block([&](int64_t l, auto& block) {
    if (layer0 < 0) layer0 = l, wq = &block.attn().wq().value;
  });
  const std::pair<const char*, const ts::Tensor<float>*> weights[] = {
      {"wq (48 x 48)", wq}, {"head (97 x 48)", &model().lm_head_weight().value}};
  for (const auto& [name, w] : weights) {
    const auto all = ts::ops::linear<float>(x, *w);                              // (16, out)
    const auto one = ts::ops::linear<float>(x.slice(0, 3, 4).contiguous(), *w);  // (1, out)
    const int64_t out = w->dim(0);
    Diff d;
    d.add({all.data() + 3 * out, static_cast<std::size_t>(out)},
          {one.data(), static_cast<std::size_t>(out)});
    std::cout << "ops::linear " << name << ", a row alone vs among 16: max |diff| " << d.worst
              << (d.identical ? " (bit-identical)" : " (not bit-identical)") << std::endl;
    BOOST_TEST(d.worst <= 1e-5 * max_abs({all.data() + 3 * out, static_cast<std::size_t>(out)}));
  }
}

namespace {
void batch_against_alone(bool exact) {
  Model& m = model();
  auto pool = inf::make_pool(m, 4 * Tiny::max_seq, 4);
  // Four sequences, each first given a different history, then one step of all four:
  //   0: a decode token;  1: a 5-token prefill chunk, every row's logits;
  //   2: a 3-token chunk, no logits;  3: a decode token at position 0 (a new sequence).
  const std::vector<std::vector<int32_t>> history = {tokens(9, 1), tokens(4, 2), tokens(13, 3), {}};
  const std::vector<std::vector<int32_t>> step1 = {{7}, tokens(5, 4), tokens(3, 5), {42}};
  const std::vector<inf::Logits> want = {inf::Logits::kLast, inf::Logits::kAll, inf::Logits::kNone,
                                         inf::Logits::kLast};
  std::vector<inf::KvCache<float>> batched, alone;
  for (std::size_t s = 0; s < 4; ++s) {
    batched.push_back(inf::make_cache(m, pool));
    alone.push_back(inf::make_cache(m, pool));
    if (!history[s].empty()) {
      inf::forward_cached(m, history[s], batched[s]);
      inf::forward_cached(m, history[s], alone[s]);
    }
  }
  Diff d;
  double scale = 0;
  for (int round = 0; round < 3; ++round) {
    std::vector<inf::BatchEntry<float>> entries;
    std::vector<std::vector<int32_t>> feed(4);
    for (std::size_t s = 0; s < 4; ++s) {
      // Round 0 as above; then every sequence decodes one token (its own id), so the next steps
      // read the keys the batched step wrote.
      feed[s] = round == 0 ? step1[s] : std::vector<int32_t>{static_cast<int32_t>(s * 11 + round)};
      entries.push_back({batched[s], feed[s], round == 0 ? want[s] : inf::Logits::kLast});
    }
    const auto out = inf::forward_batch(m, std::span<const inf::BatchEntry<float>>(entries));
    BOOST_REQUIRE_EQUAL(out.size(), 4u);
    for (std::size_t s = 0; s < 4; ++s) {
      const bool all = entries[s].logits == inf::Logits::kAll;
      const auto ref = inf::forward_cached(m, feed[s], alone[s], all);
      BOOST_TEST(batched[s].length == alone[s].length);
      if (entries[s].logits == inf::Logits::kNone) {
        BOOST_TEST(out[s].numel() == 0);
        continue;
      }
      BOOST_REQUIRE(out[s].shape() == ref.shape());
      const int64_t rows = all ? ref.dim(0) : 1;
      for (int64_t r = 0; r < rows; ++r) {
        d.add(row(out[s], r), row(ref, r));
        scale = std::max(scale, max_abs(row(ref, r)));
        BOOST_TEST(inf::argmax(row(out[s], r)) == inf::argmax(row(ref, r)));
      }
    }
  }
  std::cout << "forward_batch vs each sequence alone" << (exact ? " (scalar products)" : "")
            << ": max |diff| " << d.worst << " (logits up to " << scale << ")"
            << (d.identical ? ", bit-identical" : ", not bit-identical") << std::endl;
  BOOST_TEST(scale > 0.0);
  if (exact) {
    BOOST_TEST(d.identical);  // nothing but the number of rows per product differs
  } else {
    BOOST_TEST(d.worst <= 3e-5 * scale);  // float rounding of products over more rows
  }
}
}  // namespace

BOOST_AUTO_TEST_CASE(forward_batch_matches_each_sequence_alone) {
  batch_against_alone(false);
  ts::test::ScalarProducts scalar;
  batch_against_alone(true);
}

BOOST_AUTO_TEST_CASE(dense_ffn_from_three_products_equals_the_layer) {
  Model& m = model();
  const inf::DenseWeights<Model> weights(m);
  ts::Tensor<float> x = ts::Tensor<float>::empty(ts::Shape{5, Tiny::d_model});
  for (int64_t i = 0; i < x.numel(); ++i) x.data()[i] = std::cos(0.11f * static_cast<float>(i));
  int checked = 0;
  m.for_each_block([&](int64_t l, auto& block) {
    typename std::decay_t<decltype(block)>::FfnLayer::Saved saved;
    const auto ref = block.ffn().forward(x, saved);
    const auto got = inf::swiglu_ffn<float>(weights, l, x);
    BOOST_REQUIRE(got.shape() == ref.shape());
    Diff d;
    d.add(got.span(), ref.span());
    BOOST_TEST(d.worst <= 1e-6 * max_abs(ref.span()));
    BOOST_TEST(max_abs(ref.span()) > 0.0);
    ++checked;
  });
  BOOST_TEST(checked == Tiny::layers);
}

namespace {
// A Weights that counts its products and delegates to the dense one: what a quantised
// implementation replaces.
struct CountingWeights {
  const inf::DenseWeights<Model>* dense;
  std::map<std::pair<int64_t, inf::WeightId>, int64_t>* calls;
  ts::Tensor<float> linear(int64_t layer, inf::WeightId id,
                           ts::TensorView<const float, ts::Cpu> x) const {
    ++(*calls)[{layer, id}];
    return dense->linear(layer, id, x);
  }
};
static_assert(inf::LinearWeights<CountingWeights, float>);
}  // namespace

BOOST_AUTO_TEST_CASE(every_weight_product_goes_through_weights) {
  Model& m = model();
  const inf::DenseWeights<Model> dense(m);
  std::map<std::pair<int64_t, inf::WeightId>, int64_t> calls;
  auto c1 = inf::make_cache(m), c2 = inf::make_cache(m), r1 = inf::make_cache(m),
       r2 = inf::make_cache(m);
  const auto p1 = tokens(6, 7), p2 = tokens(2, 8);
  std::vector<inf::BatchEntry<float>> entries = {{c1, p1}, {c2, p2}};
  const auto out = inf::forward_batch(m, std::span<const inf::BatchEntry<float>>(entries),
                                      CountingWeights{&dense, &calls});
  // Seven products per layer and one head product, each once for the whole step.
  BOOST_TEST(calls.size() == static_cast<std::size_t>(7 * Tiny::layers + 1));
  for (const auto& [key, n] : calls) BOOST_TEST(n == 1);
  BOOST_TEST(calls.count({-1, inf::WeightId::kHead}) == 1u);
  std::vector<inf::BatchEntry<float>> same = {{r1, p1}, {r2, p2}};
  const auto ref = inf::forward_batch(m, std::span<const inf::BatchEntry<float>>(same));
  for (std::size_t s = 0; s < 2; ++s)
    BOOST_TEST(out[s].span() == ref[s].span(), boost::test_tools::per_element());
}

BOOST_AUTO_TEST_CASE(forward_batch_errors_leave_caches_unchanged) {
  Model& m = model();
  auto c = inf::make_cache(m);
  const auto p = tokens(3, 9);
  std::vector<inf::BatchEntry<float>> twice = {{c, p}, {c, p}};
  BOOST_CHECK_EXCEPTION(inf::forward_batch(m, std::span<const inf::BatchEntry<float>>(twice)),
                        ts::Error, [](const ts::Error& e) {
                          return std::string(e.what()).find("earlier entry") != std::string::npos;
                        });
  BOOST_TEST(c.length == 0);
  // 3 blocks of 4 positions: the first entry fits, the second does not; neither keeps a block.
  auto small = std::make_shared<inf::KvBlockPool<float>>(Tiny::layers, Tiny::kv_heads,
                                                         Tiny::d_model / Tiny::heads, 4, 3);
  auto a = inf::make_cache(m, small), b = inf::make_cache(m, small);
  const auto pa = tokens(5, 1), pb = tokens(6, 2);
  std::vector<inf::BatchEntry<float>> entries = {{a, pa}, {b, pb}};
  BOOST_CHECK_THROW(inf::forward_batch(m, std::span<const inf::BatchEntry<float>>(entries)),
                    ts::Error);
  BOOST_TEST(a.length == 0);
  BOOST_TEST(b.length == 0);
  BOOST_TEST(small->blocks_in_use() == 0);
}

// ---- the engine ----------------------------------------------------------------------------

namespace {

struct Spec {
  int prompt_len;
  int max_new;
  bool sample;             // seeded top-p, else greedy
  int arrival;             // the step before which it is submitted
  int stop_at = -1;        // use the alone run's token at this index as a stop token
  int callback_stop = -1;  // the callback returns false at this many tokens
};

const std::vector<Spec>& specs() {
  static const std::vector<Spec> s = {
      {3, 6, false, 0, 2}, {7, 10, true, 0}, {12, 4, false, 1}, {1, 8, true, 2, -1, 3},
      {20, 12, false, 2},  {33, 5, true, 3}, {5, 9, false, 5},  {9, 7, true, 8},
  };
  return s;
}

inf::Request make_request(std::size_t i, std::vector<int32_t> stop = {}) {
  const Spec& sp = specs()[i];
  inf::Request r;
  r.prompt = tokens(sp.prompt_len, static_cast<int>(i) + 20);
  r.max_new_tokens = sp.max_new;
  r.stop_tokens = std::move(stop);
  if (sp.sample) {
    r.sampling.temperature = 0.9f;
    r.sampling.top_p = 0.85f;
    r.sampling.seed = 100 + i;
    if (i == 5) r.sampling.repetition_penalty = 1.3f;
  }
  return r;
}

// What generate() gives for request i alone, with the same stop rules.
std::vector<int32_t> alone(std::size_t i, const std::vector<int32_t>& stop) {
  const inf::Request r = make_request(i, stop);
  inf::GenerateOptions opt;
  opt.max_new_tokens = r.max_new_tokens;
  opt.stop_tokens = r.stop_tokens;
  opt.sampling = r.sampling;
  int64_t n = 0;
  const int limit = specs()[i].callback_stop;
  return inf::generate(model(), r.prompt, opt, [&](int32_t) { return ++n != limit; });
}

struct Run {
  std::vector<std::vector<int32_t>> streamed, output;
  std::vector<inf::StepStats> steps;
  std::vector<inf::RequestInfo> info;
};

// The eight requests through one engine: a pool of 24 blocks of 4 positions (not enough for
// all at once), 16 tokens per step.
Run run_engine(const std::vector<std::vector<int32_t>>& stops) {
  auto pool = inf::make_pool(model(), 96, 4);
  inf::Engine engine(model(), pool, inf::EngineOptions{.max_step_tokens = 16});
  Run run;
  run.streamed.resize(specs().size());
  std::vector<int64_t> ids(specs().size(), -1);
  auto submit_due = [&](int64_t step) {
    for (std::size_t i = 0; i < specs().size(); ++i) {
      if (specs()[i].arrival != step) continue;
      inf::Request r = make_request(i, stops[i]);
      const int limit = specs()[i].callback_stop;
      r.on_token = [&run, i, limit](int32_t id) {
        run.streamed[i].push_back(id);
        return static_cast<int>(run.streamed[i].size()) != limit;
      };
      ids[i] = engine.submit(std::move(r));
    }
  };
  for (int64_t step = 0; step < 200; ++step) {
    submit_due(step);
    if (engine.idle() && step > 8) break;
    run.steps.push_back(engine.step());
  }
  BOOST_REQUIRE(engine.idle());
  BOOST_TEST(pool->blocks_in_use() == 0);
  for (std::size_t i = 0; i < specs().size(); ++i) {
    BOOST_REQUIRE(ids[i] >= 0);
    run.output.push_back(engine.output(ids[i]));
    run.info.push_back(engine.info(ids[i]));
  }
  return run;
}

std::vector<std::vector<int32_t>> stop_tokens() {
  std::vector<std::vector<int32_t>> stops(specs().size());
  for (std::size_t i = 0; i < specs().size(); ++i)
    if (specs()[i].stop_at >= 0)
      stops[i] = {alone(i, {})[static_cast<std::size_t>(specs()[i].stop_at)]};
  return stops;
}

}  // namespace

BOOST_AUTO_TEST_CASE(engine_requests_match_generate_alone) {
  const auto stops = stop_tokens();
  const Run run = run_engine(stops);
  int sampled = 0, stopped = 0;
  for (std::size_t i = 0; i < specs().size(); ++i) {
    const std::vector<int32_t> ref = alone(i, stops[i]);
    BOOST_TEST_CONTEXT("request " << i) {
      BOOST_TEST(run.output[i] == ref, boost::test_tools::per_element());
      BOOST_TEST(run.streamed[i] == ref, boost::test_tools::per_element());
      BOOST_TEST(run.info[i].state == inf::RequestState::kFinished);
    }
    sampled += specs()[i].sample;
    stopped += run.info[i].reason == inf::FinishReason::kStopToken;
  }
  BOOST_TEST(sampled == 4);
  BOOST_TEST(stopped >= 1);
  BOOST_TEST(run.info[0].reason == inf::FinishReason::kStopToken);
  BOOST_TEST(run.output[0].size() <= 3u);
  BOOST_TEST(run.info[3].reason == inf::FinishReason::kCallback);
  BOOST_TEST(run.output[3].size() == 3u);
  BOOST_TEST(run.info[1].reason == inf::FinishReason::kMaxTokens);
  // More than one request ran at once, and some had to wait for blocks.
  int64_t most = 0;
  for (const auto& st : run.steps) most = std::max(most, st.sequences);
  BOOST_TEST(most >= 3);
  int waited = 0;
  for (const auto& info : run.info) waited += info.admitted_step > info.submitted_step;
  BOOST_TEST(waited >= 1);
}

BOOST_AUTO_TEST_CASE(engine_budget_and_chunked_prefill) {
  const Run run = run_engine(stop_tokens());
  for (const auto& st : run.steps) {
    BOOST_TEST(st.tokens() <= 16);
    BOOST_TEST(st.decode_tokens <= st.sequences);
  }
  // The 33-token prompt cannot be prefilled in one 16-token step.
  BOOST_TEST(run.info[5].prefill_chunks >= 3);
  BOOST_TEST(run.info[5].prompt_done == 33);
  // Decoding never stalls behind a prefill: a step that prefills also decodes whoever is ready.
  int64_t mixed = 0;
  for (const auto& st : run.steps) mixed += st.decode_tokens > 0 && st.prefill_tokens > 0;
  BOOST_TEST(mixed >= 1);
}

BOOST_AUTO_TEST_CASE(engine_same_arrivals_same_outputs) {
  const auto stops = stop_tokens();
  const Run a = run_engine(stops), b = run_engine(stops);
  BOOST_TEST(a.steps.size() == b.steps.size());
  for (std::size_t i = 0; i < specs().size(); ++i)
    BOOST_TEST(a.output[i] == b.output[i], boost::test_tools::per_element());
  for (std::size_t s = 0; s < std::min(a.steps.size(), b.steps.size()); ++s) {
    BOOST_TEST(a.steps[s].decode_tokens == b.steps[s].decode_tokens);
    BOOST_TEST(a.steps[s].prefill_tokens == b.steps[s].prefill_tokens);
  }
}

BOOST_AUTO_TEST_CASE(engine_refuses_what_can_never_fit) {
  // 4 blocks of 4 positions: 16 positions at most.
  auto pool = inf::make_pool(model(), 16, 4);
  inf::Engine engine(model(), pool, {.max_step_tokens = 8});
  inf::Request big;
  big.prompt = tokens(14, 1);
  big.max_new_tokens = 4;  // 17 positions fed: 5 blocks
  BOOST_CHECK_EXCEPTION(engine.submit(big), ts::Error, [](const ts::Error& e) {
    std::cout << "refused: " << e.what() << std::endl;
    return std::string(e.what()).find("can never fit") != std::string::npos;
  });
  inf::Request too_long;
  too_long.prompt = tokens(10, 2);
  too_long.max_new_tokens = Tiny::max_seq;
  BOOST_CHECK_THROW(engine.submit(too_long), ts::Error);
  auto too_many_running = [&] {
    inf::EngineOptions o;
    o.max_step_tokens = 4;
    o.max_running = 5;
    inf::Engine e(model(), pool, o);
  };
  BOOST_CHECK_THROW(too_many_running(), ts::Error);
  // Two that fit one at a time: the second waits for the first's blocks.
  inf::Request a;
  a.prompt = tokens(9, 3);
  a.max_new_tokens = 4;  // 12 positions: 3 blocks
  const int64_t ia = engine.submit(a), ib = engine.submit(a);
  engine.step();
  BOOST_TEST(engine.running() == 1);
  BOOST_TEST(engine.waiting() == 1);
  engine.run_until_idle();
  BOOST_TEST(engine.output(ia) == engine.output(ib), boost::test_tools::per_element());
  BOOST_TEST(engine.info(ib).admitted_step >= engine.info(ia).finished_step);
  BOOST_TEST(pool->blocks_in_use() == 0);
  // Cancelling a running request gives its blocks back.
  const int64_t ic = engine.submit(a);
  engine.step();
  BOOST_TEST(pool->blocks_in_use() == 3);
  engine.cancel(ic);
  BOOST_TEST(pool->blocks_in_use() == 0);
  BOOST_TEST(engine.info(ic).reason == inf::FinishReason::kCancelled);
  BOOST_TEST(engine.idle());
}

BOOST_AUTO_TEST_CASE(engine_with_its_own_weights) {
  const inf::DenseWeights<Model> dense(model());
  std::map<std::pair<int64_t, inf::WeightId>, int64_t> calls;
  auto pool = inf::make_pool(model(), 64, 4);
  inf::Engine<Tiny, CountingWeights> engine(model(), pool, CountingWeights{&dense, &calls},
                                            {.max_step_tokens = 8});
  const int64_t id = engine.submit(make_request(1));
  engine.run_until_idle();
  BOOST_TEST(engine.output(id) == alone(1, {}), boost::test_tools::per_element());
  // Every step wants logits (the 7-token prompt fits one 8-token step): one head product each.
  const int64_t head = calls[{-1, inf::WeightId::kHead}], q0 = calls[{0, inf::WeightId::kQ}];
  BOOST_TEST(head == engine.steps());
  BOOST_TEST(q0 == engine.steps());
}
