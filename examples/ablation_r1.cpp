// ablation_r1 — one binary, many models: the attention window and the expert layout are types,
// so an ablation grid is a list of types compiled side by side and trained on the same tokens.
//
// What you will learn:
//   * a variant is one line (`struct V : Base { using Window = ...; }`), and the grid is a
//     compile-time list of them; nothing is dispatched at run time inside the model;
//   * what each choice costs and buys on real text: validation perplexity after the same number
//     of steps on the same batches, training tokens/s, the fraction of full causal attention work
//     the window did, and the fraction of parameters a token used.
//
// Grid: {CausalFull, SlidingWindow<64>, VariableWindow<Sizes<32, 64, kFull>, LearnedSelector>} x
// {dense SwiGLU FFN, MoE 8 experts top-2 (softmax router, aux loss), hierarchical MoE 16 experts in
// 4 groups (best 2 groups, then top 2 experts; bias balance; 1 shared)}, all FP32; and the
// VariableWindow + hierarchical model again in BF16Mixed and in FP8Tile (DeepSeek-V3's FP8
// products: E4M3 operands, 1x128 / 128x128 scales, fp32 accumulation).
// Tokens are the UTF-8 bytes of the Tang poems, Song ci, English fortunes and the Bible (first
// --bytes of each); the last 5% of the windows validate. Same seed, same batch order for all.
//
// Usage: ablation_r1 [--steps N] [--bytes N]        (docs/training.md records a run)
//
// Built from three translation units (the same file with TESSERA_ABLATION_PART 0, 1, 2, one
// per window policy) so the 11 model instantiations compile in parallel.
#include <tessera/tessera.hpp>
#include <tessera/data/clean/normalize.hpp>

#include <omp.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace ts = tessera;
namespace tr = tessera::train;
namespace fs = std::filesystem;

namespace ablation {

struct Setup {
  fs::path shard;
  long steps = 120;
  // 256 tokens: long enough that a 64-token window skips key tiles (tiles are 64 wide).
  std::int64_t seq = 256, batch = 4;
};

struct Row {
  std::string window, ffn, precision;
  double val_ppl = 0, tokens_per_s = 0, attention_work = 0, active = 0;
  long long params = 0;
};

struct Base {
  static constexpr int vocab = 256, d_model = 64, layers = 3;
  static constexpr int heads = 4, kv_heads = 2, max_seq = 256, dense_layers = 1;
};
using Full = ts::CausalFull;
using Sliding = ts::SlidingWindow<64>;
using Variable = ts::VariableWindow<ts::Sizes<32, 64, ts::kFull>, ts::LearnedSelector, 32>;
using Dense = ts::DenseFfn;
using FlatMoE = ts::MoE<ts::Experts<8>, ts::TopK<2>, ts::TopKSoftmax, ts::AuxLossBalance>;
using HierMoE = ts::MoE<ts::Experts<16>, ts::TopK<2>, ts::GroupLimited<4, 2>, ts::BiasBalance,
                        ts::SharedExperts<1>>;

template <class W, class F>
struct Variant : Base {
  using Window = W;
  using Ffn = F;
};

template <class W, class F, class Recipe>
Row run(const Setup& s, const char* wname, const char* fname) {
  using Model = ts::Decoder<tr::WithRecipe<Variant<W, F>, Recipe>>;
  using T = typename Model::value_type;
  Model model{ts::Seed{1}};
  const tr::TokenDataset data({s.shard});
  const auto split = tr::split_windows(data.windows(s.seq), 0.05);
  tr::BatchLoader loader(data, s.seq, s.batch, ts::Seed{2}, split.train);
  tr::AdamWOptions ao;
  ao.beta2 = 0.95;
  ao.weight_decay = 0.1;
  tr::AdamW<T> opt(ao);
  tr::Trainer<Model, Recipe, tr::AdamW<T>> trainer(
      model, opt, loader, tr::WarmupCosine(3e-3, std::max(1L, s.steps / 10), s.steps, 3e-4));
  Row r{wname, fname, std::string(Recipe::kName)};
  r.params = model.parameter_count();
  std::int64_t tokens = 0;
  int counted = 0;
  const auto t0 = std::chrono::steady_clock::now();
  for (long k = 0; k < s.steps; ++k) {
    tokens += trainer.step().tokens;
    if (k >= s.steps - 10) {  // the window and routing statistics of the last 10 steps
      const auto& st = trainer.last_saved().stats;
      r.attention_work += st.attention_work_fraction;
      r.active += st.active_parameter_fraction;
      ++counted;
    }
  }
  r.tokens_per_s = static_cast<double>(tokens) /
                   std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  r.attention_work /= counted;
  r.active /= counted;
  auto val = tr::BatchLoader::sequential(data, s.seq, s.batch, split.validation);
  r.val_ppl = std::exp(trainer.evaluate(val, static_cast<std::int64_t>(split.validation.size() / s.batch)));
  std::printf("  %-9s %-13s %-11s val ppl %6.2f  %7.0f tok/s\n", wname, fname, r.precision.c_str(),
              r.val_ppl, r.tokens_per_s);
  std::fflush(stdout);
  return r;
}

void part0(const Setup& s, std::vector<Row>& rows);
void part1(const Setup& s, std::vector<Row>& rows);
void part2(const Setup& s, std::vector<Row>& rows);

}  // namespace ablation

