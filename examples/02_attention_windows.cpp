// 02 — Attention windows: which keys each query reads, and what that saves
//
// What you will learn:
//   * a window policy is a type (CausalFull, SlidingWindow<W>, LocalGlobal<W, G>,
//     VariableWindow<...>): swapping it changes which keys a query may read;
//   * attention works on blocks of queries and tiles of keys; a tile that no query of the
//     block may read is skipped, so a window saves real work, not just masked-out scores;
//   * VariableWindow lets each query block pick its window from a set of sizes, here with the
//     parameter-free heuristic: a block of repetitive text (ASCII art) gets a short window,
//     a block of varied prose a long one.
// The program checks every claim it prints and exits non-zero if one is false.
#include <tessera/tessera.hpp>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <random>
#include <string>
#include <vector>

namespace ts = tessera;
namespace nn = tessera::nn;

static int failures = 0;
static void check(bool ok, const char* claim) {
  std::printf("  [%s] %s\n", ok ? "ok" : "FAILED", claim);
  failures += ok ? 0 : 1;
}

constexpr int64_t kBlock = 64;  // queries per block = keys per tile

// Does query block [q0, q1) read key tile [k0, k1)? The policy's key_span() is a union of two
// intervals, [0, global_end) and [lo, hi); a tile is read when it meets either.
template <class Window>
bool reads_tile(int64_t q0, int64_t q1, int64_t k0, int64_t k1, int64_t seq) {
  const nn::KeySpan s = Window::key_span(q0, q1, seq, /*window=*/0);
  return k0 < s.global_end || (k0 < s.hi && s.lo < k1);
}

// Draws the block map (X = tile read, . = skipped) and returns tiles read / full causal tiles.
template <class Window>
double draw_map(const char* name, int64_t seq) {
  const int64_t blocks = seq / kBlock;
  int64_t read = 0, causal = 0;
  std::printf("%s (rows: query blocks, columns: key tiles of %lld tokens)\n", name,
              static_cast<long long>(kBlock));
  for (int64_t qb = 0; qb < blocks; ++qb) {
    std::printf("    ");
    for (int64_t kt = 0; kt < blocks; ++kt) {
      const bool r = reads_tile<Window>(qb * kBlock, (qb + 1) * kBlock, kt * kBlock,
                                        (kt + 1) * kBlock, seq);
      read += r;
      std::putchar(r ? 'X' : '.');
    }
    causal += qb + 1;
    std::putchar('\n');
  }
  return static_cast<double>(read) / static_cast<double>(causal);
}

// Runs the real attention layer on x and returns the work it reports.
template <class Window>
nn::AttentionStats attend(const ts::Tensor<float>& x) {
  nn::Attention<float, Window> attention(/*d_model=*/x.dim(2), /*heads=*/4, /*kv_heads=*/2,
                                         ts::Seed{7}, /*subsequence=*/0, {.block = kBlock});
  typename nn::Attention<float, Window>::Saved saved;
  (void)attention.forward(x.view(), saved);
  return saved.stats;
}

// Text as a (1, T, C) batch: each byte looks up a fixed random vector (a stand-in for a
// trained embedding: what matters to the heuristic is that different bytes differ).
ts::Tensor<float> embed_bytes(const std::string& text, int64_t C) {
  std::mt19937 gen(2026);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> table(static_cast<size_t>(256 * C));
  for (float& v : table) v = normal(gen);
  const auto T = static_cast<int64_t>(text.size());
  auto x = ts::Tensor<float>::empty({1, T, C});
  for (int64_t t = 0; t < T; ++t) {
    const auto byte = static_cast<unsigned char>(text[static_cast<size_t>(t)]);
    std::copy_n(table.data() + byte * C, C, x.data() + t * C);
  }
  return x;
}

std::string read_head(const char* path, size_t n) {
  std::ifstream f(path, std::ios::binary);
  std::string s(n, '\0');
  f.read(s.data(), static_cast<std::streamsize>(n));
  s.resize(static_cast<size_t>(f.gcount()));
  return s;
}

int main() {
  std::puts("Part 1: the tiles each policy reads, for a 1024-token sequence.");
  constexpr int64_t kSeq = 1024;
  const double full = draw_map<nn::CausalFull>("CausalFull", kSeq);
  const double sliding = draw_map<nn::SlidingWindow<128>>("SlidingWindow<128>", kSeq);
  const double local_global = draw_map<nn::LocalGlobal<128, 16>>("LocalGlobal<128, 16>", kSeq);
  std::printf("  work as a fraction of full causal: %.3f, %.3f, %.3f\n", full, sliding,
              local_global);
  // A 128-token window reaches back into 3 tiles of 64: the block's own, the one before, and
  // one more for the queries at the block's start (block 0 has 1 tile, block 1 has 2). Full
  // causal reads 1 + 2 + ... + blocks tiles.
  const double blocks = kSeq / kBlock;
  const double expected = (1 + 2 + 3 * (blocks - 2)) / (blocks * (blocks + 1) / 2);
  check(sliding == expected, "SlidingWindow<128> reads (1 + 2 + 3 (blocks - 2)) causal tiles");
  check(local_global > sliding, "LocalGlobal adds the tile holding the global tokens");

  std::puts("\nThe attention layer does exactly that work (it counts the tiles it visits):");
  const ts::Tensor<float> x = embed_bytes(std::string(kSeq, 'a'), 32);
  const double measured_sliding = attend<nn::SlidingWindow<128>>(x).work_fraction();
  const double measured_full = attend<nn::CausalFull>(x).work_fraction();
  std::printf("  measured work fraction: CausalFull %.3f, SlidingWindow<128> %.3f\n",
              measured_full, measured_sliding);
  check(measured_full == 1.0, "CausalFull visits every causal tile");
  check(std::abs(measured_sliding - sliding) < 1e-12, "the layer visits the tiles in the map");

  std::puts("\nPart 2: VariableWindow picks a window per block from the text itself.");
  using Adaptive =
      nn::VariableWindow<nn::Sizes<64, 256, 1024, nn::kFull>, nn::HeuristicSelector, kBlock>;
  const std::string art = read_head("/usr/share/games/fortunes/ascii-art", 4096);
  const std::string prose = read_head("/usr/share/games/fortunes/fortunes", 4096);
  if (art.size() < 4096 || prose.size() < 4096) {
    std::puts("  (the Debian package `fortunes` is not installed: part 2 skipped)");
  } else {
    double mean_size[2] = {0, 0};
    const char* names[2] = {"ascii-art", "fortunes"};
    const std::string* texts[2] = {&art, &prose};
    for (int i = 0; i < 2; ++i) {
      const nn::AttentionStats st = attend<Adaptive>(embed_bytes(*texts[i], 32));
      const auto& h = st.window_histogram;  // query blocks per window size
      const int64_t blocks = h[0] + h[1] + h[2] + h[3];
      mean_size[i] = static_cast<double>(h[1] + 2 * h[2] + 3 * h[3]) / static_cast<double>(blocks);
      std::printf("  %-9s blocks per window {64, 256, 1024, full}: [%lld %lld %lld %lld], "
                  "work %.3f of full\n",
                  names[i], static_cast<long long>(h[0]), static_cast<long long>(h[1]),
                  static_cast<long long>(h[2]), static_cast<long long>(h[3]), st.work_fraction());
    }
    check(mean_size[0] < mean_size[1],
          "repetitive ASCII art gets shorter windows than varied prose");
  }

  std::printf("%s\n", failures ? "SOME CHECKS FAILED" : "all checks passed");
  return failures ? 1 : 0;
}
