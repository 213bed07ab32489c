// tests/infer/test_kv_window_memory.cpp — a windowed layer keeps only its window in the KV cache
// (kv_cache.hpp's drop_unreachable, batching.hpp's peak rule), on tiny random-weight decoders.
//
//   sliding_window          SlidingWindow<5>, blocks of 4 positions, a 60-token sequence (12
//                           windows) decoded token by token and in chunks of 1, 3, 7, 2, 5 from
//                           a 5-block pool (the sequence needs 15): every position's logits equal
//                           Decoder::forward's; at every step the pool's blocks in use, and the
//                           most in use during the step, equal the blocks that hold a position a
//                           later query can read (counted here from W, not from the policy);
//                           peak_blocks equals the largest of those
//   freed_position_throws   keys() / values() of a position whose block went back are errors
//   local_global            layer 0 LocalGlobal<4, 3>, layer 1 SlidingWindow<6>: the block of the
//                           3 global tokens stays, the band of the widest layer stays
//   variable_window         VariableWindow choosing 2 or 6 per query block of 4: the blocks of the
//                           widest size are kept, whatever the blocks chose
//   causal_full_keeps_all   a CausalFull layer between two sliding ones: nothing is given back
//   engine_admits_by_peak   4 requests of 43 positions each (11 blocks) on a 22-block pool: with
//                           sliding windows all 4 are admitted at step 0, with a CausalFull layer
//                           at most 2 run at once; each output equals generate() alone; the pool
//                           is empty at the end
//   decode_2048             blocks in use decoding 2048 tokens, SlidingWindow<256> vs CausalFull,
//                           16-position blocks (the figures in docs/inference.md)
#define BOOST_TEST_MODULE kv_window_memory
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <functional>
#include <iostream>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "cache_check.hpp"
#include "tessera/infer/batching.hpp"
#include "tessera/infer/generate.hpp"
#include "tessera/infer/kv_cache.hpp"

namespace ts = tessera;
namespace inf = tessera::infer;

