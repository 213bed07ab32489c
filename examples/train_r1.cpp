// train_r1 — the flagship program: trains a small DeepSeek-R1-style model on real Chinese and
// English text, on the CPU, in a few minutes, and shows that it learned.
//
// What it does, and what you will see:
//   1. reads real text from Debian packages: Tang poems, Song ci and the `chinese` file of
//      fortunes-zh, the English `fortunes` files, and the King James Bible (`bible`); drops the
//      '%' record separators and the ANSI colour escapes some fortunes carry; every 20th
//      document (a fixed rule, no seed) is held out for validation;
//   2. trains a byte-level BPE vocabulary of 4096 tokens on the training documents only, with
//      tessera's tokenizer trainer, and writes both splits as token shards (uint16) to the run
//      directory;
//   3. trains an R1 decoder — variable-window attention (each 32-token query block picks a
//      window of 32, 64 or all earlier tokens through a learned gate), a first dense block, then
//      hierarchical mixture-of-experts blocks (8 routed experts in 4 groups, each token to its
//      best 2 groups then its top 2 experts, plus 1 shared expert, aux-loss-free bias balance) —
//      with AdamW, linear warm-up + cosine decay, gradient clipping and gradient accumulation,
//      printing a progress bar (step, loss, tokens/s, ETA) and the validation perplexity every
//      so often, and writing checkpoints (--resume continues bit for bit);
//   4. ends with samples (a Chinese poem start, English prompts; temperature + top-k) and the
//      final validation perplexity beside the unigram perplexity of the same tokens: a model
//      that did not learn to use context cannot beat the unigram.
//
// Usage: train_r1 [--steps N] [--window variable|sliding|full] [--experts hierarchical|flat]
//                 [--precision fp32|bf16-mixed|fp16-mixed|fp8-delayed|fp8-tile]
//                 [--batch B] [--micro-batches M] [--seq T] [--lr X] [--seed S]
//                 [--run-dir DIR] [--resume] [--eval-every K] [--checkpoint-every K]
//                 [--max-source-bytes N] [--no-samples]
// docs/training.md describes every flag and records the figures of the default run.
#include <tessera/tessera.hpp>
#include <tessera/data/clean/normalize.hpp>
#include <tessera/data/tokenizer_trainer.hpp>
#include <tessera/train/checkpoint.hpp>
#include <tessera/train/optimizer.hpp>
#include <tessera/train/precision.hpp>
#include <tessera/train/schedule.hpp>
#include <tessera/train/token_data.hpp>
#include <tessera/train/trainer.hpp>

#include "r1_config.hpp"

#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

namespace ts = tessera;
namespace tr = tessera::train;
namespace fs = std::filesystem;

// ---- the model, as types ------------------------------------------------------------------
// R1Small lives in r1_config.hpp (read it: eight lines), shared with the programs that read this
// program's checkpoints (quantize_model, benchmarks/quant_quality and train_bench).
using r1::kVocab;
using r1::R1Small;
// Ablation partners: one line each.
struct R1Sliding : R1Small { using Window = ts::SlidingWindow<64>; };
struct R1Full : R1Small { using Window = ts::CausalFull; };
struct R1Flat : R1Small {
  using Ffn = ts::MoE<ts::Experts<8>, ts::TopK<2>, ts::TopKSigmoid, ts::BiasBalance, ts::SharedExperts<1>>;
};

