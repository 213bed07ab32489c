// tests/infer/cache_check.hpp — forward_cached fed in chunks against one Decoder::forward.
#pragma once

#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <iostream>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "tessera/infer/generate.hpp"
#include "tessera/infer/kv_cache.hpp"

namespace tessera::test {

namespace ts = tessera;

// Cached logits (chunk, V) against rows [pos, pos + chunk) of the full forward's (1, n, V):
// raises `worst` to the largest |difference| and `scale` to the largest |full logit| seen, and
// returns how many rows' arg max differ.
inline int64_t compare_logit_rows(const float* cached, const float* full, int64_t pos,
                                  int64_t chunk, int64_t V, double& worst, double& scale) {
  int64_t argmax_differs = 0;
  for (int64_t t = 0; t < chunk; ++t) {
    const float* a = cached + t * V;
    const float* b = full + (pos + t) * V;
    for (int64_t v = 0; v < V; ++v) {
      worst = std::max(worst, std::abs(static_cast<double>(a[v]) - b[v]));
      scale = std::max(scale, std::abs(static_cast<double>(b[v])));
    }
    argmax_differs += ts::infer::argmax(std::span(a, V)) != ts::infer::argmax(std::span(b, V));
  }
  return argmax_differs;
}

// forward_cached in chunks vs one Decoder::forward: every position's logits.
template <class Config>
void check_cache_against_full(ts::Decoder<Config>& model, const std::vector<int32_t>& seq,
                              double tol, int64_t block_tokens = ts::infer::kDefaultKvBlockTokens) {
  const auto n = static_cast<int64_t>(seq.size());
  ts::Tensor<int32_t> ids(ts::Shape{1, n});
  std::copy(seq.begin(), seq.end(), ids.data());
  typename ts::Decoder<Config>::Saved saved;
  const auto full = model.forward(ids, saved);  // (1, n, V)
  const int64_t V = full.dim(2);
  auto cache = ts::infer::make_cache(model, ts::infer::make_pool(model, 0, block_tokens));
  int64_t pos = 0;
  double worst = 0, scale = 0;
  for (int64_t chunk : {int64_t{1}, int64_t{3}, n - 4}) {
    const auto logits = ts::infer::forward_cached(
        model, std::span<const int32_t>(seq.data() + pos, static_cast<std::size_t>(chunk)), cache,
        true);  // (chunk, V)
    BOOST_REQUIRE_EQUAL(logits.dim(0), chunk);
    BOOST_TEST(compare_logit_rows(logits.data(), full.data(), pos, chunk, V, worst, scale) == 0);
    pos += chunk;
  }
  BOOST_TEST(cache.length == n);
  std::cout << "cache vs full forward: max |diff| " << worst << " (logits up to " << scale << ")"
            << std::endl;
  BOOST_TEST(scale > 0.0);
  BOOST_TEST(worst <= tol * scale);
  // The last token's logits alone equal the last row.
  auto c2 = ts::infer::make_cache(model);
  const auto last = ts::infer::forward_cached(model, seq, c2);
  BOOST_TEST(last.rank() == 1);
  double d = 0;
  for (int64_t v = 0; v < V; ++v)
    d = std::max(d, std::abs(static_cast<double>(last.data()[v]) - full.data()[(n - 1) * V + v]));
  BOOST_TEST(d <= tol * scale);
}

// While alive, every matrix product takes the plain-loop back end (TESSERA_CPU_PATH=scalar),
// which sums each output row in one order whatever the number of rows: a row computed among
// others must then equal the row alone bit for bit. (The default back ends choose their kernel
// and blocking by the number of rows; see kv_cache.hpp's "batch invariance".)
class ScalarProducts {
 public:
  ScalarProducts() {
    if (const char* v = std::getenv("TESSERA_CPU_PATH")) old_ = v;
    ::setenv("TESSERA_CPU_PATH", "scalar", 1);
  }
  ~ScalarProducts() {
    if (old_) {
      ::setenv("TESSERA_CPU_PATH", old_->c_str(), 1);
    } else {
      ::unsetenv("TESSERA_CPU_PATH");
    }
  }
  ScalarProducts(const ScalarProducts&) = delete;
  ScalarProducts& operator=(const ScalarProducts&) = delete;