#if defined(TESSERA_ABLATION_PART) && TESSERA_ABLATION_PART == 0
void ablation::part0(const Setup& s, std::vector<Row>& rows) {
  rows.push_back(run<Full, Dense, tr::FP32>(s, "full", "dense"));
  rows.push_back(run<Full, FlatMoE, tr::FP32>(s, "full", "moe-8-top2"));
  rows.push_back(run<Full, HierMoE, tr::FP32>(s, "full", "hier-4x4"));
}
#elif defined(TESSERA_ABLATION_PART) && TESSERA_ABLATION_PART == 1
void ablation::part1(const Setup& s, std::vector<Row>& rows) {
  rows.push_back(run<Sliding, Dense, tr::FP32>(s, "sliding64", "dense"));
  rows.push_back(run<Sliding, FlatMoE, tr::FP32>(s, "sliding64", "moe-8-top2"));
  rows.push_back(run<Sliding, HierMoE, tr::FP32>(s, "sliding64", "hier-4x4"));
}
#elif defined(TESSERA_ABLATION_PART) && TESSERA_ABLATION_PART == 2
void ablation::part2(const Setup& s, std::vector<Row>& rows) {
  rows.push_back(run<Variable, Dense, tr::FP32>(s, "variable", "dense"));
  rows.push_back(run<Variable, FlatMoE, tr::FP32>(s, "variable", "moe-8-top2"));
  rows.push_back(run<Variable, HierMoE, tr::FP32>(s, "variable", "hier-4x4"));
  rows.push_back(run<Variable, HierMoE, tr::BF16Mixed>(s, "variable", "hier-4x4"));
  rows.push_back(run<Variable, HierMoE, tr::FP8Tile>(s, "variable", "hier-4x4"));
}
#else  // main (no TESSERA_ABLATION_PART)

namespace {

std::string read_records(const fs::path& p, std::size_t cap) {
  std::ifstream in(p, std::ios::binary);
  std::string text, line;
  while (text.size() < cap && std::getline(in, line))
    if (line != "%") text.append(line).push_back('\n');
  ts::data::clean::strip_ansi_escapes(text);
  return text.substr(0, std::min(cap, text.size()));
}

std::string read_bible(std::size_t cap) {
  std::string text;
  FILE* p = ::popen("bible -l10000 'Gen1:1-Rev22:21' 2>/dev/null", "r");
  if (!p) return text;
  char buf[1 << 14];
  while (text.size() < cap && std::fgets(buf, sizeof buf, p)) text += buf;
  ::pclose(p);
  return text.substr(0, std::min(cap, text.size()));
}

}  // namespace

int main(int argc, char** argv) {
  ablation::Setup s;
  std::size_t bytes = 250000;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--steps" && i + 1 < argc) s.steps = std::stol(argv[++i]);
    else if (a == "--bytes" && i + 1 < argc) bytes = std::stoull(argv[++i]);
    else {
      std::fprintf(stderr, "usage: %s [--steps N] [--bytes N]\n", argv[0]);
      return 2;
    }
  }
  // One thread unless the user chose (see train_r1: spinning OpenMP threads crawl on a busy
  // machine); results do not depend on the thread count.
  if (!std::getenv("OMP_NUM_THREADS") && !std::getenv("OMP_WAIT_POLICY")) omp_set_num_threads(1);
  try {
    const fs::path dir = fs::temp_directory_path() / ("tessera_ablation_" + std::to_string(::getpid()));
    fs::create_directories(dir);
    s.shard = dir / "text.tok";
    std::string text;
    for (const char* f : {"tang300", "song100", "fortunes"})
      text += read_records(fs::path("/usr/share/games/fortunes") / f, bytes);
    text += read_bible(bytes);
    TESSERA_CHECK(text.size() > 50000, "ablation_r1: only ", text.size(),
                  " bytes of text; install fortunes, fortunes-zh and bible-kjv");
    {
      tr::TokenShardWriter w(s.shard, 256);
      std::vector<std::int32_t> ids(text.begin(), text.end());
      for (auto& x : ids) x &= 0xff;
      w.append(ids);
      w.finish();
    }
    std::printf("ablation_r1: %zu bytes of real text (byte tokens), %ld steps of %lld x %lld tokens "
                "per variant, same batches for all\n\n",
                text.size(), s.steps, static_cast<long long>(s.batch), static_cast<long long>(s.seq));
    std::vector<ablation::Row> rows;
    ablation::part0(s, rows);
    ablation::part1(s, rows);
    ablation::part2(s, rows);
    fs::remove_all(dir);

    std::printf("\n| window | FFN | precision | parameters | validation perplexity | tokens/s | "
                "attention work | active parameters |\n| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |\n");
    for (const auto& r : rows) {
      std::printf("| %s | %s | %s | %lld | %.2f | %.0f | %.2f | %.2f |\n", r.window.c_str(), r.ffn.c_str(),
                  r.precision.c_str(), r.params, r.val_ppl, r.tokens_per_s, r.attention_work, r.active);
    }
    // Every variant must have learned something from bytes (uniform is 256).
    for (const auto& r : rows)
      if (!(r.val_ppl < 256.0)) {
        std::printf("CHECK FAILED: %s/%s/%s did not learn (perplexity %.1f)\n", r.window.c_str(),
                    r.ffn.c_str(), r.precision.c_str(), r.val_ppl);
        return 1;
      }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ablation_r1: %s\n", e.what());
    return 1;
  }
}
#endif