namespace {

struct Options {
  long steps = 300;
  std::string window = "variable", experts = "hierarchical", precision = "bf16-mixed";
  long batch = 8, micro_batches = 1, seq = 128;
  double lr = 3e-3;
  std::uint64_t seed = 42;
  std::string run_dir;
  bool resume = false;
  long eval_every = 0, checkpoint_every = 0;
  std::size_t max_source_bytes = 1'200'000;
  bool samples = true;
};

[[noreturn]] void usage(const char* argv0, const std::string& why) {
  std::fprintf(stderr,
               "%s\nusage: %s [--steps N] [--window variable|sliding|full] "
               "[--experts hierarchical|flat] [--precision %s] [--batch B] [--micro-batches M] "
               "[--seq T] [--lr X] [--seed S] [--run-dir DIR] [--resume] [--eval-every K] "
               "[--checkpoint-every K] [--max-source-bytes N] [--no-samples]\n",
               why.c_str(), argv0, std::string(tr::kRecipeNames).c_str());
  std::exit(2);
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto val = [&]() -> std::string {
      if (i + 1 >= argc) usage(argv[0], a + " needs a value");
      return argv[++i];
    };
    if (a == "--steps") o.steps = std::stol(val());
    else if (a == "--window") o.window = val();
    else if (a == "--experts") o.experts = val();
    else if (a == "--precision") o.precision = val();
    else if (a == "--batch") o.batch = std::stol(val());
    else if (a == "--micro-batches") o.micro_batches = std::stol(val());
    else if (a == "--seq") o.seq = std::stol(val());
    else if (a == "--lr") o.lr = std::stod(val());
    else if (a == "--seed") o.seed = std::stoull(val());
    else if (a == "--run-dir") o.run_dir = val();
    else if (a == "--resume") o.resume = true;
    else if (a == "--eval-every") o.eval_every = std::stol(val());
    else if (a == "--checkpoint-every") o.checkpoint_every = std::stol(val());
    else if (a == "--max-source-bytes") o.max_source_bytes = std::stoull(val());
    else if (a == "--no-samples") o.samples = false;
    else usage(argv[0], "unknown argument " + a);
  }
  if (o.steps < 1 || o.batch < 1 || o.micro_batches < 1 || o.seq < 8 || o.seq > 512)
    usage(argv[0], "need steps >= 1, batch >= 1, micro-batches >= 1, 8 <= seq <= 512");
  try {
    tr::check_recipe_name(o.precision);
  } catch (const ts::Error& e) {
    usage(argv[0], e.what());
  }
  if (o.run_dir.empty()) o.run_dir = (fs::temp_directory_path() / "tessera_train_r1").string();
  if (o.eval_every <= 0) o.eval_every = std::max(1L, o.steps / 5);
  if (o.checkpoint_every <= 0) o.checkpoint_every = std::max(1L, o.steps / 3);
  return o;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

std::string hms(double s) {
  char buf[32];
  const long t = static_cast<long>(s + 0.5);
  if (t >= 60) std::snprintf(buf, sizeof buf, "%ldm%02lds", t / 60, t % 60);
  else std::snprintf(buf, sizeof buf, "%lds", t);
  return buf;
}

// ---- 1. real text ----------------------------------------------------------------------------

struct Document {
  std::string text;
  int source;
};
struct Source {
  std::string name;
  std::size_t bytes = 0, documents = 0;
};

// Fortune records (separated by lines holding only '%'), colour escapes removed.
void read_fortune_file(const fs::path& p, int source, std::size_t cap, std::vector<Document>& docs,
                       Source& s) {
  std::ifstream in(p, std::ios::binary);
  std::string line, rec;
  auto flush = [&] {
    ts::data::clean::strip_ansi_escapes(rec);
    while (!rec.empty() && (rec.back() == '\n' || rec.back() == ' ')) rec.pop_back();
    if (!rec.empty() && s.bytes < cap) {
      s.bytes += rec.size();
      ++s.documents;
      docs.push_back({rec + "\n", source});
    }
    rec.clear();
  };
  while (std::getline(in, line)) {
    if (line == "%") flush();
    else rec.append(line).push_back('\n');
  }
  flush();
}

// The King James Bible through the `bible` program: one document per chapter, verse numbers
// dropped.
void read_bible(int source, std::size_t cap, std::vector<Document>& docs, Source& s) {
  FILE* p = ::popen("bible -l10000 'Gen1:1-Rev22:21' 2>/dev/null", "r");
  if (!p) return;
  char buf[1 << 14];
  std::string chapter;
  auto flush = [&] {
    if (!chapter.empty() && s.bytes < cap) {
      s.bytes += chapter.size();
      ++s.documents;
      docs.push_back({chapter, source});
    }
    chapter.clear();
  };
  while (std::fgets(buf, sizeof buf, p)) {
    std::string line(buf);
    std::size_t i = line.find_first_not_of(' ');
    if (i == std::string::npos || line[i] == '\n') continue;
    if (line[0] != ' ') {  // "Genesis 1": a chapter heading
      flush();
      chapter = line;
      continue;
    }
    std::size_t j = i;
    while (j < line.size() && std::isdigit(static_cast<unsigned char>(line[j]))) ++j;
    chapter += line.substr(j < line.size() && line[j] == ' ' ? j + 1 : i);
  }
  flush();
  ::pclose(p);
}

std::vector<Document> read_corpus(std::size_t cap, std::vector<Source>& sources) {
  const fs::path dir = "/usr/share/games/fortunes";
  std::vector<Document> docs;
  sources = {{"Tang poems (fortunes-zh tang300)"}, {"Song ci (fortunes-zh song100)"},
             {"Chinese fortunes (fortunes-zh chinese)"}, {"English fortunes (fortunes)"},
             {"King James Bible (bible-kjv)"}};
  read_fortune_file(dir / "tang300", 0, cap, docs, sources[0]);
  read_fortune_file(dir / "song100", 1, cap, docs, sources[1]);
  read_fortune_file(dir / "chinese", 2, cap, docs, sources[2]);
  std::vector<fs::path> english;
  if (fs::is_directory(dir))
    for (const auto& e : fs::directory_iterator(dir)) {
      const std::string n = e.path().filename().string();
      if (e.is_regular_file() && e.path().extension().empty() && n != "tang300" && n != "song100" &&
          n != "chinese")
        english.push_back(e.path());
    }
  std::sort(english.begin(), english.end());  // a fixed order, whatever the directory's
  for (const auto& p : english) read_fortune_file(p, 3, cap, docs, sources[3]);
  read_bible(4, cap, docs, sources[4]);
  return docs;
}

// ---- 2. sampling ---------------------------------------------------------------------------

// Next-token sampling with temperature and top-k, from Philox draws (reproducible by seed).
template <class Model>
std::string generate(Model& model, const ts::data::BpeTokenizer& tok, const std::string& prompt,
                     int new_tokens, double temperature, int top_k, ts::Philox& rng, int64_t max_ctx,
                     std::uint32_t eot) {
  std::vector<std::uint32_t> ids = tok.encode(prompt);
  const std::size_t start = ids.size();
  typename Model::Saved saved;
  for (int n = 0; n < new_tokens; ++n) {
    const std::size_t L = std::min<std::size_t>(ids.size(), static_cast<std::size_t>(max_ctx));
    auto x = ts::Tensor<std::int32_t>::empty({1, static_cast<std::int64_t>(L)});
    for (std::size_t i = 0; i < L; ++i) x.data()[i] = static_cast<std::int32_t>(ids[ids.size() - L + i]);
    const auto logits = model.forward(x, saved);  // (1, L, vocab)
    const auto* last = logits.data() + (L - 1) * kVocab;
    std::vector<std::pair<float, int>> cand(kVocab);
    for (int v = 0; v < kVocab; ++v) cand[v] = {ts::to_float(last[v]), v};
    std::partial_sort(cand.begin(), cand.begin() + top_k, cand.end(),
                      [](auto& a, auto& b) { return a.first > b.first; });
    std::vector<double> p(top_k);
    double sum = 0;
    for (int k = 0; k < top_k; ++k) sum += p[k] = std::exp((cand[k].first - cand[0].first) / temperature);
    double u = rng.next_uniform() * sum;
    int pick = top_k - 1;
    for (int k = 0; k < top_k; ++k) {
      if ((u -= p[k]) < 0) {
        pick = k;
        break;
      }
    }
    const auto id = static_cast<std::uint32_t>(cand[pick].second);
    if (id == eot) break;
    ids.push_back(id);
  }
  return tok.decode(std::vector<std::uint32_t>(ids.begin() + static_cast<std::ptrdiff_t>(start), ids.end()));
}

// A sample for the terminal: a token may end inside a UTF-8 character (byte-level BPE), so stray
// bytes become U+FFFD, and line breaks are shown as '↵' to keep each sample on one line.
std::string printable(const std::string& s) {
  std::string out;
  for (std::size_t i = 0; i < s.size();) {
    const auto c = ts::data::utf8_at(s, i);
    if (c.cp == ts::data::kInvalidCodePoint) out += "\xEF\xBF\xBD";
    else if (c.cp == '\n') out += "\xE2\x86\xB5";
    else out.append(s, i, c.len);
    i += c.len;
  }
  return out;
}

// ---- 3. training -----------------------------------------------------------------------------

struct Prepared {
  fs::path run_dir, train_shard, val_shard;
  std::optional<ts::data::BpeTokenizer> tokenizer;  // set once trained or loaded
  std::uint32_t eot = 0;
};

struct Result {
  double val_ce = 0, unigram_ce = 0;
  double train_seconds = 0, tokens_per_second = 0;
  long steps_run = 0;
};

template <class Config, class Recipe>
Result train(const Options& o, Prepared& prep) {
  using Model = ts::Decoder<tr::WithRecipe<Config, Recipe>>;
  using T = typename Model::value_type;
  Model model{ts::Seed{o.seed}};
  std::printf("\n3. Model: %s\n   %lld parameters; precision %s (%s)\n",
              model.metadata()["tessera.config"].c_str(), static_cast<long long>(model.parameter_count()),
              std::string(Recipe::kName).c_str(),
              std::is_same_v<Recipe, tr::FP8Tile>
                  ? "float model; attention projections, FFN and experts multiply E4M3 operands "
                    "with 1x128 / 128x128 scales, accumulating in fp32"
              : std::is_same_v<Recipe, tr::FP8Delayed>
                  ? "float model; attention projections, FFN and experts multiply E4M3 x and W, "
                    "E5M2 gradients, with delayed per-tensor scales, accumulating in fp32"
              : std::is_same_v<T, float> ? "float everywhere"
                                         : "16-bit model, fp32 master weights and gradient sums in the optimizer");

  const tr::TokenDataset train_data({prep.train_shard}), val_data({prep.val_shard});
  tr::BatchLoader loader(train_data, o.seq, o.batch, ts::Seed{o.seed + 1});
  const std::uint64_t val_windows = val_data.windows(o.seq);
  const std::int64_t val_batches = static_cast<std::int64_t>(std::min<std::uint64_t>(val_windows / o.batch, 40));
  TESSERA_CHECK(val_batches >= 1, "train_r1: the validation split has only ", val_windows,
                " windows of ", o.seq + 1, " tokens");

  // The unigram model: token frequencies of the training shard (add-one smoothing), scored on
  // exactly the targets the final validation scores.
  std::vector<double> counts(kVocab, 1.0);
  double total = kVocab;
  {
    const tr::TokenShard& s = train_data.shards()[0];
    for (std::uint64_t i = 0; i < s.size(); ++i) counts[s[i]] += 1, total += 1;
  }
  Result res;
  {
    auto v = tr::BatchLoader::sequential(val_data, o.seq, o.batch);
    double nll = 0;
    std::int64_t n = 0;
    for (std::int64_t b = 0; b < val_batches; ++b) {
      const auto seq = v.next();
      for (std::int64_t r = 0; r < o.batch; ++r)
        for (std::int64_t t = 1; t <= o.seq; ++t, ++n) nll -= std::log(counts[seq.data()[r * (o.seq + 1) + t]] / total);
    }
    res.unigram_ce = nll / static_cast<double>(n);
  }

  tr::AdamWOptions ao;
  ao.beta2 = 0.95;
  ao.weight_decay = 0.1;
  tr::AdamW<T> opt(ao);
  tr::TrainerOptions to;
  to.micro_batches = o.micro_batches;
  to.max_grad_norm = 1.0;
  const long warmup = std::max(1L, o.steps / 15);
  tr::Trainer<Model, Recipe, tr::AdamW<T>> trainer(model, opt, loader,
                                                    tr::WarmupCosine(o.lr, warmup, o.steps, o.lr / 10), to);
  tr::CheckpointManager ckpt(prep.run_dir / "checkpoints", 2);
  if (o.resume) {
    auto found = ckpt.load_latest(model, opt, [](const std::string& w) { std::printf("   %s\n", w.c_str()); });
    if (found) {
      trainer.restore(*found);
      std::printf("   resumed from %s (step %lld)\n", found->dir.string().c_str(),
                  static_cast<long long>(found->step));
    } else {
      std::printf("   --resume: no usable checkpoint in %s, starting at step 0\n",
                  ckpt.dir().string().c_str());
    }
  }

  auto validate = [&](std::int64_t batches) {
    auto v = tr::BatchLoader::sequential(val_data, o.seq, o.batch);
    return trainer.evaluate(v, batches);
  };
  std::printf("   batch %ld x %ld tokens x %ld micro-batches; AdamW (beta2 0.95, weight decay 0.1), lr %.1e "
              "warm-up %ld then cosine to %.1e over %ld steps; clip 1.0\n",
              o.batch, o.seq, o.micro_batches, o.lr, warmup, o.lr / 10, o.steps);
  std::printf("   validation: %lld batches (%lld tokens); unigram perplexity %.1f\n\n",
              static_cast<long long>(val_batches), static_cast<long long>(val_batches * o.batch * o.seq),
              std::exp(res.unigram_ce));

  const bool tty = ::isatty(STDOUT_FILENO);
  const auto t0 = std::chrono::steady_clock::now();
  const long first = trainer.step_index();
  std::int64_t tokens = 0;
  double loss_avg = 0;
  while (trainer.step_index() < o.steps) {
    const tr::StepReport r = trainer.step();
    tokens += r.tokens;
    loss_avg = r.step == first ? r.loss : 0.9 * loss_avg + 0.1 * r.loss;
    const long done = trainer.step_index();
    const double el = seconds_since(t0);
    const double eta = el / static_cast<double>(done - first) * static_cast<double>(o.steps - done);
    if (r.skipped)
      std::printf("%s   step %lld skipped: fp16 gradients overflowed; loss scale now %.0f\n",
                  tty ? "\n" : "", static_cast<long long>(r.step), trainer.loss_scale().scale);
    const bool report = done % o.eval_every == 0 || done == o.steps;
    if (tty || report || done % 10 == 0) {
      const int width = 24, fill = static_cast<int>(width * done / o.steps);
      std::printf("%sstep %5ld/%ld [%s%s] loss %.3f | %6.0f tok/s | ETA %s   %s", tty ? "\r" : "", done,
                  o.steps, std::string(fill, '#').c_str(), std::string(width - fill, '.').c_str(),
                  loss_avg, tokens / el, hms(eta).c_str(), tty ? "" : "\n");
      std::fflush(stdout);
    }
    if (report) {
      const double ce = validate(std::min<std::int64_t>(val_batches, 8));
      std::printf("%s   step %ld: validation perplexity %.1f (on 8 batches)\n", tty ? "\n" : "", done, std::exp(ce));
    }
    if (done % o.checkpoint_every == 0 || done == o.steps) trainer.save(ckpt);
  }
  res.train_seconds = seconds_since(t0);
  res.steps_run = trainer.step_index() - first;
  res.tokens_per_second = res.steps_run > 0 ? static_cast<double>(tokens) / res.train_seconds : 0;
  res.val_ce = validate(val_batches);
  const ts::models::ModelStats& st = trainer.last_saved().stats;
  std::printf("\n   trained %ld steps in %s (%.0f tokens/s); checkpoints in %s\n", res.steps_run,
              hms(res.train_seconds).c_str(), res.tokens_per_second, ckpt.dir().string().c_str());
  std::printf("   last batch: attention did %.2f of full causal work; %.0f%% of parameters active per "
              "token\n",
              st.attention_work_fraction, 100 * st.active_parameter_fraction);

  if (o.samples) {
    std::optional<ts::Fp8Scope> fp8;  // sample with the products the model was trained with
    if constexpr (tr::Fp8Recipe<Recipe>) fp8.emplace(trainer.fp8_products(), /*record=*/false);
    std::printf("\n4. Samples (temperature 0.8, top-k 40):\n");
    ts::Philox rng(ts::Seed{o.seed + 7}, 0);
    for (const char* prompt : {"床前明月光，", "春眠不觉晓，", "And God said", "The meaning of life is"}) {
      const std::string s = generate(model, *prep.tokenizer, prompt, 40, 0.8, 40, rng, o.seq, prep.eot);
      std::printf("   %s|%s\n", prompt, printable(s).c_str());
    }
  }
  return res;
}

// The one place where run-time choices become types; its default lists what is compiled in.
Result dispatch(const Options& o, Prepared& prep) {
  const bool var = o.window == "variable", hier = o.experts == "hierarchical";
  if (var && hier) {
    if (o.precision == "fp32") return train<R1Small, tr::FP32>(o, prep);
    if (o.precision == "bf16-mixed") return train<R1Small, tr::BF16Mixed>(o, prep);
    if (o.precision == "fp16-mixed") return train<R1Small, tr::FP16Mixed>(o, prep);
    if (o.precision == "fp8-tile") return train<R1Small, tr::FP8Tile>(o, prep);
    if (o.precision == "fp8-delayed") return train<R1Small, tr::FP8Delayed>(o, prep);
  } else if (o.precision == "fp32") {
    if (o.window == "sliding" && hier) return train<R1Sliding, tr::FP32>(o, prep);
    if (o.window == "full" && hier) return train<R1Full, tr::FP32>(o, prep);
    if (var && o.experts == "flat") return train<R1Flat, tr::FP32>(o, prep);
  }
  tr::check_recipe_name(o.precision);
  ts::fail("--window ", o.window, " --experts ", o.experts, " --precision ", o.precision,
           " is not compiled in. Compiled variants: variable + hierarchical with fp32, bf16-mixed, "
           "fp16-mixed, fp8-tile, fp8-delayed; with fp32 only: sliding + hierarchical, full + "
           "hierarchical, variable + flat");
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  const auto t_start = std::chrono::steady_clock::now();
  // OpenMP threads that spin while waiting (libgomp's default) turn this small model's many short
  // parallel regions into a crawl as soon as anything else uses the cores (measured: 13 min
  // instead of 3 for the default run). Unless the user chose, run one thread; scripts/demo.sh
  // asks for two threads that sleep while waiting (OMP_WAIT_POLICY=passive). Results do not
  // depend on the thread count.
  if (!std::getenv("OMP_NUM_THREADS") && !std::getenv("OMP_WAIT_POLICY")) {
    omp_set_num_threads(1);
    std::printf("(one OpenMP thread; OMP_NUM_THREADS=2 OMP_WAIT_POLICY=passive uses both cores)\n");
  }
  try {
    Prepared prep;
    prep.run_dir = o.run_dir;
    prep.train_shard = prep.run_dir / "train.tok";
    prep.val_shard = prep.run_dir / "val.tok";
    const fs::path tok_file = prep.run_dir / "tokenizer.json";
    if (o.resume && fs::exists(tok_file) && fs::exists(prep.train_shard) && fs::exists(prep.val_shard)) {
      std::printf("1-2. --resume: reusing the tokenizer and token shards in %s\n", prep.run_dir.string().c_str());
      prep.tokenizer.emplace(ts::data::BpeTokenizer::from_file(tok_file));
    } else {
      if (!o.resume) fs::remove_all(prep.run_dir / "checkpoints");  // a fresh run
      fs::create_directories(prep.run_dir);
      std::vector<Source> sources;
      const std::vector<Document> docs = read_corpus(o.max_source_bytes, sources);
      std::printf("1. Text (at most %zu bytes per source):\n", o.max_source_bytes);
      for (const Source& s : sources)
        std::printf("   %-40s %6zu documents %9zu bytes%s\n", s.name.c_str(), s.documents, s.bytes,
                    s.documents == 0 ? "  (missing: apt-get install fortunes fortunes-zh bible-kjv)" : "");
      std::vector<std::string> train_docs, val_docs;
      for (std::size_t i = 0; i < docs.size(); ++i)
        (i % 20 == 19 ? val_docs : train_docs).push_back(docs[i].text);
      TESSERA_CHECK(val_docs.size() >= 20, "train_r1: only ", docs.size(),
                    " documents found; install fortunes-zh, fortunes and bible-kjv");
      std::printf("   held out every 20th document: %zu training, %zu validation documents\n",
                  train_docs.size(), val_docs.size());

      const auto t_tok = std::chrono::steady_clock::now();
      ts::data::BpeTrainerOptions bo;
      bo.vocab_size = kVocab;
      bo.special_tokens = {"<|endoftext|>"};
      ts::data::BpeTrainer trainer(bo);
      trainer.add_texts(train_docs);
      prep.tokenizer.emplace(trainer.train());
      prep.tokenizer->save(tok_file);
      TESSERA_CHECK(prep.tokenizer->vocab_size() <= static_cast<std::size_t>(kVocab),
                    "train_r1: the tokenizer has ", prep.tokenizer->vocab_size(), " tokens");
      const std::uint32_t eot = prep.tokenizer->special_token_id("<|endoftext|>");
      auto write = [&](const std::vector<std::string>& d, const fs::path& p) {
        tr::TokenShardWriter w(p, kVocab);
        std::uint64_t bytes = 0;
        for (const auto& ids : prep.tokenizer->encode_batch(d)) {
          w.append(ids);
          w.append(std::vector<std::uint32_t>{eot});
        }
        for (const auto& s : d) bytes += s.size();
        const std::uint64_t n = w.finish();
        return std::pair{n, bytes};
      };
      const auto [ntrain, btrain] = write(train_docs, prep.train_shard);
      const auto [nval, bval] = write(val_docs, prep.val_shard);
      std::printf("\n2. BPE vocabulary: %zu tokens (%zu merges) trained on the training split in %s\n"
                  "   training split %llu tokens (%.2f bytes/token), validation %llu tokens; shards "
                  "(uint16) in %s\n",
                  prep.tokenizer->vocab_size(), prep.tokenizer->merge_count(), hms(seconds_since(t_tok)).c_str(),
                  static_cast<unsigned long long>(ntrain), static_cast<double>(btrain) / ntrain,
                  static_cast<unsigned long long>(nval), prep.run_dir.string().c_str());
      (void)bval;
    }
    prep.eot = prep.tokenizer->special_token_id("<|endoftext|>");

    const Result r = dispatch(o, prep);
    const double ppl = std::exp(r.val_ce), uni = std::exp(r.unigram_ce);
    std::printf("\nFinal validation perplexity: %.1f (unigram perplexity of the same tokens: %.1f) — %s\n",
                ppl, uni, ppl < uni ? "the model learned to use context" : "no better than unigram");
    std::printf("Total time %s\n", hms(seconds_since(t_start)).c_str());
    return ppl < uni ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "train_r1: %s\n", e.what());
    return 1;
  }
}
