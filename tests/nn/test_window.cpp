// tests/nn/test_window.cpp — the window policies on their own: masks, the key tiles the kernel
// visits (they must cover every allowed key), compile-time size sets, and the selectors
// (the heuristic one on real text).
#define BOOST_TEST_MODULE test_window
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "tessera/nn/attention.hpp"
#include "tessera/nn/window.hpp"

namespace nn = tessera::nn;
using tessera::Seed;
using tessera::Tensor;

namespace {

// Every allowed (i, j) must lie in a tile the kernel visits for i's query block; causal
// policies must never allow j > i.
template <class W>
void check_tiles_cover_mask(int64_t seq, int64_t block, int64_t window) {
  const int64_t nqb = (seq + block - 1) / block;
  for (int64_t qb = 0; qb < nqb; ++qb) {
    const int64_t q0 = qb * block, q1 = std::min(seq, q0 + block);
    const auto tiles = nn::attention_detail::tiles_for<W>(q0, q1, seq, window, block);
    for (int64_t i = q0; i < q1; ++i)
      for (int64_t j = 0; j < seq; ++j) {
        if (!W::allowed(i, j, seq, window)) continue;
        BOOST_TEST_REQUIRE(tiles.contains(j / block),
                           W::kName << " seq " << seq << " block " << block << ": key " << j
                                    << " of query " << i << " is in an unvisited tile");
        if constexpr (W::kCausal) BOOST_TEST_REQUIRE(j <= i);
      }
  }
}

template <class W>
void cover_many(int64_t window = 0) {
  for (int64_t seq : {1, 5, 13, 64, 100})
    for (int64_t block : {1, 4, 7, 16}) check_tiles_cover_mask<W>(seq, block, window);
}

}  // namespace

BOOST_AUTO_TEST_CASE(tiles_cover_every_allowed_key) {
  cover_many<nn::CausalFull>();
  cover_many<nn::Bidirectional>();
  cover_many<nn::SlidingWindow<1>>();
  cover_many<nn::SlidingWindow<5>>();
  cover_many<nn::SlidingWindow<37>>();
  cover_many<nn::LocalGlobal<5, 3>>();
  cover_many<nn::LocalGlobal<5, 3, false>>();
  using V = nn::VariableWindow<nn::Sizes<3, 8, nn::kFull>, nn::HeuristicSelector, 4>;
  for (int w : V::kSizes) cover_many<V>(w);
}

BOOST_AUTO_TEST_CASE(sliding_window_reads_the_w_most_recent_keys) {
  using W = nn::SlidingWindow<5>;
  for (int64_t i = 0; i < 20; ++i) {
    int64_t n = 0, first = -1;
    for (int64_t j = 0; j < 20; ++j)
      if (W::allowed(i, j, 20, 0)) {
        ++n;
        if (first < 0) first = j;
      }
    BOOST_TEST(n == std::min<int64_t>(i + 1, 5));
    BOOST_TEST(first == std::max<int64_t>(0, i - 4));
  }
}

BOOST_AUTO_TEST_CASE(local_global_semantics) {
  using C = nn::LocalGlobal<3, 2>;         // causal
  using E = nn::LocalGlobal<3, 2, false>;  // encoder (Longformer proper)
  // Global keys 0 and 1 are read by every later query; the band reads the 3 most recent.
  BOOST_TEST(C::allowed(10, 0, 16, 0));
  BOOST_TEST(C::allowed(10, 1, 16, 0));
  BOOST_TEST(!C::allowed(10, 2, 16, 0));
  BOOST_TEST(C::allowed(10, 8, 16, 0));
  BOOST_TEST(!C::allowed(10, 7, 16, 0));
  BOOST_TEST(!C::allowed(1, 5, 16, 0));  // causal: a global query still does not read the future
  // Encoder: global queries read every key, global keys are read by every query.
  BOOST_TEST(E::allowed(0, 15, 16, 0));
  BOOST_TEST(E::allowed(15, 1, 16, 0));
  BOOST_TEST(E::allowed(8, 10, 16, 0));
  BOOST_TEST(!E::allowed(8, 11, 16, 0));
  BOOST_TEST(!E::allowed(8, 5, 16, 0));
}

BOOST_AUTO_TEST_CASE(size_sets_are_checked_at_compile_time) {
  static_assert(nn::Sizes<128, 512, 2048, nn::kFull>::ascending());
  static_assert(!nn::Sizes<512, 128>::ascending());
  static_assert(!nn::Sizes<0, 128>::positive());
  static_assert(nn::WindowPolicy<nn::CausalFull>);
  static_assert(nn::WindowPolicy<nn::LocalGlobal<4, 1>>);
  static_assert(nn::WindowPolicy<nn::VariableWindow<nn::Sizes<4, nn::kFull>, nn::LearnedSelector>>);
  static_assert(nn::VariableWindow<nn::Sizes<4, nn::kFull>, nn::ForcedSelector<1>, 8>::kBlockSize == 8);
  BOOST_TEST(true);
}

BOOST_AUTO_TEST_CASE(window_cost_is_the_fraction_of_causal_work) {
  BOOST_TEST(nn::window_detail::window_cost(nn::kFull, 100) == 1.0);
  BOOST_TEST(nn::window_detail::window_cost(100, 100) == 1.0);
  // w = 1: every row reads one key out of (i + 1): seq / (seq (seq + 1) / 2).
  BOOST_TEST(nn::window_detail::window_cost(1, 9) == 9.0 / 45.0, boost::test_tools::tolerance(1e-12));
  BOOST_TEST(nn::window_detail::window_cost(10, 1000) < nn::window_detail::window_cost(100, 1000));
}