 private:
  std::optional<std::string> old_;
};

// Several sequences fed together through forward_batch, in steps of different chunk sizes per
// sequence (so a step mixes one-token and many-token entries), against each fed alone through
// forward_cached in the same chunks: every position's logits. Only float rounding may differ
// (products over a different number of rows); a sequence whose routing or window choice read
// another sequence's rows would differ by far more. With `exact`, under ScalarProducts, nothing
// may differ at all.
template <class Config>
void check_batch_against_alone_once(ts::Decoder<Config>& model,
                                    const std::vector<std::vector<int32_t>>& seqs, double tol,
                                    bool exact) {
  const std::size_t S = seqs.size();
  const int64_t V = Config::vocab;
  auto pool = ts::infer::make_pool(model, static_cast<int64_t>(S) * Config::max_seq, 4);
  std::vector<ts::infer::KvCache<float>> batched, alone;
  for (std::size_t s = 0; s < S; ++s) {
    batched.push_back(ts::infer::make_cache(model, pool));
    alone.push_back(ts::infer::make_cache(model));
  }
  std::vector<int64_t> pos(S, 0);
  double worst = 0, scale = 0;
  for (int64_t round = 0;; ++round) {
    std::vector<ts::infer::BatchEntry<float>> entries;
    std::vector<std::size_t> who;
    for (std::size_t s = 0; s < S; ++s) {
      const auto n = static_cast<int64_t>(seqs[s].size());
      if (pos[s] >= n) continue;
      const int64_t chunk = std::min<int64_t>(n - pos[s], 1 + (round * 3 + static_cast<int64_t>(s) * 5) % 6);
      entries.push_back({batched[s], std::span<const int32_t>(seqs[s].data() + pos[s], chunk),
                         ts::infer::Logits::kAll});
      who.push_back(s);
    }
    if (entries.empty()) break;
    const auto out = ts::infer::forward_batch(model, entries);
    for (std::size_t i = 0; i < entries.size(); ++i) {
      const std::size_t s = who[i];
      const auto ref = ts::infer::forward_cached(model, entries[i].tokens, alone[s], true);
      BOOST_REQUIRE(out[i].shape() == ref.shape());
      for (int64_t v = 0; v < ref.numel(); ++v) {
        worst = std::max(worst, std::abs(static_cast<double>(out[i].data()[v]) - ref.data()[v]));
        scale = std::max(scale, std::abs(static_cast<double>(ref.data()[v])));
      }
      for (int64_t t = 0; t < ref.dim(0); ++t)
        BOOST_TEST(ts::infer::argmax(std::span(out[i].data() + t * V, V)) ==
                   ts::infer::argmax(std::span(ref.data() + t * V, V)));
      pos[s] += static_cast<int64_t>(entries[i].tokens.size());
    }
  }
  std::cout << "forward_batch of " << S << " sequences vs each alone"
            << (exact ? " (scalar products)" : "") << ": max |diff| " << worst << " (logits up to "
            << scale << ")" << std::endl;
  BOOST_TEST(scale > 0.0);
  if (exact) {
    BOOST_TEST(worst == 0.0);
  } else {
    BOOST_TEST(worst <= tol * scale);
  }
}

template <class Config>
void check_batch_against_alone(ts::Decoder<Config>& model,
                               const std::vector<std::vector<int32_t>>& seqs, double tol) {
  check_batch_against_alone_once(model, seqs, tol, false);
  ScalarProducts scalar;
  check_batch_against_alone_once(model, seqs, 0.0, true);
}

}  // namespace tessera::test