namespace {

struct Tiny {
  static constexpr int vocab = 61, d_model = 32, layers = 2, heads = 4, kv_heads = 2;
  static constexpr int ffn_hidden = 32, max_seq = 2048, attention_block = 8;
  static constexpr bool tie_embeddings = true;
  static constexpr double rope_theta = 500.0, norm_eps = 1e-5;
};
constexpr int64_t kW = 5;
struct Sliding : Tiny {
  using Window = ts::nn::SlidingWindow<kW>;
};
// Layer 0 reads the 3 global tokens and a band of 4; layer 1 a band of 6.
struct GlobalMix : Tiny {
  template <int Layer>
  using WindowAt =
      std::conditional_t<Layer == 0, ts::nn::LocalGlobal<4, 3>, ts::nn::SlidingWindow<6>>;
};
struct FullAmongSliding : Tiny {
  static constexpr int layers = 3;
  template <int Layer>
  using WindowAt =
      std::conditional_t<Layer == 1, ts::nn::CausalFull, ts::nn::SlidingWindow<kW>>;
};
// Query blocks of 4 choose a window of 2 or 6 (heuristic selector): a later block may take 6.
struct Variable : Tiny {
  using Window = ts::nn::VariableWindow<ts::nn::Sizes<2, 6>, ts::nn::HeuristicSelector, 4>;
};
struct Sliding256 : Tiny {
  using Window = ts::nn::SlidingWindow<256>;
};
struct Full : Tiny {};

template <class C>
ts::Decoder<C>& model() {
  static ts::Decoder<C> m{ts::Seed{7}};
  static const bool scaled = [] {
    // Larger weights than the default init, so attention is far from uniform and a key read
    // from the wrong block (or missing) shows in the logits.
    m.visit_parameters([](std::string_view, ts::nn::Parameter<float>& p) {
      for (int64_t i = 0; i < p.value.numel(); ++i) p.value.data()[i] *= 3.0f;
    });
    return true;
  }();
  (void)scaled;
  return m;
}

std::vector<int32_t> tokens(int64_t n, int salt) {
  std::vector<int32_t> v;
  for (int64_t i = 0; i < n; ++i) v.push_back(static_cast<int32_t>((i * 37 + salt * 11 + 5) % Tiny::vocab));
  return v;
}

// keep(p, L): whether a query at position L or later can read key p, written from the
// policies' definitions (not from their reachable_keys).
using Keep = std::function<bool(int64_t p, int64_t L)>;

// Blocks of bt positions that hold one of the positions p < end with keep(p, L).
int64_t blocks_touching(int64_t end, int64_t bt, int64_t L, const Keep& keep) {
  std::set<int64_t> b;
  for (int64_t p = 0; p < end; ++p)
    if (keep(p, L)) b.insert(p / bt);
  return static_cast<int64_t>(b.size());
}

// What peak_blocks must give: the most blocks held during any step, prefilling [0, prompt) in
// chunks of at most `chunk` starting anywhere, then one token at a time.
int64_t expected_peak(int64_t bt, int64_t prompt, int64_t positions, int64_t chunk,
                      const Keep& keep) {
  int64_t peak = 0;
  for (int64_t L = 0; L < positions; ++L) {
    const int64_t n = L < prompt ? std::min(chunk, prompt - L) : 1;
    peak = std::max(peak, blocks_touching(L + n, bt, L, keep));
  }
  return peak;
}

template <class C>
struct Decoded {
  std::shared_ptr<inf::KvBlockPool<float>> pool;
  inf::KvCache<float> cache;
  int64_t most_during = 0;  // the most blocks in use during a step
};

// Feeds `seq` through a cache of a `pool_blocks`-block pool in chunks cycling through `chunks`,
// checking every position's logits against one Decoder::forward and the pool's blocks at and
// during every step against `keep`.
template <class C>
Decoded<C> decode_checked(std::string_view name, const std::vector<int32_t>& seq,
                          const std::vector<int64_t>& chunks, int64_t bt, int64_t pool_blocks,
                          const Keep& keep) {
  auto& m = model<C>();
  const auto n = static_cast<int64_t>(seq.size());
  ts::Tensor<int32_t> ids(ts::Shape{1, n});
  std::copy(seq.begin(), seq.end(), ids.data());
  typename ts::Decoder<C>::Saved saved;
  const auto full = m.forward(ids, saved);  // (1, n, V)
  const int64_t V = full.dim(2);
  Decoded<C> d;
  d.pool = inf::make_pool(m, pool_blocks * bt, bt);
  BOOST_REQUIRE(d.pool->max_blocks() == pool_blocks);
  d.cache = inf::make_cache(m, d.pool);
  double worst = 0, scale = 0;
  int64_t pos = 0, bad_counts = 0, argmax_differs = 0;
  for (std::size_t step = 0; pos < n; ++step) {
    const int64_t chunk = std::min(chunks[step % chunks.size()], n - pos);
    d.pool->reset_high_water();
    const int64_t during = blocks_touching(pos + chunk, bt, pos, keep);
    const auto logits = inf::forward_cached(
        m, std::span<const int32_t>(seq.data() + pos, static_cast<std::size_t>(chunk)), d.cache,
        true);  // (chunk, V)
    BOOST_REQUIRE_EQUAL(logits.dim(0), chunk);
    argmax_differs +=
        ts::test::compare_logit_rows(logits.data(), full.data(), pos, chunk, V, worst, scale);
    pos += chunk;
    const int64_t after = blocks_touching(pos, bt, pos, keep);
    if (d.pool->high_water() != during || d.pool->blocks_in_use() != after ||
        d.cache.blocks_held() != after) {
      if (bad_counts++ < 5)
        BOOST_ERROR("after position " << pos << ": " << d.pool->blocks_in_use()
                                      << " blocks in use (expected " << after << "), "
                                      << d.pool->high_water() << " during the step (expected "
                                      << during << ")");
    }
    d.most_during = std::max(d.most_during, d.pool->high_water());
  }
  BOOST_TEST(bad_counts == 0);
  std::cout << name << ", chunks of up to "
            << *std::max_element(chunks.begin(), chunks.end()) << ": max |diff| vs full forward "
            << worst << " (logits up to " << scale << "), at most " << d.most_during
            << " blocks in use of " << pool_blocks << " (the whole sequence: "
            << d.pool->blocks_for(n) << ")" << std::endl;
  BOOST_TEST(scale > 0.0);
  // Float rounding of the tiled full forward against the per-key cache path, amplified by the
  // scaled weights (test_kv_cache_windows sees the same); a key missing or read from the wrong
  // block moves the logits by O(0.1).
  BOOST_TEST(worst <= 5e-5 * scale);
  BOOST_TEST(argmax_differs == 0);
  return d;
}

const Keep keep_sliding = [](int64_t p, int64_t L) { return p > L - kW; };

}  // namespace

