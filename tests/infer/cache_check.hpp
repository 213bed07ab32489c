// tests/infer/cache_check.hpp — forward_cached fed in chunks against one Decoder::forward.
#pragma once

#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <iostream>
#include <span>
#include <vector>

#include "tessera/infer/generate.hpp"
#include "tessera/infer/kv_cache.hpp"

namespace tessera::test {

namespace ts = tessera;

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
    for (int64_t t = 0; t < chunk; ++t) {
      const float* a = logits.data() + t * V;
      const float* b = full.data() + (pos + t) * V;
      for (int64_t v = 0; v < V; ++v) {
        worst = std::max(worst, std::abs(static_cast<double>(a[v]) - b[v]));
        scale = std::max(scale, std::abs(static_cast<double>(b[v])));
      }
      BOOST_TEST(ts::infer::argmax(std::span(a, V)) == ts::infer::argmax(std::span(b, V)));
    }
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

}  // namespace tessera::test