namespace {

std::string read_head(const std::string& path, size_t n) {
  std::ifstream f(path, std::ios::binary);
  BOOST_TEST_REQUIRE(f.good(), "cannot open " << path << " (Debian package fortunes)");
  std::string s(n, '\0');
  f.read(s.data(), static_cast<std::streamsize>(n));
  s.resize(static_cast<size_t>(f.gcount()));
  return s;
}

// Byte embedding: a fixed random table (256, C), N(0, 1), seeded; x (1, T, C).
Tensor<double> embed_bytes(const std::string& text, int64_t C, uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<double> table(static_cast<size_t>(256 * C));
  for (double& v : table) v = normal(gen);
  const int64_t T = static_cast<int64_t>(text.size());
  auto x = Tensor<double>::empty({1, T, C});
  for (int64_t t = 0; t < T; ++t) {
    const auto byte = static_cast<unsigned char>(text[static_cast<size_t>(t)]);
    std::copy_n(table.data() + byte * C, C, x.data() + t * C);
  }
  return x;
}

}  // namespace

// The heuristic's signal is close to the Gini–Simpson diversity of the block's bytes: ASCII art
// (runs of spaces, slashes, underscores) repeats few symbols and gets short windows; prose
// uses many different letters and gets long ones.
BOOST_AUTO_TEST_CASE(heuristic_selector_picks_different_windows_on_different_real_texts) {
  constexpr int64_t C = 64, kBlock = 64, kBytes = 4096;
  const uint64_t seed = 20261129;
  std::printf("heuristic selector: byte-embedding seed %llu\n",
              static_cast<unsigned long long>(seed));
  const std::string art = read_head("/usr/share/games/fortunes/ascii-art", kBytes);
  const std::string prose = read_head("/usr/share/games/fortunes/fortunes", kBytes);
  BOOST_TEST_REQUIRE(art.size() == static_cast<size_t>(kBytes));
  BOOST_TEST_REQUIRE(prose.size() == static_cast<size_t>(kBytes));
  const std::array<int, 4> sizes{64, 256, 1024, nn::kFull};
  nn::HeuristicSelector::State<double> sel(C, 4, Seed{1}, 0);
  auto run = [&](const std::string& text, const char* name) {
    const Tensor<double> x = embed_bytes(text, C, seed);
    nn::WindowChoice ch;
    sel.choose(x.data(), 1, kBytes, C, kBlock, sizes, ch);
    const double mean_idx =
        std::accumulate(ch.index.begin(), ch.index.end(), 0.0) / static_cast<double>(ch.index.size());
    const double mean_sig = std::accumulate(ch.signal.begin(), ch.signal.end(), 0.0) /
                            static_cast<double>(ch.signal.size());
    std::vector<int> hist(4, 0);
    for (int i : ch.index) ++hist[i];
    std::printf("  %-10s mean signal %.3f, mean size index %.2f, blocks per size [%d %d %d %d]\n",
                name, mean_sig, mean_idx, hist[0], hist[1], hist[2], hist[3]);
    return std::pair{ch.index, mean_idx};
  };
  const auto [art_idx, art_mean] = run(art, "ascii-art");
  const auto [prose_idx, prose_mean] = run(prose, "fortunes");
  BOOST_TEST(art_idx != prose_idx);
  BOOST_TEST(art_mean + 0.25 < prose_mean);  // art reads clearly shorter windows
}

BOOST_AUTO_TEST_CASE(heuristic_signal_extremes) {
  // One repeated vector: dispersion 0. Orthogonal one-hot rows: 1 - 1/rows.
  constexpr int64_t C = 8;
  std::vector<double> same(4 * C, 0.5), onehot(4 * C, 0.0);
  for (int t = 0; t < 4; ++t) onehot[t * C + t] = 1.0;
  using S = nn::HeuristicSelector::State<double>;
  BOOST_TEST(S::dispersion(same.data(), 4, C) == 0.0, boost::test_tools::tolerance(1e-12));
  BOOST_TEST(S::dispersion(onehot.data(), 4, C) == 0.75, boost::test_tools::tolerance(1e-12));
}

BOOST_AUTO_TEST_CASE(learned_selector_takes_the_argmax_and_reports_its_penalty) {
  constexpr int64_t B = 2, T = 13, C = 6, blk = 4;
  nn::LearnedSelector::State<double> sel(C, 3, Seed{7}, 0);
  std::mt19937_64 gen(3);
  std::normal_distribution<double> normal;
  std::vector<double> x(B * T * C);
  for (double& v : x) v = normal(gen);
  const std::array<int, 3> sizes{2, 5, nn::kFull};
  nn::WindowChoice ch;
  sel.choose(x.data(), B, T, C, blk, sizes, ch);
  BOOST_TEST(ch.blocks == 4);
  double penalty = 0.0;
  for (int64_t g = 0; g < B * ch.blocks; ++g) {
    const double* p = ch.prob.data() + g * 3;
    BOOST_TEST(p[0] + p[1] + p[2] == 1.0, boost::test_tools::tolerance(1e-12));
    BOOST_TEST(ch.index[g] == std::max_element(p, p + 3) - p);
    penalty += ch.cost[ch.index[g]];
  }
  BOOST_TEST(ch.aux_loss == sel.penalty * penalty / (B * ch.blocks), boost::test_tools::tolerance(1e-12));
}