BOOST_AUTO_TEST_CASE(sliding_window) {
  const std::vector<int32_t> seq = tokens(60, 1);
  constexpr int64_t bt = 4;
  // A query at L reads L - 4 .. L: with blocks of 4, never more than 2 blocks at once.
  const Decoded<Sliding> one = decode_checked<Sliding>("SlidingWindow<5>", seq, {1}, bt, 5, keep_sliding);
  BOOST_TEST(one.most_during == 2);
  BOOST_TEST(inf::peak_blocks(model<Sliding>(), bt, 60, 60, 1) == one.most_during);
  const Decoded<Sliding> chunked = decode_checked<Sliding>("SlidingWindow<5>", seq, {1, 3, 7, 2, 5}, bt, 5,
                                                           keep_sliding);
  const int64_t peak7 = inf::peak_blocks(model<Sliding>(), bt, 60, 60, 7);
  BOOST_TEST(peak7 == expected_peak(bt, 60, 60, 7, keep_sliding));
  BOOST_TEST(chunked.most_during <= peak7);
  BOOST_TEST(peak7 == 4);  // 4 keys back + 7 new: 11 positions over at most 4 blocks
  // A prompt then decoding: the chunk bound applies to the prompt only.
  BOOST_TEST(inf::peak_blocks(model<Sliding>(), bt, 9, 50, 16) ==
             expected_peak(bt, 9, 50, 16, keep_sliding));
}

BOOST_AUTO_TEST_CASE(freed_position_throws) {
  const std::vector<int32_t> seq = tokens(30, 2);
  Decoded<Sliding> d = decode_checked<Sliding>("SlidingWindow<5>", seq, {1}, 4, 5, keep_sliding);
  BOOST_TEST(!d.cache.holds(0));
  BOOST_TEST(d.cache.holds(29 - kW + 1));
  BOOST_TEST(d.cache.keys(1, 29) != nullptr);
  const auto given_back = [](const ts::Error& e) {
    std::cout << "freed position: " << e.what() << std::endl;
    return std::string(e.what()).find("given back") != std::string::npos;
  };
  BOOST_CHECK_EXCEPTION(d.cache.keys(0, 0), ts::Error, given_back);
  BOOST_CHECK_EXCEPTION(d.cache.values(1, 19), ts::Error, given_back);
  BOOST_CHECK_THROW(d.cache.keys(0, 40), ts::Error);  // never reserved
  // The table keeps its position -> block mapping: clearing gives back only what is held.
  d.cache.clear();
  BOOST_TEST(d.pool->blocks_in_use() == 0);
}

BOOST_AUTO_TEST_CASE(local_global) {
  const std::vector<int32_t> seq = tokens(60, 3);
  constexpr int64_t bt = 4;
  // Layer 0: p < 3 or within 4 back; layer 1: within 6 back. A block is kept for either.
  const Keep keep = [](int64_t p, int64_t L) { return p < 3 || p > L - 6; };
  for (const std::vector<int64_t>& chunks :
       {std::vector<int64_t>{1}, std::vector<int64_t>{1, 3, 7, 2, 5}}) {
    const Decoded<GlobalMix> d = decode_checked<GlobalMix>("LocalGlobal<4, 3> + SlidingWindow<6>", seq, chunks, bt, 6, keep);
    BOOST_TEST(d.cache.holds(0));  // the global tokens' block
    BOOST_TEST(d.cache.holds(2));
    BOOST_TEST(!d.cache.holds(4));  // the blocks between went back
    BOOST_TEST(!d.cache.holds(50));
    BOOST_TEST(d.cache.holds(60 - 5));
    BOOST_TEST(d.pool->blocks_in_use() == 3);  // block 0, blocks 13 (55) and 14 (56 .. 59)
  }
  BOOST_TEST(inf::peak_blocks(model<GlobalMix>(), bt, 60, 60, 7) ==
             expected_peak(bt, 60, 60, 7, keep));
}

BOOST_AUTO_TEST_CASE(variable_window) {
  // Runs of one token between varied ones, so the selector picks both sizes.
  std::vector<int32_t> seq;
  for (int i = 0; i < 60; ++i) seq.push_back((i / 8) % 2 == 0 ? 7 : (i * 37 + 3) % Tiny::vocab);
  constexpr int64_t bt = 4;
  // Kept by the widest size, whatever the blocks chose: a query at L or later may read L - 5.
  const Keep keep = [](int64_t p, int64_t L) { return p > L - 6; };
  for (const std::vector<int64_t>& chunks :
       {std::vector<int64_t>{1}, std::vector<int64_t>{1, 3, 7, 2, 5}}) {
    const Decoded<Variable> d =
        decode_checked<Variable>("VariableWindow<Sizes<2, 6>>", seq, chunks, bt, 5, keep);
    BOOST_TEST(!d.cache.holds(0));
  }
  // Both sizes were chosen (else this is a sliding-window test).
  ts::Tensor<int32_t> ids(ts::Shape{1, 60});
  std::copy(seq.begin(), seq.end(), ids.data());
  typename ts::Decoder<Variable>::Saved saved;
  model<Variable>().forward(ids, saved);
  std::vector<int64_t> hist(2, 0);
  for (const auto& layer : saved.stats.layers)
    for (std::size_t i = 0; i < layer.window_histogram.size(); ++i) hist[i] += layer.window_histogram[i];
  std::cout << "query blocks with window 2, 6: " << hist[0] << ", " << hist[1] << std::endl;
  BOOST_TEST(hist[0] > 0);
  BOOST_TEST(hist[1] > 0);
}

BOOST_AUTO_TEST_CASE(causal_full_keeps_all) {
  const std::vector<int32_t> seq = tokens(60, 4);
  constexpr int64_t bt = 4;
  const Keep all = [](int64_t, int64_t) { return true; };
  const Decoded<FullAmongSliding> d =
      decode_checked<FullAmongSliding>("SlidingWindow<5> + CausalFull + SlidingWindow<5>", seq, {1, 3, 7, 2, 5}, bt, 15, all);
  BOOST_TEST(d.pool->blocks_in_use() == 15);
  BOOST_TEST(d.cache.holds(0));
  BOOST_TEST(inf::peak_blocks(model<FullAmongSliding>(), bt, 10, 60, 16) == 15);
}

namespace {

inf::Request request(int i) {
  inf::Request r;
  r.prompt = tokens(4, 10 + i);
  r.max_new_tokens = 40;  // 43 positions fed: 11 blocks of 4
  if (i % 2 == 1) {
    r.sampling.temperature = 0.9f;
    r.sampling.top_p = 0.85f;
    r.sampling.seed = 100 + static_cast<uint64_t>(i);
  }
  return r;
}

template <class C>
std::vector<int32_t> alone(int i) {
  const inf::Request r = request(i);
  inf::GenerateOptions opt;
  opt.max_new_tokens = r.max_new_tokens;
  opt.sampling = r.sampling;
  return inf::generate(model<C>(), r.prompt, opt);
}

// The four requests through one engine on a 22-block pool (two whole lives); returns the most
// requests that ran at once.
template <class C>
int64_t run_engine(std::string_view name, int64_t expected_peak_each) {
  auto pool = inf::make_pool(model<C>(), 22 * 4, 4);
  BOOST_REQUIRE(pool->max_blocks() == 22);
  inf::Engine engine(model<C>(), pool, inf::EngineOptions{.max_step_tokens = 16});
  std::vector<int64_t> ids;
  for (int i = 0; i < 4; ++i) ids.push_back(engine.submit(request(i)));
  int64_t most = 0;
  while (!engine.idle()) {
    engine.step();
    most = std::max(most, engine.running());
    // The running requests hold no more than their peaks (the finished ones gave theirs back).
    BOOST_TEST(pool->blocks_in_use() <= engine.running() * expected_peak_each);
    BOOST_REQUIRE(engine.steps() < 500);
  }
  BOOST_TEST(pool->blocks_in_use() == 0);
  BOOST_TEST(pool->high_water() <= std::min<int64_t>(22, 4 * expected_peak_each));
  for (int i = 0; i < 4; ++i) {
    BOOST_TEST_CONTEXT(name << " request " << i) {
      BOOST_TEST(engine.output(ids[static_cast<std::size_t>(i)]) == alone<C>(i),
                 boost::test_tools::per_element());
      BOOST_TEST(engine.output(ids[static_cast<std::size_t>(i)]).size() == 40u);
    }
  }
  std::cout << name << " engine, 4 requests of 43 positions on 22 blocks: " << most
            << " at once, at most " << pool->high_water() << " blocks in use" << std::endl;
  return most;
}

}  // namespace

BOOST_AUTO_TEST_CASE(engine_admits_by_peak) {
  constexpr int64_t bt = 4;
  // Sliding windows: a step at L holds the blocks of [L - 4, L + n), n <= 4 in the prompt.
  const int64_t peak = inf::peak_blocks(model<Sliding>(), bt, 4, 43, 16);
  BOOST_TEST(peak == expected_peak(bt, 4, 43, 16, keep_sliding));
  BOOST_TEST(peak == 2);
  BOOST_TEST(run_engine<Sliding>("SlidingWindow<5>", peak) == 4);  // all admitted together
  // With a CausalFull layer a request still needs its whole life: two at a time, as before.
  BOOST_TEST(inf::peak_blocks(model<FullAmongSliding>(), bt, 4, 43, 16) == 11);
  BOOST_TEST(run_engine<FullAmongSliding>("with a CausalFull layer", 11) == 2);
}

// Blocks in use while decoding 2048 tokens one at a time (prompt of 1), blocks of 16 positions.
template <class C>
int64_t decode_long(int64_t window) {
  auto& m = model<C>();
  constexpr int64_t n = 2048, bt = 16;
  auto pool = inf::make_pool(m, n, bt);
  auto cache = inf::make_cache(m, pool);
  const std::vector<int32_t> seq = tokens(n, 5);
  int64_t bad = 0;
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t pos = 0; pos < n; ++pos) {
    inf::forward_cached(m, std::span<const int32_t>(seq.data() + pos, 1), cache);
    const int64_t L = pos + 1;
    const int64_t first = window > 0 ? std::max<int64_t>(0, L - window + 1) : 0;
    bad += pool->blocks_in_use() != (L + bt - 1) / bt - first / bt;
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  BOOST_TEST(bad == 0);
  BOOST_TEST(pool->high_water() == inf::peak_blocks(m, bt, 1, n, 1));
  std::cout << ts::Decoder<C>::Window::kName << (window > 0 ? "<" + std::to_string(window) + ">" : "")
            << ": 2048 tokens decoded, " << pool->blocks_in_use() << " blocks in use at the end, "
            << pool->high_water() << " at most (" << s << " s)" << std::endl;
  return pool->high_water();
}

BOOST_AUTO_TEST_CASE(decode_2048) {
  BOOST_TEST(decode_long<Sliding256>(256) == 17);  // 256 positions over at most 17 blocks
  BOOST_TEST(decode_long<Full>(0) == 128);
}
